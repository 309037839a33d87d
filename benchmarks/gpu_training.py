"""Training speed of the folds one after another vs side by side vs in several processes, and the paper's 5-fold HESAM run.

    python benchmarks/gpu_training.py -o bench/gpu_training.json              # on a GPU: the real figures
    python benchmarks/gpu_training.py --tiny -o bench/gpu_training_tiny.json  # anywhere: a smoke test

Four measurements, all through ``nodulekit.training.train`` (data on the device, the
execution choice of ``--amp auto``/``--channels-last auto``, per-epoch test scoring and
checkpoints included):

1. ``sequential``: the 5 folds trained one after another for ``--epochs`` epochs in one
   process; the training samples per second of one fold = its training rows / its epoch time;
2. ``side_by_side``: the same 5 folds in one batched computation (``--concurrent-folds``);
   per fold = training rows / the joint epoch's time, and the 5 folds together;
3. ``processes``: 5 ``nodulekit train --fold K`` processes at once (what the grid does by
   default); per fold = training rows / that fold's epoch time (from its ``result.h5``),
   the 5 folds together = their sum;
   the first epoch of each fold is left out of all three (warm-up, cuDNN autotuning);
4. ``paper_run``: the wall time of the whole 5-fold cross-validation of full-width HESAM
   on a D11C-sized dataset (1145 nodules, 11 channels: 916 training + 229 test per fold)
   at the paper's schedule (90 epochs), in the mode that was fastest in 1-3 (5 folds'
   samples/s). The goal is 60 s on one H200 or H100.

``--last-batch drop`` and ``--cuda-graphs`` (CUDA only) are passed to every run, to time the
static-shape path; ``--cuda-graphs`` is not combined with side by side (that mode is skipped).

The dataset is synthetic (the speed does not depend on the pixel values) unless
``--dataset`` names a real ``dataset`` artifact. ``--tiny`` shrinks everything (narrow
model, 3 channels, 120 nodules, 3 epochs) so the script runs in about a minute on a CPU;
its numbers check the harness, and give the CPU side-by-side / sequential ratio of a
narrow model. Results go to stdout (Markdown) and ``-o`` (JSON, with machine, GPU, load and
commit). Like the other benchmarks it refuses a busy machine (1-minute load above 0.75 x
cores) unless ``--allow-busy``, which marks the figures as not publishable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

FOLDS = 5
PAPER = {"nodules": 1145, "channels": 11, "epochs": 90, "base_width": 64}
TINY = {"nodules": 120, "channels": 3, "epochs": 3, "base_width": 4}


def _dataset(args, tmp: Path, size: dict) -> Path:
    if args.dataset:
        return Path(args.dataset)
    from tests.conftest import write_tiny_dataset

    return write_tiny_dataset(tmp / "bench.h5", n=size["nodules"], channels=size["channels"], folds=FOLDS, seed=0)


def _options(size: dict) -> dict:
    return {} if size["base_width"] == 64 else {"base_width": size["base_width"]}


def _config(args, size: dict, epochs: int, concurrent: bool):
    from nodulekit.training import TrainConfig

    return TrainConfig(
        arch=args.arch,
        model_options=_options(size),
        epochs=epochs,
        device=args.device,
        seed=0,
        concurrent_folds=concurrent,
        last_batch=args.last_batch,
        cuda_graphs=args.cuda_graphs,
    )


def _timed_run(dataset: Path, rundir: Path, cfg) -> tuple[float, dict[int, list[float]], dict]:
    """(wall time, end time of every epoch per fold, train's summary)."""
    from nodulekit.training import train

    ends: dict[int, list[float]] = {}

    def mark(fold, epoch, metrics):
        ends.setdefault(fold, []).append(time.perf_counter())

    started = time.perf_counter()
    summary = train(dataset, rundir, cfg, progress=False, on_epoch_end=mark)
    return time.perf_counter() - started, ends, summary


def _train_rows(dataset: Path) -> list[int]:
    from nodulekit.datasets import load_dataset

    fold = load_dataset(dataset).fold
    return [int((fold != k).sum()) for k in range(FOLDS)]


def _epochs(args) -> int:
    return args.epochs or (3 if args.tiny else 4)


def _train_args(args, size: dict, epochs: int) -> list[str]:
    """The `nodulekit train` options of one fold process (the same settings as _config)."""
    out = ["--arch", args.arch, "--epochs", str(epochs), "--device", args.device, "--seed", "0"]
    out += [f"--model-opt={k}={v}" for k, v in _options(size).items()]
    out += ["--last-batch", args.last_batch, "--no-progress", "-q"] + (["--cuda-graphs"] if args.cuda_graphs else [])
    return out


def _timed_processes(args, dataset: Path, rundir: Path, size: dict, epochs: int) -> float:
    """Wall time of one `nodulekit train --fold K` process per fold, all started at once."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "nodulekit", "train", str(dataset), "-o", str(rundir), "--fold", str(k)]
            + _train_args(args, size, epochs),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(FOLDS)
    ]
    failed = [(k, job.communicate()[1]) for k, job in enumerate(jobs) if job.wait() != 0]
    if failed:
        raise SystemExit(f"gpu_training: fold process {failed[0][0]} failed: {failed[0][1].strip()[-500:]}")
    return time.perf_counter() - started


def processes_throughput(args, dataset: Path, tmp: Path, size: dict) -> dict:
    """Samples/s per fold with one process per fold at once, from each fold's recorded epoch times."""
    from nodulekit.run import Run

    epochs = _epochs(args)
    wall = _timed_processes(args, dataset, tmp / "run-processes", size, epochs)
    rows, run = _train_rows(dataset), Run(tmp / "run-processes")
    per_fold = {k: rows[k] / statistics.median(run.fold_result(k).epoch_seconds[1:]) for k in range(FOLDS)}
    return {
        "mode": "processes",
        "processes": FOLDS,
        "epochs": epochs,
        "wall_s": wall,
        "samples_per_s_per_fold": per_fold,
        "samples_per_s_all_folds": sum(per_fold.values()),
        "execution": run.record.get("execution"),
    }


def throughput(args, dataset: Path, tmp: Path, size: dict, concurrent: bool) -> dict:
    """Training samples per second per fold, from the epoch times after each fold's first epoch."""
    epochs = _epochs(args)
    wall, ends, summary = _timed_run(dataset, tmp / f"run-{concurrent}", _config(args, size, epochs, concurrent))
    rows = _train_rows(dataset)
    per_fold = {}
    for fold, times in sorted(ends.items()):
        steps = [b - a for a, b in zip(times, times[1:], strict=False)]  # epochs 2..E
        per_fold[fold] = rows[fold] / statistics.median(steps)
    together = sum(per_fold.values()) if concurrent else statistics.median(per_fold.values())
    return {
        "mode": "side_by_side" if concurrent else "sequential",
        "epochs": epochs,
        "wall_s": wall,
        "samples_per_s_per_fold": per_fold,
        "samples_per_s_all_folds": together,
        "execution": summary.get("execution"),
    }


def fastest(modes: list[dict]) -> str:
    """The mode whose 5 folds together trained the most samples per second."""
    return max(modes, key=lambda r: r["samples_per_s_all_folds"])["mode"]


def paper_run(args, dataset: Path, tmp: Path, size: dict, mode: str) -> dict:
    """Wall time of the 5-fold cross-validation at the paper's schedule, in ``mode``."""
    epochs = size["epochs"] if not args.tiny else (args.epochs or size["epochs"])
    if mode == "processes":
        wall, execution = _timed_processes(args, dataset, tmp / "paper", size, epochs), None
    else:
        wall, _, summary = _timed_run(dataset, tmp / "paper", _config(args, size, epochs, mode == "side_by_side"))
        execution = summary.get("execution")
    return {"epochs": epochs, "folds": FOLDS, "mode": mode, "wall_s": wall, "goal_s": 60.0, "execution": execution}


def _record(args, results: dict, load: dict, flags: list[str], git: dict) -> dict:
    import torch
    from run_all import machine_info

    return {
        "benchmark": "gpu_training",
        "settings": vars(args),
        "machine": machine_info(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": str(torch.__version__),
        "load": load,
        "not_publishable": flags,
        "torch_threads": torch.get_num_threads(),
        "git": git,
        **results,
    }


def _busy(args) -> str | None:
    """Why the machine is too busy to time (1-min load above 0.75 x cores), or None."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    return f"1-min load average {load:.2f} is above {0.75 * cores:g} on {cores} cores" if load > 0.75 * cores else None


def markdown(record: dict) -> str:
    lines = [
        f"machine: {record['cuda_device'] or 'no GPU'} / {record['machine']['cpu']}, {record['torch_threads']} torch "
        f"threads; load {record['load']['loadavg_before'][0]:.1f} before, {record['load']['loadavg_after'][0]:.1f} "
        f"after; torch {record['torch']}; commit {record['git']['commit'][:10]}",
        *[f"NOT PUBLISHABLE: {flag}" for flag in record["not_publishable"]],
        "",
        "| mode | samples/s per fold (median) | samples/s, 5 folds | wall s |",
        "|---|---|---|---|",
    ]
    for r in record["throughput"]:
        lines.append(
            f"| {r['mode']} | {statistics.median(r['samples_per_s_per_fold'].values()):.1f} | "
            f"{r['samples_per_s_all_folds']:.1f} | {r['wall_s']:.1f} |"
        )
    by_mode = {r["mode"]: r["samples_per_s_all_folds"] for r in record["throughput"]}
    for mode in ("side_by_side", "processes"):
        if mode in by_mode:
            lines.append(f"\n{mode.replace('_', ' ')} / sequential (5 folds' samples/s): {by_mode[mode] / by_mode['sequential']:.2f}")  # fmt: skip
    if record.get("paper_run"):
        p = record["paper_run"]
        lines.append(f"5-fold {record['settings']['arch']}, {p['epochs']} epochs, {p['mode'].replace('_', ' ')} (fastest above): {p['wall_s']:.1f} s (goal {p['goal_s']:.0f} s)")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--arch", default="hesam")
    parser.add_argument("--tiny", action="store_true", help="narrow model, small data, few epochs: a smoke test")
    parser.add_argument("--dataset", help="a real `dataset` artifact instead of the synthetic D11C-sized one")
    parser.add_argument("--epochs", type=int, help="epochs of the throughput runs (default 4; --tiny: 3)")
    parser.add_argument("--no-paper-run", action="store_true", help="skip the 90-epoch 5-fold run")
    parser.add_argument("--base-width", type=int, help="override the model width (paper 64; --tiny 4)")
    parser.add_argument("--channels", type=int, help="override the synthetic dataset's channels (11; --tiny 3)")
    parser.add_argument("--nodules", type=int, help="override the synthetic dataset's size (1145; --tiny 120)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own choice)")
    parser.add_argument("--last-batch", choices=["keep", "drop"], default="keep", help="train's --last-batch")
    parser.add_argument("--cuda-graphs", action="store_true", help="train's --cuda-graphs (CUDA only)")
    parser.add_argument("--no-processes", action="store_true", help="skip the one-process-per-fold mode")
    parser.add_argument("--allow-busy", action="store_true", help="time on a busy machine anyway; figures are flagged")
    parser.add_argument("-o", "--output", help="JSON record")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_graphs and not torch.cuda.is_available():
        print("gpu_training: --cuda-graphs needs CUDA, and torch sees no GPU on this machine; nothing measured",
              file=sys.stderr)  # fmt: skip
        return 2
    from execution_cost import LoadWatch
    from run_all import git_info

    watch, flags, git = LoadWatch(), [], git_info()  # the commit measured is the one at the start
    busy = _busy(args)
    if busy is not None:
        if not args.allow_busy:
            print(f"gpu_training: refused: {busy}; wait for an idle machine or pass --allow-busy", file=sys.stderr)
            return 2
        flags.append(busy)
    size = dict(TINY if args.tiny else PAPER)
    for key in ("base_width", "channels", "nodules"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = _dataset(args, tmp, size)
        modes = [throughput(args, dataset, tmp, size, False)]
        if not args.cuda_graphs:  # --cuda-graphs is not combined with side by side
            modes.append(throughput(args, dataset, tmp, size, True))
        if not args.no_processes:
            modes.append(processes_throughput(args, dataset, tmp, size))
        results = {"throughput": modes, "fastest": fastest(modes)}
        if not args.no_paper_run:
            results["paper_run"] = paper_run(args, dataset, tmp, size, results["fastest"])
    load = watch.finish()
    if load["other_processes_cores"] is not None and load["other_processes_cores"] > 0.25:
        flags.append(f"other processes used {load['other_processes_cores']:.2f} cores on average during the run")
    record = _record(args, results, load, flags, git)
    print(markdown(record))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
