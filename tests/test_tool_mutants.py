"""Tests written where mutmut's mutants survived the targeted test files (docs/testing.md,
"Mutants from a tool"). Each asserts a documented property on a fixture where the mutated
choice shows (a box touching the grid's edges, a tie, a value that is not the default),
against a known answer worked out here; none reads its expected value back from the code.
"""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.errors import DataError

# --------------------------------------------------------------------------- consensus


def _corner_readers():
    """Two readers on a 3 x 4 x 2 box; reader 1 also marks the far corner (agreement 1)."""
    from nodulekit.consensus import ReaderMasks

    masks = np.zeros((2, 3, 4, 2), bool)
    masks[:, 0:2, 0:3, 0] = True
    masks[0, 2, 3, 1] = True
    return ReaderMasks(masks, (0, 0, 0))


def test_agreement_fills_a_grid_it_touches_on_every_edge():
    """A box as large as the grid (offset 0, end = shape on every axis) fits: the grid is the
    readers' agreement count, as uint8 (the documented type, what the VOI writer stores)."""
    from nodulekit.consensus import Placement, agreement_on_grid

    r = _corner_readers()
    grid = agreement_on_grid(r, (3, 4, 2), Placement((0, 0, 0), (False, False), 0))
    expected = np.zeros((3, 4, 2), int)
    expected[0:2, 0:3, 0] = 2
    expected[2, 3, 1] = 1
    np.testing.assert_array_equal(grid, expected)
    assert grid.dtype == np.uint8
    # the same box in a larger grid, touching its far edges only
    grid = agreement_on_grid(r, (5, 4, 3), Placement((2, 0, 1), (False, False), 0))
    np.testing.assert_array_equal(grid[2:, :, 1:], expected)
    assert grid.sum() == expected.sum()


@pytest.mark.parametrize(
    ("offset", "shape"),
    [((-1, 0, 0), (3, 4, 2)), ((0, -1, 0), (4, 5, 2)), ((0, 0, 1), (3, 4, 2)), ((1, 1, 0), (3, 5, 2))],
)
def test_agreement_box_outside_the_grid_is_a_one_line_error(offset, shape):
    """Before the grid's start, or past its end on one axis only: refused, naming box and grid."""
    from nodulekit.consensus import Placement, agreement_on_grid

    with pytest.raises(DataError, match=r"do not fit in the grid \("):
        agreement_on_grid(_corner_readers(), shape, Placement(offset, (False, False), 0))


SCAN_Z = -20.0 + 1.5 * np.arange(40)  # a scan of 40 slices, 1.5 mm apart


def _place(masks: np.ndarray, voi: np.ndarray, voi_z=None, scan_z=SCAN_Z, first_slice: int = 30, **kw):
    """place_in_voi of readers whose box starts at scan slice ``first_slice`` in ``voi`` (its
    box at VOI slice 1, so the VOI starts at scan slice ``first_slice - 1``)."""
    from nodulekit.consensus import ReaderMasks, place_in_voi

    k0 = first_slice - 1
    voi_z = scan_z[k0 : k0 + 3] if voi_z is None else voi_z
    return place_in_voi(ReaderMasks(masks, (100, 200, first_slice)), voi, voi_z, scan_z, **kw)


def _rectangle_voi(value=1, dtype=np.uint8) -> np.ndarray:
    voi = np.zeros((6, 7, 3), dtype)
    voi[1:3, 2:5, 1] = value
    return voi


def test_union_with_symmetric_outline_is_placed_when_agreement_is_symmetric_too():
    """A rectangle fits the VOI in all four in-plane orientations; with the same agreement in
    each (both readers mark all of it) the placement is the standard one, not an error."""
    masks = np.zeros((2, 2, 3, 1), bool)
    masks[:] = True
    place = _place(masks, _rectangle_voi())
    assert place.offset == (1, 2, 1) and place.flip == (False, False) and place.scan_slice0 == 29


