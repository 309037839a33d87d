"""`nodulekit predict` on synthetic CT: conventions, nodule specifications, outputs and bad input."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from nodulekit import predict as pr  # noqa: E402
from nodulekit import scans  # noqa: E402
from nodulekit.errors import NodulekitError  # noqa: E402
from tests.model_fixtures import export, trained_run  # noqa: E402
from tests.scan_fixtures import (  # noqa: E402
    SHAPE,
    SPACING,
    canonical_ct,
    lps_of,
    stored_index,
    stored_variant,
    write_dicom_series,
    write_nifti,
)

torch.set_num_threads(1)
NODULE = (11.3, 13.6, 6.4)  # canonical (row, col, slice) of the sphere in canonical_ct()
LAYOUT = ((1, 0, 2), (0, 1))  # stored like a RAS NIfTI: x and y reversed, columns first


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    dataset, rundir = trained_run(folder)
    hu = canonical_ct()
    stored, affine = stored_variant(hu, *LAYOUT)
    return {
        "folder": folder,
        "rundir": rundir,
        "ensemble": export(rundir, folder / "ensemble.onnx"),
        "fold0": export(rundir, folder / "fold0.onnx", fold=0),
        "hu": hu,
        "affine": affine,
        "ct": write_nifti(folder / "ct.nii.gz", stored, affine),
    }


def _centre_arg(point) -> str:
    return ",".join(f"{v:.6f}" for v in point)


def _predict(env, **kw):
    kw.setdefault("provider", "cpu")
    return pr.predict(kw.pop("model", env["ensemble"]), kw.pop("scan", env["ct"]), **kw)


def test_one_nodule_same_input_in_every_orientation_and_frame(env, tmp_path):
    world = lps_of(NODULE)
    ras = world * [-1, -1, 1]
    ref = _predict(env, centre=_centre_arg(world), diameter=10.0).records[0]
    assert ref["centre_mm"] == pytest.approx(world, abs=1e-3) and ref["frame"] == "LPS"
    assert ref["centre_voxel"] == pytest.approx(stored_index(NODULE, *LAYOUT), abs=1e-3)
    # The same scan stored another way, the centre given in RAS or as the file's own voxel index.
    other_layout = ((2, 0, 1), (0, 1, 2))
    other, aff = stored_variant(env["hu"], *other_layout)
    other_path = write_nifti(tmp_path / "other.nii.gz", other, aff)
    for scan, centre, coords in (
        (env["ct"], ras, "ras"),
        (env["ct"], stored_index(NODULE, *LAYOUT), "voxel"),
        (other_path, world, "lps"),
        (other_path, stored_index(NODULE, *other_layout), "voxel"),
    ):
        rec = _predict(env, scan=scan, centre=_centre_arg(centre), diameter=10.0, coords=coords).records[0]
        assert rec["probability"] == pytest.approx(ref["probability"], abs=1e-6), (scan, coords)
        assert rec["centre_mm"] == pytest.approx(centre if coords != "voxel" else world, abs=1e-3)
    # A DICOM series of the same volume, slices in shuffled order.
    write_dicom_series(tmp_path / "dcm", env["hu"], order=np.random.default_rng(1).permutation(SHAPE[2]))
    rec = _predict(env, scan=tmp_path / "dcm", centre=_centre_arg(world), diameter=10.0).records[0]
    assert rec["probability"] == pytest.approx(ref["probability"], abs=1e-6)


def test_input_is_the_extract_and_build_recipe(env):
    """The model input of a centre + diameter equals the window + resampling computed here by hand."""
    from scipy.ndimage import map_coordinates

    scan = scans.read_scan(env["ct"])
    d = 10.0
    spec = pr.NoduleSpec("1", np.array(NODULE), d, "test")
    layout = [{"z_offset_mm": float(z), "p": 2.0} for z in range(-5, 6)]
    x = pr.nodule_input(scan, spec, layout).x
    # Independent: planes at centre z + offset by linear interpolation in z, rounded to HU,
    # 32 points per axis at centre + (j + 0.5 - 16) * 2d/32 mm, bilinear, HU window -1000..400.
    hu = env["hu"].astype(np.float64)
    steps = (np.arange(32) + 0.5 - 16) * 2 * d / 32
    rows, cols = NODULE[0] + steps / SPACING[0], NODULE[1] + steps / SPACING[1]
    for c, off in enumerate(range(-5, 6)):
        k = np.clip(NODULE[2] + off / SPACING[2], 0, SHAPE[2] - 1)
        k0 = int(np.floor(k))
        k1 = min(k0 + 1, SHAPE[2] - 1)
        plane = np.rint((1 - (k - k0)) * hu[:, :, k0] + (k - k0) * hu[:, :, k1])
        plane = (np.clip(plane, -1000, 400) + 1000) / 1400
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        expected = map_coordinates(plane, [rr, cc], order=1, mode="nearest")
        # 1 HU: where the z interpolation lands on .5 HU, float rounding may round either way
        np.testing.assert_allclose(x[c], expected, atol=1 / 1400 + 1e-6)


def _blob(shape, centre, radius):
    r, c, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return ((r - centre[0]) * SPACING[0]) ** 2 + ((c - centre[1]) * SPACING[1]) ** 2 + (
        (k - centre[2]) * SPACING[2]
    ) ** 2 <= radius**2


def _stored_mask(canonical):
    stored, _ = stored_variant(canonical, *LAYOUT)
    return stored


def test_mask_components_and_label_values(env, tmp_path):
    a, b = _blob(SHAPE, (6, 7, 4), 3.5), _blob(SHAPE, (16, 20, 9), 4.5)
    binary = (a | b).astype(np.uint8)
    path = write_nifti(tmp_path / "m.nii.gz", _stored_mask(binary), env["affine"])
    res = _predict(env, mask=path)
    assert [r["id"] for r in res.records] == ["1", "2"]  # numbered by position: a (lower z) first
    voxel_volume = float(np.prod(SPACING))
    for rec, blob in zip(res.records, (a, b), strict=True):
        assert rec["centre_mm"] == pytest.approx(lps_of(np.argwhere(blob).mean(0)), abs=1e-4)
        assert rec["diameter_mm"] == pytest.approx((6 * blob.sum() * voxel_volume / math.pi) ** (1 / 3), abs=1e-3)
    # Touching nodules with their own label values: one per value (auto), ids = the values.
    labels = np.zeros(SHAPE, np.uint8)
    labels[a | b] = 3
    labels[_blob(SHAPE, (6, 11, 4), 2.5)] = 5  # touches nodule a
    path = write_nifti(tmp_path / "l.nii.gz", _stored_mask(labels), env["affine"])
    res = _predict(env, mask=path)
    assert [r["id"] for r in res.records] == ["3", "5"]
    assert res.records[1]["centre_mm"] == pytest.approx(lps_of(np.argwhere(labels == 5).mean(0)), abs=1e-4)
    assert len(_predict(env, mask=path, mask_mode="components").records) == 2  # 3+5 touch: a, then b


def test_nodules_csv_reads_the_scan_once(env, tmp_path, monkeypatch):
    rows = [("n1", lps_of(NODULE), 10.0), ("n2", lps_of((8, 9, 5)), 6.0), ("n3", lps_of((15, 18, 9)), 22.0)]
    path = tmp_path / "n.csv"
    path.write_text("id,x,y,z,diameter_mm,comment\n" + "".join(f"{i},{x},{y},{z},{d},ok\n" for i, (x, y, z), d in rows))
    loads = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda p, *a, **k: loads.append(p) or real_load(p, *a, **k))
    res = _predict(env, nodules=path)
    assert loads == [str(env["ct"])]
    assert [r["id"] for r in res.records] == ["n1", "n2", "n3"]
    assert [r["diameter_mm"] for r in res.records] == [10.0, 6.0, 22.0]
    single = _predict(env, centre=_centre_arg(rows[1][1]), diameter=6.0).records[0]
    assert res.records[1]["probability"] == pytest.approx(single["probability"], abs=1e-6)


def test_pytorch_rundir_and_onnx_ensemble_agree(env):
    centre = _centre_arg(lps_of(NODULE))
    onnx_rec = _predict(env, centre=centre, diameter=10.0).records[0]
    torch_rec = _predict(env, model=env["rundir"], centre=centre, diameter=10.0, device="cpu").records[0]
    assert torch_rec["probability"] == pytest.approx(onnx_rec["probability"], abs=1e-4)
    assert torch_rec["members"] == pytest.approx(onnx_rec["members"], abs=1e-4)
    m = np.array(onnx_rec["members"])
    assert onnx_rec["probability"] == pytest.approx(m.mean(), abs=1e-6)
    assert onnx_rec["spread"] == pytest.approx({"sd": m.std(), "min": m.min(), "max": m.max()})
    bf16 = _predict(env, model=env["rundir"], centre=centre, diameter=10.0, device="cpu", amp=True, channels_last=False)
    assert "PyTorch" in bf16.engine and "bf16" in bf16.engine
    assert bf16.records[0]["probability"] == pytest.approx(onnx_rec["probability"], abs=0.05)  # bf16 rounding only
    fold0 = _predict(env, model=env["fold0"], centre=centre, diameter=10.0).records[0]
    assert "members" not in fold0 and fold0["probability"] == pytest.approx(m[0], abs=1e-5)
    assert fold0["label"] == ("malignant" if fold0["probability"] > 0.5 else "benign")


def test_training_nodules_are_flagged(env, tmp_path):
    path = tmp_path / "n.csv"
    x, y, z = lps_of(NODULE)
    path.write_text(f"id,x,y,z,diameter_mm\nSYN-0000:1,{x},{y},{z},10\nNEW-1,{x},{y},{z},10\n")
    res = _predict(env, nodules=path)
    assert [r.get("seen_in_training") for r in res.records] == ["nodule", None]
    assert any("SYN-0000:1" in w and "not held-out" in w for w in res.warnings)
    scan = scans.read_scan(env["ct"])
    scan.series_uid = "1.2.3"
    card = {"training_data": {"nodule_ids": [], "series_uids": ["1.2.3"]}}
    assert pr.training_overlap(card, scan, [pr.NoduleSpec("a", np.zeros(3), 5.0, "t")]) == ["scan"]


def test_output_folder_overlays_and_maps_on_the_scan_grid(env, tmp_path):
    out = tmp_path / "out"
    res = _predict(env, centre=_centre_arg(lps_of(NODULE)), diameter=10.0, output=out)
    assert sorted(p.name for p in out.iterdir()) == ["1_map.nii.gz", "1_overlay.png", "predictions.jsonl"]
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == res.records
    img = nib.load(str(out / "1_map.nii.gz"))
    ct = nib.load(str(env["ct"]))
    assert img.shape == ct.shape and np.allclose(img.affine, ct.affine)  # overlays the scan as stored
    data = np.asarray(img.dataobj)
    assert np.abs(data).max() > 0
    # The map's square lies on the nodule: its support, in world mm, is centred on the nodule centre.
    idx = np.argwhere(data != 0)
    world = nib.affines.apply_affine(img.affine, idx) * [-1, -1, 1]  # RAS -> LPS
    centre = (world.min(0) + world.max(0)) / 2
    assert centre[:2] == pytest.approx(lps_of(NODULE)[:2], abs=max(SPACING[:2]))
    assert np.ptp(world[:, 0]) == pytest.approx(20.0, abs=2 * SPACING[1])  # side 2 x diameter
    assert not (tmp_path / "out").with_name(".out.old").exists()
    # From a DICOM series: the map is written on the series' (column, row, slice) grid, in place.
    write_dicom_series(tmp_path / "dcm", env["hu"], order=np.random.default_rng(2).permutation(SHAPE[2]))
    _predict(env, scan=tmp_path / "dcm", centre=_centre_arg(lps_of(NODULE)), diameter=10.0, output=tmp_path / "o2")
    img = nib.load(str(tmp_path / "o2" / "1_map.nii.gz"))
    assert img.shape == (SHAPE[1], SHAPE[0], SHAPE[2])
    idx = np.argwhere(np.asarray(img.dataobj) != 0)
    world = nib.affines.apply_affine(img.affine, idx) * [-1, -1, 1]
    assert ((world.min(0) + world.max(0)) / 2)[:2] == pytest.approx(lps_of(NODULE)[:2], abs=max(SPACING[:2]))


def test_map_volume_places_each_map_pixel(env):
    """Patch pixel (a, b) covers volume (row, col) = centre + (a + 0.5 - 16) * step / spacing; the map
    sampled there equals the linear test map a + 100 b."""
    from nodulekit.predict_output import map_volume

    scan = scans.read_scan(env["ct"])
    d = 6.0
    spec = pr.NoduleSpec("1", np.array(NODULE), d, "test")
    aa, bb = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    layout = [{"z_offset_mm": 0.0, "p": 2.0}]
    vol = map_volume(scan, spec, aa + 100 * bb, layout)
    step = 2 * d / 32
    k = int(round(NODULE[2]))
    assert np.flatnonzero(np.abs(vol).sum(axis=(0, 1))).tolist() == [k]  # one plane: the nearest slice
    for r, c in ((11, 13), (9, 16), (14, 10)):
        a = (r - NODULE[0]) * SPACING[0] / step + 15.5
        b = (c - NODULE[1]) * SPACING[1] / step + 15.5
        assert vol[r, c, k] == pytest.approx(a + 100 * b, abs=1e-4)
    assert vol[0, 0, k] == 0 and vol[11, 4, k] == 0  # outside the 12 mm square


def test_cli_json_lines_on_stdout_messages_on_stderr(env, tmp_path, run_cli):
    code, out, err = run_cli("predict", env["ensemble"], env["ct"], "--centre", _centre_arg(lps_of(NODULE)),
        "--diameter", "10", "--provider", "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    rec = json.loads(out)
    assert set(rec) >= {"id", "centre_mm", "diameter_mm", "probability", "label", "members", "spread"}
    assert "{" not in err and "cpu provider" in err and "scored 1 nodule" in err
    code, out, err = run_cli("predict", env["ensemble"], env["ct"], "--centre", _centre_arg(lps_of(NODULE)),
        "--diameter", "10", "--provider", "cpu", "-q",
    )  # fmt: skip
    assert code == 0 and err == "" and json.loads(out)["probability"] == rec["probability"]


@pytest.fixture(scope="module")
def bad_inputs(env, tmp_path_factory):
    """{name: (predict args, expected message)} for every bad input the issue lists (files made once)."""
    tmp = tmp_path_factory.mktemp("bad")
    hu = env["hu"]
    stored, affine = stored_variant(hu, *LAYOUT)
    write_nifti(tmp / "flat.nii", stored[:, :, 5], affine)
    write_nifti(tmp / "mr.nii", (np.abs(stored) // 3).astype(np.int16), affine)
    write_nifti(tmp / "empty.nii", np.zeros(stored.shape, np.uint8), affine)
    write_nifti(tmp / "grid.nii", np.ones(stored.shape, np.uint8), affine @ np.diag([2.0, 1, 1, 1]))
    (tmp / "nocol.csv").write_text("x,y,diameter_mm\n1,2,3\n")
    (tmp / "bad.csv").write_text("x,y,z,diameter_mm\n1,2,three,4\n")
    from nodulekit import export as ex
    from nodulekit.models import create_model

    ex.export_onnx(create_model("hesam", 5, base_width=8), tmp / "five.onnx", exporter="torchscript")
    from onnx import TensorProto, helper, save

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    save(helper.make_model(g), str(tmp / "foreign.onnx"))
    import onnx

    proto = onnx.load(str(env["fold0"]))
    next(p for p in proto.metadata_props if p.key == "in_channels").value = "21"
    onnx.save(proto, str(tmp / "mismatch.onnx"))
    centre = ["--centre", _centre_arg(lps_of(NODULE)), "--diameter", "10"]
    ct, model = env["ct"], env["ensemble"]
    cases = [
        ("outside", [model, ct, "--centre", "500,0,0", "--diameter", "10"], "lies outside the scan"),
        ("zero diameter", [model, ct, "--centre", "0,0,-50", "--diameter", "0"], "diameter 0 mm is not in [1, 100]"),
        ("huge diameter", [model, ct, *centre[:2], "--diameter", "120"], "diameter 120 mm is not in [1, 100]"),
        ("empty mask", [model, ct, "--mask", tmp / "empty.nii"], "is empty"),
        ("other grid", [model, ct, "--mask", tmp / "grid.nii"], "not on the scan's grid"),
        ("2-D", [model, tmp / "flat.nii", *centre], "2-D image"),
        ("not HU", [model, tmp / "mr.nii", *centre], "do not look like CT Hounsfield units"),
        ("csv column", [model, ct, "--nodules", tmp / "nocol.csv"], "lacks column(s) z"),
        (
            "csv value",
            [model, ct, "--nodules", tmp / "bad.csv"],
            "bad.csv line 2: x, y, z and diameter_mm must be numbers",
        ),
        ("channels", [tmp / "five.onnx", ct, *centre], "does not say how its 5 input channels are made"),
        ("foreign onnx", [tmp / "foreign.onnx", ct, *centre], "not a nodulekit ONNX export"),
        ("mismatch", [tmp / "mismatch.onnx", ct, *centre], "does not match its nodulekit metadata"),
        ("no nodules", [model, ct], "exactly one of --mask"),
        ("no diameter", [model, ct, "--centre", "0,0,-50"], "--centre needs --diameter"),
        ("bad centre", [model, ct, "--centre", "1,2", "--diameter", "5"], "is not X,Y,Z"),
    ]
    return {name: (args, message) for name, args, message in cases}


BAD_INPUTS = (
    "outside",
    "zero diameter",
    "huge diameter",
    "empty mask",
    "other grid",
    "2-D",
    "not HU",
    "csv column",
    "csv value",
    "channels",
    "foreign onnx",
    "mismatch",
    "no nodules",
    "no diameter",
    "bad centre",
)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(bad_inputs, name, tmp_path, run_cli):
    args, message = bad_inputs[name]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("predict", *args, "-o", out, "--provider", "cpu")
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("nodulekit: error:") and message in lines[0], stderr
    assert stdout == "" and list(tmp_path.iterdir()) == []  # no output folder, no temporary one


def test_every_bad_input_has_a_case(bad_inputs):
    assert sorted(bad_inputs) == sorted(BAD_INPUTS)


def test_existing_output_is_refused_before_any_work(env, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(NodulekitError, match="already exists"):
        _predict(env, centre=_centre_arg(lps_of(NODULE)), diameter=10.0, output=tmp_path / "out")
