"""Known answers for the small pieces training rests on: the settings' checks (``train_config``),
an epoch's batches and a batch's loss (``train_step``), ``--device`` (``devices``) and opening a
file without following links (``host``). Each value sits at the boundary a check draws."""

from __future__ import annotations

import errno
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

from nodulekit.errors import NodulekitError
from nodulekit.train_config import MAX_SEED, TrainConfig, check_seed

# --------------------------------------------------------------------------- train_config


def test_the_paper_defaults():
    """The defaults are the paper's (section 4.2) and the documented run settings."""
    cfg = TrainConfig()
    assert (cfg.arch, cfg.model_options, cfg.epochs, cfg.batch_size, cfg.last_batch) == ("hesam", {}, 90, 32, "keep")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma) == (5e-4, 0.9, 1e-4, 30, 0.1)
    assert (cfg.seed, cfg.select, cfg.val_fraction, cfg.device) == (0, "last", 0.1, "auto")
    assert (cfg.amp, cfg.channels_last, cfg.compile, cfg.cuda_graphs, cfg.concurrent_folds) == (
        "auto",
        "auto",
        False,
        False,
        False,
    )
    assert (cfg.eval_batch_size, cfg.recipe) == (512, None)
    assert MAX_SEED == 4294967295


REFUSED = [
    ({"epochs": 0}, "--epochs must be at least 1 (got 0)"),
    ({"batch_size": 1}, "--batch-size must be at least 2 for batch normalisation (got 1)"),
    ({"lr": 0.0}, "--lr must be a positive number (got 0.0)"),
    ({"lr": float("inf")}, "--lr must be a positive number (got inf)"),
    ({"lr": float("nan")}, "--lr must be a positive number (got nan)"),
    ({"momentum": 1.0}, "--momentum must be in [0, 1) (got 1.0)"),
    ({"momentum": -0.01}, "--momentum must be in [0, 1) (got -0.01)"),
    ({"lr_gamma": 0.0}, "--lr-gamma must be in (0, 1] (got 0.0)"),
    ({"lr_gamma": 1.01}, "--lr-gamma must be in (0, 1] (got 1.01)"),
    ({"seed": -1}, f"--seed must be an integer from 0 to {2**32 - 1} (got -1)"),
    ({"seed": 2**32}, f"--seed must be an integer from 0 to {2**32 - 1} (got {2**32})"),
    ({"weight_decay": -1e-9}, "--weight-decay must be >= 0 (got -1e-09)"),
    ({"weight_decay": float("nan")}, "--weight-decay must be >= 0 (got nan)"),
    ({"weight_decay": float("inf")}, "--weight-decay must be >= 0 (got inf)"),
    ({"lr_step": 0}, "--lr-step must be at least 1 (got 0)"),
    ({"select": "best"}, "--select must be one of last, val (got 'best')"),
    ({"select": "val", "val_fraction": 0.0}, "--val-fraction must be in (0, 0.5) (got 0.0)"),
    ({"select": "val", "val_fraction": 0.5}, "--val-fraction must be in (0, 0.5) (got 0.5)"),
    (
        {"select": "val", "recipe": SimpleNamespace(ema_decay=0.5)},
        "--select val cannot be combined with a recipe's EMA (it reports the averaged weights)",
    ),
    ({"last_batch": "pad"}, "--last-batch must be one of keep, drop (got 'pad')"),
    (
        {"cuda_graphs": True},
        "--cuda-graphs needs static shapes: add --last-batch drop (a last partial batch would be another graph)",
    ),
    (
        {"cuda_graphs": True, "last_batch": "drop", "concurrent_folds": True},
        "--cuda-graphs is not combined with --concurrent-folds; choose one",
    ),
]


@pytest.mark.parametrize(("changes", "message"), REFUSED)
def test_each_bad_setting_is_refused_in_one_line(changes, message):
    with pytest.raises(NodulekitError, match=f"^{re.escape(message)}$"):
        TrainConfig(**changes).validate()


