"""Model registry, heads and every architecture of the paper (fast: tiny batches, one thread)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nodulekit.errors import NodulekitError
from nodulekit.models import (
    ClassifierHead,
    NoduleClassifier,
    available_models,
    create_model,
    describe_models,
    model_spec,
)

torch.set_num_threads(1)

# Canonical names (aliases share their implementation and are tested once via round-trip).
ALL = sorted({model_spec(n).alias_of or n for n in available_models()})
MAP_ARCHS = [n for n in ALL if model_spec(n).map_kind is not None]


def _small(name: str) -> dict:
    """Narrow versions of an architecture (same topology, fewer maps) keep the suite fast."""
    defaults = model_spec(name).defaults
    opts = {"base_width": 8, "fc_width": 32}
    return {k: v for k, v in opts.items() if k in defaults}


def _x(c: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hesam():
    torch.manual_seed(0)
    return create_model("hesam", 11).eval()


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# -- registry ---------------------------------------------------------------------------------


def test_registry_lists_the_paper_models():
    names = set(available_models())
    assert {"hesam", "sam", "cam", "he-cam", "baseline", "u-sam", "u-rb-sam", "u-gmp-sam", "u-gmp-rb-sam"} <= names
    rows = describe_models()
    assert [r[0] for r in rows] == sorted(names)
    assert all(isinstance(desc, str) and desc for _, desc, _ in rows)
    assert dict((n, k) for n, _, k in rows)["hesam"] == "hesam"


def test_unknown_arch_lists_names():
    with pytest.raises(NodulekitError, match="unknown model architecture 'nope'.*hesam"):
        create_model("nope", 3)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"colour": 1}, "does not take option"),
        ({"fcf_pool": "median"}, "fcf_pool"),
        ({"base_width": 0}, "base_width"),
    ],
)
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(NodulekitError, match=match) as err:
        create_model("hesam", 3, **options)
    assert "\n" not in str(err.value)


def test_channel_and_class_counts():
    import numpy as np

    model = create_model("sag-c", np.int64(3), num_classes=np.int64(3), base_width=4)
    assert type(model.in_channels) is int and model.in_channels == 3
    assert model(_x(3)).shape == (2, 3)
    for bad in (0, 2.0, "3", True):
        with pytest.raises(NodulekitError, match="in_channels must be an integer >= 1"):
            create_model("hesam", bad)
    with pytest.raises(NodulekitError, match="num_classes must be an integer >= 2"):
        create_model("hesam", 3, num_classes=1)


def test_bad_input_shape_is_an_error(hesam):
    with pytest.raises(NodulekitError, match=r"expects input \[B, 11, 32, 32\]"):
        hesam(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["hesam", "u-gmp-rb-sam", "sam", "he-cam"])
def test_config_round_trips(name):
    torch.manual_seed(0)
    model = create_model(name, 3, base_width=8)
    assert model.arch == name and model.in_channels == 3 and model.num_classes == 2
    again = create_model(model.arch, model.in_channels, model.num_classes, **model.config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())  # same architecture, parameter for parameter
    model.eval(), again.eval()
    x = _x(3)
    torch.testing.assert_close(model(x), again(x))


def test_aliases_share_one_implementation():
    a = create_model("u-gmp-rb-sam", 1, base_width=8)
    b = create_model("hesam", 1, base_width=8)
    assert type(a) is type(b) and a.map_kind == b.map_kind == "hesam"
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]


# -- HESAM: the paper's shapes -------------------------------------------------------------


def test_hesam_shapes(hesam):
    x = _x(11)
    bottleneck = {}
    hook = hesam.unet.down3.register_forward_hook(lambda m, i, o: bottleneck.setdefault("b", o))
    with torch.no_grad():
        out = hesam.forward_features(x)
        hook.remove()
        H = hesam.head.final_feature_vector(out["features"])
    assert out["features"].shape == (2, 256, 16, 16)
    assert bottleneck["b"].shape == (2, 256, 4, 4)
    assert out["high_level"].shape == (2, 256)
    torch.testing.assert_close(out["high_level"], bottleneck["b"].amax(dim=(2, 3)))  # d = GMP
    assert H.shape == (2, 256)
    assert hesam.head.beta.shape == (256, 36) and hesam.head.beta_bias.shape == (256,)
    assert out["logits"].shape == (2, 2)
    assert hesam.feature_layer is hesam.residual
    assert hesam.map_kind == "hesam"


def test_sam_has_separate_per_map_fc(hesam):
    g = torch.rand(2, 256, 16, 16, generator=torch.Generator().manual_seed(1))
    head = hesam.head
    with torch.no_grad():
        H0 = head.final_feature_vector(g)
        # reference: AvgPool(5, 2, 0) -> 6x6, then the k-th FC 36 -> 1 on the k-th map
        A = nn.functional.avg_pool2d(g, 5, 2, 0).flatten(2)
        ref = torch.stack([A[:, k] @ head.beta[k] + head.beta_bias[k] for k in range(256)], dim=1)
        torch.testing.assert_close(H0, ref)
        saved = head.beta[7].clone()
        head.beta[7] += 1.0
        H1 = head.final_feature_vector(g)
        head.beta[7] = saved
    changed = (H1 - H0).abs().amax(dim=0) > 1e-6
    assert changed.nonzero().flatten().tolist() == [7]


def test_hesam_logits_follow_eq12(hesam):
    x = _x(11)
    with torch.no_grad():
        out = hesam.forward_features(x)
        H = hesam.head.final_feature_vector(out["features"])
        S = (H + out["high_level"]) @ hesam.head.gamma.T + hesam.head.fc.bias
    torch.testing.assert_close(out["logits"], S)


# -- activation maps ----------------------------------------------------------------------


def test_cam_map_mean_plus_bias_is_the_logit():
    torch.manual_seed(0)
    model = create_model("cam", 11).eval()
    with torch.no_grad():
        logits, maps = model.activation_map(_x(11))
    assert maps.shape == (2, 2, 16, 16)
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + model.head.fc.bias, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["sam", "hesam", "u-gmp-sam"])
def test_sam_map_is_eq7_combination(name):
    torch.manual_seed(0)
    model = create_model(name, 3, base_width=16).eval()
    x = _x(3)
    with torch.no_grad():
        logits, maps = model.activation_map(x)
        out = model.forward_features(x)
    gamma = model.head.fc.weight
    g = out["features"]
    ref = torch.zeros_like(maps)
    for c in range(2):
        for k in range(g.shape[1]):
            ref[:, c] += gamma[c, k] * g[:, k]
    torch.testing.assert_close(maps, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out["logits"])


def test_concat_fusion_uses_first_k_columns():
    torch.manual_seed(0)
    model = create_model("hesam", 1, fusion="concat", base_width=8).eval()
    assert model.head.fc.weight.shape == (2, 64)
    x = _x(1)
    with torch.no_grad():
        _, maps = model.activation_map(x)
        g = model.forward_features(x)["features"]
    torch.testing.assert_close(maps, torch.einsum("ck,bkhw->bchw", model.head.fc.weight[:, :32], g))


@pytest.mark.parametrize("hf_pool, fcf_pool", [("avg", "avg"), ("avg", "max"), ("max", "max")])
def test_pooling_options(hf_pool, fcf_pool):
    torch.manual_seed(0)
    model = create_model("hesam", 1, hf_pool=hf_pool, fcf_pool=fcf_pool, base_width=8).eval()
    assert isinstance(model.head.minor_pool, nn.AvgPool2d if fcf_pool == "avg" else nn.MaxPool2d)
    bottleneck = {}
    model.unet.down3.register_forward_hook(lambda m, i, o: bottleneck.setdefault("b", o))
    with torch.no_grad():
        d = model.forward_features(_x(1))["high_level"]
    b = bottleneck["b"]
    torch.testing.assert_close(d, b.mean(dim=(2, 3)) if hf_pool == "avg" else b.amax(dim=(2, 3)))


# -- every architecture builds, runs, trains --------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_every_arch(name):
    torch.manual_seed(0)
    model = create_model(name, 11, **_small(name))
    assert isinstance(model, NoduleClassifier)
    assert _first_conv(model).in_channels == 11
    x = _x(11)
    out = model.forward_features(x)
    assert out["logits"].shape == (2, 2)
    g = out["features"]
    assert g.dim() == 4 and g.shape[0] == 2
    # feature_layer really produces g
    seen = {}
    hook = model.feature_layer.register_forward_hook(lambda m, i, o: seen.setdefault("g", o))
    model.eval()
    with torch.no_grad():
        g_eval = model.forward_features(x)["features"]
    hook.remove()
    torch.testing.assert_close(seen["g"], g_eval)
    model.train()
    batch = {"mask": (x > 0).to(torch.uint8), "characteristics": torch.full((2, 8), 3.5)}
    loss = nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1])) + model.auxiliary_loss(out, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
    if model.map_kind is None:
        with pytest.raises(NodulekitError, match="no class activation map"):
            model.activation_map(x)
    else:
        model.eval()
        with torch.no_grad():
            logits, maps = model.activation_map(x)
        assert maps.shape == (2, 2, *g.shape[2:])


@pytest.mark.parametrize("channels", [1, 3, 21])
@pytest.mark.parametrize("name", ["hesam", "sam", "cam"])
def test_any_channel_count(name, channels):
    torch.manual_seed(0)
    model = create_model(name, channels, base_width=8)
    assert _first_conv(model).in_channels == channels
    out = model.forward_features(_x(channels))
    out["logits"].sum().backward()
    assert out["features"].shape == (2, 32, 16, 16)


@pytest.mark.parametrize("name", ALL)
def test_first_layer_takes_any_channel_count(name):
    for channels in (1, 3, 21):
        model = create_model(name, channels, **_small(name))
        assert _first_conv(model).in_channels == channels
        assert model.in_channels == channels


# -- Table 2 comparison models ------------------------------------------------------------


@pytest.mark.parametrize("family, maps", [("resnet18", 64), ("resnet34", 64), ("vgg16", 64), ("densenet121", 128)])
def test_cam_sam_variants_have_16x16_features(family, maps):
    """Narrow widths (8x fewer maps than the paper): the spatial layout is the point."""
    torch.manual_seed(0)
    x = _x(3, b=1)
    plain = create_model(family, 3, **_small(family)).eval()
    assert plain.map_kind is None
    with torch.no_grad():
        assert plain.forward_features(x)["features"].shape[2:] == ((2, 2) if family == "vgg16" else (4, 4))
    for suffix in ("-cam", "-sam"):
        model = create_model(family + suffix, 3, **_small(family + suffix)).eval()
        assert model.map_kind == suffix[1:]
        with torch.no_grad():
            out = model.forward_features(x)
            _, m = model.activation_map(x)
        assert out["features"].shape == (1, maps, 16, 16)
        assert m.shape == (1, 2, 16, 16)
        if suffix == "-sam":
            assert model.head.beta.shape == (maps, 36)
        else:  # exact CAM identity for the comparison models too
            torch.testing.assert_close(m.mean(dim=(2, 3)) + model.head.fc.bias, out["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, maps", [("resnet18-sam", 512), ("vgg16-cam", 512), ("densenet121-sam", 1024)])
def test_full_width_comparison_models(name, maps):
    model = create_model(name, 1).eval()
    with torch.no_grad():
        g = model.forward_features(_x(1, b=1))["features"]
    assert g.shape == (1, maps, 16, 16)


def test_vgg_cam_keeps_one_pool_and_one_fc():
    model = create_model("vgg16-cam", 1, base_width=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    plain = create_model("vgg16", 1, base_width=8, fc_width=16)
    assert sum(isinstance(m, nn.MaxPool2d) for m in plain.modules()) == 5
    assert sum(isinstance(m, nn.Linear) for m in plain.modules()) == 3


def test_densenet121_layout():
    model = create_model("densenet121", 1, base_width=8)
    from nodulekit.models.densenet import DenseLayer

    assert sum(isinstance(m, DenseLayer) for m in model.modules()) == 6 + 12 + 24 + 16
    assert model.head.channels == 128  # growth 4: (((8 + 6*4) / 2 + 12*4) / 2 + 24*4) / 2 + 16*4
    assert create_model("densenet121", 1).head.channels == 1024


def test_resnet_depths():
    from nodulekit.models.blocks import BasicBlock

    assert sum(isinstance(m, BasicBlock) for m in create_model("resnet18", 1, base_width=4).modules()) == 8
    assert sum(isinstance(m, BasicBlock) for m in create_model("resnet34-sam", 1, base_width=4).modules()) == 16


def test_sag_c_attention_gates():
    torch.manual_seed(0)
    model = create_model("sag-c", 3, base_width=8).eval()
    with torch.no_grad():
        out = model.forward_features(_x(3))
    assert out["features"].shape == (2, 64, 4, 4)
    a16, a8 = out["attention_16"], out["attention_8"]
    assert a16.shape == (2, 1, 16, 16) and a8.shape == (2, 1, 8, 8)
    assert ((a16 > 0) & (a16 < 1)).all() and ((a8 > 0) & (a8 < 1)).all()
    # only the first conv at each scale: four 3x3 convs in total
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules()) == 4


def test_default_auxiliary_loss_is_zero(hesam):
    out = hesam.forward_features(_x(11))
    aux = hesam.auxiliary_loss(out, {"mask": torch.ones(2, 11, 32, 32), "characteristics": torch.ones(2, 8)})
    assert aux.shape == () and aux.item() == 0.0


def test_pn_samp_outputs_and_auxiliary_loss():
    torch.manual_seed(0)
    model = create_model("pn-samp", 3, base_width=8, seg_weight=2.0, attr_weight=0.5)
    assert model.config == {"seg_weight": 2.0, "attr_weight": 0.5, "base_width": 8}
    out = model.forward_features(_x(3))
    assert out["segmentation"].shape == (2, 1, 32, 32)
    assert out["attributes"].shape == (2, 8)
    assert out["features"].shape == (2, 32, 4, 4)
    mask = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    mask[:, 1, 10:20, 10:20] = 1  # centre slice: the one the segmentation is trained on
    ratings = torch.full((2, 8), 4.0)
    ratings[0, 0] = float("nan")  # missing rating is ignored
    seg = nn.functional.binary_cross_entropy_with_logits(out["segmentation"], mask[:, 1:2].float())
    valid = ~torch.isnan(ratings)
    mse = ((out["attributes"] - ratings)[valid] ** 2).mean()
    aux = model.auxiliary_loss(out, {"mask": mask, "characteristics": ratings})
    torch.testing.assert_close(aux, 2.0 * seg + 0.5 * mse)
    torch.testing.assert_close(model.auxiliary_loss(out, {}), torch.tensor(0.0))
    torch.testing.assert_close(model.auxiliary_loss(out, {"mask": mask}), 2.0 * seg)
    aux.backward()
    assert model.seg_out.weight.grad.abs().sum() > 0 and model.attr_out.weight.grad.abs().sum() > 0


def test_pn_samp_learns_segmentation_and_attributes():
    """A few steps of the auxiliary loss alone reduce it: the targets reach the right outputs."""
    torch.manual_seed(0)
    model = create_model("pn-samp", 1, base_width=4)
    x = _x(1, b=2)
    mask = (x[:, :1] > 0).to(torch.uint8)  # learnable from the input pixel-wise
    batch = {"mask": mask, "characteristics": torch.full((2, 8), 2.0)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        out = model.forward_features(x)
        loss = model.auxiliary_loss(out, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_small_hesam_fits_the_synthetic_dataset(tmp_path):
    """A narrow model separates ring (malignant) from blob (benign) patches in a few steps."""
    import h5py
    from conftest import write_tiny_dataset

    path = write_tiny_dataset(tmp_path / "d.h5", n=16, channels=1)
    with h5py.File(path, "r") as f:
        x, y = torch.from_numpy(f["x"][()]), torch.from_numpy(f["y"][()])
    torch.manual_seed(0)
    model = create_model("hesam", 1, base_width=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        # 25 steps are too few for BN's running averages; recompute them exactly from the data
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.reset_running_stats()
                bn.momentum = None
        model(x)
        model.eval()
        assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_every_model_accepts_base_width():
    """One option narrows every architecture (sweeps pass it to all of them)."""
    for name in ALL:
        assert "base_width" in model_spec(name).defaults, name
    with pytest.raises(NodulekitError, match="must be even"):
        create_model("densenet121", 1, base_width=7)


def test_classifier_head_standalone():
    torch.manual_seed(0)
    head = ClassifierHead(4, 3, pool="sam", feature_size=16, fusion="sum")
    assert head.grid == 6 and head.beta.shape == (4, 36) and head.map_kind == "hesam"
    g, d = torch.rand(2, 4, 16, 16), torch.rand(2, 4)
    out = head(g, d)  # d may be given as a vector instead of bottleneck maps
    torch.testing.assert_close(out["high_level"], d)
    torch.testing.assert_close(out["logits"], head.fc(head.final_feature_vector(g) + d))
    assert ClassifierHead(4, 2, pool="gap").map_kind == "cam"
    assert ClassifierHead(4, 2, pool="sam").map_kind == "sam"
    with pytest.raises(ValueError, match="at least 5 px"):
        ClassifierHead(4, 2, pool="sam", feature_size=4)
