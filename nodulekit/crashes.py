"""Crashes in native code: which execution variant crashed where, and which folds died by a signal.

A fault in a native kernel (a oneDNN convolution writing past its buffer, say) kills the
process by a signal (SIGABRT from ``free(): invalid next size``, SIGSEGV) before any Python
code can react. Two records make such a death visible and avoidable:

- **Crash records** (``execution-crashes.jsonl``, one JSON line per crash, appended): the
  machine (CPU model, torch version and CPU capability, GPU), the workload (model class,
  size, input shape, batch), the variant (``bf16+channels_last``...), the signal and where
  it happened. Written to the user's cache (``$NODULEKIT_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/nodulekit``, else ``~/.cache/nodulekit``), so that every later automatic
  choice on this machine avoids the variant, and to the RUNDIR it happened in.
- **Fold watches** (``RUNDIR/.watch/<token>.log``): a training process writes a header line
  (its folds, variant, machine, workload) and points :mod:`faulthandler` at the file, which
  then appends ``Fatal Python error: Aborted`` (or ``Segmentation fault``, ...) when the
  process dies by SIGABRT, SIGSEGV, SIGBUS, SIGILL or SIGFPE. The process holds an exclusive
  ``flock`` on the file while it lives (the kernel drops it at death, whatever kills it) and
  removes the file when it ends normally. A watch whose lock can be taken belongs to a dead
  process: with a fault message its fold **crashed** by that signal; without one, the process
  was killed by a signal that cannot be caught (SIGKILL: out of memory, a scheduler) or its
  machine stopped.
"""

from __future__ import annotations

import errno
import faulthandler
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CRASH_FILE = "execution-crashes.jsonl"
WATCH_DIR = ".watch"
_HEADER = "nodulekit-watch "
_FOLDS = "training folds "
# what faulthandler writes after "Fatal Python error: " for each signal it catches
_FAULTS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Illegal instruction": "SIGILL",
    "Floating-point exception": "SIGFPE",
    "Floating point exception": "SIGFPE",
}


