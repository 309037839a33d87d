"""Training with honest k-fold cross-validation (paper sections 4.1 and 4.2).

One RUNDIR holds one experiment: ``run.json`` (the settings every fold shares) and, per
test fold k, ``fold<k>/checkpoint.pt`` (rewritten atomically after every epoch, so an
interrupted run resumes) and ``fold<k>/result.h5`` (a ``fold_result`` artifact written
once the fold is finished).

Honesty rules enforced here:

- the test fold of each split is never used for a choice: by default the model of the
  last epoch is reported (``select="last"``); ``select="val"`` carves a validation
  split out of the training folds (grouped by patient, stratified, seeded) and reports
  the epoch with the best validation accuracy. The test fold is evaluated every epoch
  only to draw learning curves (paper Fig. 4);
- everything random is seeded from ``(seed, fold)``, so a fold trained alone
  (``--fold K``) gives the same numbers as in a full run on the same device.

Paper defaults: SGD, learning rate 5e-4 divided by 10 every 30 epochs, mini-batch 32,
weight decay 1e-4, cross-entropy loss. The paper does not state momentum; we use 0.9.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit import __version__, claims, crashes
from nodulekit.artifacts import provenance
from nodulekit.constants import MALIGNANT, THRESHOLD
from nodulekit.datasets import Dataset, identity_difference, load_dataset
from nodulekit.devices import resolve_device
from nodulekit.errors import NodulekitError
from nodulekit.run import (  # noqa: F401 - load_run, load_fold_model: the public names of the RUNDIR readers
    CHECKPOINT_FORMAT,
    HISTORY_COLUMNS,
    RUN_FORMAT,
    RunPaths,
    build_model,
    load_checkpoint,
    load_fold_model,
    load_run,
    prepare_rundir,
    save_checkpoint,
    write_fold_result,
)
from nodulekit.train_config import LAST_BATCH_MODES, SELECT_MODES, TrainConfig  # noqa: F401 - re-exported
from nodulekit.train_step import batch_loss, epoch_batches


class TrainingDiverged(NodulekitError):
    """The loss or the model's outputs became NaN/inf; the fold stops, its last good
    checkpoint is kept and no result is written. A run-time failure (exit status 1)."""

    exit_code = 1


# --------------------------------------------------------------------------- data


def fold_seed(seed: int, fold: int) -> int:
    """Independent, reproducible seed for one fold (same whether trained alone or not)."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def validation_split(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows into (train, val) positions: grouped by patient, stratified, seeded.

    ``1 / fraction`` stratified group folds are drawn and the first one is the validation
    part, so no patient is on both sides and both classes keep their proportions.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1.0 / fraction)))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise NodulekitError(f"--val-fraction {fraction} needs at least {n_splits} training patients, found {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % (2**32))
    train_pos, val_pos = next(splitter.split(np.zeros(len(y)), y, groups))
    return np.sort(train_pos), np.sort(val_pos)


@dataclass
class FoldSplit:
    fold: int
    train_index: np.ndarray
    test_index: np.ndarray
    val_index: np.ndarray | None


def fold_split(data: Dataset, fold: int, cfg: TrainConfig) -> FoldSplit:
    """Rows of the dataset used to train, validate and test one fold; refuses degenerate folds."""
    if not 0 <= fold < data.n_folds:
        raise NodulekitError(f"fold {fold} does not exist: {data.path} has folds 0..{data.n_folds - 1}")
    test_index = np.flatnonzero(data.fold == fold)
    train_index = np.flatnonzero(data.fold != fold)
    val_index = None
    if cfg.select == "val":
        tr, va = validation_split(
            data.y[train_index], data.patient_id[train_index], cfg.val_fraction, fold_seed(cfg.seed, fold)
        )
        train_index, val_index = train_index[tr], train_index[va]
    parts = [("training", train_index), ("test", test_index)] + (
        [("validation", val_index)] if val_index is not None else []
    )
    for part, index in parts:
        classes = np.unique(data.y[index])
        if len(classes) < 2:
            what = "no nodules" if len(classes) == 0 else f"only {'malignant' if classes[0] == 1 else 'benign'} nodules"
            raise NodulekitError(
                f"fold {fold}: the {part} part ({len(index)} rows) has {what}; both classes are needed"
            )
    return FoldSplit(fold, train_index, test_index, val_index)


# --------------------------------------------------------------------------- run.json


def _versions() -> dict[str, str]:
    import torch

    return {
        "nodulekit": __version__,
        "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def run_record(cfg: TrainConfig, data: Dataset, device, execution=None) -> dict[str, Any]:
    """Everything run.json records (see docs/ARCHITECTURE.md)."""
    from nodulekit.execution import default_execution

    execution = execution or default_execution(device, cfg.amp, cfg.channels_last)
    prov = provenance()
    return {
        "format": RUN_FORMAT,
        "arch": cfg.arch,
        "model_options": dict(cfg.model_options),
        "in_channels": data.channels,
        "num_classes": 2,
        "channels": data.channels,
        "dataset": {
            "path": str(Path(data.path).resolve()),
            "name": data.name,
            "fingerprint": data.fingerprint,
            "n": int(len(data.y)),
            "n_malignant": int(data.y.sum()),
            "split": data.split,
            "seed": data.identity["seed"],
        },
        # images, labels, masks and fold assignment: resume, --fold jobs and every consumer check it
        "dataset_identity": data.identity,
        "dataset_fingerprint": data.fingerprint,
        "n_folds": data.n_folds,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "last_batch": cfg.last_batch,
        "optimiser": {
            "name": "SGD",
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "nesterov": False,
        },
        "scheduler": {"name": "StepLR", "step_size": cfg.lr_step, "gamma": cfg.lr_gamma},
        "loss": "cross_entropy + model.auxiliary_loss",
        "selection": (
            {
                "mode": "val",
                "val_fraction": cfg.val_fraction,
                "split": "StratifiedGroupKFold by patient",
                "rule": "highest validation accuracy, then lowest validation loss, then earliest epoch",
            }
            if cfg.select == "val"
            else {"mode": "last", "rule": "model after the last epoch"}
        ),
        "threshold": THRESHOLD,
        "label_rule": data.label_rule,
        "normalisation": data.normalisation,
        "input_spec": data.input_spec.as_dict() if data.input_spec is not None else None,
        "device": str(device),
        "amp": execution.amp,
        "channels_last": execution.channels_last,
        "execution": execution.as_dict(),
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
        "versions": _versions(),
        "command": prov["command"],
        "created": prov["created"],
    } | ({} if cfg.recipe is None or cfg.recipe.is_paper else {"recipe": cfg.recipe.as_dict()})


# --------------------------------------------------------------------------- model I/O


def _model_config(model, cfg: TrainConfig) -> dict:
    config = getattr(model, "config", None)
    return dict(config) if isinstance(config, dict) else dict(cfg.model_options)


def _state_to_cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# --------------------------------------------------------------------------- the loop


class ValidationSelector:
    """Chooses the reported epoch from validation metrics only (never sees test data)."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.best_epoch: int | None = state.get("best_epoch")
        self.best_acc: float = state.get("best_acc", -math.inf)
        self.best_loss: float = state.get("best_loss", math.inf)

    def update(self, epoch: int, val_loss: float, val_acc: float) -> bool:
        """Record one epoch's validation metrics; True when it is the new best."""
        better = val_acc > self.best_acc or (val_acc == self.best_acc and val_loss < self.best_loss)
        if better:
            self.best_epoch, self.best_acc, self.best_loss = epoch, float(val_acc), float(val_loss)
        return better

    def state(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_acc": self.best_acc, "best_loss": self.best_loss}


class _DeviceData:
    """The whole dataset as tensors on the training device (no DataLoader, no copies per batch).

    Batches carry the targets of multi-task models too (``mask``, ``characteristics``); a
    model's ``training_forward`` uses what it needs.
    """

    def __init__(self, data: Dataset, device):
        import torch

        self.device = device
        self.x = torch.from_numpy(data.x).to(device)
        self.y = torch.from_numpy(data.y).to(device)
        self.mask = torch.from_numpy(np.ascontiguousarray(data.mask)).to(device)
        self.characteristics = torch.from_numpy(data.characteristics).to(device)

    def batch(self, idx) -> dict:
        return {
            "x": self.x[idx],
            "y": self.y[idx],
            "index": idx,
            "mask": self.mask[idx],
            "characteristics": self.characteristics[idx],
        }


def predict_logits(model, x, index: np.ndarray, batch_size: int = 512, amp: bool = False):
    """Logits (float32, CPU) of the rows ``index`` of device tensor ``x``, model in eval mode."""
    import torch

    model.eval()
    idx_all = torch.from_numpy(np.asarray(index, np.int64)).to(x.device)
    out = []
    with torch.no_grad(), _autocast(x.device, amp):
        for start in range(0, len(idx_all), batch_size):
            out.append(model(x[idx_all[start : start + batch_size]]).float())
    if not out:
        return torch.zeros((0, 2))
    return torch.cat(out).cpu()


def _score(logits, y) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    loss = float(F.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    return loss, acc


def divergence_message(fold: int, epoch: int, total: float) -> str:
    kept = f"the last good checkpoint (epoch {epoch - 1}) is kept" if epoch > 1 else "no checkpoint was written"
    return f"fold {fold} diverged in epoch {epoch}: training loss is {total}; {kept}; try a lower --lr"


def _train_epoch(
    model,
    forward,
    optimizer,
    dd: _DeviceData,
    train_index,
    generator,
    batch_size,
    amp,
    fold,
    epoch,
    last_batch="keep",
    hooks=None,
):
    """One pass over the fold's training rows in the generator's order; (train loss, train accuracy).

    A NaN/inf loss raises :class:`TrainingDiverged` before anything is saved.
    """
    import torch

    model.train()
    ce_sum = torch.zeros((), device=dd.device)
    total_sum = torch.zeros((), device=dd.device)
    correct = torch.zeros((), device=dd.device)
    seen = 0
    for idx in epoch_batches(train_index, generator, batch_size, last_batch, dd.device):
        batch = dd.batch(idx) if hooks is None else hooks.batch(dd.batch(idx))  # recipe: augment, targets
        with _autocast(dd.device, amp):
            loss, ce, logits = batch_loss(forward, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hooks is not None:
            hooks.after_step(model)  # recipe: weight averaging
        n = len(idx)
        seen += n
        ce_sum += ce.detach() * n
        total_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == batch["y"]).sum()
    # one host sync per epoch (cheap on GPU); a NaN step is caught here before any save
    total = float(total_sum) / max(seen, 1)
    if not math.isfinite(total):
        raise TrainingDiverged(divergence_message(fold, epoch, total))
    return float(ce_sum) / max(seen, 1), float(correct) / max(seen, 1)


def _paper_recipe():
    from nodulekit.recipes import PAPER

    return PAPER


def _autocast(device, amp: bool):
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()


# --------------------------------------------------------------------------- one fold, step by step


@dataclass
class TrainContext:
    """What every fold of one ``train`` call shares: data on the device, settings, run.json.

    Built once by :func:`train_context`. ``execution`` (a ``nodulekit.execution.ExecutionChoice``:
    bf16 autocast, memory format) is chosen before training by ``_choose_execution``.
    """

    data: Dataset
    cfg: TrainConfig
    rundir: Path
    run: dict
    device: Any
    execution: Any
    device_data: _DeviceData

    @property
    def amp(self) -> bool:
        return bool(self.execution.amp)


def train_context(
    data: Dataset, cfg: TrainConfig, rundir, *, run=None, device=None, device_data=None, execution=None
) -> TrainContext:
    """The shared set-up; ``execution`` defaults to ``cfg``'s options without probing."""
    from nodulekit.execution import default_execution

    device = device if device is not None else resolve_device(cfg.device)
    return TrainContext(
        data=data,
        cfg=cfg,
        rundir=Path(rundir),
        run=run if run is not None else load_run(rundir),
        device=device,
        execution=execution or default_execution(device, cfg.amp, cfg.channels_last),
        device_data=device_data if device_data is not None else _DeviceData(data, device),
    )


@dataclass
class FoldState:
    """Everything that changes while one fold trains; saved in its checkpoint after every epoch."""

    fold: int
    split: FoldSplit
    seed: int
    paths: RunPaths  # the RUNDIR's
    model: Any
    optimizer: Any
    scheduler: Any
    generator: Any  # batch order
    forward: Any = None  # the training forward (compiled with --compile)
    eval_model: Any = None  # the model scoring the test/validation rows each epoch (compiled with --compile)
    selector: ValidationSelector | None = None
    best_state: dict | None = None  # weights of the best validation epoch (select="val")
    epoch: int = 0  # epochs done
    history: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)  # wall time of each epoch (training + scoring)
    status: str = "trained"  # trained, resumed or finalised
    hooks: Any = None  # nodulekit.recipes.RecipeHooks (None for the paper's recipe)

    @property
    def fold_dir(self) -> Path:
        return self.paths.fold_dir(self.fold)

    @property
    def checkpoint_path(self) -> Path:
        return self.paths.checkpoint_path(self.fold)

    @property
    def result_path(self) -> Path:
        return self.paths.result_path(self.fold)


def make_optimizer(model, cfg: TrainConfig):
    """The paper's SGD (momentum 0.9, weight decay) for ``model``."""
    import torch

    wd = cfg.weight_decay if cfg.recipe is None or cfg.recipe.weight_decay is None else cfg.recipe.weight_decay
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)


def make_scheduler(optimizer, cfg: TrainConfig):
    """The paper's step schedule: learning rate / 10 every ``lr_step`` epochs."""
    import torch

    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


def new_fold_state(ctx: TrainContext, fold: int) -> FoldState:
    """A fresh fold: model initialised, optimiser, schedule and batch order seeded from (seed, fold)."""
    import torch

    cfg, seed = ctx.cfg, fold_seed(ctx.cfg.seed, fold)
    torch.manual_seed(seed)  # model initialisation
    model = ctx.execution.apply(build_model(cfg.arch, ctx.data.channels, 2, cfg.model_options).to(ctx.device))
    optimizer = make_optimizer(model, cfg)
    from nodulekit.recipes import hooks_for

    hooks = hooks_for(cfg.recipe, ctx.data, model, seed, ctx.device)
    torch.manual_seed(seed)  # dropout etc. start from the same state whether fresh or resumed
    return FoldState(
        hooks=hooks,
        fold=fold,
        split=fold_split(ctx.data, fold, cfg),
        seed=seed,
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg),
        generator=torch.Generator().manual_seed(seed),
        paths=RunPaths(ctx.rundir),
        selector=ValidationSelector() if cfg.select == "val" else None,
    )


def restore_fold_state(ctx: TrainContext, state: FoldState, ckpt: dict) -> None:
    """Continue ``state`` from a checkpoint written by :func:`checkpoint_dict`."""
    import torch

    resume = ckpt.get("resume") or {}
    state.model.load_state_dict(resume.get("model") or ckpt["state_dict"])
    state.optimizer.load_state_dict(resume["optimizer"])
    state.scheduler.load_state_dict(resume["scheduler"])
    state.generator.set_state(resume["generator"])
    torch.set_rng_state(resume["torch_rng"])
    if ctx.device.type == "cuda" and resume.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(resume["cuda_rng"], ctx.device)
    state.history = [list(map(float, row)) for row in resume.get("history", [])]
    state.val_history = [list(map(float, row)) for row in resume.get("val_history", [])]
    state.epoch_seconds = [float(t) for t in resume.get("epoch_seconds", [])]
    if state.hooks is not None:
        state.hooks.load_state(resume.get("recipe"))
    if state.selector is not None:
        state.selector = ValidationSelector(resume.get("selector"))
        state.best_state = ckpt["state_dict"] if state.selector.best_epoch is not None else None
    state.epoch = int(ckpt.get("epoch", 0))
    state.status = "resumed" if state.epoch < ctx.cfg.epochs else "finalised"


def _check_checkpoint_fits(ctx: TrainContext, path: Path, ckpt: dict) -> None:
    if ckpt.get("arch") != ctx.cfg.arch or int(ckpt.get("in_channels", -1)) != ctx.data.channels:
        raise NodulekitError(
            f"{path} is a {ckpt.get('arch')} model for {ckpt.get('in_channels')}-channel input, "
            f"not {ctx.cfg.arch} for {ctx.data.channels} channels; use a new -o RUNDIR or --overwrite"
        )
    diff = identity_difference(ckpt.get("dataset_identity"), ctx.data.identity)
    if diff is not None:
        raise NodulekitError(f"{path} was not trained on {ctx.data.path}: {diff}; use a new -o RUNDIR or --overwrite")


def start_fold(ctx: TrainContext, fold: int) -> FoldState | dict:
    """The fold's state, fresh or resumed from its checkpoint; a finished fold's summary instead."""
    import torch

    state = new_fold_state(ctx, fold)
    state.fold_dir.mkdir(parents=True, exist_ok=True)
    if state.checkpoint_path.exists():
        ckpt = load_checkpoint(state.checkpoint_path)
        _check_checkpoint_fits(ctx, state.checkpoint_path, ckpt)
        done = int(ckpt.get("epoch", 0))
        if ckpt.get("finished") and done >= ctx.cfg.epochs and state.result_path.exists():
            return {
                "fold": fold,
                "status": "skipped",
                "epochs": done,
                "epochs_run": 0,
                "selected_epoch": ckpt.get("selected_epoch"),
            }
        restore_fold_state(ctx, state, ckpt)
    state.forward = training_forward(state.model, ctx.cfg)
    state.eval_model = torch.compile(state.model) if ctx.cfg.compile else state.model
    return state


def training_forward(model, cfg: TrainConfig):
    """The model's training forward as the step runs it: as it is, compiled (``--compile``), or
    compiled into CUDA graphs (``--cuda-graphs``: mode "reduce-overhead", one graph per static shape)."""
    import torch

    if cfg.cuda_graphs:
        return torch.compile(model.training_forward, mode="reduce-overhead")
    return torch.compile(model.training_forward) if cfg.compile else model.training_forward


def checkpoint_dict(ctx: TrainContext, state: FoldState, finished: bool) -> dict:
    """The checkpoint of ``state`` (format ``CHECKPOINT_FORMAT``, read by :func:`nodulekit.run.load_checkpoint`)."""
    import torch

    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    current = _state_to_cpu(state.model.state_dict())
    if state.selector is not None:
        reported = state.best_state if state.best_state is not None else current
        selected = state.selector.best_epoch
    else:
        reported, selected = current, state.epoch
    if state.hooks is not None:
        reported = state.hooks.reported_state(reported)  # the EMA's weights when averaging
    raw_needed = state.selector is not None or (state.hooks is not None and state.hooks.ema is not None)
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": reported,
        "arch": cfg.arch,
        "in_channels": data.channels,
        "num_classes": 2,
        "config": _model_config(state.model, cfg),
        "epoch": state.epoch,
        "selected_epoch": selected,
        "select": cfg.select,
        "finished": finished,
        "fold": state.fold,
        "seed": cfg.seed,
        "fold_seed": state.seed,
        "dataset_fingerprint": data.fingerprint,
        "dataset_identity": data.identity,
        "dataset_name": data.name,
        "label_rule": json.dumps(data.label_rule, default=str),
        "normalisation": json.dumps(data.normalisation, default=str),
        "input_spec": json.dumps(data.input_spec.as_dict() if data.input_spec is not None else None),
        "device": str(device),
        "amp": ctx.amp,
        "channels_last": ctx.execution.channels_last,
        "execution": ctx.execution.as_dict(),
        "versions": _versions(),
        "recipe": (cfg.recipe or _paper_recipe()).as_dict(),
        "resume": {
            "recipe": state.hooks.state() if state.hooks is not None else None,
            "model": current if raw_needed else None,
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "generator": state.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": state.history,
            "val_history": state.val_history,
            "epoch_seconds": state.epoch_seconds,
            "selector": state.selector.state() if state.selector is not None else None,
        },
    }


