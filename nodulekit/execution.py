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


def probe_variants(
    model, batch, device, variants, step, *, steps: int, time_step=None, extra=(), on_step=None, convert_input=True
) -> dict[str, dict]:
    """Run ``steps`` steps of each (amp, channels_last) variant round-robin on copies of ``model``.

    Round-robin (one step of each variant per round, same batch, same random state) makes
    the variants share whatever load the machine has. ``extra``: ``(label, batch, kind)``
    checks run once per variant after the timed steps, untimed (``kind`` "step": the same
    step on another batch, e.g. the last partial batch of an epoch; "eval": the logits
    without gradients in eval mode, e.g. the evaluation batch); their outputs join the
    comparison with fp32. ``on_step(variant, label)`` is called before every step. Returns,
    per variant name, ``seconds`` (per timed step), ``outputs`` (concatenated step outputs,
    CPU float) or ``error``. ``convert_input=False``: batches stay in the caller's memory
    format (as training feeds them) instead of ``ExecutionChoice.input``'s.
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
            b = dict(batch, x=choice.input(batch["x"])) if convert_input else batch
            runs[name] = (step(copy_), b, choice, copy_)
        plan = [("step", None, None, i) for i in range(steps)] + [
            (label, b, kind, steps + j) for j, (label, b, kind) in enumerate(extra)
        ]
        for label, extra_batch, kind, i in plan:
            for name, (run, b, choice, model_copy) in runs.items():
                if "error" in out[name]:
                    continue
                if on_step is not None:
                    rows = len((b if kind is None else extra_batch)["x"])
                    on_step(name, f"{'timed' if kind is None else label} step ({rows} rows)")
                torch.manual_seed(PROBE_SEED + i)
                try:
                    if kind is None:
                        seconds, value = time_step(name, lambda run=run, b=b, c=choice: run(b, c.autocast()))
                        out[name]["seconds"].append(float(seconds))
                    else:
                        value = _extra_step(run, model_copy, extra_batch, kind, choice, device, convert_input)
                except _FAILURES as exc:
                    out[name]["error"] = _first_line(exc) + ("" if kind is None else f" (in the {label} check)")
                    continue
                out[name]["outputs"].append(value.detach().float().cpu().flatten())
        del runs
    for r in out.values():
        r["outputs"] = torch.cat(r["outputs"]) if r["outputs"] and "error" not in r else None
    return out


def _extra_step(run, model, batch, kind: str, choice: ExecutionChoice, device, convert_input: bool):
    """One untimed check of ``probe_variants``: the variant's own step, or eval-mode logits."""
    b = _as_batch(batch, device)
    b = dict(b, x=choice.input(b["x"])) if convert_input else b
    if kind == "step":
        return run(b, choice.autocast())
    was_training = model.training
    try:
        return infer_step()(model)(b, choice.autocast())
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- probing in a child process

