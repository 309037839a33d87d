"""What this process and machine are, and opening a file without following links.

The facts a claim or a temporary name records to tell this job from another (boot id, PID
namespace), used by both the output layer (``outputs``) and fold claims (``claims``).
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

from nodulekit.errors import NodulekitError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def linked_name(path: str | os.PathLike, what: str) -> NodulekitError:
    """The refusal of a symbolic link found where nodulekit keeps a claim or lock file."""
    return NodulekitError(f"{path} is a symbolic link, not a nodulekit {what} file: remove it (never followed)")


def open_nofollow(path: str | os.PathLike, flags: int, what: str, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (ELOOP) in one line."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise linked_name(path, what) from None
        raise


@functools.cache
def boot_id() -> str | None:
    """This machine's boot id (changes at every boot); None where /proc does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@functools.cache
def pid_namespace() -> str | None:
    """This process's PID namespace, e.g. ``pid:[4026531836]``; None where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
