"""MetaImage and NRRD through SimpleITK: the affine of a flipped, anisotropic grid, the detached
data file, and each refusal word for word; the registry's own checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodulekit.errors import DataError
from nodulekit.sources import formats
from nodulekit.sources.formats import CTFormat, read_image, register_format, unregister_format
from nodulekit.sources.itk import _header_data_file

sitk = pytest.importorskip("SimpleITK")


def _image(
    data_kji: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, -30.0), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1)
):
    img = sitk.GetImageFromArray(data_kji)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def test_a_metaimage_with_a_flipped_axis_has_the_affine_of_its_header(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 100, (5, 6, 7)).astype(np.int16)  # ITK's (k, j, i)
    path = tmp_path / "1.2.826.0.1.9.mhd"
    sitk.WriteImage(_image(data), str(path))  # a header and a detached .raw
    image = read_image(path)
    assert image.format == "metaimage" and image.series_uid == "1.2.826.0.1.9"
    assert image.files == [str(path), str(tmp_path / "1.2.826.0.1.9.raw")]
    np.testing.assert_array_equal(image.data, data.transpose(2, 1, 0))  # (i, j, k)
    # LPS: i along +x 0.7 mm, j along -y 0.8 mm, k along +z 2.5 mm; RAS flips x and y
    expected = np.array([[-0.7, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine_ras, expected, atol=1e-6)


def test_an_nrrd_in_one_file_lists_only_itself(tmp_path):
    data = np.zeros((4, 5, 6), np.int16)
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(_image(data), str(path))
    image = read_image(path)
    assert image.format == "nrrd" and image.files == [str(path)] and image.series_uid == ""
    assert image.data.shape == (6, 5, 4)


def test_metaimage_refusals(tmp_path):
    data = np.zeros((4, 5, 6), np.int16)
    path = tmp_path / "a.mhd"
    sitk.WriteImage(_image(data), str(path))
    (tmp_path / "a.raw").unlink()
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(err.value) == f"scan {path}: its voxel data file a.raw is missing (expected beside it)"
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "rgb.mha", "mask")
    assert str(err.value) == f"mask {tmp_path / 'rgb.mha'} holds 3-component (colour or vector) voxels, not grey values"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "flat.mha"))
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "flat.mha")
    assert str(err.value) == f"scan {tmp_path / 'flat.mha'} is a 2-D image; give one 3-D CT volume"
    (tmp_path / "junk.mha").write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(DataError, match=r"^scan \S+junk.mha is not a readable MetaImage file \(.+\)$"):
        read_image(tmp_path / "junk.mha")


def test_the_data_file_a_header_names(tmp_path):
    h = tmp_path / "h.mhd"
    h.write_text("NDims = 3\nElementDataFile = data.raw  \n")
    assert _header_data_file(h) == tmp_path / "data.raw"
    h.write_text("NDims = 3\nelementdatafile=LOCAL\n")
    assert _header_data_file(h) is None
    h.write_text("NDims = 3\nElementDataFile = LIST 2D\n")
    assert _header_data_file(h) is None
    n = tmp_path / "h.nhdr"
    n.write_text("NRRD0004\ntype: short\ndata file: h.raw.gz\n")
    assert _header_data_file(n) == tmp_path / "h.raw.gz"
    n.write_text("NRRD0004\ndatafile: other.raw\n")
    assert _header_data_file(n) == tmp_path / "other.raw"
    n.write_text("NRRD0004\ntype: short\n")
    assert _header_data_file(n) is None
    with pytest.raises(DataError, match=r"cannot be read"):
        _header_data_file(tmp_path)


def test_the_registry_refuses_a_format_without_a_name_or_with_a_taken_suffix():
    class Nameless(CTFormat):
        suffixes = (".abc",)

    with pytest.raises(TypeError) as err:
        register_format(Nameless)
    assert str(err.value) == "Nameless needs a name and suffixes (or folder = True)"

    class Clash(CTFormat):
        name = "clash"
        suffixes = (".xyz", ".nii.gz")

    with pytest.raises(ValueError) as err:
        register_format(Clash)
    assert str(err.value) == "format clash: suffix .nii.gz is already another format's"
    assert "clash" not in [f.name for f in formats.available_formats()]

    class Toy(CTFormat):
        name = "toy"
        description = "a toy"
        suffixes = (".toy",)
        module = "no_such_module_for_toys"
        extra = "toys"

    register_format(Toy)
    try:
        register_format(Toy)  # registering again under its own name replaces it
        assert formats.format_of(Path("x.TOY")).name == "toy"
        assert "; .toy (a toy)" in formats.accepted_text()
        with pytest.raises(DataError) as err:
            formats.format_of(Path("x.toy")).require_reader(Path("x.toy"), "scan")
        assert str(err.value) == (
            "scan x.toy is a toy; reading it needs no_such_module_for_toys: pip install 'nodulekit[toys]'"
        )
        assert Toy().series_uid(Path("1.2.3.toy")) == "1.2.3" and Toy().series_uid(Path("scan1.toy")) == ""
    finally:
        unregister_format("toy")
    assert "toy" not in [f.name for f in formats.available_formats()]


def test_read_image_names_a_missing_path(tmp_path):
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "none.nii", "mask")
    assert str(err.value) == f"mask {tmp_path / 'none.nii'} does not exist"
