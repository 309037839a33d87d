"""`nodulekit build`: the paper's D1C/D3C/D11C/D21C datasets from a `rois` artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from nodulekit.cli import app
from nodulekit.cli.common import PROGRESS, QUIET, inputs, say, show_progress


# Long only by its typer option declarations: the body parses and calls the library.
@app.command("build")
def build(
    rois: Path = typer.Argument(..., help="The `rois` HDF5 artifact written by `nodulekit extract`."),
    channels: Literal[1, 3, 11, 21] = typer.Option(
        11,
        "--channels",
        "-c",
        help="Input channels, one of 1, 3, 11, 21: D1C = centre slice; D3C = centre slice at "
        "2x, 3x, 4x the diameter; D11C/D21C = 11/21 adjacent 1 mm slices about the centre.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The `dataset` HDF5 file to write."),
    folds: int = typer.Option(5, "--folds", help="Number of cross-validation folds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled fold assignment."),
    split: Literal["patient", "nodule"] = typer.Option(
        "patient",
        "--split",
        help="'patient': stratified by label and grouped by patient, no patient in two "
        "folds. 'nodule': per-nodule stratified folds (the paper does not say which it used), LEAKY (one patient's nodules "
        "can be in both training and test); recorded in the file.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """Build a 32x32 multi-channel dataset (paper Table 1) with cross-validation folds.

    Each channel is a square ROI of side p x diameter (p = 2; D3C uses 2, 3, 4) centred on the nodule, HU clipped to [-1000, 400] and scaled to [0, 1], resampled linearly to 32x32, with the consensus mask on the same grid.

    Example: nodulekit build rois.h5 --channels 11 -o d11c.h5 --folds 5 --seed 0
    """
    from nodulekit.datasets import build_dataset, dataset_fingerprint, load_dataset

    inputs(rois)
    path = build_dataset(
        rois,
        output,
        channels=channels,
        n_folds=folds,
        seed=seed,
        split=split,
        overwrite=overwrite,
        progress=show_progress(progress, quiet),
    )
    ds = load_dataset(path)
    counts = ", ".join(
        f"fold {k}: {int((ds.fold == k).sum())} ({int(ds.y[ds.fold == k].sum())} malignant)" for k in range(ds.n_folds)
    )
    say(
        f"wrote {path}: {ds.name} x {tuple(ds.x.shape)}, {int(ds.y.sum())} malignant / "
        f"{int((ds.y == 0).sum())} benign, {len(set(ds.patient_id))} patients, {split} split; "
        f"{counts}; fingerprint {dataset_fingerprint(ds)}",
        quiet,
    )
    if ds.filled_channels is not None and ds.filled_channels.any():
        say(
            f"note: {int(ds.filled_channels.sum())} of {ds.filled_channels.size} channels "
            f"({100 * ds.filled_channels.mean():.1f}%, in {int(ds.filled_channels.any(axis=1).sum())} nodules) "
            "lie outside their source in z and are edge-replicated slices (see filled_channels)",
            quiet,
        )
    if ds.inplane_filled_channels is not None and ds.inplane_filled_channels.any():
        say(
            f"note: {int(ds.inplane_filled_channels.sum())} of {ds.inplane_filled_channels.size} channels "
            f"(in {int(ds.inplane_filled_channels.any(axis=1).sum())} nodules) reach into an edge-replicated "
            "in-plane border (see inplane_filled_channels)",
            quiet,
        )
