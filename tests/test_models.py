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


@pytest.mark.parametrize("options, match", [
    ({"colour": 1}, "does not take option"),
    ({"fcf_pool": "median"}, "fcf_pool"),
    ({"base_width": 0}, "base_width"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(NodulekitError, match=match) as err:
        create_model("hesam", 3, **options)
    assert "\n" not in str(err.value)


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
        H = hesam.head.map_vector(out["features"])
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
        H0 = head.map_vector(g)
        # reference: AvgPool(5, 2, 0) -> 6x6, then the k-th FC 36 -> 1 on the k-th map
        A = nn.functional.avg_pool2d(g, 5, 2, 0).flatten(2)
        ref = torch.stack([A[:, k] @ head.beta[k] + head.beta_bias[k] for k in range(256)], dim=1)
        torch.testing.assert_close(H0, ref)
        saved = head.beta[7].clone()
        head.beta[7] += 1.0
        H1 = head.map_vector(g)
        head.beta[7] = saved
    changed = (H1 - H0).abs().amax(dim=0) > 1e-6
    assert changed.nonzero().flatten().tolist() == [7]


def test_hesam_logits_follow_eq12(hesam):
    x = _x(11)
    with torch.no_grad():
        out = hesam.forward_features(x)
        H = hesam.head.map_vector(out["features"])
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
    model = create_model(name, 11)
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
    loss = nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1])) + model.auxiliary_loss(out, {})
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
