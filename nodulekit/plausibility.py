"""Warnings before a plausible wrong answer: inputs ``predict`` can score but should not be trusted.

A model scores whatever crop it is given, so a centre with the RAS/LPS signs swapped (it lands
in lung or air), a diameter typed in centimetres, or a one-voxel fragment of a label mask all
return a probability that looks like any other. Checked here, per nodule, before the model runs:

- ``centre_in_air``: the HU of the voxel nearest the centre is below ``AIR_HU`` (outside the
  body or in a lung's air; often a coordinate-frame mistake);
- ``centre_in_lung``: between ``AIR_HU`` and ``LUNG_HU``, lung parenchyma, lower than any LIDC-IDRI
  nodule's centre (where the RAS/LPS sign swap of a real nodule's centre landed, at -808 HU);
- ``diameter_looks_like_cm`` / ``diameter_implausible``: below ``CM_LIKE_MM`` (LIDC-IDRI's
  readers outlined nodules of 3 mm and more, so 1.3 is likely 1.3 cm) or above ``MAX_NODULE_MM``;
- ``diameter_outside_training`` / ``spacing_outside_training`` / ``centre_hu_outside_training``:
  outside the ranges the model description records for its training data (when it records them);
- mask components under ``--min-diameter`` (default ``MIN_DIAMETER_MM``) are fragments: they are
  skipped with a warning instead of being scored as nodules.

Each warning is a ``{"code", "message"}`` record, listed in the nodule's JSON line under
``warnings`` and printed on stderr; ``--strict`` refuses the whole request instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nodulekit.errors import NodulekitError

AIR_HU = -900.0  # lung parenchyma is about -850..-700 HU; below -900 is air
# Below any LIDC-IDRI nodule centre: the 656 nodules of the shared VOIs (D11C) have centre
# pixels of -722 HU at the lowest (0.5th percentile -702, median 24): a centre at -808 HU is lung.
LUNG_HU = -750.0
CM_LIKE_MM = 3.0  # LIDC-IDRI readers outlined nodules >= 3 mm: a smaller "diameter" is likely in cm
MAX_NODULE_MM = 60.0  # twice the 30 mm nodule/mass boundary: not a nodule this model has seen the like of
MIN_DIAMETER_MM = 3.0  # mask components smaller than this are fragments, not nodules


def training_ranges(card: dict[str, Any]) -> dict[str, tuple[float, float]] | None:
    """``{quantity: (min, max)}`` of the training data's ranges the model description records
    (:func:`nodulekit.modelcard.training_ranges`); None when it records none (older model files)."""
    from nodulekit.modelcard import RANGE_QUANTITIES
    from nodulekit.modelcard import training_ranges as recorded

    ranges = recorded(card)
    found = {k: (r.min, r.max) for k in RANGE_QUANTITIES if (r := getattr(ranges, k)) is not None}
    return found or None


def centre_hu(scan, centre) -> float:
    """HU of the volume voxel nearest a fractional (row, col, slice) centre (the training ranges record
    the centre pixel of the window's 0 mm plane: the same voxel up to interpolation in z)."""
    hu = scan.volume.hu
    idx = tuple(int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(centre, hu.shape, strict=True))
    return float(hu[idx])


def _warning(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _outside(value: float, bounds: tuple[float, float]) -> bool:
    return not (bounds[0] <= value <= bounds[1])


def _swapped_hint(scan, spec) -> str:
    """For a centre given in mm: what lies at the point with x and y negated (the RAS/LPS mistake)."""
    if spec.mask is not None:
        return ""
    x, y, z = scan.voxel_to_lps(spec.centre)
    rck = scan.lps_to_voxel((-x, -y, z))
    if any(not (-0.5 <= v <= n - 0.5) for v, n in zip(rck, scan.volume.shape, strict=True)):
        return ""
    other = centre_hu(scan, rck)
    if other < LUNG_HU:
        return ""
    return f"; with x and y negated (RAS<->LPS) it would lie at {other:.0f} HU: check --coords"


def scan_warnings(scan, ranges) -> list[dict[str, str]]:
    """Warnings about the scan itself (its spacing), shared by all its nodules."""
    if not ranges:
        return []
    out = []
    row, col, sl = scan.spacing
    for key, value, what in (
        ("pixel_spacing_mm", min(row, col), "pixel spacing"),  # the smaller of the two, as recorded
        ("slice_spacing_mm", sl, "slice spacing"),
    ):
        if key in ranges and _outside(value, ranges[key]):
            lo, hi = ranges[key]
            out.append(
                _warning(
                    "spacing_outside_training",
                    f"{what} {value:.3g} mm lies outside the training data's {lo:.3g}..{hi:.3g} mm",
                )
            )
    return out


def nodule_warnings(scan, spec, ranges) -> list[dict[str, str]]:
    """Warnings about one nodule's centre and diameter."""
    out = []
    d = float(spec.diameter_mm)
    if d < CM_LIKE_MM:
        out.append(
            _warning(
                "diameter_looks_like_cm",
                f"diameter {d:g} mm is below the {CM_LIKE_MM:g} mm of the smallest nodules LIDC-IDRI's readers "
                f"outlined: if it is in cm, give {10 * d:g}",
            )
        )
    elif d > MAX_NODULE_MM:
        out.append(
            _warning(
                "diameter_implausible", f"diameter {d:g} mm is larger than any lung nodule (> {MAX_NODULE_MM:g} mm)"
            )
        )
    if ranges and "diameter_mm" in ranges and _outside(d, ranges["diameter_mm"]):
        lo, hi = ranges["diameter_mm"]
        out.append(
            _warning(
                "diameter_outside_training", f"diameter {d:g} mm lies outside the training nodules' {lo:g}..{hi:g} mm"
            )
        )
    hu = centre_hu(scan, spec.centre)
    if hu < AIR_HU:
        out.append(
            _warning("centre_in_air", f"the centre lies in air ({hu:.0f} HU < {AIR_HU:g}){_swapped_hint(scan, spec)}")
        )
    elif hu < LUNG_HU:
        out.append(
            _warning(
                "centre_in_lung",
                f"the centre lies in lung parenchyma ({hu:.0f} HU < {LUNG_HU:g}, below any LIDC-IDRI nodule's centre)"
                + _swapped_hint(scan, spec),
            )
        )
    elif ranges and "centre_hu" in ranges and _outside(hu, ranges["centre_hu"]):
        lo, hi = ranges["centre_hu"]
        out.append(
            _warning(
                "centre_hu_outside_training",
                f"the centre's {hu:.0f} HU lies outside the training nodules' centres ({lo:.0f}..{hi:.0f} HU)"
                + _swapped_hint(scan, spec),
            )
        )
    return out


def drop_fragments(specs: list, min_diameter: float) -> tuple[list, list[str]]:
    """Mask nodules smaller than ``min_diameter`` removed, with one line per fragment skipped.

    Refuses when nothing is left: every component being a fragment is a wrong mask, not an empty answer."""
    small = [s.mask is not None and s.diameter_mm < min_diameter for s in specs]
    kept = [s for s, f in zip(specs, small, strict=True) if not f]
    skipped = [s for s, f in zip(specs, small, strict=True) if f]
    lines = [
        f"{s.origin}: skipped, a {s.diameter_mm:.2f} mm fragment (< --min-diameter {min_diameter:g} mm)"
        for s in skipped
    ]
    if not kept:
        largest = max(s.diameter_mm for s in specs)
        raise NodulekitError(
            f"every mask component is smaller than --min-diameter {min_diameter:g} mm (largest {largest:.2f} mm)"
        )
    return kept, lines


def check_options(min_diameter: float | None, mask) -> float:
    """The fragment size in use; ``--min-diameter`` only means something for a mask."""
    if min_diameter is None:
        return MIN_DIAMETER_MM
    if mask is None:
        raise NodulekitError(
            "--min-diameter applies to --mask components; with --centre or --nodules it checks nothing"
        )
    if not (np.isfinite(min_diameter) and min_diameter >= 0):
        raise NodulekitError(f"--min-diameter must be a number of mm >= 0 (got {min_diameter:g})")
    return float(min_diameter)


def check_request(scan, specs: list, card: dict[str, Any], min_diameter: float, strict: bool):
    """(kept specs, per-spec warnings, request-level lines, note) before the model runs.

    ``strict``: any warning or skipped fragment is a :class:`NodulekitError` instead."""
    ranges = training_ranges(card)
    specs, skipped = drop_fragments(specs, min_diameter)
    shared = scan_warnings(scan, ranges)
    own = [nodule_warnings(scan, s, ranges) for s in specs]
    lines = skipped + [f"scan: {w['message']}" for w in shared]
    lines += [f"nodule {s.id}: {w['message']}" for s, ws in zip(specs, own, strict=True) for w in ws]
    per_spec = [shared + ws for ws in own]
    if strict and lines:
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise NodulekitError(f"--strict: {lines[0]}{more}")
    note = None if ranges else "the model records no training ranges: diameter, spacing and HU range checks are off"
    return specs, per_spec, lines, note
