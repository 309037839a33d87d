"""Execution variants that crash in native code: probed in a child, excluded, recorded, avoided;
folds whose process died by a signal shown as crashed by `nodulekit status` (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset

from nodulekit import crashes, execution

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = ["--arch", "cam", "--model-opt", "base_width=4", "--lr", "0.01", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ds") / "d3c.h5", n=40, channels=3, folds=5)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private crash cache (never the user's), for this process and its children."""
    monkeypatch.setenv("NODULEKIT_CACHE_DIR", str(tmp_path / "cache"))
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cached(tmp_path) -> list[dict]:
    path = tmp_path / "cache" / crashes.CRASH_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def small_model_and_batch():
    from nodulekit.models import create_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(8, 3, 32, 32, generator=g), "y": torch.arange(8) % 2}
    return create_model("cam", 3, base_width=4), batch


def test_a_variant_whose_child_dies_is_excluded_recorded_and_avoided_next(tmp_path, env, monkeypatch):
    model, batch = small_model_and_batch()
    extra = (("last partial batch", {"x": batch["x"][:3], "y": batch["y"][:3]}, "step"),
             ("evaluation batch", {"x": batch["x"]}, "eval"))  # fmt: skip
    monkeypatch.setenv(execution.CRASH_HOOK_ENV, "bf16")  # the child aborts when it reaches bf16
    choice = execution.choose_execution(model, batch, "cpu", isolate=True, extra=extra)
    assert choice.variant != "bf16" and choice.how == "probed" and choice.probe["in_child_process"]
    assert choice.rejected["bf16"].startswith("crashed in a test process (SIGABRT) in its timed step (8 rows)")
    # the other three ran in a second child, on every shape, and agree with fp32
    assert set(choice.step_seconds) == {"fp32", "fp32+channels_last", "bf16+channels_last"}
    assert choice.probe["checked"] == ["last partial batch (3 rows)", "evaluation batch (8 rows)"]
    assert all(0 <= d <= execution.TOLERANCE for d in choice.rel_diff.values())
    (record,) = cached(tmp_path)
    assert record["variant"] == "bf16" and record["signal"] == "SIGABRT"
    assert record["machine"] == execution.machine_key("cpu") and record["workload"].startswith("UNetClassifier")
    # next time (no crash hook now), bf16 is avoided without being run; fp32 may never be avoided
    monkeypatch.delenv(execution.CRASH_HOOK_ENV)
    again = execution.choose_execution(model, batch, "cpu", isolate=True, extra=extra)
    assert again.variant != "bf16" and again.rejected["bf16"].startswith("crashed here before (SIGABRT")
    assert "bf16" not in again.step_seconds
    # another workload (batch shape) on this machine is probed again
    other = execution.choose_execution(model, dict(batch, x=batch["x"][:4], y=batch["y"][:4]), "cpu", isolate=True)
    assert "bf16" in other.step_seconds


def test_forced_variant_that_crashes_is_refused_in_one_line(ds, tmp_path, env, monkeypatch, nodulekit_cli):
    monkeypatch.setenv(execution.CRASH_HOOK_ENV, "bf16+channels_last")  # the probe's child aborts there
    out = tmp_path / "run"
    r = nodulekit_cli("train", ds, "-o", out, *TRAIN, "--epochs", "1", "--fold", "0", "--amp", "--channels-last")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(
        "nodulekit: error: --amp with --channels-last: bf16+channels_last crashed in a test process (SIGABRT)"
    )
    assert not out.exists()  # refused before anything is written
    assert [(c["variant"], c["signal"]) for c in cached(tmp_path)] == [("bf16+channels_last", "SIGABRT")]


def wait_for(predicate, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)
    return found


def watch_of(rundir: Path):
    return wait_for(
        lambda: sorted((rundir / crashes.WATCH_DIR).glob("*.log")) if (rundir / crashes.WATCH_DIR).is_dir() else []
    )


def status(nodulekit_cli, rundir, table: bool = False) -> tuple[int, list[dict], str]:
    """`nodulekit status` in this process (``nodulekit_cli``: conftest's fixture); the training is another."""
    js = nodulekit_cli("status", rundir, "--json")
    text = nodulekit_cli("status", rundir) if table else None
    assert text is None or text.returncode == js.returncode
    return js.returncode, json.loads(js.stdout), text.stdout if text else ""


