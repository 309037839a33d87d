"""Region scores: where an activation map puts its energy relative to the readers' contour.

On the 32x32 input grid, from the consensus mask of one input channel (``map_channel``: the
centre slice at ROI side 2 x diameter, channel 0 of D3C) and a physical radius r (mm; that
channel's pixel size from the dataset's ``pixel_mm``):

- *body*        = mask eroded by r  (pixels deeper than r inside the contour),
- *margin band* = (mask dilated by r) minus body (within r of the contour, either side),
- *outside*     = the rest (farther than r outside the contour).

Distances come from Euclidean distance transforms in mm (``scipy.ndimage``), so r means
the same for every pixel size. A map is first made non-negative by clipping at 0: we score
only positive evidence for the class (Grad-CAM is already ReLU'd; CAM/SAM/HESAM can be
negative where a feature speaks against the class). For each map m and region R:

- energy share   E_R = sum_{p in R} m(p) / sum_p m(p)
- enrichment     E_R / (|R| / |all|)   (1.0 = no preference; NaN for an empty region)
- pointing game  the region holding argmax_p m(p) ("none" for a constant map)

A map that is zero everywhere after clipping has undefined shares (NaN, ``empty_map``).
Summaries give each mean with a 95 % interval from a bootstrap over patients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.constants import CLASS_NAMES, MALIGNANT, patient_of, predict_label
from nodulekit.errors import NodulekitError
from nodulekit.stats import BOOTSTRAP_RESAMPLES

REGIONS = ("body", "margin_band", "outside")
CLASS_NAME = {-1: "unknown", **dict(enumerate(CLASS_NAMES))}


def region_labels(mask: np.ndarray, pixel_mm: float | Sequence[float], radius_mm: float) -> np.ndarray:
    """Label image (0 body, 1 margin band, 2 outside) of a 2-D mask with pixels of ``pixel_mm``."""
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise NodulekitError(f"region_labels needs a 2-D mask, got shape {mask.shape}")
    if radius_mm < 0:
        raise NodulekitError(f"radius must be >= 0 mm, got {radius_mm}")
    if not mask.any():
        raise NodulekitError("the consensus mask is empty: no body or margin band to score against")
    sampling = np.broadcast_to(np.asarray(pixel_mm, float), (2,))
    if not np.all(sampling > 0):
        raise NodulekitError(f"pixel size must be positive, got {pixel_mm} mm")
    # Erosion by a disc of radius r keeps pixels whose nearest background pixel is farther than r.
    # A mask filling the grid has no contour on it (scipy would measure to a phantom background
    # pixel beyond a corner): all of it is body.
    if mask.all():
        body = np.ones(mask.shape, bool)
    else:
        body = ndimage.distance_transform_edt(mask, sampling=sampling) > radius_mm
    # Dilation by r adds pixels whose nearest mask pixel is within r.
    dilated = ndimage.distance_transform_edt(~mask, sampling=sampling) <= radius_mm
    labels = np.full(mask.shape, 2, np.int8)
    labels[dilated] = 1
    labels[body] = 0
    return labels


def map_region_scores(maps: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of maps [N, H, W] against region labels [N, H, W] (vectorised over N).

    Returns ``area_<R>``, ``share_<R>``, ``enrichment_<R>`` [N] for each region, ``pointing``
    (region name of the argmax, or "none") and ``empty_map`` [N].
    """
    m = np.clip(np.asarray(maps, np.float64), 0, None)  # positive evidence only
    n = m.shape[0]
    flat, lab = m.reshape(n, -1), np.asarray(labels).reshape(n, -1)
    if flat.shape != lab.shape:
        raise NodulekitError(f"maps {maps.shape} and region labels {labels.shape} are on different grids")
    total = flat.sum(axis=1)
    empty = total <= 0
    out: dict[str, Any] = {"empty_map": empty}
    with np.errstate(invalid="ignore", divide="ignore"):
        for r, name in enumerate(REGIONS):
            inside = lab == r
            area = inside.mean(axis=1)
            share = np.where(empty, np.nan, (flat * inside).sum(axis=1) / np.where(empty, 1, total))
            out[f"area_{name}"] = area
            out[f"share_{name}"] = share
            out[f"enrichment_{name}"] = np.where(area > 0, share / np.where(area > 0, area, 1), np.nan)
    peak = flat.argmax(axis=1)
    constant = flat.max(axis=1) <= flat.min(axis=1)
    region_at_peak = lab[np.arange(n), peak]
    out["pointing"] = np.where(constant, "none", np.asarray(REGIONS, dtype=object)[region_at_peak])
    return out


