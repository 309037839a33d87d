"""Build the paper's multi-channel 32x32 datasets (Table 1) from a ``rois`` artifact.

The paper (section 4.1) crops a square ROI of side ``p x diameter`` around each
nodule's centre and resamples it to 32x32:

- ``D1C``: the centre slice, p = 2;
- ``D3C``: the centre slice three times, p = 2, 3, 4 (multi-scale);
- ``D11C`` / ``D21C``: 11 / 21 adjacent 1 mm slices symmetric about the centre, p = 2.

A ``rois`` artifact already holds every nodule's HU at 1 mm z steps (offsets -10..+10 mm,
index 10 = centre) on a square in-plane window of side >= 4.5 x diameter centred on the
nodule, so building a dataset is pure in-plane resampling plus fold assignment.

Library use::

    from nodulekit.datasets import build_dataset, load_dataset
    build_dataset("rois.h5", "d11c.h5", channels=11, n_folds=5, seed=0)
    ds = load_dataset("d11c.h5")
    train, test = ds.split_indices(0)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.constants import CHARACTERISTICS, INPUT_SIZE
from nodulekit.errors import ArtifactError, DataError, NodulekitError
from nodulekit.inputs import (  # noqa: F401 - the input spec's facts and sampling, re-exported for build's callers
    CHANNEL_CHOICES,
    HU_WINDOW,
    PLANES_MM,
    ChannelSpec,
    InputSpec,
    legacy_spec,
    normalise_hu,
    paper_spec,
    plane_layout,
    resample_levels,
    resample_nodule,
    sample_grid,
)
from nodulekit.train_config import check_seed

SPLITS = ("patient", "nodule")
PATCH = INPUT_SIZE  # output side in pixels (Table 1)
N_Z = len(PLANES_MM)  # slices in a rois sub-volume: offsets -10..+10 mm
CENTRE = PLANES_MM.index(0.0)  # index of the centre slice
NORMALISATION = {
    "hu_window": list(HU_WINDOW),
    "scale": "linear to [0, 1]: x = (clip(HU, -1000, 400) + 1000) / 1400",
    "order": "HU clipped to the window first, then resampled (linear) to 32x32",
    "interpolation": "linear (scipy.ndimage.map_coordinates order=1)",
    "mask": "the rois consensus mask resampled linearly on the same grid, kept where >= 0.5",
    "agreement": (
        "readers per pixel: for each j, the rois region agreement >= j resampled like the mask; "
        "mask = agreement >= consensus_min_readers, union = agreement >= 1"
    ),
}
SPLIT_NOTES = {
    "patient": "StratifiedGroupKFold: stratified by label, grouped by patient (no patient in two folds)",
    "nodule": (
        "StratifiedKFold over nodules, the paper's setting; LEAKY: nodules of one patient "
        "can be in both training and test folds"
    ),
}


def channel_layout(channels: int) -> list[ChannelSpec]:
    """The paper's channel layout for ``channels`` in {1, 3, 11, 21}, as plane indices of the rois window."""
    return plane_layout(paper_spec(channels))


def _spacing_yx(value: Any, nodule_id: str) -> tuple[float, float]:
    arr = np.atleast_1d(np.asarray(value, np.float64)).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise DataError(f"nodule {nodule_id}: invalid pixel_spacing_mm {value!r} in the rois file")
    return float(arr[0]), float(arr[1])


