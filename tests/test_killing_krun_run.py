"""The RUNDIR object (nodulekit.run) key by key and line by line: run.json read and written back,
every refusal's text (naming the file or value), the fold states, fold results written and read
back field by field, checkpoints and their refusals; hand-made RUNDIRs whose answer is known."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import fake_identity

from nodulekit import run as runmod
from nodulekit.artifacts import provenance
from nodulekit.errors import ArtifactError, NodulekitError
from nodulekit.run import Run, RunPaths, read_fold_result, read_run_json, write_fold_result, write_run_json

ID = fake_identity()


def _result(path, k=0, epochs=2, *, prob=(0.25, 0.75), attrs=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_fold_result(
        path,
        prov=provenance(),
        history=np.arange(epochs * 5, dtype=float),
        test_index=kw.pop("test_index", [2 * k, 2 * k + 1]),
        test_prob=prob,
        test_y=[0, 1],
        test_nodule_id=kw.pop("test_nodule_id", [f"P{k}:1", f"P{k}:2"]),
        attrs={"epochs": epochs, "fold": k, "dataset_identity": ID, **(attrs or {})},
        **kw,
    )


def _record(**kw):
    record = {"arch": "cam", "model_options": {"base_width": 4}, "in_channels": 3, "num_classes": 2, "n_folds": 2,
              "seed": 0, "batch_size": 8, "optimiser": "adam", "scheduler": "step", "selection": "last",
              "epochs": 2, "dataset": {"path": "d.h5"}, "dataset_identity": ID, "dataset_fingerprint": "f" * 16}  # fmt: skip
    return {**record, **kw}


# --------------------------------------------------------------------------- run.json


def test_read_run_json_refusals_name_the_folder(tmp_path):
    with pytest.raises(NodulekitError) as err:
        read_run_json(tmp_path / "nope")
    assert str(err.value) == f"{tmp_path / 'nope'} is not a nodulekit run folder (it does not exist)"
    (tmp_path / "f").write_text("")
    with pytest.raises(NodulekitError) as err:
        read_run_json(tmp_path / "f")
    assert str(err.value) == (
        f"{tmp_path / 'f'} is a file, not a nodulekit run folder (give the RUNDIR that `nodulekit train -o` made)"
    )
    with pytest.raises(NodulekitError) as err:
        read_run_json(tmp_path)
    assert str(err.value) == f"{tmp_path} is not a nodulekit run folder (no run.json)"
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(NodulekitError) as err:
        read_run_json(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'run.json'} is not valid JSON: Expecting property name")
    (tmp_path / "run.json").write_text("[1]")
    with pytest.raises(NodulekitError) as err:
        read_run_json(tmp_path)
    assert str(err.value) == f"{tmp_path / 'run.json'} is not a run record (a JSON object)"
    (tmp_path / "run.json").write_text('{"dataset": 3}')
    with pytest.raises(NodulekitError) as err:
        read_run_json(tmp_path)
    assert str(err.value) == f"{tmp_path / 'run.json'}: 'dataset' is int, expected an object or a path"


def test_run_json_round_trip_and_an_old_dataset_path(tmp_path):
    write_run_json(tmp_path, {"n_folds": 2, "path": tmp_path, "dataset": "old.h5"})
    text = (tmp_path / "run.json").read_text()
    assert text == json.dumps({"n_folds": 2, "path": str(tmp_path), "dataset": "old.h5"}, indent=2) + "\n"
    assert read_run_json(tmp_path)["dataset"] == {"path": "old.h5"}
    write_run_json(tmp_path, {"dataset": None})
    assert read_run_json(tmp_path) == {"dataset": None}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_recorded_dataset_from_each_kind_of_record():
    assert runmod.recorded_dataset({"dataset": {"path": "a.h5", "fingerprint": "fp"}}) == ("a.h5", "fp")
    assert runmod.recorded_dataset({"dataset": {"path": "a.h5"}, "dataset_fingerprint": "top"}) == ("a.h5", "top")
    assert runmod.recorded_dataset({"dataset": "b.h5", "dataset_fingerprint": "t"}) == ("b.h5", "t")
    assert runmod.recorded_dataset({"dataset": "b.h5"}) == ("b.h5", None)
    assert runmod.recorded_dataset({"dataset": {"path": "", "fingerprint": ""}}) == (None, None)
    assert runmod.recorded_dataset({}) == (None, None)


def test_describe_difference_names_each_key_with_both_values():
    old = _record()
    assert runmod._describe_difference(old, dict(old)) == ""
    assert runmod._describe_difference(old, {**old, "last_batch": "keep"}) == ""  # the default of older records
    new = {**old, "seed": 1, "model_options": {"base_width": 8}, "last_batch": "drop"}
    assert runmod._describe_difference(old, new) == (
        'model_options {"base_width": 4} vs {"base_width": 8}; seed 0 vs 1; last_batch "keep" vs "drop"'
    )
    assert runmod._describe_difference({**old, "recipe": "r1"}, old) == 'recipe "r1" vs null'


def test_check_same_experiment_refusals(tmp_path):
    old = _record()
    with pytest.raises(NodulekitError) as err:
        runmod._check_same_experiment(tmp_path, old, _record(in_channels=11))
    assert str(err.value) == (
        f"{tmp_path} holds models for 3-channel input but d.h5 has 11 channels; use a new -o RUNDIR or --overwrite"
    )
    other = {**ID, "fingerprint": "0" * 16, "content": "c2", "n": 5}
    with pytest.raises(NodulekitError) as err:
        runmod._check_same_experiment(tmp_path, old, _record(dataset_identity=other))
    assert str(err.value) == (
        f"{tmp_path} was not trained on d.h5: images or labels differ: dataset content c2 (5 nodules), trained on "
        f"{ID['content']} (0 nodules); use a new -o RUNDIR or --overwrite"
    )
    with pytest.raises(NodulekitError) as err:
        runmod._check_same_experiment(tmp_path, old, _record(batch_size=16))
    assert str(err.value) == (
        f"{tmp_path} was made with different settings (batch_size 8 vs 16); use the same settings, a new -o "
        "RUNDIR, or --overwrite"
    )
    with pytest.raises(NodulekitError) as err:
        runmod._check_same_experiment(tmp_path, _record(epochs=5), _record(epochs=4))
    assert str(err.value) == f"{tmp_path} was configured for 5 epochs; pass --epochs 5 (or more to extend it)"
    runmod._check_same_experiment(tmp_path, _record(epochs=5), _record(epochs=5))
    runmod._check_same_experiment(tmp_path, {k: v for k, v in old.items() if k != "epochs"}, _record(epochs=0))


# --------------------------------------------------------------------------- prepare_rundir


def test_a_new_rundir_is_made_with_its_parents_and_resumed_or_extended(tmp_path):
    rundir = tmp_path / "a" / "run"
    assert runmod.prepare_rundir(rundir, _record()) == _record()
    assert read_run_json(rundir) == _record()
    assert runmod.prepare_rundir(rundir, _record()) == _record()
    assert runmod.prepare_rundir(rundir, _record(epochs=5))["epochs"] == 5
    assert read_run_json(rundir)["epochs"] == 5
    with pytest.raises(NodulekitError) as err:
        runmod.prepare_rundir(rundir, _record(epochs=3))
    assert str(err.value) == f"{rundir} was configured for 5 epochs; pass --epochs 5 (or more to extend it)"


def test_prepare_rundir_refuses_a_file_and_a_folder_of_other_things(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(NodulekitError) as err:
        runmod.prepare_rundir(tmp_path / "f", _record())
    assert str(err.value) == f"{tmp_path / 'f'} exists and is not a folder"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("")
    with pytest.raises(NodulekitError) as err:
        runmod.prepare_rundir(tmp_path / "d", _record())
    assert str(err.value) == f"{tmp_path / 'd'} is a non-empty folder without run.json; choose a new or empty -o RUNDIR"


def test_fresh_means_only_claims_and_hidden_files(tmp_path):
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "claim.json").write_text("{}")
    (tmp_path / "fold0" / ".tmp").write_text("")
    (tmp_path / ".run.json.x.part").write_text("")
    (tmp_path / "fold1").mkdir()
    assert runmod._fresh(tmp_path)
    runmod.prepare_rundir(tmp_path, _record())  # accepted: nothing trained yet
    (tmp_path / "run.json").unlink()
    (tmp_path / "fold1" / "checkpoint.pt").write_text("")
    assert not runmod._fresh(tmp_path)
    (tmp_path / "fold1" / "checkpoint.pt").unlink()
    (tmp_path / "folder").mkdir()  # a folder whose name starts with "fold" is a fold folder...
    assert runmod._fresh(tmp_path)
    (tmp_path / "other").mkdir()  # ...any other is not
    assert not runmod._fresh(tmp_path)
    (tmp_path / "other").rmdir()
    (tmp_path / "fold9").write_text("")  # a file, not a fold folder
    assert not runmod._fresh(tmp_path)


def _trained(tmp_path, folds=(0, 1)):
    rundir = tmp_path / "run"
    runmod.prepare_rundir(rundir, _record())
    for k in folds:
        _result(rundir / f"fold{k}" / "result.h5", k)
        (rundir / f"fold{k}" / "checkpoint.pt").write_bytes(b"ckpt")
    return rundir


def test_overwrite_of_the_whole_run_discards_every_fold(tmp_path):
    rundir = _trained(tmp_path)
    (rundir / "fold7").mkdir()
    (rundir / "fold7" / "result.h5").write_bytes(b"")
    assert runmod.prepare_rundir(rundir, _record(seed=3), overwrite=True)["seed"] == 3
    assert read_run_json(rundir)["seed"] == 3
    assert sorted(p.name for p in rundir.rglob("*") if p.is_file()) == ["run.json"]


def test_overwrite_of_some_folds_keeps_the_others_with_the_same_settings(tmp_path):
    rundir = _trained(tmp_path, folds=(0, 1, 2))
    runmod.prepare_rundir(rundir, _record(epochs=4), overwrite=True, folds=[1])
    assert not runmod._fold_has_files(rundir / "fold1")
    assert runmod._fold_has_files(rundir / "fold0") and runmod._fold_has_files(rundir / "fold2")
    assert read_run_json(rundir)["epochs"] == 4


def test_overwrite_of_some_folds_with_other_settings_is_refused(tmp_path):
    rundir = _trained(tmp_path, folds=(0, 1, 2))
    with pytest.raises(NodulekitError) as err:
        runmod.prepare_rundir(rundir, _record(seed=9), overwrite=True, folds=[1])
    assert str(err.value) == (
        f"{rundir} holds fold0, fold2 made with other settings; --overwrite with --fold replaces only the folds "
        "asked for and the run would mix settings: drop --fold to replace the whole run, or use a new -o RUNDIR"
    )
    with pytest.raises(NodulekitError, match="holds fold0, fold2 made with other settings"):
        runmod.prepare_rundir(rundir, _record(dataset_fingerprint="0" * 16), overwrite=True, folds=[1])
    assert all(runmod._fold_has_files(rundir / f"fold{k}") for k in range(3))
    # every fold holding files asked for: nothing else would mix, so the run is replaced
    runmod.prepare_rundir(rundir, _record(seed=9), overwrite=True, folds=[0, 1, 2])
    assert read_run_json(rundir)["seed"] == 9 and not any(rundir.glob("fold*/*.h5"))


def test_discard_folds_removes_checkpoints_and_results_of_those_folds(tmp_path):
    rundir = _trained(tmp_path, folds=(0, 1))
    runmod._discard_folds(rundir, [1, 5])
    assert sorted(p.name for p in (rundir / "fold0").iterdir()) == ["checkpoint.pt", "result.h5"]
    assert list((rundir / "fold1").iterdir()) == []
    runmod._discard_folds(rundir, None)
    assert list((rundir / "fold0").iterdir()) == []


# --------------------------------------------------------------------------- checkpoints


def test_build_model_turns_bad_options_into_one_line(monkeypatch):
    assert runmod.build_model("cam", 3, 2, {"base_width": 4}).config["base_width"] == 4
    with pytest.raises(NodulekitError) as err:
        runmod.build_model("cam", 3, 2, {"no_such_option": 1})
    assert str(err.value) == "model 'cam' does not take option(s) no_such_option; it accepts: base_width"
    import nodulekit.models

    for exc in (KeyError("k"), TypeError("t"), ValueError("v")):

        def broken(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(nodulekit.models, "create_model", broken)
        with pytest.raises(NodulekitError) as err:
            runmod.build_model("cam", 3, 2, {"w": 1})
        assert str(err.value) == f"cannot build model 'cam' with options {{'w': 1}}: {exc}"


def test_checkpoint_problems_in_our_words(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"")
    with pytest.raises(NodulekitError) as err:
        runmod.load_checkpoint(path)
    assert str(err.value) == f"{path} is not a readable nodulekit checkpoint: the file is empty"
    path.write_bytes(b"not a zip")
    with pytest.raises(NodulekitError) as err:
        runmod.load_checkpoint(path)
    assert str(err.value) == (
        f"{path} is not a readable nodulekit checkpoint: not a PyTorch zip archive (truncated, or another kind of file)"
    )
    torch.save({"x": np.zeros(2).tolist(), "obj": Run}, path)  # a class: refused by weights_only
    with pytest.raises(NodulekitError) as err:
        runmod.load_checkpoint(path)
    assert str(err.value) == (
        f"{path} is not a readable nodulekit checkpoint: it holds Python objects besides tensors and plain data, "
        "which are not loaded because loading them could run arbitrary code (nodulekit checkpoints hold none)"
    )
    zip_bytes = path.read_bytes()
    path.write_bytes(zip_bytes[: len(zip_bytes) // 2] + zip_bytes[-200:])  # a zip whose records are cut
    message = runmod._checkpoint_problem(path, RuntimeError("x"))
    assert message in ("its contents are unreadable (RuntimeError; truncated or corrupt)",
                       "not a PyTorch zip archive (truncated, or another kind of file)")  # fmt: skip
    good = tmp_path / "g.pt"
    torch.save({}, good)
    assert (
        runmod._checkpoint_problem(good, ValueError("x"))
        == "its contents are unreadable (ValueError; truncated or corrupt)"
    )
    import pickle

    assert runmod._checkpoint_problem(good, pickle.UnpicklingError("Weights Only load failed")).startswith("it holds")
    assert runmod._checkpoint_problem(good, pickle.UnpicklingError("other")).startswith("its contents")


def test_load_checkpoint_refusals(tmp_path):
    with pytest.raises(NodulekitError) as err:
        runmod.load_checkpoint(tmp_path / "none.pt")
    assert str(err.value) == f"{tmp_path / 'none.pt'} does not exist"
    with pytest.raises(NodulekitError) as err:
        runmod.load_checkpoint(tmp_path)
    assert str(err.value) == f"{tmp_path} is a folder, not a checkpoint file"
    runmod.save_checkpoint(tmp_path / "c.pt", {"arch": "cam"})
    with pytest.raises(NodulekitError) as err:
        runmod.load_checkpoint(tmp_path / "c.pt")
    assert str(err.value) == f"{tmp_path / 'c.pt'} is not a nodulekit checkpoint (missing state_dict, in_channels)"
    runmod.save_checkpoint(tmp_path / "l.pt", [1, 2])
    with pytest.raises(NodulekitError, match=r"\(missing state_dict, arch, in_channels\)$"):
        runmod.load_checkpoint(tmp_path / "l.pt")
    runmod.save_checkpoint(tmp_path / "ok.pt", {"state_dict": {}, "arch": "cam", "in_channels": 3, "epoch": 4})
    assert runmod.load_checkpoint(str(tmp_path / "ok.pt"))["epoch"] == 4
    assert runmod._epochs_done(tmp_path / "ok.pt") == 4
    assert runmod._epochs_done(tmp_path / "c.pt") == 0  # no epoch field
    assert runmod._epochs_done(tmp_path / "none.pt") == 0
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert runmod._epochs_done(tmp_path / "bad.pt") == 0


def _model_checkpoint(**over):
    model = runmod.build_model("cam", 3, 2, {"base_width": 4})
    ckpt = {"state_dict": model.state_dict(), "arch": "cam", "in_channels": 3, "num_classes": 2,
            "config": dict(model.config), "dataset_fingerprint": "f" * 16}  # fmt: skip
    return model, {**ckpt, **over}


def test_model_from_checkpoint_and_weights_that_do_not_fit(tmp_path):
    torch.manual_seed(0)
    model, ckpt = _model_checkpoint()
    rebuilt = runmod.model_from_checkpoint(ckpt, tmp_path / "c.pt")
    assert not rebuilt.training
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    del ckpt["num_classes"], ckpt["config"]  # older checkpoints: 2 classes, default options
    with pytest.raises(NodulekitError) as err:
        runmod.model_from_checkpoint(ckpt, "c.pt")
    assert str(err.value).startswith("c.pt: weights do not fit a cam model (Error(s) in loading state_dict for ")
    assert "\n" not in str(err.value)


def test_check_checkpoint_names_what_differs_from_run_json(tmp_path):
    rundir = tmp_path / "run"
    rundir.mkdir()
    write_run_json(rundir, _record())
    run = Run(rundir)
    _, ckpt = _model_checkpoint()
    run.check_checkpoint(ckpt, tmp_path / "c.pt")
    run.check_checkpoint({}, tmp_path / "c.pt")  # nothing recorded: nothing to compare
    cases = [
        ({"arch": "hesam"}, "its architecture is 'hesam', run.json says 'cam'"),
        ({"in_channels": 11}, "its input channels is 11, run.json says 3"),
        ({"dataset_fingerprint": "0" * 16}, f"its training dataset is '{'0' * 16}', run.json says '{'f' * 16}'"),
        ({"config": {"base_width": 8}}, "its model option base_width is 8, run.json says 4"),
    ]
    for change, why in cases:
        with pytest.raises(NodulekitError) as err:
            run.check_checkpoint({**ckpt, **change}, tmp_path / "c.pt")
        assert str(err.value) == f"{tmp_path / 'c.pt'} is not a checkpoint of {rundir}: {why}"


def test_load_model_of_a_fold(tmp_path):
    rundir = tmp_path / "run"
    runmod.prepare_rundir(rundir, _record())
    run = Run(rundir)
    with pytest.raises(NodulekitError) as err:
        run.load_model(1)
    assert str(err.value) == f"{run.checkpoint_path(1)} does not exist: fold 1 of {rundir} has not been trained"
    model, ckpt = _model_checkpoint()
    run.fold_dir(1).mkdir()
    runmod.save_checkpoint(run.checkpoint_path(1), ckpt)
    loaded, got = runmod.load_fold_model(rundir, 1)
    assert not loaded.training and got["arch"] == "cam"
    assert next(loaded.parameters()).device.type == "cpu"
    runmod.save_checkpoint(run.checkpoint_path(1), {**ckpt, "arch": "hesam"})
    with pytest.raises(NodulekitError, match="its architecture is 'hesam'"):
        run.load_model(1)


# --------------------------------------------------------------------------- fold results


def test_a_fold_result_round_trip_field_by_field(tmp_path):
    path = tmp_path / "r.h5"
    out = _result(path, 3, epochs=2, train_index=[5, 6, 7], val_index=[8], val_history=[[1, 0.5, 0.25]],
                  epoch_seconds=[1.5, 2.5], test_patient_id=["A", "B"], attrs={"selected_epoch": 1,
                  "arch": "cam", "options": {"w": 4}, "tags": [1, 2]})  # fmt: skip
    assert out == path
    r = read_fold_result(path)
    assert r.fold == 3 and r.selected_epoch == 1 and r.epochs == 2
    np.testing.assert_array_equal(r.history, np.arange(10.0).reshape(2, 5))
    assert r.history.dtype == np.float64 and r.columns == list(runmod.HISTORY_COLUMNS)
    assert r.test_index.tolist() == [6, 7] and r.test_index.dtype == np.int64
    assert r.test_prob.tolist() == [0.25, 0.75] and r.test_y.tolist() == [0, 1] and r.test_y.dtype == np.int64
    assert r.test_nodule_id == ["P3:1", "P3:2"] and r.test_patient_id == ["A", "B"]
    assert r.train_index.tolist() == [5, 6, 7] and r.val_index.tolist() == [8]
    assert r.train_index.dtype == np.int64 and r.val_index.dtype == np.int64
    assert r.val_history.tolist() == [[1, 0.5, 0.25]] and r.epoch_seconds.tolist() == [1.5, 2.5]
    assert r.attrs["threshold"] == 0.5 and r.attrs["arch"] == "cam" and type(r.attrs["fold"]) is int
    assert json.loads(r.attrs["options"]) == {"w": 4} and json.loads(r.attrs["tags"]) == [1, 2]
    with h5py.File(path) as f:
        assert [c.decode() if isinstance(c, bytes) else c for c in f["val_history"].attrs["columns"]] == [
            "epoch", "val_loss", "val_acc"]  # fmt: skip
        assert f["history"].shape == (2, 5)
    assert read_fold_result(path, fold=7).fold == 7


def test_a_minimal_fold_result_reads_with_defaults(tmp_path):
    path = tmp_path / "r.h5"
    path.parent.mkdir(exist_ok=True)
    write_fold_result(path, prov={}, history=np.zeros(5), test_index=[0], test_prob=[1.0], test_y=[1],
                      test_nodule_id=["LIDC-0001:2"])  # fmt: skip
    r = read_fold_result(path)
    assert (r.fold, r.selected_epoch, r.epochs) == (-1, -1, None)
    assert r.test_patient_id == ["LIDC-0001"]
    assert r.val_history is None and r.epoch_seconds is None and r.train_index is None and r.val_index is None
    assert read_fold_result(path, 2).fold == 2
    with h5py.File(path, "r+") as f:  # narrower types, as another writer may store them
        for name in ("test_y", "test_index"):
            values = f[name][()]
            del f[name]
            f[name] = values.astype(np.int32)
        values = f["test_prob"][()]
        del f["test_prob"]
        f["test_prob"] = values.astype(np.float32)
    r = read_fold_result(path)
    assert (r.test_y.dtype, r.test_index.dtype, r.test_prob.dtype) == (np.int64, np.int64, np.float64)
    with pytest.raises(NodulekitError, match="already exists"):
        write_fold_result(path, prov={}, history=np.zeros(5), test_index=[0], test_prob=[1.0], test_y=[1],
                          test_nodule_id=["x"], overwrite=False)  # fmt: skip


def test_a_fold_result_without_column_names_gets_the_standard_ones(tmp_path):
    path = _result(tmp_path / "r.h5")
    with h5py.File(path, "r+") as f:
        del f["history"].attrs["columns"]
    assert read_fold_result(path).columns == list(runmod.HISTORY_COLUMNS)


def test_fold_result_refusals(tmp_path):
    path = _result(tmp_path / "r.h5", test_index=[0, 1, 2])
    with pytest.raises(ArtifactError) as err:
        read_fold_result(path)
    assert str(err.value) == f"{path}: test_index, test_prob, test_y and test_nodule_id differ in length"
    path = _result(tmp_path / "s.h5", prob=(0.5, 1.5))
    with pytest.raises(ArtifactError) as err:
        read_fold_result(path)
    assert str(err.value) == (
        f"{path}: test_prob holds 1 value(s) that are not probabilities (first 1.5); the fold's result is "
        "unusable, retrain it"
    )
    runmod.check_predictions("p", np.array([0.0, 1.0]))  # both ends are probabilities
    with pytest.raises(ArtifactError, match=r"holds 2 value\(s\) .* \(first -0.1\)"):
        runmod.check_predictions("p", np.array([-0.1, np.inf, 0.5]))


# --------------------------------------------------------------------------- the Run


def test_run_properties_and_their_defaults(tmp_path):
    write_run_json(tmp_path, {"n_folds": 3})
    run = Run(tmp_path)
    assert repr(run) == f"Run({str(tmp_path)!r})"
    assert (run.n_folds, run.arch, run.epochs) == (3, "?", 0)
    assert run.dataset_fingerprint is None and run.dataset_identity is None
    with pytest.raises(NodulekitError) as err:
        run.dataset_path()
    assert str(err.value) == f"{tmp_path}/run.json records no dataset path; pass --dataset"
    assert run.dataset_path("x.h5") == runmod.Path("x.h5")
    for bad in (0, "2", None):
        write_run_json(tmp_path, {"n_folds": bad, "dataset_identity": "x"})
        with pytest.raises(NodulekitError) as err:
            Run(tmp_path).n_folds
        assert str(err.value) == f"{tmp_path}/run.json records no n_folds"
        assert Run(tmp_path).dataset_identity is None
    write_run_json(tmp_path, _record(n_folds=1, epochs="7"))
    run = Run(tmp_path)
    assert (run.n_folds, run.arch, run.epochs, run.dataset_fingerprint) == (1, "cam", 7, "f" * 16)
    assert run.dataset_identity == ID and run.dataset_path() == runmod.Path("d.h5")
    assert runmod.load_run(tmp_path) == run.record


def test_run_paths_spell_the_layout(tmp_path):
    paths = RunPaths(str(tmp_path))
    assert paths.fold_dir(np.int64(2)) == tmp_path / "fold2"
    assert paths.checkpoint_path(1) == tmp_path / "fold1" / "checkpoint.pt"
    assert paths.result_path(0) == tmp_path / "fold0" / "result.h5"


@pytest.fixture
def rundir(tmp_path):
    """Four folds of 2 epochs: 0 finished, 1 checkpoint only, 2 nothing, 3 a result of 1 epoch."""
    rundir = tmp_path / "run"
    runmod.prepare_rundir(rundir, _record(n_folds=4, dataset={"path": "data/d.h5"}))
    _result(rundir / "fold0" / "result.h5", 0)
    (rundir / "fold1").mkdir()
    runmod.save_checkpoint(rundir / "fold1" / "checkpoint.pt", {"epoch": 1})
    _result(rundir / "fold3" / "result.h5", 3, epochs=1)
    return rundir


def test_fold_states_and_why(rundir):
    run = Run(rundir)
    assert [run._status(k) for k in range(4)] == [
        ("finished", ""), ("unfinished", "1 (in training, no result yet)"), ("missing", "2"),
        ("unfinished", "3 (1 of 2 epochs)")]  # fmt: skip
    assert [run.fold_status(k) for k in range(4)] == ["finished", "unfinished", "missing", "unfinished"]
    assert run.finished_folds() == [0]
    assert [p.state for p in map(run.fold_progress, range(4))] == ["finished", "interrupted", "missing", "interrupted"]
    assert run.fold_progress(1).epochs_done == 1 and run.fold_progress(1).epochs == 2


def test_a_result_without_epochs_counts_as_run_jsons(rundir):
    with h5py.File(rundir / "fold3" / "result.h5", "r+") as f:
        del f.attrs["epochs"]
    assert Run(rundir).fold_status(3) == "finished"


def test_require_finished_names_every_fold_and_the_command(rundir):
    run = Run(rundir)
    run.require_finished([0, 0])
    with pytest.raises(NodulekitError) as err:
        run.require_finished([3, 2, 1, 0], " to evaluate it")
    assert str(err.value) == (
        f"{rundir} lacks finished fold(s) fold1, fold2, fold3 (fold(s) 2 missing; fold(s) 1 (in training, no "
        "result yet), 3 (1 of 2 epochs) unfinished of 4) to evaluate it; finish them with `nodulekit train "
        f"data/d.h5 ... -o {rundir}` (same settings)"
    )
    with pytest.raises(NodulekitError) as err:
        run.require_finished([2])
    assert str(err.value).startswith(f"{rundir} lacks finished fold(s) fold2 (fold(s) 2 missing of 4); finish")
    with pytest.raises(NodulekitError) as err:
        run.require_finished([3])
    assert "(fold(s) 3 (1 of 2 epochs) unfinished of 4); finish" in str(err.value)
    run.record["dataset"] = None
    with pytest.raises(NodulekitError, match=r"`nodulekit train DATASET \.\.\. -o "):
        run.require_finished([2])


def test_fold_result_and_fold_results(rundir):
    run = Run(rundir)
    assert run.fold_result(0).fold == 0
    with pytest.raises(NodulekitError, match="lacks finished fold"):
        run.fold_result(1)
    _result(rundir / "fold1" / "result.h5", 1)
    _result(rundir / "fold2" / "result.h5", 2)
    _result(rundir / "fold3" / "result.h5", 3)
    assert [r.fold for r in run.fold_results()] == [0, 1, 2, 3]
    _result(rundir / "fold3" / "result.h5", 3, test_index=[0, 7], overwrite=True)
    with pytest.raises(NodulekitError) as err:
        run.fold_results()
    assert str(err.value) == f"{rundir}: the test folds overlap (a nodule is tested twice); the run is corrupt"


def test_test_rows_check_the_dataset_rows(rundir):
    run = Run(rundir)
    ids = ["P0:1", "P0:2", "x", "y"]
    assert {k: v.tolist() for k, v in run.test_rows(ids).items()} == {0: [0, 1]}
    with pytest.raises(NodulekitError) as err:
        run.test_rows(["P0:1"])
    assert str(err.value) == f"{run.result_path(0)} indexes rows beyond the dataset's 1; wrong --dataset?"
    with pytest.raises(NodulekitError) as err:
        run.test_rows(["P0:2", "P0:1"])
    assert (
        str(err.value)
        == f"{run.result_path(0)} tested other nodules than the dataset has at those rows; wrong --dataset?"
    )
    _result(run.result_path(0), 0, test_index=[-1, 0], overwrite=True)
    with pytest.raises(NodulekitError, match="indexes rows beyond the dataset's 4"):
        run.test_rows(ids)
    _result(run.result_path(0), 0, test_index=[2, 3], overwrite=True)
    with pytest.raises(NodulekitError, match="tested other nodules"):
        run.test_rows(ids)
    _result(run.result_path(0), 0, test_index=[3, 2], test_nodule_id=["y", "x"], overwrite=True)
    assert run.test_rows(ids)[0].tolist() == [3, 2]


def test_a_fold_of_another_dataset_is_refused(rundir):
    run = Run(rundir)
    other = {**ID, "fingerprint": "1" * 16, "mask": "m2"}
    _result(run.result_path(0), 0, attrs={"dataset_identity": other}, overwrite=True)
    with pytest.raises(NodulekitError) as err:
        run.test_rows(["P0:1", "P0:2"])
    assert str(err.value) == (
        f"{run.result_path(0)} was not trained on this run's dataset (consensus masks differ: dataset masks "
        f"{ID['mask']}, trained on m2); re-train fold 0"
    )
    with h5py.File(run.result_path(0), "r+") as f:
        f.attrs["dataset_identity"] = "{not json"
    with pytest.raises(NodulekitError, match=r"this run's dataset \(it records none\); re-train fold 0$"):
        run.test_rows(["P0:1", "P0:2"])
    with h5py.File(run.result_path(0), "r+") as f:
        del f.attrs["dataset_identity"]
    with pytest.raises(NodulekitError, match=r"\(it records none\)"):
        run.test_rows(["P0:1", "P0:2"])
    with h5py.File(run.result_path(0), "r+") as f:
        f.attrs["dataset_identity"] = json.dumps(ID).encode()
    assert run.test_rows(["P0:1", "P0:2"])[0].tolist() == [0, 1]
    run.record.pop("dataset_identity")
    with pytest.raises(NodulekitError) as err:
        run.test_rows(["P0:1", "P0:2"])
    assert str(err.value) == (
        f"{rundir}: run.json records no dataset identity (trained before fold assignments were part of it), so "
        "its folds cannot be checked; re-train it with this version"
    )
