"""Training recipes: the paper's (the default) and a robust one beyond it.

A recipe is a set of switchable ingredients around the paper's training loop:

- in-plane augmentation of each training batch (flips, 90-degree rotations, small shifts
  and scales; a nodule has no canonical orientation), drawn from its own seeded stream so
  the paper's batch order is untouched;
- the loss targets: the hard label (paper), the readers' rating distribution (soft
  targets) or label smoothing;
- weight decay (overrides ``--weight-decay``) and dropout before the final linear layer;
- an exponential moving average (EMA) of the weights, reported instead of the last ones;
- test-time augmentation (TTA): the mean probability over the 8 flips/rotations (in the
  exported graph too, with each view's map turned back before the mean: :func:`tta_activation_map`);
- an ensemble over ``seeds`` training seeds (one RUNDIR per seed, averaged by
  :func:`ensemble_predictions`).

Training only ever transforms rows of the fold's training part (``_train_epoch`` draws
batches from them), so augmentation cannot carry a nodule or a patient across folds.
Ingredients are chosen by :func:`nodulekit.training.nested_selection`, a patient-grouped cross-validation
inside the training folds; the outer test fold is not even passed to it.

``paper`` changes nothing: no hook runs, and the numbers are those of a run without recipes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.errors import NodulekitError

TARGETS = ("hard", "readers", "smooth")
RECIPE_KEY = "training_recipe"  # the ONNX metadata entry holding the recipe (JSON)


@dataclass(frozen=True)
class Recipe:
    name: str = "paper"
    flips: bool = False
    rot90: bool = False
    shift_px: float = 0.0  # largest in-plane shift, in pixels of the 32 x 32 input
    scale: float = 0.0  # largest relative zoom in or out (0.1 = +-10 %)
    targets: str = "hard"  # hard | readers (the readers' rating distribution) | smooth
    label_smoothing: float = 0.0  # for targets = smooth
    weight_decay: float | None = None  # None: the run's --weight-decay
    dropout: float = 0.0  # before the model's final linear layer, training only
    ema_decay: float = 0.0  # per optimiser step; 0 = report the last weights
    # batch-norm statistics of the EMA weights: "recompute" (one pass over the training rows after
    # training, as torch.optim.swa_utils.update_bn does for SWA) or "average" (the EMA of the
    # running buffers, what runs before this option did: they do not match the averaged weights)
    ema_batch_norm: str = "recompute"
    tta: bool = False  # mean probability over the 8 flips/rotations at evaluation
    seeds: int = 1  # an ensemble over this many training seeds (one RUNDIR each)

    @property
    def augments(self) -> bool:
        return self.flips or self.rot90 or self.shift_px > 0 or self.scale > 0

    @property
    def is_paper(self) -> bool:
        return self == PAPER

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER = Recipe()
# Fixed before any result on the real data: each value is a common, mild choice.
ROBUST = Recipe(
    name="robust",
    flips=True,
    rot90=True,
    shift_px=2.0,
    scale=0.1,
    targets="readers",
    weight_decay=5e-4,
    dropout=0.2,
    ema_decay=0.98,
    tta=True,
    seeds=1,
)
RECIPES = {"paper": PAPER, "robust": ROBUST}


def _parse_value(key: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise NodulekitError(f"--recipe-opt {key} expects true or false, got {raw!r}")
    if kind is str:
        return str(raw)
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise NodulekitError(f"--recipe-opt {key} expects a number, got {raw!r}") from None


_KINDS = {
    "flips": bool,
    "rot90": bool,
    "shift_px": float,
    "scale": float,
    "targets": str,
    "label_smoothing": float,
    "weight_decay": float,
    "dropout": float,
    "ema_decay": float,
    "ema_batch_norm": str,
    "tta": bool,
    "seeds": int,
}


def resolve_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe ``name`` with ``overrides`` (ablations); one-line errors for unknown names and bad values."""
    if name not in RECIPES:
        raise NodulekitError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    changes = {}
    for key, raw in (overrides or {}).items():
        if key not in _KINDS:
            raise NodulekitError(f"unknown --recipe-opt {key!r}; known: {', '.join(_KINDS)}")
        changes[key] = None if key == "weight_decay" and raw in (None, "none") else _parse_value(key, raw, _KINDS[key])
    if changes:
        recipe = replace(recipe, **changes)
        if recipe != RECIPES[name]:
            recipe = replace(recipe, name=f"{name}+" + ",".join(f"{k}={v}" for k, v in sorted(changes.items())))
    check_values(recipe)
    return recipe


EMA_BATCH_NORM = ("recompute", "average")