def _stratum(values: np.ndarray, threshold: float, high: str, low: str, high_if_ge: bool) -> np.ndarray:
    hi = values >= threshold if high_if_ge else values <= threshold
    return np.where(np.isnan(values), "unrated", np.where(hi, high, low))


def map_channel(ds) -> int:
    """The input channel whose consensus mask and pixel size maps are scored against (and figures show).

    A map lies on the same 32x32 grid as every input channel, so each channel's pixels line up
    with it; what differs between channels is the anatomy and the physical scale. We use the
    centre slice at ROI side p = 2 x diameter: that is the field of view of D1C, D11C and D21C,
    so scores compare across datasets. For D3C (the centre slice at p = 2, 3, 4) it is channel
    0, not the middle channel (p = 3).
    """
    from nodulekit.datasets import CHANNEL_CHOICES, channel_layout

    layout = ds.attrs.get("channel_layout")
    if not layout and ds.channels in CHANNEL_CHOICES:
        layout = [{"z_offset_mm": c.z_offset_mm, "p": c.p} for c in channel_layout(ds.channels)]
    centre = [i for i, c in enumerate(layout or []) if c["z_offset_mm"] == 0]
    return min(centre, key=lambda i: layout[i]["p"]) if centre else ds.channels // 2


def map_labels(maps) -> list[str]:
    """One name per maps artifact: its method, or ``arch method`` where methods repeat (e.g. Grad-CAM of two runs)."""
    methods = [m.method for m in maps]
    labels = [m.method if methods.count(m.method) == 1 else f"{m.arch} {m.method}" for m in maps]
    return [
        lab if labels.count(lab) == 1 else f"{lab} ({Path(m.path).stem})" for lab, m in zip(labels, maps, strict=True)
    ]


def _nodule_regions(ds, rows, ids, channel, radius_mm, radius_frac, skip_empty_masks, path):
    """(kept positions, region labels [n, 32, 32], radius per nodule, pixel size) on ``channel``'s mask."""
    masks = ds.mask[rows, channel] > 0
    empty = ~masks.any(axis=(1, 2))
    if empty.any() and not skip_empty_masks:
        bad = [ids[i] for i in np.flatnonzero(empty)]
        raise NodulekitError(
            f"{len(bad)} nodule(s) have an empty consensus mask on channel {channel} ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}, maps of {path}); pass --skip-empty-masks to leave them out"
        )
    keep = np.flatnonzero(~empty)
    pix = ds.pixel_mm[rows[keep], channel].astype(float)
    if radius_frac is not None:
        radius = radius_frac * np.sqrt(masks[keep].sum(axis=(1, 2)) * pix**2 / np.pi)
    else:
        radius = np.full(len(keep), float(radius_mm))
    labels = (
        np.stack([region_labels(masks[i], p, r) for i, p, r in zip(keep, pix, radius, strict=True)])
        if keep.size
        else np.zeros((0,) + masks.shape[1:], np.int8)
    )
    return keep, labels, radius, pix


