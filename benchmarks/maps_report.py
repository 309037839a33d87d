"""Do soft activation maps look at the nodule margin? A report over trained runs.

Given cross-validated RUNDIRs on one dataset (e.g. Ours-HESAM, Ours-SAM, Ours-CAM, ResNet18,
VGG16 on D11C), this computes for every run the maps *of that run's own model*, each nodule
by the fold model that did not train on it:

- the model's own head map: CAM (Eq. 2), SAM (Eq. 7) or HESAM (Eq. 11), as the paper defines them;
- the faithful SAM/HESAM map (``sam-faithful``/``hesam-faithful``: the map whose sum plus the
  stated constants is the class score; docs/maps.md), where the model has an average-pooled SAM head;
- Grad-CAM of that same model (Eq. 3-4), for every run, so Grad-CAM is never borrowed from another model.

Then it scores where each map puts its positive energy (body / margin band / outside of the
readers' consensus contour, see nodulekit/scores.py), with patient-bootstrap intervals, and tests
the band and body shares of a reference map against every other map on the same nodules with a
patient sign-flip permutation test, Holm-adjusted per nodule class. Writes a Markdown report,
the per-nodule scores and figures.

Usage (from the repository root):

    python benchmarks/maps_report.py --run hesam=runs/hesam-d11c --run sam=runs/sam-d11c \\
        --run cam=runs/cam-d11c --run resnet18=runs/resnet18-d11c --run vgg16=runs/vgg16-d11c -o reports/maps

Outputs in OUT: maps_<run>_<method>.h5 (kept and reused on a re-run: finished work is not redone),
scores.csv/.md/.json, tests.csv, region_scores.png, map_grid.png, maps_report.md.
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
TESTED = ("share_margin_band", "share_body")


def parse_runs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``LABEL=RUNDIR`` strings -> [(label, rundir)], labels unique."""
    from nodulekit.errors import NodulekitError

    out: list[tuple[str, Path]] = []
    for spec in specs:
        label, sep, rundir = spec.partition("=")
        if not sep or not label or not rundir:
            raise NodulekitError(f"--run wants LABEL=RUNDIR, got {spec!r}")
        if label in [lab for lab, _ in out]:
            raise NodulekitError(f"--run: label {label!r} given twice")
        out.append((label, Path(rundir)))
    if not out:
        raise NodulekitError("give at least one --run LABEL=RUNDIR")
    return out


def methods_for(model, only: Sequence[str] | None = None) -> list[str]:
    """The maps to compute for one run's model: its own head map, its faithful map, Grad-CAM."""
    from nodulekit.maps import supported_methods

    kind = getattr(model, "map_kind", None)
    wanted = [kind, f"{kind}-faithful", "gradcam"] if kind else ["gradcam"]
    supported = supported_methods(model)
    return [m for m in wanted if m in supported and (not only or m in only)]