# Probe in a child process when the caller asks (``isolate=True``): a variant that crashes
# in native code (SIGABRT, SIGSEGV) then kills the child, not the run. Tests of the choosing
# logic set this False to time the variants in-process with a fake clock.
CHILD_PROBES = True
# A child that finishes no step for this long is hung (a deadlocked kernel): killed, and
# the variant it was running is excluded.
STALL_S = 300.0
# Test hook, read by the child only: the child aborts (os.abort) when it is about to run
# this variant, as a native crash would.
CRASH_HOOK_ENV = "NODULEKIT_TEST_PROBE_ABORT"
_CHILD = "import sys; from nodulekit.execution import child_main; child_main(sys.argv[1], sys.argv[2])"


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe runs, in a form a child process can load (no closures)."""

    train: bool = True
    loss_fn: Callable | None = None
    forward_fn: Callable | None = None
    lr: float = 5e-4
    extra: tuple = ()  # (label, batch, kind) checks, see probe_variants
    convert_input: bool = True  # False: batches keep their memory format (training feeds NCHW batches)

    def step(self):
        return train_step(self.loss_fn, self.lr) if self.train else infer_step(self.forward_fn)


def machine_key(device) -> str:
    """This machine as crash records name it: CPU model, torch version and CPU capability, GPU."""
    import torch

    m = machine_info(device)
    return f"{m['cpu']} | torch {torch.__version__} {m['torch_cpu_capability']} | {m.get('gpu') or 'cpu'}"


def workload_key(model, batch, train: bool = True) -> str:
    """The model and batch shape as crash records name them."""
    params = sum(p.numel() for p in model.parameters())
    x = batch["x"]
    return f"{type(model).__name__} {params} parameters, {'training' if train else 'inference'} on {list(x.shape)}"


def child_main(payload_path: str, result_path: str) -> None:
    """The child process: run ``probe_variants`` on the payload, save the results."""
    import torch

    p = torch.load(payload_path, weights_only=False)
    torch.set_num_threads(p["threads"])
    spec, hook = p["spec"], os.environ.get(CRASH_HOOK_ENV)

    def on_step(variant: str, label: str) -> None:
        print(f"{variant}\t{label}", flush=True)  # the parent blames the last one if we die
        if variant == hook:
            os.abort()

    untimed = (lambda variant, run: (0.0, run())) if not p["timed"] else None  # noqa: E731
    results = probe_variants(
        p["model"], p["batch"], p["device"], p["variants"], spec.step(), steps=p["steps"],
        time_step=untimed, extra=spec.extra, on_step=on_step, convert_input=spec.convert_input,
    )  # fmt: skip
    torch.save(results, result_path)


def _cpu(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _run_child(payload: dict) -> tuple[dict | None, dict | None]:
    """(results, None) when the child ends well, else (None, crash: ``signal``, ``variant``, ``label``, ``detail``)."""
    import pickle
    import signal
    import subprocess
    import sys
    import tempfile

    import torch

    import nodulekit

    with tempfile.TemporaryDirectory(prefix="nodulekit-probe-") as tmp:
        tmp = Path(tmp)
        try:
            torch.save(payload, tmp / "payload.pt")
        except (pickle.PicklingError, AttributeError, TypeError) as exc:  # a lambda as loss_fn, say
            raise NodulekitError(f"cannot probe in a child process: {_first_line(exc)}") from None
        # the child imports what this process can (the model's class may live in a script or a test)
        root = str(Path(nodulekit.__file__).resolve().parents[1])
        path = os.pathsep.join(dict.fromkeys([root] + [p for p in sys.path if p]))
        # LIBC_FATAL_STDERR_: glibc's "free(): invalid next size" goes to stderr (not the tty), where we read it
        env = dict(os.environ, PYTHONPATH=path, LIBC_FATAL_STDERR_="1")
        cmd = [sys.executable, "-c", _CHILD, str(tmp / "payload.pt"), str(tmp / "result.pt")]
        with open(tmp / "steps", "w") as out, open(tmp / "stderr", "w") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
            rc = _wait(proc, tmp / "steps")
        if rc == 0:
            return torch.load(tmp / "result.pt", weights_only=False), None
        steps = [ln.split("\t", 1) for ln in (tmp / "steps").read_text().splitlines() if "\t" in ln]
        stderr = [ln.strip() for ln in (tmp / "stderr").read_text(errors="replace").splitlines() if ln.strip()]
        if rc is None:
            how = f"hung: no step done in {STALL_S:.0f} s"
        elif rc < 0:
            how = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
        else:
            how = f"exit status {rc}"
        detail = next((ln for ln in reversed(stderr) if not ln.startswith(("File ", "Current thread", "Thread "))), "")
        variant, label = steps[-1] if steps else (None, None)
        return None, {"signal": how, "variant": variant, "label": label, "detail": detail[:200]}


def _wait(proc, steps: Path) -> int | None:
    """The child's return code, or None after killing it when it did no step for ``STALL_S``."""
    size, changed = -1, time.monotonic()
    try:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except Exception:  # subprocess.TimeoutExpired
                now = steps.stat().st_size
                if now != size:
                    size, changed = now, time.monotonic()
                elif time.monotonic() - changed > STALL_S:
                    proc.kill()
                    proc.wait()
                    return None
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): never leave the child behind
            proc.kill()
            proc.wait()


