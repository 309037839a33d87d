"""Seeding: every fold has its own seed, and the batch order is drawn from (seed, fold).

Two folds given the same seed, or a batch order that ignores the seed, still train and still
reproduce themselves, so reproducibility tests cannot see either bug. These tests compare
two folds and two seeds: the order in which training visits its rows (recorded from the
batches the training loop really draws) must differ between folds and between seeds, and
be identical when the same (seed, fold) is trained again.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds3(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("seed") / "d3c.h5", n=40, channels=3, folds=5)


def _cfg(seed: int, **kw):
    from nodulekit.training import TrainConfig

    return TrainConfig(
        arch="cam", model_options={"base_width": 4}, epochs=2, batch_size=8, device="cpu", seed=seed, **kw
    )


def visiting_orders(dataset, rundir, seed: int, folds=(0, 1)) -> dict[int, list[np.ndarray]]:
    """Per fold and epoch, the permutation of the fold's training rows that the training loop used."""
    from nodulekit import training
    from nodulekit.datasets import load_dataset

    seen: list[np.ndarray] = []
    original = training._DeviceData.batch

    def recording(self, idx):
        if sys._getframe(1).f_code.co_name == "_train_epoch":  # not the execution probe's example batch
            seen.append(idx.cpu().numpy().copy())
        return original(self, idx)

    training._DeviceData.batch = recording
    try:
        orders: dict[int, list[np.ndarray]] = {}
        ds = load_dataset(dataset)
        for k in folds:
            seen.clear()
            training.train(dataset, rundir / f"k{k}", _cfg(seed), folds=[k], progress=False)
            rows = np.concatenate(seen)
            train_rows = np.flatnonzero(ds.fold != k)
            per_epoch = rows.reshape(2, -1)
            for epoch in per_epoch:
                assert sorted(epoch.tolist()) == train_rows.tolist()  # every training row once per epoch
            orders[k] = [np.searchsorted(train_rows, epoch) for epoch in per_epoch]
    finally:
        training._DeviceData.batch = original
    return orders


@pytest.fixture(scope="module")
def orders(ds3, tmp_path_factory):
    root = tmp_path_factory.mktemp("orders")
    return {
        "seed0": visiting_orders(ds3, root / "a", 0),
        "seed0-again": visiting_orders(ds3, root / "b", 0, folds=(1,)),
        "seed1": visiting_orders(ds3, root / "c", 1, folds=(1,)),
    }


def test_batch_order_is_reproducible_for_the_same_seed_and_fold(orders):
    for a, b in zip(orders["seed0"][1], orders["seed0-again"][1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_order_differs_between_folds(orders):
    # Both folds train on 32 rows: the same generator state would give the same permutation.
    for a, b in zip(orders["seed0"][0], orders["seed0"][1], strict=True):
        assert len(a) == len(b) == 32 and not np.array_equal(a, b)


def test_batch_order_depends_on_the_seed(orders):
    for a, b in zip(orders["seed0"][1], orders["seed1"][1], strict=True):
        assert not np.array_equal(a, b)


def test_epochs_are_shuffled_afresh(orders):
    first, second = orders["seed0"][0]
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(32))


def test_fold_seeds_are_distinct_and_depend_on_the_seed():
    from nodulekit.training import fold_seed

    seeds = {(s, k): fold_seed(s, k) for s in range(3) for k in range(10)}
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, fold) share a seed
    assert all(fold_seed(s, k) == v for (s, k), v in seeds.items())  # and each is reproducible


def test_each_folds_model_starts_from_its_own_initialisation(ds3, tmp_path):
    from nodulekit.datasets import load_dataset
    from nodulekit.training import new_fold_state, train_context

    data = load_dataset(ds3)

    def initial(seed, fold):
        ctx = train_context(data, _cfg(seed), tmp_path / f"s{seed}", run={})
        state = new_fold_state(ctx, fold)
        return state.seed, torch.cat([p.detach().flatten() for p in state.model.parameters()])

    s00, w00 = initial(0, 0)
    s01, w01 = initial(0, 1)
    s10, w10 = initial(1, 0)
    again, w00b = initial(0, 0)
    assert again == s00 and torch.equal(w00, w00b)
    assert len({s00, s01, s10}) == 3
    assert not torch.equal(w00, w01) and not torch.equal(w00, w10)
