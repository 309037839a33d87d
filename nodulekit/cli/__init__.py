"""The `nodulekit` command line: a thin typer layer over the library.

Each stage registers its subcommands from its own module here (data, train, maps,
export, phantom); the commands only parse arguments and call library functions,
importing heavy dependencies (torch, pylidc) lazily so `--help` stays fast.

Conventions every command follows (README, "Subcommands"): `-o/--output` names the output,
`-h/--help`, flags are flags, allowed values are choices, and the exit status is
0 success, 1 run-time failure, 2 bad input or usage, 130 interrupted, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import sys

import typer

from nodulekit import __version__
from nodulekit.errors import NodulekitError

EXIT_OK = 0
EXIT_FAILURE = 1  # the inputs were fine but the run could not finish (disk full, a broken unit, ...)
EXIT_USAGE = 2  # bad input or usage: nothing was attempted, or the input itself is unusable
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), e.g. a scheduler's time limit


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nodulekit {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="nodulekit",
    help=(
        "Interpretable lung-nodule malignancy classification in low-dose CT "
        "(soft activation mapping, SAM/HESAM, on LIDC-IDRI). Each subcommand is one "
        "pipeline stage that reads and writes HDF5 artifacts.\n\n"
        "Exit status: 0 success, 1 run-time failure (e.g. disk full), 2 bad input or usage, "
        "130 interrupted, 143 terminated."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: flags are shown as flags (rich panels print `<bool>` after them).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the nodulekit version and exit."
    ),
) -> None:
    from nodulekit.outputs import clear_inputs

    ctx.call_on_close(clear_inputs)  # a command's declared inputs end with it (also under a test runner)


# Registration happens on import; keep this list in pipeline order.
from nodulekit.cli import build as _build  # noqa: E402,F401
from nodulekit.cli import data as _data  # noqa: E402,F401
from nodulekit.cli import export as _export  # noqa: E402,F401
from nodulekit.cli import grid as _grid  # noqa: E402,F401
from nodulekit.cli import maps as _maps  # noqa: E402,F401
from nodulekit.cli import models as _models  # noqa: E402,F401
from nodulekit.cli import phantom as _phantom  # noqa: E402,F401
from nodulekit.cli import predict as _predict  # noqa: E402,F401
from nodulekit.cli import status as _status  # noqa: E402,F401
from nodulekit.cli import train as _train  # noqa: E402,F401


def fail(message: str, code: int = EXIT_USAGE) -> None:
    from nodulekit.printing import printable

    if sys.stderr is not None:
        typer.echo(f"nodulekit: error: {printable(message)}", err=True)
    raise SystemExit(code)


INTERRUPTED = "interrupted; finished work is kept and a re-run resumes"
# Old spellings of -o/--output, still accepted (with a note) so existing scripts keep working.
DEPRECATED_OPTIONS = {"--out": "--output", "--out-dir": "--output"}


def modern_argv(argv: list[str]) -> list[str]:
    """``argv`` with deprecated option names replaced by the current ones (a note on stderr)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":  # everything after is positional
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if name in DEPRECATED_OPTIONS:
            new = DEPRECATED_OPTIONS[name]
            typer.echo(f"nodulekit: note: {name} is deprecated; use -o/{new}", err=True)
            arg = new + eq + value
        out.append(arg)
    return out


class Terminated(BaseException):
    """SIGTERM (e.g. a cluster job at its time limit): unwinds like Ctrl-C, so claims are released."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _safe_streams() -> None:
    """Standard streams that cannot turn into a traceback: characters the locale cannot encode
    (an ASCII locale) are written as escapes; a closed stdout or stderr (``>&-``) becomes a
    sink, and data meant for stdout is then refused in one line (outputs.stdout_closed)."""
    import os

    from nodulekit import outputs

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
            outputs.mark_closed(name)
        elif hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _broken_pipe() -> None:
    """The reader of stdout went away (``| head``): stop quietly, as other tools do."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    except (OSError, ValueError, AttributeError):
        pass
    raise SystemExit(EXIT_FAILURE)


def main() -> None:
    import signal

    from nodulekit.outputs import clear_inputs

    signal.signal(signal.SIGTERM, _terminate)
    _safe_streams()
    try:
        app(args=modern_argv(sys.argv[1:]), prog_name="nodulekit")
    except BrokenPipeError:
        _broken_pipe()
    except Terminated:
        fail("terminated; finished work is kept and a re-run resumes", EXIT_TERMINATED)
    except NodulekitError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail(INTERRUPTED, EXIT_INTERRUPTED)
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a silent exit 130; say what happened
            fail(INTERRUPTED, EXIT_INTERRUPTED)
        raise
    except OSError as exc:  # disk full, permissions, unreadable files: one line, not a traceback
        fail(f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc), EXIT_FAILURE)
    finally:
        clear_inputs()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
