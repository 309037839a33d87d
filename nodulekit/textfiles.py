"""Text files a user gives nodulekit (CSV tables, YAML configs): UTF-8 with or without a byte-order mark.

Excel saves "CSV UTF-8" with a BOM, which a plain ``open`` keeps in the first column's name;
a file in another encoding (Latin-1, UTF-16) is one line naming the byte that is not UTF-8,
never a traceback or a silently misread name.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from nodulekit.errors import DataError


def read_text(path: str | Path, what: str) -> str:
    """The file's text, decoded as UTF-8 (a leading BOM dropped)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def read_csv(path: str | Path, what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, [(line number, {column: stripped value})]) of a CSV with a header row.

    Column names are stripped; a name given twice is refused (which of the two would count?).
    """
    text = read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [c.strip() for c in next(reader, [])]
        if not any(header):
            raise DataError(f"{what} {path} is empty (no header row)")
        dup = next((c for i, c in enumerate(header) if c and c in header[:i]), None)
        if dup is not None:
            raise DataError(f"{what} {path} has the column {dup!r} twice")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank lines, e.g. a trailing one
            row = {c: (values[i].strip() if i < len(values) else "") for i, c in enumerate(header) if c}
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DataError(f"{what} {path} line {reader.line_num}: not valid CSV ({exc})") from None
    return header, rows
