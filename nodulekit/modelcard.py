"""What a trained model needs from a CT, and what it says back: the model description.

One record (docs/model-description.md) describes a model well enough to build its input
from a CT without nodulekit: the channel layout, the crop rule, the resampling, the HU
window and scaling, input and output names and meanings, the decision threshold and label
rule, the training data's fingerprint and size, and the intended use. It is modelled on
the ``network_data_format`` of MONAI bundles (``inputs``/``outputs`` with type, format,
modality, channels, shape, dtype, value range, channel meanings) plus the preprocessing
that MONAI leaves to a bundle's transforms.

The record is written into every exported ONNX file (``metadata_props``, one JSON value
per top-level key) and built the same way for a RUNDIR or checkpoint, so ``predict`` and
``describe`` read one structure whatever the model file. It holds no local paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from nodulekit.constants import CLASS_NAMES, INPUT_SIZE, MALIGNANT, THRESHOLD
from nodulekit.errors import NodulekitError
from nodulekit.inputs import InputSpec, legacy_spec, stored_spec

SCHEMA = "nodulekit-model-description/2"  # 2: the input spec's numbers, arithmetic, ranges, performance
READABLE_SCHEMAS = ("nodulekit-model-description/1", SCHEMA)
INTENDED_USE = (
    "Research use only; not a medical device. Estimates whether a lung nodule that has already been found "
    "would be rated malignant by the LIDC-IDRI label rule (mean of the radiologists' malignancy ratings). "
    "Not validated for diagnosis, screening or any clinical decision."
)
TASK = "malignancy of one lung nodule in chest CT, with the model's own activation map"
LICENSE = (
    "nodulekit (code): MIT. The weights were learned from LIDC-IDRI data, licensed CC BY 3.0 "
    "(https://creativecommons.org/licenses/by/3.0/): whoever shares or uses this model must carry the "
    "data attribution."
)
CITATION = (
    "Lei Y, Tian Y, Shan H, Zhang J, Wang G, Kalra MK. Shape and margin-aware lung nodule classification in "
    "low-dose CT images via soft activation mapping. Medical Image Analysis 60:101628, 2020 (the method); "
    "nodulekit (this implementation)."
)
DATA_ATTRIBUTION = (
    "LIDC-IDRI, CC BY 3.0. Armato III SG, McLennan G, Bidaut L, McNitt-Gray MF, Meyer CR, Reeves AP, ... "
    "Clarke LP (2015). Data From LIDC-IDRI. The Cancer Imaging Archive. "
    "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX. Armato SG III et al. The Lung Image Database Consortium "
    "(LIDC) and Image Database Resource Initiative (IDRI): a completed reference database of lung nodules on "
    "CT scans. Medical Physics 38:915-931, 2011. Clark K et al. The Cancer Imaging Archive (TCIA): maintaining "
    "and operating a public information repository. J Digit Imaging 26(6):1045-1057, 2013."
)
# Plain-string entries of the record (ONNX metadata_props hold them as they are).
TEXT_KEYS = ("task", "intended_use", "license", "citation", "data_attribution")
# Entries stored as JSON in ONNX metadata_props.
CARD_KEYS = (
    "preprocessing",
    "network_data_format",
    "decision",
    "training_data",
    "members",
    "input_spec",
    "map_placement",
    "performance",
    "training_recipe",
)
NEW_IN_2 = ("input_spec", "map_placement", "performance")  # absent from files of schema 1
# The recipe entry (nodulekit.recipes.RECIPE_KEY) is absent from files exported before recipes
# existed (the paper's), and holds the bare recipe in files exported before the graph applied TTA.
OPTIONAL_KEYS = ("training_recipe",)
TTA_MEAN = (
    "mean over the 8 flips/rotations of x (test-time augmentation: k = 0..3 quarter turns, each with and without "
    "a left-right flip), each view's map turned back to x's orientation before the mean"
)
RANGE_QUANTITIES = {
    "diameter_mm": "equivalent diameter of the nodule (mm)",
    "pixel_spacing_mm": "in-plane pixel spacing of the scan (mm; the smaller of the two)",
    "slice_spacing_mm": "slice spacing of the scan (mm)",
    "centre_hu": "HU at the nodule centre (the 0 mm plane's centre pixel of the window)",
}


@dataclass(frozen=True)
class Range:
    """Smallest and largest value of one quantity over the training nodules (``n`` of them)."""

    min: float
    max: float
    n: int

    def contains(self, value: float) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class TrainingRanges:
    """What the model was trained on, per quantity (None when the training data did not record it)."""

    diameter_mm: Range | None = None
    pixel_spacing_mm: Range | None = None
    slice_spacing_mm: Range | None = None
    centre_hu: Range | None = None

    @classmethod
    def from_record(cls, record: Any) -> TrainingRanges:
        record = record if isinstance(record, dict) else {}
        found = {}
        for name in RANGE_QUANTITIES:
            r = record.get(name)
            if isinstance(r, dict) and all(k in r for k in ("min", "max", "n")):
                found[name] = Range(float(r["min"]), float(r["max"]), int(r["n"]))
        return cls(**found)


def ranges_record(values: dict[str, Any]) -> dict[str, Any]:
    """``{quantity: {min, max, n}}`` of per-nodule arrays (non-finite values left out; None when empty)."""
    out: dict[str, Any] = {}
    for name in RANGE_QUANTITIES:
        v = values.get(name)
        v = None if v is None else np.asarray(v, np.float64)
        v = None if v is None else v[np.isfinite(v)]
        out[name] = (
            None if v is None or v.size == 0 else {"min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
        )
    out["meaning"] = dict(RANGE_QUANTITIES)
    return out


def layout_from_channels(channels: int, layout_json: list[dict] | None = None) -> list[dict] | None:
    """The channel layout ``[{z_offset_mm, p}]``: the dataset's own when known, else the paper's for
    ``channels`` in {1, 3, 11, 21}; None when neither says how the channels were made."""
    spec = legacy_spec(channels, layout_json)
    return None if spec is None else _layout(spec)


def _layout(spec: InputSpec) -> list[dict]:
    return [{"z_offset_mm": c.z_offset_mm, "p": c.p} for c in spec.channels]


def preprocessing(spec: InputSpec) -> dict[str, Any]:
    """How to build the model input ``x`` from a CT, for one nodule: the arithmetic of every step
    in numbers and formulas, generated from the input spec (enough to reproduce ``x`` exactly)."""
    lo, hi = spec.hu_window
    n, a, m = spec.patch_px, spec.window_diameters, spec.min_window_mm
    planes = f"{spec.planes_mm[0]:+g}..{spec.planes_mm[-1]:+g} mm in 1 mm steps ({len(spec.planes_mm)} planes)"
    return {
        "intensity_unit": "Hounsfield units (DICOM: stored value x RescaleSlope + RescaleIntercept)",
        "volume": "hu[row, col, k]: rows run towards the patient's posterior (+y in LPS), columns towards the "
        "patient's left (+x in LPS), slices k = 0..K-1 sorted by their z position z_k (mm, increasing); "
        "s_r, s_c = the distances between rows and between columns (mm)",
        "axes": "x[c, a, b]: channel c is one axial plane, a runs with the rows, b with the columns",
        "centre": "(r, c, z): r, c = sub-pixel row and column indices, z = position in mm; from a nodule mask: "
        "r, c, k = the mean of its voxels' indices and z = z_floor(k) + (k - floor(k)) x (z_ceil(k) - z_floor(k))",
        "diameter": "d = (6 V / pi)^(1/3) mm, V = voxel count x s_r x s_c x slice spacing of the nodule mask, "
        "or a diameter given with the centre",
        "window": {
            "side_px": f"S = ceil(max({a:g} x d, {m:g}) / min(s_r, s_c) - 1e-9) in float64, plus 1 when even",
            "origin": "r0 = round(r) - (S - 1) / 2, c0 = round(c) - (S - 1) / 2 (round half to even)",
            "pixels": "window pixel (i, j), i, j = 0..S-1, is source pixel (clip(r0 + i, 0, R - 1), "
            "clip(c0 + j, 0, C - 1)) for a scan of R rows and C columns (edge pixels repeated)",
        },
        "z_resampling": {
            "step_mm": 1.0,
            "offsets_mm": list(spec.planes_mm),
            "method": f"planes at z + o for o = {planes}; each is the linear interpolation of the two source "
            "slices around it; beyond the first/last slice the end slice is repeated",
            "arithmetic": "f = the fractional slice index of z + o, linear between the points (z_k, k) and "
            "clamped to [0, K - 1]; k0 = floor(f), k1 = min(k0 + 1, K - 1), w = f - k0; "
            "plane_o = rint((1 - w) x hu[:, :, k0] + w x hu[:, :, k1]) in float64, rint rounding half to even, "
            "clipped to [-32768, 32767] (int16)",
        },
        "in_plane_window": {
            "side": f"max({a:g} x diameter, {m:g} mm) in pixels of the smaller pixel spacing, rounded up to an "
            "odd count, centred on the pixel nearest the centre",
            "rounding": "HU rounded to whole numbers (half to even) after the z interpolation",
            "outside_scan": "the nearest edge pixel is repeated",
        },
        "channels": [
            {"index": i, "z_offset_mm": c.z_offset_mm, "p": c.p, "crop_side": f"{c.p:g} x diameter"}
            for i, c in enumerate(spec.channels)
        ],
        "intensity_scaling": {
            "hu_window": [lo, hi],
            "formula": f"v = (clip(HU, {lo:g}, {hi:g}) - ({lo:g})) / {hi - lo:g}, clipped before the in-plane "
            "interpolation",
            "arithmetic": f"in float32: v = float32(clip(float32(plane_o), {lo:g}, {hi:g}) + {-lo:g}) / "
            f"float32({hi - lo:g})",
            "value_range": [0.0, 1.0],
        },
        "crop": {
            "rule": f"a square of side p x diameter centred on the nodule centre, sampled on a {n}x{n} grid",
            "sample_points": f"output pixel j samples centre + (j + 0.5 - {n // 2}) x side / {n} "
            "(mm, per axis) in the window's pixel coordinates",
            "arithmetic": f"channel (o, p): t = p x d / {n} (mm, float64); cy = r - r0, cx = c - c0; output "
            f"pixel (a, b), a, b = 0..{n - 1}, samples v_o at y_a = cy + (a + 0.5 - {n // 2}) x (t / s_r), "
            f"x_b = cx + (b + 0.5 - {n // 2}) x (t / s_c)",
            "interpolation": "bilinear in float64: i = floor(y), u = y - i, j = floor(x), q = x - j; "
            "x = (1-u)(1-q) V[i, j] + (1-u) q V[i, j+1] + u (1-q) V[i+1, j] + u q V[i+1, j+1], indices "
            "clipped to 0..S-1 (edge repeated); stored as float32 and clipped to [0, 1]",
        },
        "batch": f"x float32 [batch, {spec.n_channels}, {n}, {n}]; the model output prob[:, 1] is the malignant "
        "probability",
    }


def map_placement(spec: InputSpec) -> dict[str, Any]:
    """How ``map`` and ``map_up`` sit on the CT: in numbers, for one nodule (centre r, c, z; diameter d)."""
    n = spec.patch_px
    ref = spec.reference_channel
    ch = spec.channels[ref]
    return {
        "map_up": f"map_up[k, a, b] lies on the input grid: pixel (a, b) is the {ch.p:g} x d / {n} mm square "
        f"centred at row r + (a + 0.5 - {n // 2}) x t / s_r, column c + (b + 0.5 - {n // 2}) x t / s_c of the "
        f"CT, t = {ch.p:g} x d / {n} mm (the crop of channel {ref}: plane {ch.z_offset_mm:+g} mm, side {ch.p:g} x d)",
        "to_ct": f"CT pixel (row, col) takes map_up bilinearly at a = (row - r) x s_r / t + {n / 2 - 0.5:g}, "
        f"b = (col - c) x s_c / t + {n / 2 - 0.5:g}, 0 where a or b lies outside [-0.5, {n - 0.5:g}]; "
        f"nodulekit predict writes it on the slices within z {min(c.z_offset_mm for c in spec.channels) - 0.5:+g} .. "
        f"z {max(c.z_offset_mm for c in spec.channels) + 0.5:+g} mm",
        "map": f"map [k, h, w] is the final feature grid; map_up is its bilinear resize to {n} x {n} with "
        f"align_corners=False: map_up pixel a samples map at (a + 0.5) x h / {n} - 0.5, clamped to [0, h - 1]",
        "reference_channel": ref,
    }


def training_ranges(card: dict[str, Any]) -> TrainingRanges:
    """The ranges of the model's training data (diameter, spacing, centre HU) as a structure."""
    return TrainingRanges.from_record((card.get("training_data") or {}).get("ranges"))


