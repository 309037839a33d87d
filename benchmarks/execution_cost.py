"""Execution variants (fp32 / bf16, with and without channels_last) and the cost of the paper's schedule.

Measures, on an idle machine, what ``nodulekit train`` costs per execution variant:

- the machine: CPU model, cores, AVX-512 BF16 / AMX flags, torch's CPU capability, threads;
- the load: 1-minute load average before and after, and the CPU time other processes used
  during the run (from /proc/stat, minus this process's own). A start above ``--max-load``
  (default 0.75 x cores = 1.5 on 2 cores) is refused; ``--allow-busy`` runs anyway and
  marks every figure as taken on a busy machine. The load average after the run includes
  this benchmark's own threads, so other processes' CPU share is what tells idle from busy;
- step times: forward + loss + backward + SGD of a batch of 32, every variant on its own
  copy of the same model, round-robin (one step of each per round), 1 warm-up + ``--steps``;
  the relative difference of each variant's losses to fp32's, and what
  ``nodulekit.execution.choose_execution`` picks from these measurements;
- real epochs: ``nodulekit.training.train`` with each variant forced, fold 0, ``--epochs``
  epochs (the per-epoch wall time of the loop: training, test-fold scoring, checkpoint);
- the projection: 5 folds x 90 epochs = 5 x (first epoch + 89 x the last measured epoch);
- optionally the measured wall time of finished RUNDIRs (``--measured RUNDIR ...``: sum of
  every fold's ``epoch_seconds``, with the variant each run recorded).

Data: the real VOI D11C when given (``--d11c``, default ``../data/real/d11c.h5`` beside the
repository if it exists), else a synthetic dataset of the same shape (656 nodules, 11 x 32 x 32, 5 folds).

    python benchmarks/execution_cost.py                       # full-width HESAM, synthetic or real D11C
    python benchmarks/execution_cost.py --d11c d11c.h5 --measured runs/hesam-d11c
    python benchmarks/execution_cost.py --width 8 --n 96 --epochs 1 --steps 1 --allow-busy   # harness check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

REAL_D11C = REPO.parent / "data" / "real" / "d11c.h5"  # the real VOI D11C, when built beside the repository
FOLDS, EPOCHS = 5, 90  # the paper's schedule
BATCH = 32
OTHERS_IDLE = 0.25  # other processes may use at most this many cores on average for an "idle" run


# ----------------------------------------------------------------------------- load


def _busy_ticks() -> float | None:
    """Busy CPU time of the whole machine since boot, in seconds (user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadWatch:
    """Load average before/after and other processes' mean CPU use (cores) in between."""

    def __init__(self):
        self.load_before = os.getloadavg()
        self.t0, self.busy0, self.own0 = time.time(), _busy_ticks(), _own_cpu()

    def finish(self) -> dict:
        wall, busy1, own1 = time.time() - self.t0, _busy_ticks(), _own_cpu()
        others = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            others = max(0.0, ((busy1 - self.busy0) - (own1 - self.own0)) / wall)
        return {
            "loadavg_before": list(self.load_before),
            "loadavg_after": list(os.getloadavg()),
            "other_processes_cores": others,
            "wall_s": wall,
        }


# ----------------------------------------------------------------------------- measurements


def dataset(args, tmp: Path) -> tuple[Path, str]:
    if args.d11c:
        return Path(args.d11c), "real"
    from conftest import write_tiny_dataset

    return write_tiny_dataset(tmp / "d11c_like.h5", n=args.n, channels=11, folds=FOLDS, seed=0), "synthetic"


def step_times(args, ds_path: Path) -> dict:
    """Round-robin training steps of every variant on the first batch of fold 0's training rows."""
    import numpy as np
    import torch

    from nodulekit import execution as ex
    from nodulekit.datasets import load_dataset
    from nodulekit.models import create_model

    ds = load_dataset(ds_path)
    rows = np.flatnonzero(np.asarray(ds.fold) != 0)[:BATCH]
    batch = {"x": torch.from_numpy(np.asarray(ds.x[rows], np.float32)), "y": torch.from_numpy(np.asarray(ds.y[rows]))}
    torch.manual_seed(0)
    model = create_model(args.arch, 11, **_options(args))
    results = ex.probe_variants(model, batch, "cpu", ex.VARIANTS, ex.train_step(), steps=1 + args.steps)
    reference = results["fp32"]["outputs"]
    out = {}
    for name, r in results.items():
        if r.get("error"):
            out[name] = {"error": r["error"]}
            continue
        timed = r["seconds"][1:]
        out[name] = {
            "first_step_s": r["seconds"][0],
            "step_s_median": statistics.median(timed),
            "step_s_min": min(timed),
            "step_s_all": timed,
            "rel_diff_to_fp32": ex.relative_difference(r["outputs"], reference),
        }

    choice = ex.select_variant(results, "cpu")  # what train's probe decides on these figures
    return {"variants": out, "probe_choice": choice.variant, "probe_rejected": choice.rejected}


def real_epochs(args, ds_path: Path, tmp: Path) -> dict:
    """``nodulekit.training.train`` on fold 0 with each variant forced; per-epoch wall times."""
    import h5py

    from nodulekit import execution as ex
    from nodulekit.training import TrainConfig, train

    out = {}
    for amp, cl in ex.VARIANTS:
        name = ex.variant_name(amp, cl)
        cfg = TrainConfig(
            arch=args.arch,
            model_options=_options(args),
            epochs=args.epochs,
            device="cpu",
            seed=0,
            amp=amp,
            channels_last=cl,
        )
        rundir = tmp / f"run-{name.replace('+', '-')}"
        started = time.perf_counter()
        train(ds_path, rundir, cfg, folds=[0], progress=False)
        wall = time.perf_counter() - started
        with h5py.File(rundir / "fold0" / "result.h5", "r") as f:
            seconds = [float(s) for s in f["epoch_seconds"][()]]
            n_train, n_test = len(f["train_index"]), len(f["test_index"])
        first, last = seconds[0], seconds[-1]
        out[name] = {
            "epoch_seconds": seconds,
            "call_wall_s": wall,
            "n_train": n_train,
            "n_test": n_test,
            "projected_5x90_s": FOLDS * (first + (EPOCHS - 1) * last),
        }
    return out


def measured_runs(rundirs: list[str]) -> list[dict]:
    """Wall time actually spent by finished RUNDIRs (sum of every fold's epoch_seconds)."""
    import h5py

    rows = []
    for rundir in rundirs:
        run = json.loads((Path(rundir) / "run.json").read_text())
        total, epochs, folds = 0.0, 0, 0
        for result in sorted(Path(rundir).glob("fold*/result.h5")):
            with h5py.File(result, "r") as f:
                seconds = f["epoch_seconds"][()]
            total, epochs, folds = total + float(seconds.sum()), epochs + len(seconds), folds + 1
        execution = run.get("execution") or {}
        rows.append(
            {
                "rundir": str(rundir),
                "arch": run.get("arch"),
                "variant": execution.get("variant", "fp32 (recorded before execution choice)"),
                "machine": execution.get("machine"),
                "folds": folds,
                "epochs": epochs,
                "wall_s": total,
            }
        )
    return rows


def _options(args) -> dict:
    return {} if args.width == 64 else {"base_width": args.width}


# ----------------------------------------------------------------------------- report


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def render(r: dict) -> str:
    m, load, s = r["machine"], r["load"], r["settings"]
    flags = f"AVX-512 BF16 {'yes' if m['avx512_bf16'] else 'no'}, AMX {'yes' if m['amx_bf16'] else 'no'}"
    L = [
        "## Execution variants and the cost of the paper's schedule (`execution_cost.py`)",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({flags}; torch CPU capability {m['torch_cpu_capability']}), "
        f"torch {m['torch']}, {m['threads']} threads; commit `{r['commit']}`; {r['started']}.",
        f"- Load: 1-min load average {load['loadavg_before'][0]:.2f} before, {load['loadavg_after'][0]:.2f} after "
        f"(includes this benchmark's own threads); other processes used "
        f"{load['other_processes_cores']:.2f} cores on average during the run."
        if load["other_processes_cores"] is not None
        else f"- Load: 1-min load average {load['loadavg_before'][0]:.2f} before, {load['loadavg_after'][0]:.2f} after.",
        f"- Model and data: {s['arch']} base_width {s['width']}, {s['data']} D11C ({s['dataset']}), batch {BATCH}.",
    ]
    if r["flags"]:
        L += ["", "**NOT AN IDLE MACHINE: " + "; ".join(r["flags"]) + ". Do not publish these figures.**"]
    L += [
        "",
        f"Training step (forward + loss + backward + SGD), round-robin, 1 warm-up + {s['steps']} timed steps:",
        "",
    ]
    L += [
        "| variant | median step (s) | fastest step (s) | vs fp32 | losses vs fp32 (relative) |",
        "|---|---|---|---|---|",
    ]
    steps = r["steps"]["variants"]
    base = steps["fp32"].get("step_s_median")
    for name, v in steps.items():
        if "error" in v:
            L.append(f"| {name} | – | – | – | error: {v['error']} |")
            continue
        ratio = f"{base / v['step_s_median']:.2f}x" if base else "–"
        L.append(
            f"| {name} | {v['step_s_median']:.3f} | {v['step_s_min']:.3f} | {ratio} | {v['rel_diff_to_fp32']:.2g} |"
        )
    L += ["", f"`train`'s probe, given these measurements, chooses **{r['steps']['probe_choice']}**.", ""]
    ep = r["epochs"]
    any_ep = next(iter(ep.values()))
    L += [
        f"Real epochs of `nodulekit train` (fold 0: {any_ep['n_train']} training + {any_ep['n_test']} test nodules; "
        "training, test-fold scoring and checkpoint), and the paper's 5 folds x 90 epochs projected as "
        "5 x (first epoch + 89 x last epoch):",
        "",
        "| variant | epoch times (s) | projected 5 x 90 |",
        "|---|---|---|",
    ]
    for name, v in ep.items():
        L.append(f"| {name} | {', '.join(f'{t:.1f}' for t in v['epoch_seconds'])} | {_h(v['projected_5x90_s'])} |")
    if r["measured"]:
        L += ["", "Measured (finished RUNDIRs, sum of every fold's epoch times):", ""]
        L += ["| run | arch | variant | folds | epochs | wall |", "|---|---|---|---|---|---|"]
        for row in r["measured"]:
            L.append(
                f"| {row['rundir']} | {row['arch']} | {row['variant']} | {row['folds']} | {row['epochs']} | "
                f"{_h(row['wall_s'])} |"
            )
    return "\n".join(L) + "\n"


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "nodulekit", "benchmarks"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d11c", default=str(REAL_D11C) if REAL_D11C.exists() else None, help="real D11C dataset")
    p.add_argument("--n", type=int, default=656, help="synthetic dataset size when no --d11c [656, like the VOIs]")
    p.add_argument("--arch", default="hesam")
    p.add_argument("--width", type=int, default=64, help="base_width (64 = the paper's model)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant after 1 warm-up")
    p.add_argument("--epochs", type=int, default=2, help="real epochs per variant (the last one is projected)")
    p.add_argument("--measured", nargs="*", default=[], help="finished RUNDIRs whose wall time to report")
    p.add_argument("--max-load", type=float, default=None, help="refuse above this 1-min load [0.75 x cores]")
    p.add_argument("--allow-busy", action="store_true", help="run on a busy machine anyway; figures are flagged")
    p.add_argument("--json", type=Path, default=HERE / "out" / "execution_cost.json")
    p.add_argument("--md", type=Path, default=None, help="also write the Markdown here")
    args = p.parse_args(argv)
    import torch

    from nodulekit.execution import cpu_features

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    max_load = args.max_load if args.max_load is not None else 0.75 * cores
    watch = LoadWatch()
    flags = []
    if watch.load_before[0] > max_load:
        message = f"1-min load average {watch.load_before[0]:.2f} is above {max_load:g} on {cores} cores"
        if not args.allow_busy:
            print(f"execution_cost: refused: {message}; wait for an idle machine or pass --allow-busy", file=sys.stderr)
            return 2
        flags.append(message)
    if args.d11c and not Path(args.d11c).exists():
        print(f"execution_cost: error: --d11c {args.d11c} does not exist", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ds_path, kind = dataset(args, Path(tmp))
        steps = step_times(args, ds_path)
        epochs = real_epochs(args, ds_path, Path(tmp))
    load = watch.finish()
    if load["other_processes_cores"] is not None and load["other_processes_cores"] > OTHERS_IDLE:
        flags.append(f"other processes used {load['other_processes_cores']:.2f} cores on average during the run")
    record = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": dict(cpu_features(), torch=torch.__version__, threads=torch.get_num_threads()),
        "load": load,
        "max_load": max_load,
        "flags": flags,
        "settings": {
            "arch": args.arch,
            "width": args.width,
            "steps": args.steps,
            "epochs": args.epochs,
            "data": kind,
            "dataset": str(args.d11c or f"synthetic, {args.n} nodules"),
        },
        "steps": steps,
        "epochs": epochs,
        "measured": measured_runs(args.measured),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = render(record)
    if args.md:
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
