"""A failed run is a failure: every consumer refuses NaN/inf predictions in one line, writes nothing."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 2-fold hesam run (1 epoch, base width 4) on the tiny 3-channel dataset."""
    from conftest import write_tiny_dataset

    from nodulekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("failed")
    ds = write_tiny_dataset(root / "d3c.h5", channels=3, folds=2)
    cfg = TrainConfig(arch="hesam", model_options={"base_width": 4}, epochs=1, batch_size=8, device="cpu")
    train(ds, root / "run", cfg, progress=False)
    return ds, root / "run"


def copy_run(src, dst, *, bad_prob=None):
    shutil.copytree(src, dst)
    if bad_prob is not None:
        with h5py.File(dst / "fold1" / "result.h5", "a") as f:
            prob = f["test_prob"][()]
            prob[2] = bad_prob
            f["test_prob"][...] = prob
    return dst


def assert_refused(code, err, *names):
    """Non-zero exit and one error line (a progress bar may have been drawn before it), no traceback."""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code != 0 and len(errors) == 1 and "Traceback" not in err, err
    line = errors[0][errors[0].index("nodulekit: error: ") :]
    for name in names:
        assert name in line, err


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_consumers_refuse_a_fold_with_non_finite_predictions(good_run, tmp_path, bad, run_cli):
    ds, run = good_run
    broken = copy_run(run, tmp_path / "broken", bad_prob=bad)
    out = tmp_path / "out"
    out.mkdir()
    where = str(broken / "fold1" / "result.h5")
    for args in (
        ["evaluate", broken, "-o", out / "report"],
        ["wilcoxon", run, broken, "-o", out / "w.md"],
        ["readers", broken, "-o", out / "r.md"],
        ["maps", broken, "-m", "hesam", "--device", "cpu", "-o", out / "m.h5"],
    ):
        code, _, err = run_cli(*args)
        assert_refused(code, err, where, "not probabilities")
    assert list(out.rglob("*")) == []  # nothing written, not even an empty report folder


def test_maps_of_a_diverged_model_are_refused_naming_the_fold(good_run, tmp_path, run_cli):
    ds, run = good_run
    broken = copy_run(run, tmp_path / "nanweights")
    path = broken / "fold0" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    for name, value in ckpt["state_dict"].items():
        if value.is_floating_point() and "fc" in name:
            value.fill_(float("nan"))
    torch.save(ckpt, path)
    out = tmp_path / "m.h5"
    code, _, err = run_cli(*["maps", broken, "-m", "hesam", "--device", "cpu", "-o", out])
    assert_refused(code, err, str(path), "NaN or infinite")
    assert not out.exists() and list(tmp_path.glob("*.part")) == []


def test_scores_and_figures_refuse_non_finite_maps_files(good_run, tmp_path, run_cli):
    ds, run = good_run
    good = tmp_path / "good.h5"
    code, _, _ = run_cli(*["maps", run, "-m", "hesam", "--device", "cpu", "-o", good])
    assert code in (0, None)
    for member, bad in (("prob", np.nan), ("maps_up", np.inf), ("maps", np.nan)):
        broken = tmp_path / f"bad_{member}.h5"
        shutil.copy(good, broken)
        with h5py.File(broken, "a") as f:
            values = f[member][()]
            values.flat[5] = bad
            f[member][...] = values
        out = tmp_path / f"out_{member}"
        out.mkdir()
        code, _, err = run_cli(*["scores", good, broken, "-d", ds, "-o", out / "s.csv"])
        assert_refused(code, err, str(broken), f"{member} holds 1 NaN or infinite")
        code, _, err = run_cli(*["figures", good, broken, "-d", ds, "-o", out / "figs"])
        assert_refused(code, err, str(broken), f"{member} holds 1 NaN or infinite")
        assert [p for p in out.rglob("*") if p.is_file()] == []