def network_data_format(
    channels: int, layout: list[dict] | None, map_hw, n_members: int, tta: bool = False
) -> dict[str, Any]:
    """MONAI-bundle-style description of the graph's input and outputs (``tta``: means over the 8 views)."""
    channel_def = (
        {str(i): f"plane at {c['z_offset_mm']:+g} mm, crop side {c['p']:g} x diameter" for i, c in enumerate(layout)}
        if layout
        else {str(i): "unknown" for i in range(channels)}
    )
    classes = {str(i): name for i, name in enumerate(CLASS_NAMES)}
    over_views = ", mean over the 8 flips/rotations of x (training_recipe.test_time_augmentation)" if tta else ""
    maps = {
        "type": "image",
        "format": "activation map (raw, unnormalised)" + over_views,
        "num_channels": 2,
        "dtype": "float32",
    }
    outputs = {
        "prob": {
            "type": "probabilities",
            "format": "softmax over classes" + over_views,
            "num_channels": 2,
            "spatial_shape": [],
            "dtype": "float32",
            "value_range": [0.0, 1.0],
            "channel_def": classes,
        },
        "map": {**maps, "spatial_shape": list(map_hw), "channel_def": classes, "is_patch_data": True},
        "map_up": {**maps, "spatial_shape": [INPUT_SIZE, INPUT_SIZE], "channel_def": classes, "is_patch_data": True},
    }
    if n_members > 1:
        outputs["member_prob"] = {
            "type": "probabilities",
            "format": "malignant probability of each ensemble member",
            "num_channels": n_members,
            "spatial_shape": [],
            "dtype": "float32",
            "value_range": [0.0, 1.0],
        }
    return {
        "inputs": {
            "x": {
                "type": "image",
                "format": "CT, HU windowed and scaled (see preprocessing)",
                "modality": "CT",
                "num_channels": channels,
                "spatial_shape": [INPUT_SIZE, INPUT_SIZE],
                "dtype": "float32",
                "value_range": [0.0, 1.0],
                "is_patch_data": True,
                "channel_def": channel_def,
            }
        },
        "outputs": outputs,
    }


