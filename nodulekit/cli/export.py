"""`nodulekit export-onnx` and `nodulekit infer`: ONNX export with the soft activation map, ORT inference."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from nodulekit.cli import app
from nodulekit.cli.common import PROGRESS, QUIET, echo, inputs, say, show_progress


@app.command("export-onnx")
def export_onnx_cmd(
    source: Path = typer.Argument(..., help="A RUNDIR (from `nodulekit train`) or a checkpoint.pt file."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx file (one self-contained file)."),
    fold: int | None = typer.Option(None, "--fold", help="Which fold's model of a RUNDIR [default: 0]."),
    ensemble: bool = typer.Option(
        False, "--ensemble", help="One graph averaging every fold model of the RUNDIR (probability and map)."
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset version (13..23)."),
    exporter: Literal["dynamo", "torchscript"] = typer.Option(
        "dynamo",
        "--exporter",
        help="torch.onnx exporter: 'dynamo' (torch.export based) or 'torchscript' (legacy, deprecated).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    model_version: int | None = typer.Option(
        None,
        "--model-version",
        min=0,
        help="ONNX model_version (an integer) [default: the run's creation time as YYYYMMDDHHMMSS, UTC].",
    ),
    quiet: bool = QUIET,
) -> None:
    """Export a trained CAM/SAM/HESAM model to ONNX with its map computed inside the graph.

    Input `x` [batch, C, 32, 32] (dynamic batch); outputs `prob` [batch, 2] (softmax), `map` [batch, 2, h, w] (the model's own soft activation map, raw) and `map_up` [batch, 2, 32, 32] (bilinear). Architecture, channels, the input spec, label rule, data fingerprint, fold, map definition, licence and data attribution, the run's cross-validated performance and reference input/output vectors go into the model's metadata; the graph, input and outputs carry doc strings.

    The file is written only after ONNX Runtime (CPU) reproduces PyTorch on the run's data: max |dprob| <= 1e-4 and max |dmap| <= 1e-4 x map scale. Grad-CAM-only models cannot be exported (an inference graph has no gradients).

    With --ensemble the graph runs every fold model of the RUNDIR and outputs the mean probability and mean map, plus `member_prob` \\[batch, folds]: each fold model's malignant probability. An ensemble has seen every nodule of its dataset in training: it is for new data, not for evaluation.

    The metadata hold the model description (`nodulekit describe FILE` prints it): everything needed to build the input from a CT, and no local paths.

    Examples: nodulekit export-onnx runs/hesam-d11c --fold 0 -o hesam_fold0.onnx ; nodulekit export-onnx runs/hesam-d11c --ensemble -o hesam.onnx
    """
    import json

    from nodulekit.export import export_onnx, load_ensemble_source, load_model_source
    from nodulekit.outputs import check_output_path

    inputs(source)
    check_output_path(output, overwrite)  # before the models are loaded
    if ensemble and fold is not None:
        from nodulekit.errors import NodulekitError

        raise NodulekitError("--ensemble uses every fold; drop --fold")
    src = load_ensemble_source(source) if ensemble else load_model_source(source, fold)
    meta = export_onnx(src, output, opset=opset, exporter=exporter, overwrite=overwrite, model_version=model_version)
    check = json.loads(meta["verification"])
    worst_p = max(v["prob_max_abs_diff"] for k, v in check.items() if k.startswith("batch"))
    worst_m = max(v["map_max_abs_diff"] for k, v in check.items() if k.startswith("batch"))
    say(
        f"wrote {output} ({meta['arch']}, map {meta['map_kind']}, {meta['in_channels']} channels, "
        f"{'ensemble of ' + str(len(src.models)) + ' folds' if src.ensemble else 'fold ' + meta['fold']}); "
        f"ONNX Runtime vs PyTorch on {check['inputs']}: max |dprob| {worst_p:.2g}, max |dmap| {worst_m:.2g}",
        quiet,
    )


@app.command("infer")
def infer_cmd(
    model: Path = typer.Argument(..., help="An ONNX file written by `nodulekit export-onnx`."),
    dataset: Path = typer.Argument(
        ..., help="A `dataset` artifact (from `nodulekit build`) with the model's channels."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Output `maps` artifact (.h5), same layout as `nodulekit maps`."
    ),
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = typer.Option(
        "auto",
        "--provider",
        help="ONNX Runtime execution provider: auto = CUDA if available, else CPU.",
    ),
    batch: int = typer.Option(256, "--batch", help="Samples per ONNX Runtime call."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """Run an exported model with ONNX Runtime over a dataset; write probabilities and maps.

    Writes a `maps` artifact (same layout as `nodulekit maps`). Prints which provider actually ran: ONNX Runtime falls back to CPU silently, so this command reads `session.get_providers()` and says so (or fails, when a provider was asked for explicitly). On CUDA/TensorRT inputs and outputs use IO binding.

    Example: nodulekit infer hesam_fold0.onnx d11c.h5 -o hesam_onnx_maps.h5 --provider auto
    """
    from nodulekit.export import infer

    inputs(model, dataset)
    summary = infer(
        model,
        dataset,
        output,
        provider=provider,
        batch=batch,
        overwrite=overwrite,
        progress=show_progress(progress, quiet),
    )
    if summary["note"] and not quiet:
        echo(summary["note"], err=True)
    if summary["warning"]:
        echo(f"nodulekit: warning: {summary['warning']}", err=True)
    rate = summary["n"] / summary["seconds"] if summary["seconds"] > 0 else float("inf")
    say(
        f"wrote {output}: {summary['n']} nodules on {summary['provider']} "
        f"in {summary['seconds']:.2f} s ({rate:.0f} samples/s)",
        quiet,
    )
