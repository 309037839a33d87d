"""The HDF5 artifact kinds nodulekit writes and reads, in one place.

Every artifact is one HDF5 file whose root attributes say what it is
(``nodulekit_kind``, ``schema_version``) and how it was made (``provenance``: a JSON
string with the command line, nodulekit version, creation time, and whatever the stage
adds: label rule, source, seed, ...). Files are written to a temporary name in the
same folder and renamed into place only when complete, so a crashed or interrupted
run never leaves a half-written file under the final name (``nodulekit.outputs``:
links written through, streams refused, a full disk reported in one line).

Kinds and their required members (datasets ``/name``, groups ``/name/``):

- ``cohort``: per-nodule table of annotations (also written as CSV).
- ``rois``: per-nodule HU sub-volumes resampled to 1 mm in z, consensus masks, metadata.
- ``dataset``: ``x`` [N,C,32,32] float32, ``y`` [N], ``fold`` [N], ``patient_id``, ``nodule_id``.
- ``fold_result``: one trained fold's per-epoch history and test-set probabilities.
- ``maps``: activation maps per nodule (from ``maps`` or ``infer``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nodulekit import __version__
from nodulekit.constants import INPUT_SIZE
from nodulekit.errors import ArtifactError, NodulekitError
from nodulekit.outputs import atomic_path, check_output_path, hdf5_file  # noqa: F401 - re-exported

# Bump a kind's version when its layout changes incompatibly.
KINDS: dict[str, int] = {
    "cohort": 1,
    "rois": 1,
    "dataset": 1,
    "fold_result": 1,
    "maps": 1,
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "cohort": ("nodule_id",),
    "rois": (
        "nodule_id",
        "patient_id",
        "label",
        "diameter_mm",
        "characteristics",
        "reader_malignancy",
        "malignancy_mean",
        "nodules",
    ),
    "dataset": (
        "x",
        "y",
        "fold",
        "patient_id",
        "nodule_id",
        "mask",
        "pixel_mm",
        "characteristics",
        "reader_malignancy",
        "malignancy_mean",
        "diameter_mm",
    ),
    "fold_result": ("history", "test_index", "test_prob", "test_y", "test_nodule_id"),
    "maps": ("nodule_id", "maps", "maps_up", "prob", "y", "fold"),
}

STR = h5py.string_dtype(encoding="utf-8")


def rois_group(nodule_id: str) -> str:
    """The name of a nodule's group under ``/nodules`` in a ``rois`` artifact."""
    return str(nodule_id).replace(":", "_")


