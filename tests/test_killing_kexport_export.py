"""nodulekit.export beyond the round trip of test_export: what `infer` records and returns, how
providers are chosen and reported, the one-line refusals (their exact text), the graph's doc
strings, which rows count as training rows, and the argument checks of export itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nodulekit import export as ex  # noqa: E402
from nodulekit.errors import NodulekitError  # noqa: E402
from tests.model_fixtures import export, trained_run  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from nodulekit.datasets import load_dataset

    folder = tmp_path_factory.mktemp("kexport")
    dataset, rundir = trained_run(folder)
    return {
        "folder": folder,
        "dataset": dataset,
        "ds": load_dataset(dataset),
        "rundir": rundir,
        "fold0": export(rundir, folder / "fold0.onnx", fold=0),
        "ensemble": export(rundir, folder / "ensemble.onnx"),
    }


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(NodulekitError) as err:
        call(*args, **kwargs)
    return str(err.value)


# ----------------------------------------------------------------------------- infer


def test_infer_returns_and_records_what_ran(made, tmp_path):
    from nodulekit.artifacts import read_maps

    out = tmp_path / "maps.h5"
    summary = ex.infer(made["fold0"], made["dataset"], out, provider="cpu", batch=7)
    ds = made["ds"]
    trained = ds.fold != 0  # fold 0's model trained on the fold-1 rows of this very dataset
    assert set(summary) == {"provider", "note", "n", "seconds", "out", "trained_on", "warning"}
    assert (summary["provider"], summary["note"], summary["n"], summary["out"]) == ("cpu", "", 20, str(out))
    assert summary["trained_on"] == int(trained.sum()) == 10 and summary["seconds"] > 0
    assert summary["warning"] == (
        "10 of 20 nodules were in the model's training data (this is its training dataset; rows outside test "
        "fold 0); their probabilities are not held-out estimates (the maps file marks them in `trained_on`)"
    )
    maps = read_maps(out)
    np.testing.assert_array_equal(maps.extra["trained_on"], trained.astype(np.uint8))
    np.testing.assert_array_equal(maps.extra["dataset_fold"], ds.fold)
    np.testing.assert_array_equal(maps.fold, np.zeros(20))  # the model's fold, on every row
    assert (maps.method, maps.arch, maps.source) == ("hesam", "hesam", f"onnx:{made['fold0']}")
    np.testing.assert_array_equal(maps.y, ds.y)
    prov = maps.provenance
    assert (prov["onnx"], prov["dataset"], prov["provider"], prov["provider_note"]) == (
        str(made["fold0"]),
        str(made["dataset"]),
        "cpu",
        "",
    )
    assert prov["label_rule"] == ds.label_rule and prov["batch"] == 7
    assert prov["seconds"] == round(summary["seconds"], 4)
    meta = ex.read_metadata(made["fold0"])
    assert prov["onnx_metadata"] == {k: v for k, v in meta.items() if k != "verification"}
    assert maps.dataset_identity == ds.identity


def test_infer_of_an_ensemble_marks_every_row_and_unknown_folds(made, tmp_path):
    from nodulekit.artifacts import read_maps

    out = tmp_path / "maps.h5"
    summary = ex.infer(made["ensemble"], made["dataset"], out, provider="cpu")
    assert summary["trained_on"] == 20
    assert "(this is its training dataset and the model is an ensemble of every fold)" in summary["warning"]
    np.testing.assert_array_equal(read_maps(out).fold, np.full(20, -1))  # no one fold: -1
    assert _error(ex.infer, made["fold0"], made["dataset"], tmp_path / "b.h5", batch=0) == (
        "--batch must be at least 1 (got 0)"
    )


def test_training_rows_by_fingerprint_fold_or_nodule_id(made):
    ds = made["ds"]
    meta = ex.read_metadata(made["fold0"])
    rows, how = ex.training_rows(meta, ds)
    np.testing.assert_array_equal(rows, ds.fold != 0)
    assert how == "this is its training dataset; rows outside test fold 0"
    rows, how = ex.training_rows({**meta, "fold": "unknown"}, ds)
    assert rows.all() and how == "this is its training dataset and the model is a model of unknown fold"
    # another dataset: the listed training nodules, by id
    other = {**meta, "dataset_fingerprint": "0123456789abcdef"}
    rows, how = ex.training_rows(other, ds)
    ids = json.loads(meta["training_data"])["nodule_ids"]
    np.testing.assert_array_equal(rows, np.isin(ds.nodule_id.astype(str), ids))
    assert how == "by nodule id" and rows.sum() == 10
    rows, _ = ex.training_rows({**other, "training_data": "not json"}, ds)
    assert not rows.any()
    rows, _ = ex.training_rows({"training_data": json.dumps({"nodule_ids": [str(ds.nodule_id[3])]})}, ds)
    assert rows.tolist() == [i == 3 for i in range(20)]


# ----------------------------------------------------------------------------- providers


class _Session:
    def __init__(self, active):
        self.active = active

    def get_providers(self):
        return [self.active]


def _fake_ort(monkeypatch, available, active):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))
    made = {}

    def session(path, providers, options=None):
        made["providers"], made["severity"] = providers, options.log_severity_level
        return _Session(active)

    monkeypatch.setattr(ex, "ort_session", session)
    return made


CPU, CUDA, TRT = ex.PROVIDERS["cpu"], ex.PROVIDERS["cuda"], ex.PROVIDERS["tensorrt"]


def test_auto_provider_prefers_cuda_and_reports_a_fallback(monkeypatch):
    asked = _fake_ort(monkeypatch, [TRT, CUDA, CPU], CUDA)
    _, ran, note = ex.make_session("m.onnx", "AUTO")
    assert (ran, note) == ("cuda", "auto: running on cuda")
    assert asked["providers"] == [CUDA, CPU] and asked["severity"] == 3
    _fake_ort(monkeypatch, [CUDA, CPU], CPU)  # CUDA listed but its libraries failed to load
    assert ex.make_session("m.onnx", "auto")[1:] == ("cpu", "auto: cuda failed to initialise, running on cpu")
    _fake_ort(monkeypatch, [CPU], CPU)
    assert ex.make_session("m.onnx", "auto")[1:] == (
        "cpu",
        "auto: running on cpu (no CUDA provider in this onnxruntime)",
    )


def test_named_providers_chain_and_refusals(monkeypatch):
    asked = _fake_ort(monkeypatch, [TRT, CUDA, CPU], TRT)
    assert ex.make_session("m.onnx", "tensorrt")[1:] == ("tensorrt", "")
    assert asked["providers"] == [TRT, CUDA, CPU]
    _fake_ort(monkeypatch, [TRT, CUDA, CPU], CPU)
    assert _error(ex.make_session, "m.onnx", "cuda") == (
        "provider cuda is installed but failed to initialise (ONNX Runtime fell back to cpu); check the "
        "CUDA/cuDNN/TensorRT libraries"
    )
    asked = _fake_ort(monkeypatch, [CPU], CPU)
    assert ex.make_session("m.onnx", "cpu")[1:] == ("cpu", "") and asked["providers"] == [CPU]
    assert _error(ex.make_session, "m.onnx", "cuda") == (
        f"provider cuda is not available in this onnxruntime {ort.__version__} (available: {CPU}) (install the "
        "onnxruntime-gpu wheel on a machine with a GPU)"
    )
    assert _error(ex.make_session, "m.onnx", "tpu") == "unknown provider 'tpu' (choose auto, cuda, tensorrt or cpu)"
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA])
    assert _error(ex.make_session, "m.onnx", "cpu") == (
        f"provider cpu is not available in this onnxruntime {ort.__version__} (available: {CUDA})"
    )


class _Runs:
    """A session that returns the batch's rows as 'prob' and their sums as 'map'."""

    def __init__(self):
        self.batches = []

    def run(self, names, feed):
        x = feed[ex.INPUT_NAME]
        self.batches.append(len(x))
        return [x[:, 0, 0, :2] + 0, x.sum(axis=(2, 3)), x[:, :1]][: len(names)]


