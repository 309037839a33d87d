"""Options and output helpers every command shares (one definition each)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import typer

PROGRESS = typer.Option(
    None, "--progress/--no-progress", help="Progress bars on stderr (default: only when stderr is a terminal)."
)
QUIET = typer.Option(False, "-q", "--quiet", help="Print nothing but errors and warnings (implies --no-progress).")
AS_JSON = typer.Option(False, "--json", help="Print the report as JSON (machine-readable) instead of a table.")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
# Checked by nodulekit.figures (an unknown value is one error line, exit 2).
FIGURE_FORMAT = typer.Option("png", "--format", metavar="<png|pdf|svg>", help="Figure file format.")
DPI = typer.Option(150, "--dpi", help="Figure resolution in dots per inch (raster parts of PDF/SVG too).")


def _device(value: str) -> str:
    if value in DEVICES[:3] or re.fullmatch(r"cuda:\d+", value or ""):
        return value
    raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N (a GPU index, e.g. cuda:1)")


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in DEVICES[:3] if d.startswith(incomplete)]


def device_option(help: str) -> typer.models.OptionInfo:
    """``--device``: auto (CUDA when available), cpu, cuda or cuda:N."""
    return typer.Option(
        "auto",
        "--device",
        metavar="<auto|cpu|cuda|cuda:N>",
        parser=_device,
        autocompletion=_complete_device,
        help=help,
    )


def inputs(*paths: Path | None) -> None:
    """Declare what the running command reads: no output may be or hold one of them, nor lie in
    an input RUNDIR (checked by nodulekit.outputs before any work, with or without --overwrite)."""
    from nodulekit.outputs import declare_inputs

    declare_inputs(*paths)  # cleared when the command ends (the root callback in nodulekit.cli)


def echo(text: str, err: bool = False) -> None:
    """Print ``text`` with control characters escaped (strings from files reach the terminal here)."""
    from nodulekit.printing import printable

    typer.echo(printable(text), err=err)


def say(message: str, quiet: bool = False) -> None:
    """A status line: on stdout, or on stderr once data went to stdout (``-o -``); none with --quiet."""
    from nodulekit.outputs import stdout_taken

    if not quiet:
        echo(message, err=stdout_taken())


def show_progress(progress: bool | None, quiet: bool) -> bool:
    """Whether to draw progress bars: never with --quiet, always with --progress, and by
    default only when stderr is a terminal (a log file gets no bars)."""
    import sys

    if quiet or progress is False:
        return False
    if progress:
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def to_file(output: Path | None) -> bool:
    """Whether a report's ``-o`` names files to write (not absent, ``-`` or a stream)."""
    from nodulekit.outputs import output_target

    return output is not None and output_target(output) == "file"


def emit_report(
    output: Path | None,
    *,
    markdown: str,
    json_text: str,
    as_json: bool,
    write_files: Callable[[Path], list[Path]],
    quiet: bool = False,
) -> bool:
    """Deliver a report: without ``-o`` (or to ``-`` / a stream) the table, or with ``--json`` the
    JSON, is printed there; with a file or folder, ``write_files`` writes it (and ``--json`` still
    prints the JSON). Returns whether files were written."""
    from nodulekit.outputs import text_output
    from nodulekit.printing import printable

    if not to_file(output):
        with text_output(output or "-") as fh:
            fh.write(printable(json_text if as_json else markdown))
        return False
    written = write_files(output)
    if as_json:
        echo(json_text)
    say("wrote " + ", ".join(str(p) for p in written), quiet or as_json)
    return True
