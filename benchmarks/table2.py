#!/usr/bin/env python
"""Table 2 benchmark: 5-fold cross-validation of HESAM vs ResNet18 vs VGG16 vs Ours-CAM vs Ours-SAM.

Trains every architecture on one `dataset` artifact (normally D11C built from the
LIDC VOIs) with the paper's settings, times each, then writes the Table 2 style report
with `nodulekit.evaluation.evaluate_runs`. Runs are resumable: re-running the same
command continues unfinished folds and skips finished ones.

Example (the real run; see benchmarks/README.md for the expected cost):

    python benchmarks/table2.py d11c.h5 -o bench/table2 --epochs 90 --device auto

Quick smoke run on CPU:

    python benchmarks/table2.py tiny.h5 -o /tmp/t2 --epochs 1 --model-opt base_width=4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_ARCHS = ("hesam", "resnet18", "vgg16", "cam", "sam")


def parse_scoped_options(items: list[str], archs: list[str]) -> dict[str, dict]:
    """``[ARCH:]key=value`` → per-arch option dicts (unscoped options go to every arch that accepts them)."""
    from nodulekit.cli.train import parse_model_options
    from nodulekit.models import model_spec

    per_arch: dict[str, dict] = {a: {} for a in archs}
    for item in items:
        head, _, rest = item.partition(":")
        if rest and "=" not in head:
            if head not in per_arch:
                raise SystemExit(f"table2: --model-opt {item!r} names {head!r}, which is not in --archs")
            per_arch[head].update(parse_model_options([rest]))
        else:
            opts = parse_model_options([item])
            for a in archs:
                per_arch[a].update({k: v for k, v in opts.items() if k in model_spec(a).defaults})
    return per_arch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path, help="`dataset` artifact (e.g. D11C from `nodulekit build`)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="folder for runs/, report/ and timing.{json,md}"
    )
    parser.add_argument(
        "--archs",
        default=",".join(DEFAULT_ARCHS),
        help=f"comma-separated registry names (default {','.join(DEFAULT_ARCHS)})",
    )
    parser.add_argument("--epochs", type=int, default=90, help="epochs per fold (default 90 = three lr steps of 30)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--select", default="last", choices=("last", "val"), help="reported epoch: last, or best on a validation split"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-step", type=int, default=30, help="learning rate x0.1 every this many epochs (paper: 30)")
    parser.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="[ARCH:]KEY=VALUE",
        help="model option for one arch (ARCH:key=value) or every arch that takes it (key=value)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: auto, measured per run, see docs/training.md)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: auto, measured with --amp's probe)",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the models"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace runs made with other settings and an existing report"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from nodulekit.datasets import load_dataset
    from nodulekit.errors import NodulekitError
    from nodulekit.evaluation import evaluate_runs
    from nodulekit.models import model_spec
    from nodulekit.training import TrainConfig, train

    try:
        archs = [a.strip() for a in args.archs.split(",") if a.strip()]
        for a in archs:
            model_spec(a)  # unknown names fail before hours of training
        options = parse_scoped_options(args.model_opt, archs)
        data = load_dataset(args.dataset)
        n_train = int(len(data.y) - len(data.y) / data.n_folds)
        args.output.mkdir(parents=True, exist_ok=True)
        timing, rundirs = [], []
        for arch in archs:
            rundir = args.output / "runs" / f"{arch}-{data.name.lower()}"
            cfg = TrainConfig(
                arch=arch,
                model_options=options[arch],
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                lr_step=args.lr_step,
                seed=args.seed,
                select=args.select,
                device=args.device,
                amp=args.amp,
                channels_last=args.channels_last,
                compile=args.compile,
            )
            start = time.perf_counter()
            out = train(args.dataset, rundir, cfg, overwrite=args.overwrite, progress=not args.no_progress)
            wall = time.perf_counter() - start
            trained_epochs = sum(s["epochs_run"] for s in out["folds"])
            row = {
                "arch": arch,
                "dataset": data.name,
                "model_options": out["run"]["model_options"],
                "device": out["run"]["device"],
                "execution": out["execution"]["variant"],
                "folds": len(out["folds"]),
                "folds_trained": sum(s["status"] != "skipped" for s in out["folds"]),
                "epochs": args.epochs,
                "wall_s": round(wall, 2),
                # per epoch of one fold: train on ~N*(k-1)/k rows + evaluate the test fold
                "epochs_run": trained_epochs,
                "s_per_fold_epoch": round(wall / trained_epochs, 3) if trained_epochs else None,
                "n_train_per_fold": n_train,
            }
            timing.append(row)
            rundirs.append(rundir)
            print(f"{arch}: {wall:.1f} s wall ({row['s_per_fold_epoch']} s per fold-epoch)", file=sys.stderr)
        report = evaluate_runs(rundirs, args.output / "report", overwrite=args.overwrite)
        for row, summary in zip(timing, report["summaries"], strict=True):
            row["median_epoch_s"] = summary["median_epoch_seconds"]  # from the folds' own timings, survives resume
    except NodulekitError as exc:
        print(f"table2: error: {exc}", file=sys.stderr)
        return 2
    lines = [
        "| Arch | Dataset | Device | Execution | Folds trained | Epochs | Wall (s) | s per fold-epoch (wall) | median epoch (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {t['arch']} | {t['dataset']} | {t['device']} | {t['execution']} | {t['folds_trained']} | {t['epochs']} | {t['wall_s']} | "
        f"{t['s_per_fold_epoch'] if t['s_per_fold_epoch'] is not None else 'n/a (nothing trained)'} | "
        f"{t['median_epoch_s']:.3f} |"
        for t in timing
    ]
    (args.output / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    (args.output / "timing.md").write_text("\n".join(lines) + "\n")
    print(report["markdown"])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