def test_run_session_batches_and_concatenates_in_order():
    x = np.arange(5 * 2 * 32 * 32, dtype=np.float64).reshape(5, 2, 32, 32)
    session = _Runs()
    prob, maps, up = ex.run_session(session, x, batch=2)
    assert session.batches == [2, 2, 1]
    np.testing.assert_array_equal(prob, x[:, 0, 0, :2].astype(np.float32))
    np.testing.assert_array_equal(maps, x.sum(axis=(2, 3), dtype=np.float32))
    assert prob.dtype == np.float32 and up.shape == (5, 1, 32, 32)
    (only,) = ex.run_session(_Runs(), x, batch=5, names=("prob",))
    assert only.shape == (5, 2)
    assert _error(ex.run_session, _Runs(), x[:0]) == "the input has no samples"


# ----------------------------------------------------------------------------- reading a file


def _rewritten(src, dst, change):
    proto = onnx.load(str(src))
    change(proto)
    onnx.save(proto, str(dst))
    return dst


def _set(proto, key, value):
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value


def test_read_metadata_refusals_name_the_file_and_the_reason(made, tmp_path):
    src = made["fold0"]
    missing = tmp_path / "none.onnx"
    assert _error(ex.read_metadata, missing) == f"{missing} does not exist"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    assert _error(ex.read_metadata, junk) == f"{junk} is not an ONNX model"
    path = _rewritten(src, tmp_path / "v9.onnx", lambda p: _set(p, "nodulekit_format", "nodulekit-onnx/9"))
    assert _error(ex.read_metadata, path) == (
        f"{path} is not a nodulekit ONNX export (nodulekit-onnx/9); make one with `nodulekit export-onnx`"
    )

    def drop(*keys):
        def change(proto):
            kept = [p for p in proto.metadata_props if p.key not in keys]
            del proto.metadata_props[:]
            proto.metadata_props.extend(kept)

        return change

    path = _rewritten(src, tmp_path / "bare.onnx", drop("nodulekit_format"))
    assert _error(ex.read_metadata, path) == (
        f"{path} is not a nodulekit ONNX export (no nodulekit_format metadata); make one with `nodulekit export-onnx`"
    )
    path = _rewritten(src, tmp_path / "lacks.onnx", drop("in_channels", "arch"))
    assert _error(ex.read_metadata, path) == f"{path} lacks nodulekit metadata in_channels, arch"
    # a version-1 file still reads
    path = _rewritten(src, tmp_path / "v1.onnx", lambda p: _set(p, "nodulekit_format", "nodulekit-onnx/1"))
    assert ex.read_metadata(path)["nodulekit_format"] == "nodulekit-onnx/1"