ACCEPTED = [
    {"epochs": 1, "batch_size": 2, "lr_step": 1},
    {"momentum": 0.0, "lr_gamma": 1.0, "weight_decay": 0.0},
    {"seed": 0},
    {"seed": 2**32 - 1},
    {"select": "val", "val_fraction": 0.49},
    {"select": "val", "val_fraction": 1e-3},
    {"select": "last", "val_fraction": 0.9},  # only --select val reads it
    {"select": "val", "recipe": SimpleNamespace(ema_decay=0.0)},
    {"select": "last", "recipe": SimpleNamespace(ema_decay=0.5)},
    {"last_batch": "drop"},
    {"cuda_graphs": True, "last_batch": "drop"},
    {"concurrent_folds": True},
]


@pytest.mark.parametrize("changes", ACCEPTED)
def test_settings_at_the_edge_of_each_range_are_accepted(changes):
    TrainConfig(**changes).validate()


def test_check_seed_names_the_option_it_checks():
    check_seed(0)
    check_seed(MAX_SEED, "--split-seed")
    with pytest.raises(NodulekitError, match=r"^--seed must be an integer from 0 to 4294967295 \(got -3\)$"):
        check_seed(-3)
    with pytest.raises(
        NodulekitError, match=r"^--split-seed must be an integer from 0 to 4294967295 \(got 4294967296\)$"
    ):
        check_seed(2**32, "--split-seed")


def test_cuda_graphs_need_a_cuda_device():
    import torch

    TrainConfig(cuda_graphs=True, last_batch="drop").check_device(SimpleNamespace(type="cuda"))
    TrainConfig().check_device(torch.device("cpu"))
    with pytest.raises(
        NodulekitError,
        match=r"^--cuda-graphs needs a CUDA device; this run trains on cpu \(drop --cuda-graphs\)$",
    ):
        TrainConfig(cuda_graphs=True, last_batch="drop").check_device(torch.device("cpu"))


# --------------------------------------------------------------------------- train_step


def _expected_batches(index, seed, batch_size, smallest):
    """The batches as the docstring defines them: torch's seeded permutation of the rows, cut in slices."""
    import torch

    perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed)).numpy()
    order = np.asarray(index)[perm]
    cut = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [c.tolist() for c in cut if len(c) >= smallest]


@pytest.mark.parametrize(
    ("n", "batch_size", "last_batch", "sizes"),
    [
        (10, 4, "keep", [4, 4, 2]),  # a last batch of exactly 2 rows trains
        (9, 4, "keep", [4, 4]),  # one row cannot: batch normalisation needs two
        (10, 4, "drop", [4, 4]),
        (8, 4, "drop", [4, 4]),  # full batches are never dropped
        (3, 4, "keep", [3]),
    ],
)
def test_epoch_batches_cut_the_generators_permutation(n, batch_size, last_batch, sizes):
    import torch

    from nodulekit.train_step import epoch_batches

    index = np.arange(n) * 3 + 100  # row numbers, not positions
    got = epoch_batches(index, torch.Generator().manual_seed(7), batch_size, last_batch, torch.device("cpu"))
    assert [len(b) for b in got] == sizes
    assert all(b.dtype == torch.int64 and b.device.type == "cpu" for b in got)
    # int32 row numbers still give int64 index tensors; the batches live on the device asked for
    again = epoch_batches(index.astype(np.int32), torch.Generator().manual_seed(7), batch_size, last_batch, "cpu")
    assert [b.dtype for b in again] == [torch.int64] * len(sizes)
    meta = epoch_batches(index, torch.Generator().manual_seed(7), batch_size, last_batch, torch.device("meta"))
    assert [b.device.type for b in meta] == ["meta"] * len(sizes) and [len(b) for b in meta] == sizes
    smallest = batch_size if last_batch == "drop" else 2
    assert [b.tolist() for b in got] == _expected_batches(index, 7, batch_size, smallest)