def score_maps(
    maps_paths: Sequence[str | Path],
    dataset: str | Path,
    *,
    radius_mm: float = 2.0,
    radius_frac: float | None = None,
    map_class: int = MALIGNANT,
    skip_empty_masks: bool = False,
    channel: int | None = None,
    labels: Sequence[str] | None = None,
):
    """Per-nodule region scores of one or more ``maps`` artifacts (a pandas DataFrame, one row per map).

    ``map_class`` picks which class's map is scored (1 = malignant, 0 = benign). The mask is
    the dataset's consensus mask on ``channel`` (default :func:`map_channel`). The band
    half-width is ``radius_mm``, or with ``radius_frac`` that fraction of each nodule's
    equivalent radius sqrt(mask area / pi) in mm (ROIs are cut at twice the nodule diameter,
    so a fixed mm radius is a larger share of a small nodule than of a large one). Column
    ``map`` names each maps file: ``labels`` if given, else :func:`map_labels`.
    """
    import pandas as pd

    from nodulekit.artifacts import read_maps
    from nodulekit.datasets import load_dataset

    if not maps_paths:
        raise NodulekitError("give at least one maps file")
    if radius_frac is not None and not radius_frac >= 0:
        raise NodulekitError(f"radius fraction must be >= 0, got {radius_frac}")
    if radius_frac is None and not radius_mm >= 0:
        raise NodulekitError(f"radius must be >= 0 mm, got {radius_mm}")
    rule = f"r = {radius_frac:g} x equivalent radius" if radius_frac is not None else f"r = {radius_mm:g} mm"
    ds = load_dataset(dataset)
    channel = map_channel(ds) if channel is None else int(channel)
    if not 0 <= channel < ds.channels:
        raise NodulekitError(f"--channel {channel} does not exist; {dataset} has channels 0..{ds.channels - 1}")
    maps = [read_maps(p) for p in maps_paths]
    if labels is not None and (len(labels) != len(maps) or len(set(labels)) != len(labels)):
        raise NodulekitError(f"give one distinct label per maps file ({len(maps)}), got {list(labels)}")
    row_of = {nid: i for i, nid in enumerate(ds.nodule_id.tolist())}
    frames = []
    for m, label in zip(maps, map_labels(maps) if labels is None else labels, strict=True):
        rows = _dataset_rows(m, ds, row_of, map_class, dataset)
        keep, labels, radius, pix = _nodule_regions(
            ds, rows, m.nodule_id, channel, radius_mm, radius_frac, skip_empty_masks, m.path
        )
        frame = _score_frame(ds, m, label, keep, rows[keep], labels, map_class)
        frame["band_rule"], frame["radius_mm"], frame["pixel_mm"], frame["mask_channel"] = rule, radius, pix, channel
        frame.attrs["skipped_empty_masks"] = int(len(rows) - len(keep))
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["skipped_empty_masks"] = {
        str(p): fr.attrs["skipped_empty_masks"] for p, fr in zip(maps_paths, frames, strict=True)
    }
    out.attrs["band_rule"] = rule
    out.attrs["mask_channel"] = channel
    return out


def check_maps_dataset(m, ds) -> None:
    """Refuse, in one line saying what differs, a dataset the maps file ``m`` was not computed on."""
    from nodulekit.datasets import check_identity

    check_identity(m.dataset_identity, ds, str(m.path), ds.path, remedy="re-make it with this version")


def _dataset_rows(m, ds, row_of: dict, map_class: int, dataset) -> np.ndarray:
    """The dataset row of each nodule of maps file ``m``, after checking it maps this dataset."""
    check_maps_dataset(m, ds)
    if m.maps_up.shape[-2:] != ds.mask.shape[-2:]:
        raise NodulekitError(
            f"{m.path}: maps_up grid {m.maps_up.shape[-2:]} differs from the mask grid {ds.mask.shape[-2:]}"
        )
    if not 0 <= map_class < m.maps_up.shape[1]:
        raise NodulekitError(f"{m.path} has {m.maps_up.shape[1]} class maps; class {map_class} does not exist")
    unknown = [n for n in m.nodule_id if n not in row_of]
    if unknown:
        raise NodulekitError(
            f"{m.path}: {len(unknown)} nodule(s) not in {dataset}, e.g. {unknown[0]}; wrong --dataset?"
        )
    return np.array([row_of[n] for n in m.nodule_id], np.int64)


def _score_frame(ds, m, label, keep, rows, labels, map_class):
    import pandas as pd

    y = ds.y[rows]
    prob = np.asarray(m.prob)[keep]
    frame = pd.DataFrame(
        {
            "map": label,
            "method": m.method,
            "arch": m.arch,
            "maps_file": str(m.path),
            "nodule_id": [m.nodule_id[i] for i in keep],
            "patient_id": np.asarray(ds.patient_id[rows]).astype(str),
            "fold": np.asarray(m.fold)[keep],
            "y": y,
            "class": [CLASS_NAME[int(v)] for v in y],
            "prob": prob,
            "correct": predict_label(prob) == y,
            "map_class": CLASS_NAME[map_class],
            "diameter_mm": ds.diameter_mm[rows],
            **map_region_scores(m.maps_up[keep, map_class], labels),
        }
    )
    names = list(ds.attrs.get("characteristic_names", []))
    for name in ("spiculation", "margin", "lobulation"):
        if name in names:
            frame[name] = ds.characteristics[rows, names.index(name)]
    return frame


SUMMARISED = tuple(f"{kind}_{r}" for kind in ("share", "enrichment") for r in REGIONS)


def _patients(df) -> np.ndarray:
    if "patient_id" in df:
        return df["patient_id"].astype(str).to_numpy()
    return np.array([patient_of(n) for n in df["nodule_id"]])


