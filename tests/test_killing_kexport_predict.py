"""nodulekit.predict's records, warnings and one-line refusals, word for word, on the synthetic CT
of tests/scan_fixtures (its LPS geometry known by construction), plus one whole run that checks
what predict reports, times and writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nodulekit import predict as pr
from nodulekit.errors import NodulekitError
from tests.scan_fixtures import SHAPE, canonical_ct, lps_of, stored_index, stored_variant, write_nifti

NODULE = (11.3, 13.6, 6.4)  # canonical (row, col, slice) of canonical_ct()'s sphere
LAYOUT = ((1, 0, 2), (0, 1))  # stored like a RAS NIfTI: columns first, x and y reversed


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from nodulekit.scans import read_scan

    stored, affine = stored_variant(canonical_ct(), *LAYOUT)
    return read_scan(write_nifti(tmp_path_factory.mktemp("kpredict") / "ct.nii.gz", stored, affine))


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(NodulekitError) as err:
        call(*args, **kwargs)
    return str(err.value)


DECISION = {"threshold": 0.5, "class_names": ["benign", "malignant"]}


def test_record_of_one_nodule_in_lps_and_ras(scan):
    spec = pr.NoduleSpec("n1", np.array(NODULE), 8.123456, "--centre")
    world = lps_of(NODULE)
    rec = pr.record(spec, scan, "lps", 0.75, None, DECISION, {"filled_planes_mm": [], "seen_in_training": "scan"})
    assert rec == {
        "id": "n1",
        "source": "--centre",
        "centre_mm": [round(float(v), 4) for v in world],
        "frame": "LPS",
        "centre_voxel": [round(float(v), 4) for v in stored_index(NODULE, *LAYOUT)],
        "diameter_mm": 8.1235,
        "probability": 0.75,
        "label": "malignant",
        "threshold": 0.5,
        "seen_in_training": "scan",  # empty extras are left out
    }
    ras = pr.record(spec, scan, "ras", 0.5, [0.25, 0.75], DECISION, {})
    assert ras["frame"] == "RAS" and ras["centre_mm"] == [round(float(v), 4) for v in world * [-1, -1, 1]]
    assert ras["label"] == "benign"  # at the threshold: not above it
    assert ras["members"] == [0.25, 0.75] and ras["spread"] == {"sd": 0.25, "min": 0.25, "max": 0.75}
    assert pr.record(spec, scan, "voxel", 0.5000001, None, DECISION, {})["frame"] == "LPS"


def test_warnings_about_training_nodules_scans_and_filled_planes():
    class Scan:
        series_uid = "1.2.840.1"

    records = [{"id": f"n{i}", "seen_in_training": "nodule", "filled_planes_mm": [9.0] if i else []} for i in range(7)]
    records.append({"id": "s", "seen_in_training": "scan"})
    assert pr._warnings(records, Scan()) == [
        "7 nodule(s) (n0, n1, n2, n3, n4) have the id of a nodule this model was trained on: their probabilities "
        "are not held-out estimates",
        "this scan (series 1.2.840.1) was in the model's training data: its nodules may have been training "
        "examples, so their probabilities may not be held-out estimates",
        "6 nodule(s) (n1, n2, n3, n4, n5) lie so near the end of the scan that some of the model's planes repeat "
        "the last slice (see filled_planes_mm)",
    ]
    assert pr._warnings([{"id": "a"}], Scan()) == []


def test_training_overlap_by_id_then_series(scan):
    specs = [pr.NoduleSpec(i, np.zeros(3), 5.0, "t") for i in ("a", "b")]
    card = {"training_data": {"nodule_ids": ["a"], "series_uids": None}}
    assert pr.training_overlap(card, scan, specs) == ["nodule", None]
    assert pr.training_overlap({}, scan, specs) == [None, None]


def test_centre_and_diameter_checks(scan):
    assert pr._check_diameter(1.0, "w") == 1.0 and pr._check_diameter(100.0, "w") == 100.0
    for bad in (0.99, 100.5, float("nan")):
        assert _error(pr._check_diameter, bad, "--diameter") == (
            f"--diameter: diameter {bad:g} mm is not in [1, 100] mm"
        )
    assert pr.parse_centre("1, 2.5,-3") == (1.0, 2.5, -3.0)
    for bad in ("1,2", "a,b,c", "1,2,inf"):
        assert _error(pr.parse_centre, bad) == f"--centre {bad!r} is not X,Y,Z (three numbers separated by commas)"
    assert _error(pr.centre_spec, scan, "1,2,3", None, "lps") == "--centre needs --diameter MM"
    world = lps_of(NODULE)
    spec = pr.centre_spec(scan, ",".join(map(str, world)), 7, "lps")
    assert (spec.id, spec.origin, spec.diameter_mm) == ("1", "--centre", 7.0)
    np.testing.assert_allclose(spec.centre, NODULE, atol=1e-9)


def test_centres_on_the_scan_edge_and_outside(scan):
    last = np.array(SHAPE) - 1
    for index in (np.array([-0.5, -0.5, -0.5]), last + 0.5):  # the outer faces of the end voxels: inside
        got = pr._to_volume_voxel(scan, stored_index(index, *LAYOUT), "voxel", "w")
        np.testing.assert_allclose(got, index, atol=1e-9)
        inner = np.clip(index, -0.49, last + 0.49)  # the NIfTI affine is stored in float32
        np.testing.assert_allclose(pr._to_volume_voxel(scan, lps_of(inner), "lps", "w"), inner, atol=1e-4)
    outside = lps_of(np.array([-0.6, 3, 3]))
    message = _error(pr._to_volume_voxel, scan, outside, "lps", "--centre")
    assert message.startswith(
        f"--centre: centre ({', '.join(f'{v:g}' for v in outside)}) LPS mm lies outside the scan ("
    )
    ras = _error(pr._to_volume_voxel, scan, outside * [-1, -1, 1], "ras", "row 2")
    assert ras.startswith("row 2: centre (") and ") RAS mm lies outside the scan (" in ras
    beyond = stored_index(np.array([3, 3, SHAPE[2] - 0.4]), *LAYOUT)
    assert ") voxel lies outside the scan (" in _error(pr._to_volume_voxel, scan, beyond, "voxel", "w")
    assert _error(pr._to_volume_voxel, scan, outside, "mm", "w") == "--coords must be one of lps, ras, voxel (got 'mm')"


def test_which_nodule_option_is_given(scan, tmp_path):
    message = "say where the nodules are with exactly one of --mask FILE, --centre X,Y,Z --diameter MM, --nodules CSV"
    assert _error(pr.collect_specs, scan) == message
    assert _error(pr.collect_specs, scan, centre="1,2,3", nodules="n.csv", mask="m.nii") == (
        message + " (got --mask, --centre, --nodules)"
    )
    assert _error(pr.collect_specs, scan, nodules="n.csv", diameter=5) == (
        "--diameter goes with --centre (a CSV has a diameter_mm column; a mask gives its own)"
    )
    world = lps_of(NODULE) * [-1, -1, 1]
    (spec,) = pr.collect_specs(scan, centre=",".join(map(str, world)), diameter=6, coords="ras")
    np.testing.assert_allclose(spec.centre, NODULE, atol=1e-9)


def _csv(tmp_path, text, name="n.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nodules_csv_rows_and_refusals(scan, tmp_path):
    x, y, z = lps_of(NODULE)
    specs = pr.csv_specs(scan, _csv(tmp_path, f"x,y,z,diameter_mm\n{x},{y},{z},6\n{x},{y},{z},7.5\n"), "lps")
    assert [(s.id, s.origin, s.diameter_mm) for s in specs] == [("1", "n.csv line 2", 6.0), ("2", "n.csv line 3", 7.5)]
    path = _csv(tmp_path, "x,y,diameter_mm\n1,2,3\n")
    assert _error(pr.csv_specs, scan, path, "lps") == (
        f"nodules CSV {path} lacks column(s) z (needs x, y, z, diameter_mm, or LUNA16's seriesuid, coordX, coordY, "
        "coordZ, diameter_mm)"
    )
    path = _csv(tmp_path, f"x,y,z,diameter_mm\n{x},{y},{z},six\n")
    assert _error(pr.csv_specs, scan, path, "lps") == "n.csv line 2: x, y, z and diameter_mm must be numbers"
    path = _csv(tmp_path, f"id,x,y,z,diameter_mm\nA,{x},{y},{z},6\nB,{x},{y},{z},6\nA,{x},{y},{z},6\n")
    assert _error(pr.csv_specs, scan, path, "lps") == f"nodules CSV {path}: id 'A' is used twice"


def test_luna16_rows_of_this_series(scan, tmp_path):
    x, y, z = lps_of(NODULE)
    head = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    two = _csv(tmp_path, head + f"1.1,{x},{y},{z},6\n1.2,{x},{y},{z},7\n", "luna.csv")
    assert _error(pr.csv_specs, scan, two, "ras") == (
        f"nodules CSV {two} has LUNA16's columns, whose coordX, coordY, coordZ are LPS mm: drop --coords ras"
    )
    assert _error(pr.csv_specs, scan, two, "lps") == (
        f"nodules CSV {two} lists 2 series and the scan has no series UID to pick its rows (name the file "
        "<seriesuid>.mhd, as LUNA16 does)"
    )
    one = _csv(tmp_path, head + f"1.1,{x},{y},{z},6\n", "one.csv")
    (spec,) = pr.csv_specs(scan, one, "lps")  # one series and no UID to compare: its rows
    assert (spec.id, spec.diameter_mm) == ("1", 6.0)
    scan.series_uid = "1.2"
    try:
        (spec,) = pr.csv_specs(scan, two, "lps")
        assert (spec.diameter_mm, spec.origin) == (7.0, "luna.csv line 3")
        assert _error(pr.csv_specs, scan, one, "lps") == f"nodules CSV {one} has no row for this scan's series 1.2"
    finally:
        scan.series_uid = None
    empty = _csv(tmp_path, "x,y,z,diameter_mm\n", "empty.csv")
    assert _error(pr.csv_specs, scan, empty, "lps") == f"nodules CSV {empty} has no rows"


def test_mask_components_numbered_by_position(scan, tmp_path):
    from tests.scan_fixtures import AXIS_DIRECTION  # noqa: F401 - the layout the mask is stored in

    labels = np.zeros(SHAPE, np.uint8)
    labels[15:19, 15:19, 8:11] = 7  # lower slices first: component 1 is the one at slices 2..4
    labels[3:6, 3:6, 2:5] = 7
    stored, affine = stored_variant(labels, *LAYOUT)
    path = write_nifti(tmp_path / "mask.nii.gz", stored, affine)
    specs = pr.mask_specs(scan, path)
    assert [(s.id, s.origin) for s in specs] == [("1", "mask component 1"), ("2", "mask component 2")]
    np.testing.assert_allclose(specs[0].centre, (4.0, 4.0, 3.0))
    np.testing.assert_allclose(specs[1].centre, (16.5, 16.5, 9.0))
    assert specs[0].mask_offset == (3, 3, 2) and specs[0].mask.shape == (3, 3, 3) and specs[0].mask.all()
    labels[15:19, 15:19, 8:11] = 9  # two label values: one nodule per value, named by it
    stored, _ = stored_variant(labels, *LAYOUT)
    path = write_nifti(tmp_path / "labels.nii.gz", stored, affine)
    assert [(s.id, s.origin) for s in pr.mask_specs(scan, path)] == [("7", "mask label 7"), ("9", "mask label 9")]
    assert [s.id for s in pr.mask_specs(scan, path, "components")] == ["1", "2"]
    # predict's entry point passes --mask-nodules on
    assert [s.id for s in pr.collect_specs(scan, mask=path)] == ["7", "9"]
    assert [s.origin for s in pr.collect_specs(scan, mask=path, mask_mode="components")] == [
        "mask component 1",
        "mask component 2",
    ]
    assert _error(pr.mask_specs, scan, path, "blobs") == (
        "--mask-nodules must be one of auto, components, labels (got 'blobs')"
    )


# ----------------------------------------------------------------------------- one whole run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from tests.model_fixtures import export, trained_run

    folder = tmp_path_factory.mktemp("kpredict-model")
    _, rundir = trained_run(folder)
    return export(rundir, folder / "fold0.onnx", fold=0)


def test_a_whole_run_reports_times_and_writes(model, scan, tmp_path):
    lines = []
    world = lps_of(NODULE)
    out = tmp_path / "out"
    res = pr.predict(
        model,
        scan.path,
        centre=",".join(map(str, world)),
        diameter=9.0,
        provider="cpu",
        output=out,
        figure_format="svg",
        dpi=40,
        report=lines.append,
    )
    assert set(res.timings) == {"load_model_s", "read_s", "inputs_s", "model_s"}
    assert all(v >= 0 for v in res.timings.values())
    assert lines[0].startswith(f"read {scan.describe()} in ") and lines[0].endswith(" s")
    assert lines[-1] == f"1 nodule(s); model: {res.engine}"
    assert res.engine == "ONNX Runtime, cpu provider"
    (rec,) = res.records
    assert rec["warnings"] == [] and rec["id"] == "1" and rec["diameter_mm"] == 9.0
    assert len(res.inputs) == 1 and res.inputs[0].x.shape == (11, 32, 32)
    assert res.output == out and sorted(p.name for p in out.iterdir()) == [
        "1_map.nii.gz",
        "1_overlay.svg",
        "predictions.jsonl",
    ]
    assert json.loads((out / "predictions.jsonl").read_text()) == json.loads(json.dumps(rec))
    # a warning (a diameter in cm) is a refusal under --strict, and nothing is written
    with pytest.raises(NodulekitError) as err:
        pr.predict(model, scan.path, centre=",".join(map(str, world)), diameter=1.5, provider="cpu", strict=True)
    assert str(err.value).startswith("--strict: nodule 1: diameter 1.5 mm is below the 3 mm")
    assert _error(pr.predict, model, scan.path, centre="0,0,0", diameter=5, coords="ijk") == (
        "--coords must be one of lps, ras, voxel (got 'ijk')"
    )


def _bilinear_clamped(m: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """m sampled bilinearly at (a, b), coordinates clamped to the grid (edge values repeated)."""
    n = m.shape[0]
    a, b = np.clip(a, 0, n - 1), np.clip(b, 0, n - 1)
    i, j = np.minimum(np.floor(a).astype(int), n - 2), np.minimum(np.floor(b).astype(int), n - 2)
    u, q = a - i, b - j
    return (1 - u) * (1 - q) * m[i, j] + (1 - u) * q * m[i, j + 1] + u * (1 - q) * m[i + 1, j] + u * q * m[i + 1, j + 1]


@pytest.mark.parametrize("centre", [NODULE, (1.2, 25.6, 1.3)])  # the second: square and planes cut by the edges
def test_map_volume_equals_the_placement_the_description_states(scan, centre):
    """map_placement's rule, computed here over the whole volume: CT pixel (row, col) takes map_up at
    a = (row - r) x s_r / t + 15.5, b = (col - c) x s_c / t + 15.5 (t = p x d / 32 of the reference
    channel), 0 outside [-0.5, 31.5], on the slices within the planes' offsets +- 0.5 mm."""
    from nodulekit.predict_output import map_volume
    from tests.scan_fixtures import ORIGIN, SPACING

    d = 7.0
    layout = [{"z_offset_mm": float(z), "p": p} for z in (-3, 0, 3) for p in (3.0, 2.0)]  # reference: +0 mm, p 2
    m = np.random.default_rng(5).random((32, 32))
    vol = map_volume(scan, pr.NoduleSpec("1", np.array(centre), d, "t"), m, layout)
    t = 2.0 * d / 32
    r, c = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    a = (r - centre[0]) * SPACING[0] / t + 15.5
    b = (c - centre[1]) * SPACING[1] / t + 15.5
    inside = (a >= -0.5) & (a <= 31.5) & (b >= -0.5) & (b <= 31.5)
    plane = np.where(inside, _bilinear_clamped(m, a, b), 0.0)
    z = ORIGIN[2] + np.arange(SHAPE[2]) * SPACING[2]
    z_c = ORIGIN[2] + centre[2] * SPACING[2]
    on = (z >= z_c - 3.5) & (z <= z_c + 3.5)
    expected = np.where(on[None, None, :], plane[:, :, None], 0.0)
    assert vol.dtype == np.float32 and vol.shape == SHAPE
    np.testing.assert_allclose(vol, expected, atol=1e-5)
    assert on.sum() >= 2 and inside.any() and not inside.all()


