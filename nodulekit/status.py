"""`nodulekit status`: each fold of some RUNDIRs as finished, running, interrupted, crashed or missing.

The states come from :meth:`nodulekit.run.Run.fold_progress`, and from the fold watches of
:mod:`nodulekit.crashes`:

- ``finished``: ``result.h5`` is written for every epoch ``run.json`` asks for;
- ``running``: a job holds the fold's claim (see :mod:`nodulekit.claims`); a claim from
  another host cannot be checked from here and is shown as running with its host;
- ``crashed``: the process training it died by a signal (SIGABRT, SIGSEGV... in native
  code: the note names the signal and the execution variant), or was killed by one that
  cannot be caught (SIGKILL);
- ``interrupted``: a checkpoint but no result, and no live job holds the fold (stopped,
  diverged, or the run was extended to more epochs);
- ``missing``: nothing trained yet. An existing empty folder is one ``missing`` row.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodulekit.errors import NodulekitError
from nodulekit.run import FOLD_STATES, Run

STATES = FOLD_STATES[:2] + ("crashed",) + FOLD_STATES[2:]


def run_status(rundir: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per fold of RUNDIR: ``rundir``, ``fold``, ``state``, ``epochs_done``, ``epochs``, ``claim``, ``note``."""
    from nodulekit.crashes import crashed_folds

    path = Path(rundir)
    if not path.exists():
        raise NodulekitError(f"{rundir} does not exist")
    if path.is_dir() and not any(path.iterdir()):
        return [{"rundir": str(rundir), "fold": None, "state": "missing", "epochs_done": 0, "epochs": None,
                 "claim": None, "note": "not started"}]  # fmt: skip
    run = Run(path)
    rows = [{"rundir": str(rundir), **asdict(run.fold_progress(k))} for k in range(run.n_folds)]
    died = crashed_folds(path)
    for row in rows:
        if row["state"] in ("interrupted", "missing") and row["fold"] in died:
            row["state"], row["note"] = "crashed", died[row["fold"]].describe()
    return rows


def all_finished(rows: list[dict]) -> bool:
    return all(r["state"] == "finished" for r in rows)


def status_table(rows: list[dict]) -> str:
    """A plain-text table, one line per fold (columns as wide as their content), then the count of each state."""
    cells = [
        (
            r["rundir"],
            "-" if r["fold"] is None else str(r["fold"]),
            r["state"],
            f"{r['epochs_done']}/{r['epochs']}" if r["epochs"] is not None else "-",
            r["note"] or "",
        )
        for r in rows
    ]
    header = ("RUNDIR", "fold", "state", "epochs", "note")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]

    def line(c) -> str:
        return f"{c[0]:<{widths[0]}}  {c[1]:>{widths[1]}}  {c[2]:<{widths[2]}}  {c[3]:>{widths[3]}}  {c[4]}".rstrip()

    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no folds"
    return "\n".join([line(header), *map(line, cells), summary])
