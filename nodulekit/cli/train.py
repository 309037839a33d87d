"""`nodulekit train` and `nodulekit evaluate`: honest k-fold cross-validation and its Table 2 report."""

from __future__ import annotations

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
from nodulekit.errors import NodulekitError
from nodulekit.train_config import TrainConfig

# Every default below is TrainConfig's (the one place they live); the help texts say the paper's value.
DEFAULT = TrainConfig()


def parse_model_options(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false), else strings."""
    options = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise NodulekitError(f"--model-opt expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        options[key.strip()] = value
    return options


def describe_execution(execution: dict) -> str:
    """One line: the variant used, how it was chosen, the probe's step times, and the variants that crashed."""
    times = ", ".join(f"{k} {v:.3g} s" for k, v in execution.get("step_seconds", {}).items())
    crashed = [k for k, why in execution.get("rejected", {}).items() if str(why).startswith("crashed")]
    return (
        f"execution: {execution['variant']} on {execution['device']} ({execution['how']}: {execution['reason']})"
        + (f"; step times {times}" if times else "")
        + (f"; excluded as crashing here: {', '.join(crashed)}" if crashed else "")
    )


# Long only by its typer option declarations: the body parses and calls the library.
@app.command("train")
def train_command(
    dataset: Path = typer.Argument(..., help="The `dataset` HDF5 artifact written by `nodulekit build`."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="RUNDIR to create, or to resume/extend when it holds the same run."
    ),
    arch: str = typer.Option(
        DEFAULT.arch,
        "--arch",
        help="Architecture from the model registry (e.g. hesam, sam, cam, baseline); `nodulekit models` lists "
        "them all with their paper names, map methods and sizes.",
    ),
    model_opt: list[str] | None = typer.Option(
        None, "--model-opt", help="Model option key=value (repeatable), e.g. --model-opt base_width=32."
    ),
    folds: int | None = typer.Option(
        None, "--folds", help="Expected number of folds; must match the dataset's split (default: the dataset's)."
    ),
    fold: list[int] | None = typer.Option(
        None, "--fold", help="Train only this test fold (repeatable); several jobs may share one RUNDIR."
    ),
    epochs: int = typer.Option(
        DEFAULT.epochs, "--epochs", help="Epochs per fold (90 = three learning-rate steps of 30)."
    ),
    batch_size: int = typer.Option(DEFAULT.batch_size, "--batch-size", help="Mini-batch size (paper: 32)."),
    last_batch: Literal["keep", "drop"] = typer.Option(
        DEFAULT.last_batch,
        "--last-batch",
        help="The last partial batch of an epoch: keep (train on it; the default, every published result) or drop "
        "(every step has --batch-size rows: static shapes, needed by --cuda-graphs).",
    ),
    lr: float = typer.Option(DEFAULT.lr, "--lr", help="Initial SGD learning rate (paper: 5e-4)."),
    momentum: float = typer.Option(DEFAULT.momentum, "--momentum", help="SGD momentum (not stated in the paper; 0.9)."),
    weight_decay: float = typer.Option(DEFAULT.weight_decay, "--weight-decay", help="SGD weight decay (paper: 1e-4)."),
    lr_step: int = typer.Option(
        DEFAULT.lr_step, "--lr-step", help="Divide the learning rate by 10 every this many epochs (paper: 30)."
    ),
    select: Literal["last", "val"] = typer.Option(
        DEFAULT.select,
        "--select",
        help="Which epoch's model to report: 'last' or 'val' = best accuracy on a validation split "
        "carved from the training folds (by patient, stratified). The test fold is never used to choose.",
    ),
    val_fraction: float = typer.Option(
        DEFAULT.val_fraction, "--val-fraction", help="Share of training patients held out for --select val."
    ),
    seed: int = typer.Option(
        DEFAULT.seed, "--seed", help="Seed of model initialisation, batch order and validation split."
    ),
    device: str = device_option("Where to train: auto (CUDA when available), cpu, cuda or cuda:N."),
    amp: bool | None = typer.Option(
        None,
        "--amp/--no-amp",
        help="bf16 autocast on or off (default: auto = time a few steps of each variant before training and keep "
        "the fastest that agrees with fp32; see docs/training.md).",
    ),
    channels_last: bool | None = typer.Option(
        None,
        "--channels-last/--no-channels-last",
        help="channels_last memory format on or off (default: auto, chosen with --amp's probe).",
    ),
    compile: bool = typer.Option(
        DEFAULT.compile,
        "--compile/--no-compile",
        help="torch.compile the model (for CUDA; on CPU the compile step can take many minutes).",
    ),
    cuda_graphs: bool = typer.Option(
        DEFAULT.cuda_graphs,
        "--cuda-graphs",
        help="Capture the training step in CUDA graphs (torch.compile mode reduce-overhead); CUDA only, needs "
        "--last-batch drop; refused on a CPU.",
    ),
    concurrent_folds: bool = typer.Option(
        DEFAULT.concurrent_folds,
        "--concurrent-folds/--sequential-folds",
        help="Train all requested folds side by side in one batched computation (same numbers as one after "
        "another; for GPUs). Models with dropout (vgg16) train their folds one after another, said on stderr.",
    ),
    recipe_name: str = typer.Option(
        "paper",
        "--recipe",
        help="Training recipe: paper (the paper's, default) or robust (augmentation, readers' soft targets, "
        "weight decay 5e-4, dropout, EMA, test-time augmentation; docs/training.md#recipes).",
    ),
    recipe_opt: list[str] | None = typer.Option(
        None,
        "--recipe-opt",
        help="Change one ingredient of the recipe, key=value (repeatable; for ablations), e.g. --recipe-opt tta=false.",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Discard an existing run in RUNDIR made with other settings; with --fold, only those folds "
        "(refused while other folds hold results made with other settings).",
    ),
    progress: bool | None = PROGRESS,
    quiet: bool = QUIET,
) -> None:
    """Train ARCH with k-fold cross-validation on DATASET; every fold's model and test predictions go to RUNDIR.

    Paper defaults (Sec. 4.1): SGD (momentum 0.9), lr 5e-4 divided by 10 every 30 epochs,
    batch 32, weight decay 1e-4, cross-entropy (+ the model's auxiliary loss). A checkpoint
    is saved after every epoch: re-running the same command resumes, finished folds are skipped.

    Example: nodulekit train d11c.h5 --arch hesam --epochs 90 --device auto --seed 0 -o runs/hesam-d11c
    """
    from nodulekit.outputs import check_output_dir
    from nodulekit.recipes import resolve_recipe
    from nodulekit.training import train

    inputs(dataset)
    check_output_dir(output)  # a RUNDIR: a folder (never `-`), not the dataset, writable
    cfg = TrainConfig(
        recipe=resolve_recipe(recipe_name, parse_model_options(recipe_opt)),
        arch=arch,
        model_options=parse_model_options(model_opt),
        epochs=epochs,
        batch_size=batch_size,
        last_batch=last_batch,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_step=lr_step,
        seed=seed,
        select=select,
        val_fraction=val_fraction,
        device=device,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        cuda_graphs=cuda_graphs,
        concurrent_folds=concurrent_folds,
    )
    out = train(
        dataset,
        output,
        cfg,
        folds=fold,
        n_folds=folds,
        overwrite=overwrite,
        progress=show_progress(progress, quiet),
        on_execution=lambda choice: say(describe_execution(choice), quiet),
    )
    for s in out["folds"]:
        if s["status"] == "skipped":
            say(f"fold {s['fold']}: already finished ({s['epochs']} epochs), skipped", quiet)
        else:
            say(
                f"fold {s['fold']}: {s['status']}, {s['epochs']} epochs, reported epoch {s['selected_epoch']}, "
                f"test accuracy {100 * s['test_acc']:.2f}%",
                quiet,
            )
    say(f"run in {output}; report with: nodulekit evaluate {output}", quiet)