def isolated_probe(
    model, batch, device, variants, spec: ProbeSpec, *, steps: int, timed: bool = True,
    avoid: dict[str, str] | None = None, record: dict | None = None,
) -> dict[str, dict]:  # fmt: skip
    """``probe_variants`` in a child process; a variant whose child dies is excluded.

    ``avoid``: variant -> reason, excluded without running (crashed here before). When a
    child dies (a signal, a non-zero exit, or hung), the variant it was running is
    excluded with the reason, recorded as a crash (``record``: ``machine``, ``workload``,
    ``rundir``; see :mod:`nodulekit.crashes`) and the other variants run again in a new
    child. fp32 crashing is an error: nothing can train then.
    """
    import torch

    from nodulekit import crashes

    avoid = avoid or {}
    results = {variant_name(*v): {"error": avoid[variant_name(*v)]} for v in variants if variant_name(*v) in avoid}
    remaining = [v for v in variants if variant_name(*v) not in avoid]
    model, batch = copy.deepcopy(model).cpu(), _cpu(batch)
    spec = replace(spec, extra=tuple(_cpu(list(spec.extra))))
    while remaining:
        payload = dict(model=model, batch=batch, device=str(device), variants=remaining, spec=spec,
                       steps=steps, timed=timed, threads=torch.get_num_threads())  # fmt: skip
        got, crash = _run_child(payload)
        if crash is None:
            return results | got
        if crash["variant"] is None:
            raise NodulekitError(
                f"the test process that probes the execution variants failed before its first step "
                f"({crash['signal']}: {crash['detail'] or 'no message'})"
            )
        if crash["variant"] == "fp32":
            raise NodulekitError(
                f"the model crashed in a plain fp32 step on {device} in a test process ({crash['signal']}: "
                f"{crash['detail'] or 'no message'}); training would crash too"
            )
        detail = f": {crash['detail']}" if crash["detail"] else ""
        reason = f"crashed in a test process ({crash['signal']}{detail}) in its {crash['label']}"
        results[crash["variant"]] = {"error": reason}
        if record is not None and not crash["signal"].startswith("hung"):
            entry = dict(machine=record["machine"], workload=record["workload"], variant=crash["variant"])
            crashes.record_crash(
                dict(entry, signal=crash["signal"], where=f"a probe ({crash['label']})", detail=crash["detail"]),
                record.get("rundir"),
            )
        remaining = [v for v in remaining if variant_name(*v) != crash["variant"]]
    return results


def relative_difference(a, b) -> float:
    """||a - b|| / ||b|| (inf when ``a`` is not finite)."""
    import torch

    if a is None or not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@dataclass
class _Probe:
    """How ``choose_execution`` probes: in-process or in a child, what to avoid, what to record."""

    model: Any
    batch: dict
    device: Any
    spec: ProbeSpec
    isolate: bool
    avoid: dict[str, str]  # variant -> why (crashed here before)
    record: dict | None  # machine, workload, rundir for crash records

    def run(self, variants, steps: int, timed: bool = True, time_step=None) -> dict[str, dict]:
        if self.isolate and CHILD_PROBES:
            return isolated_probe(self.model, self.batch, self.device, variants, self.spec, steps=steps,
                                  timed=timed, avoid=self.avoid, record=self.record)  # fmt: skip
        if not timed:
            time_step = lambda variant, run: (0.0, run())  # noqa: E731 - checked to run, not timed
        results = {
            variant_name(*v): {"error": self.avoid[variant_name(*v)]}
            for v in variants
            if variant_name(*v) in self.avoid
        }
        todo = [v for v in variants if variant_name(*v) not in self.avoid]
        return results | probe_variants(self.model, self.batch, self.device, todo, self.spec.step(), steps=steps,
                                        time_step=time_step, extra=self.spec.extra,
                                        convert_input=self.spec.convert_input)  # fmt: skip