def assign_folds(
    y: np.ndarray,
    patient_id: np.ndarray,
    n_folds: int = 5,
    seed: int = 0,
    split: str = "patient",
) -> np.ndarray:
    """Test fold (0..n_folds-1) of each nodule, stratified by label.

    ``split="patient"`` groups by patient so no patient is in two folds (sklearn
    StratifiedGroupKFold); ``split="nodule"`` is the paper's leaky per-nodule
    StratifiedKFold. Both shuffle with ``seed``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    patient_id = np.asarray(patient_id)
    if split not in SPLITS:
        raise NodulekitError(f"--split must be 'patient' or 'nodule' (got {split!r})")
    if n_folds < 2:
        raise NodulekitError(f"--folds must be at least 2 (got {n_folds})")
    n = len(y)
    if n < n_folds:
        raise NodulekitError(f"only {n} nodules for {n_folds} folds; use fewer --folds or more data")
    for cls, name in ((0, "benign"), (1, "malignant")):
        count = int(np.sum(y == cls))
        if count < n_folds:
            raise NodulekitError(
                f"only {count} {name} nodules, fewer than the {n_folds} folds; use fewer --folds or more data"
            )
    if split == "patient":
        n_patients = len(np.unique(patient_id))
        if n_patients < n_folds:
            raise NodulekitError(
                f"only {n_patients} patients for {n_folds} patient-grouped folds; use fewer --folds or more data"
            )
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(n), y, groups=patient_id)
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(n), y)
    fold = np.full(n, -1, np.int64)
    for k, (_, test) in enumerate(parts):
        fold[test] = k
    assert np.all(fold >= 0), "every nodule must be in exactly one test fold"
    if split == "patient":
        for pid in np.unique(patient_id):
            assert len(np.unique(fold[patient_id == pid])) == 1, f"patient {pid} is in two folds"
    for k in range(n_folds):
        in_k = y[fold == k]
        if in_k.size == 0 or np.all(in_k == in_k[0]):
            raise NodulekitError(
                f"test fold {k} has {'no nodules' if in_k.size == 0 else 'only one class'} "
                f"with {n_folds} {split} folds; use fewer --folds (or another --seed)"
            )
    return fold


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rois_table(f) -> dict[str, Any]:
    """The validated per-nodule table (everything except the images) of an open ``rois`` file
    (its reader; :func:`nodulekit.artifacts.open_artifact` has checked the required members)."""
    from nodulekit.artifacts import read_strings

    path = f.filename
    label_rule = f.attrs.get("label_rule")
    if label_rule is None:
        raise ArtifactError(f"{path} has no label_rule attribute; re-run nodulekit extract")
    try:
        json.loads(label_rule)
    except (TypeError, ValueError):
        raise ArtifactError(f"{path}: its label_rule attribute is not valid JSON") from None
    nodule_id = np.asarray(read_strings(f["nodule_id"]), dtype=object)
    n = len(nodule_id)
    if n == 0:
        raise DataError(f"{path} holds no nodules")
    names = f["characteristics"].attrs.get("names")
    table: dict[str, Any] = {
        "label_rule": str(label_rule),
        "nodule_id": nodule_id,
        "patient_id": np.asarray(read_strings(f["patient_id"]), dtype=object),
        "y": np.asarray(f["label"][()]),
        "diameter_mm": np.asarray(f["diameter_mm"][()], np.float64),
        "characteristics": np.asarray(f["characteristics"][()], np.float32),
        "characteristic_names": [v.decode() if isinstance(v, bytes) else str(v) for v in names]
        if names is not None
        else list(CHARACTERISTICS),
        "reader_malignancy": np.asarray(f["reader_malignancy"][()], np.float32),
        "malignancy_mean": np.asarray(f["malignancy_mean"][()], np.float32),
        "series_uid": read_strings(f["series_uid"]) if "series_uid" in f else None,
        # Carried through when present: the reader-level tables feed the inter-reader study.
        "extras": {m: np.asarray(f[m][()]) for m in EXTRA_MEMBERS if m != "series_uid" and m in f},
    }
    shapes = {
        "patient_id": (n,),
        "y": (n,),
        "diameter_mm": (n,),
        "characteristics": (n, len(CHARACTERISTICS)),
        "reader_malignancy": (n, 4),
        "malignancy_mean": (n,),
    }
    for name, shape in shapes.items():
        if table[name].shape != shape:
            raise ArtifactError(f"{path}: {name} has shape {table[name].shape}, expected {shape}")
    if len(set(nodule_id.tolist())) != n:
        raise ArtifactError(f"{path}: nodule_id has duplicates")
    y, diameter = table["y"], table["diameter_mm"]
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}: nodule {nodule_id[i]} has label {y[i].item()}; "
            "a rois file must hold only labelled nodules (1 malignant, 0 benign)"
        )
    table["y"] = y.astype(np.int64)
    bad = ~(np.isfinite(diameter) & (diameter > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: nodule {nodule_id[i]} has invalid diameter_mm {diameter[i]}")
    return table


def replicated_border(hu: np.ndarray) -> tuple[int, int, int, int]:
    """The in-plane rectangle ``(row_first, row_last, col_first, col_last)`` (inclusive) left
    after removing edge-replicated border rows/columns of a [Z, H, W] window.

    extract fills the part of the window outside the source by copying the nearest source
    row/column, so the filled border consists of rows (columns) exactly equal to their
    neighbour in every slice, which real CT noise never produces.
    """
    hu = np.asarray(hu)
    row_diff = np.any(hu[:, 1:, :] != hu[:, :-1, :], axis=(0, 2))
    col_diff = np.any(hu[:, :, 1:] != hu[:, :, :-1], axis=(0, 1))
    h, w = hu.shape[1:]
    if not row_diff.any() or not col_diff.any():
        return 0, h - 1, 0, w - 1
    r0 = int(np.argmax(row_diff))
    r1 = h - 1 - int(np.argmax(row_diff[::-1]))
    c0 = int(np.argmax(col_diff))
    c1 = w - 1 - int(np.argmax(col_diff[::-1]))
    return r0, r1, c0, c1


def _inplane_filled_channels(coords: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """1 for each channel whose sample points reach more than half a pixel into the filled border."""
    r0, r1, c0, c1 = rect
    ys, xs = coords[1], coords[2]
    out_y = (ys.min(axis=(1, 2)) < r0 - 0.5) | (ys.max(axis=(1, 2)) > r1 + 0.5)
    out_x = (xs.min(axis=(1, 2)) < c0 - 0.5) | (xs.max(axis=(1, 2)) > c1 + 0.5)
    return (out_y | out_x).astype(np.uint8)


def _nodule_group(nodules, nid: str, path: str):
    """A rois nodule's group, checked: hu, mask and the readers' agreement, 21 slices 1 mm apart."""
    from nodulekit.artifacts import rois_group

    key = rois_group(nid)
    if key not in nodules:
        raise ArtifactError(f"{path}: group /nodules/{key} for nodule {nid} is missing")
    g = nodules[key]
    if "hu" not in g or "mask" not in g:
        raise ArtifactError(f"{path}: /nodules/{key} lacks hu or mask")
    if "agreement" not in g or "consensus_min_readers" not in g.attrs:
        raise ArtifactError(
            f"{path}: nodule {nid} has no readers' agreement map (a rois file from before the readers' "
            "consensus); re-run nodulekit extract"
        )
    if g["hu"].ndim != 3 or g["hu"].shape[0] != N_Z:
        raise DataError(f"nodule {nid}: hu has shape {g['hu'].shape}, expected [{N_Z}, S, S]")
    z_step = float(g.attrs.get("z_step_mm", 1.0))
    if abs(z_step - 1.0) > 1e-6:
        raise DataError(f"nodule {nid}: z_step_mm is {z_step}, the datasets need 1 mm slices")
    return g


def _centre_yx(g, nid: str) -> tuple[float, float] | None:
    """The nodule centre in window pixels (attr ``centre_in_window``), or None when not recorded."""
    centre = g.attrs.get("centre_in_window")
    if centre is None:
        return None
    centre = np.asarray(centre, np.float64).ravel()
    if centre.shape != (2,) or not np.all(np.isfinite(centre)):
        raise DataError(f"nodule {nid}: invalid centre_in_window {g.attrs['centre_in_window']!r}")
    return float(centre[0]), float(centre[1])


def _resample_group(g, nid: str, diameter: float, layout: list[ChannelSpec], path: str) -> dict[str, Any]:
    """One rois nodule on the dataset grid: x, mask, agreement, pixel_mm and its fill flags."""
    spacing = _spacing_yx(g.attrs.get("pixel_spacing_mm"), nid)
    centre_yx = _centre_yx(g, nid)
    z_lo, z_hi = min(s.z_index for s in layout), max(s.z_index for s in layout) + 1
    # Read only the slices this layout uses (one for D1C/D3C).
    hu, m, agree = g["hu"][z_lo:z_hi], g["mask"][z_lo:z_hi], g["agreement"][z_lo:z_hi]
    min_readers = int(g.attrs["consensus_min_readers"])
    if agree.shape != m.shape or not np.array_equal(m > 0, agree >= min_readers):
        raise ArtifactError(f"{path}: nodule {nid}: mask is not agreement >= {min_readers}; a corrupt rois file")
    out: dict[str, Any] = {"min_readers": min_readers, "undetermined": False}
    # The training data's ranges (model description): source spacing and the HU at the centre.
    out["pixel_spacing_mm"] = min(spacing)
    out["slice_spacing_mm"] = float(g.attrs.get("source_slice_spacing_mm", np.nan))
    s = g["hu"].shape[1] // 2
    out["centre_hu"] = float(g["hu"][CENTRE, s, s])
    out["x"], out["mask"], out["pixel_mm"] = resample_nodule(
        hu, m, spacing, diameter, layout, nid, z_first=z_lo, centre_yx=centre_yx
    )
    coords, _ = sample_grid(hu.shape[1:], spacing, layout, diameter, nid, centre_yx)
    coords[0] -= z_lo
    out["agreement"] = resample_levels(agree, coords)
    # Channels whose slice lay outside the source (edge-replicated by extract) are flagged,
    # so a tight-in-z VOI's D21C is not mistaken for 21 real slices.
    offsets = np.array([s.z_offset_mm for s in layout], np.float64)
    z_filled = g.attrs.get("z_filled_offsets_mm")
    out["filled"] = np.zeros(len(layout), np.uint8)
    if z_filled is not None and np.size(z_filled):
        out["filled"] = np.isin(offsets, np.round(np.asarray(z_filled, np.float64).ravel())).astype(np.uint8)
    # In-plane fill: only where extract says it filled pixels; the detected border must
    # account for exactly that many pixels, otherwise the flags are left unknown (0).
    out["inplane"] = np.zeros(len(layout), np.uint8)
    n_filled = int(g.attrs.get("inplane_filled", 0))
    if n_filled > 0:
        rect = replicated_border(hu)
        h, w = hu.shape[1:]
        if h * w - (rect[1] - rect[0] + 1) * (rect[3] - rect[2] + 1) == n_filled:
            coords, _ = sample_grid((h, w), spacing, layout, diameter, nid, centre_yx)
            out["inplane"] = _inplane_filled_channels(coords, rect)
        else:
            out["undetermined"] = True
    return out


def _resample_all(f, nodule_id, diameter, layout: list[ChannelSpec], progress: bool) -> dict[str, Any]:
    """Resample every nodule of an open rois file: x [N,C,32,32], mask, agreement, pixel_mm [N,C],
    the consensus' minimum reader count [N] and the per-channel fill flags."""
    from tqdm import tqdm

    n, c = len(nodule_id), len(layout)
    out: dict[str, Any] = {
        "x": np.empty((n, c, PATCH, PATCH), np.float32),
        "mask": np.empty((n, c, PATCH, PATCH), np.uint8),
        "agreement": np.empty((n, c, PATCH, PATCH), np.uint8),
        "min_readers": np.empty(n, np.int64),
        "pixel_mm": np.empty((n, c), np.float32),
        "filled": np.zeros((n, c), np.uint8),
        "inplane": np.zeros((n, c), np.uint8),
        "pixel_spacing_mm": np.empty(n, np.float32),
        "slice_spacing_mm": np.empty(n, np.float32),
        "centre_hu": np.empty(n, np.float32),
    }
    undetermined: list[str] = []
    for i in tqdm(range(n), desc="build", unit="nodule", disable=not progress):
        g = _nodule_group(f["nodules"], nodule_id[i], f.filename)
        one = _resample_group(g, nodule_id[i], float(diameter[i]), layout, f.filename)
        for name, array in out.items():
            array[i] = one[name]
        if one["undetermined"]:
            undetermined.append(nodule_id[i])
    return {**out, "undetermined": undetermined}


