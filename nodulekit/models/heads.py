"""CAM, SAM and HESAM heads: variations of one :class:`ClassifierHead` over final conv maps g.

Notation follows the paper (Sec. 3.1): g [B, K, h, w] are the final conv feature maps,
gamma (``fc.weight``) the classifier weights, beta the per-map FC weights of SAM, d the
high-level feature (global pooling of the UNet bottleneck).

- CAM  (``pool="gap"``):  v_k = mean(g_k);  S_c = sum_k gamma_k^c v_k + b_c              (Eq. 1)
- SAM  (``pool="sam"``):  minor features A^k = AvgPool(5, 2)(g_k)                      (Eq. 5)
                          H_k = h_k(A^k) = <beta_k, A^k> + beta0_k                     (Eq. 6)
                          S'_c = sum_k gamma_k^c H_k + b_c                             (Eq. 8-10)
- HESAM (SAM + ``fusion="sum"``): S^h_c = sum_k gamma_k^c (H_k + d_k) + b_c              (Eq. 12)
- any of them with ``fusion="concat"``: S = gamma [v; d] + b (Wu et al. 2018's fusion).
- the activation map is always M_c = sum_k gamma_k^c g_k: CAM (Eq. 2), SAM (Eq. 7), HESAM (Eq. 11).

The paper's names: v (CAM) or H (SAM) is the *final feature vector*
(:meth:`ClassifierHead.final_feature_vector`), d the *high-level feature* (HF,
:meth:`ClassifierHead.high_level_feature`), S_c the class score (:meth:`ClassifierHead.forward`).
- the *faithful* map of an average-pooled SAM/HESAM head (``faithful_map``): AvgPool, the
  per-map FC and gamma are linear in g, so S_c = sum_{x,y} F_c(x, y) + offset_c exactly, with
  F_c(x, y) = sum_k gamma_k^c w_k(x, y) g_k(x, y) and w_k = beta_k spread back through the
  pooling windows (``pooling_weights``); offset_c = sum_k gamma_k^c beta0_k + b_c (+ the d term).
  Eq. 7/11 leave out w, so they do not sum to the score; positions no window reaches (the
  last row and column of a 16x16 g with kernel 5, stride 2) get exactly 0 in F.

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
            self.sam_kernel, self.sam_stride = sam_kernel, sam_stride
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
        """A^k = a(g_k) (Eq. 5): the SAM-pooled maps, flattened to [B, K, grid*grid]."""
        return self.minor_pool(g).flatten(2)

    def final_feature_vector(self, g: torch.Tensor) -> torch.Tensor:
        """The vector fed to gamma before fusion [B, K]: v_k = GAP(g_k) for CAM (Eq. 1),
        H_k = h_k(A^k) for SAM (Eq. 6, the inner sum of Eq. 9)."""
        if self.pool == "gap":
            return g.mean(dim=(2, 3))
        return torch.einsum("bkl,kl->bk", self.minor_features(g), self.beta) + self.beta_bias

    def high_level_feature(self, high: torch.Tensor) -> torch.Tensor:
        """d [B, K] (the d_k of Eq. 12): global ``hf_pool`` pooling of bottleneck maps [B, K, h, w] (or d itself)."""
        if high.dim() == 2:
            return high
        return high.amax(dim=(2, 3)) if self.hf_pool == "max" else high.mean(dim=(2, 3))

    def forward(self, g: torch.Tensor, high: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Class scores ``logits``: S_c (Eq. 1), S'_c (Eq. 8-10) or S^h_c (Eq. 12); also the
        fused final feature ``vector`` and the high-level feature d (or None)."""
        vector = self.final_feature_vector(g)
        d = None
        if self.fusion is not None:
            if high is None:
                raise ValueError("this head fuses a high-level feature but none was given")
            d = self.high_level_feature(high)
            vector = vector + d if self.fusion == "sum" else torch.cat([vector, d], dim=1)
        return {"logits": self.fc(vector), "vector": vector, "high_level": d}

    def activation_map(self, g: torch.Tensor) -> torch.Tensor:
        """M_c = sum_k gamma_k^c g_k: CAM (Eq. 2), SAM M'_c (Eq. 7), HESAM M^h_c (Eq. 11).

        [B, classes, h, w], no bias, no up-sampling."""
        return torch.einsum("ck,bkhw->bchw", self.gamma, g)

    def pooling_weights(self) -> torch.Tensor:
        """w [K, h, w]: each map's FC weights beta spread back through the AvgPool windows.

        w_k(x, y) = (1 / kernel^2) sum over the windows l that contain (x, y) of beta_{k,l}, so
        H_k = sum_{x,y} w_k(x, y) g_k(x, y) + beta0_k exactly (Eq. 5-6, 9). Positions no window
        reaches get 0. Only an average-pooled SAM head is linear in g like this.
        """
        if self.pool != "sam" or self.fcf_pool != "avg":
            raise ValueError(f"a {self.pool}/{self.fcf_pool}-pooled head is not a linear function of g per position")
        beta = self.beta.view(self.channels, 1, self.grid, self.grid)
        box = beta.new_full((1, 1, self.sam_kernel, self.sam_kernel), 1.0 / self.sam_kernel**2)
        # The adjoint of average pooling: every window hands its weight back to its pixels.
        w = torch.nn.functional.conv_transpose2d(beta, box, stride=self.sam_stride)[:, 0]
        pad = self.feature_size - w.shape[-1]
        return torch.nn.functional.pad(w, (0, pad, 0, pad))

    def faithful_map(self, g: torch.Tensor, high: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F [B, classes, h, w], offset [B, classes]) with logit_c = sum_{x,y} F_c(x, y) + offset_c.

        F_c = sum_k gamma_k^c w_k g_k; offset_c = sum_k gamma_k^c beta0_k + b_c, plus for a fused
        high-level feature the d term (sum_k gamma_k^c d_k for ``sum``; the d half of the
        classifier times d for ``concat``).
        """
        gamma = self.gamma
        maps = torch.einsum("ck,khw,bkhw->bchw", gamma, self.pooling_weights(), g)
        offset = (gamma @ self.beta_bias + self.fc.bias).expand(g.shape[0], -1)
        if self.fusion is not None:
            if high is None:
                raise ValueError("this head fuses a high-level feature but none was given")
            d = self.high_level_feature(high)
            d_weights = gamma if self.fusion == "sum" else self.fc.weight[:, self.channels :]
            offset = offset + d @ d_weights.T
        return maps, offset