def test_union_with_symmetric_outline_but_asymmetric_agreement_is_ambiguous():
    """The same rectangle, but one reader marks only its first corner: the orientations that
    fit the union give different agreement maps, so the placement is refused as ambiguous."""
    masks = np.zeros((2, 2, 3, 1), bool)
    masks[0] = True
    masks[1, 0, 0, 0] = True
    with pytest.raises(DataError, match=r"^VOI: its mask fits the readers' union in 4 orientations"):
        _place(masks, _rectangle_voi())
    with pytest.raises(DataError, match=r"^VOI x\.nii\.gz: its mask fits"):
        _place(masks, _rectangle_voi(), what="VOI x.nii.gz")


def test_voi_mask_of_any_nonzero_label_is_the_same_mask():
    """A VOI mask stored 0/255 (or 0.0/1.0) marks the same voxels as a boolean one."""
    masks = _l_shaped_readers()  # an L-shaped union: one orientation fits
    masks[1, 0, 0, 0] = True
    voi = _l_shaped_voi()
    for stored in (voi * 255, voi.astype(np.float32), voi.astype(bool)):
        place = _place(masks, stored)
        assert place.offset == (1, 2, 1) and place.flip == (False, False)
    # the error names the default "VOI" and counts the voxels of a 0/255 mask as voxels
    with pytest.raises(DataError, match=r"^VOI: its mask \(6 voxels, box \(2, 3, 1\)\) matches no placement"):
        _place(masks, _rectangle_voi(255))


def _l_shaped_readers() -> np.ndarray:
    masks = np.zeros((2, 2, 3, 1), bool)
    masks[0] = True
    masks[0, 1, 2, 0] = False
    return masks


def _l_shaped_voi() -> np.ndarray:
    voi = _rectangle_voi()
    voi[2, 4, 1] = 0
    return voi


def test_voi_starting_at_the_scans_first_slice_is_placed():
    """k0 = 0: the VOI's first slice is the scan's first, a valid crop (not 'outside the scan')."""
    place = _place(_l_shaped_readers(), _l_shaped_voi(), first_slice=1)
    assert place.scan_slice0 == 0 and place.offset == (1, 2, 1)


def test_voi_slices_at_exactly_the_tolerance_are_the_same_slices():
    """Z_TOL_MM is inclusive: z positions 0.05 mm apart (exact in floating point: 0 and 0.05)
    are the same slice; a hair more is another scan."""
    from nodulekit.consensus import Z_TOL_MM

    scan_z = np.array([-3.0, -1.5, 0.0, 1.5, 3.0])
    voi_z = scan_z[1:4].copy()
    voi_z[1] = Z_TOL_MM  # scan slice 2 is at 0.0
    assert abs(scan_z[2] - voi_z[1]) == Z_TOL_MM
    assert _place(_l_shaped_readers(), _l_shaped_voi(), voi_z, scan_z, first_slice=2).scan_slice0 == 1
    voi_z[1] = np.nextafter(Z_TOL_MM, 1.0)
    with pytest.raises(DataError, match="not a crop of this scan"):
        _place(_l_shaped_readers(), _l_shaped_voi(), voi_z, scan_z, first_slice=2)


