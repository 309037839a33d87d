"""Activation maps of trained nodule classifiers: CAM, Grad-CAM, SAM, HESAM (paper Eq. 1-4, 7, 11).

The methods are small classes over one base, registered by name, in
:mod:`nodulekit.map_methods`: ``method(model, x) -> (logits [B, classes], maps [B, classes, h, w])``
for a whole batch at once. Maps live on the final feature grid ``g``
(``model.feature_layer``); ``upsample`` brings them to the 32x32 input grid.

- ``cam``: M_c = sum_k w_k^c g_k (Eq. 2) from a GAP head (``map_kind == "cam"``).
- ``gradcam``: ReLU(sum_k alpha_k^c g_k), alpha = spatial mean of d y^c / d g (Eq. 3-4);
  works on any model with a ``feature_layer``.
- ``sam``: M'_c = sum_k gamma_k^c g_k (Eq. 7), ``map_kind == "sam"``.
- ``hesam``: M^h_c = sum_k gamma_k^ch g_k (Eq. 11), ``map_kind == "hesam"``.
- ``sam-faithful`` / ``hesam-faithful``: F_c = sum_k gamma_k^c w_k g_k with the per-map FC
  weights spread back through AvgPool, so sum_{x,y} F_c + constants = the class score.
- ``he-cam`` / ``he-gradcam``: CAM / Grad-CAM of a model that adds the high-level
  feature d (Fig. 6); refused for models without one.

``run_maps`` applies a method to every nodule of a cross-validation RUNDIR with the
fold model that did not train on it (its test fold) and ``write_run_maps`` stores the
result as a ``maps`` artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodulekit.constants import CLASS_NAMES, INPUT_SIZE, MALIGNANT
from nodulekit.errors import NodulekitError
from nodulekit.map_methods import (  # noqa: F401 - the registry's names, as maps.* too
    MapMethod,
    check_method,
    get_method,
    has_high_level,
    map_methods,
    method_names,
    supported_methods,
)
from nodulekit.map_methods.gradcam import GradCAM  # noqa: F401
from nodulekit.run import Run

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def upsample(maps, size: int = INPUT_SIZE):
    """Bilinear resize of [N, C, h, w] maps to the input grid (numpy or torch in, same out)."""
    import torch
    import torch.nn.functional as F

    as_numpy = isinstance(maps, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(maps, np.float32)) if as_numpy else maps
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out.numpy() if as_numpy else out


def slice_duplicates(x: torch.Tensor) -> torch.Tensor:
    """Fig. 5 protocol: [B, C, H, W] -> [B*C, C, H, W], row b*C+s = slice s copied to all C channels."""
    b, c, h, w = x.shape
    return x.unsqueeze(2).expand(b, c, c, h, w).reshape(b * c, c, h, w)


def compute_maps(
    model: nn.Module,
    x: np.ndarray,
    method: str | MapMethod,
    *,
    batch_size: int = 64,
    device: str | None = None,
    per_slice: bool = False,
    progress: bool = False,
    execution=None,
) -> dict[str, np.ndarray]:
    """Maps of one model for inputs ``x`` [N, C, 32, 32], in batches.

    ``execution``: a ``nodulekit.execution.ExecutionChoice`` (bf16 autocast, channels_last);
    default plain fp32. Returns ``logits`` [N, classes], ``prob`` [N] (softmax, malignant), ``maps``
    [N, classes, h, w]; with ``per_slice`` also ``slice_maps`` [N, C, h, w] (malignant
    class, each slice duplicated to all channels) and ``slice_prob`` [N, C].
    """
    import torch
    from tqdm import tqdm

    from nodulekit.devices import resolve_device

    if batch_size < 1:
        raise NodulekitError(f"batch size must be at least 1, got {batch_size}")
    method = check_method(model, method) if isinstance(method, str) else method
    device = str(resolve_device(device or "auto"))  # auto, cpu, cuda, cuda:N; a bad name is one line
    model = model.to(device).eval()
    if execution is not None:
        model = execution.apply(model)
    autocast = execution.autocast if execution is not None else nullcontext
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1] != getattr(model, "in_channels", x.shape[1]):
        raise NodulekitError(
            f"inputs have shape {tuple(x.shape)}; the model expects [N, {getattr(model, 'in_channels', '?')}, 32, 32]"
        )
    parts: dict[str, list] = {"logits": [], "maps": [], "slice_maps": [], "slice_prob": []}
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc=f"{method.name} maps", unit="batch", disable=not progress):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        with autocast():
            logits, maps = method(model, xb)
        parts["logits"].append(logits.float().cpu())
        parts["maps"].append(maps.float().cpu())
        if per_slice:
            s_maps, s_prob = _slice_maps(model, method, xb, batch_size, autocast)
            parts["slice_maps"].append(s_maps)
            parts["slice_prob"].append(s_prob)
    if not parts["logits"]:
        raise NodulekitError("no inputs to compute maps for")
    out = {name: torch.cat(values).numpy() for name, values in parts.items() if values}
    out["prob"] = torch.softmax(torch.from_numpy(out["logits"]), dim=1)[:, MALIGNANT].numpy()
    return out


def _slice_maps(model, method: MapMethod, xb, batch_size: int, autocast):
    """Fig. 5: malignant maps [B, C, h, w] and probabilities [B, C] of each slice copied to all channels."""
    import torch

    s_logits, s_maps = [], []
    # Duplicated inputs are C times larger: chunk them to keep memory bounded.
    for chunk in torch.split(slice_duplicates(xb), batch_size):
        with autocast():
            lg, mp = method(model, chunk)
        s_logits.append(lg.float().cpu())
        s_maps.append(mp[:, MALIGNANT].float().cpu())
    n, c = xb.shape[:2]
    mp = torch.cat(s_maps)
    prob = torch.softmax(torch.cat(s_logits), dim=1)[:, MALIGNANT].reshape(n, c)
    return mp.reshape(n, c, *mp.shape[1:]), prob


# --------------------------------------------------------------------------------------
# Cross-validation runs: every nodule mapped by the fold model that did not train on it.


@dataclass
class RunMaps:
    """Maps of selected nodules of a run, in the order selected."""

    nodule_id: list[str]
    rows: np.ndarray
    maps: np.ndarray
    maps_up: np.ndarray
    prob: np.ndarray
    y: np.ndarray
    fold: np.ndarray
    method: str
    arch: str
    dataset: Path
    label_rule: Any = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)  # ExecutionChoice.as_dict()
    dataset_identity: dict[str, Any] | None = None  # of the dataset mapped (the run's)


def run_maps(
    rundir: str | Path,
    method: str,
    *,
    dataset: str | Path | None = None,
    nodules: Sequence[str] | None = None,
    per_slice: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    amp: bool | str | None = "auto",
    channels_last: bool | str | None = "auto",
) -> RunMaps:
    """Maps of ``method`` for the dataset's nodules (all, or ``nodules``), each by its test-fold model.

    ``amp``/``channels_last``: forced, or "auto" = ``nodulekit.execution.choose_execution``
    on the first fold's model and batch (probed only when the work is large enough).
    """
    from nodulekit.artifacts import check_finite_maps
    from nodulekit.devices import resolve_device

    run = Run(rundir)
    get_method(method)
    ds = run.load_dataset(dataset)
    rows = _select_rows(ds, nodules)
    fold = _test_fold_of(run, ds, rows)
    device = str(resolve_device(device or "auto"))  # auto, cpu, cuda, cuda:N; a bad name is one line
    results: dict[str, np.ndarray] = {}
    arch, execution = "", None
    for k in sorted(set(fold.tolist())):
        sel = np.flatnonzero(fold == k)
        model, _ = run.load_model(k, device)
        arch = getattr(model, "arch", type(model).__name__)
        check_method(model, method)
        if execution is None:  # once: every fold model has the same architecture
            steps = -(-len(rows) // batch_size) * (1 + (ds.channels if per_slice else 0))
            execution = _choose_execution(
                model, ds.x[rows[sel[:batch_size]]], method, device, amp, channels_last, steps
            )
        kw = dict(batch_size=batch_size, device=device, per_slice=per_slice, progress=progress, execution=execution)
        out = compute_maps(model, ds.x[rows[sel]], method, **kw)
        check_finite_maps(run.checkpoint_path(k), **out)  # a diverged fold model: say which, write nothing
        for name, value in out.items():
            results.setdefault(name, np.zeros((len(rows),) + value.shape[1:], value.dtype))[sel] = value
        del model
    extra = {"logits": results["logits"]}
    if per_slice:
        extra["slice_maps"] = results["slice_maps"]
        extra["slice_prob"] = results["slice_prob"]
    return RunMaps(
        nodule_id=[str(ds.nodule_id[r]) for r in rows],
        rows=rows,
        maps=results["maps"],
        maps_up=upsample(results["maps"]),
        prob=results["prob"],
        y=ds.y[rows],
        fold=fold,
        method=method,
        arch=arch,
        dataset=ds.path,
        label_rule=ds.label_rule,
        extra=extra,
        execution=execution.as_dict() if execution is not None else {},
        dataset_identity=ds.identity,
    )


def _choose_execution(model, x, method: str, device, amp, channels_last, steps: int):
    """bf16 / channels_last for map computation, probed on this model with the method itself."""
    import torch

    from nodulekit.execution import choose_execution

    def forward(m, xb):  # what is compared with fp32: logits and maps
        logits, maps = get_method(method)(m, xb)
        return torch.cat([logits.flatten(), maps.flatten()])

    example = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return choose_execution(
        model, example, device, amp, channels_last, train=False, forward_fn=forward, workload_steps=steps
    )


def _test_fold_of(run: Run, ds, rows: np.ndarray) -> np.ndarray:
    """The fold whose test set holds each of ``rows``; refuses rows no finished fold tested."""
    row_fold = np.full(len(ds), -1, np.int64)
    for k, index in run.test_rows(ds.nodule_id).items():
        row_fold[index] = k
    uncovered = rows[row_fold[rows] < 0]
    if uncovered.size:
        run.require_finished(ds.fold[uncovered], purpose=f" for {uncovered.size} of the requested nodules")
        raise NodulekitError(
            f"{run.path}: {uncovered.size} requested nodule(s) are in no fold's test set; wrong --dataset?"
        )
    return row_fold[rows]


def _select_rows(ds, nodules: Sequence[str] | None) -> np.ndarray:
    """Dataset rows of ``nodules`` in the order given (all rows when None)."""
    if not nodules:
        return np.arange(len(ds))
    where = {n: i for i, n in enumerate(ds.nodule_id.tolist())}
    unknown = [n for n in nodules if n not in where]
    if unknown:
        raise NodulekitError(
            f"{len(unknown)} nodule id(s) not in {ds.path}: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return np.array([where[n] for n in nodules], np.int64)


def write_run_maps(result: RunMaps, out: str | Path, *, rundir: str | Path, overwrite: bool = False) -> Path:
    """Store a ``RunMaps`` as a ``maps`` artifact (layout in docs/ARCHITECTURE.md)."""
    from nodulekit.artifacts import provenance, write_maps

    prov = provenance(
        stage="maps",
        rundir=str(Path(rundir).resolve()),
        dataset=str(Path(result.dataset).resolve()),
        method=result.method,
        description=get_method(result.method).description,
        label_rule=result.label_rule,
        class_index={name: i for i, name in enumerate(CLASS_NAMES)},
        map_model="each nodule's map comes from the fold model that had it in its test fold",
        per_slice="slice_maps" in result.extra,
        execution=result.execution,
    )
    return write_maps(
        out,
        nodule_id=result.nodule_id,
        maps=result.maps,
        maps_up=result.maps_up,
        prob=result.prob,
        method=result.method,
        arch=result.arch,
        source=str(Path(rundir).resolve()),
        prov=prov,
        y=result.y,
        fold=result.fold,
        extra=result.extra,
        overwrite=overwrite,
        dataset_identity=result.dataset_identity,
    )