def paired_region_tests(scores, reference: str, *, n_resamples: int = 2000, seed: int = 0, n_permutations: int = 9999):
    """Per nodule class and region share: reference map minus each other map on the same nodules.

    Mean difference with a patient-bootstrap 95 % interval, a patient sign-flip permutation test,
    and Holm's adjustment over the other maps (one family per class and region). Nodules where
    either map has no positive value are left out of that pair.
    """
    import pandas as pd

    from nodulekit.stats import cluster_bootstrap, cluster_sign_flip_test, holm

    records = []
    for column in TESTED:
        wide = scores.pivot_table(index=["nodule_id", "patient_id", "class"], columns="map", values=column)
        for cls in sorted(wide.index.get_level_values("class").unique()):
            family = []
            for other in [m for m in wide.columns if m != reference]:
                part = wide.xs(cls, level="class")[[reference, other]].dropna()
                if len(part) == 0:
                    continue
                diff = (part[reference] - part[other]).to_numpy()
                patients = part.index.get_level_values("patient_id").to_numpy()
                ci = cluster_bootstrap(
                    patients, lambda w, d=diff: (w @ d / w.sum(1))[None], n_resamples=n_resamples, seed=seed
                )
                flip = cluster_sign_flip_test(diff, patients, n_resamples=n_permutations, seed=seed)
                family.append(
                    {
                        "region": column.removeprefix("share_"),
                        "class": cls,
                        "reference": reference,
                        "other": other,
                        "n": len(part),
                        "n_patients": flip["n_patients"],
                        "mean_diff": flip["mean_diff"],
                        "diff_low": float(ci["low"][0]),
                        "diff_high": float(ci["high"][0]),
                        "p_patients": flip["p_value"],
                    }
                )
            for rec, adjusted in zip(family, holm([r["p_patients"] for r in family]), strict=True):
                rec["p_holm"] = float(adjusted)
            records += family
    return pd.DataFrame.from_records(records)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def _ci(row, column) -> str:
    m, lo, hi = row[f"mean_{column}"], row[f"mean_{column}_low"], row[f"mean_{column}_high"]
    return "n/a" if np.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _runs_section(runs, maps_of, accuracy) -> list[str]:
    lines = [
        "\n## Runs and maps\n",
        "| run | RUNDIR | maps | accuracy % [95 % CI] | AUC [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for label, rundir in runs:
        acc, auc = accuracy[label]["accuracy"], accuracy[label]["auc"]
        lines.append(
            f"| {label} | `{rundir}` | {', '.join(maps_of[label])} | "
            f"{100 * acc['estimate']:.2f} [{100 * acc['low']:.2f}, {100 * acc['high']:.2f}] | "
            f"{auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] |"
        )
    return lines


def _regions_section(scores, n_resamples: int, seed: int) -> list[str]:
    from nodulekit.scores import summarise_scores

    summary = summarise_scores(scores, "class", n_resamples=n_resamples, seed=seed)
    lines = [
        "\n## Energy share and enrichment by region (mean [95 % CI])\n",
        "| map | class | n | band share | body share | outside share | band enrichment | body enrichment | "
        "outside enrichment | peak in band | peak in body |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in summary.iterrows():
        lines.append(
            f"| {row['map']} | {row['group']} | {row['n']} | "
            + " | ".join(
                _ci(row, c)
                for c in (
                    "share_margin_band",
                    "share_body",
                    "share_outside",
                    "enrichment_margin_band",
                    "enrichment_body",
                    "enrichment_outside",
                )
            )
            + f" | {_fmt(row['pointing_margin_band'])} | {_fmt(row['pointing_body'])} |"
        )
    for by, title in (
        ("spiculation", "By the readers' spiculation rating (mean)"),
        ("margin", "By the readers' margin rating (mean; 1 = poorly defined, 5 = sharp)"),
    ):
        if by not in scores.columns:
            continue
        strat = summarise_scores(scores, by, n_resamples=n_resamples, seed=seed)
        lines += [
            f"\n## {title}\n",
            "| map | group | n | band share | band enrichment | body enrichment | outside enrichment |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['map']} | {r['group']} | {r['n']} | {_ci(r, 'share_margin_band')} | "
            f"{_ci(r, 'enrichment_margin_band')} | {_ci(r, 'enrichment_body')} | {_ci(r, 'enrichment_outside')} |"
            for _, r in strat.iterrows()
        ]
    return lines


def report_markdown(scores, tests, accuracy, runs, maps_of, dataset: str, settings: dict) -> str:
    from nodulekit.scores import band_rule
    from nodulekit.stats import bootstrap_note

    lines = [
        "# Where do the activation maps look? Body, margin band and outside\n",
        f"Dataset: `{dataset}`. Each nodule's map comes from the fold model that did not train on it, and every "
        "map of a run (its own head map, its faithful map, its Grad-CAM) is computed on that run's model. "
        "Malignant-class maps, clipped at 0; regions from the readers' consensus contour on input channel "
        f"{scores.attrs.get('mask_channel', '?')} (the centre slice at ROI side 2 x diameter) with {band_rule(scores)}: "
        "body = contour eroded by r, margin band = within r of the contour (both sides), outside = the rest. "
        "Share = fraction of the map's positive energy in a region; enrichment = share / area fraction "
        "(1 = no preference); peak = how often the map's maximum lies in the region. "
        f"{bootstrap_note(settings['n_resamples'], settings['seed'])}.\n",
        *_runs_section(runs, maps_of, accuracy),
        *_regions_section(scores, settings["n_resamples"], settings["seed"]),
    ]
    if len(tests):
        lines += [
            f"\n## Paired differences of the region shares, {tests['reference'].iloc[0]} minus each other map\n",
            "Same nodules (both maps non-empty); mean difference with its 95 % patient-bootstrap interval; "
            f"p: two-sided permutation test flipping all of a patient's differences together ({settings['n_permutations']} "
            "random sign patterns or all of them); Holm: adjusted over the other maps, per class and region.\n",
            "| region | class | other | n / patients | mean difference [95 % CI] | p | p (Holm) |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {r['region']} | {r['class']} | {r['other']} | {r['n']} / {r['n_patients']} | "
                f"{r['mean_diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] | {r['p_patients']:.3g} | "
                f"{r['p_holm']:.3g} |"
                for _, r in tests.iterrows()
            ],
        ]
    empty = int(scores["empty_map"].sum())
    if empty:
        lines.append(f"\n{empty} map(s) had no positive values and are left out of the shares.")
    lines += ["\n![region scores](region_scores.png)\n", "![maps](map_grid.png)\n", f"\n{LIDC_ATTRIBUTION}\n"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", action="append", default=[], metavar="LABEL=RUNDIR", help="a trained run to map (repeat)"
    )
    parser.add_argument("--methods", default=None, help="only these map methods (comma-separated) [all that apply]")
    parser.add_argument("--dataset", help="dataset artifact [default: the one in the first run's run.json]")
    parser.add_argument(
        "--reference", default=None, help="map the others are tested against, LABEL:METHOD [first run's own map]"
    )
    parser.add_argument("--radius-mm", type=float, default=2.0, help="margin band half-width in mm [2.0]")
    parser.add_argument(
        "--radius-frac",
        type=float,
        default=None,
        help="instead: band half-width as a fraction of each nodule's equivalent radius",
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="patient resamples for the intervals [2000]")
    parser.add_argument("--permutations", type=int, default=9999, help="random sign patterns per test [9999]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the permutations [0]")
    parser.add_argument("--device", default=None, help="cpu / cuda [default: cuda if available]")
    parser.add_argument("--n-figure", type=int, default=6, help="nodules in the map grid [6]")
    parser.add_argument("--skip-empty-masks", action="store_true", help="leave out nodules with an empty mask")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="recompute maps and replace every output")
    args = parser.parse_args(argv)

    from nodulekit.errors import NodulekitError

    try:
        return _run(args)
    except NodulekitError as exc:
        print(f"maps_report: error: {exc}", file=sys.stderr)
        return 2


