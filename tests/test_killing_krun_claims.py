"""Fold claims (nodulekit.claims) in this process: the claim record key by key, when a holder is
alive, stale or unknown (this host, another host, another boot, the stale boundary), every
refusal and takeover line, and release only of one's own claim."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import types

import pytest

from nodulekit import claims
from nodulekit.claims import CLAIM_FILE, Claim, FoldClaimed
from nodulekit.errors import NodulekitError, WriteFailed

HOST = socket.gethostname()
NO_PID = 2**22 + 4321  # above the kernel's pid_max default: no process has it


def _here(pid: int = NO_PID, **kw) -> Claim:
    """A claim as a job on this machine (same boot, same PID namespace) would write it."""
    return Claim(HOST, pid, kw.pop("started", "t0"), boot_id=claims.boot_id(), pid_ns=claims.pid_namespace(), **kw)


def _write(fold_dir, record: dict, age_s: float = 0.0):
    fold_dir.mkdir(parents=True, exist_ok=True)
    path = fold_dir / CLAIM_FILE
    path.write_text(json.dumps(record))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _record(claim: Claim) -> dict:
    return {k: v for k, v in claim.__dict__.items() if k != "touched"}


def _clock(monkeypatch, now: float):
    monkeypatch.setattr(claims, "time", types.SimpleNamespace(time=lambda: now))


# --------------------------------------------------------------------------- the Claim


def test_checkable_needs_the_same_host_boot_and_pid_namespace():
    assert _here().checkable()
    assert not Claim("elsewhere", 1, "t", boot_id=claims.boot_id(), pid_ns=claims.pid_namespace()).checkable()
    assert not Claim(HOST, 1, "t", boot_id="other-boot", pid_ns=claims.pid_namespace()).checkable()
    assert not Claim(HOST, 1, "t", boot_id=claims.boot_id(), pid_ns="pid:[1]").checkable()


def test_alive_for_a_holder_checked_here():
    me = claims.this_process()
    assert me.alive() is True
    assert _here(os.getpid()).alive() is True  # no start time recorded: the PID alone counts
    assert _here(os.getpid(), pid_start=me.pid_start).alive() is True
    assert _here(os.getpid(), pid_start="1").alive() is False  # a recycled PID: another process
    assert _here(NO_PID).alive() is False
    assert _here(0).alive() is False  # unreadable claims have no PID: never "alive" (kill(0) would succeed)
    assert _here(-1).alive() is False


def test_alive_for_a_holder_elsewhere_is_unknown_until_it_is_silent_past_stale_s(monkeypatch):
    other = Claim("elsewhere", os.getpid(), "t", touched=1000.0)
    _clock(monkeypatch, 1000.0 + claims.STALE_S)
    assert other.alive() is None  # exactly STALE_S: not yet stale
    _clock(monkeypatch, 1000.0 + claims.STALE_S + 0.5)
    assert other.alive() is False
    assert Claim("elsewhere", 5, "t").alive() is None  # never touched (unknown): not stale


def test_silent_for_and_why_stale(monkeypatch):
    _clock(monkeypatch, 5000.0)
    assert Claim("h", 1, "t", touched=4000.0).silent_for() == 1000.0
    assert Claim("h", 1, "t", touched=6000.0).silent_for() == 0.0  # a clock ahead of ours
    assert Claim("h", 1, "t").silent_for() == 0.0
    assert Claim("elsewhere", 1, "t", touched=5000.0 - 659.0).why_stale() == "has not refreshed its claim for 11 min"
    assert Claim("elsewhere", 1, "t", touched=5000.0 - 3600.0).why_stale() == "has not refreshed its claim for 60 min"
    assert _here(touched=0.0).why_stale() == "is no longer running"


def test_describe_and_equality_ignore_the_touch_time():
    c = Claim("node3", 17, "2026-12-06T10:00:00+00:00", touched=1.0)
    assert c.describe() == "pid 17 on node3 since 2026-12-06T10:00:00+00:00"
    assert c == Claim("node3", 17, "2026-12-06T10:00:00+00:00", touched=2.0)


def test_process_start_is_field_22_of_proc_stat():
    fields = open(f"/proc/{os.getpid()}/stat").read().split(")")[-1].split()
    assert claims._process_start(os.getpid()) == fields[19]  # fields 3.. after the name: 22 is index 19
    assert claims._process_start(NO_PID) is None


def test_this_process_names_the_job():
    c = claims.this_process()
    assert (c.host, c.pid, c.boot_id, c.pid_ns) == (HOST, os.getpid(), claims.boot_id(), claims.pid_namespace())
    assert c.pid_start == claims._process_start(os.getpid()) and c.pid_start is not None
    assert re.fullmatch(r"[0-9a-f]{32}", c.token) and c.token != claims.this_process().token
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", c.started)
    assert c.touched is None


# --------------------------------------------------------------------------- reading and writing


def test_read_claim_reads_every_field_and_the_touch_time(tmp_path):
    path = _write(tmp_path, {"host": "h", "pid": "12", "started": 5, "pid_start": 99, "token": "tk",
                             "boot_id": "b", "pid_ns": "ns"}, age_s=100)  # fmt: skip
    c = claims.read_claim(tmp_path)
    assert c == Claim("h", 12, "5", pid_start="99", token="tk", boot_id="b", pid_ns="ns")
    assert c.touched == path.stat().st_mtime
    _write(tmp_path, {"host": "h", "pid": 12, "started": "s", "pid_start": None})
    c = claims.read_claim(tmp_path)
    assert (c.pid_start, c.token, c.boot_id, c.pid_ns) == (None, None, None, None)
    assert claims.read_claim(tmp_path / "empty") is None
    _write(tmp_path / "other", {"host": "h", "pid": 3, "started": "s"}).rename(tmp_path / "other" / "lock.json")
    assert claims.read_claim(tmp_path / "other", "lock.json").pid == 3


@pytest.mark.parametrize(
    "text",
    ["{not json", '["h", 1]', '{"pid": 1, "started": "s"}', '{"host": "h", "pid": "x", "started": "s"}',
     '{"host": "h", "pid": null, "started": "s"}', ""],
)  # fmt: skip
def test_a_damaged_claim_counts_as_nobodys(tmp_path, text):
    (tmp_path / CLAIM_FILE).write_text(text)
    c = claims.read_claim(tmp_path)
    assert (c.host, c.pid, c.started) == (HOST, -1, "unknown") and c.alive() is False


def test_an_unopenable_claim_counts_as_nobodys_and_a_link_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    c = claims.read_claim(tmp_path / "file")  # the fold folder is a file: ENOTDIR
    assert (c.host, c.pid, c.started) == (HOST, -1, "unknown")
    (tmp_path / "target.json").write_text(json.dumps(_record(claims.this_process())))
    (tmp_path / CLAIM_FILE).symlink_to(tmp_path / "target.json")
    with pytest.raises(NodulekitError) as err:
        claims.read_claim(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / CLAIM_FILE} is a symbolic link, not a nodulekit claim file: remove it (never followed)"
    )


def test_create_writes_the_record_once_and_leaves_no_temporary(tmp_path):
    mine = claims.this_process()
    old = os.umask(0o022)
    try:
        assert claims._create(tmp_path / CLAIM_FILE, mine) is True
    finally:
        os.umask(old)
    text = (tmp_path / CLAIM_FILE).read_text()
    assert text.endswith("}\n") and text.count("\n") == 1
    assert json.loads(text) == _record(mine) and "touched" not in json.loads(text)
    assert (tmp_path / CLAIM_FILE).stat().st_mode & 0o777 == 0o644
    assert claims._create(tmp_path / CLAIM_FILE, claims.this_process()) is False
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["token"] == mine.token
    assert [p.name for p in tmp_path.iterdir()] == [CLAIM_FILE]


def test_create_refuses_a_link_and_names_a_full_disk(tmp_path, monkeypatch):
    (tmp_path / CLAIM_FILE).symlink_to(tmp_path / "nowhere")
    with pytest.raises(NodulekitError) as err:
        claims._create(tmp_path / CLAIM_FILE, claims.this_process())
    assert str(err.value).startswith(f"{tmp_path / CLAIM_FILE} is a symbolic link, not a nodulekit claim file")
    assert not (tmp_path / "nowhere").exists()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(claims.os, "link", full)
    (tmp_path / "f").mkdir()
    with pytest.raises(WriteFailed) as err:
        claims._create(tmp_path / "f" / CLAIM_FILE, claims.this_process())
    assert str(err.value) == f"could not write {tmp_path / 'f' / CLAIM_FILE}: No space left on device"
    assert list((tmp_path / "f").iterdir()) == []

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(claims.os, "link", denied)
    with pytest.raises(PermissionError):  # not a write failure: raised as it is
        claims._create(tmp_path / "f" / CLAIM_FILE, claims.this_process())


# --------------------------------------------------------------------------- acquiring


def test_acquire_makes_the_folder_and_refuses_a_live_holder_in_one_line(tmp_path):
    fold = tmp_path / "run" / "fold2"
    mine = claims.acquire(fold)
    assert claims.read_claim(fold) == mine and mine.pid == os.getpid()
    with pytest.raises(FoldClaimed) as err:
        claims.acquire(fold)
    assert str(err.value) == f"{fold} is being trained by another job ({mine.describe()})"
    with pytest.raises(FoldClaimed) as err:
        claims.acquire(fold, doing="exported")
    assert str(err.value).startswith(f"{fold} is being exported by another job (pid {os.getpid()} on {HOST} since ")
    assert (fold / ".claim.lock").exists()  # takeovers are serialised on it


def test_a_fresh_claim_elsewhere_is_refused_with_the_file_to_delete(tmp_path):
    _write(tmp_path, {"host": "node9", "pid": 5, "started": "s"})
    with pytest.raises(FoldClaimed) as err:
        claims.acquire(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is being trained by another job (pid 5 on node9 since s); it is taken over once untouched "
        f"for 10 min, or delete {tmp_path / CLAIM_FILE} if that job is gone"
    )
    _write(tmp_path, {"host": "node9", "pid": 5, "started": "s"}).rename(tmp_path / "lock.json")
    with pytest.raises(FoldClaimed, match=f"or delete {tmp_path / 'lock.json'} if"):
        claims.acquire(tmp_path, name="lock.json")


def test_a_dead_holder_here_is_taken_over_and_said(tmp_path, capsys):
    dead = _here(started="t1")
    _write(tmp_path, _record(dead))
    mine = claims.acquire(tmp_path)
    assert claims.read_claim(tmp_path) == mine
    err = capsys.readouterr().err
    assert (
        err
        == f"nodulekit: taking over {tmp_path / CLAIM_FILE}: its job (pid {NO_PID} on {HOST} since t1) is no longer running\n"
    )


def test_a_silent_holder_elsewhere_is_taken_over_with_its_silence(tmp_path, capsys):
    _write(tmp_path, {"host": "node9", "pid": 5, "started": "s"}, age_s=claims.STALE_S + 125)
    claims.acquire(tmp_path, name=CLAIM_FILE)
    err = capsys.readouterr().err
    assert err == (
        f"nodulekit: taking over {tmp_path / CLAIM_FILE}: its job (pid 5 on node9 since s) "
        "has not refreshed its claim for 12 min\n"
    )


def test_a_damaged_claim_is_taken_over_and_a_new_fold_says_nothing(tmp_path, capsys):
    (tmp_path / CLAIM_FILE).write_text("{")
    claims.acquire(tmp_path)
    assert "taking over" in capsys.readouterr().err
    claims.acquire(tmp_path / "new")
    assert capsys.readouterr().err == ""


def test_a_claim_made_between_read_and_create_is_refused(tmp_path, monkeypatch):
    _write(tmp_path, _record(_here()))
    other = _record(_here(os.getpid(), started="late"))
    real_create = claims._create
    calls = []

    def create(path, claim):
        calls.append(path)
        if len(calls) == 2:  # another job wins the race right after the stale claim is removed
            path.write_text(json.dumps(other))
            return False
        return real_create(path, claim)

    monkeypatch.setattr(claims, "_create", create)
    with pytest.raises(FoldClaimed) as err:
        claims.acquire(tmp_path)
    assert str(err.value) == f"{tmp_path} is being trained by another job (pid {os.getpid()} on {HOST} since late)"


# --------------------------------------------------------------------------- releasing


def test_release_removes_only_ones_own_claim(tmp_path):
    mine = claims.acquire(tmp_path / "a")
    assert claims.is_mine(tmp_path / "a", mine)
    other = claims.this_process()
    assert not claims.is_mine(tmp_path / "a", other)
    claims.release(tmp_path / "a", other)
    assert (tmp_path / "a" / CLAIM_FILE).exists()
    claims.release(tmp_path / "a", mine)
    assert not (tmp_path / "a" / CLAIM_FILE).exists()
    claims.release(tmp_path / "a", mine)  # twice: harmless
    assert not claims.is_mine(tmp_path / "a", mine)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CLAIM_FILE).symlink_to(tmp_path / "x")
    assert not claims.is_mine(tmp_path / "b", mine)  # a link is nobody's claim, and no error here
    mine = claims.acquire(tmp_path / "c", name="lock.json")
    assert claims.is_mine(tmp_path / "c", mine, "lock.json") and not claims.is_mine(tmp_path / "c", mine)
    claims.release(tmp_path / "c", mine, "lock.json")
    assert not (tmp_path / "c" / "lock.json").exists()


def test_release_of_a_claim_someone_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    mine = claims.acquire(tmp_path)
    monkeypatch.setattr(claims, "is_mine", lambda *a: (tmp_path / CLAIM_FILE).unlink() or True)
    claims.release(tmp_path, mine)
    (tmp_path / CLAIM_FILE).mkdir()  # not a file: unlink fails with another error, raised
    with pytest.raises(OSError):
        claims.release(tmp_path, mine)


def test_release_dead_removes_dead_checkable_claims_only(tmp_path):
    folders = [tmp_path / n for n in ("dead", "live", "far", "none", "damaged", "mine")]
    _write(folders[0], _record(_here()))
    _write(folders[1], _record(_here(os.getpid())))
    _write(folders[2], {"host": "node9", "pid": NO_PID, "started": "s"}, age_s=10 * claims.STALE_S)
    folders[3].mkdir()
    _write(folders[4], {"pid": 1})
    claims.acquire(folders[5], name="lock.json")
    assert claims.release_dead(map(str, folders)) == [folders[0] / CLAIM_FILE]
    assert [(f / CLAIM_FILE).exists() for f in folders] == [False, True, True, False, True, False]
    _write(folders[5], _record(_here()), age_s=0).rename(folders[5] / "lock.json")
    assert claims.release_dead(folders, name="lock.json") == [folders[5] / "lock.json"]


def test_release_dead_skips_a_link(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / CLAIM_FILE).symlink_to(tmp_path / "target")
    assert claims.release_dead([tmp_path / "x"]) == []
    assert (tmp_path / "x" / CLAIM_FILE).is_symlink()


# --------------------------------------------------------------------------- holding


def test_claimed_holds_all_or_none_and_releases_on_exit(tmp_path):
    folds = [tmp_path / "fold0", tmp_path / "fold1"]
    with claims.claimed(folds) as held:
        assert list(held) == folds
        assert all(claims.read_claim(f) == held[f] for f in folds)
    assert not any((f / CLAIM_FILE).exists() for f in folds)
    _write(folds[1], {"host": "node9", "pid": 5, "started": "s"})
    with pytest.raises(FoldClaimed), claims.claimed(map(str, folds)):
        pass
    assert not (folds[0] / CLAIM_FILE).exists()  # none: the first claim was given back


def test_heartbeat_touches_own_claims_only(tmp_path, monkeypatch):
    mine = claims.acquire(tmp_path / "a")
    other = _write(tmp_path / "b", _record(_here(os.getpid())))
    lock = claims.acquire(tmp_path / "c", name="lock.json")
    old = time.time() - 1000
    for path in (tmp_path / "a" / CLAIM_FILE, other, tmp_path / "c" / "lock.json"):
        os.utime(path, (old, old))
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.01)
    with claims.heartbeat({tmp_path / "a": mine, tmp_path / "b": claims.this_process()}):
        end = time.monotonic() + 10
        while (tmp_path / "a" / CLAIM_FILE).stat().st_mtime < old + 500 and time.monotonic() < end:
            time.sleep(0.01)
    assert (tmp_path / "a" / CLAIM_FILE).stat().st_mtime > old + 500
    assert other.stat().st_mtime == pytest.approx(old)
    with claims.heartbeat({tmp_path / "c": lock}, name="lock.json"):
        end = time.monotonic() + 10
        while (tmp_path / "c" / "lock.json").stat().st_mtime < old + 500 and time.monotonic() < end:
            time.sleep(0.01)
    assert (tmp_path / "c" / "lock.json").stat().st_mtime > old + 500


def test_heartbeat_waits_heartbeat_s_and_stops_with_the_block(monkeypatch):
    import threading

    waits = []

    class Event(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(0.01)

    monkeypatch.setattr(claims, "threading", types.SimpleNamespace(Event=Event, Thread=threading.Thread))
    with claims.heartbeat({}):
        time.sleep(0.05)
    assert waits and set(waits) == {60.0}


def test_live_claim_and_refuse_if_claimed(tmp_path):
    run = tmp_path / "run"
    assert claims.live_claim(run / "fold0") is None
    _write(run / "fold0", _record(_here()))  # dead
    assert claims.live_claim(run / "fold0") is None
    claims.refuse_if_claimed(run)
    _write(run / "fold1", {"host": "node9", "pid": 5, "started": "s"})  # unknown: respected
    assert claims.live_claim(run / "fold1").host == "node9"
    with pytest.raises(FoldClaimed) as err:
        claims.refuse_if_claimed(run)
    assert str(err.value).startswith(f"{run / 'fold1'} is being trained by another job (pid 5 on node9 since s); ")
    (run / "fold1" / CLAIM_FILE).unlink()
    mine = claims.acquire(run / "fold1")
    assert claims.live_claim(run / "fold1") == mine
    with pytest.raises(FoldClaimed, match=r"fold1 is being trained by another job \(pid \d+ on .* since .*\)$"):
        claims.refuse_if_claimed(run)


# --------------------------------------------------------------------------- edges


def test_pid_1_exists_everywhere_and_is_alive():
    assert _here(1).alive() is True


def test_process_start_reads_past_a_parenthesis_in_the_command_name():
    start = claims._process_start(os.getpid())
    comm = open("/proc/self/comm").read().strip()
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("a) b ) c")
        assert open(f"/proc/{os.getpid()}/stat").read().count(")") == 3
        assert claims._process_start(os.getpid()) == start
    finally:
        with open("/proc/self/comm", "w") as f:
            f.write(comm)


def test_a_link_planted_at_the_temporary_claim_name_is_not_written_through(tmp_path, monkeypatch):
    target = tmp_path / "target"
    target.write_text("keep")
    mine = claims.this_process()
    monkeypatch.setattr(os, "urandom", lambda n: b"\x02" * n)
    (tmp_path / f".{CLAIM_FILE}.{mine.pid}.02020202").symlink_to(target)
    assert claims._create(tmp_path / CLAIM_FILE, mine) is False
    assert target.read_text() == "keep" and not (tmp_path / CLAIM_FILE).exists()


def test_a_full_disk_when_the_temporary_claim_is_made_names_the_claim(tmp_path, monkeypatch):
    real_open = os.open

    def full(path, *args, **kwargs):
        if f".{CLAIM_FILE}." in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(WriteFailed) as err:
        claims._create(tmp_path / CLAIM_FILE, claims.this_process())
    assert str(err.value) == f"could not write {tmp_path / CLAIM_FILE}: No space left on device"


def test_the_stale_time_in_the_refusal_follows_stale_s(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "STALE_S", 3600.0)
    _write(tmp_path, {"host": "node9", "pid": 5, "started": "s"})
    with pytest.raises(FoldClaimed, match="it is taken over once untouched for 60 min, or delete "):
        claims.acquire(tmp_path)


def test_a_dead_holder_of_another_claim_name_is_taken_over(tmp_path, capsys):
    _write(tmp_path, _record(_here())).rename(tmp_path / "lock.json")
    mine = claims.acquire(tmp_path, name="lock.json")
    assert claims.read_claim(tmp_path, "lock.json") == mine
    assert f"taking over {tmp_path / 'lock.json'}: its job (pid {NO_PID} " in capsys.readouterr().err


def test_a_stale_claim_its_job_removed_meanwhile_is_taken_over(tmp_path, monkeypatch):
    _write(tmp_path, _record(_here()))
    real_read = claims.read_claim

    def read_then_vanish(fold_dir, name=CLAIM_FILE):
        claim = real_read(fold_dir, name)
        (tmp_path / name).unlink()  # its job released it right after we read it
        return claim

    monkeypatch.setattr(claims, "read_claim", read_then_vanish)
    mine = claims.acquire(tmp_path)
    monkeypatch.setattr(claims, "read_claim", real_read)
    assert claims.read_claim(tmp_path) == mine


def test_losing_the_race_for_another_claim_name_names_the_winner_and_its_file(tmp_path, monkeypatch):
    _write(tmp_path, _record(_here())).rename(tmp_path / "lock.json")
    real_create = claims._create
    calls = []

    def create(path, claim):
        calls.append(path)
        if len(calls) == 2:  # a job elsewhere claims it right after the dead claim is removed
            path.write_text(json.dumps({"host": "node9", "pid": 5, "started": "s"}))
            return False
        return real_create(path, claim)

    monkeypatch.setattr(claims, "_create", create)
    with pytest.raises(FoldClaimed) as err:
        claims.acquire(tmp_path, name="lock.json", doing="written")
    assert str(err.value) == (
        f"{tmp_path} is being written by another job (pid 5 on node9 since s); it is taken over once untouched "
        f"for 10 min, or delete {tmp_path / 'lock.json'} if that job is gone"
    )


def test_a_claim_saved_with_a_byte_order_mark_is_read(tmp_path):
    record = {"host": "h", "pid": 3, "started": "s"}
    (tmp_path / CLAIM_FILE).write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode())
    assert claims.read_claim(tmp_path) == Claim("h", 3, "s")


def test_release_dead_skips_a_folder_whose_lock_cannot_be_opened(tmp_path):
    _write(tmp_path / "x", _record(_here()))
    (tmp_path / "x" / ".claim.lock").mkdir()  # not a file: opening it fails (EISDIR)
    assert claims.release_dead([tmp_path / "x"]) == []
    assert (tmp_path / "x" / CLAIM_FILE).exists()