def decision(threshold: float, label_rule: Any) -> dict[str, Any]:
    return {
        "threshold": float(threshold),
        "rule": f"malignant if prob[:, {MALIGNANT}] > {threshold:g}, else benign",
        "class_names": list(CLASS_NAMES),
        "label_rule": label_rule,
        "label_rule_meaning": "training labels: the LIDC-IDRI readers' mean malignancy rating above/below the "
        "rule's cut-offs (1 = malignant, 0 = benign); nodules at the cut-off were not used",
    }


def recipe_record(recipe, in_model: bool) -> dict[str, Any]:
    """The training recipe (its name and every ingredient, nodulekit.recipes) and what its test-time
    augmentation means for this model's outputs (``in_model``: the model applies it)."""
    if not recipe.tta:
        meaning = "none: prob and map come from one forward pass of x"
    elif in_model:
        meaning = (
            f"applied by the model: prob, map and map_up are each the {TTA_MEAN}, so map and map_up lie on x as "
            "without it; prob is what the run's cross-validated test probabilities (performance) were computed with"
        )
    else:
        meaning = (
            "NOT applied by this graph (exported before nodulekit put TTA in the graph): its prob comes from one "
            "forward pass of x, while the run's cross-validated figures (performance) are means over the 8 "
            "flips/rotations of x, so its probabilities differ from those the figures describe; re-export it"
        )
    return {
        **recipe.as_dict(),
        "test_time_augmentation": {"in_model": bool(in_model and recipe.tta), "meaning": meaning},
    }


