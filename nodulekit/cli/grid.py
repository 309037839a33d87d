"""`nodulekit grid` (the paper's whole experiment grid, run by Snakemake) and `nodulekit grid-report`."""

from __future__ import annotations

from pathlib import Path

import typer

from nodulekit.cli import app
from nodulekit.cli.common import AS_JSON, QUIET, emit_report


@app.command(
    "grid",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def grid_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The grid config (YAML): datasets, architectures, ablations, reports."),
    cores: int | None = typer.Option(
        None, "--cores", "-c", min=1, help="Local cores for jobs (default: all; with --profile: the profile's)."
    ),
    profile: str | None = typer.Option(
        None, "--profile", help="Snakemake profile folder or name, e.g. examples/grid/slurm for a Slurm cluster."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List the jobs that would run; run nothing."),
    keep_going: bool = typer.Option(
        True, "--keep-going/--stop-on-failure", help="Run the jobs that do not depend on a failed one."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Less Snakemake output."),
) -> None:
    """Run the experiment grid of CONFIG: datasets, every training, Tables 2-5, maps and the final report.

    Every job is a nodulekit subcommand and every edge an artifact, run by Snakemake locally or on a cluster through a profile, without changing the workflow. Rerunning the command reruns failed or killed jobs (trainings resume from their checkpoints) and keeps finished artifacts. The config is checked before any job starts. Arguments after `--` go to Snakemake (e.g. `-- --forcerun evaluate`). See docs/grid.md.

    Example: nodulekit grid examples/grid/try.yaml --cores 2 (on Slurm: --profile examples/grid/slurm)
    """
    from nodulekit.grid import run_grid

    code = run_grid(
        config, cores=cores, profile=profile, dry_run=dry_run, keep_going=keep_going, quiet=quiet, extra=ctx.args
    )
    if code:
        raise typer.Exit(1)


@app.command("grid-report")
def grid_report_command(
    config: Path = typer.Argument(..., help="The grid config whose reports to collect."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Report (.md); the JSON record goes beside it (default: print the report only).",
    ),
    as_json: bool = AS_JSON,
    quiet: bool = QUIET,
) -> None:
    """Collect Tables 2-5 (paper layout, with confidence intervals and tests) and the map scores of a finished grid.

    Reads the reports the grid's `evaluate`, `wilcoxon` and `scores` jobs wrote. With several seeds it adds Table 5 across seeds, computed from the runs' test predictions: each method's seeds as one arm, an AUC interval over patients and seeds, so the spread between retrainings enters the comparison. Without -o (or with -o -) the report is printed; --json prints its JSON record instead. `nodulekit grid` runs this as its last job.

    Example: nodulekit grid-report examples/grid/paper.yaml -o grid/report.md
    """
    from nodulekit.cli.common import inputs
    from nodulekit.grid import load_grid
    from nodulekit.grid_report import grid_report, report_json, write_grid_report

    inputs(config)
    plan = load_grid(config)
    report = grid_report(plan)
    emit_report(
        output,
        markdown=report[0],
        json_text=report_json(report[1]),
        as_json=as_json,
        write_files=lambda out: list(write_grid_report(plan, out, report).values()),
        quiet=quiet,
    )