def _evaluate(ctx: TrainContext, model, rows, fold: int, epoch: int, part: str) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on dataset rows ``rows``; non-finite outputs fail the fold."""
    logits = predict_logits(model, ctx.device_data.x, rows, ctx.cfg.eval_batch_size, ctx.amp)
    check_outputs(logits, fold, epoch, part)
    return _score(logits, ctx.data.y[rows])


def check_outputs(logits, fold: int, epoch: int, part: str) -> None:
    """A model whose outputs are NaN/inf (e.g. batch-norm statistics overflowed by a too large
    learning rate, while the training loss stayed finite) has failed: no result may claim it."""
    import torch

    bad = int((~torch.isfinite(logits).all(dim=1)).sum())
    if bad:
        kept = f"the last good checkpoint (epoch {epoch - 1}) is kept" if epoch > 1 else "no checkpoint was written"
        raise TrainingDiverged(
            f"fold {fold} failed in epoch {epoch}: its model's outputs on {bad} of {len(logits)} {part} rows are "
            f"not finite (NaN/inf); {kept} and no result is written; try a lower --lr"
        )


def run_epoch(ctx: TrainContext, state: FoldState) -> dict[str, float]:
    """Train one epoch, score it, save the checkpoint; returns the epoch's metrics."""
    started = time.perf_counter()
    args = (state.optimizer, ctx.device_data, state.split.train_index, state.generator, ctx.cfg.batch_size, ctx.amp)
    train_loss, train_acc = _train_epoch(
        state.model, state.forward, *args, state.fold, state.epoch + 1, last_batch=ctx.cfg.last_batch, hooks=state.hooks
    )
    return end_epoch(ctx, state, train_loss, train_acc, started)


