"""Bad input at the door (issue 20, item 6): scans, masks, CSVs refused in one line before anything is written.

Every case runs the real command line (`nodulekit predict` / `extract` / `grid`) and is
checked against its row of the catalogue (tests/reliability_cases.py, docs/reliability.md):
exit status, the one line on stderr, and that no output (nor a temporary) appeared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import cli_in_process as cli  # noqa: E402
from reliability_cases import BY_ID  # noqa: E402
from test_reliability import VOI_PATIENTS, copy_vois, phantom_vois  # noqa: E402, F401

from tests.scan_fixtures import canonical_ct, lps_of, stored_variant, write_dicom_series, write_nifti  # noqa: E402

NODULE = (11.3, 13.6, 6.4)
CENTRE = ["--centre", ",".join(f"{v:.4f}" for v in lps_of(NODULE)), "--diameter", "10"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random-weight model and a good scan, written once."""
    from nodulekit.export import export_onnx
    from nodulekit.models import create_model

    tmp = tmp_path_factory.mktemp("validation")
    torch.manual_seed(0)
    export_onnx(create_model("hesam", 11, base_width=4).eval(), tmp / "m.onnx", exporter="torchscript")
    stored, affine = stored_variant(canonical_ct())
    return {"tmp": tmp, "model": tmp / "m.onnx", "ct": write_nifti(tmp / "ct.nii.gz", stored, affine)}


def _refused(case, monkeypatch, capsys, tmp_path, *args, message: str) -> str:
    """Run `nodulekit ARGS -o OUT`: the catalogued line (naming ``message``), and nothing written."""
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    code, stdout, err = cli(monkeypatch, capsys, *args, "-o", out)
    case.check(code, err)
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert stdout == "" and sorted(tmp_path.rglob("*")) == before  # no output, no temporary
    return err


def _predict(files, scan, *extra):
    return ("predict", files["model"], scan, *extra, "--provider", "cpu", "--no-progress")


def _series(folder: Path, edit=None, hu=None) -> Path:
    """A synthetic CT series; ``edit(ds, k)`` changes slice k's header before it is saved again."""
    import pydicom

    paths = write_dicom_series(folder, canonical_ct() if hu is None else hu)
    for k, path in enumerate(sorted(paths, key=lambda p: int(pydicom.dcmread(p).InstanceNumber))):
        if edit is not None:
            ds = pydicom.dcmread(path)
            edit(ds, k)
            ds.save_as(path)
    return folder


# ----------------------------------------------------------------------------- DICOM


def _no_rescale(ds, k):
    del ds.RescaleSlope, ds.RescaleIntercept  # stored values: lung at about +150


def _slope_zero(ds, k):
    ds.RescaleSlope = "0"


def _pt_slice(ds, k):
    if k == 5:
        ds.Modality = "PT"


def _huge_spacing(ds, k):
    x, y, _ = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, k * 1e6]


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (BY_ID["dicom-no-rescale"], _no_rescale, "lacks RescaleSlope/RescaleIntercept"),
        (BY_ID["dicom-slope-zero"], _slope_zero, "RescaleSlope 0"),
        (BY_ID["dicom-foreign-slice"], _pt_slice, "is a PT image inside the CT series"),
        (BY_ID["dicom-spacing"], _huge_spacing, "implausible voxel size of 1e+06 mm"),
    ],
)
def test_bad_dicom_series(files, case, edit, message, tmp_path, monkeypatch, capsys):
    series = _series(tmp_path / "series", edit)
    _refused(case, monkeypatch, capsys, tmp_path, *_predict(files, series, *CENTRE), message=message)


def test_padding_cannot_pass_the_hu_check(files, tmp_path, monkeypatch, capsys):
    """Stored values without the rescale (lung at about +150) around a field of view padded at -1024."""
    raw = (canonical_ct() + 1024).astype(np.int16)
    r, c = np.meshgrid(np.arange(raw.shape[0]), np.arange(raw.shape[1]), indexing="ij")
    outside = (r - 12) ** 2 + (c - 14) ** 2 > 11**2
    raw[outside] = -1024  # 20 % of the voxels: enough for the old check, which counted them as lung
    assert np.mean(raw == -1024) > 0.1
    stored, affine = stored_variant(raw)
    scan = write_nifti(tmp_path / "raw.nii.gz", stored, affine)
    _refused(BY_ID["hu-padding"], monkeypatch, capsys, tmp_path, *_predict(files, scan, *CENTRE), message="non-padding")


# ----------------------------------------------------------------------------- NIfTI, MetaImage, readers


def _singular(path: Path) -> Path:
    affine = np.eye(4)
    affine[2, 2] = 0  # every slice at one z
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_sform(affine, 2)
    nib.save(nib.Nifti1Image(stored_variant(canonical_ct())[0], None, header), str(path))
    return path


def _nan_affine(path: Path) -> Path:
    stored, affine = stored_variant(canonical_ct())
    affine[0, 3] = np.nan
    return write_nifti(path, stored, affine)


def _rgb(path: Path) -> Path:
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return write_nifti(path, rgb, np.eye(4))


@pytest.mark.parametrize(
    "case, make, message",
    [
        (BY_ID["nifti-nan-affine"], _nan_affine, "affine with NaN or infinite entries"),
        (BY_ID["nifti-singular"], _singular, "singular voxel-to-world affine"),
        (BY_ID["nifti-rgb"], _rgb, "holds colour (RGB) voxels"),
    ],
)
def test_bad_nifti(files, case, make, message, tmp_path, monkeypatch, capsys):
    scan = make(tmp_path / "scan.nii")
    _refused(case, monkeypatch, capsys, tmp_path, *_predict(files, scan, *CENTRE), message=message)


