"""The `nodulekit` command line: a thin typer layer over the library.

Each stage registers its subcommands from its own module here (data, train, maps,
export, phantom); the commands only parse arguments and call library functions,
importing heavy dependencies (torch, pylidc) lazily so `--help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from nodulekit.errors import NodulekitError

app = typer.Typer(
    name="nodulekit",
    help=(
        "Interpretable lung-nodule malignancy classification in low-dose CT "
        "(soft activation mapping, SAM/HESAM, on LIDC-IDRI). Each subcommand is one "
        "pipeline stage that reads and writes HDF5 artifacts."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration happens on import; keep this list in pipeline order.
from nodulekit.cli import build as _build  # noqa: E402,F401
from nodulekit.cli import data as _data  # noqa: E402,F401
from nodulekit.cli import export as _export  # noqa: E402,F401
from nodulekit.cli import maps as _maps  # noqa: E402,F401
from nodulekit.cli import phantom as _phantom  # noqa: E402,F401
from nodulekit.cli import status as _status  # noqa: E402,F401
from nodulekit.cli import train as _train  # noqa: E402,F401


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"nodulekit: error: {message}", err=True)
    raise SystemExit(code)


INTERRUPTED = "interrupted; finished work is kept and a re-run resumes"


def main() -> None:
    try:
        app()
    except NodulekitError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail(INTERRUPTED, 130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130; say what happened
            fail(INTERRUPTED, 130)
        raise
    except OSError as exc:  # disk full, permissions, unreadable files: one line, not a traceback
        fail(f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc), 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