def end_epoch(ctx: TrainContext, state: FoldState, train_loss: float, train_acc: float, started: float):
    """After an epoch's training pass (started at ``started``): step the schedule, score, save the checkpoint."""
    epoch = state.epoch + 1
    state.scheduler.step()
    # test fold: for the learning curves only, never for a choice
    test_loss, test_acc = _evaluate(ctx, state.eval_model, state.split.test_index, state.fold, epoch, "test")
    state.history.append([float(epoch), train_loss, train_acc, test_loss, test_acc])
    state.epoch_seconds.append(time.perf_counter() - started)
    metrics = {"train_loss": train_loss, "train_acc": train_acc}
    if state.selector is not None:
        val_loss, val_acc = _evaluate(ctx, state.eval_model, state.split.val_index, state.fold, epoch, "validation")
        state.val_history.append([float(epoch), val_loss, val_acc])
        if state.selector.update(epoch, val_loss, val_acc):
            state.best_state = _state_to_cpu(state.model.state_dict())
        metrics.update(val_loss=val_loss, val_acc=val_acc)
    state.epoch = epoch
    save_checkpoint(state.checkpoint_path, checkpoint_dict(ctx, state, finished=False))
    return metrics


def finish_fold(ctx: TrainContext, state: FoldState, epochs_before: int) -> dict[str, Any]:
    """Score the reported model (last or best-validation epoch) on the test fold, save the final
    checkpoint and ``result.h5``; returns the fold's summary."""
    import torch

    cfg = ctx.cfg
    final_ckpt = checkpoint_dict(ctx, state, finished=True)
    model = ctx.execution.apply(build_model(cfg.arch, ctx.data.channels, 2, cfg.model_options).to(ctx.device))
    model.load_state_dict(final_ckpt["state_dict"])
    # recipe: the EMA weights get batch-norm statistics of their own (training rows only)
    if state.hooks is not None and state.hooks.refresh_batch_norm(
        model, ctx.device_data.x, state.split.train_index, cfg.eval_batch_size
    ):
        final_ckpt["state_dict"] = _state_to_cpu(model.state_dict())
    logits = predict_logits(model, ctx.device_data.x, state.split.test_index, cfg.eval_batch_size, ctx.amp)
    if cfg.recipe is not None and cfg.recipe.tta:  # recipe: mean probability over the 8 flips/rotations
        from nodulekit.recipes import tta_probabilities

        args = (ctx.device_data.x, state.split.test_index, cfg.eval_batch_size, ctx.amp, predict_logits)
        logits = torch.log(tta_probabilities(model, *args).clamp_min(1e-12))
    check_outputs(logits, state.fold, state.epoch, "test")  # before the final checkpoint and result
    test_loss, test_acc = _score(logits, ctx.data.y[state.split.test_index])
    save_checkpoint(state.checkpoint_path, final_ckpt)
    write_result(
        state.result_path,
        data=ctx.data,
        split=state.split,
        cfg=cfg,
        run=ctx.run,
        history=state.history,
        val_history=state.val_history,
        epoch_seconds=state.epoch_seconds,
        test_prob=torch.softmax(logits, dim=1)[:, MALIGNANT].numpy().astype(np.float64),
        selected_epoch=final_ckpt["selected_epoch"],
        device=ctx.device,
        amp=ctx.amp,
        execution=ctx.execution,
    )
    return {
        "fold": state.fold,
        "status": state.status,
        "epochs": cfg.epochs,
        "epochs_run": cfg.epochs - epochs_before,
        "selected_epoch": final_ckpt["selected_epoch"],
        "test_acc": test_acc,
        "test_loss": test_loss,
    }