def check_values(r: Recipe) -> None:
    if r.targets not in TARGETS:
        raise NodulekitError(f"recipe targets must be one of {', '.join(TARGETS)} (got {r.targets!r})")
    if r.ema_batch_norm not in EMA_BATCH_NORM:
        raise NodulekitError(
            f"recipe ema_batch_norm must be one of {', '.join(EMA_BATCH_NORM)} (got {r.ema_batch_norm!r})"
        )
    bad = [
        (name, value, rule)
        for name, value, ok, rule in (
            ("shift_px", r.shift_px, 0 <= r.shift_px <= 8, "in [0, 8]"),
            ("scale", r.scale, 0 <= r.scale < 0.5, "in [0, 0.5)"),
            ("label_smoothing", r.label_smoothing, 0 <= r.label_smoothing < 0.5, "in [0, 0.5)"),
            ("dropout", r.dropout, 0 <= r.dropout < 1, "in [0, 1)"),
            ("ema_decay", r.ema_decay, 0 <= r.ema_decay < 1, "in [0, 1)"),
            ("seeds", r.seeds, r.seeds >= 1, "at least 1"),
            ("weight_decay", r.weight_decay, r.weight_decay is None or r.weight_decay >= 0, ">= 0"),
        )
        if not ok or (isinstance(value, float) and not math.isfinite(value))
    ]
    if bad:
        name, value, rule = bad[0]
        raise NodulekitError(f"recipe {name} must be {rule} (got {value})")
    if r.targets == "smooth" and r.label_smoothing == 0:
        raise NodulekitError("recipe targets=smooth needs label_smoothing > 0")


def recipe_from_record(record: Any) -> Recipe:
    """The recipe recorded in run.json, a checkpoint or ONNX metadata (absent = the paper's)."""
    if record in (None, "", "unknown"):
        return PAPER
    if isinstance(record, str):
        record = json.loads(record)
    known = {f.name for f in fields(Recipe)}
    values = {k: v for k, v in dict(record).items() if k in known}
    if float(values.get("ema_decay", 0)) > 0 and "ema_batch_norm" not in values:
        values["ema_batch_norm"] = "average"  # recorded before the option existed: the buffers were averaged
    return Recipe(**values)


def check_applicable(recipe: Recipe, data) -> None:
    """Refuse ingredients the dataset cannot take (before anything is written)."""
    h, w = data.x.shape[-2:]
    if (recipe.rot90 or recipe.tta) and h != w:
        raise NodulekitError(
            f"recipe {recipe.name}: 90-degree rotations need square inputs, {data.path} has {h}x{w}; "
            "use --recipe-opt rot90=false --recipe-opt tta=false"
        )
    if recipe.targets == "readers":
        ratings = np.asarray(data.reader_malignancy, float)
        if ratings.ndim != 2 or not np.isfinite(ratings).any(axis=1).all():
            missing = len(ratings) if ratings.ndim != 2 else int((~np.isfinite(ratings).any(axis=1)).sum())
            raise NodulekitError(
                f"recipe {recipe.name}: soft targets from the readers need reader_malignancy ratings, but "
                f"{missing} of {len(data.y)} nodules in {data.path} have none; use --recipe-opt targets=hard or smooth"
            )


# ----------------------------------------------------------------------------- soft targets


def reader_soft_targets(ratings: np.ndarray, label_rule: Any = None) -> np.ndarray:
    """[N, 2] class distribution of the readers' calls under the label rule, one rating at a time.

    Each reader's rating is a call: malignant above ``malignant_above``, benign below
    ``benign_below``, half of each in between (a 3 under the paper's rule). Unrated
    positions (NaN) do not count.
    """
    from nodulekit.stats import _rule_thresholds

    above, below, _ = _rule_thresholds(label_rule)
    r = np.asarray(ratings, np.float64)
    rated = np.isfinite(r)
    vote = np.where(r > above, 1.0, np.where(r < below, 0.0, 0.5))
    p = np.where(rated, vote, 0.0).sum(axis=1) / np.maximum(rated.sum(axis=1), 1)
    return np.stack([1.0 - p, p], axis=1).astype(np.float32)


def smoothed_targets(y: np.ndarray, eps: float) -> np.ndarray:
    onehot = np.eye(2, dtype=np.float32)[np.asarray(y, np.int64)]
    return (onehot * (1.0 - eps) + eps / 2.0).astype(np.float32)


def target_table(recipe: Recipe, data) -> np.ndarray | None:
    """The per-row loss targets [N, 2], or None for hard labels."""
    if recipe.targets == "readers":
        return reader_soft_targets(data.reader_malignancy, data.label_rule)
    if recipe.targets == "smooth":
        return smoothed_targets(data.y, recipe.label_smoothing)
    return None