def test_map_volume_between_slices_uses_the_nearest_one(scan):
    """One plane at +0 mm, 0.8 mm from the nearest slice (slices 2 mm apart): that slice gets the map."""
    from nodulekit.predict_output import map_volume, reference_channel

    vol = map_volume(
        scan, pr.NoduleSpec("1", np.array(NODULE), 6.0, "t"), np.ones((32, 32)), [{"z_offset_mm": 0.0, "p": 2.0}]
    )
    assert np.flatnonzero(vol.any(axis=(0, 1))).tolist() == [6]
    layout = [{"z_offset_mm": -1.0, "p": 1.0}, {"z_offset_mm": 0.0, "p": 3.0}, {"z_offset_mm": 0.0, "p": 2.0}]
    assert reference_channel(layout) == 2  # the centre plane, smallest crop


def test_overlay_figure_layout_and_words(monkeypatch, tmp_path):
    """The overlay a reader opens: two panels (input plane with the mask contour, the map with its colour
    bar), their titles, the one-line verdict with the crop's side in mm, small print, no ticks."""
    from nodulekit import predict_output as po
    from nodulekit.predict import NoduleInput

    shown = {}

    def keep(fig, path, fmt, dpi):
        shown.update(fig=fig, path=path, fmt=fmt, dpi=dpi)

    monkeypatch.setattr("nodulekit.figures.save_figure", keep)
    layout = [{"z_offset_mm": -1.0, "p": 2.0}, {"z_offset_mm": 0.0, "p": 2.0}, {"z_offset_mm": 0.0, "p": 3.0}]
    x = np.zeros((3, 32, 32), np.float32)
    x[1, 8:24, 8:24] = 0.5
    mask = np.zeros((3, 32, 32), np.uint8)
    mask[1, 10:22, 10:22] = 1
    inp = NoduleInput(x, mask, np.full(3, 0.4))
    rec = {"id": "n7", "probability": 0.61234, "label": "malignant", "diameter_mm": 6.3}
    po.write_overlay(tmp_path / "o.pdf", inp, np.random.default_rng(0).random((32, 32)), layout, rec, "pdf", 72)
    fig = shown["fig"]
    assert (shown["path"], shown["fmt"], shown["dpi"]) == (tmp_path / "o.pdf", "pdf", 72)
    assert tuple(fig.get_size_inches()) == pytest.approx((5.6, 2.9))
    assert fig._suptitle.get_text() == "nodule n7: p(malignant) = 0.612 -> malignant  (12.6 mm square)"
    assert fig._suptitle.get_fontsize() == 8
    left, right = fig.axes[:2]
    assert [(ax.get_title(), ax.title.get_fontsize()) for ax in (left, right)] == [
        ("model input (centre plane)", 8),
        ("malignant-class map", 8),
    ]
    assert all(list(ax.get_xticks()) == [] and list(ax.get_yticks()) == [] for ax in (left, right))
    np.testing.assert_array_equal(left.images[0].get_array(), x[1])  # the reference channel: +0 mm, p 2
    assert len(left.collections) == 1  # the nodule's contour (the reference channel's mask)
    assert len(fig.axes) == 3  # the map's colour bar


