"""DenseNet-121 (Huang et al. 2017) for 32x32 patches, plain and with CAM/SAM heads (Table 2).

Growth rate 32 (option ``base_width`` = 64 stem maps = 2 x growth rate, as in DenseNet-121),
bottleneck width 4 x 32, dense blocks of 6, 12, 24, 16 layers, transitions
halve the maps (compression 0.5): 64 -> 256 -> 128 -> 512 -> 256 -> 1024 -> 512 -> 1024 maps.

- ``densenet121``: CIFAR-style stem (3x3 conv, stride 1), transitions with 2x2/2 average
  pooling (32 -> 16 -> 8 -> 4), final BN-ReLU, GAP + FC.
- ``-cam`` / ``-sam`` (Table 2 caption: "delete the final pooling layer and strides of pooling
  in transition block are reduced to 1"): stem 3x3 conv + 3x3/2 max-pool (32 -> 16); the
  transition pools become 3x3 average pools with stride 1 and padding 1 (a 2x2 window with
  stride 1 would shrink the maps by one pixel per transition, to 13x13); no GAP, the CAM or
  SAM head reads g = 1024 x 16 x 16.
"""

from __future__ import annotations

import torch
from torch import nn

from nodulekit.errors import NodulekitError
from nodulekit.models.base import INPUT_SIZE, NoduleClassifier
from nodulekit.models.blocks import check_choice, check_positive_int, conv_bn_relu
from nodulekit.models.heads import FCF_POOLS, ClassifierHead
from nodulekit.models.registry import register_model

BLOCKS = (6, 12, 24, 16)


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bn_size*growth) - BN-ReLU-conv3x3 (growth); output concatenated to the input."""

    def __init__(self, in_ch: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def dense_block(in_ch: int, layers: int, growth: int) -> nn.Sequential:
    return nn.Sequential(*[DenseLayer(in_ch + i * growth, growth) for i in range(layers)])


def transition(in_ch: int, out_ch: int, keep_size: bool) -> nn.Sequential:
    pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False) if keep_size else nn.AvgPool2d(2, stride=2)
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False), pool)


class DenseNet121(NoduleClassifier):
    def __init__(self, in_channels: int, num_classes: int, *, variant: str, growth: int = 32, fcf_pool: str = "avg"):
        super().__init__(in_channels, num_classes)
        plain = variant == "plain"
        ch = 2 * growth
        self.stem = conv_bn_relu(in_channels, ch, 3)
        if not plain:
            self.stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        body = []
        for i, layers in enumerate(BLOCKS):
            body.append(dense_block(ch, layers, growth))
            ch += layers * growth
            if i < len(BLOCKS) - 1:
                body.append(transition(ch, ch // 2, keep_size=not plain))
                ch //= 2
        self.body = nn.Sequential(*body[:-1])
        # the last dense block with DenseNet's final BN-ReLU: its output is g
        self.stage4 = nn.Sequential(body[-1], nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        size = INPUT_SIZE // 8 if plain else INPUT_SIZE // 2
        pool = "sam" if variant == "sam" else "gap"
        self.head = ClassifierHead(ch, num_classes, pool=pool, feature_size=size, fcf_pool=fcf_pool)
        self.map_kind = None if plain else self.head.map_kind

    @property
    def feature_layer(self) -> nn.Module:
        return self.stage4

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.stage4(self.body(self.stem(x))), None


def _growth(name: str, base_width) -> int:
    check_positive_int(name, "base_width", base_width)
    if base_width % 2:
        raise NodulekitError(
            f"model {name!r}: option base_width must be even (growth rate = base_width / 2), not {base_width}"
        )
    return base_width // 2


@register_model(
    "densenet121",
    "DenseNet-121 (growth 32, blocks 6-12-24-16, CIFAR-style stem), 1024x4x4 maps, GAP + FC",
    paper_name="DenseNet121",
)
def densenet121(in_channels, num_classes=2, *, base_width=64):
    return DenseNet121(in_channels, num_classes, variant="plain", growth=_growth("densenet121", base_width))


@register_model(
    "densenet121-cam",
    "DenseNet-121-CAM: stride-1 transition pools, no final pooling, 1024x16x16 maps, CAM head",
    map_kind="cam",
    paper_name="DenseNet121-CAM",
)
def densenet121_cam(in_channels, num_classes=2, *, base_width=64):
    return DenseNet121(in_channels, num_classes, variant="cam", growth=_growth("densenet121-cam", base_width))


@register_model(
    "densenet121-sam",
    "DenseNet-121-SAM: as densenet121-cam with the SAM head",
    map_kind="sam",
    paper_name="DenseNet121-SAM",
)
def densenet121_sam(in_channels, num_classes=2, *, fcf_pool="avg", base_width=64):
    check_choice("densenet121-sam", "fcf_pool", fcf_pool, FCF_POOLS)
    return DenseNet121(
        in_channels, num_classes, variant="sam", growth=_growth("densenet121-sam", base_width), fcf_pool=fcf_pool
    )
