"""NIfTI (``.nii``, ``.nii.gz``) through nibabel: the affine nibabel chooses (sform or qform) is the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources.formats import CTFormat, Image, register_format


def load_nifti(path: Path, what: str):
    """(nibabel image, its voxel array) or a one-line error naming the file."""
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises assorted errors for foreign or truncated files
        raise DataError(f"{what} {path} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    return img, data


@register_format
class NiftiFormat(CTFormat):
    name = "nifti"
    description = "NIfTI"
    suffixes = (".nii", ".nii.gz")

    def read(self, path: Path, what: str) -> Image:
        img, data = load_nifti(path, what)
        return Image(data, np.asarray(img.affine, float), files=[str(path)], series_uid=self.series_uid(path))
