"""Synthetic CT files for the predict tests: NIfTI in any axis order/direction, and DICOM series.

The canonical volume is ``hu[row, col, slice]`` with rows along +y (posterior), columns
along +x (left) and slices along +z (LPS), at ``ORIGIN`` and ``SPACING``. Stored variants
are derived from it by hand (flips and axis permutations with the matching affine), so a
reader that gets a convention wrong gives another array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = (24, 28, 14)  # rows, cols, slices
SPACING = (0.8, 0.7, 2.0)  # row (y), col (x), slice (z) mm
ORIGIN = (-30.0, 12.5, -60.0)  # LPS of voxel (0, 0, 0)
AXIS_DIRECTION = {0: (0, 1, 0), 1: (1, 0, 0), 2: (0, 0, 1)}  # canonical axis -> LPS unit vector


def canonical_ct(seed: int = 0, centre=(11.3, 13.6, 6.4), radius_mm: float = 5.0) -> np.ndarray:
    """Lung-like background (about -850 HU, noisy so every voxel differs) with a solid sphere."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-900, -800, SHAPE).astype(np.int16)
    r, c, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    d = np.sqrt(
        ((r - centre[0]) * SPACING[0]) ** 2 + ((c - centre[1]) * SPACING[1]) ** 2 + ((k - centre[2]) * SPACING[2]) ** 2
    )
    hu[d <= radius_mm] = rng.integers(20, 60, int((d <= radius_mm).sum()))
    return hu


def lps_of(index) -> np.ndarray:
    """LPS mm of a canonical (row, col, slice) index."""
    r, c, k = (float(v) for v in index)
    return np.array([ORIGIN[0] + c * SPACING[1], ORIGIN[1] + r * SPACING[0], ORIGIN[2] + k * SPACING[2]])


def stored_variant(hu: np.ndarray, perm=(0, 1, 2), flips=()) -> tuple[np.ndarray, np.ndarray]:
    """(stored array, RAS affine) of the canonical volume with canonical ``flips`` then axes ``perm``.

    Stored axis j is canonical axis perm[j]; a flipped axis runs backwards.
    """
    data = hu
    for axis in flips:
        data = np.flip(data, axis)
    stored = np.ascontiguousarray(np.transpose(data, perm))
    lps = np.eye(4)
    start = [SHAPE[a] - 1 if a in flips else 0 for a in range(3)]
    lps[:3, 3] = lps_of(start)
    for j, a in enumerate(perm):
        lps[:3, j] = np.array(AXIS_DIRECTION[a]) * SPACING[a] * (-1 if a in flips else 1)
    return stored, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def stored_index(index, perm=(0, 1, 2), flips=()) -> np.ndarray:
    """The stored index of a canonical index, for :func:`stored_variant`'s layout."""
    idx = [SHAPE[a] - 1 - v if a in flips else v for a, v in enumerate(np.asarray(index, float))]
    return np.array([idx[a] for a in perm])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    orientation=(1, 0, 0, 0, 1, 0),
    tilt_mm: float = 0.0,
    order=None,
    coronal: bool = False,
) -> list[Path]:
    """Axial slices of ``hu`` [row, col, slice] as a CT series; files named and written in ``order``.

    ``coronal``: one slice per canonical row instead, image rows running towards the feet and
    columns towards the patient's left (ImageOrientationPatient 1,0,0,0,0,-1), as a coronal
    reformat is stored.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, frame = generate_uid(), generate_uid()
    if coronal:
        orientation = (1, 0, 0, 0, 0, -1)
        images = [hu[r, :, ::-1].T for r in range(hu.shape[0])]  # [i, j] = hu[r, j, last - i]
        positions = [lps_of((r, 0, hu.shape[2] - 1)) for r in range(hu.shape[0])]
        spacing = (SPACING[2], SPACING[1])
    else:
        images = [hu[:, :, k] for k in range(hu.shape[2])]
        positions = [lps_of((0, 0, k)) + [tilt_mm * k, 0, 0] for k in range(hu.shape[2])]
        spacing = SPACING[:2]
    n = len(images)
    order = list(range(n)) if order is None else list(order)
    paths = []
    for pos, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"img{(pos * 7919) % 1000:03d}_{pos}"  # names unrelated to position
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[0]:.4f}", f"{spacing[1]:.4f}"]
        ds.Rows, ds.Columns = images[k].shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        stored = np.rint((images[k].astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    (folder / "notes.xml").write_text("<not-dicom/>")  # other files in the folder are skipped
    return paths