def test_training_aborted_is_crashed_in_status(ds, tmp_path, env, nodulekit_cli):
    run = tmp_path / "run"
    args = ["train", ds, "-o", run, *TRAIN, "--epochs", "400", "--fold", "1", "--no-amp", "--no-channels-last"]
    job = subprocess.Popen([PY, "-m", "nodulekit", *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        watch_of(run)
        time.sleep(1.0)
        job.send_signal(signal.SIGABRT)  # what glibc does on "free(): invalid next size"
        assert job.wait(60) == -signal.SIGABRT
    finally:
        job.kill()
    rc, rows, table = status(nodulekit_cli, run, table=True)
    assert rc == 3 and [r["state"] for r in rows] == ["missing", "crashed", "missing", "missing", "missing"]
    assert rows[1]["note"].startswith(f"SIGABRT in native code with fp32 (pid {job.pid}")
    assert "crashed" in table.splitlines()[2] and "SIGABRT" in table.splitlines()[2]


def test_training_killed_by_a_signal_is_crashed_in_status_and_avoided_next(ds, tmp_path, env, nodulekit_cli):
    sig = signal.SIGSEGV
    run = tmp_path / "run"
    args = ["train", ds, "-o", run, *TRAIN, "--epochs", "400", "--batch-size", "2", "--fold", "0"]
    job = subprocess.Popen([PY, "-m", "nodulekit", *map(str, args), "--amp", "--no-channels-last"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        (watch,) = watch_of(run)
        header = json.loads(watch.read_text().splitlines()[0].removeprefix("nodulekit-watch "))
        assert header["pid"] == job.pid and header["variant"] == "bf16"
        time.sleep(1.0)  # in training now
        job.send_signal(sig)  # as a fault in a native kernel would
        assert job.wait(60) == -sig
    finally:
        job.kill()
    rc, rows, table = status(nodulekit_cli, run, table=True)
    assert rc == 3 and rows[0]["state"] == "crashed" and [r["state"] for r in rows[1:]] == ["missing"] * 4
    assert rows[0]["note"].startswith(f"{sig.name} in native code with bf16 (pid {job.pid}")
    assert table.splitlines()[1].split()[:3] == [str(run), "0", "crashed"] and table.splitlines()[-1] == (
        "1 crashed, 4 missing"
    )
    # the same variant forced again: refused in one line, naming the crash
    again = nodulekit_cli(*args, "--amp", "--no-channels-last")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert f"--amp: bf16 crashed here before ({sig.name} in training fold(s) 0 of {run}" in again.stderr
    assert [(c["variant"], c["signal"]) for c in cached(tmp_path)] == [("bf16", sig.name)]
    assert json.loads((run / crashes.CRASH_FILE).read_text())["token"] == header["token"]
    # the automatic choice (a workload large enough to be probed) avoids it; this job is killed -9
    job = subprocess.Popen([PY, "-m", "nodulekit", *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        new = wait_for(lambda: [w for w in watch_of(run) if w != watch and w.exists()])
        header = json.loads(new[0].read_text().splitlines()[0].removeprefix("nodulekit-watch "))
        assert not watch.exists()  # the crashed fold's old watch is cleared once the fold trains again
        assert header["variant"] != "bf16"
        rc, rows, _ = status(nodulekit_cli, run)
        assert rc == 3 and rows[0]["state"] == "running"
        job.kill()
        job.wait(60)
    finally:
        job.kill()
    rc, rows, _ = status(nodulekit_cli, run)
    assert rows[0]["state"] == "crashed" and rows[0]["note"].startswith("killed without a fault message (SIGKILL")


def test_status_of_a_path_that_does_not_exist_is_an_error_and_columns_fit(tmp_path, env, nodulekit_cli):
    r = nodulekit_cli("status", tmp_path / "typo")
    assert r.returncode == 2 and r.stderr.strip() == f"nodulekit: error: {tmp_path / 'typo'} does not exist"
    short, long = tmp_path / "r", tmp_path / ("a-rather-long-folder-name-" * 3)
    short.mkdir()
    long.mkdir()
    r = nodulekit_cli("status", short, long)
    lines = r.stdout.splitlines()
    assert r.returncode == 3 and lines[-1] == "2 missing"
    # every column starts at the same place on every line, however long the paths
    starts = [line.index(word) for line, word in zip(lines[:3], ["state", "missing", "missing"], strict=True)]
    assert len(set(starts)) == 1 and lines[2].startswith(str(long) + "  ") and lines[1].startswith(str(short) + " ")


WATCHED = """
import os, signal, sys, time
from nodulekit import crashes
with crashes.watch(sys.argv[1], [2, 3], {"variant": "bf16"}) as w:
    w.at([3])
    print("watching", flush=True)
    sys.stdin.readline()
    if sys.argv[2] == "abort":
        os.abort()
    if sys.argv[2] == "sleep":
        time.sleep(600)
"""


@pytest.mark.parametrize("how", ["abort", "sleep", "exit"])
def test_watch_records_a_fatal_signal_and_nothing_on_a_normal_end(tmp_path, env, how):
    """A watched process (no torch: fast): its fold, the signal, the variant; removed on a normal end."""
    (tmp_path / "run").mkdir()
    proc = subprocess.Popen([PY, "-c", WATCHED, str(tmp_path / "run"), how], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "watching"
    assert crashes.dead_watches(tmp_path / "run") == []  # alive: its lock is held
    proc.stdin.write("go\n")
    proc.stdin.flush()
    if how == "sleep":
        proc.kill()  # SIGKILL: nothing can be written
    rc = proc.wait(30)
    dead = crashes.crashed_folds(tmp_path / "run")
    if how == "exit":
        assert rc == 0 and dead == {} and not (tmp_path / "run" / crashes.WATCH_DIR).exists()
        return
    assert set(dead) == {3} and dead[3].header["pid"] == proc.pid and dead[3].header["variant"] == "bf16"
    if how == "abort":
        assert rc == -signal.SIGABRT and dead[3].signal == "SIGABRT"
        assert dead[3].describe().startswith(f"SIGABRT in native code with bf16 (pid {proc.pid} on ")
        assert "line 9" in dead[3].detail  # the frame it died in
    else:
        assert rc == -signal.SIGKILL and dead[3].signal is None
        assert dead[3].describe().startswith("killed without a fault message")
    # no machine/workload in this header: nothing to avoid, and nothing recorded
    assert [w.signal for w in crashes.collect(tmp_path / "run")] == (["SIGABRT"] if how == "abort" else [])
    assert cached(tmp_path) == []


def test_a_planted_watch_link_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / crashes.WATCH_DIR).symlink_to(elsewhere)
    with crashes.watch(tmp_path / "run", [0], {}) as w:
        w.at([0])
        assert list(elsewhere.iterdir()) == []
    assert crashes.dead_watches(tmp_path / "run") == []