def test_check_graph_compares_input_outputs_and_digest(made, tmp_path):
    proto = onnx.load(str(made["fold0"]))
    meta = {p.key: p.value for p in proto.metadata_props}
    here = tmp_path / "m.onnx"
    ex.check_graph(proto, meta, here)  # as exported: fine
    prefix = f"{here}: the graph does not match its nodulekit metadata: "
    assert _error(ex.check_graph, proto, {**meta, "in_channels": "3"}, here) == (
        prefix + "input x is ['batch', 11, 32, 32], the metadata says [batch, 3, 32, 32]"
    )
    assert _error(ex.check_graph, proto, {**meta, "in_channels": "eleven"}, here).startswith(prefix + "input x is ")
    assert _error(ex.check_graph, proto, {**meta, "fold": "ensemble"}, here) == (
        prefix + "outputs are ['prob', 'map', 'map_up']"
    )
    assert _error(ex.check_graph, proto, {**meta, "graph_sha256": "0" * 64}, here) == (
        prefix + "the graph was changed after export (its digest differs from graph_sha256)"
    )
    ex.check_graph(proto, {k: v for k, v in meta.items() if k != "graph_sha256"}, here)  # older files: no digest
    ens = onnx.load(str(made["ensemble"]))
    ens_meta = {p.key: p.value for p in ens.metadata_props}
    ex.check_graph(ens, ens_meta, here)
    assert _error(ex.check_graph, ens, {**ens_meta, "fold": "0"}, here) == (
        prefix + "outputs are ['prob', 'map', 'map_up', 'member_prob']"
    )