def cache_dir() -> Path:
    """Where this user's crash records live (see the module docstring)."""
    if os.environ.get("NODULEKIT_CACHE_DIR"):
        return Path(os.environ["NODULEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nodulekit"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- crash records


def record_crash(entry: dict[str, Any], rundir: str | os.PathLike | None = None) -> list[Path]:
    """Append ``entry`` (``machine``, ``workload``, ``variant``, ``signal``, ``where``...) to the
    user's crash records and RUNDIR's; returns the files written (a read-only cache is skipped)."""
    line = json.dumps(dict(entry, recorded=entry.get("recorded") or now()), sort_keys=True) + "\n"
    written = []
    for folder in [cache_dir()] + ([Path(rundir)] if rundir is not None else []):
        path = folder / CRASH_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if entry.get("token") and any(e.get("token") == entry["token"] for e in _read(path)):
                continue  # this crash is recorded already
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a") as f:  # one short write in append mode: lines never interleave
                f.write(line)
            written.append(path)
        except OSError:
            continue  # a read-only home or RUNDIR: the other record still holds
    return written


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        entries = []
        for line in f:
            with suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
    return entries


def crashed_variants(machine: str, workload: str, rundir: str | os.PathLike | None = None) -> dict[str, str]:
    """Variant -> why it is avoided: every crash recorded for this machine and workload."""
    out: dict[str, str] = {}
    files = [cache_dir() / CRASH_FILE] + ([Path(rundir) / CRASH_FILE] if rundir is not None else [])
    for path in files:
        for e in _read(path):
            if e.get("machine") == machine and e.get("workload") == workload and e.get("variant"):
                out.setdefault(
                    str(e["variant"]),
                    f"crashed here before ({e.get('signal', 'signal')} in {e.get('where', '?')}, "
                    f"{e.get('recorded', '?')}; recorded in {path}: delete that file to try it again)",
                )
    return out


# --------------------------------------------------------------------------- fold watches


@dataclass(frozen=True)
class DeadWatch:
    """The watch file of a training process that is no longer running."""

    path: Path
    header: dict[str, Any]
    folds: list[int]  # the folds it was training when it died
    signal: str | None  # SIGABRT, SIGSEGV... (None: killed without a fault message)
    detail: str  # faulthandler's first lines

    def describe(self) -> str:
        h = self.header
        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
        if self.signal is None:
            return f"killed without a fault message (SIGKILL, out of memory or a stop; {who})"
        return f"{self.signal} in native code with {h.get('variant', '?')} ({who}; see {self.path})"


class Watch:
    """A live watch (see :func:`watch`): say which folds the process is training now."""

    def __init__(self, file):
        self._file = file

    def at(self, folds: Iterable[int]) -> None:
        if self._file is None:
            return
        with suppress(OSError):  # a full disk: the header still names the folds
            self._file.write(f"{_FOLDS}{json.dumps(sorted(int(k) for k in folds))}\n")
            self._file.flush()


@contextmanager
def watch(
    rundir: str | os.PathLike, folds: Iterable[int], header: dict[str, Any], clear: bool = False
) -> Iterator[Watch]:
    """Watch this process while it trains ``folds`` of RUNDIR (see the module docstring).

    ``clear``: first record the crashes of earlier processes and remove their watches of
    these folds (call it holding the folds' claims: they are trained again now)."""
    folds = sorted(set(folds))
    if clear:
        collect(rundir)
        clear_dead(rundir, folds)
    opened = _open_watch(Path(rundir) / WATCH_DIR, header)
    if opened is None:  # cannot write there (full disk, a planted link): train unwatched rather than fail
        yield Watch(None)
        return
    file, path = opened
    was_enabled = faulthandler.is_enabled()
    faulthandler.enable(file)
    w = Watch(file)
    w.at(folds)
    try:
        yield w
    finally:
        faulthandler.disable()
        if was_enabled:  # e.g. python -X faulthandler, pytest
            with suppress(Exception):
                faulthandler.enable(sys.stderr)
        path.unlink(missing_ok=True)
        file.close()
        with suppress(OSError):
            path.parent.rmdir()  # only when empty


def _open_watch(folder: Path, header: dict[str, Any]):
    """(file, path) of a new watch file, locked and named; None when it cannot be written."""
    token = os.urandom(8).hex()
    tmp, path = folder / f".{token}.tmp", folder / f"{token}.log"
    file = None
    try:
        if folder.is_symlink():
            return None
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        file = os.fdopen(fd, "w", buffering=1)
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it has its name: never seen unlocked while we live
        info = dict(header, token=token, pid=os.getpid(), host=socket.gethostname(), started=now())
        file.write(_HEADER + json.dumps(info, sort_keys=True) + "\n")
        os.rename(tmp, path)
        return file, path
    except OSError:
        if file is not None:
            with suppress(OSError):
                file.close()
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        return None


def _dead(path: Path) -> str | None:
    """The text of a watch file whose process is dead; None while it lives (or the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None  # its process holds the lock: alive
            raise
        with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as f:
            return f.read()
    finally:
        os.close(fd)


def _parse(path: Path, text: str) -> DeadWatch | None:
    lines = text.splitlines()
    if not lines or not lines[0].startswith(_HEADER):
        return None
    try:
        header = json.loads(lines[0][len(_HEADER) :])
    except ValueError:
        return None
    folds: list[int] = []
    signal, detail = None, ""
    for i, line in enumerate(lines[1:], 1):
        if line.startswith(_FOLDS) and signal is None:
            with suppress(ValueError):
                folds = [int(k) for k in json.loads(line[len(_FOLDS) :])]
        elif line.startswith("Fatal Python error: ") and signal is None:
            name = line.removeprefix("Fatal Python error: ").strip()
            signal = _FAULTS.get(name, name)
            # where the main thread was: the first frame after "Current thread ..."
            frames = [ln.strip() for ln in lines[i:] if ln.strip()]
            current = next((j for j, ln in enumerate(frames) if ln.startswith("Current thread")), None)
            detail = frames[current + 1][:300] if current is not None and current + 1 < len(frames) else ""
    return DeadWatch(path, header, folds, signal, detail)


def dead_watches(rundir: str | os.PathLike) -> list[DeadWatch]:
    """Every watch in RUNDIR whose process is dead, oldest first."""
    folder = Path(rundir) / WATCH_DIR
    if not folder.is_dir() or folder.is_symlink():
        return []
    out = []
    for path in sorted(folder.glob("*.log")):
        text = _dead(path)
        parsed = _parse(path, text) if text is not None else None
        if parsed is not None:
            out.append(parsed)
    return sorted(out, key=lambda w: str(w.header.get("started", "")))


def crashed_folds(rundir: str | os.PathLike) -> dict[int, DeadWatch]:
    """Fold -> the last dead watch that names it (crashed by a signal, or killed)."""
    out: dict[int, DeadWatch] = {}
    for w in dead_watches(rundir):
        for k in w.folds:
            out[k] = w
    return out


def collect(rundir: str | os.PathLike) -> list[DeadWatch]:
    """Turn RUNDIR's dead watches that died by a signal into crash records (once each)."""
    crashed = [w for w in dead_watches(rundir) if w.signal]
    for w in crashed:
        h = w.header
        if h.get("machine") and h.get("workload") and h.get("variant"):
            where = f"training fold(s) {', '.join(map(str, w.folds))} of {Path(rundir)}"
            entry = {k: h.get(k) for k in ("machine", "workload", "variant", "token")}
            record_crash(dict(entry, signal=w.signal, where=where, detail=w.detail), rundir)
    return crashed


def clear_dead(rundir: str | os.PathLike, folds: Iterable[int]) -> None:
    """Remove the dead watches of ``folds`` (their folds are being trained again; call :func:`collect` first)."""
    folds = set(folds)
    for w in dead_watches(rundir):
        if set(w.folds) & folds or not w.folds:
            w.path.unlink(missing_ok=True)
