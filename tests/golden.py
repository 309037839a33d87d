"""Reviewed expected texts: a report, model card or message compared whole with a file in
tests/golden/ that a person has read through (wording, headings, columns and numbers).

The text is the specification of what a reader gets, so a change to any word of it fails here
and must be reviewed: rerun with ``NODULEKIT_UPDATE_GOLDEN=1`` to rewrite the file, then read its
diff before committing. Callers replace what varies between runs (dates, hosts, commits, temporary
paths) with fixed placeholders first, so the file holds only what the code decides.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str) -> None:
    """``text`` equals tests/golden/``name`` (or rewrites it when NODULEKIT_UPDATE_GOLDEN=1)."""
    path = GOLDEN / name
    if os.environ.get("NODULEKIT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: run with NODULEKIT_UPDATE_GOLDEN=1, then read it through")
    expected = path.read_text()
    if text != expected:
        diff = difflib.unified_diff(expected.splitlines(), text.splitlines(), str(path), "this run", lineterm="")
        pytest.fail("differs from its reviewed text:\n" + "\n".join(diff))
