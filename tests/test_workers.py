"""The shared worker pool: same results inline and in workers, and workers die with their parent."""

from __future__ import annotations

import operator
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodulekit.workers import run_tasks


def test_inline_and_pooled_runs_give_the_same_results():
    tasks = list(range(7))
    inline = list(run_tasks(operator.mul, tasks, workers=1, args=(3,)))
    assert inline == [(t, 3 * t) for t in tasks]
    ordered = list(run_tasks(operator.mul, tasks, workers=2, args=(3,), ordered=True, chunksize=2))
    assert ordered == inline  # same order as the tasks
    unordered = list(run_tasks(operator.mul, tasks, workers=2, args=(3,)))
    assert sorted(unordered) == inline


def _state(pid: int) -> str | None:
    """The process state letter from /proc, or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_workers_stop_when_the_parent_is_killed():
    # The parent starts two workers busy for a minute, prints their pids, then is killed outright
    # (no Ctrl-C, no clean-up code runs). Without the parent-death signal they would sleep on.
    script = (
        "import os, signal, time\n"
        "from nodulekit.workers import worker_pool\n"
        "with worker_pool(2) as pool:\n"
        "    futures = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
        "    time.sleep(3)\n"
        "    print(' '.join(map(str, pool._processes)), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == -9, res.stderr
    pids = [int(p) for p in res.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_state(p) not in (None, "Z", "X") for p in pids):
        time.sleep(0.1)
    assert all(_state(p) in (None, "Z", "X") for p in pids), [(p, _state(p)) for p in pids]