def _check_forced(probe: _Probe, amp: bool, channels_last: bool) -> None:
    """One step of each forced part (on every probe shape); a clear error naming the option that cannot run."""
    import torch

    device = probe.device
    if amp and _device_type(device) == "cuda" and not _cuda_bf16(device):
        raise NodulekitError(f"--amp: {torch.cuda.get_device_name(device)} has no bf16 support; use --no-amp")
    checks = [("--amp", (True, False))] if amp else []
    checks += [("--channels-last", (False, True))] if channels_last else []
    checks += [("--amp with --channels-last", (True, True))] if amp and channels_last else []
    if not checks:
        return
    results = probe.run([v for _, v in checks], steps=1, timed=False)
    for option, variant in checks:
        error = results[variant_name(*variant)].get("error")
        if error and error.startswith("crashed"):
            raise NodulekitError(
                f"{option}: {variant_name(*variant)} {error} on {device}; leave the option out to choose automatically"
            )
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
    extra: tuple = (),
    isolate: bool = False,
    rundir: str | os.PathLike | None = None,
    convert_input: bool = True,
) -> ExecutionChoice:
    """The fastest variant of running ``model`` on batches like ``example`` that agrees with fp32.

    ``example``: a [B, C, H, W] tensor or a batch dict with ``x`` (and ``y`` and whatever
    ``loss_fn`` needs). ``train``: time forward + ``loss_fn`` + backward + SGD step
    (``train_step``), else ``forward_fn`` (default: the logits, no gradients). ``amp`` and
    ``channels_last``: ``"auto"``/``None`` probe, ``True``/``False`` force (checked to run,
    not timed). ``workload_steps``: how many such steps the caller will run; below
    ``MIN_WORKLOAD_STEPS`` nothing is probed. ``recorded``: a choice made earlier for the
    same run (e.g. from run.json); its values fill the "auto" options without probing when
    it was made for the same device type (and has not crashed since). ``extra``: more
    ``(label, batch, kind)`` shapes every variant must run (see ``probe_variants``).
    ``isolate``: probe and check in a child process (``isolated_probe``), so a variant that
    crashes in native code is excluded instead of killing the caller; variants recorded as
    crashing on this machine and workload (:mod:`nodulekit.crashes`, also RUNDIR's records)
    are never chosen, and refused when forced. ``convert_input=False``: batches keep their
    memory format, as the caller will feed them. ``time_step(variant, run) -> (seconds, output)``
    replaces the wall clock (tests, in-process probes).
    """
    import torch

    device = torch.device(device)
    amp, channels_last = _option("--amp", amp), _option("--channels-last", channels_last)
    batch = _as_batch(example, device)
    spec = ProbeSpec(train, loss_fn, forward_fn, lr, tuple(extra), convert_input)
    avoid, record = {}, None
    if isolate:
        from nodulekit.crashes import crashed_variants

        record = {"machine": machine_key(device), "workload": workload_key(model, batch, train), "rundir": rundir}
        avoid = {
            k: v for k, v in crashed_variants(record["machine"], record["workload"], rundir).items() if k != "fp32"
        }
    probe = _Probe(model, batch, device, spec, isolate, avoid, record)
    if isinstance(recorded, dict):
        recorded = ExecutionChoice.from_dict(recorded)
    if recorded is not None and _device_type(recorded.device) == device.type and recorded.variant not in avoid:
        wanted = (
            recorded.amp if amp == AUTO else amp,
            recorded.channels_last if channels_last == AUTO else channels_last,
        )
        if wanted == (recorded.amp, recorded.channels_last):
            reason = f"reused: chosen earlier for this run ({recorded.how}: {recorded.reason})"
            return replace(recorded, device=str(device), how="recorded", reason=reason, machine=machine_info(device))
        _check_forced(probe, amp is True, channels_last is True)
        choice = default_execution(device, *wanted)
        return replace(choice, how="forced", reason="set by the options; the other part reused from the run")
    if amp != AUTO and channels_last != AUTO:
        _check_forced(probe, amp, channels_last)
        return replace(default_execution(device, amp, channels_last), how="forced", reason="set by the options")
    if workload_steps is not None and workload_steps < MIN_WORKLOAD_STEPS:
        _check_forced(probe, amp is True, channels_last is True)
        reason = f"not probed: {workload_steps} steps of work, fewer than {MIN_WORKLOAD_STEPS}"
        choice = default_execution(device, amp, channels_last, reason)
        if choice.variant in avoid:  # e.g. bf16 by default on a GPU where it crashed
            return replace(
                default_execution(device, False, False, reason), rejected={choice.variant: avoid[choice.variant]}
            )
        return _checked_default(probe, choice, amp, channels_last)
    return _probe_and_pick(probe, amp, channels_last, time_step)


def _checked_default(probe: _Probe, choice: ExecutionChoice, amp, channels_last) -> ExecutionChoice:
    """An unprobed default other than fp32 (bf16 on a GPU) is checked in a child first when isolating."""
    if not probe.isolate or choice.variant == "fp32" or (amp, channels_last) == (choice.amp, choice.channels_last):
        return choice
    results = probe.run([(choice.amp, choice.channels_last)], steps=1, timed=False)
    error = results[choice.variant].get("error")
    if not error:
        return choice
    fallback = default_execution(device=probe.device, amp=False, channels_last=False, reason=choice.reason)
    return replace(fallback, rejected={choice.variant: error})


def _probe_and_pick(probe: _Probe, amp, channels_last, time_step) -> ExecutionChoice:
    device = probe.device
    allowed = [v for v in VARIANTS if amp in (AUTO, v[0]) and channels_last in (AUTO, v[1])]
    if device.type == "cuda" and not _cuda_bf16(device):
        allowed = [v for v in allowed if not v[0]]
    started = time.perf_counter()
    variants = [(False, False)] + [v for v in allowed if v != (False, False)]  # fp32 is the reference
    results = probe.run(variants, steps=WARMUP_STEPS + TIMED_STEPS, time_step=time_step)
    choice = select_variant(results, device, amp, channels_last)
    shapes = [int(len(probe.batch["x"]))] + [int(len(b["x"])) for _, b, _ in probe.spec.extra]
    probe_info = {"warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS, "batch": shapes[0]}
    probe_info |= {
        "checked": [f"{label} ({n} rows)" for (label, _, _), n in zip(probe.spec.extra, shapes[1:], strict=True)]
    }
    probe_info |= {"in_child_process": bool(probe.isolate and CHILD_PROBES)}
    return replace(choice, probe=dict(probe_info, seconds=time.perf_counter() - started))


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