def stored_recipe(value: str | None, where: str) -> dict[str, Any]:
    """The recipe entry of an ONNX file: as written; a bare recipe of an earlier file (its graph applied
    no TTA); the paper's when the file predates recipes."""
    from nodulekit.recipes import recipe_from_record

    try:
        record = json.loads(value) if value is not None else None
        recipe = recipe_from_record(record)
    except (TypeError, ValueError):
        raise NodulekitError(f"{where}: model description entry 'training_recipe' is not a valid recipe") from None
    if isinstance(record, dict) and "test_time_augmentation" in record:
        return record
    return recipe_record(recipe, in_model=False)


def require_spec(card: dict[str, Any], what: str) -> InputSpec:
    """The input spec of a described model, or a one-line refusal when it is not known or does not
    fit the model's graph (predict builds inputs only from a spec it can follow)."""
    channels = int(card["network_data_format"]["inputs"]["x"]["num_channels"])
    spec = card_spec(card, what)
    if spec is None:
        raise NodulekitError(
            f"{what} does not say how its {channels} input channels are made from a CT (no input spec or channel "
            "layout); predict can only fill channels it knows: export the model from a nodulekit RUNDIR"
        )
    if spec.n_channels != channels:
        raise NodulekitError(f"{what}: its input spec lists {spec.n_channels} channels but the model takes {channels}")
    if spec.patch_px != INPUT_SIZE:
        raise NodulekitError(
            f"{what}: its input spec asks for {spec.patch_px}x{spec.patch_px} patches, the model takes {INPUT_SIZE}"
        )
    return spec