def provenance(**extra: Any) -> dict[str, Any]:
    """The standard provenance record, plus stage-specific fields."""
    record = {
        "command": " ".join(sys.argv),
        "nodulekit_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    record.update(extra)
    return record


@contextmanager
def write_artifact(
    path: str | os.PathLike,
    kind: str,
    prov: dict[str, Any],
    overwrite: bool = False,
) -> Iterator[h5py.File]:
    """Open a new artifact of ``kind`` for writing; it appears at ``path`` only when complete."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    path = check_output_path(path, overwrite)
    with atomic_path(path, suffix=".h5.part", overwrite=overwrite) as tmp:
        with hdf5_file(tmp) as f:
            f.attrs["nodulekit_kind"] = kind
            f.attrs["schema_version"] = KINDS[kind]
            f.attrs["provenance"] = json.dumps(prov, default=str)
            yield f
            missing = [m for m in REQUIRED[kind] if m not in f]
            if missing:
                raise ArtifactError(f"internal: {kind} artifact lacks {', '.join(missing)}")


def unreadable(path: str | os.PathLike, exc: BaseException) -> ArtifactError:
    """The one-line error for an HDF5 file the library cannot read (h5py's own names no file)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    why = "truncated (an interrupted copy or write?)" if "truncated file" in first else f"corrupt ({first})"
    return ArtifactError(f"{path} is not a readable HDF5 file: {why}")


class ArtifactFile(h5py.File):
    """An artifact open for reading: an error while reading it names the file (ArtifactError)."""

    def __init__(self, path: str | os.PathLike):
        try:
            super().__init__(path, "r")
        except OSError as exc:
            raise unreadable(path, exc) from None
        self.artifact_path = Path(path)

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, NodulekitError):
            raise unreadable(self.artifact_path, exc) from None


def read_kind(path: str | os.PathLike) -> str:
    """The kind of an artifact, or an ArtifactError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not an artifact file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not is_hdf5:
        raise ArtifactError(f"{path} is not an HDF5 file")
    with ArtifactFile(path) as f:
        kind = f.attrs.get("nodulekit_kind")
    if kind is None:
        raise ArtifactError(f"{path} is not a nodulekit artifact (no nodulekit_kind attribute)")
    return str(kind)


def open_artifact(path: str | os.PathLike, kind: str | tuple[str, ...]) -> ArtifactFile:
    """Open an artifact read-only after checking its kind, schema version and members.

    Use it in a ``with`` block: a read error inside the block becomes an ArtifactError naming the file.
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    found = read_kind(path)
    if found not in kinds:
        raise ArtifactError(f"{path} is a {found!r} artifact, expected {' or '.join(map(repr, kinds))}")
    f = ArtifactFile(path)
    version = int(f.attrs.get("schema_version", -1))
    if version != KINDS[found]:
        f.close()
        raise ArtifactError(f"{path} has {found} schema version {version}; this nodulekit reads version {KINDS[found]}")
    missing = [m for m in REQUIRED[found] if m not in f]
    if missing:
        f.close()
        raise ArtifactError(f"{path} is a malformed {found} artifact: missing {', '.join(missing)}")
    return f


def get_provenance(f: h5py.File) -> dict[str, Any]:
    return json.loads(f.attrs.get("provenance", "{}"))


def write_strings(group: h5py.Group, name: str, values) -> h5py.Dataset:
    return group.create_dataset(name, data=np.asarray([str(v) for v in values], dtype=object), dtype=STR)


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def set_json_attr(obj: h5py.HLObject, name: str, value: Any) -> None:
    obj.attrs[name] = json.dumps(value, default=str)


def get_json_attr(obj: h5py.HLObject, name: str, default: Any = None) -> Any:
    raw = obj.attrs.get(name)
    return default if raw is None else json.loads(raw)


def write_maps(
    path: str | os.PathLike,
    *,
    nodule_id,
    maps: np.ndarray,
    prob: np.ndarray,
    method: str,
    arch: str,
    source: str,
    prov: dict[str, Any],
    y: np.ndarray | None = None,
    fold: np.ndarray | None = None,
    maps_up: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
    overwrite: bool = False,
    dataset_identity: dict[str, Any] | None = None,
) -> Path:
    """Write a ``maps`` artifact (shared by ``nodulekit maps`` and ``nodulekit infer``).

    Non-finite maps or probabilities (a diverged model) are refused before anything is written.
    ``dataset_identity``: that of the dataset the maps were computed on, so ``scores`` and
    ``figures`` refuse another one.
    """
    import torch
    import torch.nn.functional as F

    maps = np.asarray(maps, np.float32)
    check_finite_maps(path, maps=maps, prob=prob, maps_up=maps_up)
    n = maps.shape[0]
    if maps_up is None:
        maps_up = F.interpolate(
            torch.from_numpy(maps), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
        ).numpy()
    with write_artifact(path, "maps", prov, overwrite=overwrite) as f:
        write_strings(f, "nodule_id", nodule_id)
        f.create_dataset("maps", data=maps, compression="gzip", compression_opts=4)
        f.create_dataset("maps_up", data=np.asarray(maps_up, np.float32), compression="gzip", compression_opts=4)
        f["prob"] = np.asarray(prob, np.float32)
        f["y"] = np.full(n, -1, np.int64) if y is None else np.asarray(y, np.int64)
        f["fold"] = np.full(n, -1, np.int64) if fold is None else np.asarray(fold, np.int64)
        for name, value in (extra or {}).items():
            f.create_dataset(name, data=value)
        f.attrs["method"] = method
        f.attrs["arch"] = arch
        f.attrs["source"] = source
        if dataset_identity is not None:
            set_json_attr(f, "dataset_identity", dataset_identity)
    return Path(path)


@dataclass
class MapsArtifact:
    """A ``maps`` artifact in memory (row i is one nodule); see :func:`write_maps`."""

    path: Path
    nodule_id: list[str]
    maps: np.ndarray  # [N, classes, h, w] on the model's feature grid
    maps_up: np.ndarray  # [N, classes, 32, 32] bilinear on the input grid
    prob: np.ndarray  # [N] malignant probability
    y: np.ndarray  # [N] label, -1 unknown
    fold: np.ndarray  # [N] model fold, -1 unknown
    method: str
    arch: str
    source: str
    # optional members present in the file: logits, slice_maps, slice_prob, dataset_fold, ...
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    dataset_identity: dict[str, Any] | None = (
        None  # of the dataset the maps were computed on (scores.check_maps_dataset)
    )


def check_finite_maps(path: str | os.PathLike, **arrays) -> None:
    """Refuse maps or probabilities holding NaN or inf: they come from a failed (diverged) model."""
    for name, value in arrays.items():
        if value is None:
            continue
        bad = int(np.size(value) - np.isfinite(np.asarray(value, np.float64)).sum())
        if bad:
            raise ArtifactError(
                f"{path}: {name} holds {bad} NaN or infinite value(s); the model that made them failed "
                "(diverged?), so there is nothing to score; retrain it"
            )


def read_maps(path: str | os.PathLike) -> MapsArtifact:
    """Read a ``maps`` artifact (the one reader; :func:`write_maps` is the writer).

    Maps or probabilities that are not finite are refused in one line naming the file.
    """
    core = ("nodule_id", "maps", "maps_up", "prob", "y", "fold")
    with open_artifact(path, "maps") as f:
        out = MapsArtifact(
            path=Path(path),
            nodule_id=read_strings(f["nodule_id"]),
            maps=f["maps"][()],
            maps_up=f["maps_up"][()],
            prob=f["prob"][()],
            y=f["y"][()],
            fold=f["fold"][()],
            method=str(f.attrs.get("method", Path(path).stem)),
            arch=str(f.attrs.get("arch", "")),
            source=str(f.attrs.get("source", "")),
            extra={name: f[name][()] for name in f if name not in core and isinstance(f[name], h5py.Dataset)},
            provenance=get_provenance(f),
            dataset_identity=get_json_attr(f, "dataset_identity"),
        )
    check_finite_maps(path, maps=out.maps, maps_up=out.maps_up, prob=out.prob)
    return out
