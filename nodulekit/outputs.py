"""Where outputs go, safely: the one place that turns a user's ``-o PATH`` into bytes on disk.

- A regular file is written to a hidden temporary file beside it and moved into place
  only when complete (:func:`atomic_path`), so a crash, a full disk or Ctrl-C never
  leaves a half-written file under the final name. A symbolic link is written *through*
  (the file it points at is replaced; the link stays). Without ``overwrite`` the move
  refuses a file that appeared while the run was working (``link``, not ``rename``), so
  of two jobs writing one output only one can succeed.
- ``-`` means standard output; an existing device, FIFO or socket, or a path that leads
  through ``/dev`` or ``/proc`` (``/dev/stdout``, ``/dev/fd/3``), is a *stream*: text
  outputs (CSV, Markdown, JSON) are written through to it and it is never replaced;
  binary artifacts (HDF5, ONNX, checkpoints, PNG) refuse it in one line.
- Temporary names carry the writer's host and PID, so a later write of the same output
  removes the temporaries of writers that were killed (:func:`clean_stale_temps`).
- A failed write (disk full, quota, read-only file system) becomes one line naming the
  output, exit status 1 (:class:`~nodulekit.errors.WriteFailed`). HDF5 files are written
  through :func:`hdf5_file`, which keeps a failing disk away from the HDF5 library
  (h5py crashes with SIGSEGV when a chunk write fails while a file is being closed).
- :func:`output_lock` lets one job at a time write an output (``extract``'s resumable parts).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from nodulekit.errors import NodulekitError, WriteFailed

STDOUT = "-"
# errno values that mean "the bytes could not be stored", as opposed to bad input
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_SPECIAL_ROOTS = ("/dev", "/proc")
_stdout_taken = False  # set once data went to standard output: status lines then go to stderr


# --------------------------------------------------------------------------- what a path is


def _under_special(path: Path) -> bool:
    return any(str(path) == root or str(path).startswith(root + "/") for root in _SPECIAL_ROOTS)


def _through_special(path: str | os.PathLike) -> bool:
    """Whether ``path``, or a symbolic link on the way to its target, lies under /dev or /proc."""
    p = Path(os.path.abspath(path))
    for _ in range(40):  # the kernel's own limit on link chains
        p = Path(os.path.realpath(p.parent)) / p.name
        if _under_special(p):
            return True
        if not p.is_symlink():
            return False
        p = Path(os.path.abspath(p.parent / os.readlink(p)))
    return False


def output_target(path: str | os.PathLike) -> str:
    """``"stdout"`` (``-``), ``"stream"`` (device, FIFO, socket, or via /dev, /proc) or ``"file"``."""
    if str(path) == STDOUT:
        return "stdout"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "stream"
    return "stream" if _through_special(path) else "file"


def is_stdout(path: str | os.PathLike) -> bool:
    """Whether writing to ``path`` writes to this process's standard output."""
    if str(path) == STDOUT:
        return True
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def stdout_taken() -> bool:
    """Whether this process wrote data to standard output (status lines should use stderr)."""
    return _stdout_taken


def check_output_path(path: str | os.PathLike, overwrite: bool, *, stream: str | None = None) -> Path:
    """Refuse an output that cannot or must not be written, before any work is done.

    ``stream``: what the output holds when a stream may receive it (a text format), or
    None for files only (binary artifacts). A stream needs no ``overwrite``.
    """
    target = output_target(path)
    if target != "file":
        if stream is None:
            where = "standard output" if target == "stdout" else "not a regular file (a terminal, pipe or device)"
            raise NodulekitError(f"-o {path}: {where}; this output is binary, give a file path")
        if target == "stream" and not os.path.exists(path):
            raise NodulekitError(f"-o {path}: no such device or stream")
        return Path(path)
    real = Path(os.path.realpath(path))  # a link is written through: check what it points at
    if real.is_dir():
        raise NodulekitError(f"-o {path} is a folder; give a file name")
    if real.exists() and not overwrite:
        raise NodulekitError(f"{path} already exists (pass --overwrite to replace it)")
    if not real.parent.is_dir():
        raise NodulekitError(f"output folder {Path(path).parent} does not exist")
    return Path(path)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse a stream or a regular file where a folder of outputs is asked for."""
    if output_target(path) != "file":
        raise NodulekitError(f"-o {path}: a folder is needed here, not a stream")
    if Path(path).exists() and not Path(path).is_dir():
        raise NodulekitError(f"-o {path} exists and is not a folder")
    return Path(path)


# --------------------------------------------------------------------------- temporary files


def _owner() -> str:
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{os.getpid()}"


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)\.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by writers on this host that are no longer running."""
    path = Path(path)
    host = _owner().rsplit("-", 1)[0]
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def write_failed(path: str | os.PathLike, exc: OSError) -> WriteFailed:
    """The one-line error for a failed write of ``path`` (names the output, never a temporary file)."""
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    return WriteFailed(f"could not write {path}: {reason}", reason=reason)


def _is_write_failure(exc: BaseException, tmp: Path) -> bool:
    if not isinstance(exc, OSError) or isinstance(exc, NodulekitError):
        return False
    return exc.errno in WRITE_ERRNOS or (exc.filename is not None and Path(exc.filename) == tmp)


