"""Folds are part of a dataset's identity: the fold-leak repro (a dataset rebuilt with another
--seed or --split at the same path) and every consumer of a run refusing it in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_datasets import sphere_nodules, write_rois

from nodulekit.datasets import build_dataset, dataset_identity, identity_difference, load_dataset
from nodulekit.errors import NodulekitError

torch.set_num_threads(1)
OPTS = ["--arch", "cam", "--model-opt", "base_width=4", "--epochs", "2", "--lr", "0.01", "--device", "cpu"]


def one_line_error(code, err, *needles) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def rois(tmp_path_factory):
    return write_rois(tmp_path_factory.mktemp("rois") / "rois.h5", sphere_nodules(n_patients=12))


def build(rois, path, seed=0, split="patient", folds=3):
    return build_dataset(rois, path, channels=1, n_folds=folds, seed=seed, split=split, overwrite=True, progress=False)


def test_identity_names_what_differs(rois, tmp_path):
    a = load_dataset(build(rois, tmp_path / "a.h5", seed=0))
    b = load_dataset(build(rois, tmp_path / "b.h5", seed=1))
    c = load_dataset(build(rois, tmp_path / "c.h5", seed=0, split="nodule"))
    assert not np.array_equal(a.fold, b.fold)  # the seeds give other folds
    ia, ib, ic = dataset_identity(a), dataset_identity(b), dataset_identity(c)
    assert ia["content"] == ib["content"] == ic["content"] and ia["mask"] == ib["mask"]
    assert len({ia["fingerprint"], ib["fingerprint"], ic["fingerprint"]}) == 3
    assert identity_difference(ia, a) is None and identity_difference(json.loads(json.dumps(ia)), a) is None
    assert identity_difference(ia, b) == (
        "fold assignment differs: dataset split patient/seed 1, 3 folds, trained on patient/seed 0, 3 folds"
    )
    assert identity_difference(ia, c).startswith("fold assignment differs: dataset split nodule/seed 0")
    # same split and seed, other folds (e.g. another scikit-learn): still a different dataset
    assert "same split patient/seed 0, 3 folds but other folds" in identity_difference(
        {**ia, "folds": "0" * 16, "fingerprint": "x"}, a
    )
    a.mask[0, 0, 0, 0] ^= 1
    assert identity_difference(ia, dataset_identity(a)).startswith("consensus masks differ")
    a.x[0, 0, 0, 0] += 0.5
    assert identity_difference(ia, dataset_identity(a)).startswith("images or labels differ")
    assert "records no dataset identity" in identity_difference(None, b)


def test_fold_leak_repro_resume_refuses_a_rebuilt_dataset(rois, tmp_path, run_cli):
    """Rebuild the dataset at the same path with another --seed (or --split): an interrupted
    run must not resume on it, nor may a --fold job, and nothing already trained is lost."""
    from nodulekit.training import TrainConfig, train, train_fold

    ds_path, rundir = tmp_path / "d1c.h5", tmp_path / "run"
    code, _, err = run_cli("build", rois, "-o", ds_path, "--channels", "1", "--folds", "3")
    assert code == 0, err
    cfg = TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=2, lr=0.01, device="cpu")

    def interrupt(fold, epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ds_path, rundir, cfg, folds=[0], progress=False, on_epoch_end=interrupt)
    ckpt = rundir / "fold0" / "checkpoint.pt"
    before = ckpt.read_bytes()
    run = json.loads((rundir / "run.json").read_text())
    assert run["dataset_identity"]["seed"] == 0 and run["dataset_identity"]["split"] == "patient"

    for extra, needle in (
        (["--seed", "1"], "dataset split patient/seed 1, 3 folds, trained on patient/seed 0, 3 folds"),
        (["--split", "nodule"], "dataset split nodule/seed 0, 3 folds, trained on patient/seed 0, 3 folds"),
    ):
        args = ["build", rois, "-o", ds_path, "--channels", "1", "--folds", "3", "--overwrite", *extra]
        assert run_cli(*args)[0] == 0
        for job in ([], ["--fold", "0"], ["--fold", "2"]):
            code, _, err = run_cli("train", ds_path, "-o", rundir, *OPTS, "--no-progress", *job)
            one_line_error(code, err, f"{rundir} was not trained on", "fold assignment differs", needle)
        # the checkpoint itself also refuses (a fold resumed with a run.json that was replaced)
        with pytest.raises(NodulekitError, match="checkpoint.pt was not trained on .* fold assignment differs"):
            train_fold(load_dataset(ds_path), cfg, 0, rundir, run=run, progress=False)
        assert ckpt.read_bytes() == before and not (rundir / "fold0" / "result.h5").exists()

    # the original dataset back: the run resumes where it stopped
    assert run_cli("build", rois, "-o", ds_path, "--channels", "1", "--folds", "3", "--overwrite")[0] == 0
    out = train(ds_path, rundir, cfg, folds=[0], progress=False)
    assert out["folds"][0]["status"] == "resumed"


@pytest.fixture(scope="module")
def finished(rois, tmp_path_factory):
    """A finished 3-fold run on seed 0, its maps and an ONNX export, then the dataset rebuilt
    with seed 1 at the same path."""
    from nodulekit.export import export_onnx, load_model_source
    from nodulekit.maps import run_maps, write_run_maps
    from nodulekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("finished")
    ds_path, rundir = root / "d1c.h5", root / "run"
    build(rois, ds_path, seed=0)
    train(
        ds_path,
        rundir,
        TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=1, device="cpu"),
        progress=False,
    )
    write_run_maps(run_maps(rundir, "cam", progress=False, device="cpu"), root / "maps.h5", rundir=rundir)
    export_onnx(load_model_source(rundir, 0), root / "fold0.onnx", exporter="torchscript")
    original = root / "d1c_seed0.h5"
    original.write_bytes(ds_path.read_bytes())
    build(rois, ds_path, seed=1)
    return root, ds_path, rundir, original


def test_every_consumer_refuses_the_rebuilt_dataset(finished, run_cli):
    root, ds_path, rundir, original = finished
    needle = "fold assignment differs: dataset split patient/seed 1, 3 folds, trained on patient/seed 0, 3 folds"
    for args in (
        ["maps", rundir, "--method", "cam", "-o", root / "m2.h5", "--device", "cpu"],
        ["readers", rundir, "-o", root / "r.md"],
        ["scores", root / "maps.h5", "--dataset", ds_path, "-o", root / "s.csv"],
        ["figures", root / "maps.h5", "--dataset", ds_path, "-o", root / "figs"],
        ["export-onnx", rundir, "--fold", "0", "-o", root / "again.onnx"],
    ):
        code, _, err = run_cli(*args)
        one_line_error(code, err, f"{ds_path} is not the dataset of", needle)
    for made in ("m2.h5", "r.md", "s.csv", "again.onnx"):
        assert not (root / made).exists(), made
    assert not any((root / "figs").glob("*"))  # figures makes the folder first, but draws nothing
    # the run's own dataset is accepted by the same consumers
    code, _, err = run_cli("readers", rundir, "--dataset", original, "-o", root / "r.md")
    assert code == 0, err


def test_infer_marks_the_fold_models_training_nodules_on_a_rebuilt_dataset(finished):
    """infer may run an exported fold model on any dataset, but the rows it trained on are
    marked from what it was trained on, not from the rebuilt dataset's folds."""
    from nodulekit.artifacts import read_maps
    from nodulekit.export import infer

    root, ds_path, _, original = finished
    out = infer(root / "fold0.onnx", ds_path, root / "p.h5", provider="cpu", overwrite=True)
    maps = read_maps(root / "p.h5")
    trained = maps.extra["trained_on"].astype(bool)
    before, after = load_dataset(original), load_dataset(ds_path)
    assert list(maps.nodule_id) == list(before.nodule_id)
    np.testing.assert_array_equal(trained, before.fold != 0)  # the model's real training nodules
    assert not np.array_equal(trained, after.fold != 0)  # the rebuilt folds would have leaked
    assert out["trained_on"] == int(trained.sum()) and "not held-out" in out["warning"]
    assert maps.dataset_identity == after.identity


