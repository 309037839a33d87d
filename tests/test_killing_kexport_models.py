"""The backbones hold the layers their papers describe: parameter counts of VGG-16, ResNet-18/34 and
DenseNet-121 (and the paper's UNet) computed here from the architectures' own arithmetic (docstrings
of nodulekit.models, He et al., Huang et al., Ronneberger et al.), so a changed width, kernel, bias
or block count fails; plus the option refusals and the auxiliary loss of PN-SAMP."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from nodulekit.errors import NodulekitError  # noqa: E402
from nodulekit.models import create_model  # noqa: E402

torch.set_num_threads(1)


def _cbr(i: int, o: int, k: int = 3) -> int:
    """conv (no bias: BN follows) + BN (weight, bias)."""
    return i * o * k * k + 2 * o


def _backbone_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("head.", "classifier.")))


def _basic_block(i: int, o: int, stride: int = 1) -> int:
    projection = i * o + 2 * o if (stride != 1 or i != o) else 0
    return _cbr(i, o) + _cbr(o, o) + projection


@pytest.mark.parametrize("name", ["vgg16", "vgg16-cam"])
def test_vgg16_stages(name):
    w, c = 8, 5
    widths = [64, 128, 256, 512, 512]
    convs = [2, 2, 3, 3, 3]
    expected, i = 0, c
    for maps, n in zip(widths, convs, strict=True):
        o = maps * w // 64
        expected += _cbr(i, o) + (n - 1) * _cbr(o, o)
        i = o
    model = create_model(name, c, base_width=w, **({"fc_width": 12} if name == "vgg16" else {}))
    assert _backbone_params(model) == expected
    if name == "vgg16":  # 512 -> fc -> fc -> classes, with biases; dropout 0.5 twice
        assert sum(p.numel() for p in model.classifier.parameters()) == (64 * 12 + 12) + (12 * 12 + 12) + (12 * 2 + 2)
        assert [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
        assert model(torch.zeros(2, c, 32, 32)).shape == (2, 2)
    else:  # only the first pool kept: g is 16 x 16
        assert model.forward_features(torch.zeros(2, c, 32, 32))["features"].shape == (2, 64, 16, 16)


@pytest.mark.parametrize("depth,blocks", [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3))])
@pytest.mark.parametrize("variant", ["", "-cam"])
def test_resnet_stages(depth, blocks, variant):
    w, c = 4, 3
    plain = not variant
    expected, i = _cbr(c, w), w
    for s, n in enumerate(blocks):
        o = w * 2**s
        stride = 2 if (plain and s > 0) else 1
        expected += _basic_block(i, o, stride) + (n - 1) * _basic_block(o, o)
        i = o
    model = create_model(f"resnet{depth}{variant}", c, base_width=w)
    assert _backbone_params(model) == expected
    g = model.forward_features(torch.zeros(2, c, 32, 32))["features"]
    assert g.shape == ((2, 8 * w, 4, 4) if plain else (2, 8 * w, 16, 16))


@pytest.mark.parametrize("variant", ["", "-cam", "-sam"])
def test_densenet121_blocks(variant):
    """Huang et al.'s DenseNet-BC: bottleneck 4 x growth, blocks 6-12-24-16, compression 0.5, no conv biases."""
    width, c = 8, 3
    g = width // 2
    ch = 2 * g
    expected = _cbr(c, ch)
    for b, layers in enumerate((6, 12, 24, 16)):
        for layer in range(layers):
            k = ch + layer * g
            expected += 2 * k + k * 4 * g + 2 * 4 * g + 4 * g * g * 9
        ch += layers * g
        if b < 3:
            expected += 2 * ch + ch * (ch // 2)
            ch //= 2
    expected += 2 * ch  # the final BN
    model = create_model(f"densenet121{variant}", c, base_width=width)
    assert _backbone_params(model) == expected
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    feats = model.forward_features(torch.zeros(2, c, 32, 32))["features"]
    assert feats.shape == ((2, ch, 4, 4) if not variant else (2, ch, 16, 16))
    assert ch == 16 * width  # 1024 maps at the default width 64
    with pytest.raises(NodulekitError) as err:
        create_model(f"densenet121{variant}", c, base_width=7)
    assert str(err.value) == (
        f"model 'densenet121{variant}': option base_width must be even (growth rate = base_width / 2), not 7"
    )


def test_unet_encoder_decoder():
    from nodulekit.models.unet import UNet

    w, c = 4, 3
    w1, w2, w3 = w, 2 * w, 4 * w

    def double(i, o):
        return _cbr(i, o) + _cbr(o, o)

    def up(i, skip, o):  # 2x2 transposed conv (with bias), then DoubleConv over the concatenation
        return i * skip * 4 + skip + double(2 * skip, o)

    expected = double(c, w1) + double(w1, w2) + double(w2, w3) + double(w3, w3)
    expected += up(w3, w3, w3) + up(w3, w2, w2) + up(w2, w1, w1)
    unet = UNet(c, w)
    assert sum(p.numel() for p in unet.parameters()) == expected
    out, bottleneck = unet(torch.zeros(2, c, 32, 32))
    assert out.shape == (2, w1, 32, 32) and bottleneck.shape == (2, w3, 4, 4)


@pytest.mark.parametrize(
    "name,option,value,choices",
    [
        ("hesam", "fusion", "mul", "'sum', 'concat'"),
        ("hesam", "hf_pool", "min", None),
        ("hesam", "fcf_pool", "min", None),
        ("vgg16-sam", "fcf_pool", "min", None),
        ("resnet18-sam", "fcf_pool", "min", None),
        ("densenet121-sam", "fcf_pool", "min", None),
    ],
)
def test_option_refusals_name_the_option(name, option, value, choices):
    with pytest.raises(NodulekitError) as err:
        create_model(name, 3, base_width=4, **{option: value})
    message = str(err.value)
    assert message.startswith(f"model {name!r}: option {option}={value!r} is not one of "), message
    if choices:
        assert message.endswith(choices)


@pytest.mark.parametrize("name", ["hesam", "vgg16", "vgg16-cam", "resnet34-sam", "densenet121"])
def test_width_must_be_a_positive_integer(name):
    for bad in (0, 2.5, True):
        with pytest.raises(NodulekitError) as err:
            create_model(name, 3, base_width=bad)
        assert str(err.value) == f"model {name!r}: option base_width must be a positive integer, not {bad!r}"


def test_pnsamp_auxiliary_loss_weights():
    """Training loss = CE + 1.0 x BCE(segmentation) + 0.1 x MSE(attributes) (module docstring defaults)."""
    import torch.nn.functional as F

    model = create_model("pn-samp", 3, base_width=4)
    assert (model.seg_weight, model.attr_weight) == (1.0, 0.1)
    from nodulekit.models.pnsamp import PNSAMP

    bare = PNSAMP(3, 2, width=4)  # the class's own defaults are the same weights, and 64 attribute features
    assert (bare.seg_weight, bare.attr_weight, bare.classifier.in_features - 4 * 4) == (1.0, 0.1, 64)
    gen = torch.Generator().manual_seed(0)
    seg = torch.randn(2, 1, 32, 32, generator=gen)
    outputs = {"logits": torch.zeros(2, 2), "segmentation": seg, "attributes": torch.randn(2, 8, generator=gen)}
    ratings = torch.rand(2, 8, generator=gen) * 4 + 1
    ratings[0, 3] = math.nan
    loss = model.auxiliary_loss(outputs, {"characteristics": ratings})
    valid = torch.isfinite(ratings)
    mse = ((outputs["attributes"] - ratings)[valid] ** 2).sum() / valid.sum()
    assert float(loss) == pytest.approx(0.1 * float(mse), rel=1e-6)
    mask = torch.zeros(2, 3, 32, 32)
    mask[:, :, 10:20, 10:20] = 1
    both = model.auxiliary_loss(outputs, {"characteristics": ratings, "mask": mask})
    bce = F.binary_cross_entropy_with_logits(seg, mask[:, 1:2])
    assert float(both) == pytest.approx(float(bce) + 0.1 * float(mse), rel=1e-6)


def test_aliases_name_the_model_they_stand_for():
    from nodulekit.models.registry import describe_models, model_spec, paper_name

    assert model_spec("hesam").alias_of is None
    assert model_spec("ours-hesam").alias_of == model_spec("u-gmp-rb-sam").alias_of == "hesam"
    assert paper_name("u-gmp-rb-sam") == paper_name("hesam") == "Ours-HESAM"
    rows = {row[0]: row[1] for row in describe_models()}
    assert rows["ours-hesam"] == f"alias of hesam: {rows['hesam']}"
