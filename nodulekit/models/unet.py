"""The paper's own models (Sec. 3.2, Fig. 3): UNet encoder-decoder, residual blocks, CAM/SAM/HESAM heads.

Shapes for a 32x32 input and the default ``base_width=64`` (w):

    inc     DoubleConv(C -> w)            64 x 32 x 32
    down1   MaxPool 2, DoubleConv(w -> 2w)   128 x 16 x 16
    down2   MaxPool 2, DoubleConv(2w -> 4w)  256 x 8 x 8
    down3   MaxPool 2, DoubleConv(4w -> 4w)  256 x 4 x 4   <- bottleneck; d = GMP (256)
    up1..3  2x2 transposed conv, concat skip, DoubleConv   256@8, 128@16, 64@32
    out     1x1 conv -> 64 maps @32 (the UNet output layer, "64 final 1x1 kernels")
    rb      BasicBlock(64 -> 256, stride 2, 1x1 projection) + BasicBlock(256 -> 256)
            -> g: 256 x 16 x 16
    head    SAM: AvgPool(5, 2) -> 6x6, per-map FC 36 -> 1 -> H (256), (+ d), FC -> classes

Variants (Tables 2 and 4): ``hesam`` (= u-gmp-rb-sam), ``sam`` (= u-rb-sam), ``cam``,
``he-cam``, ``baseline``, ``u-sam`` and ``u-gmp-sam``; one implementation, :class:`UNetClassifier`.
"""

from __future__ import annotations

import torch
from torch import nn

from nodulekit.models.base import INPUT_SIZE, NoduleClassifier
from nodulekit.models.blocks import BasicBlock, DoubleConv, check_choice, check_positive_int, conv_bn_relu
from nodulekit.models.heads import FCF_POOLS, FUSIONS, HF_POOLS, ClassifierHead
from nodulekit.models.registry import register_model


class Up(nn.Module):
    """UNet up-sampling block: 2x2 transposed conv, concatenate the skip, DoubleConv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, skip_ch, 2, stride=2)
        self.conv = DoubleConv(2 * skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Three down- and three up-sampling blocks (Ronneberger et al. 2015) for 32x32 input."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.inc = DoubleConv(in_channels, w1)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(w1, w2))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(w2, w3))
        self.down3 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(w3, w3))  # the bottleneck, 4x4
        self.up1 = Up(w3, w3, w3)
        self.up2 = Up(w3, w2, w2)
        self.up3 = Up(w2, w1, w1)
        self.out_channels = w1
        self.bottleneck_channels = w3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder output [B, w, 32, 32], bottleneck [B, 4w, 4, 4])."""
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        bottleneck = self.down3(x3)
        y = self.up1(bottleneck, x3)
        y = self.up2(y, x2)
        y = self.up3(y, x1)
        return y, bottleneck