def test_batch_loss_is_cross_entropy_plus_the_auxiliary_loss():
    import torch

    from nodulekit.train_step import batch_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    p = torch.softmax(logits, 1)
    hard = float(-(torch.log(p[0, 0]) + torch.log(p[1, 0]) + torch.log(p[2, 1])) / 3)
    forward = lambda batch: (batch["x"], torch.tensor(0.25))  # noqa: E731
    loss, ce, out = batch_loss(forward, {"x": logits, "y": y})
    assert float(ce) == pytest.approx(hard, rel=1e-6)
    assert float(loss) == pytest.approx(hard + 0.25, rel=1e-6)
    assert out is logits
    # a recipe's soft targets replace the hard labels
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    soft = float(-(0.5 * torch.log(p[0, 0]) + 0.5 * torch.log(p[0, 1]) + torch.log(p[1, 0]) + torch.log(p[2, 1])) / 3)
    loss, ce, _ = batch_loss(forward, {"x": logits, "y": y, "target": target})
    assert float(ce) == pytest.approx(soft, rel=1e-6)
    assert float(loss) == pytest.approx(soft + 0.25, rel=1e-6)
    # bf16 logits (autocast) still give a float32 loss
    loss, ce, _ = batch_loss(lambda b: (b["x"].bfloat16(), torch.tensor(0.0)), {"x": logits, "y": y})
    assert ce.dtype == torch.float32 and loss.dtype == torch.float32


# --------------------------------------------------------------------------- devices


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("name", ["auto", "AUTO", None, "", "cpu", "CPU"])
def test_device_names_that_resolve_to_the_cpu(no_cuda, name):
    from nodulekit.devices import resolve_device

    assert str(resolve_device(name)) == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "CUDA:0"])
def test_cuda_without_a_gpu_is_one_line(no_cuda, name):
    import torch

    from nodulekit.devices import resolve_device

    expected = (
        f"--device {name.lower()} requested but no CUDA GPU is usable here (torch {torch.__version__}); "
        "use --device cpu or auto"
    )
    with pytest.raises(NodulekitError, match=f"^{re.escape(expected)}$"):
        resolve_device(name)


def test_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    import torch

    from nodulekit import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(devices.resolve_device("auto")) == "cuda"


def test_an_unknown_device_is_named_with_torchs_first_line(no_cuda):
    from nodulekit.devices import resolve_device

    with pytest.raises(NodulekitError) as err:
        resolve_device("tpu9")
    message = str(err.value)
    assert message.startswith("--device tpu9 is not usable: ")
    assert "\n" not in message and len(message) > len("--device tpu9 is not usable: ")
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize("name", ["fpga", "mtia", "hpu"])
def test_a_device_torch_names_but_cannot_allocate_on_is_one_line(no_cuda, name):
    """torch.device accepts these names; allocating on them fails (NotImplementedError, AssertionError
    ModuleNotFoundError in torch 2.x without that hardware): one line with torch's own first line, never a traceback."""
    import torch

    from nodulekit.devices import resolve_device

    try:
        torch.empty(1, device=torch.device(name))
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is what the message must carry
        first = str(exc).splitlines()[0]
    else:
        pytest.skip(f"this torch can allocate on {name}")
    with pytest.raises(NodulekitError) as err:
        resolve_device(name)
    assert str(err.value) == f"--device {name} is not usable: {first}"


# --------------------------------------------------------------------------- host


def test_a_linked_claim_file_is_refused_by_name(tmp_path):
    from nodulekit.host import linked_name, open_nofollow

    target = tmp_path / "real"
    target.write_text("x")
    link = tmp_path / "claim"
    link.symlink_to(target)
    assert str(linked_name(link, "claim")) == (
        f"{link} is a symbolic link, not a nodulekit claim file: remove it (never followed)"
    )
    with pytest.raises(NodulekitError, match=f"^{re.escape(str(link))} is a symbolic link, not a nodulekit lock file"):
        open_nofollow(link, os.O_RDONLY, "lock")
    assert target.read_text() == "x"


def test_open_nofollow_creates_with_its_mode_and_passes_other_errors_on(tmp_path):
    from nodulekit.host import open_nofollow

    old = os.umask(0)
    try:
        fd = open_nofollow(tmp_path / "new", os.O_WRONLY | os.O_CREAT, "claim")
        os.close(fd)
        fd = open_nofollow(tmp_path / "other", os.O_WRONLY | os.O_CREAT, "claim", 0o600)
        os.close(fd)
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "other").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileNotFoundError) as err:
        open_nofollow(tmp_path / "missing", os.O_RDONLY, "claim")
    assert err.value.errno == errno.ENOENT
