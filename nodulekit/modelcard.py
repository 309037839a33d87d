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
from typing import Any

from nodulekit.constants import CLASS_NAMES, INPUT_SIZE, MALIGNANT, THRESHOLD
from nodulekit.errors import NodulekitError

SCHEMA = "nodulekit-model-description/1"
INTENDED_USE = (
    "Research use only; not a medical device. Estimates whether a lung nodule that has already been found "
    "would be rated malignant by the LIDC-IDRI label rule (mean of the radiologists' malignancy ratings). "
    "Not validated for diagnosis, screening or any clinical decision."
)
TASK = "malignancy of one lung nodule in chest CT, with the model's own activation map"
# Keys of the record stored as JSON in ONNX metadata_props (the rest of the metadata are plain strings).
CARD_KEYS = ("preprocessing", "network_data_format", "decision", "training_data", "members")


def layout_from_channels(channels: int, layout_json: list[dict] | None = None) -> list[dict] | None:
    """The channel layout ``[{z_offset_mm, p}]``: the dataset's own when known, else the paper's for
    ``channels`` in {1, 3, 11, 21}; None when neither says how the channels were made."""
    from nodulekit.datasets import CHANNEL_CHOICES, channel_layout

    if layout_json:
        return [{"z_offset_mm": float(c["z_offset_mm"]), "p": float(c["p"])} for c in layout_json]
    if channels not in CHANNEL_CHOICES:
        return None
    return [{"z_offset_mm": float(s.z_offset_mm), "p": float(s.p)} for s in channel_layout(channels)]


def preprocessing(layout: list[dict]) -> dict[str, Any]:
    """How to build the model input ``x`` from a CT, for one nodule (centre and diameter given)."""
    from nodulekit.datasets import HU_WINDOW
    from nodulekit.extract import MIN_WINDOW_MM, WINDOW_DIAMETERS, Z_OFFSETS_MM

    lo, hi = HU_WINDOW
    return {
        "intensity_unit": "Hounsfield units (DICOM: stored values through the modality LUT, RescaleSlope/Intercept)",
        "axes": "x[c, row, col]: rows run towards the patient's posterior (+y in LPS), columns towards the "
        "patient's left (+x in LPS); channel c is one axial plane",
        "centre": "the nodule centre (sub-voxel); from a nodule mask: the mean position of its voxels",
        "diameter": "the equivalent diameter (6 V / pi)^(1/3) mm, V = voxel count x voxel volume of the "
        "nodule mask, or a diameter given with the centre",
        "z_resampling": {
            "step_mm": 1.0,
            "offsets_mm": [float(v) for v in Z_OFFSETS_MM],
            "method": "each plane at centre z + offset is the linear interpolation of the two source slices "
            "around it; beyond the first/last slice the end slice is repeated",
        },
        "in_plane_window": {
            "side": f"max({WINDOW_DIAMETERS} x diameter, {MIN_WINDOW_MM:g} mm) in source pixels, rounded up to "
            "an odd count, centred on the pixel nearest the centre",
            "rounding": "HU rounded to whole numbers after the z interpolation",
            "outside_scan": "the nearest edge pixel is repeated",
        },
        "channels": [
            {"index": i, "z_offset_mm": c["z_offset_mm"], "p": c["p"], "crop_side": f"{c['p']:g} x diameter"}
            for i, c in enumerate(layout)
        ],
        "crop": {
            "rule": f"a square of side p x diameter centred on the nodule centre, sampled on a {INPUT_SIZE}x{INPUT_SIZE} grid",
            "sample_points": f"output pixel j samples centre + (j + 0.5 - {INPUT_SIZE // 2}) x side / {INPUT_SIZE} "
            "(mm, per axis) in the window's pixel coordinates",
            "interpolation": "bilinear (scipy.ndimage.map_coordinates, order=1, mode='nearest')",
        },
        "intensity_scaling": {
            "hu_window": [lo, hi],
            "formula": f"x = (clip(HU, {lo:g}, {hi:g}) - ({lo:g})) / {hi - lo:g}, clipped before the in-plane interpolation",
            "value_range": [0.0, 1.0],
        },
    }


