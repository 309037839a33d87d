"""Crash records and fold watches (nodulekit.crashes) key by key, in this process: where records
go, what a record line holds, which crashes a machine avoids and why (the text), how a watch
file is named, written, parsed and cleared. A dead watch is a file no process holds locked."""

from __future__ import annotations

import faulthandler
import fcntl
import json
import os
import re
import socket
from pathlib import Path

import pytest

from nodulekit import crashes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NODULEKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _watch_file(rundir: Path, name: str, header: dict, *body: str) -> Path:
    folder = rundir / crashes.WATCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(["nodulekit-watch " + json.dumps(header), *body]) + "\n")
    return path


# --------------------------------------------------------------------------- where and what


def test_cache_dir_prefers_nodulekit_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NODULEKIT_CACHE_DIR", str(tmp_path / "nk"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert crashes.cache_dir() == tmp_path / "nk"
    monkeypatch.setenv("NODULEKIT_CACHE_DIR", "")  # empty means unset
    assert crashes.cache_dir() == tmp_path / "xdg" / "nodulekit"
    monkeypatch.delenv("NODULEKIT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert crashes.cache_dir() == tmp_path / "home" / ".cache" / "nodulekit"


def test_now_is_utc_to_the_second():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", crashes.now())


def test_a_crash_record_is_one_sorted_json_line_in_the_cache_and_the_rundir(cache, tmp_path):
    old = os.umask(0o022)
    try:
        written = crashes.record_crash({"variant": "bf16", "machine": "m", "signal": "SIGABRT"}, tmp_path / "run")
    finally:
        os.umask(old)
    assert written == [cache / "execution-crashes.jsonl", tmp_path / "run" / "execution-crashes.jsonl"]
    for path in written:
        (line,) = path.read_text().splitlines()
        record = json.loads(line)
        assert list(record) == ["machine", "recorded", "signal", "variant"]  # sorted keys
        assert re.fullmatch(r"\d{4}-.*\+00:00", record["recorded"])
        assert line == json.dumps(record, sort_keys=True)
        assert path.stat().st_mode & 0o777 == 0o644
    # a second record is appended; a given time is kept; no RUNDIR: only the cache
    assert crashes.record_crash({"variant": "fp32", "recorded": "then"}) == [cache / crashes.CRASH_FILE]
    assert [r["variant"] for r in _lines(cache / crashes.CRASH_FILE)] == ["bf16", "fp32"]
    assert _lines(cache / crashes.CRASH_FILE)[1]["recorded"] == "then"
    assert len(_lines(tmp_path / "run" / crashes.CRASH_FILE)) == 1


def test_a_token_is_recorded_once_per_file(cache, tmp_path):
    entry = {"variant": "bf16", "token": "abc"}
    assert len(crashes.record_crash(entry, tmp_path)) == 2
    assert crashes.record_crash(entry, tmp_path) == []
    assert crashes.record_crash({"variant": "bf16", "token": "abd"}, tmp_path) == [
        cache / crashes.CRASH_FILE,
        tmp_path / crashes.CRASH_FILE,
    ]
    (tmp_path / crashes.CRASH_FILE).unlink()  # the RUNDIR lost its record: written there again only
    assert crashes.record_crash(entry, tmp_path) == [tmp_path / crashes.CRASH_FILE]
    # no token: every call is a new record
    crashes.record_crash({"variant": "x"})
    crashes.record_crash({"variant": "x"})
    assert len(_lines(cache / crashes.CRASH_FILE)) == 4


def test_an_unwritable_cache_keeps_the_rundirs_record(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NODULEKIT_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: cannot be made
    assert crashes.record_crash({"variant": "bf16"}, tmp_path / "run") == [tmp_path / "run" / crashes.CRASH_FILE]


def test_reading_skips_what_is_not_a_record(cache):
    cache.mkdir()
    (cache / crashes.CRASH_FILE).write_bytes(
        b'{"machine": "m", "workload": "w", "variant": "a"}\nnot json\n[1, 2]\n\xff\xfe\n'
        b'{"machine": "m", "workload": "w", "variant": "b", "signal": "SIGSEGV", "where": "fold 3", "recorded": "r"}\n'
    )
    avoided = crashes.crashed_variants("m", "w")
    assert list(avoided) == ["a", "b"]
    where = cache / crashes.CRASH_FILE
    assert (
        avoided["a"] == f"crashed here before (signal in ?, ?; recorded in {where}: delete that file to try it again)"
    )
    assert avoided["b"] == (
        f"crashed here before (SIGSEGV in fold 3, r; recorded in {where}: delete that file to try it again)"
    )


def test_only_this_machine_and_workload_count_and_the_first_record_explains(cache, tmp_path):
    crashes.record_crash({"machine": "m", "workload": "w", "variant": "bf16", "signal": "SIGABRT", "recorded": "1"})
    crashes.record_crash({"machine": "m2", "workload": "w", "variant": "fp32"})
    crashes.record_crash({"machine": "m", "workload": "w2", "variant": "fp32+channels_last"})
    crashes.record_crash({"machine": "m", "workload": "w", "variant": ""})
    crashes.record_crash({"machine": "m", "workload": "w", "variant": "bf16", "signal": "SIGBUS"}, tmp_path)
    crashes.record_crash({"machine": "m", "workload": "w", "variant": "amp", "signal": "SIGILL"}, tmp_path)
    assert list(crashes.crashed_variants("m", "w")) == ["bf16", "amp"]  # both in the cache too
    avoided = crashes.crashed_variants("m", "w", tmp_path)
    assert list(avoided) == ["bf16", "amp"]
    assert avoided["bf16"].startswith("crashed here before (SIGABRT in ?, 1; recorded in ")  # the cache's, first
    assert "SIGILL in ?, " in avoided["amp"] and str(tmp_path / crashes.CRASH_FILE) not in avoided["amp"]
    assert crashes.crashed_variants("m", "w", tmp_path / "elsewhere") == crashes.crashed_variants("m", "w")
    assert crashes.crashed_variants("m2", "w2") == {}


def test_a_record_file_that_is_a_link_is_not_read(cache, tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text(json.dumps({"machine": "m", "workload": "w", "variant": "bf16"}) + "\n")
    cache.mkdir()
    (cache / crashes.CRASH_FILE).symlink_to(real)
    assert crashes.crashed_variants("m", "w") == {}


# --------------------------------------------------------------------------- watch files


def test_parse_reads_header_folds_signal_and_the_current_frame(tmp_path):
    frame = '  File "/x/train.py", line 12 in step' + "y" * 400
    text = "\n".join([
        'nodulekit-watch {"pid": 5, "variant": "bf16"}',
        "training folds [3, 1]",
        "training folds [4, 2]",
        "Fatal Python error: Aborted",
        "",
        "Thread 0x2 (most recent call first):",
        '  File "other.py", line 1 in run',
        "Current thread 0x1 (most recent call first):",
        "",
        frame,
        '  File "/x/main.py", line 3 in <module>',
        "training folds [7]",
        "Fatal Python error: Segmentation fault",
    ])  # fmt: skip
    w = crashes._parse(tmp_path / "t.log", text)
    assert w.path == tmp_path / "t.log" and w.header == {"pid": 5, "variant": "bf16"}
    assert w.folds == [4, 2] and w.signal == "SIGABRT"  # the last folds line before the first fault
    assert w.detail == frame.strip()[:300] and len(w.detail) == 300


@pytest.mark.parametrize(
    ("message", "signal"),
    [("Segmentation fault", "SIGSEGV"), ("Aborted", "SIGABRT"), ("Bus error", "SIGBUS"),
     ("Illegal instruction", "SIGILL"), ("Floating-point exception", "SIGFPE"),
     ("Floating point exception", "SIGFPE"), ("Something new", "Something new")],
)  # fmt: skip
def test_each_fault_message_names_its_signal(tmp_path, message, signal):
    w = crashes._parse(tmp_path / "t.log", f"nodulekit-watch {{}}\nFatal Python error: {message}  \n")
    assert (w.signal, w.detail, w.folds) == (signal, "", [])


def test_parse_refuses_what_is_not_a_watch_and_keeps_folds_after_a_bad_line(tmp_path):
    p = tmp_path / "t.log"
    assert crashes._parse(p, "") is None
    assert crashes._parse(p, "nodulekit-watc {}\n") is None
    assert crashes._parse(p, "nodulekit-watch {oops\n") is None
    w = crashes._parse(p, "nodulekit-watch {}\ntraining folds [2]\ntraining folds [x\nCurrent thread 1\n")
    assert (w.folds, w.signal, w.detail) == ([2], None, "")
    w = crashes._parse(p, "nodulekit-watch {}\nFatal Python error: Aborted\nCurrent thread 0x1:\n")
    assert w.detail == ""  # no frame after it


def test_describe_names_what_the_header_lacks_with_a_question_mark(tmp_path):
    killed = crashes.DeadWatch(tmp_path / "w.log", {}, [1], None, "")
    assert (
        killed.describe() == "killed without a fault message (SIGKILL, out of memory or a stop; pid ? on ?, started ?)"
    )
    crashed = crashes.DeadWatch(tmp_path / "w.log", {}, [1], "SIGSEGV", "")
    assert crashed.describe() == f"SIGSEGV in native code with ? (pid ? on ?, started ?; see {tmp_path / 'w.log'})"


def test_dead_watches_are_the_unlocked_logs_oldest_first(tmp_path):
    run = tmp_path / "run"
    assert crashes.dead_watches(run) == []
    late = _watch_file(run, "a.log", {"started": "2026-02"}, "training folds [1]")
    early = _watch_file(run, "b.log", {"started": "2026-01"}, "training folds [1, 2]", "Fatal Python error: Aborted")
    _watch_file(run, "c.tmp", {"started": "2026-00"})  # not a watch yet (no .log name)
    (run / crashes.WATCH_DIR / "d.log").write_text("something else\n")
    live = _watch_file(run, "e.log", {"started": "2025"})
    fd = os.open(live, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its process lives
    try:
        dead = crashes.dead_watches(run)
    finally:
        os.close(fd)
    assert [w.path for w in dead] == [early, late]
    folds = crashes.crashed_folds(run)
    assert sorted(folds) == [1, 2] and folds[1].path == late and folds[2].path == early  # the latest wins
    assert [w.path for w in crashes.dead_watches(run)] == [live, early, late]  # its lock dropped: dead now


def test_a_watch_folder_that_is_a_link_or_a_file_has_no_watches(tmp_path):
    other = tmp_path / "other"
    _watch_file(other, "a.log", {}, "Fatal Python error: Aborted")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / crashes.WATCH_DIR).symlink_to(other / crashes.WATCH_DIR)
    assert crashes.dead_watches(tmp_path / "run") == []
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / crashes.WATCH_DIR).write_text("")
    assert crashes.dead_watches(tmp_path / "run2") == []


def test_collect_records_each_signal_death_once_with_where_and_detail(cache, tmp_path):
    run = tmp_path / "run"
    h = {"machine": "m", "workload": "w", "variant": "bf16", "token": "t1", "started": "1", "pid": 9}
    _watch_file(run, "a.log", h, "training folds [0, 2]", "Fatal Python error: Aborted", "Current thread 1:", "  at f")
    _watch_file(run, "b.log", {**h, "token": "t2", "started": "2"}, "training folds [1]")  # killed: no record
    _watch_file(run, "c.log", {"started": "3"}, "training folds [3]", "Fatal Python error: Bus error")  # no machine
    _watch_file(run, "d.log", {**h, "variant": "", "started": "4"}, "Fatal Python error: Aborted")  # no variant
    crashed = crashes.collect(run)
    assert [w.signal for w in crashed] == ["SIGABRT", "SIGBUS", "SIGABRT"]
    expected = {"machine": "m", "workload": "w", "variant": "bf16", "token": "t1", "signal": "SIGABRT",
                "where": f"training fold(s) 0, 2 of {run}", "detail": "at f"}  # fmt: skip
    for path in (cache / crashes.CRASH_FILE, run / crashes.CRASH_FILE):
        (record,) = _lines(path)
        assert {k: v for k, v in record.items() if k != "recorded"} == expected
    crashes.collect(run)  # again: the token is recorded already
    assert len(_lines(run / crashes.CRASH_FILE)) == 1


def test_clear_dead_removes_the_watches_of_these_folds_and_those_of_none(tmp_path):
    run = tmp_path / "run"
    a = _watch_file(run, "a.log", {}, "training folds [0, 2]")
    b = _watch_file(run, "b.log", {}, "training folds [1]")
    c = _watch_file(run, "c.log", {})  # died before it named its folds
    crashes.clear_dead(run, [2, 5])
    assert (a.exists(), b.exists(), c.exists()) == (False, True, False)
    crashes.clear_dead(run, iter([1]))
    assert not b.exists()


def test_a_live_watch_is_a_locked_named_file_gone_at_the_end(tmp_path):
    run = tmp_path / "run"
    was = faulthandler.is_enabled()
    with crashes.watch(run, [3, 1, 3], {"variant": "fp32", "machine": "m"}) as w:
        (path,) = (run / crashes.WATCH_DIR).iterdir()
        token = path.name.removesuffix(".log")
        assert re.fullmatch(r"[0-9a-f]{16}", token)
        header, folds = path.read_text().splitlines()
        info = json.loads(header.removeprefix("nodulekit-watch "))
        assert header == "nodulekit-watch " + json.dumps(info, sort_keys=True)
        assert {k: info[k] for k in ("variant", "machine", "token", "pid", "host")} == {
            "variant": "fp32", "machine": "m", "token": token, "pid": os.getpid(), "host": socket.gethostname()
        }  # fmt: skip
        assert re.fullmatch(r"\d{4}-.*\+00:00", info["started"])
        assert folds == "training folds [1, 3]"
        assert faulthandler.is_enabled()
        assert crashes.dead_watches(run) == []  # locked: alive
        assert crashes._dead(path) is None
        w.at([4, 0])
        assert path.read_text().splitlines()[-1] == "training folds [0, 4]"
    assert not (run / crashes.WATCH_DIR).exists()
    assert faulthandler.is_enabled() == was
    crashes.Watch(None).at([1])  # an unwatched run: nothing to write


def test_watch_keeps_a_folder_that_holds_other_watches_and_a_planted_link_is_not_followed(tmp_path):
    run = tmp_path / "run"
    other = _watch_file(run, "old.log", {}, "training folds [9]")
    with crashes.watch(run, [0], {}):
        assert len(list((run / crashes.WATCH_DIR).glob("*.log"))) == 2
    assert other.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / crashes.WATCH_DIR).symlink_to(elsewhere)
    with crashes.watch(tmp_path / "run2", [0], {}) as w:
        w.at([1])
    assert list(elsewhere.iterdir()) == []


def test_watch_with_clear_records_and_removes_old_deaths_of_its_folds_only(cache, tmp_path):
    run = tmp_path / "run"
    h = {"machine": "m", "workload": "w", "variant": "bf16", "token": "t", "started": "1"}
    mine = _watch_file(run, "a.log", h, "training folds [0]", "Fatal Python error: Aborted")
    theirs = _watch_file(run, "b.log", {"started": "2"}, "training folds [1]")
    with crashes.watch(run, [0], {}, clear=False):
        pass
    assert mine.exists()
    with crashes.watch(run, [0], {}, clear=True):
        assert not mine.exists() and theirs.exists()
    assert len(_lines(cache / crashes.CRASH_FILE)) == 1
    assert (run / crashes.WATCH_DIR).is_dir()  # still holds the other fold's watch


def test_an_unwritable_watch_folder_trains_unwatched(tmp_path):
    (tmp_path / "run").write_text("")  # RUNDIR is a file: .watch cannot be made under it
    with crashes.watch(tmp_path / "run", [0], {}) as w:
        w.at([0])
    assert crashes._open_watch(tmp_path / "run" / crashes.WATCH_DIR, {}) is None


# --------------------------------------------------------------------------- edges


def test_describe_names_pid_host_start_and_variant_from_the_header(tmp_path):
    h = {"pid": 12, "host": "n1", "started": "t9", "variant": "bf16+channels_last"}
    assert crashes.DeadWatch(tmp_path / "w.log", h, [0], None, "").describe() == (
        "killed without a fault message (SIGKILL, out of memory or a stop; pid 12 on n1, started t9)"
    )
    assert crashes.DeadWatch(tmp_path / "w.log", h, [0], "SIGILL", "").describe() == (
        f"SIGILL in native code with bf16+channels_last (pid 12 on n1, started t9; see {tmp_path / 'w.log'})"
    )


def test_a_watch_log_that_is_a_link_is_not_read(tmp_path):
    target = _watch_file(tmp_path / "elsewhere", "x.log", {}, "training folds [0]", "Fatal Python error: Aborted")
    (tmp_path / "run" / crashes.WATCH_DIR).mkdir(parents=True)
    (tmp_path / "run" / crashes.WATCH_DIR / "a.log").symlink_to(target)
    assert crashes.dead_watches(tmp_path / "run") == []


def test_a_watch_with_bytes_that_are_not_utf8_is_still_read(tmp_path):
    path = _watch_file(tmp_path / "run", "a.log", {"host": "n"}, "training folds [2]")
    with open(path, "ab") as f:
        f.write(b"\xff\xfe garbage\nFatal Python error: Aborted\n")
    (w,) = crashes.dead_watches(tmp_path / "run")
    assert (w.folds, w.signal, w.header) == ([2], "SIGABRT", {"host": "n"})


def test_a_watch_without_a_start_time_sorts_first(tmp_path):
    run = tmp_path / "run"
    b = _watch_file(run, "a.log", {"started": "2026-01-01"}, "training folds [1]")
    a = _watch_file(run, "b.log", {}, "training folds [1]")
    assert [w.path for w in crashes.dead_watches(run)] == [a, b]
    assert crashes.crashed_folds(run)[1].path == b


def test_the_frame_is_searched_from_the_fault_line_on(tmp_path):
    text = "nodulekit-watch {}\nCurrent thread 0x9:\nFatal Python error: Aborted\nCurrent thread 0x1:\n  at g\n"
    assert crashes._parse(tmp_path / "t.log", text).detail == "at g"


def test_a_new_watch_is_line_buffered_private_to_its_process_and_0644(tmp_path):
    old = os.umask(0o022)
    try:
        file, path = crashes._open_watch(tmp_path / crashes.WATCH_DIR, {"variant": "v"})
    finally:
        os.umask(old)
    try:
        assert path.stat().st_mode & 0o777 == 0o644
        assert path.read_text().startswith('nodulekit-watch {"host": ')  # on disk before any flush
        assert list(path.parent.glob(".*.tmp")) == []
    finally:
        file.close()


def test_a_link_planted_at_the_temporary_watch_name_is_not_written_through(tmp_path, monkeypatch):
    folder = tmp_path / crashes.WATCH_DIR
    folder.mkdir()
    target = tmp_path / "target"
    target.write_text("keep\n")
    monkeypatch.setattr(os, "urandom", lambda n: b"\x01" * n)
    (folder / f".{'01' * 8}.tmp").symlink_to(target)
    assert crashes._open_watch(folder, {}) is None
    assert target.read_text() == "keep\n"


def test_a_watch_whose_disk_is_full_keeps_training(tmp_path):
    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

    crashes.Watch(Full()).at([1])


def test_record_crash_makes_the_cache_folder_with_its_parents(tmp_path, monkeypatch):
    monkeypatch.setenv("NODULEKIT_CACHE_DIR", str(tmp_path / "a" / "b" / "cache"))
    assert crashes.record_crash({"variant": "v"}) == [tmp_path / "a" / "b" / "cache" / crashes.CRASH_FILE]


def test_a_record_only_in_the_rundir_is_avoided_too(cache, tmp_path):
    (tmp_path / crashes.CRASH_FILE).write_text(json.dumps({"machine": "m", "workload": "w", "variant": "v"}) + "\n")
    assert list(crashes.crashed_variants("m", "w", tmp_path)) == ["v"]
    assert crashes.crashed_variants("m", "w") == {}


def test_collect_needs_machine_workload_and_variant_all_three(cache, tmp_path):
    run = tmp_path / "run"
    fault = "Fatal Python error: Aborted"
    _watch_file(run, "a.log", {"workload": "w", "variant": "v", "token": "a"}, fault)
    _watch_file(run, "b.log", {"machine": "m", "token": "b"}, fault)
    _watch_file(run, "c.log", {"machine": "m", "variant": "v", "token": "c"}, fault)
    assert len(crashes.collect(run)) == 3
    assert not (run / crashes.CRASH_FILE).exists() and not (cache / crashes.CRASH_FILE).exists()


def test_clearing_a_watch_another_job_cleared_first_is_no_error(tmp_path, monkeypatch):
    gone = crashes.DeadWatch(tmp_path / "gone.log", {}, [0], None, "")
    monkeypatch.setattr(crashes, "dead_watches", lambda rundir: [gone])
    crashes.clear_dead(tmp_path, [0])


def test_records_and_watches_are_read_as_utf8_whatever_the_locale(tmp_path):
    """A process in the C locale (ASCII) reads the same records: names with accents stay intact."""
    import subprocess
    import sys

    run = tmp_path / "run"
    (run / crashes.WATCH_DIR).mkdir(parents=True)
    header = json.dumps({"host": "n\u0153ud"}, ensure_ascii=False)
    (run / crashes.WATCH_DIR / "a.log").write_text(f"nodulekit-watch {header}\nFatal Python error: Aborted\n", "utf-8")
    (tmp_path / "cache").mkdir()
    record = {"machine": "m\u00e9", "workload": "w", "variant": "bf16"}
    (tmp_path / "cache" / crashes.CRASH_FILE).write_text(json.dumps(record, ensure_ascii=False) + "\n", "utf-8")
    code = (
        "import json, sys; from nodulekit import crashes\n"
        "print(json.dumps([w.header for w in crashes.dead_watches(sys.argv[1])]))\n"
        "print(json.dumps(list(crashes.crashed_variants('m\\u00e9', 'w'))))"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "NODULEKIT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(run)], env=env, capture_output=True, text=True, check=True)
    headers, variants = map(json.loads, out.stdout.splitlines())
    assert headers == [{"host": "n\u0153ud"}] and variants == ["bf16"]