def test_metaimage_without_its_raw(files, tmp_path, monkeypatch, capsys):
    sitk = pytest.importorskip("SimpleITK")
    stored, _ = stored_variant(canonical_ct())
    sitk.WriteImage(sitk.GetImageFromArray(stored.T), str(tmp_path / "ct.mhd"))
    (tmp_path / "ct.raw").unlink()
    _refused(
        BY_ID["mhd-no-raw"],
        monkeypatch,
        capsys,
        tmp_path,
        *_predict(files, tmp_path / "ct.mhd", *CENTRE),
        message="ct.raw is missing",
    )


def test_format_without_its_reader(files, tmp_path, monkeypatch, capsys):
    (tmp_path / "ct.nrrd").write_bytes(b"NRRD0004\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as if not installed: importing it fails
    _refused(
        BY_ID["no-reader"], monkeypatch, capsys, tmp_path, *_predict(files, tmp_path / "ct.nrrd", *CENTRE),
        message="pip install 'nodulekit[itk]'",
    )  # fmt: skip


def test_unknown_format(files, tmp_path, monkeypatch, capsys):
    (tmp_path / "ct.png").write_bytes(b"\x89PNG")
    _refused(
        BY_ID["unknown-format"],
        monkeypatch,
        capsys,
        tmp_path,
        *_predict(files, tmp_path / "ct.png", *CENTRE),
        message="accepted: .nii",
    )


# ----------------------------------------------------------------------------- masks, CSVs, values


def test_a_folder_as_mask_is_called_a_folder(files, tmp_path, monkeypatch, capsys):
    (tmp_path / "labels").mkdir()
    args = _predict(files, files["ct"], "--mask", tmp_path / "labels")
    _refused(BY_ID["mask-folder"], monkeypatch, capsys, tmp_path, *args, message="is a folder")


def test_mask_in_another_physical_space(files, tmp_path, monkeypatch, capsys):
    stored, affine = stored_variant(canonical_ct())
    labels = np.zeros(stored.shape, np.uint8)
    labels[9:14, 11:16, 5:8] = 1
    shifted = affine.copy()
    shifted[:3, 3] += [0, 0, 6.0]  # three slices higher
    mask = write_nifti(tmp_path / "m.nii.gz", labels, shifted)
    _refused(
        BY_ID["mask-other-space"],
        monkeypatch,
        capsys,
        tmp_path,
        *_predict(files, files["ct"], "--mask", mask),
        message="another physical space",
    )


@pytest.mark.parametrize(
    "case, content, message",
    [
        (
            BY_ID["csv-latin1"],
            "id,x,y,z,diameter_mm\nnodule é,1,2,3,4\n".encode("latin-1"),
            "is not UTF-8 text (byte 0xe9 on line 2)",
        ),
        (BY_ID["csv-duplicate-column"], b"x,y,z,diameter_mm,x\n1,2,3,4,5\n", "has the column 'x' twice"),
    ],
)
def test_bad_csv(files, case, content, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "n.csv").write_bytes(content)
    args = _predict(files, files["ct"], "--nodules", tmp_path / "n.csv")
    _refused(case, monkeypatch, capsys, tmp_path, *args, message=message)


def test_excel_bom_csv_works(files, tmp_path, monkeypatch, capsys):
    world = lps_of(NODULE)
    text = "x,y,z,diameter_mm\r\n" + ",".join(f"{v:.4f}" for v in world) + ",10\r\n"
    (tmp_path / "n.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8"
    code, out, err = cli(monkeypatch, capsys, *_predict(files, files["ct"], "--nodules", tmp_path / "n.csv"))
    BY_ID["csv-bom"].check(code, err)
    assert out.count("\n") == 1 and '"source": "n.csv line 2"' in out


def test_tiny_diameter(files, tmp_path, monkeypatch, capsys):
    args = _predict(files, files["ct"], "--centre", CENTRE[1], "--diameter", "1e-9")
    _refused(
        BY_ID["diameter-tiny"], monkeypatch, capsys, tmp_path, *args, message="diameter 1e-09 mm is not in [1, 100] mm"
    )


def test_small_diameter_is_warned(files, tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, *_predict(files, files["ct"], "--centre", CENTRE[1], "--diameter", "2"))
    # one warning for it (plausibility's), on stderr and in the JSON line
    assert code == 0 and err.count("diameter 2 mm is below the 3 mm of the smallest nodules") == 1, err
    assert [w["code"] for w in json.loads(out)["warnings"]] == ["diameter_looks_like_cm"]


# ----------------------------------------------------------------------------- extract and grid


def test_extract_refuses_a_mask_given_as_voi_image(phantom_vois, tmp_path, monkeypatch, capsys):  # noqa: F811
    vois = copy_vois(phantom_vois, tmp_path / "vois")
    image = vois / "image" / "LIDC-IDRI-0003_R_2.nii.gz"  # a labelled nodule's image replaced by its mask
    image.write_bytes((vois / "mask" / image.name).read_bytes())
    code, _, err = cli(
        monkeypatch, capsys, "extract", "--vois", vois, "-o", tmp_path / "r.h5", "--no-progress", *VOI_PATIENTS
    )
    BY_ID["voi-not-ct"].check(code, err)
    assert f"VOI image {image}: intensities do not look like CT Hounsfield units" in err


def test_grid_config_encodings(tmp_path, monkeypatch, capsys):
    pytest.importorskip("yaml")
    (tmp_path / "g.yaml").write_bytes("name: é\n".encode("latin-1"))
    code, _, err = cli(monkeypatch, capsys, "grid", tmp_path / "g.yaml", "--dry-run")
    BY_ID["yaml-latin1"].check(code, err)
    from nodulekit.grid import read_config

    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfseeds: [0]\n")
    assert read_config(tmp_path / "bom.yaml") == {"seeds": [0]}