def card_spec(card: dict[str, Any], what: str) -> InputSpec | None:
    """The record's input spec; for a description of schema 1, the one its channel layout implies."""
    channels = int(card["network_data_format"]["inputs"]["x"]["num_channels"])
    layout = (card.get("preprocessing") or {}).get("channels")
    if card.get("input_spec") is None and not layout:
        return None
    normalisation = (card.get("training_data") or {}).get("normalisation")
    return stored_spec(card.get("input_spec"), channels, layout, normalisation, where=what)


def require_layout(card: dict[str, Any], what: str) -> list[dict]:
    """The channel layout ``[{z_offset_mm, p}]`` of a described model (see :func:`require_spec`)."""
    return _layout(require_spec(card, what))


def to_metadata(card: dict[str, Any]) -> dict[str, str]:
    """The record as ONNX ``metadata_props`` entries (strings; structured values as JSON)."""
    meta = {"description_schema": SCHEMA}
    meta.update({key: str(card[key]) for key in TEXT_KEYS})
    for key in CARD_KEYS:
        meta[key] = json.dumps(card[key], sort_keys=False)
    return meta


def from_metadata(meta: dict[str, str], where: str) -> dict[str, Any]:
    """The record stored in an ONNX file's metadata; one-line error when absent or malformed.

    A file of schema 1 (before input specs) reads with its spec derived from its channel layout
    and normalisation, and no map placement or performance."""
    schema = meta.get("description_schema")
    if schema not in READABLE_SCHEMAS:
        raise NodulekitError(
            f"{where} carries no nodulekit model description ({SCHEMA}; found {schema or 'none'}); re-export it with "
            "this nodulekit's `export-onnx`"
        )
    card: dict[str, Any] = {"schema": schema}
    card.update({key: meta.get(key) for key in TEXT_KEYS})
    for key in CARD_KEYS:
        if key in OPTIONAL_KEYS:
            card[key] = stored_recipe(meta.get(key), where)
            continue
        if key in NEW_IN_2 and schema != SCHEMA:
            card[key] = None
            continue
        try:
            card[key] = json.loads(meta[key])
        except (KeyError, TypeError, ValueError):
            raise NodulekitError(f"{where}: model description entry {key!r} is missing or not valid JSON") from None
    for key in ("arch", "map_kind", "nodulekit_version", "model_config"):
        card[key] = meta.get(key, "unknown")
    if card["input_spec"] is None:
        spec = card_spec(card, where)
        card["input_spec"] = None if spec is None else spec.as_dict()
    card["export"] = _export_record(meta)
    return card


def _export_record(meta: dict[str, str]) -> dict[str, Any]:
    """What only an exported file holds: its version and a summary of its reference vectors."""
    out: dict[str, Any] = {"model_version": meta.get("model_version"), "test_data_set": None}
    try:
        ref = json.loads(meta["test_data_set"])
        prob = ref["outputs"]["prob"]
    except (KeyError, TypeError, ValueError):
        return out
    out["test_data_set"] = {
        "source": ref.get("source"),
        "input_shape": ref["inputs"]["x"]["shape"],
        "prob_malignant": [float(v) for v in decode_array(prob)[:, MALIGNANT]],
        "tolerance": ref.get("tolerance"),
        "runtime": ref.get("runtime"),
        "where": "metadata_props entry test_data_set (arrays as base64 float32)",
    }
    return out


# ----------------------------------------------------------------------------- from a run


def _dataset_rows(run: dict[str, Any], rundir) -> dict[str, Any] | None:
    """Nodule ids, test folds, series UIDs and the range quantities of the run's dataset rows, when
    they can be known.

    From the dataset file when it is still where run.json says and is the run's (same
    fingerprint); else from the fold results in RUNDIR (each lists its test fold's ids).
    """
    from pathlib import Path

    from nodulekit.datasets import RANGE_MEMBERS, dataset_fingerprint, load_dataset
    from nodulekit.run import Run, recorded_dataset

    path, fingerprint = recorded_dataset(run)
    if path and Path(path).is_file():
        try:
            ds = load_dataset(path)
        except NodulekitError:
            ds = None
        if ds is not None and dataset_fingerprint(ds) == fingerprint:
            series = ds.extras.get("series_uid")
            return {
                "nodule_id": [str(v) for v in ds.nodule_id],
                "fold": ds.fold.tolist(),
                "series_uid": None if series is None else [str(v) for v in series],
                "ranges": {"diameter_mm": ds.diameter_mm, **{m: ds.extras.get(m) for m in RANGE_MEMBERS}},
            }
    if rundir is None:
        return None
    try:
        results = Run(rundir).fold_results()
    except NodulekitError:
        return None
    ids = [i for r in results for i in r.test_nodule_id]
    folds = [r.fold for r in results for _ in r.test_nodule_id]
    return {"nodule_id": ids, "fold": folds, "series_uid": None, "ranges": None}


