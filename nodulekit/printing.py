"""Printing strings that come from files without letting them control the terminal.

Dataset names, model metadata, nodule ids and paths are read from files that may come
from anyone; an escape sequence in one of them would, printed raw, set the window title,
clear the screen or hide text. :func:`printable` is applied where such strings reach the
terminal (status lines, reports, tables, error messages): control characters, bidi and
other invisible format characters, and undecodable bytes are shown as ``\\x1b``,
``\\u202e`` style escapes; line breaks and tabs of multi-line text are kept.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL; bidi embeddings, overrides and isolates; zero-width and
# line/paragraph separators; the BOM; lone surrogates (undecodable bytes of file names).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_UNSAFE_LINE = re.compile("[\n\t" + _UNSAFE.pattern[1:])


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, lines: bool = True) -> str:
    """``text`` with every character that could control a terminal escaped.

    ``lines``: keep line breaks and tabs (tables, multi-line reports); False escapes them
    too (one-line messages, where a planted newline could forge a second line).
    """
    return (_UNSAFE if lines else _UNSAFE_LINE).sub(_escape, str(text))
