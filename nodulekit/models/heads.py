"""CAM, SAM and HESAM heads: variations of one :class:`ClassifierHead` over final conv maps g.

Notation follows the paper (Sec. 3.1): g [B, K, h, w] are the final conv feature maps,
gamma (``fc.weight``) the classifier weights, beta the per-map FC weights of SAM, d the
high-level feature (global pooling of the UNet bottleneck).

- CAM  (``pool="gap"``):  v_k = mean(g_k);                 S_c = sum_k gamma_k^c v_k + b_c
- SAM  (``pool="sam"``):  A^k = AvgPool(5, 2)(g_k);  H_k = <beta_k, A^k> + beta0_k   (Eq. 5-6, 9)
                          S_c = sum_k gamma_k^c H_k + b_c                         (Eq. 8)
- HESAM (SAM + ``fusion="sum"``): S_c = sum_k gamma_k^c (H_k + d_k) + b_c          (Eq. 12)
- any of them with ``fusion="concat"``: S = gamma [v; d] + b (Wu et al. 2018's fusion).
- the activation map is always M_c = sum_k gamma_k^c g_k (Eq. 2, 7, 11).

With ``concat`` gamma has 2K columns and the map uses only the first K (those that weigh
g); the d half has no spatial counterpart, so the map no longer decomposes the score
(the paper, Sec. 4.5.2: concatenation "will lose the activation mapping function").
"""

from __future__ import annotations

import math

import torch
from torch import nn

POOLS = ("gap", "sam")
FCF_POOLS = ("avg", "max")
HF_POOLS = ("max", "avg")
FUSIONS = (None, "sum", "concat")


class ClassifierHead(nn.Module):
    """One classifier head over g [B, K, h, w]; ``pool``/``fusion`` pick CAM, SAM or HESAM.

    Args:
        channels: K, the number of final feature maps (and the size of d when fused).
        num_classes: number of classes.
        pool: ``"gap"`` (CAM: global average pooling) or ``"sam"`` (soft activation mapping).
        feature_size: h = w of g; fixes the SAM grid ((h - sam_kernel) // sam_stride + 1)^2.
        fcf_pool: the pool inside SAM, ``"avg"`` (paper) or ``"max"`` (Table 3's FCF = GMP).
        fusion: ``None`` (no high-level feature), ``"sum"`` (Eq. 12) or ``"concat"``.
        hf_pool: global pooling turning bottleneck maps into d: ``"max"`` (paper) or ``"avg"``.
        sam_kernel, sam_stride: the SAM pooling window (paper: 5 and 2, padding 0).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int = 2,
        *,
        pool: str = "sam",
        feature_size: int = 16,
        fcf_pool: str = "avg",
        fusion: str | None = None,
        hf_pool: str = "max",
        sam_kernel: int = 5,
        sam_stride: int = 2,
    ):
        super().__init__()
        if pool not in POOLS or fcf_pool not in FCF_POOLS or fusion not in FUSIONS or hf_pool not in HF_POOLS:
            raise ValueError(
                f"bad head settings pool={pool!r} fcf_pool={fcf_pool!r} fusion={fusion!r} hf_pool={hf_pool!r}"
            )
        self.channels = channels
        self.num_classes = num_classes
        self.pool = pool
        self.fusion = fusion
        self.hf_pool = hf_pool
        self.fcf_pool = fcf_pool
        self.feature_size = feature_size
        if pool == "sam":
            if feature_size < sam_kernel:
                raise ValueError(f"SAM needs feature maps of at least {sam_kernel} px, got {feature_size}")
            grid = (feature_size - sam_kernel) // sam_stride + 1
            self.grid = grid
            pool_cls = nn.AvgPool2d if fcf_pool == "avg" else nn.MaxPool2d
            self.minor_pool = pool_cls(sam_kernel, stride=sam_stride, padding=0)
            # beta: one separate weight vector (and bias) per feature map, i.e. K FC layers h_k
            # with a single neuron each, stored as one tensor so one einsum applies all of them.
            self.beta = nn.Parameter(torch.empty(channels, grid * grid))
            self.beta_bias = nn.Parameter(torch.empty(channels))
            bound = 1.0 / math.sqrt(grid * grid)  # nn.Linear's default init, per h_k
            nn.init.uniform_(self.beta, -bound, bound)
            nn.init.uniform_(self.beta_bias, -bound, bound)
        # gamma: the classifier whose weights define the activation map.
        self.fc = nn.Linear(channels * (2 if fusion == "concat" else 1), num_classes)

    @property
    def map_kind(self) -> str:
        if self.pool == "gap":
            return "cam"
        return "hesam" if self.fusion else "sam"

    @property
    def gamma(self) -> torch.Tensor:
        """The classifier weights that multiply g's pooled vector: [classes, K]."""
        return self.fc.weight[:, : self.channels]

    def minor_features(self, g: torch.Tensor) -> torch.Tensor:
        """A^k: the SAM-pooled maps, flattened to [B, K, grid*grid]."""
        return self.minor_pool(g).flatten(2)

    def map_vector(self, g: torch.Tensor) -> torch.Tensor:
        """The per-map vector fed to gamma before fusion: GAP(g) for CAM, H for SAM. [B, K]"""
        if self.pool == "gap":
            return g.mean(dim=(2, 3))
        return torch.einsum("bkl,kl->bk", self.minor_features(g), self.beta) + self.beta_bias

    def high_level_feature(self, high: torch.Tensor) -> torch.Tensor:
        """d [B, K]: global ``hf_pool`` pooling of bottleneck maps [B, K, h, w] (or d itself)."""
        if high.dim() == 2:
            return high
        return high.amax(dim=(2, 3)) if self.hf_pool == "max" else high.mean(dim=(2, 3))

    def forward(self, g: torch.Tensor, high: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        vector = self.map_vector(g)
        d = None
        if self.fusion is not None:
            if high is None:
                raise ValueError("this head fuses a high-level feature but none was given")
            d = self.high_level_feature(high)
            vector = vector + d if self.fusion == "sum" else torch.cat([vector, d], dim=1)
        return {"logits": self.fc(vector), "vector": vector, "high_level": d}

    def activation_map(self, g: torch.Tensor) -> torch.Tensor:
        """M_c = sum_k gamma_k^c g_k (Eq. 2/7/11): [B, classes, h, w], no bias, no upsampling."""
        return torch.einsum("ck,bkhw->bchw", self.gamma, g)
