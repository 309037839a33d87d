"""Fold claims: at most one job trains a fold of a RUNDIR at a time.

A job that trains fold k first creates ``fold<k>/claim.json`` atomically (the record is
written to a private temporary file, then hard-linked to the claim name, which fails
when the name exists: of two jobs racing, exactly one wins, and no reader ever sees a
half-written claim). The record names the job: a random ``token`` (what a job compares
to know a claim is still its own), the host name, the machine's boot id
(``/proc/sys/kernel/random/boot_id``), the PID namespace (``readlink /proc/self/ns/pid``),
the PID, the process's start tick (so a recycled PID is not taken for the old job) and
the start time. A second job finding a live claim refuses in one line.

Whether the holder still runs is checked from its PID only where that PID means the same
process: same host, same boot and same PID namespace. Everywhere else (another host, a
container with its own PID namespace, a claim written before these fields existed) only
the heartbeat counts: a job touches its claims every ``HEARTBEAT_S`` seconds, and a claim
untouched for ``STALE_S`` seconds (its node crashed, or its job was killed) is stale. A
fresh one is respected, and the refusal says which file to delete if that job is known
to be gone. A stale claim is taken over, and the takeover is said on stderr.

Claim and lock files are opened without following symbolic links: a link planted under
a claim or lock name is refused in one line, never followed to the file it points at.
Takeovers are serialised by ``flock`` on ``fold<k>/.claim.lock`` (the kernel drops
it when its holder dies), so two jobs finding the same stale claim do not both win.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nodulekit.errors import NodulekitError
from nodulekit.host import _NOFOLLOW, boot_id, linked_name, open_nofollow, pid_namespace  # noqa: F401 - re-exported

CLAIM_FILE = "claim.json"
_TAKEOVER_LOCK = ".claim.lock"
HEARTBEAT_S = 60.0  # a job touches its claims this often
# A claim whose holder cannot be checked from here and that nobody touched this long is
# stale: 10 heartbeats, far above the attribute caching of network file systems (NFS: up
# to 60 s) and usual clock skew.
STALE_S = 600.0


class FoldClaimed(NodulekitError):
    """Another live job is training this fold."""


@dataclass(frozen=True)
class Claim:
    host: str
    pid: int
    started: str
    pid_start: str | None = None  # the process's start time in clock ticks since boot (Linux)
    touched: float | None = field(default=None, compare=False)  # the claim file's mtime (not written in it)
    token: str | None = None  # random, unique to the claiming job: what makes a claim "mine"
    boot_id: str | None = None  # the holder's machine boot (a PID means nothing after a reboot)
    pid_ns: str | None = None  # the holder's PID namespace (a PID means nothing in another one)

    def checkable(self) -> bool:
        """Whether this claim's PID can be checked here: same host, same boot, same PID namespace."""
        return (self.host, self.boot_id, self.pid_ns) == (socket.gethostname(), boot_id(), pid_namespace())

    def alive(self) -> bool | None:
        """True/False when the holder can be checked here, or its claim is untouched for ``STALE_S``;
        None for a fresh claim whose holder cannot be checked from here (another host or namespace)."""
        if self.pid <= 0:  # an unreadable claim file
            return False
        if not self.checkable():
            return False if self.silent_for() > STALE_S else None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            pass
        start = _process_start(self.pid)
        return self.pid_start is None or start is None or start == self.pid_start

    def silent_for(self) -> float:
        """Seconds since the holder last touched the claim (0 when unknown)."""
        return max(0.0, time.time() - self.touched) if self.touched is not None else 0.0

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started}"

    def why_stale(self) -> str:
        if not self.checkable():
            return f"has not refreshed its claim for {self.silent_for() / 60:.0f} min"
        return "is no longer running"


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks); None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> Claim:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return Claim(
        socket.gethostname(), os.getpid(), now, _process_start(os.getpid()),
        token=secrets.token_hex(16), boot_id=boot_id(), pid_ns=pid_namespace(),
    )  # fmt: skip


def read_claim(fold_dir: str | os.PathLike, name: str = CLAIM_FILE) -> Claim | None:
    """The claim on a fold folder, or None. An unreadable claim file counts as stale; a link is refused."""
    path = Path(fold_dir) / name
    try:
        fd = open_nofollow(path, os.O_RDONLY, "claim")
    except FileNotFoundError:
        return None
    except OSError:
        return Claim(host=socket.gethostname(), pid=-1, started="unknown")
    try:
        with os.fdopen(fd, "rb") as fh:
            raw = json.loads(fh.read())
            touched = os.fstat(fh.fileno()).st_mtime
        opt = {k: (None if raw.get(k) is None else str(raw[k])) for k in ("pid_start", "token", "boot_id", "pid_ns")}
        return Claim(str(raw["host"]), int(raw["pid"]), str(raw["started"]), touched=touched, **opt)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # claims appear complete (see _create), so this one is damaged: nobody holds it
        return Claim(host=socket.gethostname(), pid=-1, started="unknown")