@pytest.mark.parametrize(
    ("first_slice", "n_scan", "where"),
    [
        (1, 40, "slice 0, whose"),  # starts at the scan's first slice, z positions differ
        (30, 40, "slice 29, whose"),
        (30, 31, "slice 29, whose"),  # inside the scan, but its last slice would be slice 31 of 31
        (30, 29, r"slice 29 \(outside the scan's 29\)"),  # starts just past the scan's end
        (0, 40, r"slice -1 \(outside the scan's 40\)"),  # starts before the scan
    ],
)
def test_voi_that_is_not_a_crop_of_the_scan_names_its_slice(first_slice, n_scan, where):
    """The refusal names the VOI's first slice z (VOI slices 0.6 mm off the scan's, each its own
    z) and the scan slice it would start at, or that this lies outside the scan."""
    scan_z = SCAN_Z[:n_scan]
    k0 = first_slice - 1
    voi_z = -20.0 + 1.5 * np.arange(k0, k0 + 3) + 0.6
    first = f"{voi_z[0]:.2f}".replace(".", r"\.")
    with pytest.raises(DataError, match=rf"^VOI: .*first slice \(z={first} mm\) is the scan's {where}"):
        _place(_l_shaped_readers(), _l_shaped_voi(), voi_z, scan_z, first_slice=first_slice)
    if 0 <= k0 and k0 + 3 <= n_scan:  # the same VOI at the scan's own z positions is placed
        assert _place(_l_shaped_readers(), _l_shaped_voi(), voi_z - 0.6, scan_z, first_slice=first_slice)


def test_consensus_of_no_reader_is_a_one_line_error():
    from nodulekit.consensus import min_agreement
    from nodulekit.errors import NodulekitError

    with pytest.raises(NodulekitError, match=r"^a consensus needs at least one reader \(got 0\)$"):
        min_agreement(0.5, 0)


def test_union_symmetric_under_one_flip_with_asymmetric_agreement_is_ambiguous():
    """A union whose rows read the same reversed (and columns not) fits in two orientations,
    the standard one and rows reversed; one reader marking only the first row makes their
    agreement maps differ: refused as ambiguous. Marked by both readers alike, it is placed."""
    union = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
    masks = np.zeros((2, 3, 3, 1), bool)
    masks[0, :, :, 0] = union
    masks[1, 0, :, 0] = True
    voi = np.zeros((6, 7, 3), np.uint8)
    voi[1:4, 2:5, 1] = union
    with pytest.raises(DataError, match=r"fits the readers' union in 2 orientations"):
        _place(masks, voi)
    masks[1, :, :, 0] = union
    assert _place(masks, voi).flip == (False, False)


def test_reader_masks_of_any_nonzero_label_count_readers():
    """Masks stored 0/255 (a common label convention) count readers, not label values: the
    agreement of two readers is at most 2, the same maps as from boolean masks."""
    from nodulekit.consensus import ReaderMasks

    masks = np.zeros((2, 2, 3, 1), bool)
    masks[0] = True
    masks[1, 0, :2, 0] = True
    labelled = ReaderMasks(masks.astype(np.uint8) * 255, (5, 6, 7))
    plain = ReaderMasks(masks, (5, 6, 7))
    np.testing.assert_array_equal(labelled.agreement, [[[2], [2], [1]], [[1], [1], [1]]])
    np.testing.assert_array_equal(labelled.agreement, plain.agreement)
    np.testing.assert_array_equal(labelled.consensus(1.0), plain.consensus(1.0))


def test_reader_masks_refuse_empty_masks_and_a_start_of_the_wrong_length():
    from nodulekit.consensus import ReaderMasks

    with pytest.raises(DataError, match=r"^the readers' masks mark no voxel$"):
        ReaderMasks(np.zeros((2, 3, 3, 2), bool), (0, 0, 0))
    # a start with one coordinate per axis or nothing: not a silently shortened start
    with pytest.raises(ValueError, match="zip"):
        ReaderMasks(np.ones((1, 2, 2, 2), bool), (4, 5))


# --------------------------------------------------------------------------- plausibility


