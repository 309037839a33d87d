"""`nodulekit predict` (a model on your own CT) and `nodulekit describe` (what a model file needs and says)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import typer

from nodulekit.cli import app
from nodulekit.cli.common import DPI, FIGURE_FORMAT, PROGRESS, echo, inputs, show_progress


# Long only by its typer option declarations: the body parses and calls the library.
@app.command("predict")
def predict_cmd(
    model: Path = typer.Argument(
        ..., help="An ONNX file from `export-onnx` (ONNX Runtime), or a RUNDIR / checkpoint.pt (PyTorch)."
    ),
    scan: Path = typer.Argument(
        ...,
        help="The CT: a NIfTI (.nii/.nii.gz), MetaImage (.mhd/.mha) or NRRD (.nrrd/.nhdr) file, or a folder holding "
        "one DICOM series.",
    ),
    mask: Path | None = typer.Option(
        None,
        "--mask",
        help="Label image (NIfTI, MetaImage, NRRD) in the scan's space, in any voxel order: one nodule per label "
        "value or connected component.",
    ),
    mask_nodules: Literal["auto", "components", "labels"] = typer.Option(
        "auto",
        "--mask-nodules",
        help="auto: per label value when the mask has several, else per 26-connected component.",
    ),
    centre: str | None = typer.Option(None, "--centre", help="One nodule's centre X,Y,Z (frame: --coords)."),
    diameter: float | None = typer.Option(
        None, "--diameter", help="Its diameter in mm (with --centre), 1 <= d <= 100."
    ),
    nodules: Path | None = typer.Option(
        None,
        "--nodules",
        help="CSV (UTF-8) with columns x, y, z, diameter_mm and optionally id, or LUNA16's seriesuid, coordX, "
        "coordY, coordZ, diameter_mm (LPS mm; the rows of the scan's series); one nodule per row.",
    ),
    coords: Literal["lps", "ras", "voxel"] = typer.Option(
        "lps",
        "--coords",
        help="Frame of --centre and the CSV: lps = DICOM patient mm (x left, y posterior, z superior), ras = NIfTI/Slicer world mm, voxel = the scan's own 0-based voxel indices as stored.",
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Also write per-nodule overlay PNGs and maps (NIfTI on the scan's grid) to this new folder.",
    ),
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = typer.Option(
        "auto", "--provider", help="ONNX Runtime provider (ONNX models)."
    ),
    device: str = typer.Option(
        "auto", "--device", help="PyTorch device for a RUNDIR/checkpoint: auto, cpu, cuda, cuda:1, ..."
    ),
    fold: int | None = typer.Option(None, "--fold", help="One fold of a RUNDIR (default: every fold, averaged)."),
    batch: int = typer.Option(256, "--batch", min=1, help="Nodules per model call."),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="PyTorch only: bf16 autocast on or off (default: auto, see `train --help`)."
    ),
    channels_last: bool | None = typer.Option(
        None, "--channels-last/--no-channels-last", help="PyTorch only: channels_last memory format (default: auto)."
    ),
    min_diameter: float | None = typer.Option(
        None,
        "--min-diameter",
        help="Mask components smaller than this (mm) are fragments: skipped with a warning (default 3, the smallest LIDC-IDRI nodule outlined).",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Refuse (exit 2, nothing written) instead of warning about implausible input."
    ),
    fmt: str = FIGURE_FORMAT,
    dpi: int = DPI,
    dicom: bool = typer.Option(
        False,
        "--dicom",
        help="DICOM scans only, with -o: also write each map as a DICOM Parametric Map and the findings as a DICOM SR (TID 1500), referencing the source series.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the -o folder if it exists."),
    progress: bool | None = PROGRESS,
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors on stderr."),
) -> None:
    """Score nodules of your own chest CT: one JSON line per nodule on stdout.

    Each line: id, centre (mm and voxel), diameter, malignant probability, label at the model's threshold and, for a fold ensemble, each member's probability and their spread. Messages go to stderr, so the output pipes into jq or a file. The input of each nodule is built exactly as `extract` + `build` build it for LIDC nodules, with the channel layout the model file describes (`nodulekit describe MODEL`). Research use only; not a medical device.

    Examples:

    \b
      nodulekit predict model.onnx scan.nii.gz --mask nodules.nii.gz -o out/
      nodulekit predict model.onnx LIDC-IDRI-0001/.../<series>/ --centre 56.4,86.3,-116.0 --diameter 23.4
      nodulekit predict runs/hesam-d11c ct.nii.gz --nodules nodules.csv --coords ras > results.jsonl
      nodulekit predict model.onnx subset0/<seriesuid>.mhd --nodules annotations.csv   # LUNA16
    """
    from nodulekit.outputs import folder_writer, stdout_closed
    from nodulekit.predict import predict

    def say(line: str) -> None:
        if not quiet:
            echo(f"nodulekit: {line}", err=True)

    inputs(model, scan, mask, nodules)
    if stdout_closed():
        from nodulekit.errors import NodulekitError

        raise NodulekitError("standard output is closed, and predict prints its results there: redirect it to a file")
    with folder_writer(output, overwrite, "predict"):  # -o checked, and held, before any work
        result = predict(
            model,
            scan,
            mask=mask,
            mask_mode=mask_nodules,
            centre=centre,
            diameter=diameter,
            nodules=nodules,
            coords=coords,
            output=output,
            overwrite=overwrite,
            provider=provider,
            device=device,
            fold=fold,
            batch=batch,
            amp="auto" if amp is None else amp,
            channels_last="auto" if channels_last is None else channels_last,
            progress=show_progress(progress, quiet),
            report=say,
            min_diameter=min_diameter,
            strict=strict,
            figure_format=fmt,
            dpi=dpi,
            dicom=dicom,
        )
    for rec in result.records:
        sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()
    for line in result.warnings:
        echo(f"nodulekit: warning: {line}", err=True)
    t = result.timings
    say(
        f"scored {len(result.records)} nodule(s): load model {t['load_model_s']:.2f} s, read scan {t['read_s']:.2f} s, "
        f"inputs {t['inputs_s']:.2f} s, run model {t['model_s']:.2f} s"
    )
    if result.output is not None:
        say(f"wrote {result.output}")


@app.command("describe")
def describe_cmd(
    model: Path = typer.Argument(..., help="An ONNX file from `export-onnx`, a RUNDIR or a checkpoint.pt."),
    fold: int | None = typer.Option(None, "--fold", help="One fold of a RUNDIR (default: the ensemble of every fold)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole description as JSON."),
) -> None:
    """Print what a model needs as input and what it outputs: its model description.

    The input spec and the arithmetic of every step from CT to `x` (planes, window, z interpolation, HU rounding, scaling, crop, bilinear sampling), input and output names and meanings, where the map lies on the CT, threshold, label rule, training data (fingerprint, size, diameter/spacing/HU ranges), the training recipe (and whether the model applies its test-time augmentation), the run's cross-validated performance with intervals, licence, citation and data attribution, and for an ONNX file its model_version and reference vectors. The same record is stored in every exported ONNX file (docs/model-description.md).

        Example: nodulekit describe hesam.onnx
    """
    from nodulekit.engines import load_card
    from nodulekit.modelcard import render

    card = load_card(model, fold)
    echo(json.dumps(card, indent=2) if as_json else render(card))