def _create(path: Path, claim: Claim) -> bool:
    """Create the claim file with ``claim``'s record; False when it exists already."""
    tmp = path.with_name(f".{path.name}.{claim.pid}.{os.urandom(4).hex()}")
    try:
        record = {k: v for k, v in asdict(claim).items() if k != "touched"}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        os.link(tmp, path)  # atomic, fails when the name exists (a link too: never followed), also on NFS
        return True
    except FileExistsError:
        if path.is_symlink():
            raise linked_name(path, "claim") from None
        return False
    except OSError as exc:  # a full disk: one line naming the claim, not errno alone
        from nodulekit.outputs import WRITE_ERRNOS, write_failed

        if exc.errno in WRITE_ERRNOS:
            raise write_failed(path, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _refusal(fold_dir: Path, holder: Claim, name: str = CLAIM_FILE, doing: str = "trained") -> FoldClaimed:
    where = (
        ""
        if holder.alive()
        else (
            f"; it is taken over once untouched for {STALE_S / 60:.0f} min, or delete {fold_dir / name} if that job is gone"
        )
    )
    return FoldClaimed(f"{fold_dir} is being {doing} by another job ({holder.describe()}){where}")


@contextmanager
def _takeover_lock(fold_dir: Path) -> Iterator[None]:
    fd = open_nofollow(fold_dir / _TAKEOVER_LOCK, os.O_RDWR | os.O_CREAT, "lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def acquire(fold_dir: str | os.PathLike, name: str = CLAIM_FILE, doing: str = "trained") -> Claim:
    """Claim a fold folder (or any folder, under ``name``) for this process; FoldClaimed when a live job holds it."""
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    path, mine = fold_dir / name, this_process()
    if _create(path, mine):
        return mine
    with _takeover_lock(fold_dir):
        holder = read_claim(fold_dir, name)
        if holder is not None and holder.alive() is not False:
            raise _refusal(fold_dir, holder, name, doing)
        if holder is not None:
            path.unlink(missing_ok=True)
        if not _create(path, mine):  # someone created a fresh claim between our read and now
            raise _refusal(fold_dir, read_claim(fold_dir, name) or mine, name, doing)
    if holder is not None:
        from nodulekit.printing import printable

        message = f"nodulekit: taking over {path}: its job ({holder.describe()}) {holder.why_stale()}"
        print(printable(message), file=sys.stderr)
    return mine


def is_mine(fold_dir: str | os.PathLike, claim: Claim, name: str = CLAIM_FILE) -> bool:
    """Whether the claim on ``fold_dir`` is still ``claim`` (same job token; never someone else's)."""
    with suppress(NodulekitError):
        return read_claim(fold_dir, name) == claim
    return False


def release(fold_dir: str | os.PathLike, claim: Claim, name: str = CLAIM_FILE) -> None:
    """Remove the claim if it is still ours (never someone else's)."""
    path = Path(fold_dir) / name
    if is_mine(fold_dir, claim, name):
        try:
            path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


def release_dead(folders: Iterable[str | os.PathLike], name: str = CLAIM_FILE) -> list[Path]:
    """Remove the claims in ``folders`` whose holder is checkable here and no longer runs
    (jobs this process has just killed); returns the claim files removed."""
    removed = []
    for folder in map(Path, folders):
        with suppress(NodulekitError, OSError):
            claim = read_claim(folder, name)
            if claim is None or not claim.checkable() or claim.alive() is not False:
                continue
            with _takeover_lock(folder):
                if read_claim(folder, name) == claim:
                    (folder / name).unlink()
                    removed.append(folder / name)
    return removed


@contextmanager
def claimed(fold_dirs: Iterable[str | os.PathLike]) -> Iterator[dict[Path, Claim]]:
    """Claim every fold folder (all or none), release them all on exit.

    Yields ``{fold_dir: claim}``; a caller may release a finished fold early with
    :func:`release` (releasing twice is harmless).
    """
    with ExitStack() as stack:
        held: dict[Path, Claim] = {}
        for fold_dir in map(Path, fold_dirs):
            claim = acquire(fold_dir)
            held[fold_dir] = claim
            stack.callback(release, fold_dir, claim)
        stack.enter_context(heartbeat(held))
        yield held


@contextmanager
def heartbeat(held: dict[Path, Claim], name: str = CLAIM_FILE) -> Iterator[None]:
    """Touch the claims in ``held`` every ``HEARTBEAT_S`` seconds (a daemon thread) while in the block."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            for folder, claim in held.items():
                if is_mine(folder, claim, name):  # never refresh someone else's claim
                    with suppress(OSError):
                        os.utime(Path(folder) / name, follow_symlinks=False)

    thread = threading.Thread(target=beat, name="nodulekit-claims", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def live_claim(fold_dir: str | os.PathLike) -> Claim | None:
    """The claim on a fold unless it is stale (None: unclaimed or its job is dead)."""
    claim = read_claim(fold_dir)
    return claim if claim is not None and claim.alive() is not False else None


def refuse_if_claimed(rundir: str | os.PathLike) -> None:
    """FoldClaimed when a live job holds any fold of RUNDIR (before discarding the run)."""
    for fold_dir in sorted(Path(rundir).glob("fold*")):
        holder = live_claim(fold_dir)
        if holder is not None:
            raise _refusal(fold_dir, holder)