def test_doc_strings_explain_the_file(made):
    proto = onnx.load(str(made["fold0"]))
    meta = ex.read_metadata(made["fold0"])
    assert proto.doc_string == (
        f"nodulekit hesam (hesam map): {meta['task']}. {meta['intended_use']} License: {meta['license']} The "
        "metadata_props hold the whole model description (description_schema), the input spec and its arithmetic "
        "(input_spec, preprocessing), the map placement, training data and ranges, training recipe, "
        "cross-validated performance and reference vectors (test_data_set)."
    )
    assert proto.graph.doc_string == (
        f"{ex.MAP_DEFINITIONS['hesam']}. map_up: 'map' resized bilinearly (align_corners=False) to "
        "[batch, classes, 32, 32]."
    )
    (x,) = proto.graph.input
    planes = ", ".join(f"{z:+d} mm x2" for z in range(-5, 6))
    assert x.doc_string == (
        f"float32 [batch, 11, 32, 32]: one channel per axial plane (offset from the nodule centre, crop side in "
        f"diameters: {planes}), HU clipped to [-1000, 400] and scaled to [0, 1]; built as metadata "
        "'preprocessing' says"
    )
    outputs = json.loads(meta["outputs"])
    assert {o.name: o.doc_string for o in proto.graph.output} == outputs
    assert proto.producer_name == "nodulekit" and proto.model_version == int(meta["model_version"])
    # a file whose metadata has no input spec documents x with its older 'input' entry
    old = onnx.load(str(made["fold0"]))
    ex._document(old, {**meta, "input_spec": "null"})
    assert (
        old.graph.input[0].doc_string == meta["input"] == "x: float32 [batch, 11, 32, 32] built as in 'preprocessing'"
    )


def test_reference_vectors_are_checked_against_their_tolerance(made, tmp_path):
    from nodulekit.modelcard import array_record, decode_array

    diffs = ex.check_test_data_set(made["ensemble"])
    assert set(diffs) == {"prob", "map", "map_up", "member_prob"} and max(diffs.values()) <= 1e-5

    def shifted(name, by, tolerance=None):
        def change(proto):
            for p in proto.metadata_props:
                if p.key == "test_data_set":
                    ref = json.loads(p.value)
                    ref["outputs"][name] = array_record(decode_array(ref["outputs"][name]) + by)
                    if tolerance:
                        ref["tolerance"].update(tolerance)
                    p.value = json.dumps(ref)

        return change

    path = _rewritten(made["fold0"], tmp_path / "p.onnx", shifted("prob", 0.5))
    message = _error(ex.check_test_data_set, path)
    assert message == (
        f"{path}: output prob of the reference input differs from the stored one by 0.5 (tolerance 1e-05)"
    )
    # within a (stored) looser tolerance it passes: the bound is the stored one, not a constant
    path = _rewritten(made["fold0"], tmp_path / "q.onnx", shifted("prob", 2e-5, {"prob_atol": 1e-4}))
    assert ex.check_test_data_set(path)["prob"] == pytest.approx(2e-5, abs=1e-6)
    ref = json.loads(ex.read_metadata(made["fold0"])["test_data_set"])
    top = float(np.abs(decode_array(ref["outputs"]["map"])).max())
    bound = 1e-4 * top + 1e-6
    path = _rewritten(made["fold0"], tmp_path / "m.onnx", shifted("map", 2 * bound))
    assert _error(ex.check_test_data_set, path).startswith(f"{path}: output map of the reference input differs")
    path = _rewritten(made["fold0"], tmp_path / "n.onnx", shifted("map", 0.5 * bound))
    ex.check_test_data_set(path)

    def dropped(proto):
        kept = [p for p in proto.metadata_props if p.key != "test_data_set"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)

    path = _rewritten(made["fold0"], tmp_path / "none.onnx", dropped)
    assert _error(ex.check_test_data_set, path) == f"{path} carries no reference vectors (test_data_set); re-export it"