def training_data(run: dict[str, Any], member_folds: list[int | None], rundir=None) -> dict[str, Any]:
    """What the model was trained on: dataset identity and size, the nodules each member saw, and
    the ranges (diameter, spacing, centre HU) of those nodules."""
    ds = run.get("dataset") if isinstance(run.get("dataset"), dict) else {}
    record = {
        "dataset_name": ds.get("name", "unknown"),
        "fingerprint": run.get("dataset_fingerprint") or ds.get("fingerprint") or "unknown",
        "n_nodules": ds.get("n"),
        "n_malignant": ds.get("n_malignant"),
        "n_folds": run.get("n_folds"),
        "split": ds.get("split"),
        "label_rule": run.get("label_rule"),
        "normalisation": run.get("normalisation"),
        "nodule_ids": None,
        "series_uids": None,
        "ranges": None,
    }
    rows = _dataset_rows(run, rundir) if all(k is not None for k in member_folds) else None
    if rows is not None:
        used = [i for i, f in enumerate(rows["fold"]) if any(f != k for k in member_folds)]
        record["nodule_ids"] = sorted({rows["nodule_id"][i] for i in used})
        if rows["series_uid"] is not None:
            record["series_uids"] = sorted({rows["series_uid"][i] for i in used})
        if rows["ranges"] is not None:
            picked = {k: None if v is None else np.asarray(v)[used] for k, v in rows["ranges"].items()}
            record["ranges"] = ranges_record(picked)
    return record


def performance(run: dict[str, Any], rundir) -> dict[str, Any] | None:
    """The cross-validated performance of the run that made the model, with 95 % patient-bootstrap
    intervals (``nodulekit.evaluation``); None when not every fold of the run is finished."""
    from nodulekit import stats
    from nodulekit.evaluation import load_run_results, summarise_run

    if rundir is None:
        return None
    try:
        summary = summarise_run(load_run_results(rundir))
    except NodulekitError:
        return None
    pooled, ci = summary["pooled_nodule"], summary["pooled_nodule_ci"]
    settings = summary["pooled_nodule_ci_settings"]
    return _finite_or_none(
        {
            "what": f"{summary['n_folds']}-fold cross-validation of the run ({run.get('dataset', {}).get('split')} "
            "split): each nodule scored by the fold model that did not train on it, pooled over the folds, "
            f"threshold {summary['threshold']:g}",
            "n": pooled["n"],
            "n_malignant": pooled["n_malignant"],
            "metrics": {
                name: {"estimate": ci[name]["estimate"], "ci95": [ci[name]["low"], ci[name]["high"]]}
                for name in ("accuracy", "sensitivity", "specificity", "auc")
            },
            "fold_mean_sd": {k: [v["mean"], v["std"]] for k, v in summary["summary"].items()},
            "interval": stats.bootstrap_note(settings["n_resamples"], settings["seed"]),
            "calibration": {k: summary["calibration"][k] for k in ("brier", "ece") if k in summary["calibration"]},
        }
    )


def _finite_or_none(value: Any) -> Any:
    """NaN (an undefined statistic, e.g. AUC of one class) as null, so the record stays strict JSON."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def map_grid(model, channels: int) -> tuple[int, int]:
    """(h, w) of the model's activation map, from one forward pass on zeros."""
    import torch

    with torch.inference_mode():
        _, amap = model.eval().activation_map(torch.zeros(2, channels, INPUT_SIZE, INPUT_SIZE))
    return int(amap.shape[-2]), int(amap.shape[-1])


def run_spec(run: dict[str, Any], channels: int) -> InputSpec | None:
    """The input spec a run was trained with: run.json's, else the one its older fields imply."""
    ds = run.get("dataset") if isinstance(run.get("dataset"), dict) else {}
    return stored_spec(run.get("input_spec"), channels, ds.get("channel_layout"), run.get("normalisation"), "run.json")