def train_fold(
    data: Dataset,
    cfg: TrainConfig,
    fold: int,
    rundir: str | os.PathLike,
    *,
    run: dict | None = None,
    device=None,
    device_data: _DeviceData | None = None,
    execution=None,
    progress: bool = True,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or skip if finished) one fold; returns a short summary.

    ``execution``: a ``nodulekit.execution.ExecutionChoice`` (bf16 autocast, memory
    format); default: the options of ``cfg`` without probing. ``on_epoch_end(fold,
    epoch, metrics)`` is called after each epoch's checkpoint is saved (an exception
    from it interrupts training like Ctrl-C would).
    """
    cfg.validate()
    ctx = train_context(data, cfg, rundir, run=run, device=device, device_data=device_data, execution=execution)
    state = start_fold(ctx, fold)
    if isinstance(state, dict):
        return state  # finished earlier: skipped
    epochs_before = state.epoch
    bar = None
    if progress and state.epoch < cfg.epochs:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=state.epoch, desc=f"{cfg.arch} fold {fold}", unit="epoch", leave=True)
    try:
        while state.epoch < cfg.epochs:
            metrics = run_epoch(ctx, state)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(fold, state.epoch, dict(metrics, epoch=state.epoch))
    finally:
        if bar is not None:
            bar.close()
    return finish_fold(ctx, state, epochs_before)


def write_result(
    path,
    *,
    data: Dataset,
    split: FoldSplit,
    cfg: TrainConfig,
    run: dict,
    history,
    val_history,
    epoch_seconds,
    test_prob,
    selected_epoch,
    device,
    amp,
    execution=None,
) -> Path:
    """Write one finished fold's ``result.h5`` with its provenance."""
    prov = provenance(
        stage="train",
        arch=cfg.arch,
        fold=split.fold,
        seed=cfg.seed,
        dataset=str(data.path),
        dataset_fingerprint=data.fingerprint,
        dataset_identity=data.identity,
        label_rule=data.label_rule,
        device=str(device),
        amp=amp,
        select=cfg.select,
        selected_epoch=selected_epoch,
        versions=_versions(),
    )
    test = split.test_index
    return write_fold_result(
        path,
        prov=prov,
        history=history,
        test_index=test,
        test_prob=test_prob,
        test_y=data.y[test],
        test_nodule_id=data.nodule_id[test],
        test_patient_id=data.patient_id[test],
        train_index=split.train_index,
        val_index=split.val_index,
        val_history=val_history,
        epoch_seconds=epoch_seconds,
        attrs={
            "fold": split.fold,
            "arch": cfg.arch,
            "dataset_name": data.name,
            "select": cfg.select,
            "selected_epoch": -1 if selected_epoch is None else int(selected_epoch),
            "epochs": cfg.epochs,
            "label_rule": data.label_rule,
            "dataset_identity": data.identity,
            "run": {k: run.get(k) for k in ("arch", "model_options", "seed", "n_folds", "dataset_fingerprint")},
        }
        # the variant this fold ran, how it was chosen, the probe's step times
        | ({"execution": execution.as_dict()} if execution is not None else {}),
    )


