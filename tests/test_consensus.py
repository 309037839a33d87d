"""The readers' agreement, consensus level, VOI placement and nodule geometry on small
synthetic masks with known answers (no data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodulekit.consensus import (
    ReaderMasks,
    agreement_on_grid,
    check_level,
    min_agreement,
    place_in_voi,
)
from nodulekit.errors import DataError, NodulekitError
from nodulekit.geometry import nodule_geometry


def test_min_agreement_follows_pylidcs_mean_rule():
    # pylidc: consensus = mean(masks) >= clevel, i.e. count / n >= clevel
    for n in range(1, 7):
        for level in (0.1, 0.25, 1 / 3, 0.5, 0.6, 2 / 3, 0.75, 1.0):
            counts = np.arange(n + 1)
            expected = counts[np.mean(np.arange(n)[None, :] < counts[:, None], axis=1) >= level].min()
            assert min_agreement(level, n) == expected, (level, n)
    assert min_agreement(0.5, 4) == 2 and min_agreement(0.5, 3) == 2 and min_agreement(1.0, 4) == 4


@pytest.mark.parametrize("bad", [0, -0.1, 1.0001, 2, float("nan"), float("inf"), "half"])
def test_consensus_level_outside_0_1_is_refused(bad):
    with pytest.raises(NodulekitError, match=r"--consensus-level must be"):
        check_level(bad)
    assert check_level(1) == 1.0 and check_level("0.25") == 0.25


def _readers() -> ReaderMasks:
    # Three readers on a 6 x 7 x 3 box (its last column empty, as pylidc boxes can be): an
    # asymmetric union, so flips are told apart.
    masks = np.zeros((3, 6, 7, 3), bool)
    masks[:, 1:4, 1:3, 1] = True  # all three
    masks[0, 0:5, 1:6, 1] = True  # reader 1 is generous
    masks[1, 1:4, 1:5, 0:3] = True
    masks[2, 5, 0, 2] = True  # a lone corner voxel of reader 3
    return ReaderMasks(masks, (100, 200, 30))


def test_agreement_consensus_and_union():
    r = _readers()
    assert r.masks.shape == (3, 6, 6, 3) and r.start == (100, 200, 30)  # cut tight on the union
    assert r.agreement.max() == 3 and r.agreement.dtype == np.uint8
    np.testing.assert_array_equal(r.union, r.masks.any(axis=0))
    np.testing.assert_array_equal(r.consensus(0.5), r.masks.sum(axis=0) >= 2)
    np.testing.assert_array_equal(r.consensus(1.0), r.masks.all(axis=0))
    assert r.consensus(1.0).sum() < r.consensus(0.5).sum() < r.union.sum()
    padded = np.zeros((3, 8, 8, 5), bool)
    padded[:, 1:7, 2:8, 2:5] = r.masks
    moved = ReaderMasks(padded, (99, 198, 28))  # empty leading margins are cut, the start moves
    assert moved.start == (100, 200, 30) and moved.masks.shape == r.masks.shape


@pytest.mark.parametrize("flip", [(False, False), (True, True), (True, False)])
def test_voi_placement_recovers_offset_flip_and_slices(flip):
    r = _readers()
    union = r.union[:: -1 if flip[0] else 1, :: -1 if flip[1] else 1]
    voi = np.zeros((20, 25, 9), bool)
    voi[4:10, 9:15, 2:5] = union
    scan_z = -50.0 + 1.25 * np.arange(60)
    voi_z = scan_z[28:37]  # VOI slice 2 = scan slice 30 = the readers' first slice
    place = place_in_voi(r, voi, voi_z, scan_z)
    assert place.offset == (4, 9, 2) and place.flip == flip and place.scan_slice0 == 28
    grid = agreement_on_grid(r, voi.shape, place)
    np.testing.assert_array_equal(grid >= 1, voi)
    expected = r.agreement[:: -1 if flip[0] else 1, :: -1 if flip[1] else 1]
    np.testing.assert_array_equal(grid[4:10, 9:15, 2:5], expected)


def test_voi_that_is_not_the_union_is_refused():
    r = _readers()
    scan_z = 1.25 * np.arange(60)
    voi = np.zeros((20, 25, 9), bool)
    voi[4:10, 9:15, 2:5] = r.consensus(0.5)  # a consensus, not the union
    with pytest.raises(DataError, match="matches no placement of the readers' union"):
        place_in_voi(r, voi, scan_z[28:37], scan_z, what="VOI x.nii.gz")
    voi[:] = False
    voi[4:10, 9:15, 2:5] = r.union
    with pytest.raises(DataError, match="not a crop of this scan"):
        place_in_voi(r, voi, scan_z[28:37] + 0.6, scan_z)  # slice positions of another scan
    with pytest.raises(DataError, match="not a crop of this scan"):
        place_in_voi(r, voi, 1.25 * np.arange(9), scan_z[:30])  # would need slices beyond the scan


def test_nodule_geometry_known_answers():
    mask = np.zeros((10, 12, 8), bool)
    mask[2:5, 3:9, 1:3] = True  # 3 x 6 x 2 = 36 voxels
    g = nodule_geometry(mask, (0.5, 0.5, 2.0))
    assert g.centre_voxel == pytest.approx((3.0, 5.5, 1.5))
    assert g.n_voxels == 36 and g.volume_mm3 == pytest.approx(36 * 0.5)
    assert g.diameter_mm == pytest.approx((6 * 18.0 / math.pi) ** (1 / 3))
    # a digitised ball of radius 10 mm at 0.5 mm has the diameter of the ball
    ax = (np.arange(48) - 23.5) * 0.5
    ball = (ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2) <= 100
    assert nodule_geometry(ball, (0.5, 0.5, 0.5)).diameter_mm == pytest.approx(20.0, rel=0.01)
    with pytest.raises(DataError, match="nodule X is empty"):
        nodule_geometry(np.zeros((3, 3, 3)), (1, 1, 1), what="nodule X")
    with pytest.raises(DataError, match="spacing"):
        nodule_geometry(mask, (0.5, 0.0, 2.0))
    # the one-line errors name what was measured: the caller's name, else "mask"
    with pytest.raises(DataError, match=r"^nodule X is not a 3-D mask \(shape \(3, 3\)\)$"):
        nodule_geometry(np.ones((3, 3)), (1, 1, 1), what="nodule X")
    with pytest.raises(DataError, match=r"^mask is empty"):
        nodule_geometry(np.zeros((3, 3, 3)), (1, 1, 1))