def build_card(models: list, run: dict[str, Any], members: list[dict], rundir=None) -> dict:
    """The model description of one fold model or a fold ensemble (``members``: [{fold, epoch}])."""
    from nodulekit import __version__
    from nodulekit.recipes import recipe_from_record

    first = models[0]
    channels = int(first.in_channels)
    spec = run_spec(run, channels)
    recipe = recipe_from_record(run.get("recipe"))
    layout = None if spec is None else _layout(spec)
    return {
        "schema": SCHEMA,
        "task": TASK,
        "intended_use": INTENDED_USE,
        "license": LICENSE,
        "citation": CITATION,
        "data_attribution": DATA_ATTRIBUTION,
        "arch": str(getattr(first, "arch", type(first).__name__)),
        "map_kind": str(first.map_kind),
        "model_config": json.dumps(getattr(first, "config", {}) or {}, default=str, sort_keys=True),
        "nodulekit_version": __version__,
        "members": members,
        "input_spec": None if spec is None else spec.as_dict(),
        "preprocessing": None if spec is None else preprocessing(spec),
        "network_data_format": network_data_format(
            channels, layout, map_grid(first, channels), len(models), recipe.tta
        ),
        "map_placement": None if spec is None else map_placement(spec),
        "decision": decision(float(run.get("threshold", THRESHOLD)), run.get("label_rule")),
        "training_data": training_data(run, [m.get("fold") for m in members], rundir),
        # the models nodulekit builds from a run (export-onnx, predict) apply the recipe's TTA
        "training_recipe": recipe_record(recipe, in_model=True),
        "performance": performance(run, rundir),
    }


# ----------------------------------------------------------------------------- text


def _members_text(card: dict[str, Any]) -> str:
    members = card.get("members") or []
    if len(members) > 1:
        folds = ", ".join(str(m.get("fold")) for m in members)
        return f"ensemble of {len(members)} fold models (folds {folds}): mean of their probabilities and maps"
    m = members[0] if members else {}
    return f"one model (fold {m.get('fold', 'unknown')}, epoch {m.get('epoch', 'unknown')})"


def _input_lines(card: dict[str, Any]) -> list[tuple[str, str]]:
    x = card["network_data_format"]["inputs"]["x"]
    pre = card.get("preprocessing")
    lines = [
        (
            "input x",
            f"{x['dtype']} [batch, {x['num_channels']}, {', '.join(map(str, x['spatial_shape']))}], values 0..1",
        )
    ]
    if not pre:
        return lines + [("channels", "unknown: this model does not say how its channels are made (predict refuses it)")]
    chans = pre["channels"]
    offsets = sorted({c["z_offset_mm"] for c in chans})
    sides = sorted({c["p"] for c in chans})
    lines += [
        (
            "channels",
            f"{len(chans)}: axial planes at z offsets {', '.join(f'{v:+g}' for v in offsets)} mm; "
            f"square crops of {', '.join(f'{p:g}' for p in sides)} x diameter",
        ),
        ("volume", pre.get("volume", pre.get("axes"))),
        ("centre", pre["centre"]),
        ("diameter", pre["diameter"]),
    ]
    if "window" in pre:  # schema 2: the arithmetic
        w = pre["window"]
        lines += [
            ("window", f"{w['side_px']}; {w['origin']}; {w['pixels']}"),
            ("z planes", f"{pre['z_resampling']['method']}; {pre['z_resampling']['arithmetic']}"),
            ("HU scaling", f"{pre['intensity_scaling']['formula']}; {pre['intensity_scaling']['arithmetic']}"),
            ("crop", f"{pre['crop']['rule']}; {pre['crop']['arithmetic']}; {pre['crop']['interpolation']}"),
        ]
    else:
        lines += [
            ("z", f"{pre['z_resampling']['step_mm']:g} mm planes; {pre['z_resampling']['method']}"),
            ("in-plane", f"{pre['crop']['rule']}; {pre['crop']['sample_points']}; {pre['crop']['interpolation']}"),
        ]
    lines.append(("HU window", f"HU {pre['intensity_scaling']['hu_window']}: {pre['intensity_scaling']['formula']}"))
    return lines


def _ci_text(metric: dict[str, Any], percent: bool) -> str:
    f = (lambda v: f"{100 * v:.1f} %") if percent else (lambda v: f"{v:.3f}")
    lo, hi = metric["ci95"]
    if metric["estimate"] is None:
        return "undefined"
    interval = f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else " [interval undefined]"
    return f(metric["estimate"]) + interval