# ----------------------------------------------------------------------------- augmentation


# The 8 flips/rotations (k quarter turns, then a left-right flip or not), in the order TTA averages them.
DIHEDRAL = tuple((k, flip) for k in range(4) for flip in (False, True))


def _rot90(x, k: int):
    """``torch.rot90(x, k, dims=(-2, -1))`` written as flips and a transpose, which every ONNX exporter
    knows (the TorchScript one has no rot90)."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2, -1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def dihedral(x, k: int, flip: bool):
    """One of the 8 flips/rotations of the last two axes (exact, no interpolation)."""
    x = _rot90(x, k)
    return x.flip(-1) if flip else x


def undo_dihedral(x, k: int, flip: bool):
    """The inverse of :func:`dihedral`: a view's map turned back to the orientation of the input."""
    x = x.flip(-1) if flip else x
    return _rot90(x, -k)


def augment_batch(x, recipe: Recipe, generator, extra=()):
    """Each sample of ``x`` [B, C, H, W] flipped/rotated/shifted/scaled at random; ``extra``
    tensors of the same layout (masks) get the same transform, nearest-neighbour."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    dev = x.device
    rand = torch.rand((b, 4), generator=generator)  # drawn on the CPU: same numbers on every device
    k = torch.floor(rand[:, 0] * 4).long() if recipe.rot90 else torch.zeros(b, dtype=torch.long)
    flip = (rand[:, 1] < 0.5) if recipe.flips else torch.zeros(b, dtype=torch.bool)
    angle = k.double() * (math.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
    scale = 1.0 + recipe.scale * (2 * torch.rand(b, generator=generator).double() - 1)
    shift = recipe.shift_px * (2 * torch.rand((b, 2), generator=generator).double() - 1) * (2.0 / x.shape[-1])
    sx = torch.where(flip, -1.0, 1.0).double()
    theta = torch.zeros((b, 2, 3), dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx / scale, -sin / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx / scale, cos / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    others = [
        F.grid_sample(e.to(x.dtype), grid[: e.shape[0]], mode="nearest", padding_mode="border", align_corners=False)
        .round()
        .to(e.dtype)
        for e in extra
    ]
    return out, others


def tta_probabilities(model, x, index: np.ndarray, batch_size: int, amp: bool, predict_logits) -> np.ndarray:
    """Mean malignant-class probability over the 8 flips/rotations of rows ``index`` of ``x`` (eval mode)."""
    import torch

    probs = []
    for k, flip in DIHEDRAL:
        view = dihedral(x, k, flip)
        probs.append(torch.softmax(predict_logits(model, view, index, batch_size, amp), dim=1))
    return torch.stack(probs).mean(0)


def tta_activation_map(model, x):
    """Probabilities [B, classes] and activation map [B, classes, h, w] of ``model`` averaged over the
    8 flips/rotations of ``x`` (what an exported model of a TTA recipe computes).

    Each view's map is turned back to the orientation of ``x`` before the mean, so the mean map
    lies on ``x`` as an un-augmented map does. The 8 views go through the model as one batch.
    """
    import torch

    views = torch.cat([dihedral(x, k, flip) for k, flip in DIHEDRAL])
    logits, amap = model.activation_map(views)
    prob = torch.softmax(logits, dim=1).reshape(len(DIHEDRAL), -1, logits.shape[1]).mean(0)
    maps = amap.reshape(len(DIHEDRAL), -1, *amap.shape[1:])
    back = [undo_dihedral(maps[i], k, flip) for i, (k, flip) in enumerate(DIHEDRAL)]
    return prob, torch.stack(back).mean(0)


# ----------------------------------------------------------------------------- during training


def last_linear(model):
    import torch

    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linear[-1] if linear else None


class RecipeHooks:
    """What one fold's training asks of its recipe: batch transform, loss targets, weight averaging."""

    def __init__(self, recipe: Recipe, data, model, seed: int, device):
        import torch

        self.recipe = recipe
        self.generator = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
        table = target_table(recipe, data)
        self.targets = None if table is None else torch.from_numpy(table).to(device)
        self.ema = None
        if recipe.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
        if recipe.dropout > 0:
            head = last_linear(model)
            if head is None:
                raise NodulekitError(f"recipe dropout needs a linear output layer; {type(model).__name__} has none")
            p = recipe.dropout
            head.register_forward_pre_hook(
                lambda mod, args: (torch.nn.functional.dropout(args[0], p, mod.training),) + tuple(args[1:])
            )

    def batch(self, batch: dict) -> dict:
        if self.recipe.augments:
            extra = [batch["mask"]] if batch.get("mask") is not None else []
            batch["x"], others = augment_batch(batch["x"], self.recipe, self.generator, extra)
            if others:
                batch["mask"] = others[0]
        if self.targets is not None:
            batch["target"] = self.targets[batch["index"]]
        return batch

    def after_step(self, model) -> None:
        if self.ema is not None:
            self.ema.update_parameters(model)

    def refresh_batch_norm(self, model, x, train_index, batch_size: int) -> bool:
        """Recompute ``model``'s batch-norm statistics on the training rows (un-augmented), for EMA
        weights; True when it did. Averaged weights need their own statistics: the average of the
        running buffers belongs to no set of weights."""
        import torch
        from torch.optim.swa_utils import update_bn

        if self.ema is None or self.recipe.ema_batch_norm != "recompute":
            return False
        index = torch.as_tensor(np.asarray(train_index), device=x.device)
        batches = [x[index[i : i + batch_size]] for i in range(0, len(index), batch_size)]
        with torch.no_grad():
            update_bn(batches, model)
        model.eval()
        return True

    def reported_state(self, current: dict) -> dict:
        """Weights to report: the EMA's when averaging, else ``current``."""
        if self.ema is None:
            return current
        return {k: v.detach().to("cpu", copy=True) for k, v in self.ema.module.state_dict().items()}

    def state(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "ema": None if self.ema is None else {k: v.cpu() for k, v in self.ema.state_dict().items()},
        }

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        self.generator.set_state(state["generator"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


def hooks_for(recipe: Recipe | None, data, model, seed: int, device) -> RecipeHooks | None:
    """None for the paper's recipe (no hook runs at all)."""
    if recipe is None or recipe.is_paper:
        return None
    return RecipeHooks(recipe, data, model, seed, device)


# ----------------------------------------------------------------------------- runs and ensembles


def ensemble_predictions(rundirs: list[str | Path], folds: list[int] | None = None):
    """Mean test probability per nodule over several RUNDIRs of the same folds (a seed ensemble);
    ``folds``: only those test folds (e.g. the ones finished in every run)."""
    from nodulekit.stats import run_predictions

    frames = [run_predictions(r) for r in rundirs]
    if folds is not None:
        frames = [f[f["fold"].isin(folds)] for f in frames]
    frames = [f.set_index("nodule_id") for f in frames]
    first = frames[0]
    for r, f in zip(rundirs[1:], frames[1:], strict=True):
        if set(f.index) != set(first.index) or not (f.loc[first.index, "fold"] == first["fold"]).all():
            raise NodulekitError(f"{r} does not hold the same nodules in the same test folds as {rundirs[0]}")
    out = first.copy()
    out["prob"] = np.mean([f.loc[first.index, "prob"].to_numpy() for f in frames], axis=0)
    return out.reset_index()


# ----------------------------------------------------------------------------- nested selection


def training_part(data, outer_fold: int):
    """The rows of ``data`` outside test fold ``outer_fold``, as a dataset of their own.

    The returned object holds no row of the outer test fold, so nothing computed from it can
    depend on that fold.
    """
    import dataclasses

    keep = np.flatnonzero(data.fold != outer_fold)
    per_row = {
        f.name: getattr(data, f.name)[keep]
        for f in dataclasses.fields(data)
        if isinstance(getattr(data, f.name), np.ndarray) and len(getattr(data, f.name)) == len(data.y)
    }
    extras = {k: v[keep] for k, v in data.extras.items() if len(v) == len(data.y)}
    # a label, not a file: run.json and results say which rows these were
    label = Path(f"{data.path}[fold!={outer_fold}]")
    return dataclasses.replace(data, **per_row, extras=extras, path=label), keep


def inner_folds(data, n_folds: int, seed: int) -> np.ndarray:
    """Patient-grouped, stratified fold of each row (seeded)."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(data.y), -1, np.int64)
    split = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed % (2**32))
    for k, (_, test) in enumerate(split.split(np.zeros(len(data.y)), data.y, data.patient_id)):
        fold[test] = k
    return fold


def inner_dataset(data, outer_fold: int, n_inner: int, seed: int):
    """The training part of ``outer_fold`` with its own ``n_inner`` patient-grouped folds (nested selection's data)."""
    import dataclasses

    inner, _ = training_part(data, outer_fold)
    return dataclasses.replace(inner, fold=inner_folds(inner, n_inner, seed), attrs=dict(inner.attrs, n_folds=n_inner))