def network_data_format(channels: int, layout: list[dict] | None, map_hw, n_members: int) -> dict[str, Any]:
    """MONAI-bundle-style description of the graph's input and outputs."""
    channel_def = (
        {str(i): f"plane at {c['z_offset_mm']:+g} mm, crop side {c['p']:g} x diameter" for i, c in enumerate(layout)}
        if layout
        else {str(i): "unknown" for i in range(channels)}
    )
    classes = {str(i): name for i, name in enumerate(CLASS_NAMES)}
    maps = {"type": "image", "format": "activation map (raw, unnormalised)", "num_channels": 2, "dtype": "float32"}
    outputs = {
        "prob": {
            "type": "probabilities",
            "format": "softmax over classes",
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


def require_layout(card: dict[str, Any], what: str) -> list[dict]:
    """The channel layout of a described model, or a one-line refusal when it is not known."""
    layout = (card.get("preprocessing") or {}).get("channels")
    channels = int(card["network_data_format"]["inputs"]["x"]["num_channels"])
    if not layout:
        raise NodulekitError(
            f"{what} does not say how its {channels} input channels are made from a CT (no channel layout); "
            "predict can only fill channels it knows: export the model from a nodulekit RUNDIR"
        )
    if len(layout) != channels:
        raise NodulekitError(f"{what}: its channel layout lists {len(layout)} channels but the model takes {channels}")
    from nodulekit.extract import Z_OFFSETS_MM

    for c in layout:
        if not (Z_OFFSETS_MM[0] <= c["z_offset_mm"] <= Z_OFFSETS_MM[-1]) or not 0 < c["p"] <= 4:
            raise NodulekitError(
                f"{what}: channel {c['index']} (z {c['z_offset_mm']:+g} mm, side {c['p']:g} x diameter) lies "
                f"outside what predict samples (z within {Z_OFFSETS_MM[0]:+g}..{Z_OFFSETS_MM[-1]:+g} mm, side <= 4 x diameter)"
            )
    return layout


def to_metadata(card: dict[str, Any]) -> dict[str, str]:
    """The record as ONNX ``metadata_props`` entries (strings; structured values as JSON)."""
    meta = {"description_schema": SCHEMA, "task": TASK, "intended_use": INTENDED_USE}
    for key in CARD_KEYS:
        meta[key] = json.dumps(card[key], sort_keys=False)
    return meta


def from_metadata(meta: dict[str, str], where: str) -> dict[str, Any]:
    """The record stored in an ONNX file's metadata; one-line error when absent or malformed."""
    if meta.get("description_schema") != SCHEMA:
        found = meta.get("description_schema", "none")
        raise NodulekitError(
            f"{where} carries no nodulekit model description ({SCHEMA}; found {found}); re-export it with "
            "this nodulekit's `export-onnx`"
        )
    card: dict[str, Any] = {"schema": SCHEMA, "task": meta.get("task"), "intended_use": meta.get("intended_use")}
    for key in CARD_KEYS:
        try:
            card[key] = json.loads(meta[key])
        except (KeyError, TypeError, ValueError):
            raise NodulekitError(f"{where}: model description entry {key!r} is missing or not valid JSON") from None
    for key in ("arch", "map_kind", "nodulekit_version", "model_config"):
        card[key] = meta.get(key, "unknown")
    return card


# ----------------------------------------------------------------------------- from a run


def _dataset_rows(run: dict[str, Any], rundir) -> dict[str, list] | None:
    """Nodule ids, test folds and series UIDs of the run's dataset rows, when they can be known.

    From the dataset file when it is still where run.json says and is the run's (same
    fingerprint); else from the fold results in RUNDIR (each lists its test fold's ids).
    """
    from pathlib import Path

    from nodulekit.datasets import dataset_fingerprint, load_dataset
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
            }
    if rundir is None:
        return None
    try:
        results = Run(rundir).fold_results()
    except NodulekitError:
        return None
    ids = [i for r in results for i in r.test_nodule_id]
    folds = [r.fold for r in results for _ in r.test_nodule_id]
    return {"nodule_id": ids, "fold": folds, "series_uid": None}


def training_data(run: dict[str, Any], member_folds: list[int | None], rundir=None) -> dict[str, Any]:
    """What the model was trained on: dataset identity and size, and the nodules each member saw."""
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
    }
    rows = _dataset_rows(run, rundir) if all(k is not None for k in member_folds) else None
    if rows is not None:
        used = [i for i, f in enumerate(rows["fold"]) if any(f != k for k in member_folds)]
        record["nodule_ids"] = sorted({rows["nodule_id"][i] for i in used})
        if rows["series_uid"] is not None:
            record["series_uids"] = sorted({rows["series_uid"][i] for i in used})
    return record


