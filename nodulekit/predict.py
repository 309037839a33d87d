"""``nodulekit predict``: a trained model on a user's own chest CT, one result per nodule.

The scan is read once (:mod:`nodulekit.scans`). Each nodule is given by a centre and a
diameter, or by its voxels in a label image, and its model input is built by the function
that built the training inputs (:func:`nodulekit.inputs.model_input`, with the input spec
the model file records). A nodule of LIDC-IDRI therefore gets the same input, and the same
probability, as through ``extract -> build -> infer``.

Every request is checked before the model runs and before anything is written: a bad
centre, diameter, mask, CSV or model is one :class:`NodulekitError` line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.errors import DataError, NodulekitError

# The crop is 2 d wide: below 1 mm its 32 x 32 pixels interpolate one or two CT voxels, no image
# of a nodule. LIDC's readers outlined nodules of 3 mm and more: smaller ones get a warning
# (nodulekit.plausibility).
MIN_DIAMETER_MM = 1.0
MAX_DIAMETER_MM = 100.0
COORDS = ("lps", "ras", "voxel")
MASK_MODES = ("auto", "components", "labels")
CSV_COLUMNS = ("x", "y", "z", "diameter_mm")  # plus an optional "id"
LUNA16_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")  # LUNA16's annotations.csv


@dataclass
class NoduleSpec:
    """One nodule to score: its centre in volume voxels (row, col, slice), diameter, and where it came from."""

    id: str
    centre: np.ndarray
    diameter_mm: float
    origin: str
    mask: np.ndarray | None = None  # bool crop of the nodule's voxels (volume grid), at mask_offset
    mask_offset: tuple[int, int, int] = (0, 0, 0)


# ----------------------------------------------------------------------------- nodules


def _check_diameter(value: float, where: str) -> float:
    if not (math.isfinite(value) and MIN_DIAMETER_MM <= value <= MAX_DIAMETER_MM):
        raise NodulekitError(f"{where}: diameter {value:g} mm is not in [{MIN_DIAMETER_MM:g}, {MAX_DIAMETER_MM:g}] mm")
    return float(value)


def _to_volume_voxel(scan, point, coords: str, where: str) -> np.ndarray:
    """Volume index (row, col, slice) of a point given in LPS/RAS mm or the scan's own voxel indices."""
    p = np.asarray(point, float)
    if coords == "voxel":
        rck = scan.src_to_voxel(p)
    elif coords in ("lps", "ras"):
        rck = scan.lps_to_voxel(p * ([-1, -1, 1] if coords == "ras" else 1))
    else:
        raise NodulekitError(f"--coords must be one of {', '.join(COORDS)} (got {coords!r})")
    shape = scan.volume.shape
    if any(not (-0.5 <= v <= n - 0.5) for v, n in zip(rck, shape, strict=True)):
        unit = "voxel" if coords == "voxel" else f"{coords.upper()} mm"
        raise NodulekitError(
            f"{where}: centre ({', '.join(f'{v:g}' for v in p)}) {unit} lies outside the scan ({scan.extent_text(coords)})"
        )
    return rck