def _performance_text(card: dict[str, Any]) -> str:
    perf = card.get("performance")
    if not perf:
        return "not recorded (the run's folds were not all finished, or the model was not made from a RUNDIR)"
    m = perf["metrics"]
    parts = [f"{k} {_ci_text(m[k], k != 'auc')}" for k in ("accuracy", "sensitivity", "specificity", "auc")]
    return f"{', '.join(parts)} on {perf['n']} nodules ({perf['n_malignant']} malignant); {perf['what']}; {perf['interval']}"


def _ranges_text(card: dict[str, Any]) -> str:
    ranges = training_ranges(card)
    parts = [f"{name} {r.min:g}..{r.max:g}" for name in RANGE_QUANTITIES if (r := getattr(ranges, name)) is not None]
    return "; ".join(parts) + " (training nodules)" if parts else "not recorded"


def _recipe_lines(card: dict[str, Any]) -> list[tuple[str, str]]:
    """The recipe's name and every ingredient, and what its test-time augmentation means here."""
    record = card.get("training_recipe") or {}
    tta = record.get("test_time_augmentation") or {}

    def value(v: Any) -> str:
        if v is None:
            return "none"
        return json.dumps(v) if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)

    # without an EMA there are no averaged weights whose batch-norm statistics could be chosen
    skip = {"name", "test_time_augmentation"} | ({"ema_batch_norm"} if not record.get("ema_decay") else set())
    ingredients = ", ".join(f"{k}={value(v)}" for k, v in record.items() if k not in skip)
    text = f"{record.get('name', 'unknown')}: {ingredients}"
    if record.get("seeds", 1) > 1:
        text += f" (its figures average {record['seeds']} seed RUNDIRs; this model is one seed's)"
    return [("recipe", text), ("test-time aug.", str(tta.get("meaning", "not recorded")))]


def _export_lines(card: dict[str, Any]) -> list[tuple[str, str]]:
    exp = card.get("export")
    if not exp:
        return []
    lines = [("model_version", str(exp.get("model_version")))]
    ref = exp.get("test_data_set")
    if ref:
        lines.append(
            (
                "test vectors",
                f"input {ref['input_shape']} from {ref['source']}: prob[:, 1] {ref['prob_malignant']}; checked at "
                f"export (tolerance {ref['tolerance']}); metadata entry test_data_set",
            )
        )
    return lines


def render(card: dict[str, Any]) -> str:
    """The description as aligned text (``nodulekit describe``)."""
    td = card.get("training_data") or {}
    outs = card["network_data_format"]["outputs"]
    n_ids = len(td.get("nodule_ids") or [])
    placement = card.get("map_placement") or {}
    lines = [
        ("model", f"{card.get('arch')} (map: {card.get('map_kind')}), {_members_text(card)}"),
        ("task", str(card.get("task"))),
        ("intended use", str(card.get("intended_use"))),
        *_input_lines(card),
        (
            "outputs",
            "; ".join(
                f"{k} {v['format']} [batch, {v['num_channels']}{''.join(f', {s}' for s in v['spatial_shape'])}]"
                for k, v in outs.items()
            ),
        ),
        ("map placement", f"{placement['map_up']}; {placement['to_ct']}" if placement else "not recorded"),
        ("decision", card["decision"]["rule"]),
        ("label rule", json.dumps(card["decision"].get("label_rule"))),
        (
            "training data",
            f"{td.get('dataset_name')}: {td.get('n_nodules')} nodules ({td.get('n_malignant')} malignant), "
            f"{td.get('n_folds')} {td.get('split')} folds, fingerprint {td.get('fingerprint')}; "
            + (f"{n_ids} training nodule ids listed" if n_ids else "training nodule ids unknown"),
        ),
        ("training ranges", _ranges_text(card)),
        *_recipe_lines(card),
        ("performance", _performance_text(card)),
        *_export_lines(card),
        ("license", str(card.get("license"))),
        ("citation", str(card.get("citation"))),
        ("data", str(card.get("data_attribution"))),
        ("nodulekit", str(card.get("nodulekit_version"))),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


# --------------------------------------------------------------------------- test_data_set arrays


def array_record(a: np.ndarray) -> dict[str, Any]:
    """A ``test_data_set`` array as stored in an ONNX file's metadata (read back by :func:`decode_array`)."""
    import base64

    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32", "data_base64": base64.b64encode(a.tobytes()).decode()}


def decode_array(record: dict[str, Any]) -> np.ndarray:
    """A ``test_data_set`` array: base64 of little-endian float32 in C order, of ``shape``."""
    import base64

    return np.frombuffer(base64.b64decode(record["data_base64"]), "<f4").reshape(record["shape"]).copy()