# ----------------------------------------------------------------------------- plausibility


def _ranges(**kw):
    return {"training_data": {"ranges": {k: {"min": lo, "max": hi, "n": 5} for k, (lo, hi) in kw.items()}}}


def test_plausibility_messages_at_their_thresholds(scan):
    from nodulekit import plausibility as pl

    inside = pr.NoduleSpec("a", np.array(NODULE), 3.0, "t")  # the sphere: 20..60 HU at its centre
    hu = pl.centre_hu(scan, inside.centre)
    assert hu == float(canonical_ct()[11, 14, 6]) and 20 <= hu < 60
    assert pl.nodule_warnings(scan, inside, None) == []  # 3 mm: the smallest LIDC size, not a cm value
    small = pr.NoduleSpec("b", np.array(NODULE), 2.5, "t")
    assert pl.nodule_warnings(scan, small, None) == [
        {
            "code": "diameter_looks_like_cm",
            "message": "diameter 2.5 mm is below the 3 mm of the smallest nodules LIDC-IDRI's readers outlined: "
            "if it is in cm, give 25",
        }
    ]
    assert pl.nodule_warnings(scan, pr.NoduleSpec("c", np.array(NODULE), 60.0, "t"), None) == []
    assert pl.nodule_warnings(scan, pr.NoduleSpec("c", np.array(NODULE), 60.5, "t"), None) == [
        {"code": "diameter_implausible", "message": "diameter 60.5 mm is larger than any lung nodule (> 60 mm)"}
    ]
    ranges = pl.training_ranges(_ranges(diameter_mm=(3.0, 9.5), centre_hu=(hu + 1, 300.0)))
    assert ranges == {"diameter_mm": (3.0, 9.5), "centre_hu": (hu + 1, 300.0)}
    codes = pl.nodule_warnings(scan, pr.NoduleSpec("d", np.array(NODULE), 9.75, "t"), ranges)
    assert codes[0] == {
        "code": "diameter_outside_training",
        "message": "diameter 9.75 mm lies outside the training nodules' 3..9.5 mm",
    }
    assert codes[1]["code"] == "centre_hu_outside_training"
    assert codes[1]["message"].startswith(
        f"the centre's {hu:.0f} HU lies outside the training nodules' centres ({hu + 1:.0f}..300 HU)"
    )
    lung = pr.NoduleSpec("e", np.array([2.0, 2.0, 1.0]), 5.0, "t")  # background: -900..-801 HU
    (w,) = pl.nodule_warnings(scan, lung, ranges)
    lung_hu = pl.centre_hu(scan, lung.centre)
    assert w["code"] == "centre_in_lung" and w["message"].startswith(
        f"the centre lies in lung parenchyma ({lung_hu:.0f} HU < -750, below any LIDC-IDRI nodule's centre)"
    )
    assert pl.training_ranges({"training_data": {}}) is None