def parse_centre(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise NodulekitError(f"--centre {text!r} is not X,Y,Z (three numbers separated by commas)")
    return values  # type: ignore[return-value]


def centre_spec(scan, centre: str, diameter: float | None, coords: str) -> NoduleSpec:
    if diameter is None:
        raise NodulekitError("--centre needs --diameter MM")
    d = _check_diameter(float(diameter), "--diameter")
    rck = _to_volume_voxel(scan, parse_centre(centre), coords, "--centre")
    return NoduleSpec("1", rck, d, "--centre")


def csv_specs(scan, path: str | Path, coords: str) -> list[NoduleSpec]:
    """One nodule per row of a CSV: columns x, y, z, diameter_mm (and optionally id), or LUNA16's
    seriesuid, coordX, coordY, coordZ, diameter_mm (LPS world mm; rows of other series are skipped)."""
    from nodulekit.textfiles import read_csv

    path = Path(path)
    columns, rows = read_csv(path, "nodules CSV")
    luna = all(c in columns for c in LUNA16_COLUMNS)
    if luna:
        rows = _luna16_rows(scan, path, rows, coords)
    else:
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise DataError(
                f"nodules CSV {path} lacks column(s) {', '.join(missing)} (needs {', '.join(CSV_COLUMNS)}, "
                f"or LUNA16's {', '.join(LUNA16_COLUMNS)})"
            )
    axes = ("coordX", "coordY", "coordZ") if luna else ("x", "y", "z")
    specs = []
    for line, row in rows:
        where = f"{path.name} line {line}"
        try:
            point = [float(row[c]) for c in axes]
            diameter = float(row["diameter_mm"])
        except ValueError:
            raise DataError(f"{where}: {', '.join(axes)} and diameter_mm must be numbers") from None
        rck = _to_volume_voxel(scan, point, coords, where)
        specs.append(NoduleSpec(row.get("id") or str(len(specs) + 1), rck, _check_diameter(diameter, where), where))
    if not specs:
        raise DataError(f"nodules CSV {path} has no rows")
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise DataError(f"nodules CSV {path}: id {next(i for i in ids if ids.count(i) > 1)!r} is used twice")
    return specs


def _luna16_rows(scan, path: Path, rows: list, coords: str) -> list:
    """The rows of a LUNA16 annotations CSV that belong to this scan (its series UID)."""
    if coords != "lps":
        raise DataError(
            f"nodules CSV {path} has LUNA16's columns, whose coordX, coordY, coordZ are LPS mm: drop --coords {coords}"
        )
    uids = sorted({row["seriesuid"] for _, row in rows})
    if not scan.series_uid and len(uids) > 1:
        raise DataError(
            f"nodules CSV {path} lists {len(uids)} series and the scan has no series UID to pick its rows "
            "(name the file <seriesuid>.mhd, as LUNA16 does)"
        )
    mine = [(line, row) for line, row in rows if not scan.series_uid or row["seriesuid"] == scan.series_uid]
    if rows and not mine:
        raise DataError(f"nodules CSV {path} has no row for this scan's series {scan.series_uid}")
    return mine


def mask_specs(scan, path: str | Path, mode: str = "auto") -> list[NoduleSpec]:
    """One nodule per label value or per connected component (26-connected) of a label image."""
    from scipy import ndimage

    from nodulekit.geometry import nodule_geometry
    from nodulekit.scans import read_label_image

    if mode not in MASK_MODES:
        raise NodulekitError(f"--mask-nodules must be one of {', '.join(MASK_MODES)} (got {mode!r})")
    labels = read_label_image(path, scan)
    values = np.unique(labels[labels > 0])
    if mode == "components" or (mode == "auto" and len(values) == 1):
        labels, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
        values, what = np.arange(1, n + 1), "component"
    else:
        what = "label"
    boxes = ndimage.find_objects(labels)
    specs = []
    for v in values:
        box = boxes[int(v) - 1]
        crop = labels[box] == v
        offset = tuple(int(s.start) for s in box)
        where = f"mask {what} {int(v)}"
        # The centre and size of LIDC nodules come from this same function (extract).
        geom = nodule_geometry(crop, scan.spacing, what=where)
        centre = np.asarray(geom.centre_voxel) + np.asarray(offset, float)
        specs.append(NoduleSpec(str(int(v)), centre, _check_diameter(geom.diameter_mm, where), where, crop, offset))
    if what == "component":  # number components by position (slice, row, col), not by scan order
        specs.sort(key=lambda s: tuple(s.centre[[2, 0, 1]]))
        for i, s in enumerate(specs, start=1):
            s.id, s.origin = str(i), f"mask component {i}"
    return specs


# ----------------------------------------------------------------------------- inputs


@dataclass
class NoduleInput:
    x: np.ndarray  # float32 [C, 32, 32]
    mask: np.ndarray | None  # uint8 [C, 32, 32] when the nodule came from a mask
    pixel_mm: np.ndarray  # [C]
    filled_offsets_mm: list[float] = field(default_factory=list)
    centre_hu: float = math.nan  # HU at the centre (the training ranges' centre_hu)


def nodule_input(scan, spec: NoduleSpec, input_spec) -> NoduleInput:
    """The model input of one nodule: :func:`nodulekit.inputs.model_input`, the function that made
    the training inputs (``input_spec``: the model's :class:`~nodulekit.inputs.InputSpec`, or a
    channel layout ``[{z_offset_mm, p}]`` of the paper's window)."""
    from nodulekit.inputs import Channel, InputSpec, model_input

    if not isinstance(input_spec, InputSpec):
        input_spec = InputSpec(tuple(Channel(float(c["z_offset_mm"]), float(c["p"])) for c in input_spec))
    vol = scan.volume
    row, col, _ = (float(v) for v in spec.centre)
    z_mm = float(scan.voxel_to_lps(spec.centre)[2])
    labels = None if spec.mask is None else spec.mask.astype(np.uint8)
    made = model_input(
        vol.hu, vol.zvals, vol.pixel_spacing, (row, col), z_mm, spec.diameter_mm, input_spec,
        labels, spec.mask_offset, spec.id,
    )  # fmt: skip
    mask = made.mask if spec.mask is not None else None
    return NoduleInput(made.x, mask, made.pixel_mm, made.filled_offsets_mm, made.centre_hu)


# ----------------------------------------------------------------------------- results


def training_overlap(card: dict[str, Any], scan, specs: list[NoduleSpec]) -> list[str | None]:
    """Per nodule: "nodule" when its id is a training nodule's, "scan" when the scan's series was in
    the training data, else None (the model's description lists both, when known)."""
    training = card.get("training_data") or {}
    ids = set(training.get("nodule_ids") or [])
    series = set(training.get("series_uids") or [])
    scan_seen = bool(scan.series_uid) and scan.series_uid in series
    return ["nodule" if s.id in ids else ("scan" if scan_seen else None) for s in specs]


def record(spec: NoduleSpec, scan, coords: str, prob: float, members, decision: dict, extra: dict) -> dict:
    """The JSON line of one nodule."""
    frame = "RAS" if coords == "ras" else "LPS"
    world = scan.voxel_to_lps(spec.centre) * ([-1, -1, 1] if frame == "RAS" else 1)
    out: dict[str, Any] = {
        "id": spec.id,
        "source": spec.origin,
        "centre_mm": [round(float(v), 4) for v in world],
        "frame": frame,
        "centre_voxel": [round(float(v), 4) for v in scan.voxel_to_src(spec.centre)],
        "diameter_mm": round(float(spec.diameter_mm), 4),
        "probability": float(prob),
        "label": decision["class_names"][1] if prob > decision["threshold"] else decision["class_names"][0],
        "threshold": decision["threshold"],
    }
    if members is not None:
        m = np.asarray(members, float)
        out["members"] = [float(v) for v in m]
        out["spread"] = {"sd": float(m.std()), "min": float(m.min()), "max": float(m.max())}
    out.update({k: v for k, v in extra.items() if v})
    return out


@dataclass
class PredictResult:
    records: list[dict]
    engine: str  # what ran: runtime, provider or device, and for PyTorch the execution variant
    timings: dict[str, float]
    warnings: list[str]
    output: Path | None = None
    inputs: list[NoduleInput] = field(default_factory=list)  # the model input of each nodule, in order


def collect_specs(scan, *, mask=None, mask_mode="auto", centre=None, diameter=None, nodules=None, coords="lps"):
    given = [name for name, v in (("--mask", mask), ("--centre", centre), ("--nodules", nodules)) if v is not None]
    if len(given) != 1:
        raise NodulekitError(
            "say where the nodules are with exactly one of --mask FILE, --centre X,Y,Z --diameter MM, --nodules CSV"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if diameter is not None and centre is None:
        raise NodulekitError("--diameter goes with --centre (a CSV has a diameter_mm column; a mask gives its own)")
    if mask is not None:
        return mask_specs(scan, mask, mask_mode)
    if centre is not None:
        return [centre_spec(scan, centre, diameter, coords)]
    return csv_specs(scan, nodules, coords)


def predict(
    model: str | Path,
    scan_path: str | Path,
    *,
    mask=None,
    mask_mode: str = "auto",
    centre: str | None = None,
    diameter: float | None = None,
    nodules=None,
    coords: str = "lps",
    output: str | Path | None = None,
    overwrite: bool = False,
    provider: str = "auto",
    device: str = "auto",
    fold: int | None = None,
    batch: int = 256,
    amp="auto",
    channels_last="auto",
    progress: bool = False,
    report: Callable[[str], None] | None = None,
    min_diameter: float | None = None,
    strict: bool = False,
    figure_format: str = "png",
    dpi: int = 150,
    dicom: bool = False,
) -> PredictResult:
    """Score every requested nodule of one scan; write overlays and maps to ``output`` when given."""
    from nodulekit import plausibility
    from nodulekit.dicom_out import check_dicom_request
    from nodulekit.engines import open_engine
    from nodulekit.figures import check_dpi, check_format
    from nodulekit.modelcard import require_spec
    from nodulekit.scans import read_scan

    report = report or (lambda line: None)
    if coords not in COORDS:
        raise NodulekitError(f"--coords must be one of {', '.join(COORDS)} (got {coords!r})")
    min_diameter = plausibility.check_options(min_diameter, mask)
    check_format(figure_format)
    check_dpi(dpi)
    check_dicom_request(dicom, scan_path, output)
    if output is not None:
        from nodulekit.predict_output import check_output_dir

        check_output_dir(output, overwrite)
    t_open = time.perf_counter()
    engine = open_engine(model, provider=provider, device=device, fold=fold, amp=amp, channels_last=channels_last)
    input_spec = require_spec(engine.card, str(model))
    t0 = time.perf_counter()
    scan = read_scan(scan_path)
    t1 = time.perf_counter()
    specs = collect_specs(
        scan, mask=mask, mask_mode=mask_mode, centre=centre, diameter=diameter, nodules=nodules, coords=coords
    )
    report(f"read {scan.describe()} in {t1 - t0:.2f} s")
    specs, checks, plausible, note = plausibility.check_request(scan, specs, engine.card, min_diameter, strict)
    if note:
        report(note)
    inputs = [nodule_input(scan, s, input_spec) for s in specs]
    t2 = time.perf_counter()
    scores = engine.run(np.stack([i.x for i in inputs]), batch=batch, progress=progress)
    t3 = time.perf_counter()
    engine_text = engine.name + (f" ({engine.note})" if engine.note else "")
    report(f"{len(specs)} nodule(s); model: {engine_text}")
    decision = engine.card["decision"]
    overlap = training_overlap(engine.card, scan, specs)
    records = []
    for i, (spec, inp) in enumerate(zip(specs, inputs, strict=True)):
        members = None if scores.members is None else scores.members[i]
        extra = {"filled_planes_mm": inp.filled_offsets_mm, "seen_in_training": overlap[i]}
        records.append(record(spec, scan, coords, float(scores.prob[i]), members, decision, extra))
        records[-1]["warnings"] = checks[i]
    warnings = plausible + _warnings(records, scan)
    if strict and warnings:
        raise NodulekitError(f"--strict: {warnings[0]}")
    timings = {"load_model_s": t0 - t_open, "read_s": t1 - t0, "inputs_s": t2 - t1, "model_s": t3 - t2}
    out = None
    if output is not None:
        from nodulekit.predict_output import write_outputs

        out = write_outputs(
            output,
            scan,
            specs,
            inputs,
            scores,
            records,
            engine.card,
            overwrite=overwrite,
            fmt=figure_format,
            dpi=dpi,
            dicom=dicom,
        )
    return PredictResult(records, engine_text, timings, warnings, out, inputs)


def _warnings(records: list[dict], scan) -> list[str]:
    lines = []
    nodule = [r["id"] for r in records if r.get("seen_in_training") == "nodule"]
    scan_seen = [r["id"] for r in records if r.get("seen_in_training") == "scan"]
    if nodule:
        lines.append(
            f"{len(nodule)} nodule(s) ({', '.join(nodule[:5])}) have the id of a nodule this model was trained on: "
            "their probabilities are not held-out estimates"
        )
    if scan_seen:
        lines.append(
            f"this scan (series {scan.series_uid}) was in the model's training data: its nodules may have been "
            "training examples, so their probabilities may not be held-out estimates"
        )
    filled = [r["id"] for r in records if r.get("filled_planes_mm")]
    if filled:
        lines.append(
            f"{len(filled)} nodule(s) ({', '.join(filled[:5])}) lie so near the end of the scan that some of the "
            "model's planes repeat the last slice (see filled_planes_mm)"
        )
    return lines
