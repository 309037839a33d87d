"""The model description (nodulekit.modelcard) and the metadata an exported file carries
(nodulekit.export.build_metadata), read back whole: the text `describe` prints and every
metadata entry are compared with reviewed files (tests/golden/modelcard/), the numbers that vary
with the machine (training results, hashes, versions, times) checked here against an independent
computation and replaced by placeholders first."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from nodulekit import __version__, modelcard  # noqa: E402
from nodulekit import export as ex  # noqa: E402
from nodulekit.errors import NodulekitError  # noqa: E402
from tests.golden import assert_golden  # noqa: E402
from tests.model_fixtures import export, trained_run  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from nodulekit.datasets import load_dataset

    folder = tmp_path_factory.mktemp("card")
    dataset, rundir = trained_run(folder)
    fold0, ensemble = export(rundir, folder / "fold0.onnx", fold=0), export(rundir, folder / "ensemble.onnx")
    run_record = json.loads((rundir / "run.json").read_text())
    return {
        "ds": load_dataset(dataset),
        "rundir": rundir,
        "run": run_record,
        "fold0": ex.read_model_card(fold0),
        "ensemble": ex.read_model_card(ensemble),
    }


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _performance_parts(rundir) -> list[str]:
    """The four metrics as `describe` should print them, from the evaluation's own summary."""
    from nodulekit.evaluation import load_run_results, summarise_run

    ci = summarise_run(load_run_results(rundir))["pooled_nodule_ci"]
    parts = []
    for name in ("accuracy", "sensitivity", "specificity"):
        c = ci[name]
        parts.append(f"{name} {_pct(c['estimate'])} [{_pct(c['low'])}, {_pct(c['high'])}]")
    c = ci["auc"]
    parts.append(f"auc {c['estimate']:.3f} [{c['low']:.3f}, {c['high']:.3f}]")
    return parts


def _expected_version(run: dict) -> str:
    """run.json's creation time as YYYYMMDDHHMMSS (UTC): the model version of every export of the run."""
    return datetime.fromisoformat(run["created"]).astimezone(UTC).strftime("%Y%m%d%H%M%S")


