"""The worker pool and process groups (nodulekit.workers), called in this process: what a worker
sets up, how tasks are batched and handed to the pool, how a pool and a process group are
stopped (real `sleep` processes in groups of their own)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager

import pytest

from nodulekit import workers

PR_GET_PDEATHSIG = 2


def _pdeathsig() -> int:
    value = ctypes.c_int(-1)
    ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(value))
    return value.value


@pytest.fixture
def restore_worker_state(monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(workers, "_PARENT", None)
    yield
    signal.signal(signal.SIGINT, handler)
    ctypes.CDLL(None, use_errno=True).prctl(workers._PR_SET_PDEATHSIG, 0)


class _Exit(Exception):
    pass


def _no_exit(monkeypatch):
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise _Exit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    return codes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_init_ignores_ctrl_c_and_dies_with_its_parent(restore_worker_state, monkeypatch):
    codes = _no_exit(monkeypatch)
    workers.worker_init(os.getppid())
    assert workers._PARENT == os.getppid()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert _pdeathsig() == signal.SIGTERM
    assert codes == []
    with pytest.raises(_Exit):
        workers.worker_init(os.getppid() + 1)  # its parent is already gone: replaced by another
    assert codes == [1]
    workers.worker_init()  # no parent given: nothing to compare
    assert workers._PARENT is None and codes == [1]


def test_guarded_runs_the_task_unless_the_parent_is_gone(restore_worker_state, monkeypatch):
    codes = _no_exit(monkeypatch)
    assert workers._guarded(lambda t, a, b: (t, a, b), 1, 2, 3) == (1, 2, 3)
    monkeypatch.setattr(workers, "_PARENT", os.getppid())
    assert workers._guarded(lambda t: t * 2, 4) == 8
    monkeypatch.setattr(workers, "_PARENT", os.getppid() + 1)
    ran = []
    with pytest.raises(_Exit):
        workers._guarded(ran.append, 4)
    assert ran == [] and codes == [1]


class _Proc:
    def __init__(self, alive):
        self.alive, self.calls = alive, []

    def is_alive(self):
        return self.alive

    def terminate(self):
        self.calls.append("terminate")

    def join(self, timeout=None):
        self.calls.append(("join", timeout))


class _Pool:
    def __init__(self, procs=()):
        self._processes = {i: p for i, p in enumerate(procs)}
        self.calls = []

    def shutdown(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def test_stop_pool_cancels_and_ends_live_workers():
    live, dead = _Proc(True), _Proc(False)
    pool = _Pool([live, dead])
    workers.stop_pool(pool)
    assert pool.calls == [((), {"wait": False, "cancel_futures": True})]
    assert live.calls == ["terminate", ("join", 5)] and dead.calls == [("join", 5)]
    workers.stop_pool(type("P", (), {"shutdown": lambda self, **k: None})())  # no _processes: nothing to end


def test_worker_pool_spawns_with_the_initializer_and_stops_on_error(monkeypatch):
    made = []

    class Executor(_Pool):
        def __init__(self, **kwargs):
            super().__init__()
            self.kwargs = kwargs
            made.append(self)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Executor)
    with workers.worker_pool(3) as pool:
        assert pool is made[0]
    kw = made[0].kwargs
    assert kw["max_workers"] == 3 and kw["mp_context"].get_start_method() == "spawn"
    assert kw["initializer"] is workers.worker_init and kw["initargs"] == (os.getpid(),)
    assert made[0].calls == [((), {})]  # shut down after its tasks
    with pytest.raises(KeyboardInterrupt), workers.worker_pool(2):
        raise KeyboardInterrupt
    assert made[1].calls == [((), {"wait": False, "cancel_futures": True})]


class _InlinePool:
    """A pool that runs everything at once in this process, recording how it was asked."""

    def __init__(self):
        self.maps, self.submits = [], 0

    def map(self, fn, *iterables, chunksize=1):
        assert fn is workers._guarded
        self.maps.append(([list(i) for i in iterables], chunksize))
        return [fn(*args) for args in zip(*iterables, strict=True)]

    def submit(self, fn, *args):
        assert fn is workers._guarded  # a worker checks its parent before each task
        self.submits += 1
        f = Future()
        f.set_result(fn(*args))
        return f


@pytest.fixture
def inline_pool(monkeypatch):
    pools = []

    @contextmanager
    def pool(n):
        pools.append((n, _InlinePool()))
        yield pools[-1][1]

    monkeypatch.setattr(workers, "worker_pool", pool)
    return pools


def _f(task, *args):
    return (task, *args)


def test_run_tasks_inline_for_one_worker_or_few_tasks(inline_pool):
    assert list(workers.run_tasks(_f, iter([1, 2]), 1, args=("a",))) == [(1, (1, "a")), (2, (2, "a"))]
    assert list(workers.run_tasks(_f, [1], 4)) == [(1, (1,))]  # fewer than min_tasks
    assert list(workers.run_tasks(_f, [1, 2], 4, min_tasks=3)) == [(1, (1,)), (2, (2,))]
    assert list(workers.run_tasks(_f, [], 0)) == []
    assert inline_pool == []


def test_run_tasks_ordered_submits_batches_of_four_per_worker_and_chunk(inline_pool):
    tasks = list(range(21))
    out = list(workers.run_tasks(_f, tasks, 2, args=("x", 7), ordered=True, chunksize=2))
    assert out == [(t, (t, "x", 7)) for t in tasks]
    ((n, pool),) = inline_pool
    assert n == 2
    batches = [m[0][1] for m in pool.maps]
    assert batches == [tasks[:16], tasks[16:]]  # 4 x 2 workers x chunk 2 = 16 at a time
    assert all(m[0][0] == [_f] * len(m[0][1]) for m in pool.maps)
    assert [m[0][2:] for m in pool.maps] == [[["x"] * 16, [7] * 16], [["x"] * 5, [7] * 5]]
    assert [m[1] for m in pool.maps] == [2, 2]
    assert list(workers.run_tasks(_f, [1, 2], 2, min_tasks=2, ordered=True)) == [(1, (1,)), (2, (2,))]
    assert [m[1] for m in inline_pool[1][1].maps] == [1]


def test_run_tasks_unordered_submits_every_task(inline_pool):
    out = dict(workers.run_tasks(_f, [3, 4, 5], 2, args=(1,)))
    assert out == {3: (3, 1), 4: (4, 1), 5: (5, 1)}
    assert inline_pool[0][1].submits == 3 and inline_pool[0][1].maps == []


# --------------------------------------------------------------------------- process groups


def _group(*commands):
    """A shell that starts ``commands`` in the background in a new session, then waits."""
    script = " ".join(f"{c} &" for c in commands) + " wait"
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    end = time.monotonic() + 10
    while len(workers.group_members(proc.pid)) < 1 + len(commands) and time.monotonic() < end:
        time.sleep(0.02)
    return proc


def test_group_members_lists_the_live_processes_of_a_group():
    proc = _group("sleep 30", "sleep 30")
    try:
        members = workers.group_members(proc.pid)
        assert proc.pid in members and len(members) == 3
        assert workers._group_alive(proc.pid) and workers._group_alive(proc.pid, but=proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert workers.group_members(proc.pid) == []
    assert not workers._group_alive(proc.pid)


def test_a_zombie_is_not_a_member():
    proc = subprocess.Popen(["true"], start_new_session=True)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        state = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.02)
    assert workers.group_members(proc.pid) == []
    proc.wait()


def test_stop_group_terminates_then_kills(tmp_path):
    proc = _group("sleep 30")
    members = workers.group_members(proc.pid)
    start = time.monotonic()
    assert sorted(workers.stop_group(proc.pid, grace=120)) == sorted(members)
    assert proc.wait(timeout=10) == -signal.SIGTERM and time.monotonic() - start < 60
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30 & wait"], start_new_session=True)
    time.sleep(0.3)
    start = time.monotonic()
    workers.stop_group(stubborn.pid, grace=0.5)
    assert stubborn.wait(timeout=10) == -signal.SIGKILL and time.monotonic() - start < 60
    assert workers.stop_group(stubborn.pid, grace=0.1) == []  # gone: nothing to signal, no error


def test_stop_group_kills_at_once_when_only_the_leader_is_left():
    # the job (sleep) stops on SIGTERM; the leader ignores it, as a scheduler waiting for its jobs would
    leader = subprocess.Popen(["sh", "-c", "sleep 30 & trap '' TERM; wait; exec sleep 30"], start_new_session=True)
    time.sleep(0.3)
    start = time.monotonic()
    workers.stop_group(leader.pid, grace=120, leader=leader.pid)
    assert leader.wait(timeout=10) == -signal.SIGKILL and time.monotonic() - start < 60


def test_signal_group_of_a_group_that_is_gone_is_no_error():
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    workers._signal_group(proc.pid, signal.SIGTERM)


def test_group_alive_without_proc_asks_the_kernel(monkeypatch):
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if str(p) == "/proc" else real_isdir(p))
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a group of one, reaped here
    try:
        assert workers._group_alive(proc.pid)
        assert workers._group_alive(proc.pid)  # asking sends no signal that stops it
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert not workers._group_alive(proc.pid)
    assert workers.stop_group(proc.pid, grace=0.1) == []  # no /proc: no member list


def test_group_members_reads_past_parentheses_in_a_command_name(tmp_path):
    odd = tmp_path / "a) b c"
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "30"], start_new_session=True)
    try:
        end = time.monotonic() + 10
        while "a) b c" not in open(f"/proc/{proc.pid}/stat").read() and time.monotonic() < end:
            time.sleep(0.02)
        assert workers.group_members(proc.pid) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_group_members_go_by_process_group_not_session():
    proc = subprocess.Popen(["sleep", "30"], process_group=0)  # its own group, in this session
    try:
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) != proc.pid
        assert workers.group_members(proc.pid) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_two_tasks_are_enough_for_the_pool(inline_pool):
    assert list(workers.run_tasks(_f, [1, 2], 2)) in ([(1, (1,)), (2, (2,))], [(2, (2,)), (1, (1,))])
    assert len(inline_pool) == 1 and inline_pool[0][1].submits == 2


def test_stop_group_waits_ten_seconds_by_default_before_sigkill(monkeypatch):
    import types

    clock = [0.0]
    sent = []
    monkeypatch.setattr(workers, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)))  # fmt: skip
    real_signal = workers._signal_group
    monkeypatch.setattr(workers, "_signal_group", lambda g, s: (sent.append((s, clock[0])), real_signal(g, s)))
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30 & wait"], start_new_session=True)
    time.sleep(0.3)
    workers.stop_group(stubborn.pid)
    assert stubborn.wait(timeout=10) == -signal.SIGKILL
    assert sent[0] == (signal.SIGTERM, 0.0)
    assert sent[1][0] == signal.SIGKILL and 10.0 <= sent[1][1] < 10.2


def test_stop_group_without_proc_lists_no_members_but_stops_the_group(monkeypatch):
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if str(p) == "/proc" else real_isdir(p))
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    reaper = threading.Thread(target=proc.wait)  # reap at once: an unreaped zombie still counts in its group
    reaper.start()
    started = time.monotonic()
    assert workers.stop_group(proc.pid, grace=30) == []
    reaper.join(timeout=10)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 20  # stopped once SIGTERM took, not at the end of the grace
