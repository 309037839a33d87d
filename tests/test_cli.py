"""Command-line conventions: -h/--help, --version, shell completion, one output option
(-o/--output) everywhere with the old spellings as deprecated aliases, flags shown as flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from nodulekit import __version__

# Every command that writes something, and so must take -o/--output.
WRITERS = (
    "cohort",
    "extract",
    "build",
    "train",
    "evaluate",
    "maps",
    "scores",
    "figures",
    "wilcoxon",
    "readers",
    "export-onnx",
    "infer",
    "predict",
    "phantom",
    "predict",
    "grid-report",
)


def commands() -> dict:
    import typer

    from nodulekit.cli import app

    return typer.main.get_command(app).commands


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"nodulekit {__version__}"


@pytest.mark.parametrize("command", [[], ["train"], ["maps"], ["status"]])
def test_short_help_is_the_long_help(command, run_cli):
    code_h, out_h, _ = run_cli(*command, "-h")
    code_help, out_help, _ = run_cli(*command, "--help")
    assert code_h == code_help == 0
    assert out_h == out_help and "Usage: nodulekit" in out_h


def test_every_writer_names_its_output_dash_o_output():
    cmds = commands()
    for name in WRITERS:
        opts = {o for p in cmds[name].params for o in getattr(p, "opts", [])}
        assert {"-o", "--output"} <= opts, f"{name}: {sorted(opts)}"
        assert not opts & {"--out", "--out-dir"}, f"{name} still has an old output spelling"


def test_flags_are_shown_as_flags_and_take_no_value(run_cli):
    for name in commands():
        code, out, _ = run_cli(name, "--help")
        assert code == 0 and "<bool>" not in out, name
    _, out, _ = run_cli("maps", "--help")
    assert "--overwrite " in out and "--overwrite <" not in out
    # a flag followed by a word: the word is an unexpected argument, a usage error (2)
    code, _, err = run_cli("cohort", "-o", "x.csv", "--overwrite", "true")
    assert code == 2 and "unexpected extra argument" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["maps", "R", "--out", "m.h5"], ["maps", "R", "--output", "m.h5"]),
        (["figures", "m.h5", "--out-dir=figs"], ["figures", "m.h5", "--output=figs"]),
        (["scores", "--", "--out"], ["scores", "--", "--out"]),  # after --, a file named --out
        (["maps", "R", "--output", "m.h5"], ["maps", "R", "--output", "m.h5"]),
    ],
)
def test_old_output_spellings_are_rewritten(argv, expected, capsys):
    from nodulekit.cli import modern_argv

    assert modern_argv(argv) == expected
    err = capsys.readouterr().err
    assert ("deprecated" in err) == (argv != expected)


def test_old_output_spelling_still_reaches_the_command(tmp_path, run_cli):
    # `--out` is accepted by the entry point and lands on -o/--output: the command's own
    # error (not "no such option") proves it parsed.
    code, _, err = run_cli("evaluate", tmp_path / "nope", "--out", tmp_path / "rep")
    assert code == 2
    assert "is not a nodulekit run folder" in err and "No such option" not in err


def _nodulekit(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nodulekit", *map(str, args)], capture_output=True, text=True, env=env, timeout=120, **kw
    )


def test_shell_completion_installs_and_completes(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), SHELL="/bin/bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    res = _nodulekit("--install-completion", "bash", env=env)
    assert res.returncode == 0, res.stderr
    assert "nodulekit" in (tmp_path / ".bashrc").read_text() or "nodulekit" in "".join(
        p.read_text() for p in (tmp_path / ".bash_completions").glob("*")
    )
    # what bash asks when the user types `nodulekit ma<TAB>` and `nodulekit maps x --ou<TAB>`
    for words, cword, expected in (
        ("nodulekit ma", "1", {"maps"}),
        ("nodulekit maps x --ou", "3", {"--output"}),
    ):
        env_c = dict(env, _NODULEKIT_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=cword)
        res = _nodulekit(env=env_c)
        assert set(res.stdout.split()) == expected, (words, res.stdout, res.stderr)


# Commands that do real work take --progress/--no-progress (when they draw bars) and -q/--quiet.
LONG = ("cohort", "extract", "build", "train", "maps", "infer", "phantom")
QUIET_ONLY = ("evaluate", "scores", "figures", "wilcoxon", "readers", "export-onnx")


def test_long_commands_take_progress_and_quiet():
    cmds = commands()
    for name in LONG + QUIET_ONLY:
        opts = {o for p in cmds[name].params for o in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))}
        assert {"-q", "--quiet"} <= opts, name
        if name in LONG:
            assert {"--progress", "--no-progress"} <= opts, name


@pytest.mark.parametrize(
    ("command", "option", "values"),
    [
        ("maps", "--device", "auto|cpu|cuda|cuda:N"),
        ("train", "--device", "auto|cpu|cuda|cuda:N"),
        ("train", "--select", "last|val"),
        ("build", "--split", "patient|nodule"),
        ("build", "--channels", "1|3|11|21"),
        ("infer", "--provider", "auto|cpu|cuda|tensorrt"),
        ("export-onnx", "--exporter", "dynamo|torchscript"),
        ("scores", "--map-class", "malignant|benign"),
    ],
)
def test_allowed_values_are_listed_in_help(command, option, values, run_cli):
    code, out, _ = run_cli(command, "-h")
    line = next(ln for ln in out.splitlines() if re.match(rf"\s+(-\w, )?{option} <", ln))
    assert code == 0 and f"<{values}>" in line, line


def test_maps_methods_are_the_registry_of_map_methods(run_cli):
    from nodulekit.map_methods import method_names

    _, out, _ = run_cli("maps", "-h")
    assert f"<{'|'.join(method_names())}>" in out  # the choices are generated, not written twice


@pytest.mark.parametrize(("device", "ok"), [("auto", True), ("cuda:1", True), ("gpu", False), ("cuda:x", False)])
def test_device_values_are_checked_by_the_parser(tmp_path, device, ok, run_cli):
    code, _, err = run_cli("maps", tmp_path / "nope", "-m", "cam", "-o", tmp_path / "m.h5", "--device", device)
    if ok:  # parsed: the command itself then refuses the missing RUNDIR
        assert code == 2 and "is not a nodulekit run folder" in err
    else:
        assert code == 2 and "Invalid value for '--device'" in err


def test_models_lists_the_registry(run_cli):
    import json

    from nodulekit.models import available_models

    code, out, _ = run_cli("models", "--channels", "3", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and sorted(rows) == available_models()
    assert rows["hesam"]["paper_name"] == "Ours-HESAM" and rows["resnet18"]["paper_name"] == "ResNet18"
    assert {"cam", "gradcam"} <= set(rows["cam"]["map_methods"]) and "sam" not in rows["cam"]["map_methods"]
    assert {"gradcam", "hesam", "he-gradcam"} <= set(rows["hesam"]["map_methods"])
    assert "cam" not in rows["hesam"]["map_methods"]
    assert rows["resnet18"]["map_methods"] == ["gradcam"]  # no map-defining head
    # the counts (taken from shapes alone) are those of a real model with its weights
    from nodulekit.models import create_model

    for name in ("hesam", "resnet18"):
        assert rows[name]["parameters"] == sum(p.numel() for p in create_model(name, 3).parameters()), name
    # parameter counts follow the input: the first convolution grows with the channels
    _, out11, _ = run_cli("models", "--channels", "11", "--json")
    rows11 = {r["name"]: r for r in json.loads(out11)}
    assert rows11["resnet18"]["parameters"] - rows["resnet18"]["parameters"] == 8 * 3 * 3 * 64  # 3x3 stem, 64 maps
    code, out, _ = run_cli("models")
    assert code == 0 and any(line.startswith("| hesam | Ours-HESAM | gradcam, hesam") for line in out.splitlines())
    _, help_text, _ = run_cli("train", "-h")
    assert "nodulekit models" in " ".join(help_text.split())
