"""Shared fixtures: where the real LIDC data is, and small synthetic artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NODULEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real LIDC data not found at {path} (set NODULEKIT_SHARED_DATA or place ../shared beside the repo)"
        )
    return path


@pytest.fixture(scope="session")
def lidc_dicom() -> Path:
    return _need(SHARED_DATA / "lidc-dicom")


@pytest.fixture(scope="session")
def lidc_vois() -> Path:
    return _need(SHARED_DATA / "lidc-vois")


def write_tiny_dataset(path: Path, n: int = 40, channels: int = 11, folds: int = 5, seed: int = 0) -> Path:
    """A learnable synthetic `dataset` artifact: malignant = a bright ring, benign = a blob.

    It follows the documented `dataset` layout, so every stage after `build` can be
    tested without LIDC data.
    """
    from nodulekit.artifacts import provenance, set_json_attr, write_artifact, write_strings

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    y = np.arange(n) % 2
    x = np.zeros((n, channels, 32, 32), np.float32)
    mask = np.zeros((n, channels, 32, 32), np.uint8)
    for i in range(n):
        r = rng.uniform(5, 8)
        d = np.hypot(yy - 16 + rng.normal(0, 1), xx - 16 + rng.normal(0, 1))
        body = d < r
        img = np.where(np.abs(d - r) < 1.5, 0.9, 0.0) if y[i] else np.where(body, 0.7, 0.0)
        for c in range(channels):
            x[i, c] = img + rng.normal(0, 0.05, (32, 32))
            mask[i, c] = body
    patients = [f"SYN-{i // 2:04d}" for i in range(n)]  # two nodules per patient
    fold = np.array([(i // 2) % folds for i in range(n)])
    with write_artifact(path, "dataset", provenance(source="synthetic test fixture", seed=seed)) as f:
        f["x"] = x
        f["y"] = y.astype(np.int64)
        f["fold"] = fold.astype(np.int64)
        f["mask"] = mask
        f["pixel_mm"] = np.full((n, channels), 0.5, np.float32)
        f["characteristics"] = rng.uniform(1, 5, (n, 8)).astype(np.float32)
        f["characteristics"].attrs["names"] = list(CHARACTERISTICS)
        readers = np.full((n, 4), np.nan, np.float32)
        readers[:, :3] = np.where(y[:, None] == 1, 4, 2) + rng.integers(-1, 2, (n, 3))
        f["reader_malignancy"] = readers
        f["malignancy_mean"] = np.nanmean(readers, axis=1).astype(np.float32)
        f["diameter_mm"] = rng.uniform(5, 20, n).astype(np.float32)
        write_strings(f, "patient_id", patients)
        write_strings(f, "nodule_id", [f"{p}:{i % 2 + 1}" for i, p in enumerate(patients)])
        f.attrs["channels"] = channels
        f.attrs["n_folds"] = folds
        f.attrs["split"] = "patient"
        f.attrs["seed"] = seed
        f.attrs["name"] = f"D{channels}C"
        set_json_attr(f, "label_rule", {"min_readers": 3, "malignant_above": 3.0, "benign_below": 3.0})
        set_json_attr(f, "normalisation", {"hu_window": [-1000.0, 400.0], "scale": "linear to [0, 1]"})
    return path


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny_d11c.h5")
