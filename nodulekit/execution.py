"""The fastest correct way to run a model here: bf16 autocast and channels_last, chosen by measuring.

Whether bf16 autocast or the channels_last memory format pays depends on the CPU (AMX,
AVX-512 BF16, neither), the GPU, the model and the batch, so it is measured, not guessed
from CPU flags: ``choose_execution`` times a few real steps of each candidate variant
(fp32, bf16, each with and without channels_last) on throw-away copies of the caller's
model and batch, and keeps the fastest whose outputs agree with fp32 within
``TOLERANCE``. Options set explicitly (``amp=True/False``, ``channels_last=True/False``)
are never probed, only checked to run. The probe runs under ``torch.random.fork_rng``
on copies, so the caller's model, batch-norm statistics and random state are untouched.

Stages call it once before their loop and apply the choice::

    choice = choose_execution(model, batch, device, amp="auto", channels_last="auto")
    model = choice.apply(model)
    with choice.autocast():
        ...
    record["execution"] = choice.as_dict()
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from nodulekit.errors import NodulekitError

AUTO = "auto"
# A variant is correct when its probe outputs (the losses of the probe's training steps,
# or the outputs of inference) differ from fp32's by at most this, as a relative L2
# distance. bf16 keeps 8 significant bits (rounding error 2^-9 ~ 0.2 % per operation);
# on the first steps of hesam, sam-style heads, pn-samp, resnet18 and vgg16, full and
# reduced width, it moved the losses by at most 0.3 % and the logits by at most 0.55 %
# (same batches, same dropout masks). 2 % is about 4x that; a real fault (a wrong memory
# layout, an overflow, a broken kernel) moves them by far more.
TOLERANCE = 0.02
WARMUP_STEPS = 1  # first call: oneDNN/cuDNN kernel selection and allocations, not timed
TIMED_STEPS = 2  # the fastest of these counts (least disturbed by other load)
# A probe costs about 4 variants x 3 steps; on fewer steps of real work than this it
# would be more than ~5 % of the run, so the default is used without probing.
MIN_WORKLOAD_STEPS = 240
# A variant replaces the default only when at least this much faster (else timing noise
# would switch a run's numerics for nothing).
MIN_GAIN = 0.05
PROBE_SEED = 12345  # same dropout masks for every variant, step by step
# (amp, channels_last) in order of preference on a tie
VARIANTS = ((False, False), (False, True), (True, False), (True, True))
_FAILURES = (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError)


def variant_name(amp: bool, channels_last: bool) -> str:
    return ("bf16" if amp else "fp32") + ("+channels_last" if channels_last else "")


@lru_cache(maxsize=1)
def cpu_features() -> dict[str, Any]:
    """CPU model and the flags that matter for bf16 (recorded with every figure, never used to decide)."""
    import torch

    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_info(device) -> dict[str, Any]:
    """``cpu_features()`` plus the GPU's name when ``device`` is a CUDA device."""
    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if _device_type(device) == "cuda" else None
    return dict(cpu_features(), gpu=gpu)


@dataclass(frozen=True)
class ExecutionChoice:
    """How a stage runs its model: bf16 autocast or not, channels_last or not, and why."""

    device: str
    amp: bool
    channels_last: bool
    how: str  # "probed", "forced", "default" (not probed) or "recorded" (reused from an earlier run)
    reason: str
    step_seconds: dict[str, float] = field(default_factory=dict)  # fastest timed step per variant
    rel_diff: dict[str, float] = field(default_factory=dict)  # relative L2 distance of outputs to fp32
    rejected: dict[str, str] = field(default_factory=dict)  # variant -> why it was not eligible
    tolerance: float = TOLERANCE
    probe: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return variant_name(self.amp, self.channels_last)

    def autocast(self):
        """Context manager: bf16 autocast when chosen, else nothing."""
        import torch

        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=_device_type(self.device), dtype=torch.bfloat16)

    def apply(self, model):
        """The model in the chosen memory format (in place, like ``Module.to``)."""
        import torch

        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x):
        """A [B, C, H, W] batch in the chosen memory format."""
        import torch

        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), variant=self.variant)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ExecutionChoice:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def _device_type(device) -> str:
    return str(device).split(":")[0]


