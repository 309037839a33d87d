"""A tiny trained RUNDIR and its exports, shared by the model-description and predict tests."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import write_tiny_dataset


def trained_run(folder: Path, channels: int = 11, folds: int = 2) -> tuple[Path, Path]:
    """(dataset, RUNDIR): a narrow HESAM trained one epoch per fold on the synthetic dataset."""
    from nodulekit.training import TrainConfig, train

    dataset = write_tiny_dataset(folder / f"d{channels}c.h5", n=20, channels=channels, folds=folds)
    rundir = folder / "run"
    cfg = TrainConfig(arch="hesam", model_options={"base_width": 8}, epochs=1, batch_size=8, device="cpu", seed=0)
    train(dataset, rundir, cfg, progress=False)
    return dataset, rundir


def export(rundir: Path, out: Path, fold: int | None = None) -> Path:
    """``fold`` None: the fold ensemble; else that fold's model (legacy exporter: fast)."""
    from nodulekit import export as ex

    src = ex.load_ensemble_source(rundir) if fold is None else ex.load_model_source(rundir, fold)
    ex.export_onnx(src, out, exporter="torchscript")
    return out