def test_fold_results_from_another_dataset_and_old_runs_are_refused(finished, rois, tmp_path, run_cli):
    import shutil

    from nodulekit.training import TrainConfig, train

    root, ds_path, rundir, _ = finished
    mixed = tmp_path / "mixed"
    shutil.copytree(rundir, mixed)
    # fold 1 trained in another RUNDIR on the seed-1 dataset, its result dropped into this run
    other = tmp_path / "other"
    train(
        ds_path,
        other,
        TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=1, device="cpu"),
        folds=[1],
        progress=False,
    )
    shutil.copy(other / "fold1" / "result.h5", mixed / "fold1" / "result.h5")
    code, _, err = run_cli("evaluate", mixed, "-o", tmp_path / "rep")
    one_line_error(code, err, "fold1/result.h5 was not trained on this run's dataset", "fold assignment differs")
    # a run.json from before dataset identities: refused with a re-train line, never accepted silently
    old = tmp_path / "old"
    shutil.copytree(rundir, old)
    record = json.loads((old / "run.json").read_text())
    del record["dataset_identity"]
    (old / "run.json").write_text(json.dumps(record))
    for args in (["evaluate", old, "-o", tmp_path / "rep2"], ["maps", old, "--method", "cam", "-o", tmp_path / "m.h5"]):
        code, _, err = run_cli(*args)
        one_line_error(code, err, "records no dataset identity", "re-train it")