def test_spacing_warnings_and_the_request_check(scan):
    from nodulekit import plausibility as pl

    # the scan: rows 0.8 mm, columns 0.7 mm (the smaller is the pixel spacing), slices 2 mm
    row, col, sl = scan.spacing  # as read from the float32 affine
    assert pl.scan_warnings(scan, {"pixel_spacing_mm": (col, 1.0), "slice_spacing_mm": (1.0, sl)}) == []
    assert pl.scan_warnings(scan, {"pixel_spacing_mm": (0.5, 0.69), "slice_spacing_mm": (2.01, 3.0)}) == [
        {
            "code": "spacing_outside_training",
            "message": "pixel spacing 0.7 mm lies outside the training data's 0.5..0.69 mm",
        },
        {
            "code": "spacing_outside_training",
            "message": "slice spacing 2 mm lies outside the training data's 2.01..3 mm",
        },
    ]
    specs = [pr.NoduleSpec("a", np.array(NODULE), 2.0, "t"), pr.NoduleSpec("b", np.array(NODULE), 5.0, "t")]
    card = _ranges(pixel_spacing_mm=(0.5, 0.6))
    kept, per_spec, lines, note = pl.check_request(scan, specs, card, 3.0, False)
    assert kept == specs and note is None
    assert lines == [
        "scan: pixel spacing 0.7 mm lies outside the training data's 0.5..0.6 mm",
        "nodule a: diameter 2 mm is below the 3 mm of the smallest nodules LIDC-IDRI's readers outlined: if it is "
        "in cm, give 20",
    ]
    assert [[w["code"] for w in ws] for ws in per_spec] == [
        ["spacing_outside_training", "diameter_looks_like_cm"],
        ["spacing_outside_training"],
    ]
    with pytest.raises(NodulekitError) as err:
        pl.check_request(scan, specs, card, 3.0, True)
    assert str(err.value) == f"--strict: {lines[0]} (and 1 more)"
    _, _, lines, note = pl.check_request(scan, specs[1:], {}, 3.0, False)
    assert lines == [] and note == (
        "the model records no training ranges: diameter, spacing and HU range checks are off"
    )


def test_fragments_and_the_min_diameter_option():
    from nodulekit import plausibility as pl

    mask = np.ones((2, 2, 2), bool)
    specs = [pr.NoduleSpec(str(i), np.zeros(3), d, f"mask component {i}", mask) for i, d in ((1, 2.999), (2, 3.0))]
    kept, lines = pl.drop_fragments(specs, 3.0)
    assert kept == specs[1:] and lines == ["mask component 1: skipped, a 3.00 mm fragment (< --min-diameter 3 mm)"]
    with pytest.raises(NodulekitError) as err:
        pl.drop_fragments(specs, 3.5)
    assert str(err.value) == "every mask component is smaller than --min-diameter 3.5 mm (largest 3.00 mm)"
    assert pl.check_options(None, None) == 3.0 and pl.check_options(0, "m.nii") == 0.0
    assert _error(pl.check_options, 2.0, None) == (
        "--min-diameter applies to --mask components; with --centre or --nodules it checks nothing"
    )
    assert _error(pl.check_options, -1.0, "m.nii") == "--min-diameter must be a number of mm >= 0 (got -1)"
