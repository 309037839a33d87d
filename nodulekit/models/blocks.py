"""Small building blocks shared by several families (conv-BN-ReLU, UNet double conv, ResNet BasicBlock)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    # bias is redundant before BatchNorm
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    """Ronneberger's level block: two 3x3 convolutions, each with BN and ReLU (padded, so size is kept)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(conv_bn_relu(in_ch, out_ch), conv_bn_relu(out_ch, out_ch))


class BasicBlock(nn.Module):
    """He et al.'s basic residual block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus shortcut, ReLU.

    A 1x1 projection (with BN) replaces the identity shortcut when the stride or width changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def check_choice(model: str, option: str, value, choices) -> None:
    from nodulekit.errors import NodulekitError

    if value not in choices:
        raise NodulekitError(
            f"model {model!r}: option {option}={value!r} is not one of {', '.join(map(repr, choices))}"
        )


def check_positive_int(model: str, option: str, value) -> None:
    from nodulekit.errors import NodulekitError

    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NodulekitError(f"model {model!r}: option {option} must be a positive integer, not {value!r}")