@pytest.fixture(scope="module")
def edge_scan(tmp_path_factory):
    """A 40-row x 30-column x 4-slice CT, 1 mm pixels, rows at y = -10..29 and columns at
    x = -20..9 mm LPS: negating x and y maps row r to 20 - r and column c to 40 - c, so a
    centre's swapped point can be put exactly on the scan's outer edge (-0.5 or n - 0.5).
    Air (-950 HU) where row >= 20 and column <= 15, soft tissue (40 HU) elsewhere but for
    two voxels either side of LUNG_HU (row 0), one at AIR_HU (row 1) and a padding voxel."""
    import nibabel as nib

    from nodulekit.scans import read_scan

    hu = np.full((30, 40, 4), 40, np.int16)  # stored (x, y, z) = (column, row, slice)
    hu[:16, 20:, :] = -950
    hu[29, 39, 3] = -2000  # one padding voxel (the minimum), so the air counts as the body's
    hu[27:29, 0, :] = [[-750], [-751]]  # row 0, columns 27 and 28: either side of LUNG_HU
    hu[27, 1, :] = -900  # row 1, column 27: exactly AIR_HU
    lps = np.diag([1.0, 1.0, 2.0, 1.0])
    lps[:3, 3] = (-20.0, -10.0, 0.0)
    path = tmp_path_factory.mktemp("edge") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), str(path))
    scan = read_scan(path)
    assert scan.volume.shape == (40, 30, 4)
    return scan


@pytest.mark.parametrize(
    ("swapped", "hint_hu"),
    [
        ((-0.5, 25.0, 1.0), 40),  # on the first row's outer edge: inside the scan
        ((-0.75, 25.0, 1.0), None),  # a quarter voxel beyond it
        ((0.0, 29.5, 1.0), 40),  # on the last column's outer edge
        ((0.0, 29.75, 1.0), None),
        ((0.0, 27.0, 1.0), -750),  # exactly LUNG_HU: not lung (as for the centre), so worth the hint
        ((0.0, 28.0, 1.0), None),  # -751 HU: lung, where a swapped centre would be no better
    ],
)
def test_swapped_frame_hint_only_for_points_inside_the_scan(edge_scan, swapped, hint_hu):
    """A centre in air gets the RAS/LPS hint when its point with x and y negated lies in the
    scan (voxel centres +- half a voxel, edges included) at HU >= LUNG_HU, and no hint when
    that point lies outside, however close, or in lung."""
    from types import SimpleNamespace

    from nodulekit.plausibility import nodule_warnings

    x, y, z = edge_scan.voxel_to_lps(swapped)
    centre = edge_scan.lps_to_voxel((-x, -y, z))
    np.testing.assert_array_equal(edge_scan.lps_to_voxel(-edge_scan.voxel_to_lps(centre) * [1, 1, -1]), swapped)
    (w,) = nodule_warnings(edge_scan, SimpleNamespace(mask=None, centre=centre, diameter_mm=10.0), None)
    hint = "" if hint_hu is None else f"; with x and y negated (RAS<->LPS) it would lie at {hint_hu} HU: check --coords"
    assert w == {"code": "centre_in_air", "message": "the centre lies in air (-950 HU < -900)" + hint}


HINT_40 = "; with x and y negated (RAS<->LPS) it would lie at 40 HU: check --coords"
LUNG = "the centre lies in lung parenchyma ({} HU < -750, below any LIDC-IDRI nodule's centre)"
IN_CM = (
    "diameter 2.5 mm is below the 3 mm of the smallest nodules LIDC-IDRI's readers outlined: if it is in cm, give 25"
)
NOT_A_NODULE = "diameter 60.5 mm is larger than any lung nodule (> 60 mm)"
HU_NOT_TRAINED = "the centre's 40 HU lies outside the training nodules' centres (100..200 HU)" + HINT_40
TISSUE = (5, 25, 1)  # 40 HU; its negated point (15, 15) too


