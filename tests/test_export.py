"""ONNX export with the soft activation map, ONNX Runtime inference, and their bad inputs."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nodulekit import export as ex  # noqa: E402
from nodulekit.errors import NodulekitError  # noqa: E402
from tests.conftest import write_tiny_dataset  # noqa: E402

torch.set_num_threads(1)

# docs/export.md, "Verification": fixed here, not read from nodulekit.export, so a loosened
# tolerance in the module is caught.
PROB_TOL = 1e-4  # max |ORT - PyTorch| of the probabilities
MAP_RTOL, MAP_FLOOR = 1e-4, 1e-6  # maps: 1e-4 x max |M| + 1e-6

# docs/export.md, "Metadata (metadata_props)": every key an exported file carries, no more.
DOCUMENTED_METADATA = {
    "nodulekit_format",
    "nodulekit_version",
    "torch_version",
    "exporter",
    "arch",
    "model_config",
    "in_channels",
    "num_classes",
    "class_names",
    "input",
    "outputs",
    "map_kind",
    "map_definition",
    "normalisation",
    "label_rule",
    "dataset_name",
    "dataset_fingerprint",
    "dataset_identity",
    "fold",
    "epoch",
    "source",
    "training_recipe",
    "verification",
    "graph_sha256",
    "description_schema",
    "task",
    "intended_use",
    "preprocessing",
    "network_data_format",
    "decision",
    "training_data",
    "members",
    "model_version",
    "license",
    "citation",
    "data_attribution",
    "input_spec",
    "map_placement",
    "performance",
    "test_data_set",
}


def _model(name: str, channels: int = 3, **options):
    from nodulekit.models import create_model

    torch.manual_seed(0)
    model = create_model(name, channels, **options).eval()
    # Non-trivial BN statistics so eval-mode batch norm is really exercised by the export.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def _meta(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _own_map(model, x: np.ndarray) -> np.ndarray:
    """M_c = sum_k gamma_k^c g_k from the model's features and classifier weights, outside the wrapper."""
    with torch.no_grad():
        g = model.forward_features(torch.as_tensor(x))["features"]
        return torch.einsum("ck,bkhw->bchw", model.head.gamma, g).numpy()


def _own_prob(models, x: np.ndarray) -> np.ndarray:
    """Softmax of each model's own forward, averaged over the models (an ensemble's mean)."""
    with torch.no_grad():
        return np.mean([torch.softmax(m(torch.as_tensor(x)), dim=1).numpy() for m in models], axis=0)


def _resize_half_pixel(maps: np.ndarray, size: int = 32) -> np.ndarray:
    """Bilinear resize of [..., h, w] with half-pixel centres (align_corners=False), written out."""
    out = maps.astype(np.float64)
    for axis in (-2, -1):
        n = out.shape[axis]
        s = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(s).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (s - lo).reshape([-1] + [1] * (-axis - 1))
        out = (1 - w) * np.take(out, lo, axis=axis) + w * np.take(out, hi, axis=axis)
    return out


