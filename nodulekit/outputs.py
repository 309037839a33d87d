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
- A folder output (``predict -o DIR``) is written whole by :func:`atomic_dir`: built under
  a temporary name, moved into place at the end; one writer at a time (:func:`output_lock`);
  without ``overwrite`` a folder that appeared meanwhile is never deleted; a link to a
  folder is written through. ``-`` is refused there in one line.
- Every command declares the files and folders it reads (:func:`declare_inputs`); an
  output that is one of them (the same file, also through links and hard links), holds
  one, or lies inside an input RUNDIR is refused before any work, with or
  without ``--overwrite`` (:func:`check_not_input`).
- A destination folder that cannot be written (read-only, no permission) is found before
  the work too (:func:`check_output_path`, :func:`check_output_dir`).
- :func:`output_lock` lets one job at a time write an output (``extract``'s resumable parts,
  folder outputs). Lock files are opened without following links: a planted link is refused.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from nodulekit.errors import NodulekitError, WriteFailed

STDOUT = "-"
# errno values that mean "the bytes could not be stored", as opposed to bad input
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_SPECIAL_ROOTS = ("/dev", "/proc")
_stdout_taken = False  # set once data went to standard output: status lines then go to stderr
_inputs: list[Path] = []  # what the running command reads (declare_inputs)
_held_locks: set[Path] = set()  # outputs this process holds the lock of (output_lock)


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


_closed: set[str] = set()  # standard streams that were closed when the command started


def mark_closed(name: str) -> None:
    """Note that ``sys.<name>`` was closed at start (``>&-``) and is now a sink."""
    _closed.add(name)


def stdout_closed() -> bool:
    return "stdout" in _closed


def stdout_taken() -> bool:
    """Whether this process wrote data to standard output (status lines should use stderr)."""
    return _stdout_taken


def _resolve(path: str | os.PathLike) -> Path:
    """``realpath`` of an output, or one line for a link loop (never a traceback)."""
    try:
        return Path(os.path.realpath(path, strict=False))
    except OSError as exc:  # pragma: no cover - realpath(strict=False) raises only on odd systems
        raise NodulekitError(f"-o {path}: {exc.strerror or exc}") from None