class UNetClassifier(NoduleClassifier):
    """UNet + optional residual blocks + one :class:`ClassifierHead`.

    Args:
        stage: what turns the UNet output into g:
            ``"rb"``: 1x1 conv to ``width`` maps, then two BasicBlocks (first stride 2) -> 4w x 16 x 16;
            ``"conv"``: a stride-2 3x3 conv-BN-ReLU to 4w maps of 16x16 (Table 4's "U", no RB);
            ``"out"``: only the 1x1 output conv: w maps of 32x32 (the Table 2 baseline).
        pool, fusion, fcf_pool, hf_pool: passed to :class:`ClassifierHead`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        stage: str,
        pool: str,
        fusion: str | None,
        fcf_pool: str = "avg",
        hf_pool: str = "max",
        width: int = 64,
    ):
        super().__init__(in_channels, num_classes)
        self.unet = UNet(in_channels, width)
        self.stage = stage
        k = 4 * width
        if stage == "rb":
            self.out = nn.Conv2d(width, width, 1)  # the UNet's output layer: 64 maps of 1x1 kernels
            self.residual = nn.Sequential(BasicBlock(width, k, stride=2), BasicBlock(k, k))
            self._feature_layer, size = self.residual, INPUT_SIZE // 2
        elif stage == "conv":
            self.out = conv_bn_relu(width, k, 3, stride=2)
            self._feature_layer, size = self.out, INPUT_SIZE // 2
        elif stage == "out":
            k = width
            self.out = nn.Conv2d(width, width, 1)
            self._feature_layer, size = self.out, INPUT_SIZE
        else:
            raise ValueError(f"unknown stage {stage!r}")
        if fusion is not None and k != self.unet.bottleneck_channels:
            raise ValueError("high-level fusion needs as many final maps as bottleneck maps")
        self.head = ClassifierHead(
            k, num_classes, pool=pool, feature_size=size, fcf_pool=fcf_pool, fusion=fusion, hf_pool=hf_pool
        )
        self.map_kind = self.head.map_kind

    @property
    def feature_layer(self) -> nn.Module:
        return self._feature_layer

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, bottleneck = self.unet(x)
        g = self.out(y)
        if self.stage == "rb":
            g = self.residual(g)
        return g, (bottleneck if self.head.fusion is not None else None)


def _check(name: str, width: int, fcf_pool: str = "avg", hf_pool: str = "max", fusion: str = "sum") -> None:
    check_positive_int(name, "base_width", width)
    check_choice(name, "fcf_pool", fcf_pool, FCF_POOLS)
    check_choice(name, "hf_pool", hf_pool, HF_POOLS)
    check_choice(name, "fusion", fusion, FUSIONS[1:])


@register_model(
    "hesam",
    "Ours-HESAM: UNet + residual blocks + SAM head, high-level feature (GMP of the 256x4x4 "
    "bottleneck) summed into the SAM vector (score Eq. 12, map Eq. 11); g 256x16x16",
    map_kind="hesam",
    aliases=("ours-hesam", "u-gmp-rb-sam"),
    paper_name="Ours-HESAM",
)
def hesam(in_channels, num_classes=2, *, fcf_pool="avg", hf_pool="max", fusion="sum", base_width=64):
    _check("hesam", base_width, fcf_pool, hf_pool, fusion)
    return UNetClassifier(
        in_channels,
        num_classes,
        stage="rb",
        pool="sam",
        fusion=fusion,
        fcf_pool=fcf_pool,
        hf_pool=hf_pool,
        width=base_width,
    )


@register_model(
    "sam",
    "Ours-SAM: UNet + residual blocks + SAM head (AvgPool 5/2 -> per-map FC 36->1 -> FC), g 256x16x16",
    map_kind="sam",
    aliases=("ours-sam", "u-rb-sam"),
    paper_name="Ours-SAM",
)
def sam(in_channels, num_classes=2, *, fcf_pool="avg", base_width=64):
    _check("sam", base_width, fcf_pool)
    return UNetClassifier(
        in_channels, num_classes, stage="rb", pool="sam", fusion=None, fcf_pool=fcf_pool, width=base_width
    )


@register_model(
    "cam",
    "Ours-CAM: UNet + residual blocks + CAM head (GAP -> FC), g 256x16x16",
    map_kind="cam",
    aliases=("ours-cam",),
    paper_name="Ours-CAM",
)
def cam(in_channels, num_classes=2, *, base_width=64):
    _check("cam", base_width)
    return UNetClassifier(in_channels, num_classes, stage="rb", pool="gap", fusion=None, width=base_width)


@register_model(
    "he-cam",
    "Sec. 4.4's HE-CAM: UNet + residual blocks + CAM head whose GAP vector is summed with the "
    "high-level feature d (GMP of the bottleneck); map = CAM of g",
    map_kind="cam",
)
def he_cam(in_channels, num_classes=2, *, hf_pool="max", fusion="sum", base_width=64):
    _check("he-cam", base_width, hf_pool=hf_pool, fusion=fusion)
    return UNetClassifier(
        in_channels, num_classes, stage="rb", pool="gap", fusion=fusion, hf_pool=hf_pool, width=base_width
    )


@register_model(
    "baseline",
    "Table 2 Baseline (our reading): the UNet alone, GAP + FC on its 64 output maps of 32x32 "
    "(no residual blocks, no SAM, no high-level feature); its map is the CAM of those maps",
    map_kind="cam",
    paper_name="Baseline",
)
def baseline(in_channels, num_classes=2, *, base_width=64):
    _check("baseline", base_width)
    return UNetClassifier(in_channels, num_classes, stage="out", pool="gap", fusion=None, width=base_width)


@register_model(
    "u-sam",
    "Table 4 U+SAM (ablation baseline): UNet output to 256 maps of 16x16 by a stride-2 3x3 conv, "
    "no residual blocks, SAM head",
    map_kind="sam",
)
def u_sam(in_channels, num_classes=2, *, fcf_pool="avg", base_width=64):
    _check("u-sam", base_width, fcf_pool)
    return UNetClassifier(
        in_channels, num_classes, stage="conv", pool="sam", fusion=None, fcf_pool=fcf_pool, width=base_width
    )


@register_model(
    "u-gmp-sam",
    "Table 4 U+GMP+SAM: u-sam plus the high-level feature d (GMP of the bottleneck) fused into H",
    map_kind="hesam",
)
def u_gmp_sam(in_channels, num_classes=2, *, fcf_pool="avg", hf_pool="max", fusion="sum", base_width=64):
    _check("u-gmp-sam", base_width, fcf_pool, hf_pool, fusion)
    return UNetClassifier(
        in_channels,
        num_classes,
        stage="conv",
        pool="sam",
        fusion=fusion,
        fcf_pool=fcf_pool,
        hf_pool=hf_pool,
        width=base_width,
    )
