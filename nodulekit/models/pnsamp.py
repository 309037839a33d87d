"""PN-SAMP (Wu et al. 2018): joint nodule segmentation, attribute and malignancy prediction (Table 2).

A 2-D version for 32x32 multi-slice patches on the same UNet as the paper's own models
(:class:`nodulekit.models.unet.UNet`, bottleneck 4w x 4 x 4):

- ``segmentation`` [B, 1, 32, 32]: logits of a 1x1 conv on the decoder output, trained with
  binary cross-entropy against the consensus mask's centre slice;
- ``attributes`` [B, 8]: the eight LIDC characteristics (subtlety, internalStructure,
  calcification, sphericity, margin, lobulation, spiculation, texture) regressed (MSE, in
  rating units) from a hidden attribute feature a = ReLU(FC(z)), z = GAP of the bottleneck;
- malignancy logits = FC([z, a]): the bottleneck feature fused (concatenated) with the
  attribute feature.

Training loss = cross-entropy + ``auxiliary_loss`` = seg_weight * BCE + attr_weight * MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nodulekit.errors import NodulekitError
from nodulekit.models.base import NoduleClassifier
from nodulekit.models.blocks import check_positive_int
from nodulekit.models.registry import register_model
from nodulekit.models.unet import UNet

N_ATTRIBUTES = 8
RATING_MIDPOINT = 3.0  # LIDC ratings run 1-5 (1-6 / 1-4 for two of them)


class PNSAMP(NoduleClassifier):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: int = 64,
        attr_hidden: int = 64,
        seg_weight: float = 1.0,
        attr_weight: float = 0.1,
    ):
        super().__init__(in_channels, num_classes)
        self.unet = UNet(in_channels, width)
        k = self.unet.bottleneck_channels
        self.seg_out = nn.Conv2d(width, 1, 1)
        self.attr_feature = nn.Sequential(nn.Linear(k, attr_hidden), nn.ReLU(inplace=True))
        self.attr_out = nn.Linear(attr_hidden, N_ATTRIBUTES)
        nn.init.constant_(self.attr_out.bias, RATING_MIDPOINT)  # start at mid-scale, not at 0
        self.classifier = nn.Linear(k + attr_hidden, num_classes)
        self.seg_weight = float(seg_weight)
        self.attr_weight = float(attr_weight)

    @property
    def feature_layer(self) -> nn.Module:
        return self.unet.down3

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        self.check_input(x)
        y, bottleneck = self.unet(x)
        z = bottleneck.mean(dim=(2, 3))
        a = self.attr_feature(z)
        return {
            "logits": self.classifier(torch.cat([z, a], dim=1)),
            "features": bottleneck,
            "high_level": None,
            "segmentation": self.seg_out(y),
            "attributes": self.attr_out(a),
        }

    def auxiliary_loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        """seg_weight * BCE(segmentation, centre mask slice) + attr_weight * MSE(attributes, ratings).

        A missing ``mask`` or ``characteristics`` drops its term; NaN ratings are ignored.
        """
        loss = outputs["logits"].new_zeros(())
        mask = batch.get("mask")
        if mask is not None and self.seg_weight:
            if mask.dim() != 4 or tuple(mask.shape[2:]) != tuple(outputs["segmentation"].shape[2:]):
                raise NodulekitError(f"pn-samp needs masks [B, C, 32, 32], got {list(mask.shape)}")
            target = mask[:, mask.shape[1] // 2 : mask.shape[1] // 2 + 1].to(outputs["segmentation"].dtype)
            loss = loss + self.seg_weight * F.binary_cross_entropy_with_logits(outputs["segmentation"], target)
        ratings = batch.get("characteristics")
        if ratings is not None and self.attr_weight:
            ratings = ratings.to(outputs["attributes"].dtype)
            valid = torch.isfinite(ratings)
            err = torch.where(valid, outputs["attributes"] - torch.nan_to_num(ratings), torch.zeros_like(ratings))
            loss = loss + self.attr_weight * (err**2).sum() / valid.sum().clamp(min=1)
        return loss


@register_model(
    "pn-samp",
    "PN-SAMP (Wu et al. 2018): UNet jointly predicting the nodule segmentation, the "
    "8 LIDC characteristics and malignancy from bottleneck + attribute features",
    paper_name="PN-SAMP",
)
def pn_samp(in_channels, num_classes=2, *, seg_weight=1.0, attr_weight=0.1, base_width=64):
    check_positive_int("pn-samp", "base_width", base_width)
    for name, value in (("seg_weight", seg_weight), ("attr_weight", attr_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise NodulekitError(f"model 'pn-samp': option {name} must be a number >= 0, not {value!r}")
    return PNSAMP(in_channels, num_classes, width=base_width, seg_weight=seg_weight, attr_weight=attr_weight)