def test_stored_reference_vectors_describe_themselves(made):
    ref = json.loads(ex.read_metadata(made["fold0"])["test_data_set"])
    assert ref["format"] == (
        "arrays: base64 of little-endian float32 in C order (numpy: np.frombuffer(b64decode(data), "
        "'<f4').reshape(shape))"
    )
    assert ref["source"] == "dataset D11C (its first checked row)"
    assert ref["runtime"] == f"onnxruntime {ort.__version__} CPUExecutionProvider"
    assert ref["tolerance"] == {"prob_atol": 1e-5, "map_rtol": 1e-4, "map_atol_floor": 1e-6}
    assert list(ref["inputs"]) == ["x"] and list(ref["outputs"]) == ["prob", "map", "map_up"]
    from nodulekit.modelcard import decode_array

    np.testing.assert_array_equal(decode_array(ref["inputs"]["x"]), made["ds"].x[:1])  # the first checked row
    verification = json.loads(ex.read_metadata(made["fold0"])["verification"])
    assert verification["inputs"] == "dataset D11C rows [0, 3, 5, 8, 11, 14, 16, 19]"  # 8 rows spread over 20
    assert verification["runtime"] == "onnxruntime CPUExecutionProvider"
    assert (verification["prob_atol"], verification["map_rtol"]) == (1e-4, 1e-4)
    for label in ("batch1", "batch8"):
        d = verification[label]
        assert d["prob_tol"] == 1e-4 and d["map_tol"] == pytest.approx(1e-4 * d["map_scale"] + 1e-6)


# ----------------------------------------------------------------------------- loading and checks


def test_compare_outputs_takes_the_largest_differences():
    ref = (
        np.array([[0.2, 0.8]]),
        np.array([[[[1.0, -3.0]]]]),
        np.array([[[[2.0, 0.5]]]]),
        np.array([[0.7, 0.9]]),
    )
    got = (ref[0] + 0.01, ref[1] + np.array([0.0, 0.25]), ref[2] - 0.125, ref[3] + np.array([0.0, 0.05]))
    d = ex.compare_outputs(got, ref)
    assert d["prob_max_abs_diff"] == pytest.approx(0.05)  # member_prob counts as a probability
    assert d["map_max_abs_diff"] == 0.25 and d["map_scale"] == 3.0
    assert d["map_tol"] == pytest.approx(3e-4 + 1e-6) and d["prob_tol"] == 1e-4
    assert ex.compare_outputs(got[:3], ref[:3])["prob_max_abs_diff"] == pytest.approx(0.01)


