"""The one way ``x`` is made from a CT volume, a nodule centre and a diameter (:func:`model_input`).

Two halves, each usable alone, because the LIDC pipeline stores the intermediate window
(``extract`` writes it to ``rois``, ``build`` reads it back):

1. :func:`sample_window`: the planes of the spec (1 mm apart around the centre) on native
   in-plane pixels, HU linearly interpolated in z and rounded half to even to int16;
2. :func:`resample_nodule`: each channel's square crop of side p x diameter, HU clipped to the
   window and scaled to [0, 1], then bilinearly resampled to the 32x32 patch.

``predict`` calls :func:`model_input` (both halves at once); ``extract`` and ``build`` call the
halves. The arithmetic is written out in docs/model-description.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nodulekit.errors import DataError
from nodulekit.inputs.spec import HU_WINDOW, MIN_WINDOW_MM, PLANES_MM, WINDOW_DIAMETERS, Channel, InputSpec

Z_OFFSETS_MM = np.asarray(PLANES_MM, float)  # 21 planes, 1 mm apart
Z_MATCH_MM = 1e-3  # a target z this close to the first/last slice is inside the source


# ----------------------------------------------------------------------------- the window (extract)


def window_side_px(
    diameter_mm: float, pixel_spacing_mm, diameters: float = WINDOW_DIAMETERS, min_mm: float = MIN_WINDOW_MM
) -> int:
    """Odd number of pixels covering max(4.5 x diameter, 16 mm); the smaller spacing of a
    (row, col) pair sizes it, so the window covers the crop along both axes."""
    spacing = float(np.min(np.atleast_1d(np.asarray(pixel_spacing_mm, float))))
    side_mm = max(diameters * float(diameter_mm), min_mm)
    n = int(math.ceil(side_mm / spacing - 1e-9))
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
    planes_mm=Z_OFFSETS_MM,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ``[planes, S, S]`` HU window (int16) and label window (uint8) around a nodule centre.

    ``hu[row, col, slice]`` with slice positions ``zvals`` (increasing, mm). Rows and
    columns are native pixels ``round(centre) - S//2 ...`` (round half to even); each output
    plane is the linear interpolation in z of the two source slices around ``centre_z + offset``,
    rounded half to even. ``labels`` (e.g. the readers' agreement count) sits at ``labels_offset``
    within ``hu``'s grid; each output plane takes the nearest source slice (a tie goes to the
    upper one), so counts stay counts; it is 0 more than half a slice step beyond the source's
    first or last slice, and outside the source in-plane.
    """
    zvals = np.asarray(zvals, float)
    planes_mm = np.asarray(planes_mm, float)
    n_rows, n_cols, n_slices = hu.shape
    half = side_px // 2
    r0 = int(round(centre_rc[0])) - half
    c0 = int(round(centre_rc[1])) - half
    rows, row_in = _index_with_fill(n_rows, r0 + np.arange(side_px))
    cols, col_in = _index_with_fill(n_cols, c0 + np.arange(side_px))
    targets = centre_z_mm + planes_mm
    z_outside = (targets < zvals[0] - Z_MATCH_MM) | (targets > zvals[-1] + Z_MATCH_MM)
    # np.interp clamps outside the source: edge replication of the first/last slice.
    kf = np.interp(targets, zvals, np.arange(n_slices, dtype=float)) if n_slices > 1 else np.zeros_like(targets)
    hu_win = _interpolate_slices(hu, np.ix_(rows, cols), kf)
    label_win = np.zeros((len(targets), side_px, side_px), np.uint8)
    if labels is not None:
        label_win = _nearest_label_slices(labels, labels_offset, (rows, row_in), (cols, col_in), kf, targets, zvals)
    info = {
        "z_filled": int(z_outside.sum()),
        "z_filled_offsets_mm": [float(v) for v in planes_mm[z_outside]],
        "inplane_filled": int(side_px * side_px - row_in.sum() * col_in.sum()),
        "window_origin_rc": (r0, c0),
        # [start, stop) of the window rows/columns that lie inside the source (the rest is filled)
        "valid_rows": _valid_range(row_in),
        "valid_cols": _valid_range(col_in),
        "centre_in_window_rc": (float(centre_rc[0] - r0), float(centre_rc[1] - c0)),
    }
    return hu_win, label_win, info


