"""Shared fixtures: where the real LIDC data is, and small synthetic artifacts."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NODULEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
# Crash records of execution variants (nodulekit.crashes) go to a private folder per test
# process and its children, never the user's cache: a test that kills a training must not
# steer later automatic choices on this machine.
os.environ.setdefault("NODULEKIT_CACHE_DIR", tempfile.mkdtemp(prefix="nodulekit-test-cache-"))


def _start_unrecorded(popen_init):
    """Popen.__init__ whose child runs unrecorded: see the note below."""

    def start(self, *args, env=None, **kwargs):
        env = dict(os.environ if env is None else env)
        if env.get("MUTANT_UNDER_TEST") == "stats":
            env["MUTANT_UNDER_TEST"] = ""  # the code as written, no recording
        popen_init(self, *args, env=env, **kwargs)

    return start


# mutmut's stats pass (tools/mutmut_run.py, docs/testing.md) records in this process which test
# reaches which function. A child process started in another folder cannot record (its mutmut
# looks for its config in that folder and stops the child), so children run the code unrecorded;
# mutant runs are not affected (a child runs the mutant under test, as this process does).
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    subprocess.Popen.__init__ = _start_unrecorded(subprocess.Popen.__init__)

# The test files that take longest, longest first (docs/testing.md, "Suite time"). `make test`
# hands whole files to its two workers (`--dist loadfile --no-loadscope-reorder`) in collection
# order: a long file started last keeps one worker busy while the other has finished, so the
# long ones go first and the many short files fill in behind them.
SLOW_FILES = (
    "test_grid.py",
    "test_reliability.py",
    "test_extract.py",
    "test_crashes.py",
    "test_evaluation.py",
    "test_concurrent_folds.py",
    "test_execution.py",
    "test_training.py",
    "test_predict_parity.py",
    "test_claims.py",
    "test_export.py",
    "test_gpu_benchmark.py",
    "test_phantom.py",
    "test_cohort.py",
    "test_scans.py",
    "test_maps_report.py",
    "test_cohort_reference.py",
    "test_model_description.py",
    "test_outputs.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items):
    """Known-slow files first, in SLOW_FILES order; the rest keep their order behind them."""
    missing = [name for name in SLOW_FILES if not (REPO / "tests" / name).exists()]
    if missing:  # a renamed file would silently lose its place: keep the list true
        raise pytest.UsageError(f"tests/conftest.py SLOW_FILES names missing test files: {', '.join(missing)}")
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


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
    from nodulekit.artifacts import provenance
    from nodulekit.datasets import Dataset, write_dataset

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
    characteristics = rng.uniform(1, 5, (n, 8)).astype(np.float32)
    readers = np.full((n, 4), np.nan, np.float32)
    readers[:, :3] = np.where(y[:, None] == 1, 4, 2) + rng.integers(-1, 2, (n, 3))
    ds = Dataset(
        x=x,
        y=y.astype(np.int64),
        fold=np.array([(i // 2) % folds for i in range(n)], np.int64),
        patient_id=np.asarray(patients, dtype=object),
        nodule_id=np.asarray([f"{p}:{i % 2 + 1}" for i, p in enumerate(patients)], dtype=object),
        mask=mask,
        pixel_mm=np.full((n, channels), 0.5, np.float32),
        characteristics=characteristics,
        reader_malignancy=readers,
        malignancy_mean=np.nanmean(readers, axis=1).astype(np.float32),
        diameter_mm=rng.uniform(5, 20, n).astype(np.float32),
        attrs={
            "channels": channels,
            "n_folds": folds,
            "split": "patient",
            "seed": seed,
            "name": f"D{channels}C",
            "label_rule": {"min_readers": 3, "malignant_above": 3.0, "benign_below": 3.0},
            "normalisation": {"hu_window": [-1000.0, 400.0], "scale": "linear to [0, 1]"},
        },
    )
    write_dataset(path, ds, provenance(source="synthetic test fixture", seed=seed))
    return path


def fake_identity(fingerprint: str = "f" * 16) -> dict:
    """A dataset identity record (``nodulekit.datasets.dataset_identity``) for hand-made runs
    that have no dataset file; runs record it in run.json and every fold result."""
    return {
        "fingerprint": fingerprint,
        "format": 1,
        "n": 0,
        "content": fingerprint,
        "mask": fingerprint,
        "folds": fingerprint,
        "split": "patient",
        "seed": 0,
        "n_folds": 5,
    }


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny_d11c.h5")


def cli_in_process(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``nodulekit ARGS`` in this process through the real entry point (``nodulekit.cli.main``:
    its error lines and exit codes), returning (exit status, stdout, stderr)."""
    import sys

    from nodulekit.cli import main

    outputs = sys.modules.get("nodulekit.outputs")
    if outputs is not None and hasattr(outputs, "_stdout_taken"):
        monkeypatch.setattr(outputs, "_stdout_taken", False)  # a fresh process has written nothing to stdout
    monkeypatch.setattr(sys, "argv", ["nodulekit", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``run_cli(*args)``: ``cli_in_process`` bound to this test's monkeypatch and capsys."""
    return lambda *args: cli_in_process(monkeypatch, capsys, *args)


@pytest.fixture
def nodulekit_cli(monkeypatch, capsys):
    """``nodulekit_cli(*args)``: ``nodulekit ARGS`` in this process as a ``CompletedProcess``
    (returncode, stdout, stderr), for tests where a new process is not the point: a process start
    with torch's import costs ~3 CPU-seconds. (Some files import ``cli_in_process as cli``: another
    signature, hence another name.)"""

    def run(*args) -> subprocess.CompletedProcess:
        code, out, err = cli_in_process(monkeypatch, capsys, *args)
        return subprocess.CompletedProcess(["nodulekit", *map(str, args)], code, out, err)

    return run
