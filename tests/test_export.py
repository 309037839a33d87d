"""ONNX export with the soft activation map, ONNX Runtime inference, and their bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nodulekit.errors import NodulekitError  # noqa: E402
from nodulekit import export as ex  # noqa: E402
from tests.conftest import write_tiny_dataset  # noqa: E402

torch.set_num_threads(1)


class TinySAM(torch.nn.Module):
    """Stand-in with the NoduleClassifier interface: conv features on a 16x16 grid, SAM-style head."""

    arch = "tiny-sam"
    map_kind = "sam"

    def __init__(self, in_channels: int = 3, num_classes: int = 2, k: int = 4):
        super().__init__()
        self.in_channels, self.num_classes, self.config = in_channels, num_classes, {"k": k}
        self.conv = torch.nn.Conv2d(in_channels, k, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(k)
        self.pool = torch.nn.AvgPool2d(5, stride=2)
        self.h = torch.nn.Parameter(torch.randn(k, 36) * 0.1)  # one FC neuron per feature map (Eq. 6)
        self.fc = torch.nn.Linear(k, num_classes)
        self.feature_layer = self.bn

    def forward_features(self, x):
        g = torch.relu(self.bn(self.conv(x)))
        H = (self.pool(g).flatten(2) * self.h).sum(-1)
        return {"logits": self.fc(H), "features": g, "high_level": None}

    def forward(self, x):
        return self.forward_features(x)["logits"]

    def activation_map(self, x):
        out = self.forward_features(x)
        return out["logits"], torch.einsum("ck,bkhw->bchw", self.fc.weight, out["features"])


class Plain(TinySAM):
    map_kind = None

    def activation_map(self, x):
        raise NodulekitError("no map")


def _registry_model(name: str, channels: int):
    """A real registered model when the models stage has landed, else skip."""
    try:
        from nodulekit.models import available_models, create_model
    except ImportError as exc:
        pytest.skip(f"nodulekit.models not importable yet ({exc})")
    if name not in available_models():
        pytest.skip(f"model {name!r} not registered yet")
    torch.manual_seed(0)
    return create_model(name, channels).eval()


def _meta(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """One exported TinySAM (3 channels) shared by the inference tests."""
    torch.manual_seed(0)
    model = TinySAM(3).eval()
    # Non-trivial BN statistics so eval-mode folding is exercised.
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    meta = ex.export_onnx(model, path)
    return model, path, meta


def test_tiny_export_matches_torch_and_has_metadata(tiny_export):
    model, path, meta = tiny_export
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not list(path.parent.glob("*.data")), "export must be one file, no external data"
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["prob", "map", "map_up"]
    stored = _meta(path)
    for key in ("arch", "in_channels", "normalisation", "label_rule", "dataset_fingerprint",
                "nodulekit_version", "fold", "map_definition", "map_kind", "verification"):
        assert key in stored, key
    assert stored["nodulekit_format"] == ex.FORMAT and stored["arch"] == "tiny-sam" and stored["in_channels"] == "3"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for b in (1, 5, 17):  # dynamic batch, including sizes never seen at export
        x = rng.random((b, 3, 32, 32), dtype=np.float32)
        prob, m, mu = sess.run(None, {"x": x})
        rp, rm, rmu = ex.reference_outputs(model, x)
        assert prob.shape == (b, 2) and m.shape == (b, 2, 16, 16) and mu.shape == (b, 2, 32, 32)
        np.testing.assert_allclose(prob.sum(1), 1, atol=1e-6)
        np.testing.assert_allclose(prob, rp, atol=ex.PROB_ATOL, rtol=0)
        scale = np.abs(rm).max()
        assert np.abs(m - rm).max() <= ex.MAP_RTOL * scale + ex.MAP_ATOL_FLOOR
        assert np.abs(mu - rmu).max() <= ex.MAP_RTOL * scale + ex.MAP_ATOL_FLOOR
    # The in-graph map is the model's own: M_c = sum_k w_ck g_k, checked independently of the wrapper.
    x = torch.as_tensor(rng.random((2, 3, 32, 32), dtype=np.float32))
    with torch.no_grad():
        g = model.forward_features(x)["features"]
        own = torch.einsum("ck,bkhw->bchw", model.fc.weight, g).numpy()
    np.testing.assert_allclose(sess.run(["map"], {"x": x.numpy()})[0], own, rtol=1e-4, atol=1e-5)


def test_export_refuses_existing_and_plain_models(tiny_export, tmp_path):
    _, path, _ = tiny_export
    with pytest.raises(NodulekitError, match="already exists"):
        ex.export_onnx(TinySAM(3), path)
    with pytest.raises(NodulekitError, match="Grad-CAM"):
        ex.export_onnx(Plain(3), tmp_path / "plain.onnx")
    assert not (tmp_path / "plain.onnx").exists()
    with pytest.raises(NodulekitError, match="opset"):
        ex.export_onnx(TinySAM(3), tmp_path / "o.onnx", opset=7)


def test_mismatch_removes_file(tmp_path, monkeypatch):
    """A graph that disagrees with PyTorch is refused and leaves nothing behind."""
    model = TinySAM(3).eval()
    real = ex.reference_outputs

    def skewed(m, x):
        p, a, b = real(m, x)
        return p, a + 0.01 * (np.abs(a).max() + 1), b
    monkeypatch.setattr(ex, "reference_outputs", skewed)
    with pytest.raises(NodulekitError, match="disagrees with PyTorch"):
        ex.export_onnx(model, tmp_path / "bad.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_infer_writes_maps_equal_to_torch(tiny_export, tmp_path):
    from nodulekit.artifacts import open_artifact, read_strings

    model, path, _ = tiny_export
    ds = write_tiny_dataset(tmp_path / "d3.h5", n=12, channels=3)
    out = tmp_path / "preds.h5"
    summary = ex.infer(path, ds, out, provider="cpu", batch=5)
    assert summary["provider"] == "cpu" and summary["n"] == 12
    with h5py.File(ds, "r") as f:
        x, y, ids = f["x"][()], f["y"][()], read_strings(f["nodule_id"])
    rp, rm, rmu = ex.reference_outputs(model, x)
    with open_artifact(out, "maps") as f:
        assert read_strings(f["nodule_id"]) == ids
        np.testing.assert_array_equal(f["y"][()], y)
        np.testing.assert_allclose(f["prob"][()], rp[:, 1], atol=ex.PROB_ATOL)
        tol = ex.MAP_RTOL * np.abs(rm).max() + ex.MAP_ATOL_FLOOR
        assert f["maps"].shape == (12, 2, 16, 16) and f["maps_up"].shape == (12, 2, 32, 32)
        assert np.abs(f["maps"][()] - rm).max() <= tol and np.abs(f["maps_up"][()] - rmu).max() <= tol
        assert f.attrs["method"] == "sam" and f.attrs["arch"] == "tiny-sam"
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
    for a, b in zip(plain, bound):
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


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nodulekit", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_infer_and_one_line_errors(tiny_export, tmp_path):
    _, path, _ = tiny_export
    ds = write_tiny_dataset(tmp_path / "d3.h5", n=6, channels=3)
    out = tmp_path / "p.h5"
    r = _cli("infer", path, ds, "-o", out, "--provider", "cpu", "--batch", "4")
    assert r.returncode == 0, r.stderr
    assert "6 nodules on cpu" in r.stdout and out.exists()
    r = _cli("infer", path, ds, "-o", out, "--provider", "cpu")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("export-onnx", tmp_path / "nope", "-o", tmp_path / "m.onnx")
    assert r.returncode == 2 and r.stderr.strip() == f"nodulekit: error: {tmp_path / 'nope'} does not exist"