def _interpolate_slices(hu: np.ndarray, plane, kf: np.ndarray) -> np.ndarray:
    """HU at fractional slice indices ``kf`` on the in-plane index grid ``plane``: int16 [len(kf), S, S]."""
    k_lo = np.floor(kf).astype(int)
    k_hi = np.minimum(k_lo + 1, hu.shape[2] - 1)
    w = kf - k_lo
    out = np.empty((len(kf),) + (len(plane[0]), plane[1].shape[1]), np.float64)
    for t in range(len(kf)):
        lo = hu[:, :, k_lo[t]][plane].astype(np.float64)
        hi = hu[:, :, k_hi[t]][plane].astype(np.float64)
        out[t] = (1 - w[t]) * lo + w[t] * hi
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def _nearest_label_slices(labels, offset, row_index, col_index, kf, targets, zvals) -> np.ndarray:
    """Labels (at ``offset`` in the volume) on the window: nearest slice, 0 outside the source."""
    m = np.asarray(labels, np.uint8)
    (rows, row_in), (cols, col_in) = row_index, col_index
    mr, mc, mk = offset
    mrows, mcols = rows - mr, cols - mc
    ok_r = row_in & (mrows >= 0) & (mrows < m.shape[0])
    ok_c = col_in & (mcols >= 0) & (mcols < m.shape[1])
    sub_plane = np.ix_(np.clip(mrows, 0, m.shape[0] - 1), np.clip(mcols, 0, m.shape[1] - 1))
    valid_plane = np.outer(ok_r, ok_c)
    k_near = np.floor(kf + 0.5).astype(int)
    # the nearest slice counts while it is nearer than half a slice step (as inside the source)
    step_lo, step_hi = (zvals[1] - zvals[0], zvals[-1] - zvals[-2]) if len(zvals) > 1 else (0.0, 0.0)
    near = (targets >= zvals[0] - step_lo / 2 - Z_MATCH_MM) & (targets < zvals[-1] + step_hi / 2 - Z_MATCH_MM)
    out = np.zeros((len(targets), len(rows), len(cols)), np.uint8)
    for t in range(len(targets)):
        kk = k_near[t] - mk
        if near[t] and 0 <= kk < m.shape[2]:
            out[t] = np.where(valid_plane, m[:, :, kk][sub_plane], 0)
    return out


# ----------------------------------------------------------------------------- the channels (build)


