"""The two halves of the model input against hand computations: the window of a small volume whose
slices are unevenly spaced (every output value worked out by hand), and the channels of a window that
is not square, with rows and columns of different spacings, on an HU ramp that bilinear sampling
reproduces exactly."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.errors import DataError
from nodulekit.inputs.sampling import (
    ChannelSpec,
    normalise_hu,
    resample_levels,
    resample_nodule,
    sample_grid,
    sample_window,
    window_side_px,
)

ZVALS = np.array([0.0, 2.0, 3.0, 7.0])  # uneven slice spacing
PLANES = np.array([-3.0, -1.0, 0.0, 0.5, 4.5])  # around centre z 2.5: -0.5, 1.5, 2.5, 3.0, 7.0 mm


def _volume() -> np.ndarray:
    r, c, k = np.meshgrid(np.arange(6), np.arange(5), np.arange(4), indexing="ij")
    return (30 * k + 10 * r + c).astype(np.int16)  # [6 rows, 5 cols, 4 slices]


def test_the_window_of_an_uneven_stack_near_an_edge_by_hand():
    hu = _volume()
    labels = np.zeros((2, 2, 2), np.uint8)  # rows 1..2, columns 3..4, slices 1..2 of the volume
    for r in range(2):
        for c in range(2):
            for k in range(2):
                labels[r, c, k] = 1 + r + 3 * c + 6 * k
    win, lab, info = sample_window(hu, ZVALS, (1.4, 3.6), 2.5, 3, labels, (1, 3, 1), PLANES)
    # centre rounds to (1, 4): rows 0..2, columns 3, 4 and 5 (past the last column: column 4 repeated)
    rows, cols = np.array([0, 1, 2]), np.array([3, 4, 4])
    inplane = 10 * rows[:, None] + cols[None, :]
    # target z -0.5 (before the first slice: slice 0), 1.5 (k 0.75), 2.5 (k 1.5), 3.0 (k 2), 7.0 (k 3)
    # HU = 30 k + ...; 30 x 0.75 = 22.5 and 30 x 1.5 = 45: whole plus a half rounds to even
    expected = np.stack([inplane + v for v in (0.0, 22.5, 45.0, 60.0, 90.0)])
    np.testing.assert_array_equal(win, np.rint(expected).astype(np.int16))
    assert win.dtype == np.int16
    assert win[1, 0, 0] == 26 and win[1, 0, 1] == 26  # 25.5 -> 26 and 26.5 -> 26 (half to even)
    # labels: nearest slice index floor(k + 0.5) = 0, 1, 2 (the tie 1.5 goes up), 2, 3; the labels hold
    # volume rows 1, 2 and slices 1, 2 only, and nothing in the column past the volume's edge
    want = np.zeros((5, 3, 3), np.uint8)
    for t, k in ((1, 1), (2, 2), (3, 2)):
        for r in (1, 2):
            for j in range(2):
                want[t, r, j] = labels[r - 1, j, k - 1]
    np.testing.assert_array_equal(lab, want)
    assert info == {
        "z_filled": 1,
        "z_filled_offsets_mm": [-3.0],
        "inplane_filled": 3,
        "window_origin_rc": (0, 3),
        "valid_rows": (0, 3),
        "valid_cols": (0, 2),
        "centre_in_window_rc": pytest.approx((0.4 + 1.0, 0.6)),
    }


def test_a_window_wholly_inside_and_one_past_the_first_row():
    hu = _volume()
    win, lab, info = sample_window(hu, ZVALS, (0.0, 1.0), 3.0, 3, planes_mm=np.array([0.0, 4.0, 4.002]))
    # rows -1..1: row -1 is row 0 repeated; z 3.0 is slice 2 exactly, 7.0 the last; 7.002 is past it
    np.testing.assert_array_equal(win[0], 60 + 10 * np.array([0, 0, 1])[:, None] + np.array([0, 1, 2])[None, :])
    assert info["z_filled"] == 1 and info["z_filled_offsets_mm"] == [4.002]
    assert info["valid_rows"] == (1, 3) and info["valid_cols"] == (0, 3) and info["inplane_filled"] == 3
    assert info["window_origin_rc"] == (-1, 0)
    assert not lab.any() and lab.shape == (3, 3, 3) and lab.dtype == np.uint8
    # a target within a thousandth of a millimetre of the last slice is inside the source
    _, _, info = sample_window(hu, ZVALS, (2.0, 2.0), 3.0, 3, planes_mm=np.array([4.0009, -3.0009]))
    assert info["z_filled"] == 0


def test_labels_stop_half_a_slice_step_beyond_the_ends():
    hu = _volume()
    labels = np.ones((6, 5, 4), np.uint8)
    # the first step is 2 mm, the last 4 mm: labels reach 1 mm before z 0 and (almost) 2 mm past z 7
    # (less a thousandth of a millimetre): from -1.001 mm to just below 8.999 mm
    targets = np.array([-1.5, -1.0005, -0.9, 8.9, 8.999, 9.1])
    _, lab, _ = sample_window(hu, ZVALS, (2.0, 2.0), 0.0, 3, labels, (0, 0, 0), targets)
    np.testing.assert_array_equal(lab[:, 1, 1], [0, 1, 1, 1, 0, 0])


def test_a_single_slice_gives_its_hu_on_every_plane_and_no_labels():
    hu = _volume()[:, :, 2:3]  # one slice, HU 60 + 10 r + c, at z 5 mm
    labels = np.full((6, 5, 1), 2, np.uint8)
    win, lab, info = sample_window(
        hu, np.array([5.0]), (2.0, 2.0), 5.0, 3, labels, (0, 0, 0), np.array([-0.3, 0.0, 0.3])
    )
    expected = 60 + 10 * np.arange(1, 4)[:, None] + np.arange(1, 4)[None, :]
    np.testing.assert_array_equal(win, np.stack([expected] * 3))
    # a lone slice has no slice step, so the labels' half-open range [z - 0, z + 0) is empty (every
    # reader refuses a one-slice volume before this; what matters is that no plane gets labels)
    assert not lab.any()
    assert info["z_filled"] == 2 and info["z_filled_offsets_mm"] == [-0.3, 0.3]


def test_window_side_covers_the_smaller_spacing_and_is_odd():
    assert window_side_px(10.0, (0.5, 0.8)) == 91  # 45 mm / 0.5 = 90, made odd
    assert window_side_px(10.0, (0.8, 0.5)) == 91
    assert window_side_px(10.0, 0.9) == 51  # 45 / 0.9 = 50 exactly: no extra pixel from float noise
    assert window_side_px(2.0, 0.5) == 33  # the 16 mm floor: 32 px, made odd
    assert window_side_px(4.0, 0.7) == 27  # 18 mm / 0.7 = 25.7 -> 26 -> 27
    assert window_side_px(4.0, 0.7, diameters=2.0, min_mm=3.0) == 13  # 8 mm / 0.7 = 11.4 -> 12 -> 13


def test_normalise_hu_clips_to_the_window_and_scales_linearly():
    got = normalise_hu(np.array([-2000, -1000, -300, 400, 3000]))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert got.dtype == np.float32
    np.testing.assert_allclose(normalise_hu(np.array([0, 50, 100]), (0.0, 200.0)), [0.0, 0.25, 0.5])


SY, SX = 0.5, 0.8  # row and column spacing (mm)
H, W = 45, 31  # rows, columns: 22.5 x 24.8 mm
CENTRE = (21.7, 15.2)
LAYOUT = [ChannelSpec(10, 2.0), ChannelSpec(7, 2.5)]
DIAMETER = 8.0


def _ramp() -> np.ndarray:
    """HU = -500 + 20 mm-1 x y - 15 mm-1 x x + 30 x plane: linear, so bilinear sampling is exact."""
    z, r, c = np.meshgrid(np.arange(21), np.arange(H), np.arange(W), indexing="ij")
    return -500.0 + 20.0 * r * SY - 15.0 * c * SX + 30.0 * z


def _expected_points(spec: ChannelSpec):
    step = spec.p * DIAMETER / 32
    offsets = (np.arange(32) + 0.5 - 16) * step  # mm from the centre
    ys = CENTRE[0] + offsets / SY  # window rows
    xs = CENTRE[1] + offsets / SX
    return ys, xs


def test_channels_of_a_non_square_window_of_unequal_spacings_follow_the_ramp():
    hu = _ramp()
    mask = np.zeros(hu.shape, np.uint8)
    mask[:, :, 16:] = 1  # every column from 16 on
    x, m, pixel_mm = resample_nodule(hu, mask, (SY, SX), DIAMETER, LAYOUT, "n", centre_yx=CENTRE)
    np.testing.assert_allclose(pixel_mm, [2.0 * 8 / 32, 2.5 * 8 / 32])
    for c, spec in enumerate(LAYOUT):
        ys, xs = _expected_points(spec)
        hu_at = -500.0 + 20.0 * ys[:, None] * SY - 15.0 * xs[None, :] * SX + 30.0 * spec.z_index
        np.testing.assert_allclose(x[c], (hu_at + 1000.0) / 1400.0, atol=1e-5)
        # the mask's edge lies half-way between columns 15 and 16
        np.testing.assert_array_equal(m[c], np.broadcast_to(xs[None, :] >= 15.5, (32, 32)).astype(np.uint8))
    coords, pmm = sample_grid((H, W), (SY, SX), LAYOUT, DIAMETER, "n", CENTRE)
    ys, xs = _expected_points(LAYOUT[1])
    np.testing.assert_allclose(coords[1, 1, :, 0], ys)
    np.testing.assert_allclose(coords[2, 1, 0, :], xs)
    assert (coords[0, 0] == 10).all() and (coords[0, 1] == 7).all()
    np.testing.assert_array_equal(pmm, pixel_mm)


def test_a_slab_of_the_window_gives_the_same_channels():
    hu = _ramp()
    mask = (hu > -300).astype(np.uint8)
    whole = resample_nodule(hu, mask, (SY, SX), DIAMETER, LAYOUT, "n", centre_yx=CENTRE)
    slab = resample_nodule(hu[7:11], mask[7:11], (SY, SX), DIAMETER, LAYOUT, "n", z_first=7, centre_yx=CENTRE)
    for a, b in zip(whole, slab, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError) as err:
        resample_nodule(hu[8:11], mask[8:11], (SY, SX), DIAMETER, LAYOUT, "n9", z_first=8, centre_yx=CENTRE)
    assert str(err.value) == "nodule n9: hu slab of 3 slices lacks slices this dataset needs"
    with pytest.raises(DataError, match=r"^nodule n9: hu slab of 3 slices lacks"):
        resample_nodule(hu[7:10], mask[7:10], (SY, SX), DIAMETER, LAYOUT, "n9", z_first=7, centre_yx=CENTRE)
    with pytest.raises(DataError) as err:
        resample_nodule(hu, mask[:, :, :-1], (SY, SX), DIAMETER, LAYOUT, "n9")
    assert str(err.value) == "nodule n9: mask shape (21, 45, 30) differs from hu shape (21, 45, 31)"
    with pytest.raises(DataError) as err:
        resample_nodule(hu[0], mask[0], (SY, SX), DIAMETER, LAYOUT, "n9")
    assert str(err.value) == "nodule n9: hu has shape (45, 31), expected [21, S, S]"


def test_the_grid_may_reach_half_a_pixel_past_the_outer_centres_and_no_further():
    # one channel of side 16 mm, 32 output pixels 0.5 mm apart: on rows of 0.5 mm they span 31 input
    # rows, so 31 rows are enough (the outer output centres sit half a row past the outer input rows)
    layout = [ChannelSpec(10, 2.0)]
    sample_grid((31, 20), (0.5, 1.0), layout, 8.0, "n")
    with pytest.raises(DataError) as err:
        sample_grid((30, 20), (0.5, 1.0), layout, 8.0, "n7")
    assert str(err.value) == (
        "nodule n7: its rois window (30x20 px at 0.5x1 mm = 15.0x20.0 mm) is smaller than the 16.0 mm patch "
        "this dataset needs"
    )
    sample_grid((20, 16), (1.0, 1.0), layout, 8.0, "n")  # columns of 1 mm: 16 are enough, 15 are not
    with pytest.raises(DataError, match="20x15 px"):
        sample_grid((20, 15), (1.0, 1.0), layout, 8.0, "n")
    # off-centre, either edge decides
    for centre in ((14.8, 9.5), (15.2, 9.5)):
        with pytest.raises(DataError, match="smaller than the 16.0 mm patch"):
            sample_grid((31, 20), (0.5, 1.0), layout, 8.0, "n", centre)
    for centre in ((9.5, 7.2), (9.5, 7.8)):
        with pytest.raises(DataError, match="smaller than the 16.0 mm patch"):
            sample_grid((20, 16), (1.0, 1.0), layout, 8.0, "n", centre)
    sample_grid((20, 16), (1.0, 1.0), layout, 8.0, "n", (9.5, 7.7))


def test_resample_levels_stacks_each_level_set():
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, :, 1] = 1
    labels[0, :, 2] = 3
    labels[0, :, 3] = 2
    coords = np.zeros((3, 1, 1, 4))
    coords[1] = 1.0
    coords[2, 0, 0] = [0.0, 1.4, 2.6, 3.0]
    # 1.4: level 1 at 1.0 (>= 0.5), levels 2, 3 at 0.4 (< 0.5); 2.6: levels 1, 2 (1.0), level 3 at 0.4
    np.testing.assert_array_equal(resample_levels(labels, coords)[0, 0], [0, 1, 2, 2])
    assert resample_levels(np.zeros((1, 4, 4)), coords).sum() == 0


def test_labels_far_from_the_window_leave_it_empty():
    # a one-voxel label map four rows and three columns beyond the window: nothing of it is inside
    hu = _volume()
    labels = np.ones((1, 1, 4), np.uint8)
    _, lab, _ = sample_window(hu, ZVALS, (1.0, 1.0), 3.0, 3, labels, (4, 3, 0), PLANES)
    assert lab.shape == (5, 3, 3) and not lab.any()
    _, lab, _ = sample_window(hu, ZVALS, (4.0, 1.0), 3.0, 3, labels, (4, 4, 0), PLANES)
    assert not lab.any()  # the right rows, but the columns 0..2 lie four before the labels
    _, lab, _ = sample_window(hu, ZVALS, (4.0, 4.0), 3.0, 3, labels, (4, 4, 0), PLANES)
    assert lab[:, 1, 1].all() and lab.sum() == 5  # centred on it: the one voxel on every plane
