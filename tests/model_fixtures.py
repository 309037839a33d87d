"""A tiny trained RUNDIR and its exports, shared by the model-description and predict tests.

Training it and exporting it cost ~20 CPU-s, and six test files need the same one: each test
process trains it once (a private master copy) and every caller gets its own copy, so a test
may change or break its copy without touching another's.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

import h5py

from tests.conftest import write_tiny_dataset

_MASTERS: dict[tuple[int, int], tuple[Path, Path]] = {}  # (channels, folds) -> (dataset, RUNDIR)
_EXPORTS: dict[tuple[Path, int | None], Path] = {}  # (master RUNDIR, fold) -> its ONNX file


def _train(folder: Path, channels: int, folds: int) -> tuple[Path, Path]:
    from nodulekit.training import TrainConfig, train

    dataset = write_tiny_dataset(folder / f"d{channels}c.h5", n=20, channels=channels, folds=folds)
    rundir = folder / "run"
    cfg = TrainConfig(arch="hesam", model_options={"base_width": 8}, epochs=1, batch_size=8, device="cpu", seed=0)
    train(dataset, rundir, cfg, progress=False)
    return dataset, rundir


def _copy(master: tuple[Path, Path], folder: Path) -> tuple[Path, Path]:
    """The master's dataset and RUNDIR in ``folder``, its recorded dataset path made the copy's."""
    dataset, rundir = folder / master[0].name, folder / master[1].name
    shutil.copy2(master[0], dataset)
    shutil.copytree(master[1], rundir)
    old, new = str(master[0]), str(dataset)
    (rundir / "run.json").write_text((rundir / "run.json").read_text().replace(old, new))
    for result in rundir.glob("fold*/result.h5"):
        with h5py.File(result, "r+") as f:
            f.attrs["provenance"] = f.attrs["provenance"].replace(old, new)
    return dataset, rundir


def trained_run(folder: Path, channels: int = 11, folds: int = 2) -> tuple[Path, Path]:
    """(dataset, RUNDIR) in ``folder``: a narrow HESAM trained one epoch per fold on the synthetic dataset."""
    key = (channels, folds)
    if key not in _MASTERS:
        _MASTERS[key] = _train(Path(tempfile.mkdtemp(prefix="nodulekit-trained-run-")), channels, folds)
    return _copy(_MASTERS[key], folder)


def _master_of(rundir: Path) -> Path | None:
    """The master RUNDIR whose unchanged copy ``rundir`` is (same checkpoints), if any."""
    for _, master in _MASTERS.values():
        theirs, mine = sorted(master.glob("fold*/checkpoint.pt")), sorted(rundir.glob("fold*/checkpoint.pt"))
        if [p.relative_to(master) for p in theirs] == [p.relative_to(rundir) for p in mine] and all(
            filecmp.cmp(a, b, shallow=False) for a, b in zip(theirs, mine, strict=True)
        ):
            return master
    return None


def export(rundir: Path, out: Path, fold: int | None = None) -> Path:
    """``fold`` None: the fold ensemble; else that fold's model (legacy exporter: fast).

    An unchanged copy of a master RUNDIR gets a copy of the master's export (made once)."""
    from nodulekit import export as ex

    master = _master_of(rundir)
    if master is not None and (master, fold) in _EXPORTS:
        return Path(shutil.copy2(_EXPORTS[master, fold], out))
    src = ex.load_ensemble_source(rundir) if fold is None else ex.load_model_source(rundir, fold)
    ex.export_onnx(src, out, exporter="torchscript")
    if master is not None:
        _EXPORTS[master, fold] = Path(shutil.copy2(out, master.parent / f"export-{fold}.onnx"))
    return out