@pytest.mark.parametrize(
    ("centre", "diameter", "ranges", "expected"),
    [
        (TISSUE, 3.0, None, []),  # the smallest outlined size is not "in cm"
        (TISSUE, 2.5, None, [("diameter_looks_like_cm", IN_CM)]),
        (TISSUE, 60.0, None, []),  # MAX_NODULE_MM itself is plausible
        (TISSUE, 60.5, None, [("diameter_implausible", NOT_A_NODULE)]),
        ((0, 27, 1), 10.0, None, []),  # exactly LUNG_HU: not lung
        ((0, 28, 1), 10.0, None, [("centre_in_lung", LUNG.format(-751))]),  # negated point in air: no hint
        ((1, 27, 1), 10.0, None, [("centre_in_lung", LUNG.format(-900) + HINT_40)]),  # AIR_HU itself is lung
        (TISSUE, 10.0, {"centre_hu": (40.0, 200.0)}, []),
        (TISSUE, 10.0, {"diameter_mm": (3.0, 40.0)}, []),  # no recorded centre range: not checked
        (TISSUE, 10.0, {"centre_hu": (100.0, 200.0)}, [("centre_hu_outside_training", HU_NOT_TRAINED)]),
    ],
)
def test_nodule_warnings_at_each_threshold(edge_scan, centre, diameter, ranges, expected):
    """Each warning's code and full message for a centre given by hand, at and across each
    threshold (sizes in mm, HU of the voxels laid out in ``edge_scan``), with the RAS/LPS
    hint where the negated point (row 20 - r, column 40 - c) lies in soft tissue."""
    from types import SimpleNamespace

    from nodulekit.plausibility import nodule_warnings

    spec = SimpleNamespace(mask=None, centre=np.array(centre, float), diameter_mm=diameter)
    assert nodule_warnings(edge_scan, spec, ranges) == [{"code": c, "message": m} for c, m in expected]


def test_centre_hu_of_a_centre_past_the_scans_edges_is_the_nearest_edge_voxel(edge_scan):
    """Rounded to the nearest voxel, clipped into the volume on both sides: row -0.6 reads
    row 0 (40 HU), not the last row (the -2000 HU padding voxel at row 39, column 29, slice 3)."""
    from nodulekit.plausibility import centre_hu

    assert centre_hu(edge_scan, (-0.6, 29.0, 3.0)) == 40.0
    assert centre_hu(edge_scan, (39.4, 29.4, 2.6)) == -2000.0
    assert centre_hu(edge_scan, (44.0, 31.0, 7.0)) == -2000.0
    assert centre_hu(edge_scan, (1.4, 26.6, -3.0)) == -900.0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_min_diameter_must_be_a_finite_size(bad):
    """--min-diameter -1 or inf (each fails one of the two conditions) is a one-line refusal."""
    from nodulekit.errors import NodulekitError
    from nodulekit.plausibility import check_options

    with pytest.raises(NodulekitError, match=rf"^--min-diameter must be a number of mm >= 0 \(got {bad:g}\)$"):
        check_options(bad, mask="mask.nii.gz")
    assert check_options(0.0, mask="mask.nii.gz") == 0.0


# --------------------------------------------------------------------------- input spec


def test_stored_spec_of_unknown_or_old_fields_is_the_legacy_one():
    """'unknown' (what older files wrote) and a JSON-encoded normalisation (as HDF5 attributes
    store it) fall back to the old fields: the paper's D3C layout with the recorded HU window."""
    from nodulekit.inputs.spec import paper_spec, stored_spec

    assert stored_spec("unknown", 3) == paper_spec(3)
    spec = stored_spec(None, 3, None, '{"hu_window": [-1200, 600]}')
    assert spec.hu_window == (-1200.0, 600.0) and spec.channels == paper_spec(3).channels
    # a recorded layout (not the paper's for 3 channels) is the one used
    layout = [{"z_offset_mm": z, "p": 2.0} for z in (-2.0, 0.0, 2.0)]
    spec = stored_spec(None, 3, layout, {"hu_window": [-1000, 400]})
    assert [(c.z_offset_mm, c.p) for c in spec.channels] == [(-2.0, 2.0), (0.0, 2.0), (2.0, 2.0)]


