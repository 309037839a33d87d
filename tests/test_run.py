"""The Run object: fold status, one reader of fold results, one way to load a fold's model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fake_identity

from nodulekit.artifacts import provenance
from nodulekit.errors import ArtifactError, NodulekitError
from nodulekit.run import Run, save_checkpoint, write_fold_result

torch.set_num_threads(1)


def _result(run_dir, k, epochs, prob=(0.2, 0.9)):
    write_fold_result(
        run_dir / f"fold{k}" / "result.h5",
        prov=provenance(),
        history=np.zeros((epochs, 5)),
        test_index=np.arange(2) + 2 * k,
        test_prob=np.asarray(prob, float),
        test_y=[0, 1],
        test_nodule_id=[f"P{k}:1", f"P{k}:2"],
        attrs={"epochs": epochs, "fold": k, "dataset_identity": fake_identity()},
    )


def _checkpoint(path, width=4):
    from nodulekit.models import create_model

    torch.manual_seed(0)
    model = create_model("cam", 3, base_width=width).eval()
    state = {"state_dict": model.state_dict(), "arch": "cam", "in_channels": 3, "num_classes": 2}
    save_checkpoint(path, {**state, "config": dict(model.config)})
    return model


@pytest.fixture
def rundir(tmp_path):
    run = tmp_path / "run"
    for k in range(4):
        (run / f"fold{k}").mkdir(parents=True)
    record = {"arch": "cam", "n_folds": 4, "epochs": 2, "dataset": "d.h5", "dataset_identity": fake_identity()}
    (run / "run.json").write_text(json.dumps(record))
    _result(run, 0, epochs=2)
    _checkpoint(run / "fold1" / "checkpoint.pt")  # training started, no result yet
    _result(run, 3, epochs=1)  # result of a shorter schedule than run.json asks for
    return run


def test_fold_status_and_require_finished(rundir):
    run = Run(rundir)
    assert [run.fold_status(k) for k in range(4)] == ["finished", "unfinished", "missing", "unfinished"]
    assert run.finished_folds() == [0]
    run.require_finished([0])
    with pytest.raises(NodulekitError) as err:
        run.fold_results()
    message = str(err.value)
    assert "lacks finished fold(s) fold1, fold2, fold3 " in message
    assert "fold(s) 2 missing" in message and "3 (1 of 2 epochs)" in message and "1 (in training" in message
    assert "nodulekit train d.h5" in message and "\n" not in message
    result = run.fold_result(0)
    assert result.fold == 0 and result.test_nodule_id == ["P0:1", "P0:2"]
    assert result.test_patient_id == ["P0", "P0"]  # from the nodule ids when not stored
    np.testing.assert_array_equal(result.test_prob, [0.2, 0.9])


def test_not_a_run_folder(tmp_path):
    with pytest.raises(NodulekitError, match="does not exist"):
        Run(tmp_path / "nope")
    with pytest.raises(NodulekitError, match="no run.json"):
        Run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(NodulekitError, match="not valid JSON"):
        Run(tmp_path)


def test_nan_predictions_are_refused(rundir):
    _result(rundir, 2, epochs=2, prob=(np.nan, 0.4))
    with pytest.raises(ArtifactError, match=r"test_prob holds 1 value\(s\) that are not probabilities"):
        Run(rundir).fold_result(2)


def test_load_model_one_way_with_one_line_errors(rundir):
    run = Run(rundir)
    reference = _checkpoint(run.checkpoint_path(0))
    model, ckpt = run.load_model(0)
    assert not model.training and ckpt["arch"] == "cam"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(NodulekitError, match="fold 2 of .* has not been trained"):
        run.load_model(2)
    run.checkpoint_path(2).write_bytes(b"not a checkpoint")
    with pytest.raises(NodulekitError, match="is not a readable nodulekit checkpoint") as err:
        run.load_model(2)
    assert "\n" not in str(err.value)
    wider = _checkpoint(run.checkpoint_path(3), width=8)  # weights of a wider model...
    del wider
    ckpt = torch.load(run.checkpoint_path(3), weights_only=True)
    ckpt["config"]["base_width"] = 4  # ...recorded as the narrow one
    save_checkpoint(run.checkpoint_path(3), ckpt)
    with pytest.raises(NodulekitError, match="weights do not fit a cam model") as err:
        run.load_model(3)
    assert "\n" not in str(err.value)


def test_dataset_check_is_a_call_into_datasets(tmp_path, tiny_dataset):
    from nodulekit.datasets import dataset_fingerprint, load_dataset

    ds = load_dataset(tiny_dataset)
    record = {"n_folds": 5, "dataset": {"path": str(tiny_dataset)}, "dataset_identity": ds.identity}
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert Run(tmp_path).load_dataset().fingerprint == dataset_fingerprint(ds)
    record["dataset_identity"] = {**ds.identity, "fingerprint": "0" * 16, "seed": 3}
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(NodulekitError, match="is not the dataset of .*: fold assignment differs"):
        Run(tmp_path).load_dataset()
    del record["dataset_identity"]  # a run.json from before dataset identities
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(NodulekitError, match="records no dataset identity .* re-train it"):
        Run(tmp_path).load_dataset()
