"""The settings of one cross-validation run: :class:`TrainConfig`, the one place their defaults live.

``nodulekit train``'s options and the grid take their defaults from here (the paper's, see
``nodulekit.training``); this module imports nothing heavy, so the CLI can read it at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nodulekit.errors import NodulekitError

SELECT_MODES = ("last", "val")
# What an epoch does with its last partial batch (docs/training.md, "Static shapes"):
# keep = train on it when it has at least 2 rows (the default; every existing result);
# drop = skip it, so every step has exactly batch_size rows (static shapes, for CUDA graphs).
LAST_BATCH_MODES = ("keep", "drop")
# Seeds reach numpy, scikit-learn's fold splitters and torch; 0 .. 2**32 - 1 is what all three take.
MAX_SEED = 2**32 - 1


def check_seed(seed: int, option: str = "--seed") -> None:
    """Refuse a seed that one of the seeded libraries would reject with a traceback."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise NodulekitError(f"{option} must be an integer from 0 to {MAX_SEED} (got {seed})")


@dataclass
class TrainConfig:
    """Settings of one cross-validation run (defaults = the paper's, see ``nodulekit.training``)."""

    arch: str = "hesam"
    model_options: dict[str, Any] = field(default_factory=dict)
    # 90 epochs = three learning-rate steps of 30 (5e-4, 5e-5, 5e-6): after the third
    # step the rate is too small to move the weights, so more epochs only cost time.
    epochs: int = 90
    batch_size: int = 32
    last_batch: str = "keep"  # see LAST_BATCH_MODES
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    seed: int = 0
    select: str = "last"
    val_fraction: float = 0.1
    device: str = "auto"
    # bf16 autocast and channels_last: True/False force, "auto" (or None) = measured before
    # training by nodulekit.execution.choose_execution (fastest variant that agrees with fp32)
    amp: bool | str | None = "auto"
    channels_last: bool | str | None = "auto"
    compile: bool = False
    # CUDA graphs (torch.compile mode "reduce-overhead") for the training step; CUDA only, needs last_batch="drop"
    cuda_graphs: bool = False
    # all requested folds in one batched computation (nodulekit.concurrent_folds); same numbers
    concurrent_folds: bool = False
    eval_batch_size: int = 512
    # nodulekit.recipes.Recipe; None = the paper's recipe (no hook runs)
    recipe: Any = None

    def validate(self) -> None:
        if self.epochs < 1:
            raise NodulekitError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 2:
            raise NodulekitError(f"--batch-size must be at least 2 for batch normalisation (got {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NodulekitError(f"--lr must be a positive number (got {self.lr})")
        if not 0.0 <= self.momentum < 1.0:
            raise NodulekitError(f"--momentum must be in [0, 1) (got {self.momentum})")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise NodulekitError(f"--lr-gamma must be in (0, 1] (got {self.lr_gamma})")
        check_seed(self.seed)
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise NodulekitError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.lr_step < 1:
            raise NodulekitError(f"--lr-step must be at least 1 (got {self.lr_step})")
        if self.select not in SELECT_MODES:
            raise NodulekitError(f"--select must be one of {', '.join(SELECT_MODES)} (got {self.select!r})")
        if self.select == "val" and not 0.0 < self.val_fraction < 0.5:
            raise NodulekitError(f"--val-fraction must be in (0, 0.5) (got {self.val_fraction})")
        if self.recipe is not None and self.recipe.ema_decay > 0 and self.select == "val":
            raise NodulekitError(
                "--select val cannot be combined with a recipe's EMA (it reports the averaged weights)"
            )
        if self.last_batch not in LAST_BATCH_MODES:
            raise NodulekitError(f"--last-batch must be one of {', '.join(LAST_BATCH_MODES)} (got {self.last_batch!r})")
        if self.cuda_graphs and self.last_batch != "drop":
            raise NodulekitError(
                "--cuda-graphs needs static shapes: add --last-batch drop (a last partial batch would be another graph)"
            )
        if self.cuda_graphs and self.concurrent_folds:
            raise NodulekitError("--cuda-graphs is not combined with --concurrent-folds; choose one")

    def check_device(self, device) -> None:
        """Refuse options the training device cannot honour (after ``resolve_device``)."""
        if self.cuda_graphs and device.type != "cuda":
            raise NodulekitError(f"--cuda-graphs needs a CUDA device; this run trains on {device} (drop --cuda-graphs)")