def dataset_name(channels: int) -> str:
    return f"D{channels}C"


def _check_build_options(channels: int, n_folds: int, split: str) -> InputSpec:
    spec = paper_spec(channels)
    if split not in SPLITS:
        raise NodulekitError(f"--split must be 'patient' or 'nodule' (got {split!r})")
    if n_folds < 2:
        raise NodulekitError(f"--folds must be at least 2 (got {n_folds})")
    return spec


def _dataset_attrs(channels, n_folds, split, seed, spec: InputSpec, table, consensus, rois_path, rois_source) -> dict:
    """The attributes of a dataset built from a rois file (see :class:`Dataset`)."""
    attrs = {
        "name": dataset_name(channels),
        "channels": channels,
        "n_folds": n_folds,
        "split": split,
        "split_note": SPLIT_NOTES[split],
        "seed": seed,
        "label_rule": json.loads(table["label_rule"]),
        "normalisation": NORMALISATION,
        "consensus_level": float(consensus["consensus_level"]),
        "consensus_definition": str(consensus["consensus_definition"]),
        "channel_layout": [{"z_offset_mm": int(c.z_offset_mm), "p": c.p} for c in spec.channels],
        "input_spec": spec.as_dict(),
        "source": str(rois_path),
        "characteristic_names": table["characteristic_names"],
    }
    if rois_source is not None:
        attrs["rois_source"] = str(rois_source)
    return attrs


