"""`predict --dicom`: the Parametric Map and the SR read back, geometry and values checked against
the NIfTI map predict writes beside them (on the real LIDC-IDRI-0003 series and on synthetic series)."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
hd = pytest.importorskip("highdicom")
import pydicom  # noqa: E402

import nodulekit  # noqa: E402
from nodulekit import predict as pr  # noqa: E402
from tests.model_fixtures import export, trained_run  # noqa: E402
from tests.scan_fixtures import canonical_ct, lps_of, write_dicom_series, write_nifti  # noqa: E402

torch.set_num_threads(1)
LIDC_0003_NODULE = ("-47.2,-30.06,-169.53", 13.13)  # LIDC-IDRI-0003:4 (docs/predict.md)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom_out")
    _, rundir = trained_run(folder)
    return export(rundir, folder / "m.onnx")


def _series_folder(root: Path) -> Path:
    return next(p.parent for p in sorted(root.rglob("*.dcm")))


def _with_identity(paths) -> None:
    """Patient and study attributes a real series has (the scan fixture writes only what reading needs)."""
    study = pydicom.uid.generate_uid()
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "SYN-1", "Syn^One", "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study, "1", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.SeriesNumber = "", "", 1
        ds.SliceThickness = 2.0
        ds.save_as(p, enforce_file_format=True)


def _world_to_nifti_value(nifti, lps_points: np.ndarray) -> np.ndarray:
    """Values of the NIfTI map at LPS points (nearest voxel), independently of nodulekit's geometry."""
    ras = lps_points * [-1, -1, 1]
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(nifti.affine), ras)).astype(int)
    data = np.asarray(nifti.dataobj)
    inside = np.all((ijk >= 0) & (ijk < data.shape), axis=1)
    out = np.zeros(len(ijk), np.float32)
    out[inside] = data[tuple(ijk[inside].T)]
    return out


