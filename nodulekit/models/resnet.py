"""ResNet-18/34 (He et al. 2016) for 32x32 patches, plain and with CAM/SAM heads (Table 2).

Plain (``resnet18``, ``resnet34``): CIFAR-style stem (one 3x3 conv, stride 1, no max-pool,
because a 7x7/2 conv + pool would leave 8x8 after the stem), four BasicBlock stages of
64/128/256/512 maps with strides 1/2/2/2 -> 512 x 4 x 4, then GAP + FC (their usual classifier).

``-cam`` / ``-sam`` (Table 2 caption: "reduce the last pooling layer and strides in each
residual block are set as 1"): the stem is 3x3 conv + 3x3/2 max-pool (32 -> 16), every stage
has stride 1, and the final GAP+FC is replaced by the CAM or SAM head, so g is 512 x 16 x 16.
"""

from __future__ import annotations

import torch
from torch import nn

from nodulekit.models.base import INPUT_SIZE, NoduleClassifier
from nodulekit.models.blocks import BasicBlock, check_choice, check_positive_int, conv_bn_relu
from nodulekit.models.heads import FCF_POOLS, ClassifierHead
from nodulekit.models.registry import register_model

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet(NoduleClassifier):
    """ResNet with BasicBlocks; ``variant`` is ``"plain"``, ``"cam"`` or ``"sam"``."""

    def __init__(
        self, in_channels: int, num_classes: int, *, depth: int, variant: str, width: int = 64, fcf_pool: str = "avg"
    ):
        super().__init__(in_channels, num_classes)
        plain = variant == "plain"
        self.stem = conv_bn_relu(in_channels, width, 3)
        if not plain:
            self.stem.append(nn.MaxPool2d(3, stride=2, padding=1))  # 32 -> 16, the only down-sampling
        stages, in_ch = [], width
        for i, blocks in enumerate(DEPTHS[depth]):
            out_ch = width * 2**i
            stride = 2 if (plain and i > 0) else 1
            layers = [BasicBlock(in_ch, out_ch, stride)] + [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        size = INPUT_SIZE // 8 if plain else INPUT_SIZE // 2
        pool = "sam" if variant == "sam" else "gap"
        self.head = ClassifierHead(in_ch, num_classes, pool=pool, feature_size=size, fcf_pool=fcf_pool)
        self.map_kind = None if plain else self.head.map_kind

    @property
    def feature_layer(self) -> nn.Module:
        return self.layer4

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))), None


def _register(depth: int) -> None:
    name = f"resnet{depth}"

    @register_model(
        name, f"ResNet-{depth} (CIFAR-style 3x3 stem), 512x4x4 final maps, GAP + FC", paper_name=f"ResNet{depth}"
    )
    def plain(in_channels, num_classes=2, *, base_width=64):
        check_positive_int(name, "base_width", base_width)
        return ResNet(in_channels, num_classes, depth=depth, variant="plain", width=base_width)

    @register_model(
        f"{name}-cam",
        f"ResNet-{depth}-CAM: stem halves to 16x16, all stage strides 1, 512x16x16 maps, CAM head (GAP + FC)",
        map_kind="cam",
        paper_name=f"ResNet{depth}-CAM",
    )
    def with_cam(in_channels, num_classes=2, *, base_width=64):
        check_positive_int(f"{name}-cam", "base_width", base_width)
        return ResNet(in_channels, num_classes, depth=depth, variant="cam", width=base_width)

    @register_model(
        f"{name}-sam",
        f"ResNet-{depth}-SAM: as {name}-cam with the SAM head (AvgPool 5/2 -> per-map FC 36->1 -> FC)",
        map_kind="sam",
        paper_name=f"ResNet{depth}-SAM",
    )
    def with_sam(in_channels, num_classes=2, *, fcf_pool="avg", base_width=64):
        check_positive_int(f"{name}-sam", "base_width", base_width)
        check_choice(f"{name}-sam", "fcf_pool", fcf_pool, FCF_POOLS)
        return ResNet(in_channels, num_classes, depth=depth, variant="sam", width=base_width, fcf_pool=fcf_pool)


for _depth in DEPTHS:
    _register(_depth)
