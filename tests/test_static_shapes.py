"""Static shapes for training (``--last-batch drop``), ``--cuda-graphs`` (refused off CUDA), and the
CLI's defaults taken from TrainConfig."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

from nodulekit import training as T
from nodulekit.errors import NodulekitError
from nodulekit.train_config import TrainConfig

torch.set_num_threads(1)
BASE = dict(arch="cam", model_options={"base_width": 4}, epochs=2, lr=0.01, batch_size=8, device="cpu", seed=0)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """5 folds of 8 nodules: each fold trains on 32 + ... rows; see the counts asserted below."""
    return write_tiny_dataset(tmp_path_factory.mktemp("ds") / "d3c.h5", n=46, channels=3, folds=5)


@pytest.mark.parametrize("rows, size", [(38, 8), (37, 6), (32, 8)])
def test_epoch_batches_keep_and_drop(rows, size):
    """keep: the generator's permutation cut in slices of ``size``, a last slice of >= 2 rows
    included; drop: the same slices without the partial one. Same permutation in both modes."""
    index = np.arange(100, 100 + rows)
    keep = T.epoch_batches(index, torch.Generator().manual_seed(7), size, "keep", torch.device("cpu"))
    drop = T.epoch_batches(index, torch.Generator().manual_seed(7), size, "drop", torch.device("cpu"))
    order = index[torch.randperm(rows, generator=torch.Generator().manual_seed(7)).numpy()]
    last = rows % size
    assert [len(b) for b in drop] == [size] * (rows // size)
    assert [len(b) for b in keep] == [size] * (rows // size) + ([last] if last >= 2 else [])
    np.testing.assert_array_equal(torch.cat(keep).numpy(), order[: rows if last != 1 else rows - 1])
    np.testing.assert_array_equal(torch.cat(drop).numpy(), order[: size * (rows // size)])


def steps_taken(rundir, fold):
    """Training steps of a fold, counted by its batch norms (one count per step)."""
    ckpt = torch.load(rundir / f"fold{fold}" / "checkpoint.pt", weights_only=True)
    return {int(v) for k, v in ckpt["state_dict"].items() if k.endswith("num_batches_tracked")}


def test_train_with_last_batch_drop_takes_only_full_batches(ds, tmp_path):
    from nodulekit.datasets import load_dataset

    rows = [int((load_dataset(ds).fold != k).sum()) for k in range(5)]
    keep = T.train(ds, tmp_path / "keep", TrainConfig(**BASE), folds=[0, 3], progress=False)
    drop = T.train(ds, tmp_path / "drop", TrainConfig(**BASE, last_batch="drop"), folds=[0, 3], progress=False)
    assert keep["run"]["last_batch"] == "keep" and drop["run"]["last_batch"] == "drop"
    for k in (0, 3):
        full, rest = divmod(rows[k], 8)
        assert rest >= 2  # the fixture has a partial last batch that keep trains on
        assert steps_taken(tmp_path / "keep", k) == {2 * (full + 1)}
        assert steps_taken(tmp_path / "drop", k) == {2 * full}
    # another last-batch rule is another experiment: resuming with it is refused, one line
    with pytest.raises(NodulekitError, match='last_batch "drop" vs "keep"'):
        T.train(ds, tmp_path / "drop", TrainConfig(**BASE), folds=[0], progress=False)


def test_run_json_without_last_batch_resumes_as_keep(ds, tmp_path):
    """A RUNDIR made before --last-batch existed meant keep: it resumes and extends unchanged."""
    rundir = tmp_path / "old"
    T.train(ds, rundir, TrainConfig(**{**BASE, "epochs": 1}), folds=[1], progress=False)
    record = json.loads((rundir / "run.json").read_text())
    del record["last_batch"]
    (rundir / "run.json").write_text(json.dumps(record))
    out = T.train(ds, rundir, TrainConfig(**BASE), folds=[1], progress=False)
    assert out["folds"][0]["status"] == "resumed"
    with pytest.raises(NodulekitError, match='last_batch "keep" vs "drop"'):
        T.train(ds, rundir, TrainConfig(**BASE, last_batch="drop"), folds=[1], progress=False)


def test_side_by_side_with_last_batch_drop_equals_sequential(ds):
    """float64, folds of 36 and 38 rows in batches of 8: both ways skip the same partial batches."""
    from nodulekit.concurrent_folds import train_epoch_side_by_side
    from nodulekit.datasets import load_dataset

    data = load_dataset(ds)
    cfg = TrainConfig(**{**BASE, "arch": "hesam"})
    ctx = T.train_context(data, cfg, "unused", run={}, device=torch.device("cpu"))
    ctx.device_data.x = ctx.device_data.x.double()
    ctx.device_data.characteristics = ctx.device_data.characteristics.double()

    def states():
        out = [T.new_fold_state(ctx, k) for k in (0, 3)]
        for s in out:
            s.model.double()
        return out

    alone, together = states(), states()
    for s in alone:
        T._train_epoch(s.model, s.model.training_forward, s.optimizer, ctx.device_data, s.split.train_index,
                       s.generator, 8, False, s.fold, 1, last_batch="drop")  # fmt: skip
    train_epoch_side_by_side(together, ctx.device_data, 8, False, "drop")
    for a, b in zip(alone, together, strict=True):
        for (name, u), v in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
            assert float((u.double() - v.double()).abs().max()) < 1e-12, name
        counts = {int(v) for k, v in a.model.state_dict().items() if k.endswith("num_batches_tracked")}
        assert counts == {len(a.split.train_index) // 8}


def test_cuda_graphs_needs_static_shapes_and_a_gpu(ds, tmp_path, run_cli):
    with pytest.raises(NodulekitError, match="--cuda-graphs needs static shapes: add --last-batch drop"):
        TrainConfig(cuda_graphs=True).validate()
    with pytest.raises(NodulekitError, match="not combined with --concurrent-folds"):
        TrainConfig(cuda_graphs=True, last_batch="drop", concurrent_folds=True).validate()
    out = tmp_path / "graphs"
    code, _, err = run_cli("train", ds, "-o", out, "--device", "cpu", "--cuda-graphs", "--last-batch", "drop")
    assert code == 2 and err.strip() == (
        "nodulekit: error: --cuda-graphs needs a CUDA device; this run trains on cpu (drop --cuda-graphs)"
    )
    assert not out.exists()  # refused before anything is written


def test_cuda_graphs_compile_the_training_step_with_reduce_overhead(monkeypatch):
    """What --cuda-graphs asks of torch (the capture itself needs a GPU, not here)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    model = torch.nn.Module()
    model.training_forward = lambda batch: batch
    T.training_forward(model, TrainConfig(cuda_graphs=True, last_batch="drop"))
    T.training_forward(model, TrainConfig(compile=True))
    assert T.training_forward(model, TrainConfig()) == model.training_forward and calls == [
        {"mode": "reduce-overhead"},
        {},
    ]


def test_cli_train_defaults_are_train_config_defaults():
    """Every `nodulekit train` option that is a TrainConfig field defaults to TrainConfig's value
    (amp and channels_last: neither flag = "auto")."""
    import dataclasses

    import typer

    from nodulekit.cli import app

    command = typer.main.get_command(app).commands["train"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    checked = []
    for param in command.params:
        if param.name in fields:
            want = getattr(defaults, param.name)
            got = "auto" if param.default is None and want == "auto" else param.default
            assert got == want, (param.name, param.default, want)
            checked.append(param.name)
    assert {"epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_step", "select", "seed",
            "val_fraction", "last_batch", "cuda_graphs", "concurrent_folds", "arch", "device"} <= set(checked)  # fmt: skip