def _scrub_render(text: str, made, training_rows: np.ndarray, meta: dict) -> str:
    """`describe`'s text with what varies between machines replaced, each value checked first."""
    from nodulekit.datasets import dataset_fingerprint

    ds = made["ds"]
    d = ds.diameter_mm[training_rows]
    replacements = {
        f"fingerprint {dataset_fingerprint(ds)};": "fingerprint <fingerprint>;",
        f"diameter_mm {float(d.min()):g}..{float(d.max()):g} (training nodules)": "diameter_mm <min>..<max> "
        "(training nodules)",
        ", ".join(_performance_parts(made["rundir"])) + " on 20 nodules": "<metrics> on 20 nodules",
        f"model_version    {_expected_version(made['run'])}": "model_version    <model_version>",
        f"nodulekit        {__version__}": "nodulekit        <version>",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    # the reference vector's probability is what ONNX Runtime computed for the stored input
    ref = json.loads(meta["test_data_set"])
    prob = float(modelcard.decode_array(ref["outputs"]["prob"])[0, 1])
    shown = f"prob[:, 1] [{prob}]"
    assert shown in text
    return text.replace(shown, "prob[:, 1] [<p>]")


def test_describe_text_of_one_fold_model(made):
    meta, card = made["fold0"]
    text = _scrub_render(modelcard.render(card), made, made["ds"].fold != 0, meta)
    assert_golden("modelcard/fold0-describe.txt", text)


def test_describe_text_of_the_fold_ensemble_differs_where_it_should(made):
    (_, card0), (_, card) = made["fold0"], made["ensemble"]
    one = _fields(card0)
    both = _fields(card)
    assert [k for k in one if one[k] != both[k]] == [
        "model",
        "outputs",
        "training data",
        "training ranges",
        "test vectors",
    ]
    assert both["model"] == (
        "hesam (map: hesam), ensemble of 2 fold models (folds 0, 1): mean of their probabilities and maps"
    )
    assert both["outputs"].endswith("; member_prob malignant probability of each ensemble member [batch, 2]")
    assert both["training data"].endswith("; 20 training nodule ids listed")
    # every row trained one of the members: the ranges are over all 20 nodules
    d = made["ds"].diameter_mm
    assert both["training ranges"] == f"diameter_mm {float(d.min()):g}..{float(d.max()):g} (training nodules)"


def _fields(card) -> dict[str, str]:
    """`describe`'s lines as {name: text}."""
    return {k.strip(): v.strip() for k, v in (line.split("  ", 1) for line in modelcard.render(card).splitlines())}


def _scrub_json(value, path=()):
    """Numbers of the training results and of the data's ranges as placeholders (they vary by machine)."""
    if isinstance(value, dict):
        return {k: _scrub_json(v, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v, path) for v in value]
    if isinstance(value, float) and path and path[0] in ("performance", "ranges"):
        return "<number>"
    return value


def test_every_metadata_entry_of_a_fold_model(made):
    from nodulekit.datasets import dataset_fingerprint

    meta, _ = made["fold0"]
    meta = dict(meta)
    ds = made["ds"]
    fingerprint = dataset_fingerprint(ds)
    # what varies between machines or runs, checked, then left out or replaced
    assert meta.pop("model_version") == _expected_version(made["run"])
    assert meta.pop("nodulekit_version") == __version__
    assert meta.pop("torch_version") == torch.__version__
    assert meta.pop("dataset_fingerprint") == fingerprint
    assert json.loads(meta.pop("dataset_identity")) == made["run"]["dataset_identity"]
    for key in ("verification", "test_data_set", "graph_sha256"):  # checked in test_export/test_model_description
        meta.pop(key)
    training = json.loads(meta["training_data"])
    assert training.pop("fingerprint") == fingerprint
    d = ds.diameter_mm[ds.fold != 0]
    assert training["ranges"]["diameter_mm"] == {"min": float(d.min()), "max": float(d.max()), "n": 10}
    meta["training_data"] = json.dumps({**training, "ranges": _scrub_json(training["ranges"], ("ranges",))})
    perf = json.loads(meta["performance"])
    _check_performance(perf, made["rundir"])
    meta["performance"] = json.dumps(_scrub_json(perf, ("performance",)))
    shown = {k: json.loads(v) if v[:1] in "{[" else v for k, v in meta.items()}
    assert_golden("modelcard/fold0-metadata.json", json.dumps(shown, indent=1) + "\n")


def _check_performance(perf: dict, rundir) -> None:
    """The description's performance entry is the evaluation's pooled summary, entry by entry."""
    from nodulekit.evaluation import load_run_results, summarise_run

    s = summarise_run(load_run_results(rundir))
    ci = s["pooled_nodule_ci"]
    assert perf["n"] == 20 and perf["n_malignant"] == 10
    assert perf["metrics"] == {
        k: {"estimate": ci[k]["estimate"], "ci95": [ci[k]["low"], ci[k]["high"]]}
        for k in ("accuracy", "sensitivity", "specificity", "auc")
    }
    assert perf["fold_mean_sd"] == {k: [v["mean"], v["std"]] for k, v in s["summary"].items()}
    assert perf["calibration"] == {"brier": s["calibration"]["brier"], "ece": s["calibration"]["ece"]}


def test_ensemble_metadata_entries(made):
    meta, card = made["ensemble"]
    assert (meta["fold"], meta["epoch"]) == ("ensemble", "ensemble")
    assert meta["source"] == "all 2 fold models of a nodulekit RUNDIR (mean of their probabilities and maps)"
    outputs = json.loads(meta["outputs"])
    assert (
        outputs["prob"]
        == "mean over the 2 fold models of: softmax of the logits [batch, classes]; column 1 = malignant"
    )
    assert outputs["member_prob"] == "malignant probability of each fold model [batch, members], in 'members' order"
    assert json.loads(meta["members"]) == [{"fold": 0, "epoch": 1}, {"fold": 1, "epoch": 1}]
    assert card["network_data_format"]["outputs"]["member_prob"] == {
        "type": "probabilities",
        "format": "malignant probability of each ensemble member",
        "num_channels": 2,
        "spatial_shape": [],
        "dtype": "float32",
        "value_range": [0.0, 1.0],
    }
    assert card["training_data"]["nodule_ids"] == sorted(str(v) for v in made["ds"].nodule_id)
    assert card["export"]["model_version"] == _expected_version(made["run"])


def test_export_record_summarises_the_reference_vectors(made):
    meta, card = made["fold0"]
    ref = json.loads(meta["test_data_set"])
    prob = modelcard.decode_array(ref["outputs"]["prob"])
    assert card["export"]["test_data_set"] == {
        "source": "dataset D11C (its first checked row)",
        "input_shape": [1, 11, 32, 32],
        "prob_malignant": [float(prob[0, 1])],
        "tolerance": {"prob_atol": 1e-05, "map_rtol": 0.0001, "map_atol_floor": 1e-06},
        "runtime": ref["runtime"],
        "where": "metadata_props entry test_data_set (arrays as base64 float32)",
    }
    assert ref["runtime"].startswith("onnxruntime ") and ref["runtime"].endswith(" CPUExecutionProvider")
    # a file without vectors (or with a broken entry) still reads: version only
    for broken in ({}, {"test_data_set": "not json"}, {"test_data_set": json.dumps({"outputs": {}})}):
        assert modelcard._export_record({"model_version": "7", **broken}) == {
            "model_version": "7",
            "test_data_set": None,
        }


# ----------------------------------------------------------------------------- other cards


def _fold0_model(made):
    from nodulekit.run import Run

    model, _ = Run(made["rundir"]).load_model(0, device="cpu")
    return model


RECIPE = {"name": "robust", "flips": True, "tta": True, "ema_decay": 0.5, "ema_batch_norm": "average", "seeds": 3}


def test_a_tta_recipe_shows_in_outputs_map_definition_and_recipe_lines(made):
    model = _fold0_model(made)
    run = {**made["run"], "recipe": RECIPE}
    src = ex.ModelSource(model, "test source", 0, 1, run, members=[model, model], rundir=None)
    meta = ex.build_metadata(src, 17, "dynamo", model_version=42)
    assert meta["model_version"] == "42" and meta["exporter"] == "torch.onnx.export (dynamo), opset 17"
    assert meta["map_definition"] == f"{ex.MAP_DEFINITIONS['hesam']}; {modelcard.TTA_MEAN}"
    outputs = json.loads(meta["outputs"])
    assert outputs["map"] == (
        f"mean over the 2 fold models of: {modelcard.TTA_MEAN}: soft activation map on the final feature grid "
        "[batch, classes, h, w], raw (unnormalised)"
    )
    nd = json.loads(meta["network_data_format"])["outputs"]
    over = ", mean over the 8 flips/rotations of x (training_recipe.test_time_augmentation)"
    assert nd["prob"]["format"] == "softmax over classes" + over
    assert nd["map_up"]["format"] == "activation map (raw, unnormalised)" + over
    recipe = json.loads(meta["training_recipe"])
    assert recipe["test_time_augmentation"] == {
        "in_model": True,
        "meaning": f"applied by the model: prob, map and map_up are each the {modelcard.TTA_MEAN}, so map and "
        "map_up lie on x as without it; prob is what the run's cross-validated test probabilities (performance) "
        "were computed with",
    }
    card = modelcard.from_metadata(meta, "test.onnx")
    lines = _fields(card)
    assert lines["recipe"] == (
        "robust: flips=true, rot90=false, shift_px=0, scale=0, targets=hard, label_smoothing=0, weight_decay=none, "
        "dropout=0, ema_decay=0.5, ema_batch_norm=average, tta=true, seeds=3 (its figures average 3 seed RUNDIRs; "
        "this model is one seed's)"
    )
    assert lines["performance"].startswith("not recorded (the run's folds were not all finished")
    assert lines["model_version"] == "42"
    assert "test vectors" not in lines  # built, not exported: no reference vectors


def test_a_recipe_stored_without_its_meaning_was_not_applied_by_the_graph():
    bare = json.dumps({"name": "robust", "tta": True})
    record = modelcard.stored_recipe(bare, "old.onnx")
    assert record["test_time_augmentation"]["in_model"] is False
    assert record["test_time_augmentation"]["meaning"].startswith(
        "NOT applied by this graph (exported before nodulekit put TTA in the graph): its prob comes from one "
        "forward pass of x, while the run's cross-validated figures (performance) are means over the 8 "
        "flips/rotations of x"
    )
    assert modelcard.stored_recipe(None, "older.onnx")["name"] == "paper"
    with pytest.raises(NodulekitError) as err:
        modelcard.stored_recipe("{not json", "bad.onnx")
    assert str(err.value) == "bad.onnx: model description entry 'training_recipe' is not a valid recipe"


def _schema_1(meta: dict) -> dict:
    """The entries of a file exported before input specs (description schema 1)."""
    old = {k: v for k, v in meta.items() if k not in modelcard.NEW_IN_2 + ("training_recipe",)}
    old["description_schema"] = "nodulekit-model-description/1"
    pre = json.loads(old["preprocessing"])
    del pre["window"]  # schema 1 had no arithmetic
    old["preprocessing"] = json.dumps(pre)
    return old


def test_schema_1_card_reads_and_renders_its_older_lines(made):
    meta, _ = made["fold0"]
    card = modelcard.from_metadata(_schema_1(meta), "v1.onnx")
    assert card["map_placement"] is None and card["performance"] is None
    assert card["input_spec"] == json.loads(meta["input_spec"])  # derived from the layout and normalisation
    lines = _fields(card)
    pre = card["preprocessing"]
    assert lines["z"] == f"1 mm planes; {pre['z_resampling']['method']}"
    assert lines["in-plane"] == (
        f"{pre['crop']['rule']}; {pre['crop']['sample_points']}; {pre['crop']['interpolation']}"
    )
    assert lines["map placement"] == "not recorded"
    assert lines["performance"] == (
        "not recorded (the run's folds were not all finished, or the model was not made from a RUNDIR)"
    )
    assert "window" not in lines and "crop" not in lines


def test_a_card_without_channel_layout_or_members(made):
    _, card = made["fold0"]
    card = {**card, "preprocessing": None, "members": [], "export": None, "training_data": {}}
    lines = _fields(card)
    assert lines["channels"] == ("unknown: this model does not say how its channels are made (predict refuses it)")
    assert lines["model"] == "hesam (map: hesam), one model (fold unknown, epoch unknown)"
    assert lines["training data"] == (
        "None: None nodules (None malignant), None None folds, fingerprint None; training nodule ids unknown"
    )
    assert lines["training ranges"] == "not recorded"
    assert "model_version" not in lines


def test_from_metadata_refusals_name_the_file_and_entry(made):
    meta, _ = made["fold0"]
    with pytest.raises(NodulekitError) as err:
        modelcard.from_metadata({k: v for k, v in meta.items() if k != "description_schema"}, "m.onnx")
    assert str(err.value) == (
        "m.onnx carries no nodulekit model description (nodulekit-model-description/2; found none); re-export it "
        "with this nodulekit's `export-onnx`"
    )
    with pytest.raises(NodulekitError, match=r"found nodulekit-model-description/9\)"):
        modelcard.from_metadata({**meta, "description_schema": "nodulekit-model-description/9"}, "m.onnx")
    for key in ("decision", "map_placement"):
        broken = {k: v for k, v in meta.items() if k != key}
        with pytest.raises(NodulekitError) as err:
            modelcard.from_metadata(broken, "m.onnx")
        assert str(err.value) == f"m.onnx: model description entry {key!r} is missing or not valid JSON"
    card = modelcard.from_metadata({k: v for k, v in meta.items() if k not in ("arch", "model_config")}, "m.onnx")
    assert card["arch"] == "unknown" and card["model_config"] == "unknown" and card["map_kind"] == "hesam"


def test_performance_text_of_undefined_statistics():
    metrics = {
        "accuracy": {"estimate": 0.25, "ci95": [0.125, 0.5]},
        "sensitivity": {"estimate": None, "ci95": [None, None]},
        "specificity": {"estimate": 1.0, "ci95": [None, 1.0]},
        "auc": {"estimate": 0.5, "ci95": [0.25, 0.75]},
    }
    card = {"performance": {"metrics": metrics, "n": 8, "n_malignant": 3, "what": "W", "interval": "I"}}
    assert modelcard._performance_text(card) == (
        "accuracy 25.0 % [12.5 %, 50.0 %], sensitivity undefined, specificity 100.0 % [interval undefined], "
        "auc 0.500 [0.250, 0.750] on 8 nodules (3 malignant); W; I"
    )
    assert modelcard._finite_or_none({"a": [1.0, float("nan")], "b": {"c": float("inf"), "d": 2}}) == {
        "a": [1.0, None],
        "b": {"c": None, "d": 2},
    }


def test_ranges_record_and_training_ranges():
    rec = modelcard.ranges_record({"diameter_mm": [4.0, np.nan, 12.5, 7.0], "centre_hu": [], "slice_spacing_mm": None})
    assert rec["diameter_mm"] == {"min": 4.0, "max": 12.5, "n": 3}
    assert rec["centre_hu"] is None and rec["slice_spacing_mm"] is None and rec["pixel_spacing_mm"] is None
    assert rec["meaning"] == modelcard.RANGE_QUANTITIES
    ranges = modelcard.training_ranges({"training_data": {"ranges": {**rec, "centre_hu": {"min": -5, "max": 9}}}})
    assert ranges.diameter_mm == modelcard.Range(4.0, 12.5, 3)
    assert ranges.centre_hu is None  # no count: not a range
    assert ranges.diameter_mm.contains(4.0) and ranges.diameter_mm.contains(12.5)
    assert not ranges.diameter_mm.contains(3.99) and not ranges.diameter_mm.contains(12.51)
    assert modelcard.training_ranges({"training_data": None}) == modelcard.TrainingRanges()
    card = {"training_data": {"ranges": rec}}
    assert modelcard._ranges_text(card) == "diameter_mm 4..12.5 (training nodules)"


def test_decision_and_layouts():
    d = modelcard.decision(0.25, {"malignant_above": 3})
    assert d["rule"] == "malignant if prob[:, 1] > 0.25, else benign" and d["threshold"] == 0.25
    assert d["class_names"] == ["benign", "malignant"] and d["label_rule"] == {"malignant_above": 3}
    assert d["label_rule_meaning"] == (
        "training labels: the LIDC-IDRI readers' mean malignancy rating above/below the rule's cut-offs "
        "(1 = malignant, 0 = benign); nodules at the cut-off were not used"
    )
    # the paper's D3C: the centre plane at p = 2, 3, 4 x diameter
    assert modelcard.layout_from_channels(3) == [
        {"z_offset_mm": 0.0, "p": 2.0},
        {"z_offset_mm": 0.0, "p": 3.0},
        {"z_offset_mm": 0.0, "p": 4.0},
    ]
    assert modelcard.layout_from_channels(7) is None
    own = [{"z_offset_mm": -1.0, "p": 2.0}, {"z_offset_mm": 1.0, "p": 2.0}]
    assert modelcard.layout_from_channels(2, own) == own


def test_require_spec_refusals(made):
    _, card = made["fold0"]
    x = card["network_data_format"]["inputs"]["x"]
    twelve = {**card, "network_data_format": {"inputs": {"x": {**x, "num_channels": 12}}}}
    with pytest.raises(NodulekitError) as err:
        modelcard.require_spec(twelve, "m.onnx")
    assert str(err.value) == "m.onnx: its input spec lists 11 channels but the model takes 12"
    small = {**card, "input_spec": {**card["input_spec"], "patch_px": 16}}
    with pytest.raises(NodulekitError) as err:
        modelcard.require_spec(small, "m.onnx")
    assert str(err.value) == "m.onnx: its input spec asks for 16x16 patches, the model takes 32"
    unknown = {**card, "input_spec": None, "preprocessing": None}
    with pytest.raises(NodulekitError) as err:
        modelcard.require_spec(unknown, "m.onnx")
    assert str(err.value) == (
        "m.onnx does not say how its 11 input channels are made from a CT (no input spec or channel layout); "
        "predict can only fill channels it knows: export the model from a nodulekit RUNDIR"
    )
    assert modelcard.require_layout(card, "m.onnx") == card["input_spec"]["channels"]


def test_training_data_without_the_dataset_file_comes_from_the_fold_results(made, tmp_path):
    run = {**made["run"], "dataset": {**made["run"]["dataset"], "path": str(tmp_path / "gone.h5")}}
    record = modelcard.training_data(run, [1], made["rundir"])
    ds = made["ds"]
    assert record["nodule_ids"] == sorted(str(v) for v in ds.nodule_id[ds.fold != 1])
    assert record["ranges"] is None and record["series_uids"] is None
    assert modelcard.training_data(run, [1], None)["nodule_ids"] is None  # nothing says which rows
    assert modelcard.training_data(made["run"], [None], made["rundir"])["nodule_ids"] is None  # unknown fold
    assert modelcard.performance(made["run"], None) is None
    assert modelcard.performance(made["run"], tmp_path) is None  # no finished folds there


def test_the_card_built_from_the_rundir_is_the_one_in_the_file(made):
    """`describe RUNDIR` and `describe file.onnx` read one structure (the file adds only its export entry)."""
    src = ex.load_model_source(made["rundir"], 0)
    built = modelcard.build_card(src.models, src.run, src.info(), src.rundir)
    _, from_file = made["fold0"]
    assert built["schema"] == modelcard.SCHEMA == "nodulekit-model-description/2"
    assert json.loads(json.dumps(built)) == {k: v for k, v in from_file.items() if k != "export"}


def test_a_broken_input_spec_is_refused_naming_the_file(made):
    _, card = made["fold0"]
    broken = {**card, "input_spec": {**card["input_spec"], "patch_px": "wide"}}
    with pytest.raises(NodulekitError) as err:
        modelcard.card_spec(broken, "broken.onnx")
    assert str(err.value).startswith("broken.onnx")


def test_an_input_spec_alone_is_enough(made):
    """A description with an input spec but no preprocessing section still says how to build x."""
    _, card = made["fold0"]
    spec = modelcard.card_spec({**card, "preprocessing": None}, "m.onnx")
    assert spec is not None and spec.as_dict() == card["input_spec"]
