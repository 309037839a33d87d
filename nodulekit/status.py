"""Where each fold of a RUNDIR stands: finished, running, interrupted or missing.

- ``finished``: ``result.h5`` is written and the checkpoint says finished with at least
  the epochs ``run.json`` asks for;
- ``running``: a job holds the fold's claim (see :mod:`nodulekit.claims`); a claim from
  another host cannot be checked from here and is shown as running with its host;
- ``interrupted``: a checkpoint exists but the fold is not finished and no live job
  holds it (killed, crashed, diverged, or the run was extended to more epochs);
- ``missing``: nothing trained yet.

Epochs done come from the checkpoint (read memory-mapped: only the small fields are touched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodulekit.claims import read_claim
from nodulekit.errors import NodulekitError

STATES = ("finished", "running", "interrupted", "missing")


@dataclass
class FoldStatus:
    rundir: str
    fold: int | None  # None: the RUNDIR does not exist yet, so its folds are unknown
    state: str
    epochs_done: int
    epochs: int | None
    claim: dict[str, Any] | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _checkpoint_progress(path: Path) -> tuple[int, bool]:
    """(epochs done, finished flag) of a checkpoint; (0, False) when unreadable."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt.get("epoch", 0)), bool(ckpt.get("finished", False))
    except Exception:  # a damaged checkpoint: training would refuse it; status says so
        return 0, False


def fold_status(rundir: str | os.PathLike, fold: int, epochs: int | None) -> FoldStatus:
    """The state of one fold of a RUNDIR whose run.json asks for ``epochs``."""
    fold_dir = Path(rundir) / f"fold{fold}"
    ckpt_path, result_path = fold_dir / "checkpoint.pt", fold_dir / "result.h5"
    done, finished = _checkpoint_progress(ckpt_path) if ckpt_path.exists() else (0, False)
    claim = read_claim(fold_dir)
    alive = claim.alive() if claim is not None else False
    status = FoldStatus(str(rundir), fold, "missing", done, epochs)
    if finished and result_path.exists() and (epochs is None or done >= epochs):
        status.state = "finished"
    elif alive is not False:  # claimed by a live job here, or by a job on another host
        status.state, status.claim = "running", claim.__dict__
        status.note = f"{claim.describe()}" + ("" if alive else " (other host: not checked)")
    elif ckpt_path.exists():
        status.state = "interrupted"
        if claim is not None:
            status.note = f"stale claim: {claim.describe()} is not running"
    return status


def run_status(rundir: str | os.PathLike) -> list[FoldStatus]:
    """The status of every fold of a RUNDIR (a RUNDIR not created yet is one ``missing`` row)."""
    from nodulekit.training import load_run

    path = Path(rundir)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return [FoldStatus(str(rundir), None, "missing", 0, None, note="not started")]
    run = load_run(path)
    try:
        n_folds, epochs = int(run["n_folds"]), int(run["epochs"])
    except (KeyError, TypeError, ValueError):
        raise NodulekitError(
            f"{path / 'run.json'} lacks n_folds/epochs; it was not written by nodulekit train"
        ) from None
    return [fold_status(path, k, epochs) for k in range(n_folds)]


def all_finished(rows: list[FoldStatus]) -> bool:
    return all(r.state == "finished" for r in rows)


def status_table(rows: list[FoldStatus]) -> str:
    """A plain-text table, one line per fold."""
    lines = [f"{'RUNDIR':<40} {'fold':>4}  {'state':<11} {'epochs':>9}  note"]
    for r in rows:
        fold = "-" if r.fold is None else str(r.fold)
        epochs = f"{r.epochs_done}/{r.epochs}" if r.epochs is not None else "-"
        lines.append(f"{r.rundir:<40} {fold:>4}  {r.state:<11} {epochs:>9}  {r.note}".rstrip())
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no folds")
    return "\n".join(lines)