def _compute_maps(runs, args, out: Path, dataset) -> tuple[list[Path], list[str], dict, dict]:
    """Every run's maps (reusing finished files), their labels, methods per run, and accuracy per run."""
    from nodulekit.artifacts import read_maps
    from nodulekit.constants import predict_label
    from nodulekit.errors import NodulekitError
    from nodulekit.maps import run_maps, write_run_maps
    from nodulekit.run import Run
    from nodulekit.stats import classification_cis

    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    paths, labels, maps_of, accuracy = [], [], {}, {}
    for label, rundir in runs:
        run = Run(rundir)
        model, _ = run.load_model(run.finished_folds()[0] if run.finished_folds() else 0)
        maps_of[label] = methods_for(model, only)
        if not maps_of[label]:
            raise NodulekitError(f"--run {label}: none of the requested map methods applies to {run.arch}")
        for method in maps_of[label]:
            path = out / f"maps_{label}_{method}.h5"
            if args.overwrite or not path.exists():
                result = run_maps(rundir, method, dataset=dataset, device=args.device, progress=True)
                write_run_maps(result, path, rundir=rundir, overwrite=args.overwrite)
                print(f"wrote {path}", file=sys.stderr)
            else:
                print(f"reusing {path}", file=sys.stderr)
            paths.append(path)
            labels.append(f"{label}:{method}")
        m = read_maps(paths[-1])
        patients = [n.rsplit(":", 1)[0] for n in m.nodule_id]
        accuracy[label] = classification_cis(
            m.y, m.prob, predict_label(m.prob), patients, n_resamples=args.bootstrap, seed=args.seed
        )
    return paths, labels, maps_of, accuracy


def _run(args) -> int:
    from nodulekit.artifacts import atomic_path, check_output_path
    from nodulekit.errors import NodulekitError
    from nodulekit.figures import map_grid, region_score_plot
    from nodulekit.run import Run
    from nodulekit.scores import score_maps, write_scores

    runs = parse_runs(args.run)
    out = Path(args.output)
    report = out / "maps_report.md"
    out.mkdir(parents=True, exist_ok=True)
    check_output_path(report, args.overwrite)
    dataset = Run(runs[0][1]).dataset_path(args.dataset)
    paths, labels, maps_of, accuracy = _compute_maps(runs, args, out, dataset)
    reference = args.reference or labels[0]
    if reference not in labels:
        raise NodulekitError(f"--reference {reference!r} is not one of the maps: {', '.join(labels)}")
    scores = score_maps(
        paths,
        dataset,
        radius_mm=args.radius_mm,
        radius_frac=args.radius_frac,
        skip_empty_masks=args.skip_empty_masks,
        labels=labels,
    )
    boot = {"n_resamples": args.bootstrap, "seed": args.seed}
    write_scores(scores, out / "scores.csv", overwrite=True, **boot)
    tests = paired_region_tests(scores, reference, n_permutations=args.permutations, **boot)
    with atomic_path(out / "tests.csv", suffix=".csv.part") as tmp:
        tests.to_csv(tmp, index=False)
    region_score_plot(scores, out / "region_scores.png", overwrite=True)
    map_grid(paths, dataset, out / "map_grid.png", n=args.n_figure, overwrite=True, labels=labels)
    settings = {**boot, "n_permutations": args.permutations}
    with atomic_path(report, suffix=".md.part") as tmp:
        tmp.write_text(report_markdown(scores, tests, accuracy, runs, maps_of, str(dataset), settings))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