def mean_intervals(values, patients, *, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """Means of the columns of ``values`` [n, k] over their finite entries, with patient-bootstrap intervals.

    Returns (mean, low, high), each [k]; NaN entries (e.g. the enrichment of an empty region)
    are left out of the mean, as ``np.nanmean`` does.
    """
    from nodulekit.stats import cluster_bootstrap

    x = np.asarray(values, np.float64)
    ok = np.isfinite(x)
    x0 = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        res = cluster_bootstrap(patients, lambda w: ((w @ x0) / (w @ ok)).T, n_resamples=n_resamples, seed=seed)
    return res["estimate"], res["low"], res["high"]


def summarise_scores(scores, by: str = "class", *, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """Mean (95 % patient-bootstrap interval) and median energy share and enrichment of each region,
    and pointing-game rates, per map x group.

    ``by`` = ``class`` (malignant/benign), ``spiculation`` (mean rating >= 3 vs < 3) or
    ``margin`` (mean rating <= 3 "poorly defined" vs > 3 "sharp").
    """
    import pandas as pd

    df = scores.copy()
    key = "map" if "map" in df else "method"
    if by == "class":
        group = "class"
    elif by == "spiculation":
        group = "spiculation_group"
        df[group] = _stratum(df["spiculation"].to_numpy(float), 3.0, "spiculated (>=3)", "not spiculated (<3)", True)
    elif by == "margin":
        group = "margin_group"
        df[group] = _stratum(df["margin"].to_numpy(float), 3.0, "poorly defined (<=3)", "sharp (>3)", False)
    else:
        raise NodulekitError(f"unknown grouping {by!r}; use class, spiculation or margin")
    records = []
    for (name, value), part in df.groupby([key, group], sort=False):
        rec: dict[str, Any] = {"map": name, "group_by": by, "group": value, "n": len(part)}
        rec["n_patients"] = len(set(_patients(part)))
        rec["n_empty_maps"] = int(part["empty_map"].sum())
        mean, low, high = mean_intervals(part[list(SUMMARISED)], _patients(part), n_resamples=n_resamples, seed=seed)
        for i, column in enumerate(SUMMARISED):
            rec[f"mean_{column}"], rec[f"mean_{column}_low"], rec[f"mean_{column}_high"] = mean[i], low[i], high[i]
            values = part[column].to_numpy(float)
            rec[f"median_{column}"] = float(np.nanmedian(values)) if np.isfinite(values).any() else np.nan
        for r in REGIONS:
            rec[f"pointing_{r}"] = float((part["pointing"] == r).mean())
        rec["mean_area_margin_band"] = float(part["area_margin_band"].mean())
        records.append(rec)
    out = pd.DataFrame.from_records(records)
    out.attrs.update(n_resamples=n_resamples, seed=seed)
    return out


def _markdown_table(df, columns: Sequence[str], floatfmt: str = "{:.3f}") -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    lines = []
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in (row[c] for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


SUMMARY_COLUMNS = (
    "map",
    "group",
    "n",
    "share_body",
    "share_margin_band",
    "share_outside",
    "enrichment_body",
    "enrichment_margin_band",
    "enrichment_outside",
    "pointing_body",
    "pointing_margin_band",
    "pointing_outside",
)


def interval_text(mean: float, low: float, high: float) -> str:
    """``mean [low, high]`` to 3 decimals; "n/a" for an undefined mean, ``mean [n/a]`` for an
    undefined interval (a stratum of one patient: no patient bootstrap)."""
    if np.isnan(mean):
        return "n/a"
    if np.isnan(low) or np.isnan(high):
        return f"{mean:.3f} [n/a]"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def with_intervals(table):
    """Summary columns as ``mean [low, high]`` text for the Markdown (share_*, enrichment_*)."""
    out = table.copy()
    for column in SUMMARISED:
        out[column] = [
            interval_text(m, lo, hi)
            for m, lo, hi in zip(
                table[f"mean_{column}"], table[f"mean_{column}_low"], table[f"mean_{column}_high"], strict=True
            )
        ]
    return out


def band_rule(scores) -> str:
    if "band_rule" in scores.attrs:
        return scores.attrs["band_rule"]
    return str(scores["band_rule"].iloc[0]) if len(scores) and "band_rule" in scores else "r"


def scores_markdown(scores, summaries: dict[str, Any]) -> str:
    from nodulekit.stats import bootstrap_note

    map_class = scores["map_class"].iloc[0] if len(scores) else "malignant"
    first = next(iter(summaries.values()))
    parts = [
        "# Region scores of activation maps\n",
        f"Map of the **{map_class}** class, clipped at 0; regions from the consensus mask of input channel "
        f"{scores.attrs.get('mask_channel', '?')} (the centre slice at ROI side 2 x diameter), "
        f"{band_rule(scores)}: body = mask eroded by r, margin band = mask dilated by r minus body, "
        "outside = the rest. Share = fraction of map energy in the region (mean over nodules); enrichment = "
        "share / area fraction (1 = no preference; mean over nodules with a non-empty region); pointing = "
        "fraction of nodules whose map peak lies in the region. "
        f"{bootstrap_note(first.attrs['n_resamples'], first.attrs['seed'])}.\n",
    ]
    titles = {
        "class": "By nodule class",
        "spiculation": "By spiculation (mean rating)",
        "margin": "By margin (mean rating; 1 = poorly defined, 5 = sharp)",
    }
    for by, table in summaries.items():
        parts.append(f"\n## {titles[by]}\n\n")
        parts.append(_markdown_table(with_intervals(table), SUMMARY_COLUMNS) if len(table) else "(no rated nodules)\n")
    empty = int(scores["empty_map"].sum()) if len(scores) else 0
    if empty:
        parts.append(f"\n{empty} map(s) were zero everywhere after clipping; their shares are left out.\n")
    skipped = scores.attrs.get("skipped_empty_masks") or {}
    if any(skipped.values()):
        parts.append(f"\nNodules left out for an empty consensus mask: {json.dumps(skipped)}.\n")
    return "".join(parts)


def scores_summaries(scores, *, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The summary tables of a scores table: by class, and by spiculation / margin when rated."""
    return {
        by: summarise_scores(scores, by, n_resamples=n_resamples, seed=seed)
        for by in ("class", "spiculation", "margin")
        if by == "class" or by in scores.columns
    }


def scores_record(scores, summaries: dict[str, Any], *, n_resamples: int, seed: int) -> dict[str, Any]:
    """The JSON record of a scores table: provenance, regions and the summaries."""
    from nodulekit.artifacts import provenance

    return {
        "provenance": provenance(
            stage="scores",
            band_rule=band_rule(scores),
            mask_channel=scores.attrs.get("mask_channel"),
            bootstrap={"n_resamples": n_resamples, "seed": seed, "unit": "patient"},
            maps_files=sorted(set(scores["maps_file"])) if len(scores) else [],
            clipping="maps clipped at 0 (positive evidence for the class)",
        ),
        "regions": list(REGIONS),
        "skipped_empty_masks": scores.attrs.get("skipped_empty_masks", {}),
        "summaries": {by: json.loads(t.to_json(orient="records")) for by, t in summaries.items()},
    }


def write_scores(
    scores,
    out_csv: str | Path,
    *,
    overwrite: bool = False,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    summaries: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write per-nodule CSV plus summary Markdown and JSON beside it (same stem); together or not at all."""
    from nodulekit.outputs import atomic_paths, check_output_path

    out_csv = Path(out_csv)
    paths = {"csv": out_csv, "md": out_csv.with_suffix(".md"), "json": out_csv.with_suffix(".json")}
    if out_csv in (paths["md"], paths["json"]):
        raise NodulekitError(f"{out_csv}: give the scores a .csv name (Markdown and JSON go beside it)")
    for p in paths.values():
        check_output_path(p, overwrite)
    if summaries is None:
        summaries = scores_summaries(scores, n_resamples=n_resamples, seed=seed)
    record = scores_record(scores, summaries, n_resamples=n_resamples, seed=seed)
    with atomic_paths(paths, overwrite=overwrite) as tmp:
        scores.to_csv(tmp["csv"], index=False, float_format="%.6g")
        tmp["md"].write_text(scores_markdown(scores, summaries))
        tmp["json"].write_text(json.dumps(record, indent=2, default=str))
    return paths


SCORE_COLUMNS = ("method", "class", "map_class", "share_margin_band", "share_body")


def read_scores(path: str | Path):
    """A per-nodule scores CSV written by ``nodulekit scores``, or a one-line error naming it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise NodulekitError(f"{path} does not exist or is not a file (give the CSV `nodulekit scores -o` wrote)")
    try:
        table = pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise NodulekitError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise NodulekitError(f"{path} is not a scores table from `nodulekit scores` (no column {', '.join(missing)})")
    if len(table) == 0:
        raise NodulekitError(f"{path} holds no scored maps")
    return table
