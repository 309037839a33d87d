"""SAG-C: simplified attention-gated classifier (Schlemper et al. 2019, Table 2).

A small VGG-like CNN with one 3x3 conv-BN-ReLU per scale (the Table 2 caption: "we only
preserved the first Conv layer at each scale"): 64@32 -> 128@16 -> 256@8 -> 512@4 (2x2
max-pool between scales). The coarsest maps are the gating signal for additive attention
gates on the two intermediate scales:

    alpha = sigmoid(psi(ReLU(W_x x + up(W_g g))))          [B, 1, h, w]
    v     = sum_xy alpha * x / sum_xy alpha                 (attention-weighted pooling)

The attended vectors of scales 2 and 3 and the GAP of the coarsest maps are concatenated
and classified by one FC (Schlemper's "concatenation" aggregation). The attention
coefficients are returned as ``attention_16`` and ``attention_8`` by ``forward_features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nodulekit.models.base import NoduleClassifier
from nodulekit.models.blocks import check_positive_int, conv_bn_relu
from nodulekit.models.registry import register_model


class AttentionGate(nn.Module):
    """Additive grid attention: features x [B, Cx, h, w] gated by coarse features g [B, Cg, h', w']."""

    def __init__(self, x_ch: int, g_ch: int, inter_ch: int):
        super().__init__()
        self.theta = nn.Conv2d(x_ch, inter_ch, 1, bias=False)
        self.phi = nn.Conv2d(g_ch, inter_ch, 1)
        self.psi = nn.Conv2d(inter_ch, 1, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = F.interpolate(self.phi(g), size=x.shape[2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(x) + gate)))
        # normalised attention pooling; the epsilon keeps an all-zero gate finite
        v = (alpha * x).sum(dim=(2, 3)) / (alpha.sum(dim=(2, 3)) + 1e-6)
        return v, alpha


class SAGC(NoduleClassifier):
    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__(in_channels, num_classes)
        w = width
        self.scale1 = conv_bn_relu(in_channels, w)
        self.scale2 = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(w, 2 * w))
        self.scale3 = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(2 * w, 4 * w))
        self.scale4 = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(4 * w, 8 * w))
        self.gate2 = AttentionGate(2 * w, 8 * w, w)
        self.gate3 = AttentionGate(4 * w, 8 * w, 2 * w)
        self.classifier = nn.Linear(2 * w + 4 * w + 8 * w, num_classes)

    @property
    def feature_layer(self) -> nn.Module:
        return self.scale4

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        self.check_input(x)
        x2 = self.scale2(self.scale1(x))
        x3 = self.scale3(x2)
        g = self.scale4(x3)
        v2, a2 = self.gate2(x2, g)
        v3, a3 = self.gate3(x3, g)
        logits = self.classifier(torch.cat([v2, v3, g.mean(dim=(2, 3))], dim=1))
        return {"logits": logits, "features": g, "high_level": None, "attention_16": a2, "attention_8": a3}


@register_model(
    "sag-c",
    "SAG-C: simplified attention-gated classifier (Schlemper et al. 2019), one conv per "
    "scale, attention gates at 16x16 and 8x8 gated by the 4x4 maps, concatenated -> FC",
    paper_name="SAG-C",
)
def sag_c(in_channels, num_classes=2, *, base_width=64):
    check_positive_int("sag-c", "base_width", base_width)
    return SAGC(in_channels, num_classes, width=base_width)
