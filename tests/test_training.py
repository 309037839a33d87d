"""nodulekit train: RUNDIR layout, resume, determinism, validation-only selection, bad input."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

from nodulekit.errors import NodulekitError

torch.set_num_threads(1)

# Smallest real registry model: Ours-CAM with 4 base filters (the full width is ~100x slower).
ARCH, OPTIONS = "cam", {"base_width": 4}


def cfg(**kw):
    from nodulekit.training import TrainConfig

    base = dict(arch=ARCH, model_options=dict(OPTIONS), epochs=2, lr=0.01, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def run_train(dataset, rundir, folds=None, **kw):
    from nodulekit.training import train

    overwrite = kw.pop("overwrite", False)
    on_epoch_end = kw.pop("on_epoch_end", None)
    return train(
        dataset, rundir, cfg(**kw), folds=folds, progress=False, overwrite=overwrite, on_epoch_end=on_epoch_end
    )


def read_result(rundir, fold):
    with h5py.File(rundir / f"fold{fold}" / "result.h5", "r") as f:
        return {k: f[k][()] for k in f} | {"attrs": dict(f.attrs)}


def state_of(rundir, fold):
    return torch.load(rundir / f"fold{fold}" / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def ds3(tmp_path_factory):
    """5-fold, 3-channel tiny dataset (3 channels keep the tests fast)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("ds") / "d3c.h5", n=40, channels=3, folds=5)


@pytest.fixture(scope="module")
def straight(ds3, tmp_path_factory):
    """A straight 2-epoch run of folds 0 and 1, the reference for resume/determinism tests."""
    rundir = tmp_path_factory.mktemp("runs") / "straight"
    out = run_train(ds3, rundir, folds=[0, 1])
    return rundir, out