def normalise_hu(hu: np.ndarray, hu_window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """Clip HU to the window (default [-1000, 400]) and scale linearly to [0, 1], in float32."""
    lo, hi = hu_window
    return ((np.clip(np.asarray(hu, np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def sample_grid(
    shape_yx: tuple[int, int],
    spacing_yx: tuple[float, float],
    layout,
    diameter_mm: float,
    nodule_id: str = "?",
    centre_yx: tuple[float, float] | None = None,
    patch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (into a [planes, H, W] window) of every output pixel, and pixel_mm per channel.

    ``layout``: objects with ``z_index`` (the plane) and ``p``. ``centre_yx`` is the nodule
    centre in window pixel-index coordinates (sub-pixel); without it, the geometric centre of
    the window, ((H-1)/2, (W-1)/2). Output pixel j of a patch of side ``side_mm`` samples the
    window at ``centre + (j + 0.5 - 16) * (side_mm / 32 / spacing)``, so the 32 output pixels
    tile the square [centre - side/2, centre + side/2] exactly.
    """
    from nodulekit.constants import INPUT_SIZE

    patch = INPUT_SIZE if patch is None else patch
    h, w = shape_yx
    sy, sx = spacing_yx
    cy, cx = ((h - 1) / 2.0, (w - 1) / 2.0) if centre_yx is None else (float(centre_yx[0]), float(centre_yx[1]))
    steps = np.arange(patch, dtype=np.float64) + 0.5 - patch / 2.0
    coords = np.empty((3, len(layout), patch, patch), np.float64)
    pixel_mm = np.empty(len(layout), np.float32)
    for c, spec in enumerate(layout):
        step_mm = spec.p * diameter_mm / patch  # float64 for the coordinates
        pixel_mm[c] = step_mm
        ys = cy + steps * (step_mm / sy)
        xs = cx + steps * (step_mm / sx)
        coords[0, c] = spec.z_index
        coords[1, c] = ys[:, None]
        coords[2, c] = xs[None, :]
    # Output pixel centres may lie up to half an input pixel beyond the outermost input
    # centre (edge replication covers that); anything further means the window is too small.
    if coords[1].min() < -0.5 or coords[1].max() > h - 0.5 or coords[2].min() < -0.5 or coords[2].max() > w - 0.5:
        worst = max(s.p for s in layout) * diameter_mm
        raise DataError(
            f"nodule {nodule_id}: its rois window ({h}x{w} px at {sy:.3g}x{sx:.3g} mm = "
            f"{h * sy:.1f}x{w * sx:.1f} mm) is smaller than the {worst:.1f} mm patch this dataset needs"
        )
    return coords, pixel_mm


def resample_nodule(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing_yx: tuple[float, float],
    diameter_mm: float,
    layout,
    nodule_id: str = "?",
    z_first: int = 0,
    centre_yx: tuple[float, float] | None = None,
    hu_window: tuple[float, float] = HU_WINDOW,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One nodule's channels: (x float32 [C,32,32] in [0,1], mask uint8 [C,32,32], pixel_mm [C]).

    ``hu``/``mask`` are the window [planes, H, W], or a slab of it starting at plane
    ``z_first`` (so D1C and D3C need read only the centre plane). ``layout``: objects with
    ``z_index`` and ``p`` (:class:`ChannelSpec`). ``centre_yx``: see :func:`sample_grid`.
    """
    from scipy.ndimage import map_coordinates

    hu = np.asarray(hu)
    mask = np.asarray(mask)
    if hu.ndim != 3:
        raise DataError(f"nodule {nodule_id}: hu has shape {hu.shape}, expected [{len(PLANES_MM)}, S, S]")
    if mask.shape != hu.shape:
        raise DataError(f"nodule {nodule_id}: mask shape {mask.shape} differs from hu shape {hu.shape}")
    z = [s.z_index - z_first for s in layout]
    if min(z) < 0 or max(z) >= hu.shape[0]:
        raise DataError(f"nodule {nodule_id}: hu slab of {hu.shape[0]} slices lacks slices this dataset needs")
    coords, pixel_mm = sample_grid(hu.shape[1:], spacing_yx, layout, diameter_mm, nodule_id, centre_yx)
    coords[0] -= z_first
    # Clip before interpolating so out-of-field padding (e.g. -2048) cannot bleed into
    # neighbouring pixels; the z coordinates are whole planes, so z is never interpolated here.
    x = map_coordinates(normalise_hu(hu, hu_window), coords, order=1, mode="nearest")
    m = map_coordinates((mask > 0).astype(np.float32), coords, order=1, mode="nearest")
    return np.clip(x, 0.0, 1.0).astype(np.float32), (m >= 0.5).astype(np.uint8), pixel_mm


def resample_levels(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """A count map (e.g. the readers' agreement) on the sample grid ``coords``, as uint8.

    Each level set ``labels >= j`` is resampled like a mask (linear, kept where >= 0.5) and
    the sets are stacked, so ``result >= j`` is exactly the resampled region of level j.
    """
    from scipy.ndimage import map_coordinates

    labels = np.asarray(labels)
    out = np.zeros(coords.shape[1:], np.uint8)
    for j in range(1, int(labels.max(initial=0)) + 1):
        level = map_coordinates((labels >= j).astype(np.float32), coords, order=1, mode="nearest")
        out += (level >= 0.5).astype(np.uint8)
    return out


@dataclass(frozen=True)
class ChannelSpec:
    """One input channel as an index into the window's planes (``z_index``) and its side factor p."""

    z_index: int  # 0..20, 10 = centre plane
    p: float  # ROI side = p x diameter

    @property
    def z_offset_mm(self) -> int:
        return self.z_index - PLANES_MM.index(0.0)


def plane_layout(spec: InputSpec) -> list[ChannelSpec]:
    """The spec's channels as plane indices into its window (what :func:`resample_nodule` takes)."""
    return [ChannelSpec(spec.plane_index(c), ch.p) for c, ch in enumerate(spec.channels)]


# ----------------------------------------------------------------------------- both (predict)


@dataclass
class ModelInput:
    """One nodule's model input and what building it found out."""

    x: np.ndarray  # float32 [C, 32, 32]
    mask: np.ndarray  # uint8 [C, 32, 32] (zeros without labels)
    pixel_mm: np.ndarray  # float32 [C]: size of one patch pixel per channel
    filled_offsets_mm: list[float] = field(default_factory=list)  # the channels' planes beyond the scan
    centre_hu: float = math.nan  # HU of the window's centre pixel on the 0 mm plane (after rounding)
    window: dict = field(default_factory=dict)  # sample_window's info


def centre_hu(hu_window: np.ndarray, spec: InputSpec) -> float:
    """HU of a window's central pixel (the pixel nearest the centre) on its 0 mm plane."""
    s = hu_window.shape[1] // 2
    return float(hu_window[spec.centre_plane, s, s])


def model_input(
    hu: np.ndarray,
    zvals: np.ndarray,
    pixel_spacing: tuple[float, float],
    centre_rc: tuple[float, float],
    centre_z_mm: float,
    diameter_mm: float,
    spec: InputSpec,
    labels: np.ndarray | None = None,
    labels_offset: tuple[int, int, int] = (0, 0, 0),
    nodule_id: str = "?",
) -> ModelInput:
    """THE model input of one nodule: ``hu[row, col, slice]`` (HU, slices at ``zvals`` mm,
    increasing; rows and columns ``pixel_spacing`` mm apart), the centre (sub-pixel row and
    column, z in mm) and the diameter, made as ``spec`` says. ``labels`` (a nodule mask at
    ``labels_offset`` in the volume) gives the mask on the same grid."""
    side = window_side_px(diameter_mm, pixel_spacing, spec.window_diameters, spec.min_window_mm)
    win, lab, info = sample_window(
        hu, zvals, centre_rc, centre_z_mm, side, labels, labels_offset, np.asarray(spec.planes_mm)
    )
    x, m, pixel_mm = resample_nodule(
        win,
        lab,
        tuple(float(v) for v in pixel_spacing),
        diameter_mm,
        plane_layout(spec),
        nodule_id,
        centre_yx=info["centre_in_window_rc"],
        hu_window=spec.hu_window,
    )
    used = {c.z_offset_mm for c in spec.channels}
    filled = [v for v in info["z_filled_offsets_mm"] if v in used]
    return ModelInput(x, m, pixel_mm, filled, centre_hu(win, spec), info)


__all__ = ["Channel", "ChannelSpec", "ModelInput", "model_input"]
