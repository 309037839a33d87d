"""A nodule's centre and size, from its mask: one definition for every source.

``extract`` crops every nodule around the centroid of its readers' consensus mask, in a
window scaled by the mask's equivalent diameter, on both the DICOM and the VOI path;
the same function gives the same centre and diameter for a user's own mask.

Library use::

    from nodulekit.geometry import nodule_geometry
    g = nodule_geometry(mask, (0.7, 0.7, 2.5))  # mask[row, col, slice], spacing in mm
    g.centre_voxel, g.diameter_mm
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nodulekit.errors import DataError

DEFINITION = (
    "centre: centroid (mean voxel index) of the mask; diameter: (6 V / pi)^(1/3) with "
    "V = voxel count x voxel volume (row x column x slice spacing)"
)


@dataclass(frozen=True)
class NoduleGeometry:
    centre_voxel: tuple[float, float, float]  # fractional (row, col, slice) index of the centroid
    diameter_mm: float  # equivalent (sphere) diameter
    volume_mm3: float
    n_voxels: int


def nodule_geometry(mask: np.ndarray, spacing: Sequence[float], what: str = "mask") -> NoduleGeometry:
    """Centroid and equivalent diameter ``(6 V / pi)^(1/3)`` of a 3-D boolean ``mask``.

    ``mask[row, col, slice]``; ``spacing`` = (row, column, slice) spacing in mm. An
    empty mask or a non-positive spacing is a one-line :class:`DataError` naming ``what``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DataError(f"{what} is not a 3-D mask (shape {mask.shape})")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{what}: voxel spacing {spacing} is not three positive numbers")
    idx = np.argwhere(mask > 0)
    if idx.size == 0:
        raise DataError(f"{what} is empty: no centre or diameter")
    volume = len(idx) * spacing[0] * spacing[1] * spacing[2]
    centre = idx.mean(axis=0)
    return NoduleGeometry(
        centre_voxel=(float(centre[0]), float(centre[1]), float(centre[2])),
        diameter_mm=float((6.0 * volume / math.pi) ** (1.0 / 3.0)),
        volume_mm3=float(volume),
        n_voxels=int(len(idx)),
    )