def _built_dataset(table: dict, images: dict, fold: np.ndarray, attrs: dict) -> Dataset:
    """The :class:`Dataset` of the rois table and its resampled images."""
    extras = dict(table["extras"])
    extras.update({name: images[name] for name in RANGE_MEMBERS})
    if table["series_uid"] is not None:
        extras["series_uid"] = np.asarray(table["series_uid"], dtype=object)
    return Dataset(
        x=images["x"],
        y=table["y"],
        fold=fold,
        patient_id=table["patient_id"],
        nodule_id=table["nodule_id"],
        mask=images["mask"],
        pixel_mm=images["pixel_mm"],
        characteristics=table["characteristics"],
        reader_malignancy=table["reader_malignancy"],
        malignancy_mean=table["malignancy_mean"],
        diameter_mm=table["diameter_mm"].astype(np.float32),
        attrs=attrs,
        filled_channels=images["filled"],
        inplane_filled_channels=images["inplane"],
        extras=extras,
        agreement=images["agreement"],
        consensus_min_readers=images["min_readers"],
    )


def build_dataset(
    rois_path: str | os.PathLike,
    out_path: str | os.PathLike,
    channels: int = 11,
    n_folds: int = 5,
    seed: int = 0,
    split: str = "patient",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the ``dataset`` artifact ``D<channels>C`` built from the ``rois`` artifact."""
    from nodulekit.artifacts import check_output_path, get_provenance, open_artifact, provenance

    spec = _check_build_options(channels, n_folds, split)
    check_seed(seed)
    layout = plane_layout(spec)
    rois_path = Path(rois_path)
    check_output_path(out_path, overwrite)  # fail before the slow part
    if Path(out_path).resolve() == rois_path.resolve():
        raise NodulekitError(f"the output {out_path} would overwrite the input rois file")

    with open_artifact(rois_path, "rois") as f:
        rois_prov = get_provenance(f)
        rois_source = f.attrs.get("source")
        if "consensus_level" not in f.attrs:
            raise ArtifactError(
                f"{rois_path} has no readers' consensus (made before consensus masks); re-run nodulekit extract"
            )
        consensus = {k: _attr(f, k, rois_path) for k in ("consensus_level", "consensus_definition")}
        table = read_rois_table(f)
        # Folds need only labels and patients: refuse an impossible split before the slow part.
        fold = assign_folds(table["y"], table["patient_id"], n_folds, seed, split)
        images = _resample_all(f, table["nodule_id"], table["diameter_mm"], layout, progress)
    attrs = _dataset_attrs(channels, n_folds, split, seed, spec, table, consensus, rois_path, rois_source)
    ds = _built_dataset(table, images, fold, attrs)
    prov = provenance(
        stage="build",
        name=attrs["name"],
        channels=channels,
        n_folds=n_folds,
        split=split,
        seed=seed,
        source=str(rois_path),
        source_sha256=_file_sha256(rois_path),
        source_kind="rois",
        source_provenance=rois_prov,
        label_rule=attrs["label_rule"],
        normalisation=NORMALISATION,
        **consensus,
        channel_layout=attrs["channel_layout"],
        input_spec=attrs["input_spec"],
        inplane_fill_undetermined=images["undetermined"],
    )
    return write_dataset(out_path, ds, prov, overwrite=overwrite)


# Optional per-nodule members a dataset carries through from its rois file (the reader-level
# tables feed the inter-reader study), and the string-valued ones among them.
# The per-nodule source spacing and centre HU give the training data's ranges (model description).
RANGE_MEMBERS = ("pixel_spacing_mm", "slice_spacing_mm", "centre_hu")
EXTRA_MEMBERS = (
    "series_uid",
    "cluster_index",
    "n_readers",
    "reader_characteristics",
    "reader_mean_diameter_mm",
    *RANGE_MEMBERS,
)
STRING_MEMBERS = ("patient_id", "nodule_id", "series_uid")
FILL_MEANINGS = {
    "filled_channels": (
        "1 where the channel's slice lay outside the source scan/VOI and was edge-replicated by extract"
    ),
    "inplane_filled_channels": (
        "1 where the channel's square ROI reaches into the in-plane border that extract filled "
        "by edge replication (source crop smaller than the ROI)"
    ),
}
# Dataset attributes: plain values, and those stored as JSON strings.
PLAIN_ATTRS = (
    "name",
    "channels",
    "n_folds",
    "split",
    "split_note",
    "seed",
    "source",
    "rois_source",
    "consensus_level",
    "consensus_definition",
)
JSON_ATTRS = ("label_rule", "normalisation", "channel_layout", "input_spec")
REQUIRED_ATTRS = ("channels", "n_folds", "split", "seed", "name", "label_rule", "normalisation")


@dataclass
class Dataset:
    """A ``dataset`` artifact in memory (numpy arrays; row i is one nodule).

    :func:`write_dataset` and :func:`load_dataset` are its one writer and one reader.
    """

    x: np.ndarray  # float32 [N, C, 32, 32] in [0, 1]
    y: np.ndarray  # int64 [N], 1 malignant / 0 benign
    fold: np.ndarray  # int64 [N], test fold 0..n_folds-1
    patient_id: np.ndarray  # str (object) [N]
    nodule_id: np.ndarray  # str (object) [N]
    mask: np.ndarray  # uint8 [N, C, 32, 32]
    pixel_mm: np.ndarray  # float32 [N, C]
    characteristics: np.ndarray  # float32 [N, 8]; names in attrs["characteristic_names"]
    reader_malignancy: np.ndarray  # float32 [N, 4], NaN padded
    malignancy_mean: np.ndarray  # float32 [N]
    diameter_mm: np.ndarray  # float32 [N]
    # name, channels, n_folds, split, seed, label_rule, normalisation (required), split_note,
    # channel_layout, source, rois_source (optional), characteristic_names, provenance (read back)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # uint8 [N, C]: 1 where the channel's slice was edge-replicated by extract (None if not recorded)
    filled_channels: np.ndarray | None = None
    # uint8 [N, C]: 1 where the channel's ROI reaches into an edge-replicated in-plane border
    inplane_filled_channels: np.ndarray | None = None
    # EXTRA_MEMBERS present in the file (series_uid, cluster_index, n_readers, reader_characteristics)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # uint8 [N, C, 32, 32]: readers marking each pixel (mask = agreement >= consensus_min_readers);
    # None in files built before consensus masks
    agreement: np.ndarray | None = None
    consensus_min_readers: np.ndarray | None = None  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_folds(self) -> int:
        return int(self.attrs["n_folds"])

    @property
    def name(self) -> str:
        return str(self.attrs["name"])

    @property
    def split(self) -> str:
        return str(self.attrs.get("split", "unknown"))

    @property
    def label_rule(self) -> Any:
        return self.attrs.get("label_rule")

    @property
    def normalisation(self) -> Any:
        return self.attrs.get("normalisation")

    @cached_property
    def input_spec(self) -> InputSpec | None:
        """How ``x`` was made (:class:`nodulekit.inputs.InputSpec`): the stored spec, or for a file
        written before specs were stored, the one its channel layout and normalisation imply."""
        if self.attrs.get("input_spec") is not None:
            return InputSpec.from_dict(self.attrs["input_spec"], str(self.path or "dataset"))
        return legacy_spec(self.channels, self.attrs.get("channel_layout"), self.normalisation)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """:func:`dataset_identity` of this dataset (computed once)."""
        return dataset_identity(self)

    @property
    def fingerprint(self) -> str:
        """:func:`dataset_fingerprint` of this dataset."""
        return self.identity["fingerprint"]

    def split_indices(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, test rows) for test fold ``k``."""
        if not 0 <= k < self.n_folds:
            raise NodulekitError(f"fold {k} does not exist; this dataset has folds 0..{self.n_folds - 1}")
        return np.flatnonzero(self.fold != k), np.flatnonzero(self.fold == k)


def write_dataset(path: str | os.PathLike, ds: Dataset, prov: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``ds`` as a ``dataset`` artifact (atomic; the one writer of the layout)."""
    from nodulekit.artifacts import set_json_attr, write_artifact, write_strings

    with write_artifact(path, "dataset", prov, overwrite=overwrite) as out:
        out.create_dataset("x", data=np.asarray(ds.x, np.float32))
        out["y"] = np.asarray(ds.y, np.int64)
        out["fold"] = np.asarray(ds.fold, np.int64)
        write_strings(out, "patient_id", ds.patient_id)
        write_strings(out, "nodule_id", ds.nodule_id)
        out.create_dataset("mask", data=np.asarray(ds.mask, np.uint8), compression="gzip", compression_opts=4)
        if ds.agreement is not None:
            out["mask"].attrs["meaning"] = (
                f"the readers' consensus at level {ds.attrs.get('consensus_level')}: agreement >= consensus_min_readers"
            )
            out.create_dataset(
                "agreement", data=np.asarray(ds.agreement, np.uint8), compression="gzip", compression_opts=4
            )
            out["agreement"].attrs["meaning"] = "readers marking the pixel; " + NORMALISATION["agreement"]
            out["consensus_min_readers"] = np.asarray(ds.consensus_min_readers, np.int64)
        out["pixel_mm"] = np.asarray(ds.pixel_mm, np.float32)
        for name, meaning in FILL_MEANINGS.items():
            if getattr(ds, name) is not None:
                out[name] = np.asarray(getattr(ds, name), np.uint8)
                out[name].attrs["meaning"] = meaning
        out["characteristics"] = np.asarray(ds.characteristics, np.float32)
        out["characteristics"].attrs["names"] = list(ds.attrs.get("characteristic_names", CHARACTERISTICS))
        out["reader_malignancy"] = np.asarray(ds.reader_malignancy, np.float32)
        out["malignancy_mean"] = np.asarray(ds.malignancy_mean, np.float32)
        out["diameter_mm"] = np.asarray(ds.diameter_mm, np.float32)
        for name, value in ds.extras.items():
            if name in STRING_MEMBERS:
                write_strings(out, name, value)
            else:
                out[name] = value
        for name in PLAIN_ATTRS:
            if ds.attrs.get(name) is not None:
                out.attrs[name] = ds.attrs[name]
        for name in JSON_ATTRS:
            if ds.attrs.get(name) is not None:
                set_json_attr(out, name, ds.attrs[name])
    return Path(path)


def _attr(f, name: str, path: Path) -> Any:
    if name not in f.attrs:
        raise ArtifactError(f"{path} is a malformed dataset artifact: attribute {name!r} is missing")
    value = f.attrs[name]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _read_attrs(f, path: Path) -> dict[str, Any]:
    """The dataset's attributes (JSON ones decoded), its characteristic names and provenance."""
    from nodulekit.artifacts import get_provenance

    attrs: dict[str, Any] = {}
    for name in PLAIN_ATTRS + JSON_ATTRS:
        if name not in REQUIRED_ATTRS and name not in f.attrs:
            continue
        attrs[name] = _attr(f, name, path)
        if name in JSON_ATTRS:
            try:
                attrs[name] = json.loads(attrs[name])
            except (TypeError, ValueError):
                raise ArtifactError(f"{path}: attribute {name!r} is not valid JSON") from None
    names = f["characteristics"].attrs.get("names")
    attrs["characteristic_names"] = (
        [v.decode() if isinstance(v, bytes) else str(v) for v in names] if names is not None else list(CHARACTERISTICS)
    )
    attrs["provenance"] = get_provenance(f)
    return attrs


def _read_members(f) -> dict[str, Any]:
    """Every per-nodule member of an open dataset file, with the dtypes of :class:`Dataset`."""
    from nodulekit.artifacts import read_strings

    dtypes = {
        "x": np.float32,
        "y": None,  # checked to be 0/1 before it is cast
        "fold": np.int64,
        "mask": np.uint8,
        "pixel_mm": np.float32,
        "characteristics": np.float32,
        "reader_malignancy": np.float32,
        "malignancy_mean": np.float32,
        "diameter_mm": np.float32,
        "filled_channels": np.uint8,
        "inplane_filled_channels": np.uint8,
        "agreement": np.uint8,
        "consensus_min_readers": np.int64,
    }
    out: dict[str, Any] = {
        name: np.asarray(f[name][()]) if dtype is None else np.asarray(f[name][()]).astype(dtype, copy=False)
        for name, dtype in dtypes.items()
        if name in f
    }
    for name in ("patient_id", "nodule_id"):
        out[name] = np.asarray(read_strings(f[name]), dtype=object)
    out["extras"] = {
        name: np.asarray(read_strings(f[name]), dtype=object) if name in STRING_MEMBERS else np.asarray(f[name][()])
        for name in EXTRA_MEMBERS
        if name in f
    }
    return out


def _validate(m: dict[str, Any], attrs: dict[str, Any], path: Path) -> None:
    """Shapes, labels, folds and ids of a dataset's members agree; else a one-line ArtifactError."""
    x = m["x"]
    if x.ndim != 4 or x.shape[2:] != (PATCH, PATCH):
        raise ArtifactError(f"{path}: x has shape {x.shape}, expected [N, C, {PATCH}, {PATCH}]")
    n, c = x.shape[:2]
    if n == 0:
        raise ArtifactError(f"{path}: the dataset holds no nodules")
    expected = {
        "y": (n,),
        "fold": (n,),
        "patient_id": (n,),
        "nodule_id": (n,),
        "mask": x.shape,
        "pixel_mm": (n, c),
        "characteristics": (n, len(CHARACTERISTICS)),
        "reader_malignancy": (n, 4),
        "malignancy_mean": (n,),
        "diameter_mm": (n,),
    }
    for name, shape in expected.items():
        if m[name].shape != shape:
            raise ArtifactError(f"{path}: {name} has shape {m[name].shape}, expected {shape} to match x {x.shape}")
    optional = {**dict.fromkeys(FILL_MEANINGS, (n, c)), "agreement": x.shape, "consensus_min_readers": (n,)}
    for name, shape in optional.items():
        if name in m and m[name].shape != shape:
            raise ArtifactError(f"{path}: {name} has shape {m[name].shape}, expected {shape}")
    if int(attrs["channels"]) != c:
        raise ArtifactError(f"{path}: attribute channels={attrs['channels']} but x has {c} channels")
    if not np.all(np.isfinite(x)):
        raise ArtifactError(f"{path}: x holds {int(np.sum(~np.isfinite(x)))} non-finite values")
    y, fold, n_folds = m["y"], m["fold"], int(attrs["n_folds"])
    if not np.all(np.isin(y, (0, 1))):
        raise ArtifactError(f"{path}: y holds values other than 0 and 1: {sorted(set(np.unique(y).tolist()) - {0, 1})}")
    if n_folds < 1 or fold.min() < 0 or fold.max() >= n_folds:
        raise ArtifactError(f"{path}: fold values {fold.min()}..{fold.max()} are outside 0..{n_folds - 1}")
    if len(set(m["nodule_id"].tolist())) != n:
        raise ArtifactError(f"{path}: nodule_id has duplicates")


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read and validate a ``dataset`` artifact (the one reader); any inconsistency is a
    one-line ArtifactError."""
    from nodulekit.artifacts import open_artifact

    path = Path(path)
    with open_artifact(path, "dataset") as f:
        members = _read_members(f)
        attrs = _read_attrs(f, path)
    _validate(members, attrs, path)
    members["y"] = members["y"].astype(np.int64)
    return Dataset(
        **{k: members[k] for k in members if k not in ("filled_channels", "inplane_filled_channels")},
        attrs=attrs,
        path=path,
        filled_channels=members.get("filled_channels"),
        inplane_filled_channels=members.get("inplane_filled_channels"),
    )


IDENTITY_FORMAT = 1


def _sha16(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def dataset_identity(ds: Dataset) -> dict[str, Any]:
    """What makes a dataset the one a model was trained and tested on, as a JSON-able record.

    ``content``: sha256 of x (float32) and y (int64); ``mask``: of the consensus masks;
    ``folds``: of the fold assignment (int64), which ``split``, ``seed`` and ``n_folds``
    produced; ``fingerprint``: of all of these together. Runs, checkpoints, fold results,
    maps and ONNX exports record it; :func:`identity_difference` names what differs.
    """
    fields = {
        "content": _sha16(np.asarray(ds.x, np.float32), np.asarray(ds.y, np.int64)),
        "mask": _sha16(np.asarray(ds.mask, np.uint8)),
        "folds": _sha16(np.asarray(ds.fold, np.int64)),
        "split": str(ds.attrs.get("split", "unknown")),
        "seed": int(ds.attrs["seed"]) if ds.attrs.get("seed") is not None else None,
        "n_folds": int(ds.attrs["n_folds"]),
    }
    fingerprint = hashlib.sha256(json.dumps({"format": IDENTITY_FORMAT, **fields}, sort_keys=True).encode())
    return {"fingerprint": fingerprint.hexdigest()[:16], "format": IDENTITY_FORMAT, "n": len(ds.y), **fields}


def dataset_fingerprint(ds: Dataset) -> str:
    """16 hex chars covering images, labels, masks and the fold assignment (split, seed,
    folds): the ``fingerprint`` of :func:`dataset_identity`."""
    return dataset_identity(ds)["fingerprint"]


def _split_text(identity: dict[str, Any]) -> str:
    return f"{identity.get('split')}/seed {identity.get('seed')}, {identity.get('n_folds')} folds"


def identity_difference(recorded: dict[str, Any] | None, found: Dataset | dict[str, Any]) -> str | None:
    """What differs between a recorded dataset identity and a dataset (or its identity), in
    one line, or None when it is the same dataset.

    A missing record (from before fold assignments were part of a dataset's identity) is a
    difference too: what it was trained on cannot be checked.
    """
    found = found if isinstance(found, dict) else dataset_identity(found)
    if not isinstance(recorded, dict) or "fingerprint" not in recorded:
        return "it records no dataset identity (made before fold assignments were part of it), so its folds cannot be checked"
    if recorded.get("fingerprint") == found["fingerprint"]:
        return None
    if recorded.get("content") != found["content"]:
        return (
            f"images or labels differ: dataset content {found['content']} ({found['n']} nodules), "
            f"trained on {recorded.get('content')} ({recorded.get('n')} nodules)"
        )
    if recorded.get("mask") != found["mask"]:
        return f"consensus masks differ: dataset masks {found['mask']}, trained on {recorded.get('mask')}"
    if any(recorded.get(k) != found[k] for k in ("split", "seed", "n_folds")):
        return f"fold assignment differs: dataset split {_split_text(found)}, trained on {_split_text(recorded)}"
    if recorded.get("folds") != found["folds"]:
        return (
            f"fold assignment differs: same split {_split_text(found)} but other folds "
            f"(dataset {found['folds']}, trained on {recorded.get('folds')})"
        )
    return f"dataset fingerprint {found['fingerprint']} differs from the recorded {recorded.get('fingerprint')}"


def check_identity(
    recorded: dict[str, Any] | None,
    ds: Dataset,
    owner: str,
    path: str | os.PathLike | None = None,
    remedy: str = "re-train it with this version",
) -> None:
    """Refuse, in one line, a dataset that is not the one ``owner`` (a RUNDIR, a checkpoint,
    a maps or ONNX file) records; ``remedy`` is appended when nothing is recorded."""
    diff = identity_difference(recorded, ds)
    if diff is None:
        return
    if not isinstance(recorded, dict) or "fingerprint" not in recorded:
        raise NodulekitError(f"{owner}: {diff}; {remedy}")
    raise NodulekitError(f"{path or ds.path} is not the dataset of {owner}: {diff}")