@app.command("evaluate")
def evaluate_command(
    rundirs: list[Path] = typer.Argument(
        ..., help="One or more RUNDIRs written by `nodulekit train` (all folds finished)."
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="REPORT_DIR for table2.md/.csv/.json, folds.csv, roc.png, curves.png, reliability.png "
        "(default: print the table only).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace report files that exist."),
    bootstrap: int = typer.Option(
        2000, "--bootstrap", min=1, help="Patient resamples for the 95 % confidence intervals of pooled numbers."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
    fmt: str = FIGURE_FORMAT,
    dpi: int = DPI,
    as_json: bool = AS_JSON,
    quiet: bool = QUIET,
) -> None:
    """Merge the folds of each RUNDIR into a Table 2 style report (accuracy mean ± std, sensitivity, specificity, AUC).

    Threshold 0.5 is fixed in advance. Also writes pooled nodule- and patient-level
    numbers with 95 % confidence intervals (bootstrap over patients), sensitivity at 90 %
    specificity (descriptive), calibration (Brier, ECE, reliability.png), the pooled ROC
    curves and Fig. 4 style training curves. Without -o (or with -o -) only the table is
    printed; --json prints the whole report as JSON.

    Example: nodulekit evaluate runs/hesam-d11c runs/sam-d11c runs/cam-d11c -o reports/table2
    """
    from nodulekit.evaluation import evaluate_runs, report_json
    from nodulekit.outputs import check_output_dir

    inputs(*rundirs)
    if to_file(output):
        check_output_dir(output)
    out = evaluate_runs(
        rundirs,
        output if to_file(output) else None,
        overwrite=overwrite,
        n_resamples=bootstrap,
        seed=seed,
        fmt=fmt,
        dpi=dpi,
    )
    if to_file(output) and not as_json:
        say(out["markdown"], quiet)
    emit_report(
        output,
        markdown=out["markdown"],
        json_text=report_json(out["report"]),
        as_json=as_json,
        write_files=lambda _: [Path(f) for f in out["files"]],
        quiet=quiet,
    )
