"""`nodulekit status`: each fold of some RUNDIRs as finished, running, interrupted or missing.

The states come from :meth:`nodulekit.run.Run.fold_progress`:

- ``finished``: ``result.h5`` is written for every epoch ``run.json`` asks for;
- ``running``: a job holds the fold's claim (see :mod:`nodulekit.claims`); a claim from
  another host cannot be checked from here and is shown as running with its host;
- ``interrupted``: a checkpoint but no result, and no live job holds the fold (killed,
  crashed, diverged, or the run was extended to more epochs);
- ``missing``: nothing trained yet. A RUNDIR not created yet is one ``missing`` row.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodulekit.run import FOLD_STATES, Run


def run_status(rundir: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per fold of RUNDIR: ``rundir``, ``fold``, ``state``, ``epochs_done``, ``epochs``, ``claim``, ``note``."""
    path = Path(rundir)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return [{"rundir": str(rundir), "fold": None, "state": "missing", "epochs_done": 0, "epochs": None,
                 "claim": None, "note": "not started"}]  # fmt: skip
    run = Run(path)
    return [{"rundir": str(rundir), **asdict(run.fold_progress(k))} for k in range(run.n_folds)]


def all_finished(rows: list[dict]) -> bool:
    return all(r["state"] == "finished" for r in rows)


def status_table(rows: list[dict]) -> str:
    """A plain-text table, one line per fold, then the count of each state."""
    lines = [f"{'RUNDIR':<40} {'fold':>4}  {'state':<11} {'epochs':>9}  note"]
    for r in rows:
        fold = "-" if r["fold"] is None else str(r["fold"])
        epochs = f"{r['epochs_done']}/{r['epochs']}" if r["epochs"] is not None else "-"
        lines.append(f"{r['rundir']:<40} {fold:>4}  {r['state']:<11} {epochs:>9}  {r['note']}".rstrip())
    counts = {s: sum(r["state"] == s for r in rows) for s in FOLD_STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no folds")
    return "\n".join(lines)
