"""Activation-map methods (CAM, Grad-CAM, SAM, HESAM) and their application to a RUNDIR."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from nodulekit import maps as M
from nodulekit.errors import NodulekitError
from nodulekit.run import Run

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A hand-written NoduleClassifier: conv body -> g [B, K, 8, 8] -> head.

    ``head="cam"``: logits = W GAP(g) + b (Eq. 1); ``"sam"``: logits = gamma H + b with
    H_k = beta . AvgPool(g_k) (Eq. 8-10); ``"hesam"``: gamma (H + d) + b (Eq. 12), d = GMP
    of the first conv; ``None``: a plain FC classifier (no map of its own).
    """

    def __init__(self, channels: int = 3, k: int = 4, head: str | None = "cam", high_level: bool = False):
        super().__init__()
        self.arch, self.in_channels, self.num_classes = f"tiny-{head}", channels, 2
        self.config = {"head": head}
        self.map_kind = head
        self.conv1 = nn.Sequential(nn.Conv2d(channels, k, 3, padding=1), nn.BatchNorm2d(k), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(k, k, 3, stride=4, padding=1), nn.BatchNorm2d(k), nn.ReLU())
        self.feature_layer = self.body
        self.use_high = high_level or head == "hesam"
        self.pool = nn.AvgPool2d(5, stride=2)  # 8x8 -> 2x2 minor features
        self.beta = nn.Parameter(torch.randn(4) * 0.5)
        self.fc = nn.Linear(k, 2) if head is not None else nn.Linear(k * 64, 2)

    def forward_features(self, x):
        h = self.conv1(x)
        g = self.body(h)
        d = h.amax(dim=(2, 3)) if self.use_high else None
        if self.map_kind is None:
            logits = self.fc(g.flatten(1))
        else:
            pooled = g.mean(dim=(2, 3)) if self.map_kind == "cam" else (self.pool(g).flatten(2) * self.beta).sum(-1)
            logits = self.fc(pooled + (d if d is not None else 0))
        return {"logits": logits, "features": g, "high_level": d}

    def forward(self, x):
        return self.forward_features(x)["logits"]

    def activation_map(self, x):
        if self.map_kind is None:
            raise NodulekitError("no map")
        out = self.forward_features(x)
        return out["logits"], torch.einsum("ck,bkhw->bchw", self.fc.weight, out["features"])


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, model.in_channels, 32, 32))
    return model.eval()


@pytest.fixture
def x():
    return np.random.default_rng(0).random((10, 3, 32, 32), dtype=np.float32)


def reference_gradcam(model, x, c):
    """Grad-CAM one image at a time, by autograd through the model's own pieces."""
    out = []
    for i in range(len(x)):
        xi = torch.from_numpy(x[i : i + 1])
        g = model.body(model.conv1(xi)).detach().requires_grad_(True)
        d = model.conv1(xi).amax(dim=(2, 3)) if model.use_high else 0
        if model.map_kind is None:
            logit = model.fc(g.flatten(1))[0, c]
        else:
            logit = model.fc(g.mean(dim=(2, 3)) + d)[0, c]
        (grad,) = torch.autograd.grad(logit, g)
        alpha = grad.mean(dim=(2, 3))[0]
        out.append(torch.relu((alpha[:, None, None] * g[0]).sum(0)).detach().numpy())
    return np.stack(out)


@pytest.mark.parametrize("head", [None, "cam"])
def test_gradcam_equals_per_image_autograd_reference(head, x):
    torch.manual_seed(1)
    model = trained_like(TinyNet(head=head))
    out = M.compute_maps(model, x, "gradcam", batch_size=4, device="cpu")
    assert out["maps"].shape == (10, 2, 8, 8)
    for c in (0, 1):
        np.testing.assert_allclose(out["maps"][:, c], reference_gradcam(model, x, c), rtol=1e-4, atol=1e-6)
    assert (out["maps"] >= 0).all() and out["maps"].max() > 0