def train(
    dataset: str | os.PathLike,
    rundir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    folds: list[int] | None = None,
    n_folds: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    on_execution: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Cross-validate ``cfg.arch`` on a ``dataset`` artifact into RUNDIR.

    ``folds`` restricts the run to some test folds (several jobs may share one RUNDIR);
    ``n_folds`` must match the dataset's fold count when given. Every requested fold is
    checked before any training starts. A fold whose loss diverges stops with its last
    good checkpoint kept; the other folds still train, then a ``TrainingDiverged``
    error names the failed folds. ``on_execution(choice)`` gets the execution choice
    (``ExecutionChoice.as_dict()``) before the first fold trains.
    """
    import torch

    cfg.validate()
    data = load_dataset(dataset)
    if cfg.recipe is not None:
        from nodulekit.recipes import check_applicable

        check_applicable(cfg.recipe, data)  # before anything is written
    if n_folds is not None and n_folds != data.n_folds:
        raise NodulekitError(f"--folds {n_folds} does not match {dataset}, which was split into {data.n_folds} folds")
    wanted = sorted(set(range(data.n_folds) if not folds else folds))
    for k in wanted:
        fold_split(data, k, cfg)  # refuse degenerate folds before training anything
    device = resolve_device(cfg.device)
    cfg.check_device(device)
    # input shapes are fixed (32x32, batch 32), so cuDNN's autotuner pays off; restored afterwards
    benchmark_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or benchmark_flag
    try:
        return _train_folds(data, cfg, rundir, wanted, device, overwrite, progress, on_epoch_end, on_execution)
    finally:
        torch.backends.cudnn.benchmark = benchmark_flag


def _train_folds(data, cfg, rundir, wanted, device, overwrite, progress, on_epoch_end, on_execution=None):
    import torch

    # fork_rng: training seeds itself per fold and leaves the caller's random state alone
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # build one model now so an unknown --arch or bad --model-opt fails before anything is written
        torch.manual_seed(cfg.seed)  # the probe model (below) is the same every time
        probe = build_model(cfg.arch, data.channels, 2, cfg.model_options)
        cfg = replace(cfg, model_options=_model_config(probe, cfg))  # every option, defaults included
        if overwrite:
            claims.refuse_if_claimed(rundir)  # never discard folds another job is training
        dd = _DeviceData(data, device)  # once for all folds
        # bf16 / channels_last: a bad forced option fails here, before anything is written
        recorded = load_run(rundir).get("execution") if (Path(rundir) / "run.json").exists() else None
        if recorded is not None:
            crashes.collect(rundir)  # folds that died by a signal: the choice avoids their variant
        execution, watched = _choose_execution(probe, data, cfg, dd, wanted, None if overwrite else recorded, rundir)
        subset = wanted if len(wanted) < data.n_folds else None  # --fold K: --overwrite discards only those
        run = prepare_rundir(rundir, run_record(cfg, data, device, execution), overwrite=overwrite, folds=subset)
        theirs = run.get("execution", {}).get("variant")
        crashed = str(execution.rejected.get(theirs, "")).startswith("crashed")  # then it is not run again
        if execution.how == "probed" and theirs not in (None, execution.variant) and not crashed:
            # a concurrent job created run.json first: run as it does, one choice per RUNDIR
            execution, watched = _choose_execution(probe, data, cfg, dd, wanted, run["execution"], rundir)
        del probe
        if on_execution is not None:
            on_execution(execution.as_dict())
        summaries, failures = [], []
        side_by_side = cfg.concurrent_folds and _side_by_side_possible(cfg, run, execution)
        # one job per fold: claim every requested fold before training any of them
        with (
            claims.claimed(RunPaths(rundir).fold_dir(k) for k in wanted),
            crashes.watch(rundir, wanted, dict(watched, variant=execution.variant), clear=True) as watch,
        ):
            if side_by_side:
                ctx = train_context(data, cfg, rundir, run=run, device=device, device_data=dd, execution=execution)
                summaries, failures = train_side_by_side(ctx, wanted, progress=progress, on_epoch_end=on_epoch_end)
            for k in [] if side_by_side else wanted:
                watch.at([k])
                try:
                    summaries.append(
                        train_fold(
                            data,
                            cfg,
                            k,
                            rundir,
                            run=run,
                            device=device,
                            device_data=dd,
                            execution=execution,
                            progress=progress,
                            on_epoch_end=on_epoch_end,
                        )
                    )
                except TrainingDiverged as exc:
                    failures.append(str(exc))
    if failures:
        raise TrainingDiverged(" | ".join(failures))
    return {"rundir": str(rundir), "run": run, "folds": summaries, "execution": execution.as_dict()}


# --------------------------------------------------------------------------- folds side by side (nodulekit.concurrent_folds)


class _FoldRng:
    """Each fold's own global random state, as sequential training leaves it for that fold's checkpoints."""

    def __init__(self, device):
        self.device = device
        self.states: dict[int, tuple] = {}

    def save(self, fold: int) -> None:
        import torch

        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.states[fold] = (torch.get_rng_state(), cuda)

    def load(self, fold: int) -> None:
        import torch

        cpu, cuda = self.states[fold]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)


def train_side_by_side(ctx, folds: list[int], *, progress: bool = True, on_epoch_end=None):
    """Train ``folds`` of one run side by side (``nodulekit.concurrent_folds``); (per-fold summaries,
    divergence messages).

    The steps around each epoch (start_fold, end_epoch, finish_fold) are the sequential ones, so checkpoints, resume and results stay per fold and unchanged. Folds
    resumed at different epochs catch up: each joint epoch trains the folds that are furthest
    behind, until all are at the same epoch and train together.
    """
    rng, summaries, pending = _FoldRng(ctx.device), [], []
    for k in folds:
        state = start_fold(ctx, k)
        if isinstance(state, dict):
            summaries.append(state)  # finished earlier: skipped
        else:
            rng.save(k)
            pending.append(state)
    before = {s.fold: s.epoch for s in pending}
    bars = _bars(ctx, pending) if progress else {}
    failures = []
    try:
        while pending:
            group = [s for s in pending if s.epoch == min(p.epoch for p in pending)]
            if group[0].epoch >= ctx.cfg.epochs:  # resumed after its last epoch: only the results are missing
                done = group
            else:
                done, failed = _joint_epoch(ctx, group, rng, bars, on_epoch_end)
                failures += failed
                pending = [s for s in pending if s.fold not in {f for f, _ in failed}]
            for state in [s for s in done if s.epoch >= ctx.cfg.epochs]:
                rng.load(state.fold)
                pending.remove(state)
                try:
                    summaries.append(finish_fold(ctx, state, before[state.fold]))
                except TrainingDiverged as exc:  # non-finite final outputs: this fold fails alone
                    failures.append((state.fold, str(exc)))
    finally:
        for bar in bars.values():
            bar.close()
    return sorted(summaries, key=lambda s: s["fold"]), [message for _, message in failures]


def _joint_epoch(ctx, group, rng, bars, on_epoch_end):
    """One epoch of ``group`` side by side, then each fold's scoring and checkpoint; (trained, [(fold, why)])."""
    import warnings

    from nodulekit import concurrent_folds

    started = time.perf_counter()
    results = concurrent_folds.train_epoch_side_by_side(
        group, ctx.device_data, ctx.cfg.batch_size, ctx.amp, ctx.cfg.last_batch
    )
    trained, failed = [], []
    for state, result in zip(group, results, strict=True):
        if not math.isfinite(result.total_loss):
            failed.append((state.fold, divergence_message(state.fold, state.epoch + 1, result.total_loss)))
            continue
        rng.load(state.fold)
        with warnings.catch_warnings():
            # the fold's own SGD did not step (the stacked one did, for it): not the misuse torch warns of
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            try:
                metrics = end_epoch(ctx, state, result.train_loss, result.train_acc, started)
            except TrainingDiverged as exc:  # non-finite outputs: nothing saved for this epoch
                failed.append((state.fold, str(exc)))
                continue
        trained.append(state)
        if state.fold in bars:
            bars[state.fold].set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
            bars[state.fold].update(1)
        if on_epoch_end is not None:
            on_epoch_end(state.fold, state.epoch, dict(metrics, epoch=state.epoch))
    return trained, failed


def _bars(ctx, states) -> dict:
    from tqdm.auto import tqdm

    return {
        s.fold: tqdm(total=ctx.cfg.epochs, initial=s.epoch, desc=f"{ctx.cfg.arch} fold {s.fold} (side by side)",
                     unit="epoch", leave=True, position=i)
        for i, s in enumerate(states)
    }  # fmt: skip


def _side_by_side_possible(cfg: TrainConfig, run: dict, execution) -> bool:
    """Whether ``cfg.arch`` can train side by side; if not, say why on stderr (its folds then run in turn)."""
    import sys

    import torch

    from nodulekit.concurrent_folds import refusal

    with torch.device("meta"):  # structure only, no memory
        reason = refusal(build_model(cfg.arch, run["in_channels"], 2, cfg.model_options))
    if reason is None and cfg.recipe is not None and not cfg.recipe.is_paper:
        reason = f"recipe {cfg.recipe.name} has no side-by-side implementation"
    if reason is not None:
        print(f"nodulekit: {reason}; its folds train one after another", file=sys.stderr)
    return reason is None


def probe_loss(model, batch):
    """The training loss as the execution probe computes it (a module-level function: probes run in a child)."""
    return batch_loss(model.training_forward, batch)[0]


def _choose_execution(model, data, cfg, dd, wanted, recorded, rundir):
    """Probe the execution variants (in a child process) on this run's model and the shapes training
    uses: a training batch, the epoch's last partial batch, the evaluation batch; or reuse ``recorded``.
    Returns the choice and what a crash record names (machine, workload)."""
    import torch

    from nodulekit.execution import choose_execution, machine_key, workload_key

    split = fold_split(data, wanted[0], cfg)
    train_index, rows = split.train_index, torch.from_numpy(split.train_index)
    example = dd.batch(rows[: cfg.batch_size].to(dd.device))
    extra = []
    if cfg.last_batch == "keep" and len(train_index) % cfg.batch_size >= 2:  # see train_step.epoch_batches
        extra.append(("last partial batch", dd.batch(rows[: len(train_index) % cfg.batch_size].to(dd.device)), "step"))
    n_eval = min(cfg.eval_batch_size, len(split.test_index))  # predict_logits' first chunk of the test rows
    extra.append(("evaluation batch", {"x": dd.x[torch.from_numpy(split.test_index[:n_eval]).to(dd.device)]}, "eval"))
    steps = cfg.epochs * math.ceil(len(train_index) / cfg.batch_size) * len(wanted)
    rundir = rundir if (Path(rundir) / "run.json").exists() else None  # crash records go there once it exists
    choice = choose_execution(
        model,
        example,
        dd.device,
        cfg.amp,
        cfg.channels_last,
        loss_fn=probe_loss,
        lr=cfg.lr,
        workload_steps=steps,
        recorded=recorded,
        extra=tuple(extra),
        isolate=True,
        rundir=rundir,
        convert_input=False,  # training feeds its batches as they are (NCHW), whatever the weights' format
    )
    return choice, {"machine": machine_key(dd.device), "workload": workload_key(model, example)}


# --------------------------------------------------------------------------- nested selection of a recipe


def nested_selection(
    data, outer_fold: int, candidates: dict[str, Any], cfg, workdir, *, n_inner: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Choose among ``candidates`` by patient-grouped CV inside the training folds of ``outer_fold``.

    Each candidate trains ``n_inner`` times on the inner training folds and is scored by the
    pooled AUC of its inner test predictions; the highest wins (ties: the first listed). The
    outer test fold's rows are removed before anything else (:func:`training_part`).
    """
    from nodulekit.recipes import inner_dataset
    from nodulekit.run import read_fold_result
    from nodulekit.stats import roc_auc

    inner = inner_dataset(data, outer_fold, n_inner, seed)
    scores = {}
    for name, recipe in candidates.items():
        rcfg = replace(cfg, recipe=recipe, concurrent_folds=False)
        prob = np.full(len(inner.y), np.nan)
        rundir = Path(workdir) / f"outer{outer_fold}" / name
        rundir.mkdir(parents=True, exist_ok=True)
        run = run_record(rcfg, inner, resolve_device(rcfg.device))
        for k in range(n_inner):
            train_fold(inner, rcfg, k, rundir, run=run, progress=False)
            res = read_fold_result(rundir / f"fold{k}" / "result.h5", k)
            prob[np.asarray(res.test_index)] = res.test_prob
        scores[name] = float(roc_auc(inner.y, prob)[0])
    best = max(candidates, key=lambda n: (scores[n], -list(candidates).index(n)))
    return {"outer_fold": outer_fold, "scores": scores, "chosen": best, "n_inner": n_inner}