def test_model_sources_and_their_refusals(made, tmp_path):
    import shutil

    rundir = made["rundir"]
    src = ex.load_model_source(rundir, 1)
    assert (src.fold, src.epoch, src.source) == (1, 1, "fold1/checkpoint.pt of a nodulekit RUNDIR")
    assert src.info() == [{"fold": 1, "epoch": 1}] and src.models == [src.model] and not src.ensemble
    assert ex.load_model_source(rundir).fold == 0
    assert _error(ex.load_model_source, rundir, 5) == f"{rundir} has no trained fold 5 (found: fold0, fold1)"
    assert _error(ex.load_model_source, tmp_path / "x") == f"{tmp_path / 'x'} does not exist"
    # a checkpoint copied out of its RUNDIR keeps its provenance from the checkpoint itself
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(rundir / "fold1" / "checkpoint.pt", loose / "checkpoint.pt")
    src = ex.load_model_source(loose / "checkpoint.pt")
    assert (src.fold, src.source) == (1, "checkpoint file checkpoint.pt")
    run = json.loads((rundir / "run.json").read_text())
    for key in ("label_rule", "normalisation", "dataset_identity"):
        assert src.run[key] == run[key], key
    # a loose checkpoint that does not record its fold takes it from its folder's name
    ckpt = torch.load(rundir / "fold1" / "checkpoint.pt", weights_only=False)
    del ckpt["fold"]
    (tmp_path / "fold7").mkdir()
    torch.save(ckpt, tmp_path / "fold7" / "checkpoint.pt")
    assert ex.load_model_source(tmp_path / "fold7" / "checkpoint.pt").fold == 7
    inside = ex.load_model_source(rundir / "fold1" / "checkpoint.pt")
    assert (inside.fold, inside.rundir) == (1, rundir)
    ens = ex.load_ensemble_source(rundir)
    assert ens.ensemble and ens.info() == [{"fold": 0, "epoch": 1}, {"fold": 1, "epoch": 1}]
    assert ens.source == "all 2 fold models of a nodulekit RUNDIR (mean of their probabilities and maps)"
    assert _error(ex._identified, ex.ModelSource(src.model, "a checkpoint file x.pt", run={})) == (
        "a checkpoint file x.pt records no dataset identity (trained before fold assignments were part of it), "
        "so the data it was trained on cannot be checked; re-train it with this version"
    )


def test_export_argument_refusals(made, tmp_path):
    src = ex.load_model_source(made["rundir"], 0)
    out = tmp_path / "m.onnx"
    assert _error(ex.export_onnx, src, out, exporter="jit") == "unknown exporter 'jit' (choose dynamo or torchscript)"
    for opset in (12, 24):
        assert _error(ex.export_onnx, src, out, opset=opset) == f"opset {opset} not supported (use 13..23; default 18)"
    assert not out.exists()
    plain = type("Plain", (torch.nn.Module,), {"map_kind": None, "arch": "gradcam-only"})()
    assert _error(ex.check_exportable, plain) == (
        "model 'gradcam-only' has no map-defining head (map_kind None): its only map is Grad-CAM, which needs "
        "gradients and cannot live in an ONNX inference graph; export a cam, sam or hesam model"
    )
    odd = type("Odd", (torch.nn.Module,), {"map_kind": "lime"})()
    assert _error(ex.check_exportable, odd) == "model map_kind 'lime' is not one of cam, sam, hesam"
    nameless = type("Nameless", (torch.nn.Module,), {"map_kind": None})()
    assert _error(ex.check_exportable, nameless).startswith("model 'Nameless' has no map-defining head")
    wrapper = type("Wrapper", (), {"ensemble": False})()
    assert (
        _error(ex._torch_export, wrapper, None, out, 18, "jit")
        == "unknown exporter 'jit' (choose dynamo or torchscript)"
    )


def test_model_version_is_the_runs_creation_time_in_utc():
    assert ex.default_model_version({"created": "2024-03-05T23:30:15+02:00"}) == 20240305213015
    assert ex.default_model_version({"created": "2024-03-05T23:30:15+00:00"}) == 20240305233015
    from datetime import UTC, datetime

    before = int(datetime.now(UTC).strftime("%Y%m%d%H%M%S"))
    now = ex.default_model_version({"created": "not a time"})
    assert before <= now <= int(datetime.now(UTC).strftime("%Y%m%d%H%M%S"))
    assert before <= ex.default_model_version(None) <= int(datetime.now(UTC).strftime("%Y%m%d%H%M%S"))