def test_rundir_layout_and_contract(ds3, straight):
    from nodulekit.datasets import dataset_fingerprint, load_dataset
    from nodulekit.training import HISTORY_COLUMNS, load_fold_model, load_run

    rundir, out = straight
    ds = load_dataset(ds3)
    run = load_run(rundir)
    assert run["arch"] == ARCH and run["model_options"]["base_width"] == 4
    assert run["in_channels"] == 3 and run["n_folds"] == 5 and run["seed"] == 0 and run["epochs"] == 2
    assert run["dataset_fingerprint"] == dataset_fingerprint(ds)
    assert run["label_rule"] == ds.attrs["label_rule"]
    assert run["optimiser"] == {"name": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    assert run["scheduler"] == {"name": "StepLR", "step_size": 30, "gamma": 0.1}
    assert run["device"] == "cpu" and run["versions"]["torch"] == str(torch.__version__)
    assert [s["status"] for s in out["folds"]] == ["trained", "trained"]

    for k in (0, 1):
        ckpt = state_of(rundir, k)  # weights_only=True must work
        assert {"state_dict", "arch", "in_channels", "num_classes", "config", "epoch"} <= set(ckpt)
        assert ckpt["epoch"] == 2 and ckpt["finished"] and ckpt["dataset_fingerprint"] == run["dataset_fingerprint"]
        res = read_result(rundir, k)
        assert res["history"].shape == (2, 5)
        assert np.array_equal(res["history"][:, 0], [1, 2])
        with h5py.File(rundir / f"fold{k}" / "result.h5", "r") as f:
            assert list(f["history"].attrs["columns"]) == list(HISTORY_COLUMNS)
            assert f.attrs["nodulekit_kind"] == "fold_result"
        assert np.array_equal(res["test_index"], np.flatnonzero(ds.fold == k))
        assert np.array_equal(res["test_y"], ds.y[ds.fold == k])
        assert [v.decode() for v in res["test_nodule_id"]] == list(ds.nodule_id[ds.fold == k])
        assert not set(res["train_index"]) & set(res["test_index"])
        assert len(res["train_index"]) + len(res["test_index"]) == len(ds.y)
        assert ((res["test_prob"] >= 0) & (res["test_prob"] <= 1)).all()
        # load_fold_model gives back exactly the model that produced test_prob
        model, ck = load_fold_model(rundir, k)
        with torch.no_grad():
            prob = torch.softmax(model(torch.from_numpy(ds.x[res["test_index"]])), 1)[:, 1].numpy()
        np.testing.assert_allclose(prob, res["test_prob"], rtol=0, atol=1e-6)
        # last-epoch test accuracy in the history is that of the reported model
        assert res["history"][-1, 4] == pytest.approx(np.mean((prob > 0.5) == res["test_y"]))
    assert not (rundir / "fold2").exists()


def test_same_seed_identical_and_fold_alone_identical(ds3, straight, tmp_path):
    rundir, _ = straight
    run_train(ds3, tmp_path / "again", folds=[1])  # fold 1 alone, in a fresh RUNDIR
    a, b = read_result(rundir, 1), read_result(tmp_path / "again", 1)
    assert np.array_equal(a["test_prob"], b["test_prob"])
    assert np.array_equal(a["history"], b["history"])
    other_seed = tmp_path / "seed1"
    run_train(ds3, other_seed, folds=[1], seed=1)
    assert not np.array_equal(a["test_prob"], read_result(other_seed, 1)["test_prob"])


def test_resume_after_interrupt_equals_straight_run(ds3, straight, tmp_path):
    rundir, _ = straight
    resumed = tmp_path / "resumed"

    def interrupt(fold, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(ds3, resumed, folds=[0], on_epoch_end=interrupt)
    ckpt = state_of(resumed, 0)
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    assert not (resumed / "fold0" / "result.h5").exists()  # no half-finished result
    out = run_train(ds3, resumed, folds=[0])
    assert out["folds"][0]["status"] == "resumed"
    a, b = read_result(rundir, 0), read_result(resumed, 0)
    assert np.array_equal(a["test_prob"], b["test_prob"])
    assert np.array_equal(a["history"], b["history"])
    sa, sb = state_of(rundir, 0)["state_dict"], state_of(resumed, 0)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_extend_epochs_equals_straight_run_and_finished_fold_skipped(ds3, straight, tmp_path):
    rundir, _ = straight
    ext = tmp_path / "extended"
    run_train(ds3, ext, folds=[0], epochs=1)
    assert read_result(ext, 0)["history"].shape == (1, 5)
    run_train(ds3, ext, folds=[0], epochs=2)
    assert np.array_equal(read_result(rundir, 0)["test_prob"], read_result(ext, 0)["test_prob"])
    mtime = (ext / "fold0" / "result.h5").stat().st_mtime_ns
    out = run_train(ds3, ext, folds=[0], epochs=2)
    assert out["folds"][0]["status"] == "skipped"
    assert (ext / "fold0" / "result.h5").stat().st_mtime_ns == mtime
    with pytest.raises(NodulekitError, match="configured for 2 epochs"):
        run_train(ds3, ext, folds=[0], epochs=1)


def test_select_val_uses_validation_only(ds3, tmp_path, monkeypatch):
    import nodulekit.training as T
    from nodulekit.datasets import load_dataset

    seen = []
    original = T.ValidationSelector.update

    def spy(self, epoch, val_loss, val_acc):
        seen.append((epoch, val_loss, val_acc))
        return original(self, epoch, val_loss, val_acc)

    monkeypatch.setattr(T.ValidationSelector, "update", spy)
    rundir = tmp_path / "val"
    run_train(ds3, rundir, folds=[0], epochs=3, select="val", val_fraction=0.25, lr=0.05, batch_size=8)
    ds = load_dataset(ds3)
    res = read_result(rundir, 0)
    train_i, val_i, test_i = res["train_index"], res["val_index"], res["test_index"]
    assert not (set(val_i) & set(test_i)) and not (set(val_i) & set(train_i))
    assert not set(ds.patient_id[val_i]) & set(ds.patient_id[train_i])  # grouped by patient
    assert set(ds.y[val_i]) == {0, 1}
    # the selector saw exactly the validation metrics, nothing else
    assert [(e, pytest.approx(loss), pytest.approx(a)) for e, loss, a in seen] == [tuple(r) for r in res["val_history"]]
    best = max(range(3), key=lambda i: (res["val_history"][i, 2], -res["val_history"][i, 1], -i))
    assert res["attrs"]["selected_epoch"] == best + 1
    assert best + 1 < 3  # these settings overfit: the reported model is not the last one
    # the reported model is the one of the selected epoch: its validation metrics match
    model, ckpt = T.load_fold_model(rundir, 0)
    assert ckpt["selected_epoch"] == best + 1 and ckpt["epoch"] == 3
    with torch.no_grad():
        logits = model(torch.from_numpy(ds.x[val_i]))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ds.y[val_i])).item()
    assert loss == pytest.approx(res["val_history"][best, 1], abs=1e-5)

    # test labels cannot influence the choice: flip them, same selection and same predictions
    flipped = tmp_path / "flipped.h5"
    write_tiny_dataset(flipped, n=40, channels=3, folds=5)
    with h5py.File(flipped, "r+") as f:
        y = f["y"][()]
        y[f["fold"][()] == 0] ^= 1
        f["y"][...] = y
    run_train(
        flipped, tmp_path / "val-flipped", folds=[0], epochs=3, select="val", val_fraction=0.25, lr=0.05, batch_size=8
    )
    res2 = read_result(tmp_path / "val-flipped", 0)
    assert res2["attrs"]["selected_epoch"] == res["attrs"]["selected_epoch"]
    assert np.array_equal(res2["test_prob"], res["test_prob"])
    assert np.array_equal(res2["val_history"], res["val_history"])