def test_gradcam_batched_equals_unbatched(x):
    torch.manual_seed(2)
    model = trained_like(TinyNet(head=None))
    one = M.compute_maps(model, x, "gradcam", batch_size=1, device="cpu")
    big = M.compute_maps(model, x, "gradcam", batch_size=10, device="cpu")
    np.testing.assert_allclose(one["maps"], big["maps"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one["prob"], big["prob"], rtol=1e-5)


def test_gradcam_refuses_training_mode(x):
    model = TinyNet(head=None).train()
    with pytest.raises(NodulekitError, match="eval mode"):
        M.GradCAM()(model, torch.from_numpy(x))


def test_cam_maps_decompose_logits(x):
    torch.manual_seed(3)
    model = trained_like(TinyNet(head="cam"))
    out = M.compute_maps(model, x, "cam", device="cpu")
    # Eq. 1-2: S_c = mean_{x,y} M_c(x, y) + b_c (GAP is the mean, the bias is outside the map)
    np.testing.assert_allclose(
        out["maps"].mean(axis=(2, 3)) + model.fc.bias.detach().numpy(), out["logits"], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(out["prob"], torch.softmax(torch.from_numpy(out["logits"]), 1)[:, 1].numpy(), rtol=1e-6)


@pytest.mark.parametrize("head", ["sam", "hesam"])
def test_sam_hesam_maps_are_gamma_weighted_features(head, x):
    torch.manual_seed(4)
    model = trained_like(TinyNet(head=head))
    out = M.compute_maps(model, x, head, device="cpu")
    with torch.no_grad():
        g = model.forward_features(torch.from_numpy(x))["features"].numpy()
    gamma = model.fc.weight.detach().numpy()  # [classes, K]
    expected = np.einsum("ck,bkhw->bchw", gamma, g)  # Eq. 7 / Eq. 11
    np.testing.assert_allclose(out["maps"], expected, rtol=1e-4, atol=1e-6)


def test_method_refusal_names_supported_methods():
    model = trained_like(TinyNet(head=None))
    with pytest.raises(NodulekitError, match=r"'sam' does not apply.*supports: gradcam$"):
        M.check_method(model, "sam")
    cam = trained_like(TinyNet(head="cam"))
    assert M.supported_methods(cam) == ["cam", "gradcam"]
    with pytest.raises(NodulekitError, match="high-level feature"):
        M.check_method(cam, "he-cam")
    he = trained_like(TinyNet(head="cam", high_level=True))
    assert set(M.supported_methods(he)) == {"cam", "gradcam", "he-cam", "he-gradcam"}
    with pytest.raises(NodulekitError, match="unknown map method 'foo'"):
        M.get_method("foo")


def test_per_slice_maps_match_duplicated_inputs(x):
    torch.manual_seed(5)
    model = trained_like(TinyNet(head="sam"))
    out = M.compute_maps(model, x[:3], "sam", device="cpu", per_slice=True, batch_size=2)
    assert out["slice_maps"].shape == (3, 3, 8, 8) and out["slice_prob"].shape == (3, 3)
    for s in range(3):
        dup = np.repeat(x[:3, s : s + 1], 3, axis=1)
        ref = M.compute_maps(model, dup, "sam", device="cpu")
        np.testing.assert_allclose(out["slice_maps"][:, s], ref["maps"][:, 1], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["slice_prob"][:, s], ref["prob"], rtol=1e-5)
    t = torch.arange(2 * 3 * 4).float().reshape(2, 3, 2, 2)
    d = M.slice_duplicates(t)
    assert d.shape == (6, 3, 2, 2) and torch.equal(d[4, 0], t[1, 1]) and torch.equal(d[4, 2], t[1, 1])


def test_bad_inputs_are_one_line_errors(x):
    model = trained_like(TinyNet(head="cam"))
    with pytest.raises(NodulekitError, match="batch size must be at least 1"):
        M.compute_maps(model, x, "cam", batch_size=0, device="cpu")
    with pytest.raises(NodulekitError, match=r"inputs have shape \(10, 2, 32, 32\); the model expects \[N, 3"):
        M.compute_maps(model, x[:, :2], "cam", device="cpu")


def test_upsample_keeps_constants_and_shape():
    up = M.upsample(np.full((2, 2, 8, 8), 3.0, np.float32))
    assert up.shape == (2, 2, 32, 32) and np.allclose(up, 3.0)


# ---- RUNDIR level --------------------------------------------------------------------


def fake_run(tmp_path, dataset, folds=(0, 1, 2, 3, 4), head="cam"):
    """A RUNDIR with run.json and per-fold result.h5 (models come from ``models``)."""
    from nodulekit.artifacts import provenance
    from nodulekit.datasets import load_dataset
    from nodulekit.run import write_fold_result

    run = tmp_path / "run"
    run.mkdir()
    ds = load_dataset(dataset)
    record = {"arch": f"tiny-{head}", "dataset": str(dataset), "n_folds": 5, "dataset_identity": ds.identity}
    (run / "run.json").write_text(json.dumps(record))
    fold, ids, y = ds.fold, ds.nodule_id, ds.y
    models = {}
    for k in folds:
        (run / f"fold{k}").mkdir()
        (run / f"fold{k}" / "checkpoint.pt").write_bytes(b"")
        index = np.flatnonzero(fold == k)
        write_fold_result(
            run / f"fold{k}" / "result.h5",
            prov=provenance(),
            history=np.zeros((1, 5)),
            test_index=index,
            test_prob=np.full(len(index), 0.5),
            test_y=y[index],
            test_nodule_id=[ids[i] for i in index],
            attrs={"dataset_identity": ds.identity},
        )
        torch.manual_seed(10 + k)
        models[k] = trained_like(TinyNet(channels=11, head=head), seed=k)
    return run, models


def test_run_maps_uses_each_nodules_test_fold_model(tmp_path, tiny_dataset, monkeypatch):
    run, models = fake_run(tmp_path, tiny_dataset)
    monkeypatch.setattr(Run, "load_model", lambda self, k, device="cpu": (models[k], {}))
    res = M.run_maps(run, "cam", nodules=["SYN-0003:2", "SYN-0000:1", "SYN-0007:1"], progress=False, device="cpu")
    assert res.nodule_id == ["SYN-0003:2", "SYN-0000:1", "SYN-0007:1"]
    with h5py.File(tiny_dataset) as f:
        x, fold = f["x"][()], f["fold"][()]
    np.testing.assert_array_equal(res.fold, fold[res.rows])
    for i, r in enumerate(res.rows):
        ref = M.compute_maps(models[int(fold[r])], x[r : r + 1], "cam", device="cpu")
        np.testing.assert_allclose(res.maps[i], ref["maps"][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(res.prob[i], ref["prob"][0], rtol=1e-5)
    out = M.write_run_maps(res, tmp_path / "maps.h5", rundir=run)
    from nodulekit.artifacts import get_provenance, open_artifact, read_strings

    with open_artifact(out, "maps") as f:
        assert f["maps"].shape == (3, 2, 8, 8) and f["maps_up"].shape == (3, 2, 32, 32)
        assert read_strings(f["nodule_id"]) == res.nodule_id and f.attrs["method"] == "cam"
        assert "label_rule" in get_provenance(f)
    with pytest.raises(NodulekitError, match="already exists"):
        M.write_run_maps(res, out, rundir=run)


def test_run_maps_names_missing_folds_and_bad_ids(tmp_path, tiny_dataset, monkeypatch):
    run, models = fake_run(tmp_path, tiny_dataset, folds=(0, 1, 3))
    monkeypatch.setattr(Run, "load_model", lambda self, k, device="cpu": (models[k], {}))
    with pytest.raises(NodulekitError, match=r"lacks finished fold\(s\) fold2, fold4 "):
        M.run_maps(run, "cam", progress=False, device="cpu")
    with pytest.raises(NodulekitError, match="not in .*: NOPE:1"):
        M.run_maps(run, "cam", nodules=["NOPE:1"], progress=False)
    with pytest.raises(NodulekitError, match=r"'sam' does not apply.*supports: cam, gradcam"):
        M.run_maps(run, "sam", nodules=["SYN-0000:1"], progress=False, device="cpu")
    with pytest.raises(NodulekitError, match="no run.json"):
        M.run_maps(tmp_path, "cam")


# ---- the project's own models (nodulekit.models), tiny widths -------------------------


def registry_model(arch, seed=0):
    from nodulekit.models import create_model

    torch.manual_seed(seed)
    return trained_like(create_model(arch, 3, base_width=4), seed)


def test_cam_of_registry_cam_model_decomposes_logits(x):
    model = registry_model("cam")
    out = M.compute_maps(model, x[:4], "cam", device="cpu")
    assert out["maps"].shape == (4, 2, 16, 16)
    bias = model.head.fc.bias.detach().numpy()
    np.testing.assert_allclose(out["maps"].mean(axis=(2, 3)) + bias, out["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["sam", "hesam"])
def test_registry_sam_hesam_maps_follow_eq7_eq11(arch, x):
    model = registry_model(arch, seed=1)
    out = M.compute_maps(model, x[:4], arch, device="cpu")
    with torch.no_grad():
        g = model.forward_features(torch.from_numpy(x[:4]))["features"].numpy()
    gamma = model.head.fc.weight.detach().numpy()[:, : g.shape[1]]
    np.testing.assert_allclose(out["maps"], np.einsum("ck,bkhw->bchw", gamma, g), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["hesam", "he-cam"])
def test_registry_gradcam_equals_per_image_reference(arch, x):
    model = registry_model(arch, seed=2)
    method = "he-gradcam"
    out = M.compute_maps(model, x[:4], method, batch_size=4, device="cpu")
    one = M.compute_maps(model, x[:4], method, batch_size=1, device="cpu")
    np.testing.assert_allclose(out["maps"], one["maps"], rtol=1e-4, atol=1e-6)
    for i in range(4):
        xi = torch.from_numpy(x[i : i + 1])
        g, high = model.backbone(xi)
        g = g.detach().requires_grad_(True)
        logits = model.head(g, high)["logits"]
        for c in (0, 1):
            (grad,) = torch.autograd.grad(logits[0, c], g, retain_graph=True)
            ref = torch.relu(torch.einsum("k,khw->hw", grad.mean(dim=(2, 3))[0], g[0])).detach().numpy()
            np.testing.assert_allclose(out["maps"][i, c], ref, rtol=1e-4, atol=1e-6)


def test_registry_methods_supported():
    assert M.supported_methods(registry_model("hesam")) == ["gradcam", "hesam", "hesam-faithful", "he-gradcam"]
    assert M.supported_methods(registry_model("he-cam")) == ["cam", "gradcam", "he-cam", "he-gradcam"]
    assert M.supported_methods(registry_model("sam")) == ["gradcam", "sam", "sam-faithful"]


# ---- end to end: tiny trained runs through the CLI -----------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A 3-channel tiny dataset (2 folds) and a 1-epoch hesam run with base width 4."""
    from conftest import write_tiny_dataset

    from nodulekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    ds = write_tiny_dataset(root / "d3c.h5", channels=3, folds=2)
    runs = {}
    for arch in ("hesam",):
        cfg = TrainConfig(arch=arch, model_options={"base_width": 4}, epochs=1, batch_size=8, device="cpu")
        train(ds, root / arch, cfg, progress=False)
        runs[arch] = root / arch
    return ds, runs


def invoke(args):
    from typer.testing import CliRunner

    from nodulekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_maps_scores_figures_end_to_end(tiny_runs, tmp_path):
    from nodulekit.artifacts import open_artifact, read_strings
    from nodulekit.training import load_fold_model

    ds, runs = tiny_runs
    res = invoke(
        ["maps", runs["hesam"], "--method", "hesam", "--per-slice", "--device", "cpu", "-o", tmp_path / "h.h5"]
    )
    assert res.exit_code == 0, res.output
    res = invoke(["maps", runs["hesam"], "-m", "gradcam", "-d", ds, "--device", "cpu", "-o", tmp_path / "c.h5"])
    assert res.exit_code == 0, res.output
    res = invoke(
        [
            "maps",
            runs["hesam"],
            "-m",
            "he-gradcam",
            "--nodules",
            "SYN-0001:1,SYN-0002:2",
            "--device",
            "cpu",
            "-o",
            tmp_path / "g.h5",
        ]
    )
    assert res.exit_code == 0, res.output
    with open_artifact(tmp_path / "g.h5", "maps") as f:
        assert read_strings(f["nodule_id"]) == ["SYN-0001:1", "SYN-0002:2"] and f.attrs["method"] == "he-gradcam"
    with open_artifact(tmp_path / "h.h5", "maps") as f:
        maps, prob, fold = f["maps"][()], f["prob"][()], f["fold"][()]
        assert maps.shape == (40, 2, 16, 16) and f["slice_maps"].shape == (40, 3, 16, 16)
    with h5py.File(ds) as f:
        x, dfold = f["x"][()], f["fold"][()]
    np.testing.assert_array_equal(fold, dfold)
    # the stored probability equals the training run's own test probability for that fold
    with h5py.File(runs["hesam"] / "fold1" / "result.h5") as f:
        idx, test_prob = f["test_index"][()], f["test_prob"][()]
    np.testing.assert_allclose(prob[idx], test_prob, rtol=1e-4, atol=1e-5)
    model, _ = load_fold_model(runs["hesam"], 1)
    ref = M.compute_maps(model, x[idx], "hesam", device="cpu")
    np.testing.assert_allclose(maps[idx], ref["maps"], rtol=1e-4, atol=1e-6)
    res = invoke(["scores", tmp_path / "h.h5", tmp_path / "c.h5", "-d", ds, "-o", tmp_path / "s.csv"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "s.csv")
    assert len(table) == 80 and set(table["method"]) == {"hesam", "gradcam"}
    shares = table[["share_body", "share_margin_band", "share_outside"]].sum(axis=1)
    assert np.allclose(shares[~table["empty_map"]], 1.0, atol=1e-5)
    res = invoke(
        [
            "figures",
            tmp_path / "c.h5",
            tmp_path / "h.h5",
            "-d",
            ds,
            "--scores",
            tmp_path / "s.csv",
            "--n",
            "4",
            "-o",
            tmp_path / "figs",
        ]
    )
    assert res.exit_code == 0, res.output
    for name in ("map_grid.png", "slices_hesam.png", "region_scores.png"):
        data = (tmp_path / "figs" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    res = invoke(["wilcoxon", runs["hesam"], runs["hesam"], "-o", tmp_path / "w.md"])
    assert res.exit_code == 0, res.output
    assert "error_p_value" in (tmp_path / "w.md").read_text()
    res = invoke(["readers", runs["hesam"], "-o", tmp_path / "r.md"])
    assert res.exit_code == 0, res.output
    assert "reader 1" in (tmp_path / "r.md").read_text()


def test_cli_errors_are_one_line(tiny_runs, tmp_path, monkeypatch, capsys):
    from nodulekit.cli import main

    ds, runs = tiny_runs
    res = invoke(["maps", runs["hesam"], "-m", "sam", "--device", "cpu", "-o", tmp_path / "x.h5"])
    assert isinstance(res.exception, NodulekitError)
    assert (
        "supports: gradcam, hesam, hesam-faithful, he-gradcam" in str(res.exception)
        and not (tmp_path / "x.h5").exists()
    )
    monkeypatch.setattr(
        "sys.argv",
        ["nodulekit", "maps", str(runs["hesam"]), "-m", "cam", "--device", "cpu", "-o", str(tmp_path / "x.h5")],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("nodulekit: error: method 'cam' does not apply to model 'hesam'")
    (tmp_path / "exists.h5").write_bytes(b"")
    res = invoke(["maps", runs["hesam"], "-m", "hesam", "-o", tmp_path / "exists.h5"])
    assert "already exists" in str(res.exception)
    res = invoke(["wilcoxon", runs["hesam"], tmp_path, "-o", tmp_path / "w.md"])
    assert "no run.json" in str(res.exception)


def test_plain_resnet_refuses_sam_with_the_supported_list():
    from nodulekit.models import create_model

    model = create_model("resnet18", 3).eval()
    with pytest.raises(NodulekitError, match=r"'sam' does not apply to model 'resnet18'.*supports: gradcam$"):
        M.check_method(model, "sam")