def test_stored_spec_refusal_names_the_file():
    from nodulekit.errors import NodulekitError
    from nodulekit.inputs.spec import stored_spec

    other = {"schema": "nodulekit-input-spec/99"}
    with pytest.raises(NodulekitError, match=r"^input spec: input spec schema 'nodulekit-input-spec/99' is not"):
        stored_spec(other, 3)
    with pytest.raises(NodulekitError, match=r"^run\.json: input spec schema"):
        stored_spec(other, 3, where="run.json")


def test_input_spec_record_that_is_not_one_is_refused_in_one_line():
    """Not JSON, not an object, or another schema: each a one-line refusal naming the file
    (``where``, by default "input spec")."""
    from nodulekit.errors import NodulekitError
    from nodulekit.inputs.spec import InputSpec

    with pytest.raises(NodulekitError, match=r"^model\.onnx: input_spec is not valid JSON$"):
        InputSpec.from_dict("{channels: 3", where="model.onnx")
    with pytest.raises(NodulekitError, match=r"^input spec: input spec schema 'list' is not 'nodulekit-input-spec/1'"):
        InputSpec.from_dict([{"schema": "nodulekit-input-spec/1"}])
    with pytest.raises(NodulekitError, match=r"^input spec: input spec schema None is not"):
        InputSpec.from_dict({})


def test_training_ranges_include_their_bounds(edge_scan):
    """Spacings (1 mm pixels, 2 mm slices) exactly at the recorded range's ends are inside it;
    a range starting above the pixel spacing gives the one-line warning naming it."""
    from nodulekit.plausibility import scan_warnings

    assert scan_warnings(edge_scan, {"pixel_spacing_mm": (1.0, 1.5), "slice_spacing_mm": (0.5, 2.0)}) == []
    (w,) = scan_warnings(edge_scan, {"pixel_spacing_mm": (1.1, 1.5), "slice_spacing_mm": (2.0, 2.5)})
    assert w == {
        "code": "spacing_outside_training",
        "message": "pixel spacing 1 mm lies outside the training data's 1.1..1.5 mm",
    }


def test_mask_component_of_exactly_min_diameter_is_a_nodule():
    from types import SimpleNamespace

    from nodulekit.plausibility import drop_fragments

    specs = [
        SimpleNamespace(mask="m.nii.gz", diameter_mm=d, origin=f"component {i}") for i, d in enumerate((3.0, 2.99))
    ]
    kept, lines = drop_fragments(specs, 3.0)
    assert kept == specs[:1]
    assert lines == ["component 1: skipped, a 2.99 mm fragment (< --min-diameter 3 mm)"]


def test_a_mask_of_fragments_only_is_refused_naming_its_largest():
    """Every component a fragment: refused, naming the largest (not the first); a centre given
    by hand (no mask) is never a fragment, however small."""
    from types import SimpleNamespace

    from nodulekit.errors import NodulekitError
    from nodulekit.plausibility import drop_fragments

    specs = [SimpleNamespace(mask="m.nii.gz", diameter_mm=d, origin=f"component {d}") for d in (1.5, 2.99, 2.0)]
    with pytest.raises(NodulekitError) as err:
        drop_fragments(specs, 3.0)
    assert str(err.value) == "every mask component is smaller than --min-diameter 3 mm (largest 2.99 mm)"
    by_hand = SimpleNamespace(mask=None, diameter_mm=1.0, origin="--centre")
    assert drop_fragments([by_hand], 3.0) == ([by_hand], [])


