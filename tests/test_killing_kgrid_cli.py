"""The command line's own helpers (nodulekit.cli): its error lines and exit codes, option parsing and
defaults, report delivery, and what `grid` / `grid-report` pass to the library; in-process."""

from __future__ import annotations

import io
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import typer

from nodulekit import cli
from nodulekit.cli import common
from nodulekit.errors import NodulekitError

# --------------------------------------------------------------------------- main: errors and exit codes


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (NodulekitError("bad thing\x1b[31m"), 2, "nodulekit: error: bad thing\\x1b[31m"),
        (KeyboardInterrupt(), 130, "nodulekit: error: interrupted; finished work is kept and a re-run resumes"),
        (cli.Terminated(), 143, "nodulekit: error: terminated; finished work is kept and a re-run resumes"),
        (SystemExit(130), 130, "nodulekit: error: interrupted; finished work is kept and a re-run resumes"),
        (
            OSError(28, "No space left on device", "/data/x.h5"),
            1,
            "nodulekit: error: No space left on device (/data/x.h5)",
        ),
        (OSError("plain failure"), 1, "nodulekit: error: plain failure"),
        (OSError(5, "", "/data/y"), 1, "nodulekit: error: [Errno 5] : '/data/y' (/data/y)"),
    ],
)
def test_main_turns_each_failure_into_one_line_and_its_exit_code(monkeypatch, capsys, raised, code, line):
    def app(args, prog_name):
        assert prog_name == "nodulekit" and args == ["cmd", "--output", "x"]  # old option names modernised
        raise raised

    cleared = []
    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr("nodulekit.outputs.clear_inputs", lambda: cleared.append(1))
    monkeypatch.setattr(sys, "argv", ["nodulekit", "cmd", "--out", "x"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert signal.getsignal(signal.SIGTERM) is cli._terminate
    finally:
        signal.signal(signal.SIGTERM, before)
    assert info.value.code == code and cleared == [1]
    err = capsys.readouterr().err.splitlines()
    assert err == ["nodulekit: note: --out is deprecated; use -o/--output", line]


def test_main_passes_other_exits_and_a_closed_pipe(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nodulekit"])
    for code in (0, 2, 1):
        monkeypatch.setattr(cli, "app", lambda args, prog_name, c=code: (_ for _ in ()).throw(SystemExit(c)))
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code == code
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "app", lambda args, prog_name: (_ for _ in ()).throw(BrokenPipeError()))
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1 and capsys.readouterr().err == ""


def test_nodulekit_error_exit_code_is_its_own(monkeypatch, capsys):
    class Failure(NodulekitError):
        exit_code = 1

    monkeypatch.setattr(sys, "argv", ["nodulekit"])
    monkeypatch.setattr(cli, "app", lambda args, prog_name: (_ for _ in ()).throw(Failure("disk")))
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1 and capsys.readouterr().err == "nodulekit: error: disk\n"


def test_fail_prints_one_escaped_line_and_exits(capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        cli.fail("a\x07b")
    assert info.value.code == 2 == cli.EXIT_USAGE and capsys.readouterr().err == "nodulekit: error: a\\x07b\n"
    with pytest.raises(SystemExit) as info:
        cli.fail("x", 143)
    assert info.value.code == 143
    capsys.readouterr()
    monkeypatch.setattr(sys, "stderr", None)
    with pytest.raises(SystemExit) as info:
        cli.fail("nowhere to say it", 1)
    assert info.value.code == 1
    assert (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED) == (0, 1, 130, 143)


def test_modern_argv_replaces_old_names_up_to_a_double_dash(capsys):
    argv = ["--out-dir=a", "--outx", "--out", "b", "--", "--out", "c"]
    assert cli.modern_argv(argv) == ["--output=a", "--outx", "--output", "b", "--", "--out", "c"]
    assert capsys.readouterr().err.splitlines() == [
        "nodulekit: note: --out-dir is deprecated; use -o/--output",
        "nodulekit: note: --out is deprecated; use -o/--output",
    ]
    assert cli.modern_argv(["--", "--out"]) == ["--", "--out"]


def test_version(capsys, run_cli):
    from nodulekit import __version__

    with pytest.raises(typer.Exit):
        cli._version(True)
    assert capsys.readouterr().out == f"nodulekit {__version__}\n"
    assert cli._version(False) is None and capsys.readouterr().out == ""
    assert run_cli("--version") == (0, f"nodulekit {__version__}\n", "")


def test_broken_pipe_exits_1(monkeypatch):
    with pytest.raises(SystemExit) as info:
        cli._broken_pipe()
    assert info.value.code == 1


def test_safe_streams_escape_and_replace_closed_streams(monkeypatch):
    from nodulekit import outputs

    closed = []
    monkeypatch.setattr(outputs, "mark_closed", closed.append)
    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    monkeypatch.setattr(sys, "stderr", None)
    cli._safe_streams()
    ascii_out.write("é")
    ascii_out.flush()
    assert raw.getvalue() == b"\\xe9"
    assert closed == ["stderr"] and sys.stderr.name == "/dev/null"
    sys.stderr.close()

    class Stubborn(io.StringIO):
        def reconfigure(self, **kw):
            raise ValueError("cannot")

    monkeypatch.setattr(sys, "stdout", Stubborn())
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no reconfigure: left as it is
    cli._safe_streams()
    assert closed == ["stderr"]


# --------------------------------------------------------------------------- shared options and output helpers


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_values(value):
    assert common._device(value) == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda:1:2", "", "CPU", "cuda:N"])
def test_device_refusals(value):
    with pytest.raises(typer.BadParameter) as info:
        common._device(value)
    assert str(info.value) == f"{value!r} is not one of auto, cpu, cuda, cuda:N (a GPU index, e.g. cuda:1)"


def test_device_option_and_completion():
    assert common._complete_device("c") == ["cpu", "cuda"] and common._complete_device("") == ["auto", "cpu", "cuda"]
    option = common.device_option("Where.")
    assert option.default == "auto" and option.param_decls == ("--device",) and option.help == "Where."
    assert option.metavar == "<auto|cpu|cuda|cuda:N>" and option.parser is common._device
    assert option.autocompletion is common._complete_device
    assert common.DEVICES == ("auto", "cpu", "cuda", "cuda:N")
    assert common.DPI.default == 150 and common.FIGURE_FORMAT.default == "png"
    assert common.QUIET.default is False and common.AS_JSON.default is False and common.PROGRESS.default is None


class _Tty(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        if self.tty is None:
            raise ValueError("closed")
        return self.tty


def test_show_progress(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty(True))
    assert common.show_progress(None, False) is True
    assert common.show_progress(None, True) is False  # --quiet wins
    assert common.show_progress(False, False) is False
    assert common.show_progress(True, True) is False
    monkeypatch.setattr(sys, "stderr", _Tty(False))
    assert common.show_progress(None, False) is False and common.show_progress(True, False) is True
    monkeypatch.setattr(sys, "stderr", _Tty(None))
    assert common.show_progress(None, False) is False
    monkeypatch.setattr(sys, "stderr", None)
    assert common.show_progress(None, False) is False


def test_echo_and_say(capsys, monkeypatch):
    common.echo("a\x07b")
    common.echo("to err", err=True)
    assert capsys.readouterr() == ("a\\x07b\n", "to err\n")
    common.say("status")
    common.say("hidden", quiet=True)
    assert capsys.readouterr() == ("status\n", "")
    monkeypatch.setattr("nodulekit.outputs.stdout_taken", lambda: True)
    common.say("moved")
    assert capsys.readouterr() == ("", "moved\n")


def test_emit_report(tmp_path, capsys, monkeypatch):
    written = []

    def write(out):
        written.append(out)
        return [out, out.with_suffix(".json")]

    assert common.to_file(None) is False and common.to_file(Path("-")) is False and common.to_file(tmp_path / "r.md")
    assert common.emit_report(None, markdown="# T\n", json_text="{}\n", as_json=False, write_files=write) is False
    assert common.emit_report(Path("-"), markdown="# T\n", json_text="{}\n", as_json=True, write_files=write) is False
    assert capsys.readouterr().out == "# T\n{}\n" and written == []
    monkeypatch.setattr("nodulekit.outputs._stdout_taken", False)  # as in a fresh process
    out = tmp_path / "r.md"
    assert common.emit_report(out, markdown="# T\n", json_text="{}", as_json=False, write_files=write) is True
    assert written == [out] and capsys.readouterr().out == f"wrote {out}, {tmp_path / 'r.json'}\n"
    assert common.emit_report(out, markdown="# T\n", json_text='{"a": 1}', as_json=True, write_files=write)
    assert capsys.readouterr().out == '{"a": 1}\n'  # the JSON, not the "wrote" line
    common.emit_report(out, markdown="", json_text="{}", as_json=False, write_files=write, quiet=True)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- train, data and maps helpers


def test_parse_model_options():
    from nodulekit.cli.train import parse_model_options

    got = parse_model_options(["a=1", "b=true", " c =x", "d=[1, 2]", "e=", "f=0.5", "g=a=b"])
    assert got == {"a": 1, "b": True, "c": "x", "d": [1, 2], "e": "", "f": 0.5, "g": "a=b"}
    assert parse_model_options(None) == {} and parse_model_options([]) == {}
    for bad in ("novalue", "=3", " =3"):
        with pytest.raises(NodulekitError) as info:
            parse_model_options([bad])
        assert str(info.value) == f"--model-opt expects key=value, got {bad!r}"


def test_describe_execution():
    from nodulekit.cli.train import describe_execution

    execution = {"variant": "bf16", "device": "cuda:0", "how": "probed", "reason": "fastest within tolerance",
                 "step_seconds": {"fp32": 0.0123456, "bf16": 0.00456}, "rejected": {"channels_last": "crashed: oom",
                 "compile": "slower", "graphs": "crashed"}}  # fmt: skip
    assert describe_execution(execution) == (
        "execution: bf16 on cuda:0 (probed: fastest within tolerance); step times fp32 0.0123 s, bf16 0.00456 s; "
        "excluded as crashing here: channels_last, graphs"
    )
    plain = {"variant": "fp32", "device": "cpu", "how": "forced", "reason": "--no-amp", "rejected": {"x": "slower"}}
    assert describe_execution(plain) == "execution: fp32 on cpu (forced: --no-amp)"


def test_data_helpers(tmp_path):
    from nodulekit.cli import data

    assert data._patients(None) is None
    assert data._patients(" LIDC-IDRI-0001, ,LIDC-IDRI-0002 ") == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    for empty in ("", " , "):
        with pytest.raises(NodulekitError) as info:
            data._patients(empty)
        assert str(info.value) == "--patients is empty; give comma-separated ids such as LIDC-IDRI-0001"
    rule = data._rule(4, 3.5, 2.5, True)
    assert (rule.min_readers, rule.malignant_above, rule.benign_below, rule.keep_ambiguous) == (4, 3.5, 2.5, True)
    assert data._scan_folder(None, tmp_path, tmp_path) is None
    for lidc, vois in ((tmp_path, None), (None, tmp_path)):
        with pytest.raises(NodulekitError) as info:
            data._scan_folder(tmp_path, lidc, vois)
        assert str(info.value) == "give exactly one source: --lidc-root DIR, --vois DIR or --scans DIR"


def test_maps_helpers(tmp_path):
    from nodulekit.cli import maps

    assert maps._ids(None) is None and maps._ids("") is None
    assert maps._ids(" a:1, ,b:2,") == ["a:1", "b:2"]
    assert maps._map_class("benign") == 0 and maps._map_class("malignant") == 1
    report = tmp_path / "r.md"
    maps._check_report_output(report, False)  # absent: fine
    maps._check_report_output(None, False)
    report.write_text("old")
    with pytest.raises(NodulekitError, match="exists"):
        maps._check_report_output(report, False)
    maps._check_report_output(report, True)
    maps._check_report_output(Path("-"), False)


# --------------------------------------------------------------------------- grid and grid-report


@pytest.fixture
def config(tmp_path):
    (tmp_path / "d.h5").write_bytes(b"")
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent("datasets: {d3c: {path: d.h5}}\ntable2: {architectures: [cam]}\n"))
    return path


def test_grid_command_passes_its_options_and_their_defaults(run_cli, monkeypatch, config):
    calls = []

    def run_grid(config, **kw):
        calls.append((config, kw))
        return kw["cores"] or 0

    monkeypatch.setattr("nodulekit.grid.run_grid", run_grid)
    assert run_cli("grid", config)[0] == 0
    assert calls[-1] == (config, {"cores": None, "profile": None, "dry_run": False, "keep_going": True,
                                  "quiet": False, "extra": []})  # fmt: skip
    code, _, _ = run_cli("grid", config, "-c", "3", "--profile", "p", "-n", "--stop-on-failure", "-q", "--",
                         "--forcerun", "evaluate")  # fmt: skip
    assert code == 1  # Snakemake's failure (here: 3) is exit 1
    assert calls[-1][1] == {"cores": 3, "profile": "p", "dry_run": True, "keep_going": False, "quiet": True,
                            "extra": ["--forcerun", "evaluate"]}  # fmt: skip
    code, _, err = run_cli("grid", config, "--cores", "0")
    assert code == 2 and "--cores" in err and len(calls) == 2


def test_grid_report_command_prints_or_writes(run_cli, monkeypatch, config):
    monkeypatch.setattr("nodulekit.grid_report.grid_report", lambda plan: ("# R\n", {"n": float("nan")}))
    assert run_cli("grid-report", config) == (0, "# R\n", "")
    assert run_cli("grid-report", config, "--json") == (0, '{\n  "n": NaN\n}\n', "")
    out = config.parent / "rep.md"
    code, stdout, _ = run_cli("grid-report", config, "-o", out)
    assert code == 0 and stdout == f"wrote {out}, {config.parent / 'rep.json'}\n"
    assert out.read_text() == "# R\n" and (config.parent / "rep.json").read_text() == '{\n  "n": NaN\n}\n'
    assert run_cli("grid-report", config, "-o", config.parent / "q.md", "-q") == (0, "", "")
    code, _, err = run_cli("grid-report", config, "-o", config.parent / "rep.txt")
    assert (
        code == 2
        and err
        == f"nodulekit: error: {config.parent / 'rep.txt'}: give the report a .md name (the JSON goes beside it)\n"
    )
    code, _, err = run_cli("grid-report", config.parent / "none.yaml")
    assert code == 2 and err == f"nodulekit: error: grid config {config.parent / 'none.yaml'} does not exist\n"
