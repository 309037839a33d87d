"""The model description in exported ONNX files, `describe`, fold ensembles, and training-data warnings."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nodulekit import export as ex  # noqa: E402
from nodulekit import modelcard  # noqa: E402
from nodulekit.errors import NodulekitError  # noqa: E402
from tests.conftest import write_tiny_dataset  # noqa: E402
from tests.model_fixtures import export, trained_run  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("desc")
    dataset, rundir = trained_run(folder)
    return {
        "folder": folder,
        "dataset": dataset,
        "rundir": rundir,
        "ensemble": export(rundir, folder / "ensemble.onnx"),
        "fold0": export(rundir, folder / "fold0.onnx", fold=0),
    }


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_description_says_how_to_build_the_input(run):
    _, card = ex.read_model_card(run["fold0"])
    pre = card["preprocessing"]
    # D11C: planes -5..+5 mm, each a 2 x diameter square; HU window -1000..400 scaled to 0..1.
    assert [c["z_offset_mm"] for c in pre["channels"]] == list(range(-5, 6))
    assert {c["p"] for c in pre["channels"]} == {2.0}
    assert pre["intensity_scaling"]["hu_window"] == [-1000.0, 400.0]
    assert pre["z_resampling"]["step_mm"] == 1.0
    x = card["network_data_format"]["inputs"]["x"]
    assert x["num_channels"] == 11 and x["spatial_shape"] == [32, 32] and x["modality"] == "CT"
    assert set(card["network_data_format"]["outputs"]) == {"prob", "map", "map_up"}
    outputs = next(line for line in modelcard.render(card).splitlines() if line.startswith("outputs"))
    assert outputs.split(None, 1)[1] == (
        "prob softmax over classes [batch, 2]; map activation map (raw, unnormalised) [batch, 2, 16, 16]; "
        "map_up activation map (raw, unnormalised) [batch, 2, 32, 32]"
    )  # HESAM at width 8: a 16 x 16 map, resized to the 32 x 32 input
    assert card["decision"]["threshold"] == 0.5 and "not a medical device" in card["intended_use"]
    td = card["training_data"]
    assert td["n_nodules"] == 20 and td["n_malignant"] == 10 and td["fingerprint"] != "unknown"
    # fold 0's model was trained on the fold-1 rows only
    with h5py.File(run["dataset"]) as f:
        ids = np.array([v.decode() for v in f["nodule_id"][()]])
        fold = f["fold"][()]
    assert td["nodule_ids"] == sorted(ids[fold == 1].tolist())


def test_no_local_paths_in_the_model_file(run):
    for path in (run["fold0"], run["ensemble"]):
        for key, value in _meta(path).items():
            assert str(run["folder"]) not in value, f"{key} holds a local path: {value[:120]}"
            assert "/tmp" not in value and str(run["folder"].parent) not in value, key


def test_describe_onnx_equals_describe_rundir(run, nodulekit_cli):
    r = nodulekit_cli("describe", run["ensemble"], "--json")
    assert r.returncode == 0, r.stderr
    from_onnx = json.loads(r.stdout)
    r = nodulekit_cli("describe", run["rundir"], "--json")
    assert r.returncode == 0, r.stderr
    export_only = from_onnx.pop("export")  # what only a file has: its version and reference vectors
    assert export_only["model_version"] and export_only["test_data_set"]["input_shape"] == [1, 11, 32, 32]
    assert json.loads(r.stdout) == from_onnx  # one description, whichever file carries the model
    assert len(from_onnx["members"]) == 2 and from_onnx["training_data"]["nodule_ids"]
    text = nodulekit_cli("describe", run["fold0"]).stdout
    assert "z offsets -5, -4" in text and "2 x diameter" in text and "HU [-1000.0, 400.0]" in text


def test_ensemble_graph_averages_the_fold_models(run):
    from nodulekit.training import load_fold_model

    members = [load_fold_model(run["rundir"], k)[0] for k in range(2)]
    x = np.random.default_rng(4).random((5, 11, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(str(run["ensemble"]), providers=["CPUExecutionProvider"])
    prob, amap, map_up, member_prob = sess.run(None, {"x": x})
    with torch.no_grad():
        probs = [torch.softmax(m(torch.as_tensor(x)), 1).numpy() for m in members]
        maps = [m.activation_map(torch.as_tensor(x))[1].numpy() for m in members]
    np.testing.assert_allclose(member_prob, np.stack([p[:, 1] for p in probs], 1), atol=1e-5)
    np.testing.assert_allclose(prob, (probs[0] + probs[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(amap, (maps[0] + maps[1]) / 2, atol=1e-5 * np.abs(amap).max())
    assert np.abs(member_prob[:, 0] - member_prob[:, 1]).max() > 1e-3, "members identical: the mean proves nothing"
    meta = _meta(run["ensemble"])
    assert meta["fold"] == "ensemble" and json.loads(meta["members"]) == [
        {"fold": 0, "epoch": 1},
        {"fold": 1, "epoch": 1},
    ]


def test_ensemble_needs_every_fold_finished(run, tmp_path, nodulekit_cli):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run["rundir"], partial)
    (partial / "fold1" / "result.h5").unlink()  # fold 1 still training
    with pytest.raises(NodulekitError, match=r"lacks finished fold\(s\) fold1 .* for an ensemble of every fold"):
        ex.load_ensemble_source(partial)
    r = nodulekit_cli("export-onnx", run["rundir"], "--ensemble", "--fold", "0", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "drop --fold" in r.stderr and not (tmp_path / "x.onnx").exists()


def _rewrite(src, dst, change):
    proto = onnx.load(str(src))
    change(proto)
    onnx.save(proto, str(dst))
    return dst


def test_foreign_or_altered_onnx_is_refused(run, tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 11, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 11, 32, 32])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    with pytest.raises(NodulekitError, match="not a nodulekit ONNX export"):
        ex.read_metadata(tmp_path / "foreign.onnx")

    def claim_3_channels(proto):
        next(p for p in proto.metadata_props if p.key == "in_channels").value = "3"

    def change_a_weight(proto):
        init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[0] += 1.0
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))

    for name, change, why in (
        ("channels.onnx", claim_3_channels, "input x is"),
        ("weights.onnx", change_a_weight, "the graph was changed after export"),
    ):
        path = _rewrite(run["fold0"], tmp_path / name, change)
        with pytest.raises(NodulekitError, match=f"does not match its nodulekit metadata: {why}"):
            ex.read_metadata(path)


def test_infer_warns_about_training_rows(run, tmp_path, nodulekit_cli):
    # The training dataset: the fold-0 model saw the fold-1 rows; the ensemble saw every row.
    r = nodulekit_cli("infer", run["fold0"], run["dataset"], "-o", tmp_path / "f0.h5", "--provider", "cpu")
    assert r.returncode == 0, r.stderr
    assert "warning: 10 of 20 nodules were in the model's training data" in r.stderr
    with h5py.File(tmp_path / "f0.h5") as f, h5py.File(run["dataset"]) as d:
        np.testing.assert_array_equal(f["trained_on"][()], d["fold"][()] != 0)
    summary = ex.infer(run["ensemble"], run["dataset"], tmp_path / "e.h5", provider="cpu")
    assert summary["trained_on"] == 20
    # Another dataset (other pixels, so another fingerprint) that reuses nodule ids: found by id.
    other = write_tiny_dataset(tmp_path / "other.h5", n=20, channels=11, folds=2, seed=7)
    summary = ex.infer(run["fold0"], other, tmp_path / "o.h5", provider="cpu")
    assert summary["trained_on"] == 10 and "by nodule id" in summary["warning"]
    # Held-out data: no warning.
    fresh = write_tiny_dataset(tmp_path / "fresh.h5", n=20, channels=11, folds=2, seed=8)
    with h5py.File(fresh, "a") as f:
        del f["nodule_id"]
        f["nodule_id"] = np.array([f"NEW-{i}".encode() for i in range(20)])
    summary = ex.infer(run["fold0"], fresh, tmp_path / "n.h5", provider="cpu")
    assert summary["trained_on"] == 0 and summary["warning"] == ""


def test_layout_refusals():
    card = {"preprocessing": None, "network_data_format": {"inputs": {"x": {"num_channels": 5}}}}
    with pytest.raises(NodulekitError, match="does not say how its 5 input channels are made"):
        modelcard.require_layout(card, "m.onnx")
    assert modelcard.layout_from_channels(5) is None
    layout = modelcard.layout_from_channels(3)
    assert [(c["z_offset_mm"], c["p"]) for c in layout] == [(0.0, 2.0), (0.0, 3.0), (0.0, 4.0)]


def test_older_export_still_infers_but_predict_asks_for_a_new_one(run, tmp_path):
    def as_version_1(proto):
        keep = [
            p for p in proto.metadata_props if p.key not in (*modelcard.CARD_KEYS, "description_schema", "graph_sha256")
        ]
        del proto.metadata_props[:]
        for p in keep:
            proto.metadata_props.add().CopyFrom(p)
        next(p for p in proto.metadata_props if p.key == "nodulekit_format").value = "nodulekit-onnx/1"

    old = _rewrite(run["fold0"], tmp_path / "v1.onnx", as_version_1)
    assert ex.infer(old, run["dataset"], tmp_path / "m.h5", provider="cpu")["n"] == 20
    with pytest.raises(NodulekitError, match="carries no nodulekit model description .* re-export it"):
        ex.read_model_card(old)


def test_model_file_stands_alone(run, nodulekit_cli):
    """Doc strings, version, licence, citation, attribution, performance, ranges and placement."""
    proto = onnx.load(str(run["fold0"]))
    meta = _meta(run["fold0"])
    assert "not a medical device" in proto.doc_string and "CC BY 3.0" in proto.doc_string
    assert "HESAM" in proto.graph.doc_string
    assert "HU clipped to [-1000, 400]" in proto.graph.input[0].doc_string
    assert all(o.doc_string for o in proto.graph.output)
    created = json.loads((run["rundir"] / "run.json").read_text())["created"]
    digits = "".join(ch for ch in created[:19] if ch.isdigit())
    assert proto.model_version == int(meta["model_version"]) == int(digits)  # the run's creation time
    assert "CC BY 3.0" in meta["license"] and "10.7937/K9/TCIA.2015.LO9QL9SX" in meta["data_attribution"]
    assert "Medical Image Analysis" in meta["citation"]
    _, card = ex.read_model_card(run["fold0"])
    # Cross-validated performance of the run, against the fold results read here.
    from sklearn.metrics import roc_auc_score

    y, p = [], []
    for k in range(2):
        with h5py.File(run["rundir"] / f"fold{k}" / "result.h5") as f:
            y += f["test_y"][()].tolist()
            p += f["test_prob"][()].tolist()
    y, p = np.array(y), np.array(p)
    perf = card["performance"]["metrics"]
    assert perf["accuracy"]["estimate"] == pytest.approx(np.mean((p > 0.5) == y))
    assert perf["auc"]["estimate"] == pytest.approx(roc_auc_score(y, p))
    for m in perf.values():
        assert m["ci95"][0] <= m["estimate"] <= m["ci95"][1]
    assert "bootstrap" in card["performance"]["interval"] and card["performance"]["n"] == 20
    # Training ranges: the fold-0 model's training nodules are the fold-1 rows.
    with h5py.File(run["dataset"]) as f:
        d = f["diameter_mm"][()][f["fold"][()] == 1]
    ranges = modelcard.training_ranges(card)
    assert (ranges.diameter_mm.min, ranges.diameter_mm.max, ranges.diameter_mm.n) == (d.min(), d.max(), 10)
    assert ranges.pixel_spacing_mm is None  # this synthetic dataset does not record its scans' spacing
    assert "t = 2 x d / 32 mm" in card["map_placement"]["map_up"]
    text = nodulekit_cli("describe", run["fold0"]).stdout
    for words in ("map placement", "training ranges", "performance", "model_version", "test vectors", "CC BY 3.0"):
        assert words in text, words


def test_reference_vectors_reproduce_and_a_changed_file_fails_them(run, tmp_path):
    import base64

    ref = json.loads(_meta(run["ensemble"])["test_data_set"])

    def arr(rec):
        return np.frombuffer(base64.b64decode(rec["data_base64"]), "<f4").reshape(rec["shape"])

    sess = ort.InferenceSession(str(run["ensemble"]), providers=["CPUExecutionProvider"])
    names = list(ref["outputs"])
    assert names == ["prob", "map", "map_up", "member_prob"]
    got = sess.run(names, {"x": arr(ref["inputs"]["x"])})
    for name, value in zip(names, got, strict=True):
        np.testing.assert_allclose(value, arr(ref["outputs"][name]), atol=1e-6, rtol=0)
    assert ref["source"].startswith("dataset D11C")  # a real input row, not noise
    assert set(ex.check_test_data_set(run["ensemble"])) == set(names)

    def wrong_expectation(proto):
        entry = next(p for p in proto.metadata_props if p.key == "test_data_set")
        data = json.loads(entry.value)
        prob = arr(data["outputs"]["prob"]).copy()
        prob[0] = prob[0][::-1]
        data["outputs"]["prob"]["data_base64"] = base64.b64encode(prob.astype("<f4").tobytes()).decode()
        entry.value = json.dumps(data)

    bad = _rewrite(run["ensemble"], tmp_path / "bad.onnx", wrong_expectation)
    with pytest.raises(NodulekitError, match="output prob of the reference input differs"):
        ex.check_test_data_set(bad)


def test_schema_1_description_reads_with_its_spec_derived(run, tmp_path):
    from nodulekit.inputs import paper_spec

    def as_schema_1(proto):
        keep = [p for p in proto.metadata_props if p.key not in modelcard.NEW_IN_2]
        del proto.metadata_props[:]
        for p in keep:
            proto.metadata_props.add().CopyFrom(p)
        next(p for p in proto.metadata_props if p.key == "description_schema").value = "nodulekit-model-description/1"

    old = _rewrite(run["fold0"], tmp_path / "d1.onnx", as_schema_1)
    _, card = ex.read_model_card(old)
    assert card["input_spec"] == paper_spec(11).as_dict() and card["performance"] is None
    assert modelcard.require_spec(card, "d1.onnx") == paper_spec(11)
    assert ex.infer(old, run["dataset"], tmp_path / "m.h5", provider="cpu")["n"] == 20


def test_predict_refuses_an_input_spec_it_cannot_follow(run, tmp_path, nodulekit_cli):
    import nibabel as nib

    def half_up(proto):
        entry = next(p for p in proto.metadata_props if p.key == "input_spec")
        spec = json.loads(entry.value)
        spec["hu_rounding"] = "half_up"
        entry.value = json.dumps(spec)

    model = _rewrite(run["fold0"], tmp_path / "half_up.onnx", half_up)
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 10), -800, np.int16), np.eye(4)), str(ct))
    out = tmp_path / "out"
    r = nodulekit_cli("predict", model, ct, "--centre", "-10,-10,5", "--diameter", "6", "-o", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert (
        "asks for hu_rounding = 'half_up'; this nodulekit builds inputs only with hu_rounding = 'half_to_even'"
        in r.stderr
    )
    assert not out.exists() and r.stdout == ""