def _option(name: str, value) -> bool | str:
    if value is None or value == AUTO:
        return AUTO
    if isinstance(value, bool):
        return value
    raise NodulekitError(f"{name} must be on, off or auto (got {value!r})")


def default_execution(device, amp=AUTO, channels_last=AUTO, reason: str = "") -> ExecutionChoice:
    """Without probing: bf16 autocast on CUDA GPUs with bf16, fp32 elsewhere; contiguous memory."""
    amp, channels_last = _option("--amp", amp), _option("--channels-last", channels_last)
    if amp == AUTO:
        amp = _device_type(device) == "cuda" and _cuda_bf16(device)
    if channels_last == AUTO:
        channels_last = False
    return ExecutionChoice(
        str(device),
        bool(amp),
        bool(channels_last),
        "default",
        reason or "default (not probed)",
        machine=machine_info(device),
    )


def _cuda_bf16(device) -> bool:
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch
        return bool(torch.cuda.is_bf16_supported())


def _as_batch(example, device) -> dict:
    import torch

    batch = dict(example) if isinstance(example, dict) else {"x": example}
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "y" not in batch:
        batch["y"] = torch.arange(len(batch["x"]), device=device) % 2
    return batch


def _cross_entropy(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(model(batch["x"]).float(), batch["y"])


def train_step(loss_fn: Callable | None = None, lr: float = 5e-4, momentum: float = 0.9):
    """Probe workload: ``loss_fn(model, batch)`` (default cross-entropy), backward, one SGD step."""
    import torch

    loss_fn = loss_fn or _cross_entropy

    def start(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

        def run(batch, autocast):
            with autocast:
                loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            return loss.detach().float().reshape(1)

        return run

    return start


def infer_step(forward_fn: Callable | None = None):
    """Probe workload: ``forward_fn(model, x)`` (default: logits without gradients), model in eval mode."""
    import torch

    def default(model, x):
        with torch.no_grad():
            return model(x)

    forward_fn = forward_fn or default

    def start(model):
        model.eval()

        def run(batch, autocast):
            with autocast:
                return forward_fn(model, batch["x"]).detach().float()

        return run

    return start


def _timed(device):
    import torch

    def time_step(variant: str, run: Callable[[], Any]) -> tuple[float, Any]:
        if _device_type(device) == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = run()
        if _device_type(device) == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    return time_step


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def probe_variants(model, batch, device, variants, step, *, steps: int, time_step=None) -> dict[str, dict]:
    """Run ``steps`` steps of each (amp, channels_last) variant round-robin on copies of ``model``.

    Round-robin (one step of each variant per round, same batch, same random state) makes
    the variants share whatever load the machine has. Returns, per variant name,
    ``seconds`` (per step), ``outputs`` (concatenated step outputs, CPU float) or ``error``.
    """
    import torch

    time_step = time_step or _timed(device)
    cuda = [torch.device(device)] if _device_type(device) == "cuda" else []
    names = [variant_name(a, c) for a, c in variants]
    out: dict[str, dict] = {n: {"seconds": [], "outputs": []} for n in names}
    with torch.random.fork_rng(devices=cuda):
        runs = {}
        for (amp, cl), name in zip(variants, names, strict=True):
            choice = ExecutionChoice(str(device), amp, cl, "probe", "")
            copy_ = choice.apply(copy.deepcopy(model).to(device))
            b = dict(batch, x=choice.input(batch["x"]))
            runs[name] = (step(copy_), b, choice)
        for i in range(steps):
            for name, (run, b, choice) in runs.items():
                if "error" in out[name]:
                    continue
                torch.manual_seed(PROBE_SEED + i)
                try:
                    seconds, value = time_step(name, lambda run=run, b=b, c=choice: run(b, c.autocast()))
                except _FAILURES as exc:
                    out[name]["error"] = _first_line(exc)
                    continue
                out[name]["seconds"].append(float(seconds))
                out[name]["outputs"].append(value.detach().float().cpu().flatten())
        del runs
    for r in out.values():
        r["outputs"] = torch.cat(r["outputs"]) if r["outputs"] and "error" not in r else None
    return out


def relative_difference(a, b) -> float:
    """||a - b|| / ||b|| (inf when ``a`` is not finite)."""
    import torch

    if a is None or not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _check_forced(model, batch, device, amp: bool, channels_last: bool, step) -> None:
    """One step of each forced part; a clear error naming the option that cannot run."""
    import torch

    if amp and _device_type(device) == "cuda" and not _cuda_bf16(device):
        raise NodulekitError(f"--amp: {torch.cuda.get_device_name(device)} has no bf16 support; use --no-amp")
    checks = [("--amp", (True, False))] if amp else []
    checks += [("--channels-last", (False, True))] if channels_last else []
    checks += [("--amp with --channels-last", (True, True))] if amp and channels_last else []
    if not checks:
        return
    untimed = lambda variant, run: (0.0, run())  # noqa: E731 - checked to run, not timed
    results = probe_variants(model, batch, device, [v for _, v in checks], step, steps=1, time_step=untimed)
    for option, variant in checks:
        error = results[variant_name(*variant)].get("error")
        if error:
            what = (
                f"the model does not run in channels_last memory format on {device}"
                if option == "--channels-last"
                else f"bf16 autocast cannot run this model on {device}"
            )
            raise NodulekitError(f"{option}: {what} ({error}); leave the option out to choose automatically")


def choose_execution(
    model,
    example,
    device,
    amp: bool | str | None = AUTO,
    channels_last: bool | str | None = AUTO,
    *,
    train: bool = True,
    loss_fn: Callable | None = None,
    forward_fn: Callable | None = None,
    lr: float = 5e-4,
    workload_steps: int | None = None,
    recorded: ExecutionChoice | dict | None = None,
    time_step: Callable | None = None,
) -> ExecutionChoice:
    """The fastest variant of running ``model`` on batches like ``example`` that agrees with fp32.

    ``example``: a [B, C, H, W] tensor or a batch dict with ``x`` (and ``y`` and whatever
    ``loss_fn`` needs). ``train``: time forward + ``loss_fn`` + backward + SGD step
    (``train_step``), else ``forward_fn`` (default: the logits, no gradients). ``amp`` and
    ``channels_last``: ``"auto"``/``None`` probe, ``True``/``False`` force (checked to run,
    not timed). ``workload_steps``: how many such steps the caller will run; below
    ``MIN_WORKLOAD_STEPS`` nothing is probed. ``recorded``: a choice made earlier for the
    same run (e.g. from run.json); its values fill the "auto" options without probing when
    it was made for the same device type. ``time_step(variant, run) -> (seconds, output)``
    replaces the wall clock (tests).
    """
    import torch

    device = torch.device(device)
    amp, channels_last = _option("--amp", amp), _option("--channels-last", channels_last)
    batch = _as_batch(example, device)
    step = train_step(loss_fn, lr) if train else infer_step(forward_fn)
    if isinstance(recorded, dict):
        recorded = ExecutionChoice.from_dict(recorded)
    if recorded is not None and _device_type(recorded.device) == device.type:
        wanted = (
            recorded.amp if amp == AUTO else amp,
            recorded.channels_last if channels_last == AUTO else channels_last,
        )
        if wanted == (recorded.amp, recorded.channels_last):
            reason = f"reused: chosen earlier for this run ({recorded.how}: {recorded.reason})"
            return replace(recorded, device=str(device), how="recorded", reason=reason, machine=machine_info(device))
        _check_forced(model, batch, device, amp is True, channels_last is True, step)
        choice = default_execution(device, *wanted)
        return replace(choice, how="forced", reason="set by the options; the other part reused from the run")
    if amp != AUTO and channels_last != AUTO:
        _check_forced(model, batch, device, amp, channels_last, step)
        return replace(default_execution(device, amp, channels_last), how="forced", reason="set by the options")
    if workload_steps is not None and workload_steps < MIN_WORKLOAD_STEPS:
        _check_forced(model, batch, device, amp is True, channels_last is True, step)
        reason = f"not probed: {workload_steps} steps of work, fewer than {MIN_WORKLOAD_STEPS}"
        return default_execution(device, amp, channels_last, reason)
    return _probe_and_pick(model, batch, device, amp, channels_last, step, time_step)


def _probe_and_pick(model, batch, device, amp, channels_last, step, time_step) -> ExecutionChoice:
    allowed = [v for v in VARIANTS if amp in (AUTO, v[0]) and channels_last in (AUTO, v[1])]
    if device.type == "cuda" and not _cuda_bf16(device):
        allowed = [v for v in allowed if not v[0]]
    started = time.perf_counter()
    variants = [(False, False)] + [v for v in allowed if v != (False, False)]  # fp32 is the reference
    results = probe_variants(
        model, batch, device, variants, step, steps=WARMUP_STEPS + TIMED_STEPS, time_step=time_step
    )
    choice = select_variant(results, device, amp, channels_last)
    probe = {"warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS, "batch": int(len(batch["x"]))}
    return replace(choice, probe=dict(probe, seconds=time.perf_counter() - started))


def select_variant(results: dict[str, dict], device, amp=AUTO, channels_last=AUTO) -> ExecutionChoice:
    """The choice from ``probe_variants`` results (which must include fp32, the reference).

    Fastest (the quickest timed step after ``WARMUP_STEPS``) of the variants the options
    allow whose outputs lie within ``TOLERANCE`` of fp32's; a forced option wins over the
    tolerance but not over an error; the default stays unless another is ``MIN_GAIN`` faster.
    """
    import torch

    device = torch.device(device)
    amp, channels_last = _option("--amp", amp), _option("--channels-last", channels_last)
    allowed = [v for v in VARIANTS if amp in (AUTO, v[0]) and channels_last in (AUTO, v[1])]
    reference = results["fp32"].get("outputs")
    if reference is None or not bool(reference.isfinite().all()):
        raise NodulekitError(
            f"the model cannot run a plain fp32 step on {device} ({results['fp32'].get('error') or 'non-finite output'})"
        )
    seconds, diffs, rejected = {}, {}, {}
    for name, r in results.items():
        if r.get("error"):
            rejected[name] = r["error"]
            continue
        seconds[name] = min(r["seconds"][WARMUP_STEPS:])
        diffs[name] = relative_difference(r["outputs"], reference)
        if not diffs[name] <= TOLERANCE:
            rejected[name] = f"outputs differ from fp32 by {diffs[name]:.3g} (tolerance {TOLERANCE})"
    ran = [v for v in allowed if variant_name(*v) in seconds]
    eligible = [v for v in ran if variant_name(*v) not in rejected] or (ran if True in (amp, channels_last) else [])
    if not eligible:
        option = "--amp" if amp is True else "--channels-last"
        detail = "; ".join(f"{k}: {v}" for k, v in rejected.items())
        raise NodulekitError(f"{option}: no variant with this option runs here ({detail})")
    fastest = min(eligible, key=lambda v: seconds[variant_name(*v)])
    default = default_execution(device, amp, channels_last)
    default_v = (default.amp, default.channels_last)
    if default_v in eligible and seconds[variant_name(*fastest)] > (1 - MIN_GAIN) * seconds[variant_name(*default_v)]:
        fastest = default_v
    reason = (
        f"fastest of {', '.join(variant_name(*v) for v in eligible)} whose outputs agree with fp32 "
        f"within {TOLERANCE:g} (relative); another variant must be {MIN_GAIN:.0%} faster than {default.variant}"
    )
    return ExecutionChoice(
        str(device),
        fastest[0],
        fastest[1],
        "probed",
        reason,
        step_seconds=seconds,
        rel_diff=diffs,
        rejected=rejected,
        machine=machine_info(device),
    )
