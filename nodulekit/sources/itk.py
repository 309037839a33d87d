"""MetaImage (``.mhd``/``.raw``, ``.mha``; LUNA16's format) and NRRD (``.nrrd``, ``.nhdr``) through SimpleITK.

ITK's physical space is LPS (DICOM patient coordinates): ``origin + direction @ (spacing * index)``
gives the LPS millimetres of index (i, j, k) in ITK's (x, y, z) = (i, j, k) order, so
LUNA16's ``coordX, coordY, coordZ`` are LPS world millimetres. SimpleITK returns the array
in (k, j, i) order; it is transposed back to (i, j, k) so the affine reads as NIfTI's does.
Optional: ``pip install 'nodulekit[itk]'``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources.formats import LPS_FROM_RAS, CTFormat, Image, register_format


def _header_data_file(path: Path) -> Path | None:
    """The detached data file a MetaImage/NRRD header names (None when the data is in the header file)."""
    try:
        head = path.read_bytes()[:65536].decode("latin-1")
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror})") from None
    m = re.search(r"^(?:ElementDataFile\s*=|data ?file:)\s*(.+?)\s*$", head, re.MULTILINE | re.IGNORECASE)
    if m is None or m.group(1) in ("LOCAL", "") or m.group(1).startswith("LIST"):
        return None
    return path.parent / m.group(1)


class _ItkFormat(CTFormat):
    module = "SimpleITK"
    extra = "itk"

    def read(self, path: Path, what: str) -> Image:
        import SimpleITK as sitk

        data_file = _header_data_file(path)
        if data_file is not None and not data_file.is_file():
            raise DataError(f"{what} {path}: its voxel data file {data_file.name} is missing (expected beside it)")
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:  # ITK's message is many lines; its last says why
            reason = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][-1:] or ["unknown error"]
            raise DataError(f"{what} {path} is not a readable {self.description} file ({reason[0]})") from None
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(
                f"{what} {path} holds {img.GetNumberOfComponentsPerPixel()}-component (colour or vector) voxels, not grey values"
            )
        if img.GetDimension() != 3:
            raise DataError(f"{what} {path} is a {img.GetDimension()}-D image; give one 3-D CT volume")
        data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
        direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
        affine_lps = np.eye(4)
        affine_lps[:3, :3] = direction * np.asarray(img.GetSpacing(), float)
        affine_lps[:3, 3] = img.GetOrigin()
        files = [str(path)] + ([str(data_file)] if data_file is not None else [])
        return Image(data, LPS_FROM_RAS @ affine_lps, files=files, series_uid=self.series_uid(path))


@register_format
class MetaImageFormat(_ItkFormat):
    name = "metaimage"
    description = "MetaImage"
    suffixes = (".mhd", ".mha")


@register_format
class NrrdFormat(_ItkFormat):
    name = "nrrd"
    description = "NRRD"
    suffixes = (".nrrd", ".nhdr")
