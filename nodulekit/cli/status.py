"""`nodulekit status`: which folds of one or more RUNDIRs are finished, running, crashed, interrupted or missing."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from nodulekit.cli import app

NOT_FINISHED = 3  # exit status while any fold is not finished (2 stays "bad input")


@app.command("status")
def status_command(
    rundirs: list[Path] = typer.Argument(..., help="RUNDIRs written by `nodulekit train` (or empty folders)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list of fold records instead of the table."),
) -> None:
    """List each fold of each RUNDIR as finished / running / crashed / interrupted / missing, with epochs done.

    A fold whose training process died by a signal (SIGABRT, SIGSEGV in native code) is
    crashed, with the signal and the execution variant. Exit status: 0 when every fold is
    finished, 3 while any is not (so a script can resubmit), 2 for a path that does not
    exist or is not a RUNDIR. An empty folder is listed as missing.

    Example: nodulekit status runs/hesam-d11c runs/sam-d11c || echo "not finished yet"
    """
    from nodulekit.status import all_finished, run_status, status_table

    rows = [row for rundir in rundirs for row in run_status(rundir)]
    from nodulekit.cli.common import echo

    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        echo(status_table(rows))
    if not all_finished(rows):
        raise typer.Exit(NOT_FINISHED)