def _spec(ident: int, centre, diameter: float, mask="mask.nii.gz"):
    """A nodule of ``edge_scan`` as predict builds it (a mask component unless ``mask=None``)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        id=str(ident), origin=f"mask component {ident}", mask=mask, centre=centre, diameter_mm=diameter
    )


TRAINED = {  # as modelcard.ranges_record writes them
    "training_data": {
        "ranges": {
            "slice_spacing_mm": {"min": 0.6, "max": 1.5, "n": 9},
            "diameter_mm": {"min": 3.5, "max": 40.0, "n": 9},
        }
    }
}
FRAGMENT = "mask component 1: skipped, a 2.50 mm fragment (< --min-diameter 3 mm)"
SCAN_LINE = "scan: slice spacing 2 mm lies outside the training data's 0.6..1.5 mm"
IN_AIR = "the centre lies in air (-950 HU < -900)"  # a mask component's centre: no RAS/LPS hint
TOO_LARGE = "diameter 70 mm is larger than any lung nodule (> 60 mm)"
NOT_TRAINED = "diameter 70 mm lies outside the training nodules' 3.5..40 mm"


def _components():
    """On ``edge_scan``: a 2.5 mm fragment, a 4 mm component centred in air, a 70 mm one in soft tissue."""
    return _spec(1, (5.0, 25.0, 1.0), 2.5), _spec(2, (30.0, 5.0, 1.0), 4.0), _spec(3, (5.0, 25.0, 2.0), 70.0)


def test_check_request_lists_fragments_then_the_scan_then_each_nodule(edge_scan):
    """Lines in order (skipped fragments, the scan's once, each kept nodule's under its id);
    each kept nodule's warnings are the scan's then its own, its diameter checked against the
    recorded range (the 4 mm one inside it); no note when ranges are recorded."""
    from nodulekit.plausibility import check_request

    specs = list(_components())
    kept, per_spec, lines, note = check_request(edge_scan, specs, TRAINED, 3.0, strict=False)
    assert kept == specs[1:]
    assert lines == [FRAGMENT, SCAN_LINE, f"nodule 2: {IN_AIR}", f"nodule 3: {TOO_LARGE}", f"nodule 3: {NOT_TRAINED}"]
    scan_w = {"code": "spacing_outside_training", "message": SCAN_LINE.removeprefix("scan: ")}
    assert per_spec == [
        [scan_w, {"code": "centre_in_air", "message": IN_AIR}],
        [
            scan_w,
            {"code": "diameter_implausible", "message": TOO_LARGE},
            {"code": "diameter_outside_training", "message": NOT_TRAINED},
        ],
    ]
    assert note is None


def test_check_request_without_training_ranges_says_which_checks_are_off(edge_scan):
    from nodulekit.plausibility import check_request

    spec = _spec(1, (5.0, 25.0, 1.0), 10.0, mask=None)
    assert check_request(edge_scan, [spec], {"training_data": {}}, 3.0, strict=False) == (
        [spec],
        [[]],
        [],
        "the model records no training ranges: diameter, spacing and HU range checks are off",
    )
    # nothing to report: --strict scores the request as it is
    assert check_request(edge_scan, [spec], {}, 3.0, strict=True)[:3] == ([spec], [[]], [])


@pytest.mark.parametrize(("n_lines", "more"), [(1, ""), (2, " (and 1 more)"), (5, " (and 4 more)")])
def test_strict_names_the_first_line_and_counts_the_others(edge_scan, n_lines, more):
    """--strict refuses with the first line and, when there are more, how many more: none
    for one line, 1 for two, 4 for five (a component of 10 mm in soft tissue adds none)."""
    from nodulekit.errors import NodulekitError
    from nodulekit.plausibility import check_request

    fragment, in_air, too_large = _components()
    plain = _spec(4, (5.0, 25.0, 1.0), 10.0)
    specs, card = {
        1: ([fragment, plain], {}),
        2: ([fragment, in_air], {}),
        5: ([fragment, in_air, too_large], TRAINED),
    }[n_lines]
    assert len(check_request(edge_scan, specs, card, 3.0, strict=False)[2]) == n_lines
    with pytest.raises(NodulekitError) as err:
        check_request(edge_scan, specs, card, 3.0, strict=True)
    assert str(err.value) == f"--strict: {FRAGMENT}{more}"
