"""The interface every nodulekit classifier implements (docs/ARCHITECTURE.md, "Models")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nodulekit.constants import INPUT_SIZE
from nodulekit.errors import NodulekitError


def _exporting() -> bool:
    # Shape checks are Python control flow; skip them while tracing/exporting so
    # torch.onnx.export sees a graph without guards.
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing()


class NoduleClassifier(nn.Module):
    """Base class: a malignancy classifier over [B, C, 32, 32] patches.

    Subclasses set ``map_kind`` and ``head`` (a :class:`~nodulekit.models.heads.ClassifierHead`
    or ``None``), and implement :meth:`backbone` (x -> g, bottleneck maps or None)
    and the ``feature_layer`` property, or override :meth:`forward_features` entirely.
    ``arch`` and ``config`` are filled in by :func:`~nodulekit.models.create_model`.
    """

    def __init__(self, in_channels: int, num_classes: int = 2, map_kind: str | None = None):
        super().__init__()
        self.arch = type(self).__name__.lower()
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.config: dict[str, Any] = {}
        self.map_kind = map_kind
        self.head: nn.Module | None = None

    @property
    def high_level(self) -> bool:
        """Whether the head fuses a high-level feature d (``forward_features(x)["high_level"]`` is set)."""
        return getattr(self.head, "fusion", None) is not None

    # -- backbone -------------------------------------------------------------------------
    @property
    def feature_layer(self) -> nn.Module:
        """The module whose output is the final conv feature maps g (Grad-CAM hooks it)."""
        raise NotImplementedError

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(final conv feature maps g [B, K, h, w], bottleneck maps for the high-level feature d or None)."""
        raise NotImplementedError

    # -- the interface ----------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if _exporting():
            return
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise NodulekitError(
                f"{self.arch} expects input [B, {self.in_channels}, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``logits``, ``features`` (g), ``high_level`` (d or None), plus model-specific outputs."""
        self.check_input(x)
        g, high = self.backbone(x)
        out = self.head(g, high)
        return {"logits": out["logits"], "features": g, "high_level": out["high_level"]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["logits"]

    def activation_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, classes], maps [B, classes, h, w]) with M_c = sum_k gamma_k^c g_k (Eq. 2, 7 or 11)."""
        if self.map_kind is None:
            raise NodulekitError(
                f"model {self.arch!r} has no class activation map of its own (map_kind None); "
                "use Grad-CAM on its feature_layer instead"
            )
        out = self.forward_features(x)
        return out["logits"], self.head.activation_map(out["features"])

    def training_forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, auxiliary loss) of a training batch: the one forward training calls.

        ``batch`` holds ``x`` [B, C, 32, 32], ``y`` and, for multi-task models, ``mask`` and
        ``characteristics``. Training adds the auxiliary loss (0 for single-task models) to the
        cross-entropy; ``--compile`` compiles this method, so every model is compiled the same way.
        """
        outputs = self.forward_features(batch["x"])
        return outputs["logits"], self.auxiliary_loss(outputs, batch)

    def auxiliary_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """Extra training loss of multi-task models (added to the cross-entropy); 0 here.

        ``outputs`` is :meth:`forward_features`'s dict; ``batch`` may hold ``mask``
        [B, C, 32, 32] and ``characteristics`` [B, 8].
        """
        return outputs["logits"].new_zeros(())

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, in_channels={self.in_channels}, num_classes={self.num_classes}, map_kind={self.map_kind!r}"