def map_grid(model, channels: int) -> tuple[int, int]:
    """(h, w) of the model's activation map, from one forward pass on zeros."""
    import torch

    with torch.inference_mode():
        _, amap = model.eval().activation_map(torch.zeros(2, channels, INPUT_SIZE, INPUT_SIZE))
    return int(amap.shape[-2]), int(amap.shape[-1])


def build_card(models: list, run: dict[str, Any], members: list[dict], rundir=None) -> dict:
    """The model description of one fold model or a fold ensemble (``members``: [{fold, epoch}])."""
    from nodulekit import __version__

    first = models[0]
    channels = int(first.in_channels)
    ds = run.get("dataset") if isinstance(run.get("dataset"), dict) else {}
    layout = layout_from_channels(channels, ds.get("channel_layout"))
    return {
        "schema": SCHEMA,
        "task": TASK,
        "intended_use": INTENDED_USE,
        "arch": str(getattr(first, "arch", type(first).__name__)),
        "map_kind": str(first.map_kind),
        "model_config": json.dumps(getattr(first, "config", {}) or {}, default=str, sort_keys=True),
        "nodulekit_version": __version__,
        "members": members,
        "preprocessing": preprocessing(layout) if layout is not None else None,
        "network_data_format": network_data_format(channels, layout, map_grid(first, channels), len(models)),
        "decision": decision(float(run.get("threshold", THRESHOLD)), run.get("label_rule")),
        "training_data": training_data(run, [m.get("fold") for m in members], rundir),
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
        ("centre", pre["centre"]),
        ("diameter", pre["diameter"]),
        ("z", f"{pre['z_resampling']['step_mm']:g} mm planes; {pre['z_resampling']['method']}"),
        ("in-plane", f"{pre['crop']['rule']}; {pre['crop']['sample_points']}; {pre['crop']['interpolation']}"),
        ("window", f"HU {pre['intensity_scaling']['hu_window']}: {pre['intensity_scaling']['formula']}"),
        ("axes", pre["axes"]),
    ]
    return lines


def render(card: dict[str, Any]) -> str:
    """The description as aligned text (``nodulekit describe``)."""
    td = card.get("training_data") or {}
    outs = card["network_data_format"]["outputs"]
    n_ids = len(td.get("nodule_ids") or [])
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
        ("decision", card["decision"]["rule"]),
        ("label rule", json.dumps(card["decision"].get("label_rule"))),
        (
            "training data",
            f"{td.get('dataset_name')}: {td.get('n_nodules')} nodules ({td.get('n_malignant')} malignant), "
            f"{td.get('n_folds')} {td.get('split')} folds, fingerprint {td.get('fingerprint')}; "
            + (f"{n_ids} training nodule ids listed" if n_ids else "training nodule ids unknown"),
        ),
        ("nodulekit", str(card.get("nodulekit_version"))),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