def test_divergence_stops_fold_keeps_last_good_checkpoint(ds3, tmp_path, monkeypatch):
    import nodulekit.training as T

    original = T._train_epoch

    def poisoned(model, *args, **kw):
        fold, epoch = args[-2], args[-1]
        if fold == 0 and epoch == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return original(model, *args, **kw)

    monkeypatch.setattr(T, "_train_epoch", poisoned)
    rundir = tmp_path / "div"
    with pytest.raises(T.TrainingDiverged, match="fold 0 diverged in epoch 2.*epoch 1"):
        run_train(ds3, rundir, folds=[0, 1])
    ckpt = state_of(rundir, 0)
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (rundir / "fold0" / "result.h5").exists()
    assert (rundir / "fold1" / "result.h5").exists()  # the other fold still finished


def test_non_finite_test_outputs_fail_the_fold(ds3, tmp_path, monkeypatch, capsys):
    """`train --lr 10 --epochs 2` on HESAM: the training loss stays finite but batch-norm
    statistics overflow, so the model's outputs are NaN. The fold fails (exit 1, one line),
    keeps the epoch-1 checkpoint, whose outputs are finite, and writes no result."""
    from nodulekit.cli import main
    from nodulekit.run import Run
    from nodulekit.training import predict_logits

    rundir = tmp_path / "lr10"
    args = ["train", ds3, "-o", rundir, "--arch", "hesam", "--model-opt", "base_width=8", "--lr", "10"]
    args += ["--epochs", "2", "--device", "cpu", "--fold", "0", "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["nodulekit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1, err
    assert "fold 0 failed in epoch 2: its model's outputs on 8 of 8 test rows are not finite" in err
    assert "epoch 1) is kept" in err and "accuracy" not in err
    assert not (rundir / "fold0" / "result.h5").exists()
    ckpt = state_of(rundir, 0)
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    model, _ = Run(rundir).load_model(0)
    with h5py.File(ds3, "r") as f:
        x = torch.from_numpy(f["x"][()])
    assert torch.isfinite(predict_logits(model, x, np.arange(len(x)))).all()  # the kept model is a good one


def test_channel_mismatch_and_changed_settings_refused(ds3, tmp_path):
    rundir = tmp_path / "run"
    run_train(ds3, rundir, folds=[0], epochs=1)
    one = write_tiny_dataset(tmp_path / "d1c.h5", n=40, channels=1, folds=5)
    with pytest.raises(NodulekitError, match="3-channel input but .* has 1 channels"):
        run_train(one, rundir, folds=[0], epochs=1)
    with pytest.raises(NodulekitError, match="different settings.*optimiser"):
        run_train(ds3, rundir, folds=[0], epochs=1, lr=0.02)
    assert state_of(rundir, 0)["epoch"] == 1  # nothing earlier lost
    out = run_train(ds3, rundir, folds=[0], epochs=1, lr=0.02, overwrite=True)
    assert out["folds"][0]["status"] == "trained"


def test_bad_input_refused_before_anything_is_written(ds3, tmp_path):
    with pytest.raises(NodulekitError, match="unknown model architecture 'nope'"):
        run_train(ds3, tmp_path / "a", arch="nope", model_options={})
    assert not (tmp_path / "a").exists()
    with pytest.raises(NodulekitError, match="does not take option"):
        run_train(ds3, tmp_path / "b", model_options={"bogus": 1})
    with pytest.raises(NodulekitError, match="fold 7 does not exist"):
        run_train(ds3, tmp_path / "c", folds=[7])
    from nodulekit.training import train

    with pytest.raises(NodulekitError, match="--folds 3 does not match"):
        train(ds3, tmp_path / "d", cfg(), n_folds=3, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(NodulekitError, match="no CUDA GPU"):
            run_train(ds3, tmp_path / "e", device="cuda")
    for name in "abcde":
        assert not (tmp_path / name).exists()


def test_single_class_fold_and_nan_input_refused(tmp_path):
    one_class = write_tiny_dataset(tmp_path / "oneclass.h5", n=40, channels=3, folds=5)
    with h5py.File(one_class, "r+") as f:
        y = f["y"][()]
        y[f["fold"][()] == 2] = 0
        f["y"][...] = y
    with pytest.raises(NodulekitError, match="fold 2: the test part .* has only benign nodules"):
        run_train(one_class, tmp_path / "r1")
    assert not (tmp_path / "r1").exists()  # checked before fold 0 was trained

    nan = write_tiny_dataset(tmp_path / "nan.h5", n=40, channels=3, folds=5)
    with h5py.File(nan, "r+") as f:
        x = f["x"][()]
        x[3, 1, 5, 5] = np.nan
        f["x"][...] = x
    with pytest.raises(NodulekitError, match="non-finite"):
        run_train(nan, tmp_path / "r2")
    assert not (tmp_path / "r2").exists()


def test_cli_bad_input_is_one_line(ds3, tmp_path, monkeypatch, capsys):
    from nodulekit.cli import main

    monkeypatch.setattr(sys, "argv", ["nodulekit", "train", str(ds3), "--arch", "nope", "-o", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodulekit: error: unknown model architecture 'nope'")
    monkeypatch.setattr(sys, "argv", ["nodulekit", "evaluate", str(tmp_path), "-o", str(tmp_path / "rep")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip() == f"nodulekit: error: {tmp_path} is not a nodulekit run folder (no run.json)"
    )


def test_parse_model_options():
    from nodulekit.cli.train import parse_model_options

    assert parse_model_options(["base_width=8", "fusion=sum", "flag=true", "r=0.5"]) == {
        "base_width": 8,
        "fusion": "sum",
        "flag": True,
        "r": 0.5,
    }
    with pytest.raises(NodulekitError, match="key=value"):
        parse_model_options(["oops"])


def test_validation_split_grouped_and_stratified():
    from nodulekit.training import validation_split

    y = np.array([0, 1] * 30)
    groups = np.repeat(np.arange(30), 2)
    tr, va = validation_split(y, groups, 0.2, seed=3)
    assert len(set(tr) | set(va)) == 60 and not set(tr) & set(va)
    assert not set(groups[tr]) & set(groups[va])
    assert abs(y[va].mean() - 0.5) < 1e-9
    tr2, va2 = validation_split(y, groups, 0.2, seed=3)
    assert np.array_equal(va, va2)
    with pytest.raises(NodulekitError, match="needs at least 10 training patients"):
        validation_split(y[:8], groups[:8], 0.1, seed=0)


def test_auxiliary_loss_gets_masks_and_characteristics(ds3, tmp_path, monkeypatch):
    """Multi-task models (pn-samp) train on cross-entropy + auxiliary_loss with the batch's targets."""
    from nodulekit.datasets import load_dataset
    from nodulekit.models.pnsamp import PNSAMP

    ds = load_dataset(ds3)
    calls = []
    original = PNSAMP.auxiliary_loss

    def spy(self, outputs, batch):
        idx = batch["index"].cpu().numpy()
        assert np.array_equal(batch["mask"].cpu().numpy(), ds.mask[idx])
        assert np.array_equal(batch["characteristics"].cpu().numpy(), ds.characteristics[idx])
        assert np.array_equal(batch["y"].cpu().numpy(), ds.y[idx])
        calls.append(len(idx))
        return original(self, outputs, batch)

    monkeypatch.setattr(PNSAMP, "auxiliary_loss", spy)
    run_train(ds3, tmp_path / "pn", folds=[0], epochs=1, arch="pn-samp", model_options={"base_width": 4})
    assert sum(calls) == 32  # every training row of fold 0, once
    assert read_result(tmp_path / "pn", 0)["history"].shape == (1, 5)


def test_bf16_autocast_on_cpu_runs(ds3, tmp_path):
    """--amp on CPU (opt-in): bf16 autocast in training and evaluation, float32 probabilities out."""
    from nodulekit.training import load_run

    run_train(ds3, tmp_path / "amp", folds=[0], epochs=1, amp=True)
    assert load_run(tmp_path / "amp")["amp"] is True and state_of(tmp_path / "amp", 0)["amp"] is True
    prob = read_result(tmp_path / "amp", 0)["test_prob"]
    assert prob.shape == (8,) and np.isfinite(prob).all()


def test_learns_the_synthetic_task(ds3, tmp_path):
    """The loop really optimises: ring (malignant) vs blob (benign) is learned in a few epochs."""
    out = run_train(ds3, tmp_path / "learn", folds=[0], arch="hesam", epochs=8, lr=0.002, batch_size=4)
    hist = read_result(tmp_path / "learn", 0)["history"]
    assert hist[-1, 1] < 0.5 * hist[0, 1]  # training cross-entropy at least halved
    assert out["folds"][0]["test_acc"] >= 7 / 8 and hist[-1, 4] >= 7 / 8


def test_select_val_resume_equals_straight_run(ds3, tmp_path):
    """Resuming a --select val run keeps the best-so-far model and the selector's state."""
    straight_dir, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(ds3, straight_dir, folds=[0], epochs=3, select="val", val_fraction=0.25, lr=0.05, batch_size=8)

    def interrupt(fold, epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(
            ds3,
            resumed,
            folds=[0],
            epochs=3,
            select="val",
            val_fraction=0.25,
            lr=0.05,
            batch_size=8,
            on_epoch_end=interrupt,
        )
    run_train(ds3, resumed, folds=[0], epochs=3, select="val", val_fraction=0.25, lr=0.05, batch_size=8)
    a, b = read_result(straight_dir, 0), read_result(resumed, 0)
    assert a["attrs"]["selected_epoch"] == b["attrs"]["selected_epoch"] == 1  # best before the interruption
    assert np.array_equal(a["test_prob"], b["test_prob"]) and np.array_equal(a["val_history"], b["val_history"])
    sa, sb = state_of(straight_dir, 0), state_of(resumed, 0)
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])
    assert all(torch.equal(sa["resume"]["model"][k], sb["resume"]["model"][k]) for k in sa["resume"]["model"])


def test_compile_goes_through_the_one_training_forward_for_every_model(ds3, tmp_path, monkeypatch):
    """--compile compiles each model's training_forward, so a multi-task model (pn-samp) is
    compiled too instead of silently training uncompiled."""
    from nodulekit.models import NoduleClassifier
    from nodulekit.models.pnsamp import PNSAMP

    compiled = []

    def fake_compile(fn, *args, **kwargs):  # records what would be compiled; runs it eagerly
        if isinstance(fn, torch.nn.Module):
            return fn  # the model scoring the test rows
        calls = []
        compiled.append((fn, calls))

        def run(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    aux_calls = []
    original = PNSAMP.auxiliary_loss
    monkeypatch.setattr(PNSAMP, "auxiliary_loss", lambda self, o, b: aux_calls.append(1) or original(self, o, b))
    run_train(
        ds3,
        tmp_path / "pn",
        folds=[0],
        epochs=1,
        arch="pn-samp",
        model_options={"base_width": 4},
        batch_size=8,
        compile=True,
    )
    forwards = [
        (fn, calls) for fn, calls in compiled if getattr(fn, "__func__", None) is NoduleClassifier.training_forward
    ]
    assert len(forwards) == 1 and isinstance(forwards[0][0].__self__, PNSAMP)
    assert len(forwards[0][1]) == 4 and len(aux_calls) == 4  # 32 training rows in batches of 8


def test_train_leaves_the_callers_config_alone(ds3, tmp_path):
    config = cfg(arch="hesam", model_options={"base_width": 4}, epochs=1)
    before = repr(config)
    from nodulekit.training import train

    out = train(ds3, tmp_path / "r", config, folds=[0], progress=False)
    assert repr(config) == before and config.model_options == {"base_width": 4}
    assert out["run"]["model_options"]["base_width"] == 4 and len(out["run"]["model_options"]) > 1
