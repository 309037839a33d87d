#!/usr/bin/env python
"""Table 2 benchmark: 5-fold cross-validation of HESAM vs ResNet18 vs VGG16 vs Ours-CAM vs Ours-SAM.

Trains every architecture on one `dataset` artifact (normally D11C built from the
LIDC VOIs) with the paper's settings, times each, then writes the Table 2 style report
with `nodulekit.evaluation.evaluate_runs` (pooled numbers with patient-bootstrap 95 %
intervals) and compares HESAM (or the first arch) with every other arch on the same nodules
(`nodulekit.stats.wilcoxon_runs`: AUC difference with its interval, DeLong's test, Holm over
the comparisons) into `report/table2_ci.md` and `report/comparisons.md`. Runs are resumable:
re-running the same command continues unfinished folds and skips finished ones, so it also
re-makes the report from finished runs.

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


def _ci(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    return (
        f"{scale * stat['estimate']:.{digits}f} [{scale * stat['low']:.{digits}f}, {scale * stat['high']:.{digits}f}]"
    )


def table2_ci_markdown(summaries: list[dict], comparisons, reference: str, note: str) -> str:
    """Table 2 rows with 95 % intervals and, for every arch but the reference, AUC difference, clustered and DeLong p."""
    by_run = {row["run_b"]: row for _, row in comparisons.iterrows()}
    lines = [
        f"## Table 2 with uncertainty ({summaries[0]['dataset']}, test folds pooled)\n",
        note + "\n",
        f"| Method | Accuracy % | Sensitivity | Specificity | AUC | AUC − {reference} | clustered p (Holm) "
        "| DeLong p | DeLong p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ci = s["pooled_nodule_ci"]
        row = by_run.get(s["rundir"])
        cells = [_ci(ci["accuracy"], 100, 2), _ci(ci["sensitivity"]), _ci(ci["specificity"]), _ci(ci["auc"])]
        if row is None:
            cells += ["(reference)", "", "", ""]
        else:
            diff = row["auc_a"] - row["auc_b"]  # reference minus other in the comparison: flip the sign
            cells += [
                f"{-diff:+.3f} [{-row['auc_diff_high']:+.3f}, {-row['auc_diff_low']:+.3f}]",
                f"{row['auc_p_holm']:.3g}",
                f"{row['delong_p']:.3g}",
                f"{row['delong_p_holm']:.3g}",
            ]
        lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparisons(archs, rundirs, summaries, report_dir: Path, overwrite: bool, *, n_resamples: int, seed: int):
    """HESAM (or the first arch) against every other arch on the same nodules: comparisons.md/.csv/.json
    and table2_ci.md."""
    from nodulekit.artifacts import atomic_path, check_output_path
    from nodulekit.stats import (
        bootstrap_note,
        comparison_markdown_table,
        wilcoxon_notes,
        wilcoxon_runs,
        write_report,
    )

    ref = archs.index("hesam") if "hesam" in archs else 0
    ordered = [rundirs[ref]] + [r for i, r in enumerate(rundirs) if i != ref]
    table = wilcoxon_runs(ordered, n_resamples=n_resamples, seed=seed)
    write_report(
        table,
        report_dir / "comparisons.md",
        title=f"{archs[ref]} against each other architecture, same nodules",
        notes=wilcoxon_notes(n_resamples, seed, 9999),
        record={"stage": "table2 comparisons", "rundirs": [str(r) for r in ordered]},
        overwrite=overwrite,
        md_table=comparison_markdown_table(table),
    )
    note = (
        f"Every nodule's probability comes from the fold model that did not train on it. "
        f"{bootstrap_note(n_resamples, seed)}. AUC − {summaries[ref]['method']}: difference of pooled AUCs with its "
        "patient-bootstrap interval; clustered p: Obuchowski's test of the AUC difference with patients as clusters "
        "(the default, docs/statistics.md); DeLong p: DeLong's test for two correlated AUCs (nodules as independent cases); "
        "Holm: adjusted over the comparisons with the reference. Threshold 0.5 fixed in advance."
    )
    target = check_output_path(report_dir / "table2_ci.md", overwrite)
    with atomic_path(target, suffix=".md.part") as tmp:
        tmp.write_text(table2_ci_markdown(summaries, table, summaries[ref]["method"], note))


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
    parser.add_argument("--bootstrap", type=int, default=2000, help="patient resamples for the 95 %% intervals")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap and permutation tests")
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
        boot = {"n_resamples": args.bootstrap, "seed": args.bootstrap_seed}
        report = evaluate_runs(rundirs, args.output / "report", overwrite=args.overwrite, **boot)
        for row, summary in zip(timing, report["summaries"], strict=True):
            row["median_epoch_s"] = summary["median_epoch_seconds"]  # from the folds' own timings, survives resume
        if len(rundirs) > 1:
            write_comparisons(archs, rundirs, report["summaries"], args.output / "report", args.overwrite, **boot)
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