def test_inputs_of_another_spec_or_channel_count_are_refused(made, tmp_path):
    meta = ex.read_metadata(made["fold0"])
    ds = made["ds"]
    assert _error(ex._check_inputs_match, {**meta, "in_channels": "3"}, ds, "m.onnx") == (
        f"channel mismatch: m.onnx expects 3 channels, {ds.path} has 11"
    )
    spec = json.loads(meta["input_spec"])
    wider = {**meta, "input_spec": json.dumps({**spec, "hu_window": [-1200.0, 600.0]})}
    assert _error(ex._check_inputs_match, wider, ds, "m.onnx").startswith(f"input spec mismatch: m.onnx vs {ds.path}: ")
    # older files: the spec from the preprocessing's channel layout (unreadable JSON: the paper's)
    old = {k: v for k, v in meta.items() if k != "input_spec"}
    assert ex.metadata_spec(old, "m.onnx").as_dict() == spec
    assert ex.metadata_spec({**old, "preprocessing": "{broken"}, "m.onnx").as_dict() == spec


def test_checks_at_export_run_on_the_cpu_provider(made, monkeypatch):
    """The reference vectors and the PyTorch comparison are made on ONNX Runtime's CPU provider, whatever
    else is installed (a GPU provider's numbers would differ by more than the stored tolerance)."""
    asked = []
    real = ex.ort_session

    def spy(path, providers, options=None):
        asked.append(list(providers))
        return real(path, providers, options)

    monkeypatch.setattr(ex, "ort_session", spy)
    x = made["ds"].x[:2]
    src = ex.load_model_source(made["rundir"], 0)
    ref = ex.make_test_data_set(made["fold0"], x[:1], "dataset D11C rows [0, 1]", False)
    assert ref["source"] == "dataset D11C (its first checked row)"
    assert ex.make_test_data_set(made["fold0"], x[:1], "uniform [0,1) seed 3", False)["source"] == (
        "uniform [0,1) seed 3"
    )
    ex.verify_against_torch(made["fold0"], src.model, x)
    ex.check_test_data_set(made["fold0"])
    assert asked == [["CPUExecutionProvider"]] * 4


def test_export_inputs_from_the_dataset_or_seeded_uniform(made, tmp_path):
    src = ex.load_model_source(made["rundir"], 0)
    x, desc = ex._export_inputs(src, 11, 3, seed=0)
    assert desc == "dataset D11C rows [0, 10, 19]"  # spread over the 20 rows, ends included
    np.testing.assert_array_equal(x, made["ds"].x[[0, 10, 19]])
    x, desc = ex._export_inputs(src, 11, 50, seed=0)
    assert desc == f"dataset D11C rows {list(range(20))}" and len(x) == 20  # no more rows than it has
    # the dataset is elsewhere: seeded uniform inputs, the seed named
    gone = ex.ModelSource(src.model, "s", run={**src.run, "dataset": {**src.run["dataset"], "path": str(tmp_path)}})
    x, desc = ex._export_inputs(gone, 11, 4, seed=7)
    assert desc == "uniform [0,1) seed 7"
    np.testing.assert_array_equal(x, np.random.default_rng(7).random((4, 11, 32, 32), dtype=np.float32))


def test_a_bare_model_is_checked_on_seeded_uniform_inputs(tmp_path, monkeypatch):
    """No RUNDIR, no dataset: the check inputs are uniform [0, 1) from seed 0 (the default), said in the file."""
    from nodulekit.models import create_model

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: op foo\nlong exporter trace")

    with monkeypatch.context() as m:  # an exporter failure is one line naming the exporter and the model
        m.setattr(ex, "_torch_export", broken)
        assert _error(ex.export_onnx, create_model("hesam", 3, base_width=4), tmp_path / "x.onnx") == (
            "torch.onnx.export (dynamo) failed for hesam: Unsupported: op foo"
        )
    assert not (tmp_path / "x.onnx").exists()

    torch.manual_seed(0)
    meta = ex.export_onnx(create_model("hesam", 3, base_width=4), tmp_path / "m.onnx", exporter="torchscript")
    assert json.loads(meta["verification"])["inputs"] == "uniform [0,1) seed 0"
    assert meta["source"] == "in-memory UNetClassifier" and meta["fold"] == meta["epoch"] == "unknown"
    assert meta["label_rule"] == meta["normalisation"] == meta["dataset_fingerprint"] == "unknown"
