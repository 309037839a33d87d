"""What enters a run: training options refused before anything is written, and checkpoints
that are not the run's own (a fold of another run copied into a RUNDIR) refused by every reader."""

from __future__ import annotations

import shutil

import pytest
from reliability_cases import BY_ID

from tests.conftest import write_tiny_dataset


def _train(ds, rundir, arch):
    from nodulekit.training import TrainConfig, train

    cfg = TrainConfig(
        arch=arch, model_options={"base_width": 4}, epochs=1, batch_size=8, lr=0.01, device="cpu", amp=False
    )
    cfg.channels_last = False
    train(ds, rundir, cfg, progress=False)
    return rundir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A CAM run and a HESAM run on the same 1-channel dataset (2 folds, 1 epoch each)."""
    root = tmp_path_factory.mktemp("runs")
    ds = write_tiny_dataset(root / "d1c.h5", n=20, channels=1, folds=2)
    return ds, _train(ds, root / "cam", "cam"), _train(ds, root / "hesam", "hesam")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--momentum", "-1", "--momentum must be in [0, 1) (got -1.0)"),
        ("--momentum", "1", "--momentum must be in [0, 1) (got 1.0)"),
        ("--seed", "-1", "--seed must be an integer from 0 to 4294967295 (got -1)"),
        ("--seed", str(2**66), f"--seed must be an integer from 0 to 4294967295 (got {2**66})"),
    ],
)
def test_bad_training_options_are_one_line_and_write_nothing(tmp_path, run_cli, option, value, message):
    ds = write_tiny_dataset(tmp_path / "d.h5", n=20, channels=1, folds=2)
    code, out, err = run_cli("train", ds, "--arch", "cam", "--epochs", "1", "-o", tmp_path / "run", option, value)
    assert (code, out) == (2, "") and err.strip() == f"nodulekit: error: {message}"
    BY_ID["train-bad-value"].check(code, err)
    assert not (tmp_path / "run").exists()  # no run.json left behind to block the corrected rerun


def test_the_corrected_rerun_after_a_refused_option_trains(tmp_path, run_cli):
    ds = write_tiny_dataset(tmp_path / "d.h5", n=20, channels=1, folds=2)
    base = ("train", ds, "--arch", "cam", "--model-opt", "base_width=4", "--epochs", "1", "--fold", "0")
    assert run_cli(*base, "-o", tmp_path / "run", "--momentum", "-1")[0] == 2
    code, _, err = run_cli(*base, "-o", tmp_path / "run", "--momentum", "0.5", "--no-amp", "--no-channels-last")
    assert code == 0, err
    assert (tmp_path / "run" / "fold0" / "checkpoint.pt").exists()


def test_build_refuses_a_seed_the_fold_splitter_cannot_take(tmp_path, run_cli):
    code, out, err = run_cli(
        "build", tmp_path / "missing-rois.h5", "--channels", "1", "-o", tmp_path / "d.h5", "--seed", "-3"
    )
    assert (code, out) == (
        2,
        "",
    ) and err.strip() == "nodulekit: error: --seed must be an integer from 0 to 4294967295 (got -3)"
    assert not (tmp_path / "d.h5").exists()


def test_a_checkpoint_of_another_run_is_refused_by_every_reader(two_runs, tmp_path, run_cli):
    _, cam, hesam = two_runs
    mixed = tmp_path / "mixed"
    shutil.copytree(cam, mixed)
    shutil.copy(hesam / "fold1" / "checkpoint.pt", mixed / "fold1" / "checkpoint.pt")  # another architecture
    intruder = mixed / "fold1" / "checkpoint.pt"
    expected = (
        f"nodulekit: error: {intruder} is not a checkpoint of {mixed}: its architecture is 'hesam', run.json says 'cam'"
    )
    for args in (
        ("export-onnx", mixed, "--ensemble", "-o", tmp_path / "e.onnx"),
        ("export-onnx", mixed, "--fold", "1", "-o", tmp_path / "f.onnx"),
        ("export-onnx", intruder, "-o", tmp_path / "c.onnx"),
        ("maps", mixed, "--method", "cam", "-o", tmp_path / "m.h5", "--device", "cpu"),
    ):
        code, out, err = run_cli(*args)
        assert (code, out) == (2, ""), (args, err)
        assert err.strip() == expected, args
        BY_ID["checkpoint-of-another-run"].check(code, err)
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "m.h5").exists()
    # the run's own fold still loads: the check does not refuse what is consistent
    from nodulekit.run import Run

    model, ckpt = Run(mixed).load_model(0)
    assert ckpt["arch"] == "cam"


def test_a_checkpoint_with_other_model_options_is_refused(two_runs, tmp_path):
    import torch

    from nodulekit.errors import NodulekitError
    from nodulekit.run import Run

    _, cam, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(cam, run)
    path = run / "fold0" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = dict(ckpt["config"], base_width=8)
    torch.save(ckpt, path)
    with pytest.raises(NodulekitError, match="its model option base_width is 8, run.json says 4"):
        Run(run).load_model(0)


def test_an_older_run_json_naming_its_dataset_by_path_is_read(two_runs, tmp_path, run_cli):
    import json

    ds, cam, _ = two_runs
    run = tmp_path / "old"
    shutil.copytree(cam, run)
    record = json.loads((run / "run.json").read_text())
    record["dataset"] = str(ds)  # the older record: the path alone
    (run / "run.json").write_text(json.dumps(record))
    code, out, err = run_cli("evaluate", run, "--json")
    BY_ID["run-json-dataset-path"].check(code, err)
    assert json.loads(out)["runs"][0]["dataset"] == "D1C"
    record["dataset"] = 7
    (run / "run.json").write_text(json.dumps(record))
    code, out, err = run_cli("evaluate", run)
    assert (code, out) == (2, "")
    assert err.strip() == f"nodulekit: error: {run / 'run.json'}: 'dataset' is int, expected an object or a path"


def test_an_onnx_this_onnxruntime_cannot_load_is_one_line(two_runs, tmp_path, run_cli):
    import onnx

    from tests.model_fixtures import export

    ds, cam, _ = two_runs
    model = onnx.load(export(cam, tmp_path / "m.onnx", fold=0))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99  # newer than any onnxruntime supports
    onnx.save(model, tmp_path / "future.onnx")
    code, out, err = run_cli("infer", tmp_path / "future.onnx", ds, "-o", tmp_path / "i.h5")
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1
    BY_ID["onnx-unloadable"].check(code, err)
    assert err.startswith(f"nodulekit: error: {tmp_path / 'future.onnx'}: this onnxruntime ") and "opset" in err
    assert not (tmp_path / "i.h5").exists()


def test_a_grid_config_with_a_key_given_twice_is_one_line(tmp_path, run_cli):
    pytest.importorskip("yaml")
    config = tmp_path / "g.yaml"
    config.write_text("output: out\nfolds: 3\nepochs: 2\nfolds: 5\n")
    code, out, err = run_cli("grid", config, "--dry-run")
    BY_ID["grid-duplicate-key"].check(code, err)
    assert err.strip() == f"nodulekit: error: {config}: line 4: not valid YAML (key 'folds' is given twice)"
    assert not (tmp_path / "out").exists()
