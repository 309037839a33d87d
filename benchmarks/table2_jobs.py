#!/usr/bin/env python
"""Table 2 with one job per (architecture, fold), many at once: how the full-width grid fits one GPU.

`table2.py` trains the architectures one after another in one process. On a GPU a
7 M-parameter model on 32x32 inputs in batches of 32 leaves the device mostly idle, so
this script starts every (arch, fold) as its own `nodulekit train --fold K` process,
`--jobs` at a time (folds of one RUNDIR may train concurrently: each fold is claimed by
its job), in the order of `--archs`, then writes the same report as `table2.py`
(`report/table2.md`, `report/table2_ci.md`, `report/comparisons.md`) and a timing table.
Every job's output goes to `logs/<arch>-fold<k>.log`. Runs are resumable: rerunning
continues unfinished folds and skips finished ones; `--report-only` re-makes the report
from finished RUNDIRs without training (e.g. on a machine without the GPU that trained
them: the checkpoints are not needed, only each fold's `result.h5` and the `run.json`).

Example (the full-width Table 2 of benchmarks/README.md, one H200):

    python benchmarks/table2_jobs.py d11c.h5 -o full-d11c-h200 --device cuda --amp --no-channels-last --jobs 14
    python benchmarks/table2_jobs.py d11c.h5 -o full-d11c-h200 --report-only

Smoke run on CPU:

    python benchmarks/table2_jobs.py tiny.h5 -o /tmp/t2j --device cpu --epochs 1 --model-opt base_width=4 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table2 import parse_scoped_options, write_comparisons  # noqa: E402


def job_command(args, arch: str, fold: int, options: dict, rundir: Path) -> list[str]:
    """The `nodulekit train` command line of one (arch, fold) job."""
    cmd = [sys.executable, "-m", "nodulekit", "train", str(args.dataset), "-o", str(rundir), "--arch", arch]
    cmd += ["--fold", str(fold), "--epochs", str(args.epochs), "--seed", str(args.seed), "--device", args.device]
    cmd += ["--lr", str(args.lr), "--lr-step", str(args.lr_step), "--no-progress"]
    for flag in ("amp", "channels_last"):
        value = getattr(args, flag)
        if value is not None:
            cmd.append(("--" if value else "--no-") + flag.replace("_", "-"))
    for key, value in options.items():
        cmd += ["--model-opt", f"{key}={value}"]
    return cmd


def run_jobs(jobs: list[tuple[str, int, list[str]]], logs: Path, parallel: int) -> list[dict]:
    """Run ``jobs`` (arch, fold, command), ``parallel`` at a time, in order; one timing row per job."""
    logs.mkdir(parents=True, exist_ok=True)
    todo, running, rows = list(jobs), {}, []
    start = time.perf_counter()
    while todo or running:
        while todo and len(running) < parallel:
            arch, fold, cmd = todo.pop(0)
            log = open(logs / f"{arch}-fold{fold}.log", "w")  # noqa: SIM115 (closed when the job ends)
            running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = (
                arch,
                fold,
                time.perf_counter(),
                log,
            )
        for proc in [p for p in running if p.poll() is not None]:
            arch, fold, began, log = running.pop(proc)
            log.close()
            now = time.perf_counter()
            rows.append({"arch": arch, "fold": fold, "rc": proc.returncode, "wall_s": round(now - began, 1),
                         "ended_s": round(now - start, 1)})  # fmt: skip
            print(f"[{now - start:7.1f} s] {arch} fold {fold}: exit {proc.returncode}, {now - began:.1f} s", flush=True)
        time.sleep(0.5)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path, help="`dataset` artifact (e.g. D11C from `nodulekit build`)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for runs/, logs/, report/, timing")
    parser.add_argument(
        "--archs", default="hesam,sam,cam,resnet18,vgg16", help="comma-separated; the first is the reference"
    )
    parser.add_argument("--jobs", type=int, default=1, help="training processes at once (default 1)")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-step", type=int, default=30)
    parser.add_argument("--model-opt", action="append", default=[], metavar="[ARCH:]KEY=VALUE")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: auto")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: auto")
    parser.add_argument("--report-only", action="store_true", help="no training: report the finished RUNDIRs")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1 (got {args.jobs})")

    from nodulekit.datasets import load_dataset
    from nodulekit.errors import NodulekitError
    from nodulekit.evaluation import evaluate_runs

    try:
        options = parse_scoped_options(args.model_opt, archs)
        data = load_dataset(args.dataset)
        rundirs = [args.output / "runs" / f"{arch}-{data.name.lower()}" for arch in archs]
        if not args.report_only:
            jobs = [(a, k, job_command(args, a, k, options[a], r)) for a, r in zip(archs, rundirs, strict=True)
                    for k in range(data.n_folds)]  # fmt: skip
            start = time.perf_counter()
            rows = run_jobs(jobs, args.output / "logs", args.jobs)
            timing = {"jobs_at_once": args.jobs, "wall_s": round(time.perf_counter() - start, 1), "jobs": rows}
            (args.output / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
            failed = [f"{r['arch']} fold {r['fold']}" for r in rows if r["rc"] != 0]
            if failed:
                print(f"table2_jobs: failed: {', '.join(failed)} (see {args.output / 'logs'})", file=sys.stderr)
                return 1
        boot = {"n_resamples": args.bootstrap, "seed": args.bootstrap_seed}
        report = evaluate_runs(rundirs, args.output / "report", overwrite=True, **boot)
        if len(rundirs) > 1:
            write_comparisons(archs, rundirs, report["summaries"], args.output / "report", True, **boot)
    except NodulekitError as exc:
        print(f"table2_jobs: error: {exc}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print((args.output / "report" / "table2_ci.md").read_text() if len(rundirs) > 1 else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
