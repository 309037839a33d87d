"""VGG-16 with batch normalisation (Simonyan & Zisserman 2015) for 32x32 patches (Table 2).

Five conv stages (2, 2, 3, 3, 3 convs of 64, 128, 256, 512, 512 maps, 3x3 conv-BN-ReLU),
each followed by a 2x2 max-pool.

- ``vgg16``: all five pools (32 -> 1), then VGG's three FC layers
  512 -> ``fc_width`` -> ``fc_width`` -> classes with ReLU and dropout 0.5.
  (ImageNet VGG's 7x7 adaptive pool would only copy the 1x1 map 49 times at this size.)
- ``vgg16-cam`` / ``vgg16-sam`` (Table 2 caption: "delete the last 4 pooling layers and the
  number of FC layers is reduced to 1"): only the first pool is kept, so g is 512 x 16 x 16,
  and the single FC of the CAM or SAM head is the classifier.

``feature_layer`` is the fifth conv stage (before its pool in the plain model, 2x2 there).
"""

from __future__ import annotations

import torch
from torch import nn

from nodulekit.models.base import INPUT_SIZE, NoduleClassifier
from nodulekit.models.blocks import check_choice, check_positive_int, conv_bn_relu
from nodulekit.models.heads import FCF_POOLS, ClassifierHead
from nodulekit.models.registry import register_model

STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(NoduleClassifier):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        variant: str,
        width: int = 64,
        fc_width: int = 4096,
        fcf_pool: str = "avg",
    ):
        super().__init__(in_channels, num_classes)
        plain = variant == "plain"
        self.stages = nn.ModuleList()
        self.pools = nn.ModuleList()
        in_ch = in_channels
        for i, (maps, convs) in enumerate(STAGES):
            out_ch = maps * width // 64
            self.stages.append(
                nn.Sequential(*[conv_bn_relu(in_ch if j == 0 else out_ch, out_ch) for j in range(convs)])
            )
            self.pools.append(nn.MaxPool2d(2) if (plain or i == 0) else nn.Identity())
            in_ch = out_ch
        if plain:
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Linear(in_ch * (INPUT_SIZE // 32) ** 2, fc_width),
                nn.ReLU(inplace=True),
                nn.Dropout(0.5),
                nn.Linear(fc_width, fc_width),
                nn.ReLU(inplace=True),
                nn.Dropout(0.5),
                nn.Linear(fc_width, num_classes),
            )
        else:
            pool = "sam" if variant == "sam" else "gap"
            self.head = ClassifierHead(in_ch, num_classes, pool=pool, feature_size=INPUT_SIZE // 2, fcf_pool=fcf_pool)
            self.map_kind = self.head.map_kind

    @property
    def feature_layer(self) -> nn.Module:
        return self.stages[-1]

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = self.pools[i](x)
        return x, None

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if self.head is not None:
            return super().forward_features(x)
        self.check_input(x)
        g, _ = self.backbone(x)
        return {"logits": self.classifier(self.pools[-1](g)), "features": g, "high_level": None}


@register_model(
    "vgg16", "VGG-16 with BN, five pools, three FC layers (512 -> 4096 -> 4096 -> classes)", paper_name="VGG16"
)
def vgg16(in_channels, num_classes=2, *, base_width=64, fc_width=4096):
    check_positive_int("vgg16", "base_width", base_width)
    check_positive_int("vgg16", "fc_width", fc_width)
    return VGG16(in_channels, num_classes, variant="plain", width=base_width, fc_width=fc_width)


@register_model(
    "vgg16-cam",
    "VGG-16-CAM: only the first pool kept, 512x16x16 maps, CAM head (GAP + one FC)",
    map_kind="cam",
    paper_name="VGG16-CAM",
)
def vgg16_cam(in_channels, num_classes=2, *, base_width=64):
    check_positive_int("vgg16-cam", "base_width", base_width)
    return VGG16(in_channels, num_classes, variant="cam", width=base_width)


@register_model(
    "vgg16-sam",
    "VGG-16-SAM: only the first pool kept, 512x16x16 maps, SAM head",
    map_kind="sam",
    paper_name="VGG16-SAM",
)
def vgg16_sam(in_channels, num_classes=2, *, fcf_pool="avg", base_width=64):
    check_positive_int("vgg16-sam", "base_width", base_width)
    check_choice("vgg16-sam", "fcf_pool", fcf_pool, FCF_POOLS)
    return VGG16(in_channels, num_classes, variant="sam", width=base_width, fcf_pool=fcf_pool)