def _stat_output(path: str | os.PathLike) -> os.stat_result | None:
    """``os.stat`` of an output (None when absent); a symbolic-link loop is one line."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NodulekitError(f"-o {path}: a loop of symbolic links (it points back at itself)") from None
        if exc.errno == errno.ENOTDIR:
            raise NodulekitError(f"-o {path}: a part of the path is a file, not a folder") from None
        return None


def check_writable_dir(folder: Path, shown: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose folder cannot be written (read-only, no permission)."""
    if os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    try:  # access() cannot tell why: a probe file names the reason (read-only file system, ...)
        fd, probe = tempfile.mkstemp(prefix=".nodulekit-probe.", dir=folder)
    except OSError as exc:
        raise NodulekitError(f"-o {shown}: cannot write in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


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
    st = _stat_output(path)
    real = _resolve(path)  # a link is written through: check what it points at
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise NodulekitError(f"-o {path} is a folder; give a file name")
    check_not_input(path)
    if st is not None and not overwrite:
        raise NodulekitError(f"{path} already exists (pass --overwrite to replace it)")
    if not real.parent.is_dir():
        raise NodulekitError(f"output folder {Path(path).parent} does not exist")
    check_writable_dir(real.parent, path)
    return Path(path)


def check_output_dir(path: str | os.PathLike, overwrite: bool | None = None) -> Path:
    """Refuse what cannot be a folder output, before any work: a stream or ``-``, a regular
    file, an input (or a folder holding one), an unwritable place. ``overwrite=False``
    also refuses an existing folder (a folder written whole); None lets files go into one."""
    if output_target(path) != "file":
        raise NodulekitError(f"-o {path}: this output is a folder; give a folder path, not a stream or -")
    st = _stat_output(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise NodulekitError(f"-o {path} exists and is not a folder")
    check_not_input(path)
    if st is not None and overwrite is False:
        raise NodulekitError(f"{path} already exists (pass --overwrite to replace it)")
    real = _resolve(path)
    if st is not None:
        check_writable_dir(real, path)
    elif overwrite is None:  # created with its parents: the nearest existing folder must take it
        above = next(p for p in real.parents if os.path.exists(p))
        if not os.path.isdir(above):
            raise NodulekitError(f"-o {path}: {above} is a file, not a folder")
        check_writable_dir(above, path)
    elif not real.parent.is_dir():
        raise NodulekitError(f"output folder {Path(path).parent} does not exist")
    else:
        check_writable_dir(real.parent, path)
    return Path(path)


# --------------------------------------------------------------------------- a command's inputs


def declare_inputs(*paths: str | os.PathLike | None) -> None:
    """Name the files and folders the running command reads (``None`` and ``-`` are skipped);
    every output is checked against them (:func:`check_not_input`) until :func:`clear_inputs`."""
    _inputs[:] = [Path(p) for p in paths if p is not None and str(p) != STDOUT]


def clear_inputs() -> None:
    _inputs.clear()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lineage(path: Path) -> list[tuple[Path, tuple[int, int] | None]]:
    """``path`` (resolved) and each folder above it, with their (device, inode) where they exist."""
    real = _resolve(path)
    return [(p, _identity(p)) for p in (real, *real.parents)]


def _same(a: tuple[Path, tuple | None], b: tuple[Path, tuple | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _is_rundir(path: Path) -> bool:
    """A folder of nodulekit results (it holds ``run.json``): every file in it is an input.
    Other input folders (a DICOM series, VOIs) may take outputs; a folder that is not yet a
    RUNDIR is left to its reader to refuse, with its own message."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "run.json"))


def check_not_input(path: str | os.PathLike) -> None:
    """Refuse an output that is one of the declared inputs (same file, through links and hard
    links too), holds one (a folder output), or lies inside an input RUNDIR."""
    if not _inputs or output_target(path) != "file":
        return
    out = _lineage(Path(path))
    for given in _inputs:
        if not os.path.exists(given):
            continue  # a missing input is refused by its reader
        inp = _lineage(given)
        if _same(out[0], inp[0]):
            relation = "is the input"
        elif any(_same(out[0], above) for above in inp[1:]):
            relation = "holds the input"
        elif _is_rundir(given) and any(_same(above, inp[0]) for above in out[1:]):
            relation = "lies inside the input folder"
        else:
            continue
        raise NodulekitError(
            f"-o {path} {relation} {given}: an output never replaces an input (even with --overwrite); "
            "choose another -o"
        )


# --------------------------------------------------------------------------- temporary files


def _space() -> str:
    """8 hex digits naming this machine's boot and PID namespace: a PID is only checked in its own."""
    from nodulekit.host import boot_id, pid_namespace

    return f"{zlib.crc32(f'{boot_id()} {pid_namespace()}'.encode()):08x}"


def _owner() -> str:
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{_space()}-{os.getpid()}"


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<host>[A-Za-z0-9_]*)-(?:(?P<space>[0-9a-f]{{8}})-)?(?P<pid>\d+)\.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries (files and folders) of ``path`` left by writers that are no longer
    running: those of this host, boot and PID namespace whose PID is gone (a writer elsewhere
    cannot be checked from here, and is left alone)."""
    path = Path(path)
    host, space, _ = _owner().rsplit("-", 2)
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m["host"] != host or m["space"] not in (space, None) or int(m["pid"]) == os.getpid():
            continue
        if _pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
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


def _temp_beside(path: str | os.PathLike, suffix: str) -> tuple[Path, Path]:
    """(final path, an empty hidden temporary beside it) for one file output; checks the target."""
    if output_target(path) != "file":
        raise NodulekitError(f"-o {path}: not a regular file; this output must go to a file")
    check_not_input(path)
    final = _resolve(path)
    clean_stale_temps(final)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.{_owner()}.", suffix=suffix or ".part", dir=final.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    os.close(fd)
    return final, Path(name)


def _finish(tmp: Path) -> None:
    umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual umask-based permissions
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    _fsync(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only when the block succeeds.

    A link is written through (its target is replaced). ``overwrite=False`` refuses to
    replace a file that exists when the move happens. A failed write is a one-line
    :class:`WriteFailed` naming ``path``; the temporary file never survives.
    """
    final, tmp = _temp_beside(path, suffix)
    try:
        yield tmp
        _finish(tmp)
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
    """Temporary paths for several files that appear together or not at all (a report).

    Every file is written and flushed first, then all are moved in. Without ``overwrite``,
    when one move is refused (its file appeared while this run was working), the files this
    call had already moved in are taken back out, so none of the group stays. A failed
    write is one :class:`WriteFailed` line naming the file it failed on.
    """
    targets: dict[str, tuple[Path, Path]] = {}
    try:
        for key, p in paths.items():
            targets[key] = _temp_beside(p, Path(p).suffix + ".part")
        yield {key: tmp for key, (_, tmp) in targets.items()}
        for _, tmp in targets.values():
            _finish(tmp)
        _commit_all(targets, paths, overwrite)
    except BaseException as exc:
        shown = _failed_output(exc, targets, paths)
        if shown is not None:
            raise write_failed(shown, exc) from None
        raise
    finally:
        for _, tmp in targets.values():
            tmp.unlink(missing_ok=True)


def _failed_output(exc: BaseException, targets: dict[str, tuple[Path, Path]], paths: dict[str, Path]) -> Path | None:
    """The output a write failure is about: the one whose temporary the error names, else
    (a full disk, no file named) the last one; None when ``exc`` is no write failure."""
    hits = [key for key, (_, tmp) in targets.items() if _is_write_failure(exc, tmp)]
    named = [key for key in hits if exc.filename is not None and Path(exc.filename) == targets[key][1]]
    return paths[(named or hits)[-1]] if hits else None


def _commit_all(targets: dict[str, tuple[Path, Path]], paths: dict[str, Path], overwrite: bool) -> None:
    moved: list[Path] = []
    try:
        for key, (final, tmp) in targets.items():
            _commit(tmp, final, paths[key], overwrite)
            moved.append(final)
    except BaseException:
        if not overwrite:  # ours: each was a new hard link that refused to replace anything
            for final in moved:
                final.unlink(missing_ok=True)
        raise


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
        if stdout_closed():
            raise NodulekitError(f"-o {path}: standard output is closed; give a file path or redirect it")
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
    lock of a killed job, so a stale lock never blocks a re-run. The lock file is opened
    without following links: a link planted under its name is refused, never written through.
    """
    from nodulekit.host import open_nofollow

    final = _resolve(path)
    if final in _held_locks:  # this process holds it already (a command locks before its library call)
        yield
        return
    lock = final.parent / f".{final.name}.lock"
    while True:
        fd = open_nofollow(lock, os.O_RDWR | os.O_CREAT, "lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise NodulekitError(
                f"{path} is being written by another {what} job ({holder}); wait for it or choose another -o"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed while we waited
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held_locks.add(final)
        yield
    finally:
        _held_locks.discard(final)
        lock.unlink(missing_ok=True)
        os.close(fd)


# --------------------------------------------------------------------------- folder outputs


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError when ``dst`` exists (even empty)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # no renameat2 (old libc): rename refuses a non-empty folder and a file
        os.rename(src, dst)
        return
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):  # a file system without RENAME_NOREPLACE
            os.rename(src, dst)
            return
        raise OSError(err, os.strerror(err), str(dst))


def _commit_dir(tmp: Path, final: Path, shown: str | os.PathLike, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``final``. Without ``overwrite`` whatever is at
    ``final`` (it appeared while the run was working) is kept and the move refused; with it,
    the old folder is moved aside under a temporary name and removed only afterwards."""
    if not overwrite or not os.path.lexists(final):
        try:
            _rename_noreplace(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise NodulekitError(
                    f"{shown} already exists: it appeared while this run was working (pass --overwrite to replace it)"
                ) from None
            raise
        return
    if not os.path.isdir(final) or os.path.islink(final):
        raise NodulekitError(f"-o {shown} exists and is not a folder")
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.", suffix=".old", dir=final.parent))
    os.replace(final, old)  # onto the empty folder just made: atomic
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only when the block succeeds.

    The folder guarantees of :func:`atomic_path`: a link to a folder is written through
    (the folder it points at is replaced, the link stays); one writer at a time (a second
    refuses at once); without ``overwrite`` a folder that appeared meanwhile is kept and
    the run refused; temporaries of killed writers are removed; a failed write is one line.
    """
    check_output_dir(path, overwrite)
    final = _resolve(path)
    with output_lock(final):
        clean_stale_temps(final)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.", suffix=".part", dir=final.parent))
        except OSError as exc:
            raise write_failed(path, exc) from None
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            _commit_dir(tmp, final, path, overwrite)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS and not isinstance(exc, NodulekitError):
                raise write_failed(path, exc) from None
            raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def folder_writer(path: str | os.PathLike | None, overwrite: bool, what: str) -> Iterator[None]:
    """For a command that writes folder ``path`` whole at its end: refuse a bad ``-o`` now and
    hold the folder's lock for the whole run, so a second job into it refuses at once."""
    if path is None:
        yield
        return
    check_output_dir(path, overwrite)
    with output_lock(path, f"nodulekit {what}"):
        yield


@contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder that receives several output files (``figures``, ``evaluate -o``): checked,
    created when missing, and held by one writer at a time for the block."""
    check_output_dir(path)
    final = _resolve(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives beside the folder
    except OSError as exc:
        raise write_failed(path, exc) from None
    with output_lock(final):
        try:
            final.mkdir(exist_ok=True)
        except OSError as exc:
            raise write_failed(path, exc) from None
        yield Path(path)
