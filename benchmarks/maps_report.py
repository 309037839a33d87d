"""Do soft activation maps look at the nodule margin? A report over trained runs.

Given cross-validated RUNDIRs (e.g. Ours-CAM, Ours-SAM, Ours-HESAM trained on a real D11C)
this computes each requested map for every nodule with its test-fold model, scores where the
map puts its positive energy (body / margin band / outside of the readers' consensus contour,
see nodulekit/scores.py) and writes a Markdown report comparing methods for malignant and
benign nodules, with paired Wilcoxon tests of the margin-band share against a reference
method on the same nodules, and figures.

Usage (from the repository root):

    python benchmarks/maps_report.py \\
        --maps cam=runs/cam-d11c --maps sam=runs/sam-d11c --maps hesam=runs/hesam-d11c \\
        --maps gradcam=runs/hesam-d11c --reference hesam -o reports/maps

Outputs in OUT: maps_<method>.h5 (kept and reused on a re-run: finished work is not redone),
scores.csv/.md/.json, region_scores.png, map_grid.png, maps_report.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LIDC_ATTRIBUTION = (
    "Data: LIDC-IDRI (Armato III et al., 2015, The Cancer Imaging Archive, "
    "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX; Med. Phys. 38:915-931, 2011), CC BY 3.0."
)


def parse_maps_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``METHOD=RUNDIR`` strings -> [(method, rundir)], methods unique and known."""
    from nodulekit.errors import NodulekitError
    from nodulekit.maps import METHODS

    out: list[tuple[str, Path]] = []
    for spec in specs:
        method, sep, rundir = spec.partition("=")
        if not sep or not rundir:
            raise NodulekitError(f"--maps wants METHOD=RUNDIR, got {spec!r}")
        if method not in METHODS:
            raise NodulekitError(f"--maps {spec!r}: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method in [m for m, _ in out]:
            raise NodulekitError(f"--maps: method {method!r} given twice (one run per method)")
        out.append((method, Path(rundir)))
    if not out:
        raise NodulekitError("give at least one --maps METHOD=RUNDIR")
    return out


def paired_band_tests(scores, reference: str, region: str = "margin_band"):
    """Per nodule class: Wilcoxon signed-rank of a region's share, reference method vs each other, same nodules."""
    import pandas as pd
    from scipy.stats import wilcoxon

    records = []
    wide = scores.pivot_table(index=["nodule_id", "class"], columns="method", values=f"share_{region}")
    for method in [m for m in wide.columns if m != reference]:
        for cls in sorted(wide.index.get_level_values("class").unique()):
            part = wide.xs(cls, level="class")[[reference, method]].dropna()
            diff = part[reference] - part[method]
            if len(part) == 0:
                continue
            if np.all(diff == 0):
                p = 1.0
            else:
                p = float(wilcoxon(part[reference], part[method]).pvalue)
            records.append(
                {
                    "class": cls,
                    "reference": reference,
                    "other": method,
                    "n": len(part),
                    "median_diff": float(np.median(diff)),
                    "p_value": p,
                }
            )
    return pd.DataFrame.from_records(records)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def report_markdown(scores, tests, accuracy: dict[str, float], runs: list[tuple[str, Path]], dataset: str) -> str:
    from nodulekit.scores import band_rule, summarise_scores

    summary = summarise_scores(scores, "class")
    lines = [
        "# Where do the activation maps look? Margin band vs body\n",
        f"Dataset: `{dataset}`. Each nodule's map comes from the fold model that did not train on it. "
        f"Malignant-class maps, clipped at 0; regions from the readers' consensus contour on the centre slice "
        f"with {band_rule(scores)}: body = contour eroded by r, margin band = within r of the contour "
        "(both sides), outside = the rest. Share = fraction of the map's positive energy in a region; "
        "enrichment = share / area fraction (1 = no preference); pointing = how often the map's peak is in the region.\n",
        "\n## Runs\n",
        "| method | RUNDIR | test accuracy (all folds, p > 0.5) |",
        "|---|---|---|",
        *[f"| {m} | `{r}` | {_fmt(accuracy.get(m, float('nan')))} |" for m, r in runs],
        "\n## Energy share by region (mean; median in brackets)\n",
        "| method | class | n | margin band | body | outside | band enrichment | body enrichment | peak in band | peak in body |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in summary.iterrows():
        lines.append(
            f"| {row['method']} | {row['group']} | {row['n']} | "
            f"{_fmt(row['mean_share_margin_band'])} [{_fmt(row['median_share_margin_band'])}] | "
            f"{_fmt(row['mean_share_body'])} [{_fmt(row['median_share_body'])}] | "
            f"{_fmt(row['mean_share_outside'])} [{_fmt(row['median_share_outside'])}] | "
            f"{_fmt(row['mean_enrichment_margin_band'])} | {_fmt(row['mean_enrichment_body'])} | "
            f"{_fmt(row['pointing_margin_band'])} | {_fmt(row['pointing_body'])} |"
        )
    for by, title in (
        ("spiculation", "By the readers' spiculation rating (mean)"),
        ("margin", "By the readers' margin rating (mean; 1 = poorly defined, 5 = sharp)"),
    ):
        if by not in scores.columns:
            continue
        strat = summarise_scores(scores, by)
        lines += [
            f"\n## {title}\n",
            "| method | group | n | margin band | band enrichment | body | peak in band |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['group']} | {r['n']} | {_fmt(r['mean_share_margin_band'])} | "
            f"{_fmt(r['mean_enrichment_margin_band'])} | {_fmt(r['mean_share_body'])} | "
            f"{_fmt(r['pointing_margin_band'])} |"
            for _, r in strat.iterrows()
        ]
    if len(tests):
        lines += [
            "\n## Paired tests of the margin-band share (same nodules)\n",
            "Two-sided Wilcoxon signed-rank test per nodule class; difference = reference minus other "
            "(positive: the reference puts more of its energy in the margin band).\n",
            "| class | reference | other | n | median difference | p |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r['class']} | {r['reference']} | {r['other']} | {r['n']} | {_fmt(r['median_diff'])} | "
                f"{r['p_value']:.3g} |"
                for _, r in tests.iterrows()
            ],
        ]
    empty = int(scores["empty_map"].sum())
    if empty:
        lines.append(f"\n{empty} map(s) had no positive values and are left out of the shares.")
    lines += [
        "\n![region scores](region_scores.png)\n",
        "![maps](map_grid.png)\n",
        f"\n{LIDC_ATTRIBUTION}\n",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--maps",
        action="append",
        default=[],
        metavar="METHOD=RUNDIR",
        help="a map method and the run to take it from (repeat)",
    )
    parser.add_argument("--dataset", help="dataset artifact [default: the one in the first run's run.json]")
    parser.add_argument(
        "--reference",
        default=None,
        help="method the others are tested against [default: hesam if given, else the first]",
    )
    parser.add_argument("--radius-mm", type=float, default=2.0, help="margin band half-width in mm [2.0]")
    parser.add_argument(
        "--radius-frac",
        type=float,
        default=None,
        help="instead: band half-width as a fraction of each nodule's equivalent radius",
    )
    parser.add_argument("--device", default=None, help="cpu / cuda [default: cuda if available]")
    parser.add_argument("--n-figure", type=int, default=6, help="nodules in the map grid [6]")
    parser.add_argument("--skip-empty-masks", action="store_true", help="leave out nodules with an empty centre mask")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="recompute maps and replace every output")
    args = parser.parse_args(argv)

    from nodulekit.errors import NodulekitError

    try:
        return _run(args)
    except NodulekitError as exc:
        print(f"maps_report: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from nodulekit.artifacts import atomic_path, check_output_path, read_maps
    from nodulekit.constants import predict_label
    from nodulekit.errors import NodulekitError
    from nodulekit.figures import map_grid, region_score_plot
    from nodulekit.maps import run_maps, write_run_maps
    from nodulekit.run import Run
    from nodulekit.scores import score_maps, write_scores

    runs = parse_maps_specs(args.maps)
    reference = args.reference or ("hesam" if "hesam" in dict(runs) else runs[0][0])
    if reference not in dict(runs):
        raise NodulekitError(f"--reference {reference!r} is not one of the --maps methods")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "maps_report.md"
    check_output_path(report, args.overwrite)
    dataset = Run(runs[0][1]).dataset_path(args.dataset)
    paths, accuracy = [], {}
    for method, rundir in runs:
        path = out / f"maps_{method}.h5"
        if args.overwrite or not path.exists():
            result = run_maps(rundir, method, dataset=dataset, device=args.device, progress=True)
            write_run_maps(result, path, rundir=rundir, overwrite=args.overwrite)
            print(f"wrote {path}", file=sys.stderr)
        else:
            print(f"reusing {path}", file=sys.stderr)
        written = read_maps(path)
        prob, y = written.prob, written.y
        accuracy[method] = float((predict_label(prob) == y).mean())
        paths.append(path)
    scores = score_maps(
        paths, dataset, radius_mm=args.radius_mm, radius_frac=args.radius_frac, skip_empty_masks=args.skip_empty_masks
    )
    write_scores(scores, out / "scores.csv", overwrite=True)
    region_score_plot(scores, out / "region_scores.png", overwrite=True)
    map_grid(paths, dataset, out / "map_grid.png", n=args.n_figure, overwrite=True)
    tests = paired_band_tests(scores, reference)
    with atomic_path(report, suffix=".md.part") as tmp:
        tmp.write_text(report_markdown(scores, tests, accuracy, runs, str(dataset)))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