def _expected(models, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(prob, map, map_up, map tolerance) computed without the export wrapper."""
    own = np.mean([_own_map(m, x) for m in models], axis=0)
    return _own_prob(models, x), own, _resize_half_pixel(own), MAP_RTOL * np.abs(own).max() + MAP_FLOOR


def _assert_matches(path, model, batches=(1, 5), seed=1):
    from nodulekit.maps import upsample

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for b in batches:
        x = rng.random((b, model.in_channels, 32, 32), dtype=np.float32)
        prob, m, mu = sess.run(None, {"x": x})
        rp, rm, rmu, tol = _expected([model], x)
        assert prob.shape == (b, 2) and m.shape == (b, 2, 16, 16) and mu.shape == (b, 2, 32, 32)
        np.testing.assert_allclose(prob.sum(1), 1, atol=1e-6)
        np.testing.assert_allclose(prob, rp, atol=PROB_TOL, rtol=0)
        assert np.abs(m - rm).max() <= tol, "the exported map is not the model's own sum_k gamma_k g_k"
        assert np.abs(mu - rmu).max() <= tol, "map_up is not the half-pixel bilinear resize of the map"
        # map_up is the resize `nodulekit maps` uses (docs/export.md): maps.upsample of the map
        np.testing.assert_allclose(mu, upsample(m), rtol=0, atol=1e-5 * np.abs(m).max())
        assert np.abs(rm).max() > 0, "degenerate all-zero map would make the check vacuous"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """One HESAM (3 channels, base_width 8) exported with the default (dynamo) exporter, shared below."""
    model = _model("hesam", 3, base_width=8)
    path = tmp_path_factory.mktemp("onnx") / "hesam.onnx"
    meta = ex.export_onnx(model, path)
    return model, path, meta


def test_hesam_export_matches_torch_and_has_metadata(tiny_export):
    model, path, meta = tiny_export
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "export must be one file, no external data"
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["prob", "map", "map_up"]
    stored = _meta(path)
    assert set(stored) == DOCUMENTED_METADATA
    verification = json.loads(stored["verification"])
    assert verification["prob_atol"] == PROB_TOL and verification["map_rtol"] == MAP_RTOL
    assert (
        stored["nodulekit_format"] == "nodulekit-onnx/2" and stored["arch"] == "hesam" and stored["in_channels"] == "3"
    )
    assert stored["map_kind"] == "hesam" and json.loads(stored["model_config"])["base_width"] == 8
    assert stored == meta
    _assert_matches(path, model, batches=(1, 5, 17))  # 17: a batch size never seen at export


@pytest.mark.parametrize("name", ["sam", "cam"])
def test_sam_cam_export_match_torch(name, tmp_path):
    # The legacy exporter here keeps the suite fast; the dynamo path is covered by the HESAM export.
    model = _model(name, 3, base_width=8)
    meta = ex.export_onnx(model, tmp_path / f"{name}.onnx", exporter="torchscript")
    assert meta["map_kind"] == name
    _assert_matches(tmp_path / f"{name}.onnx", model)


def test_export_refuses_existing_and_plain_models(tiny_export, tmp_path):
    model, path, _ = tiny_export
    with pytest.raises(NodulekitError, match="already exists"):
        ex.export_onnx(model, path)
    with pytest.raises(NodulekitError, match="Grad-CAM"):
        ex.export_onnx(_model("resnet18", 3), tmp_path / "plain.onnx")
    with pytest.raises(NodulekitError, match="opset"):
        ex.export_onnx(model, tmp_path / "o.onnx", opset=7)
    assert list(tmp_path.iterdir()) == []


def test_documented_metadata_keys_are_the_docs_list():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    section = text.split("### Metadata (`metadata_props`)")[1].split("###")[0]
    for key in DOCUMENTED_METADATA:
        assert f"`{key}`" in section, key


@pytest.mark.parametrize("what", ["map", "prob"])
def test_mismatch_removes_file(tmp_path, monkeypatch, what):
    """A graph that disagrees with PyTorch (by 0.01 in a probability, or 1 % of the map's
    scale) is refused and leaves nothing behind."""
    model = _model("cam", 3, base_width=8)
    real = ex.reference_outputs

    def skewed(m, x, tta=False):
        p, a, b = real(m, x, tta)
        if what == "prob":
            return p + np.array([-0.01, 0.01], np.float32), a, b
        return p, a + 0.01 * (np.abs(a).max() + 1), b

    monkeypatch.setattr(ex, "reference_outputs", skewed)
    with pytest.raises(NodulekitError, match="disagrees with PyTorch"):
        ex.export_onnx(model, tmp_path / "bad.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_differences_within_the_documented_tolerance_are_accepted(tmp_path, monkeypatch):
    """Half the tolerance in the probabilities, and in maps of a large scale half of 1e-4 x
    their scale (far more than 1e-4 in absolute terms), pass."""
    model = _model("cam", 3, base_width=8)
    with torch.no_grad():
        model.head.fc.weight.mul_(200.0)  # maps of scale >> 1: a relative bound differs from an absolute one
    real = ex.reference_outputs

    def nudged(m, x, tta=False):
        p, a, b = real(m, x, tta)
        scale = max(np.abs(a).max(), np.abs(b).max())
        return p + np.array([-PROB_TOL / 2, PROB_TOL / 2], np.float32), a + MAP_RTOL / 2 * scale, b

    monkeypatch.setattr(ex, "reference_outputs", nudged)
    meta = ex.export_onnx(model, tmp_path / "ok.onnx", exporter="torchscript")
    report = json.loads(meta["verification"])["batch1"]
    assert PROB_TOL / 4 < report["prob_max_abs_diff"] <= PROB_TOL
    assert report["map_scale"] > 10 and report["map_max_abs_diff"] > 4 * MAP_RTOL


def test_infer_writes_maps_equal_to_torch(tiny_export, tmp_path):
    from nodulekit.artifacts import open_artifact, read_strings

    model, path, _ = tiny_export
    ds = write_tiny_dataset(tmp_path / "d3.h5", n=12, channels=3)
    out = tmp_path / "preds.h5"
    summary = ex.infer(path, ds, out, provider="cpu", batch=5)
    assert summary["provider"] == "cpu" and summary["n"] == 12
    with h5py.File(ds, "r") as f:
        x, y, ids = f["x"][()], f["y"][()], read_strings(f["nodule_id"])
    rp, rm, rmu, tol = _expected([model], x)
    with open_artifact(out, "maps") as f:
        assert read_strings(f["nodule_id"]) == ids
        np.testing.assert_array_equal(f["y"][()], y)
        np.testing.assert_allclose(f["prob"][()], rp[:, 1], atol=PROB_TOL)
        assert f["maps"].shape == (12, 2, 16, 16) and f["maps_up"].shape == (12, 2, 32, 32)
        assert np.abs(f["maps"][()] - rm).max() <= tol and np.abs(f["maps_up"][()] - rmu).max() <= tol
        assert f.attrs["method"] == "hesam" and f.attrs["arch"] == "hesam"
        assert json.loads(f.attrs["provenance"])["provider"] == "cpu"
    with pytest.raises(NodulekitError, match="already exists"):
        ex.infer(path, ds, out, provider="cpu")


def test_iobinding_path_matches_plain_run(tiny_export):
    """The IO-binding branch used on GPU providers gives the same numbers (exercised on CPU)."""
    _, path, _ = tiny_export
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((7, 3, 32, 32), dtype=np.float32)
    plain = ex.run_session(sess, x, batch=3)
    bound = ex.run_session(sess, x, batch=3, binding_device="cpu")
    for a, b in zip(plain, bound, strict=True):
        np.testing.assert_array_equal(a, b)


def test_infer_bad_inputs(tiny_export, tmp_path):
    _, path, _ = tiny_export
    ds11 = write_tiny_dataset(tmp_path / "d11.h5", n=4, channels=11)
    with pytest.raises(NodulekitError, match="channel mismatch: .* expects 3 channels, .* has 11"):
        ex.infer(path, ds11, tmp_path / "a.h5", provider="cpu")
    ds3 = write_tiny_dataset(tmp_path / "d3.h5", n=4, channels=3)
    missing = [p for p in ("cuda", "tensorrt") if ex.PROVIDERS[p] not in ort.get_available_providers()]
    for p in missing:
        with pytest.raises(NodulekitError, match=f"provider {p} is not available"):
            ex.infer(path, ds3, tmp_path / "b.h5", provider=p)
    with pytest.raises(NodulekitError, match="unknown provider"):
        ex.infer(path, ds3, tmp_path / "b.h5", provider="tpu")
    # A valid ONNX file without nodulekit metadata.
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(NodulekitError, match="not a nodulekit ONNX export"):
        ex.infer(foreign, ds3, tmp_path / "c.h5")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(NodulekitError, match="not an ONNX model"):
        ex.infer(junk, ds3, tmp_path / "c.h5")
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists() and not (tmp_path / "c.h5").exists()


def test_auto_provider_reports_what_ran(tiny_export):
    _, path, _ = tiny_export
    session, ran, note = ex.make_session(path, "auto")
    assert ran in ex.PROVIDERS
    assert ex.PROVIDERS[ran] == session.get_providers()[0]
    assert f"running on {ran}" in note


def test_cli_infer_and_one_line_errors(tiny_export, tmp_path, nodulekit_cli):
    _, path, _ = tiny_export
    ds = write_tiny_dataset(tmp_path / "d3.h5", n=6, channels=3)
    out = tmp_path / "p.h5"
    r = nodulekit_cli("infer", path, ds, "-o", out, "--provider", "cpu", "--batch", "4")
    assert r.returncode == 0, r.stderr
    assert "6 nodules on cpu" in r.stdout and out.exists()
    r = nodulekit_cli("infer", path, ds, "-o", out, "--provider", "cpu")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr
    assert "Traceback" not in r.stderr
    r = nodulekit_cli("export-onnx", tmp_path / "nope", "-o", tmp_path / "m.onnx")
    assert r.returncode == 2 and r.stderr.strip() == f"nodulekit: error: {tmp_path / 'nope'} does not exist"


def test_export_trained_rundir_via_cli(tmp_path, nodulekit_cli):
    """A tiny trained RUNDIR: export-onnx reads run.json, checks on the run's own data, infer = PyTorch maps."""
    from nodulekit.artifacts import open_artifact
    from nodulekit.training import TrainConfig, load_fold_model, train

    ds = write_tiny_dataset(tmp_path / "d3.h5", n=20, channels=3, folds=2)
    rundir = tmp_path / "run"
    cfg = TrainConfig(arch="hesam", model_options={"base_width": 8}, epochs=1, batch_size=8, device="cpu", seed=0)
    train(ds, rundir, cfg, folds=[1], progress=False)
    run = json.loads((rundir / "run.json").read_text())
    out = tmp_path / "fold1.onnx"
    r = nodulekit_cli("export-onnx", rundir, "--fold", "1", "-o", out, "--exporter", "torchscript")
    assert r.returncode == 0, r.stderr
    assert "fold 1" in r.stdout and out.exists()
    meta = _meta(out)
    assert meta["fold"] == "1" and meta["arch"] == "hesam" and meta["epoch"] != "unknown"
    assert meta["dataset_fingerprint"] == run["dataset_fingerprint"] != "unknown"
    assert json.loads(meta["label_rule"]) == run["label_rule"]
    assert json.loads(meta["normalisation"]) == run["normalisation"]
    assert json.loads(meta["verification"])["inputs"].startswith("dataset ")  # real inputs, not random
    # A checkpoint copied out of its RUNDIR still carries its provenance.
    import shutil

    lone = tmp_path / "lone.pt"
    shutil.copy(rundir / "fold1" / "checkpoint.pt", lone)
    src = ex.load_model_source(lone)
    assert src.run["dataset_fingerprint"] == run["dataset_fingerprint"] and src.run["label_rule"] == run["label_rule"]
    assert src.model.arch == "hesam" and src.model.config["base_width"] == 8
    r = nodulekit_cli("export-onnx", rundir, "--fold", "0", "-o", tmp_path / "f0.onnx")
    assert r.returncode == 2 and "fold 0" in r.stderr and not (tmp_path / "f0.onnx").exists()

    preds = tmp_path / "preds.h5"
    ex.infer(out, ds, preds, provider="cpu", batch=7)
    model, _ = load_fold_model(rundir, 1)
    with h5py.File(ds, "r") as f:
        x = f["x"][()]
    rp, rm, _, tol = _expected([model], x)
    with open_artifact(preds, "maps") as f:
        np.testing.assert_allclose(f["prob"][()], rp[:, 1], atol=PROB_TOL)
        assert np.abs(f["maps"][()] - rm).max() <= tol
        np.testing.assert_array_equal(f["fold"][()], 1)
        with h5py.File(ds, "r") as d:
            np.testing.assert_array_equal(f["dataset_fold"][()], d["fold"][()])
    # The same data under another normalisation is refused, not silently mis-scaled.
    from nodulekit.artifacts import set_json_attr

    with h5py.File(ds, "a") as f:
        set_json_attr(f, "normalisation", {"hu_window": [-1200.0, 600.0], "scale": "linear to [0, 1]"})
    with pytest.raises(
        NodulekitError, match=r"input spec mismatch: .* hu_window \[-1000, 400\] HU vs \[-1200, 600\] HU"
    ):
        ex.infer(out, ds, tmp_path / "other.h5", provider="cpu")
    # A dataset whose spec records other planes (numbers, not prose, decide): one line, exit 2, nothing written.
    from nodulekit.inputs import paper_spec

    spec = paper_spec(3).as_dict()
    spec["channels"][2]["p"] = 3.5
    with h5py.File(ds, "a") as f:
        set_json_attr(f, "normalisation", {"hu_window": [-1000.0, 400.0], "reworded": "any prose"})
        set_json_attr(f, "input_spec", spec)
    r = nodulekit_cli("infer", out, ds, "-o", tmp_path / "other.h5", "--provider", "cpu")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "channel 2 is the plane at +0 mm with a 4 x diameter crop vs +0 mm with 3.5 x diameter" in r.stderr
    assert not (tmp_path / "other.h5").exists()
    # Reworded prose alone changes nothing: the numbers match.
    spec["channels"][2]["p"] = 4.0
    with h5py.File(ds, "a") as f:
        set_json_attr(f, "input_spec", spec)
    assert ex.infer(out, ds, tmp_path / "other.h5", provider="cpu")["n"] == 20