def _commit(tmp: Path, final: Path, shown: str | os.PathLike, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # fails when the name exists: never clobbers what another job wrote
    except FileExistsError:
        raise NodulekitError(
            f"{shown} already exists: it appeared while this run was working (pass --overwrite to replace it)"
        ) from None
    except OSError as exc:  # a file system without hard links
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        if final.exists():
            raise NodulekitError(f"{shown} already exists (pass --overwrite to replace it)") from None
        os.rename(tmp, final)
        return
    tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only when the block succeeds.

    A link is written through (its target is replaced). ``overwrite=False`` refuses to
    replace a file that exists when the move happens. A failed write is a one-line
    :class:`WriteFailed` naming ``path``; the temporary file never survives.
    """
    if output_target(path) != "file":
        raise NodulekitError(f"-o {path}: not a regular file; this output must go to a file")
    final = Path(os.path.realpath(path))
    clean_stale_temps(final)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.{_owner()}.", suffix=suffix or ".part", dir=final.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual umask-based permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)
        _commit(tmp, final, path, overwrite)
    except BaseException as exc:
        if _is_write_failure(exc, tmp):
            raise write_failed(path, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a finished file to the disk before it is renamed into place (crash safety)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_paths(paths: dict[str, Path], *, overwrite: bool = True) -> Iterator[dict[str, Path]]:
    """Temporary paths for several files that appear together or not at all (a report)."""
    with ExitStack() as stack:
        tmps = {
            key: stack.enter_context(atomic_path(p, Path(p).suffix + ".part", overwrite=overwrite))
            for key, p in paths.items()
        }
        yield tmps


# --------------------------------------------------------------------------- text outputs


@contextmanager
def text_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[IO[str]]:
    """A text handle for ``path``: standard output for ``-``, written through for a stream,
    else an atomic temporary file (see :func:`atomic_path`)."""
    global _stdout_taken
    target = output_target(path)
    if target == "stdout" or is_stdout(path):
        _stdout_taken = True
    if target == "stdout":
        yield sys.stdout
        sys.stdout.flush()
        return
    if target == "stream":
        try:  # append: never truncate what the stream (or a shell's >>) already holds
            with open(path, "a", newline="") as fh:
                yield fh
        except OSError as exc:
            if isinstance(exc, NodulekitError):
                raise
            raise write_failed(path, exc) from None
        return
    with atomic_path(path, Path(path).suffix + ".part", overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            yield fh


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> None:
    with text_output(path, overwrite=overwrite) as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, overwrite: bool = True) -> None:
    """Write ``data`` to a regular file atomically (Python I/O: a full disk raises cleanly)."""
    with atomic_path(path, Path(path).suffix + ".part", overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


# --------------------------------------------------------------------------- HDF5


class _FailSafeFile(io.RawIOBase):
    """An unbuffered file for h5py's ``fileobj`` driver that never reports a failed write.

    The first write error (e.g. ENOSPC) is kept and the file carries on in memory: its
    content so far is read back into a buffer that takes every later read and write. So
    the HDF5 library never sees a failure, and never reads back a block that was not
    written (dropping writes fed it garbage, and h5py crashed with SIGSEGV on it);
    :func:`hdf5_file` raises the kept error once the file is closed.
    """

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None
        self.memory: io.BytesIO | None = None

    @property
    def _file(self):
        return self.raw if self.memory is None else self.memory

    def _spill(self, exc: OSError, pos: int) -> None:
        """Keep ``exc``; go on in memory from what the disk holds (what failed is rewritten there)."""
        self.error = exc
        self.raw.seek(0)
        self.memory = io.BytesIO(self.raw.readall())
        self.memory.seek(pos)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._file.readinto(b)

    def write(self, b) -> int:
        data = memoryview(b).cast("B")
        if self.memory is None:
            pos = self.raw.tell()
            try:
                done = 0
                while done < len(data):  # a short write is retried; its failure raises
                    done += self.raw.write(data[done:])
                return len(data)
            except OSError as exc:
                self._spill(exc, pos)
        return self.memory.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.memory is None:
            pos = self.raw.tell()
            try:
                return self.raw.truncate(size)
            except OSError as exc:
                self._spill(exc, pos)
        return self.memory.truncate(size)

    def flush(self) -> None:
        if self.memory is None:
            try:
                self.raw.flush()
            except OSError as exc:
                self._spill(exc, self.raw.tell())


@contextmanager
def hdf5_file(path: str | os.PathLike) -> Iterator:
    """``h5py.File(path, "w")`` whose write failures surface as an ``OSError`` after closing."""
    import h5py

    with open(path, "wb+", buffering=0) as raw:
        sink = _FailSafeFile(raw)
        try:
            with h5py.File(sink, "w") as f:
                yield f
        finally:
            if sink.error is not None:  # the root cause: report it rather than its consequences
                err = sink.error
                raise OSError(err.errno, err.strerror, str(path)) from None


# --------------------------------------------------------------------------- one writer at a time


@contextmanager
def output_lock(path: str | os.PathLike, what: str = "nodulekit") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a hidden ``.<name>.lock`` beside it) for the block.

    A second job asking for the same output refuses in one line; the kernel drops the
    lock of a killed job, so a stale lock never blocks a re-run.
    """
    final = Path(os.path.realpath(path))
    lock = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise NodulekitError(
                f"{path} is being written by another {what} job ({holder}); wait for it or choose another -o"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed while we waited
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
