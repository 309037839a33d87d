"""The one place nodulekit touches pylidc's import-time quirks.

pylidc 0.2.3 (its last release) calls ``np.int``/``np.float``/``np.bool`` (removed in
numpy 1.24) and imports ``pkg_resources`` (no longer shipped by new setuptools) only
to locate its bundled SQLite file. We restore the three aliases and, where
``pkg_resources`` is missing, provide a minimal stand-in with ``resource_filename``.
No ``~/.pylidcrc`` is needed: nodulekit never asks pylidc where the DICOM lives.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path

import numpy as np


def _restore_numpy_aliases() -> None:
    for name, builtin in (("int", int), ("float", float), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, builtin)


def _ensure_pkg_resources() -> types.ModuleType | None:
    """Install the stand-in if there is no real ``pkg_resources``; returns it (or None)."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources"):
        return None
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImportError(f"package {package!r} not found")
        return str(Path(spec.origin).parent / resource)

    shim.resource_filename = resource_filename  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    return shim


@lru_cache(maxsize=1)
def pylidc():
    """Import and return the ``pylidc`` module, patched for numpy 2."""
    _restore_numpy_aliases()
    shim = _ensure_pkg_resources()
    import logging
    import warnings

    # An interrupted query makes sqlalchemy log a traceback while closing its cursor;
    # the CLI already reports the interruption in one line.
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
    # pylidc needs it only while importing; left in sys.modules, the stand-in would be taken
    # for the real package by others (pytest's syspath_prepend calls into it).
    if shim is not None and sys.modules.get("pkg_resources") is shim:
        del sys.modules["pkg_resources"]
    return pl