def check_outputs(out: Path, source_folder: Path, record: dict) -> None:
    sources = {}
    for p in source_folder.iterdir():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        sources[ds.SOPInstanceUID] = ds
    first = next(iter(sources.values()))
    name = record["id"]
    pm = pydicom.dcmread(out / f"{name}_map.dcm")
    nifti = nib.load(out / f"{name}_map.nii.gz")
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert pm.FrameOfReferenceUID == first.FrameOfReferenceUID and pm.StudyInstanceUID == first.StudyInstanceUID
    assert pm.PatientID == first.PatientID and pm.SeriesInstanceUID != first.SeriesInstanceUID
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    shared = pm.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    np.testing.assert_allclose(orientation, np.asarray(first.ImageOrientationPatient, float), atol=1e-6)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    np.testing.assert_allclose(spacing, np.asarray(first.PixelSpacing, float), atol=1e-6)
    frames = pm.pixel_array.reshape(int(pm.NumberOfFrames), pm.Rows, pm.Columns)
    row_dir, col_dir = orientation[:3], orientation[3:]
    total = 0.0
    for f, group in enumerate(pm.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[uid]
        ipp = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(ipp, np.asarray(src.ImagePositionPatient, float), atol=1e-4)
        # DICOM: pixel (r, c) lies at IPP + c * column spacing along the row direction + r * row spacing along the column direction
        r, c = np.mgrid[: pm.Rows, : pm.Columns]
        points = ipp + c.reshape(-1, 1) * spacing[1] * row_dir + r.reshape(-1, 1) * spacing[0] * col_dir
        np.testing.assert_allclose(frames[f].ravel(), _world_to_nifti_value(nifti, points), atol=1e-6)
        total += float(frames[f].sum())
    assert total == pytest.approx(float(np.asarray(nifti.dataobj).sum()), rel=1e-5)  # no map slice left out
    assert total > 0
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
    # what a viewer shows of the map: its series, maker, value mapping and display window
    top = float(frames.max())
    top = top if top > 0 else 1.0  # an all-negative map is shown on 0..1
    assert (pm.SeriesNumber, pm.InstanceNumber, pm.Manufacturer) == (9901, 1, "nodulekit")
    assert pm.SeriesDescription == f"nodulekit map, nodule {name} (research use only, not for clinical use)"[:64]
    assert (pm.ManufacturerModelName, pm.SoftwareVersions) == ("hesam", f"nodulekit {nodulekit.__version__}")
    assert pm.DeviceSerialNumber == "none" and pm.RecognizableVisualFeatures == "NO"
    assert (mapping.LUTLabel, mapping.LUTExplanation) == ("map", "hesam map, malignant class (model units)")
    assert float(mapping.DoubleFloatRealWorldValueFirstValueMapped) == 0.0
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == pytest.approx(top, rel=1e-6)
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # UCUM: no units
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert float(voi.WindowCenter) == pytest.approx(top / 2, rel=1e-5)  # the window spans 0..top
    assert float(voi.WindowWidth) == pytest.approx(top, rel=1e-5)

    sr = hd.sr.srread(out / "findings_sr.dcm")
    assert sr.StudyInstanceUID == first.StudyInstanceUID and sr.PatientID == first.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == set(sources)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == f"nodule {name}"
    surface = group.roi
    assert surface.frame_of_reference_uid == first.FrameOfReferenceUID
    point = next(item for item in surface if item.ValueType == "SCOORD3D")
    assert point.GraphicType == "POINT" and point.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
    np.testing.assert_allclose(np.asarray(point.GraphicData, float), np.asarray(record["centre_mm"]), atol=1e-3)
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Diameter"] == pytest.approx(record["diameter_mm"])
    assert values["Probability of cancer"] == pytest.approx(record["probability"], abs=1e-6)
    assert {m.name.meaning: m.unit.value for m in group.get_measurements()} == {
        "Diameter": "mm",
        "Probability of cancer": "1",
    }
    assert (sr.SeriesNumber, sr.InstanceNumber, sr.Manufacturer) == (9902, 1, "nodulekit")
    assert sr.SeriesDescription == "nodulekit findings (research use only, not for clinical use)"
    assert group.finding_type.meaning == "Nodule"
    assert _texts(group) >= {
        ("Tracking Identifier", f"nodule {name}"),
        ("Algorithm Name", "nodulekit hesam (hesam)"),
        ("Algorithm Version", nodulekit.__version__),
        ("Algorithm Parameters", "threshold 0.5"),
    }


def _texts(items) -> set[tuple[str, str]]:
    """(concept name, text) of every TEXT item under ``items``, at any depth."""
    out = set()
    for item in items:
        if getattr(item, "ValueType", None) == "TEXT":
            out.add((item.ConceptNameCodeSequence[0].CodeMeaning, str(item.TextValue)))
        if "ContentSequence" in item:
            out |= _texts(item.ContentSequence)
    return out


def test_real_lidc_series_round_trip(model, lidc_dicom, tmp_path):
    series = _series_folder(lidc_dicom / "LIDC-IDRI-0003")
    centre, diameter = LIDC_0003_NODULE
    res = pr.predict(
        model, series, centre=centre, diameter=diameter, output=tmp_path / "out", dicom=True, provider="cpu"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "1_map.dcm", "1_map.nii.gz", "1_overlay.png", "findings_sr.dcm", "predictions.jsonl",
    ]  # fmt: skip
    check_outputs(tmp_path / "out", series, res.records[0])


@pytest.mark.parametrize("coronal", [False, True])
def test_synthetic_series_round_trip(model, tmp_path, coronal):
    """Axial and coronal storage: the frames must follow each file's own rows and columns."""
    hu = canonical_ct()
    paths = write_dicom_series(
        tmp_path / "dcm", hu, coronal=coronal, order=np.random.default_rng(2).permutation(24 if coronal else 14)
    )
    _with_identity(paths)
    centre = ",".join(f"{v:.4f}" for v in lps_of((11.3, 13.6, 6.4)))
    res = pr.predict(
        model, tmp_path / "dcm", centre=centre, diameter=10.0, output=tmp_path / "out", dicom=True, provider="cpu"
    )
    check_outputs(tmp_path / "out", tmp_path / "dcm", res.records[0])


def test_dicom_on_nifti_or_without_output_is_one_line(model, tmp_path, monkeypatch, capsys):
    from nodulekit.cli import main

    ct = write_nifti(tmp_path / "ct.nii.gz", canonical_ct(), np.eye(4))
    for args, message in (
        (["-o", tmp_path / "out"], f"--dicom needs a DICOM series to refer to, and {ct} is not a DICOM folder"),
        ([], "--dicom writes into the -o folder: give -o DIR"),
    ):
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "nodulekit",
                "predict",
                str(model),
                str(ct),
                "--centre",
                "0,0,0",
                "--diameter",
                "8",
                "--dicom",
                *map(str, args),
            ],
        )
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr()
        assert exc.value.code == 2 and err.out == "" and err.err.startswith(f"nodulekit: error: {message}")
        assert err.err.count("\n") == 1 and not (tmp_path / "out").exists()
