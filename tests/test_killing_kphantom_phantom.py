"""The phantom's documented drawing rules, pinned on small synthetic grids (no pylidc, no pixels
of LIDC): per-tissue HU, sizes, the calcification and internal-structure patterns, the noise,
and the effect of every seed. Each expectation comes from the specification in
``nodulekit/phantom.py`` (module docstring and function docstrings), worked out by hand or by
an independent computation, on grids where a changed constant would show."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt, gaussian_filter, label

from nodulekit import phantom as P

# ----------------------------------------------------------------------------- ratings


def test_the_most_common_rating_wins_and_ties_go_to_the_larger_value():
    assert P._mode([1, 1, 2]) == 1
    assert P._mode([1, 1, 2, 2]) == 2  # a tie: the larger ('absent' / 'soft tissue') end
    assert P._mode([6, 3, 3, 6]) == 6
    assert P._mode([4.4, 3.6, 1.0]) == 4  # ratings are rounded before counting


def _ann(texture, margin, calcification, internal):
    return SimpleNamespace(texture=texture, margin=margin, calcification=calcification, internalStructure=internal)


def test_appearance_is_the_mean_texture_and_margin_and_the_most_common_patterns():
    anns = [_ann(1, 5, 6, 1), _ann(2, 4, 3, 2), _ann(4, 4, 3, 2), _ann(5, 3, 6, 4)]
    a = P.NoduleAppearance.from_annotations(anns)
    assert a == P.NoduleAppearance(texture=3.0, margin=4.0, calcification=6, internal_structure=2)


@pytest.mark.parametrize(
    ("texture", "hu"), [(1.0, -650.0), (5.0, 20.0), (3.0, -315.0), (2.0, -482.5), (0.0, -650.0), (7.0, 20.0)]
)
def test_nodule_body_hu_runs_linearly_from_ground_glass_to_solid(texture, hu):
    assert P.NoduleAppearance(texture, 3.0, 6, 1).hu == pytest.approx(hu, abs=1e-9)


@pytest.mark.parametrize(("margin", "sigma"), [(1.0, 2.0), (5.0, 0.25), (3.0, 1.125), (0.0, 2.0), (9.0, 0.25)])
def test_margin_blur_runs_from_2_mm_poorly_defined_to_a_quarter_mm_sharp(margin, sigma):
    assert P.NoduleAppearance(3.0, margin, 6, 1).margin_sigma_mm == pytest.approx(sigma, abs=1e-9)


# ----------------------------------------------------------------------------- scan geometry

ZVALS = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 11.0)  # non-uniform: a window's median step depends on the window


def _geom(zvals=ZVALS, ps=0.5, thickness=1.25):
    return P.ScanGeometry("P1", "1.2.3", "1.2.3.4.55", ps, thickness, tuple(zvals))


def test_geometry_is_read_from_a_pylidc_scan():
    scan = SimpleNamespace(
        patient_id="LIDC-X", study_instance_uid=11, series_instance_uid="9.8", pixel_spacing="0.7",
        slice_thickness=2, slice_zvals=[-3, -1.5, 0],
    )  # fmt: skip
    g = P.ScanGeometry.from_scan(scan)
    assert g == P.ScanGeometry("LIDC-X", "11", "9.8", 0.7, 2.0, (-3.0, -1.5, 0.0))
    assert g.shape == (512, 512, 3)
    assert g.origin_xy == pytest.approx((-179.2, -179.2))  # the 512-pixel field of view centred


def test_slice_step_is_the_median_step_of_the_window_or_the_thickness_for_one_slice():
    g = _geom()
    assert g.slice_step(0, 3) == 1.0
    assert g.slice_step(2, 7) == 2.0  # steps 2, 2, 2, 3
    assert g.slice_step(0, 7) == 2.0  # steps 1, 1, 2, 2, 2, 3
    assert g.slice_step(4, 7) == 2.5  # steps 2, 3
    assert g.slice_step(3, 4) == 1.25  # one slice: the slice thickness


# ----------------------------------------------------------------------------- generators and noise


def test_generators_take_keys_as_text_and_the_seed_as_an_integer():
    def draw(*args):
        return P._rng(*args).random(3).tolist()

    assert draw(4, "a", 1) == draw(4, "a", "1") == draw(4.0, "a", 1)
    assert draw(4, "a", 1) != draw(4, 1, "a")  # the keys' order matters


def test_smooth_noise_is_the_reflect_padded_gaussian_of_white_noise_at_unit_variance():
    shape, sigma = (24, 20, 6), np.array([2.0, 1.5, 0.5])
    got = P._smooth_noise(shape, sigma, np.random.default_rng(3))
    white = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)
    smooth = gaussian_filter(white, sigma=sigma, mode="reflect", truncate=3.0)
    np.testing.assert_allclose(got, smooth / smooth.std(), atol=1e-5)
    assert float(got.std()) == pytest.approx(1.0, abs=1e-5)


def test_ct_noise_has_the_low_dose_std_and_is_correlated_in_plane_only():
    vol = np.zeros((160, 160, 12), np.float32)
    P.add_ct_noise(vol, (0.7, 0.7, 2.5), np.random.default_rng(1))
    assert float(vol.std()) == pytest.approx(P.NOISE_HU, abs=1e-3) and P.NOISE_HU == 30.0

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    # a Gaussian kernel of sigma 0.7 pixel: neighbour correlation exp(-1 / (4 * 0.7**2)) = 0.60
    assert corr(vol[1:], vol[:-1]) == pytest.approx(np.exp(-1 / (4 * 0.49)), abs=0.03)
    assert abs(corr(vol[:, :, 1:], vol[:, :, :-1])) < 0.03  # slices independent


def test_int16_hu_rounds_and_clips_to_the_ct_range():
    out = P.to_int16_hu(np.array([-2000.0, -1024.4, -0.6, 12.5, 13.5, 3071.2, 5000.0]))
    assert out.dtype == np.int16 and out.tolist() == [-1024, -1024, -1, 12, 14, 3071, 3071]


# ----------------------------------------------------------------------------- lung and vessels


def test_lung_is_minus_850_with_25_hu_texture_and_a_40_hu_posterior_gradient():
    shape, spacing = (32, 24, 6), (0.7, 0.7, 2.5)
    got = P.lung_background(shape, spacing, np.random.default_rng(5), row0=100)
    texture = P._smooth_noise(shape, 2.0 / np.asarray(spacing), np.random.default_rng(5)) * 25.0
    rows = (100 + np.arange(32))[:, None, None]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, -850.0 + texture + 40.0 * rows / 512.0, atol=1e-3)
    assert P.LUNG_HU == -850.0


def _vessels(shape=(70, 70, 30), spacing=(0.7, 0.7, 1.0), base=-1000.0, seed=2, **kw):
    vol = np.full(shape, base, np.float32)
    P.draw_vessels(vol, spacing, np.random.default_rng(seed), **kw)
    return vol


def test_vessels_blend_towards_plus_40_hu_with_a_partial_volume_edge():
    vol = _vessels()
    assert P.VESSEL_HU == 40.0
    assert vol.min() >= -1000.0 and vol.max() == pytest.approx(40.0, abs=1e-3)  # a vessel's core is +40 HU
    assert ((vol > -999.0) & (vol < 39.0)).any()  # partial-volume edge voxels in between
    touched = float((vol > -1000.0).mean())
    assert 0.001 < touched < 0.2  # ~0.05 vessels per cm3 of 49 x 49 x 30 mm: a few thin tubes
    # the default density is 0.05 per cm3: ten times as many vessels touch many more voxels
    same = _vessels(density_per_cm3=0.05)
    np.testing.assert_array_equal(vol, same)
    assert (_vessels(density_per_cm3=0.5) > -1000.0).mean() > 3 * touched


def test_vessel_radius_is_at_most_3_mm_and_their_length_at_most_80_mm():
    spacing = np.array([0.5, 0.5, 0.5])
    for seed in range(2):
        vol = _vessels(shape=(80, 80, 80), spacing=spacing, seed=seed, density_per_cm3=0.0)  # two vessels
        core = vol > 39.0
        inside = distance_transform_edt(core, sampling=spacing)
        assert 0 < inside.max() <= 3.0 + 0.5  # the cores' half-thickness: a radius of at most 3 mm
        for k in range(1, label(vol > -1000.0)[1] + 1):
            pts = np.argwhere(label(vol > -1000.0)[0] == k) * spacing
            assert np.ptp(pts, axis=0).max() <= 2 * 80.0 + 8.0


def test_vessels_stay_in_the_allowed_region():
    allowed = np.zeros((70, 70, 30), bool)
    allowed[:35] = True
    vol = _vessels(allowed=allowed)
    assert (vol[35:] == -1000.0).all() and (vol[:35] > -1000.0).any()
    # the number of vessels follows the allowed volume: half the grid, fewer voxels touched
    assert (vol > -1000.0).sum() < (_vessels() > -1000.0).sum()
    assert (_vessels(allowed=np.zeros((70, 70, 30), bool)) == -1000.0).all()  # no lung: no vessel


# ----------------------------------------------------------------------------- internal structure and calcification


def _sphere(radius_mm: float, spacing: float, n: int):
    grid = np.indices((n, n, n)).transpose(1, 2, 3, 0) * spacing
    m = np.linalg.norm(grid - (n - 1) / 2 * spacing, axis=-1) <= radius_mm
    inside = distance_transform_edt(m, sampling=[spacing] * 3).astype(np.float32)
    return m, inside, float(inside.max()), grid


def test_an_air_cavity_is_an_eccentric_sphere_of_055_depth_with_a_wall():
    m, inside, depth, grid = _sphere(8.0, 1.0, 19)
    for seed in range(3):
        field = np.full(m.shape, -20.0)
        P._draw_internal_structure(field, inside, depth, np.ones(3), 4, np.random.default_rng(seed))
        cavity = field == -950.0
        assert cavity.any() and ((field == -950.0) | (field == -20.0)).all()
        # some centre deeper than 60 % of the depth explains the cavity exactly
        matches = [
            c
            for c in np.argwhere(inside >= 0.6 * depth)
            if np.array_equal(cavity, (np.linalg.norm(grid - c, axis=-1) < 0.55 * depth) & (inside > 1.0))
        ]
        assert matches


def test_no_cavity_in_a_nodule_one_mm_deep_or_less():
    inside = np.array([0.0, 0.5, 1.0, 0.5, 0.0]).reshape(5, 1, 1)
    field = np.full(inside.shape, -20.0)
    P._draw_internal_structure(field, inside, 1.0, np.ones(3), 4, np.random.default_rng(0))
    assert (field == -20.0).all()
    for structure in (1, 5):  # soft tissue (and anything else): nothing drawn
        P._draw_internal_structure(field, inside, 1.0, np.ones(3), structure, np.random.default_rng(0))
        assert (field == -20.0).all()


def _calcified(calc, seed=0, radius=8.0, spacing=0.5, n=37):
    m, inside, depth, grid = _sphere(radius, spacing, n)
    field = np.full(m.shape, -50.0)
    P._draw_calcification(field, m, inside, depth, np.full(3, spacing), calc, np.random.default_rng(seed))
    return field, m, inside, depth, grid


def test_solid_calcification_brightens_the_whole_nodule_to_one_value_of_200_to_800():
    for seed in range(4):
        field, m, *_ = _calcified(3, seed)
        values = np.unique(field[m])
        assert len(values) == 1 and 200.0 <= values[0] <= 800.0
        assert (field[~m] == -50.0).all()


def test_central_calcification_is_the_ball_of_040_depth_around_the_deepest_point():
    field, m, inside, depth, grid = _calcified(5)
    deepest = np.argwhere(inside == depth)[0] * 0.5
    ball = m & (np.linalg.norm(grid - deepest, axis=-1) < 0.4 * depth)
    assert 0 < ball.sum() < m.sum()
    assert (field[ball] >= 200.0).all() and (field[~ball] == -50.0).all()
    # a small nodule: the ball is at least 1 mm
    field, m, inside, depth, grid = _calcified(5, radius=1.6, spacing=0.25, n=15)
    deepest = np.argwhere(inside == depth)[0] * 0.25
    assert 0.4 * depth < 1.0
    ball = m & (np.linalg.norm(grid - deepest, axis=-1) < 1.0)
    assert (field[ball] >= 200.0).all() and (field[~ball] == -50.0).all()


def test_laminated_shells_have_floors_for_small_nodules():
    """Shell period max(depth / 2, 1 mm) and thickness max(depth / 4, 0.6 mm): a 1.5 mm deep nodule."""
    field, m, inside, depth, _ = _calcified(2, radius=1.5, spacing=0.1, n=33)
    assert depth < 2.0
    shells = m & (np.mod(inside, 1.0) < 0.6)
    assert 0 < shells.sum() < m.sum()
    assert (field[shells] >= 200.0).all() and (field[~shells] == -50.0).all()


def _spots(field, m, spacing=0.5):
    labels, n = label(field >= 200.0)
    volumes = [float((labels == k).sum()) * spacing**3 for k in range(1, n + 1)]
    return n, volumes


def test_popcorn_is_three_to_six_spots_of_1_to_2_mm_and_non_central_is_one():
    counts, volumes = [], []
    for seed in range(14):
        field, m, *_ = _calcified(1, seed, radius=8.0, n=35)
        assert (field[~m] == -50.0).all() and ((field[m] == -50.0) | (field[m] >= 200.0)).all()
        n, v = _spots(field, m)
        counts.append(n)
        volumes += v
    assert min(counts) >= 2 and max(counts) == 6 and 3 in counts  # overlapping spots may merge
    ball = 4 / 3 * np.pi  # volume of a 1 mm ball
    assert max(volumes) <= 8 * ball * 2.5 and min(volumes) < 3 * ball  # radii 1 to 2 mm (a merge: two)
    for seed in range(4):
        field, m, *_ = _calcified(4, seed, radius=8.0, n=35)
        n, (v,) = _spots(field, m)
        assert n == 1 and 0.5 * ball <= v <= 8 * ball * 1.3


@pytest.mark.parametrize("calc", [0, 6, 7])
def test_no_calcification_outside_patterns_1_to_5(calc):
    field, *_ = _calcified(calc)
    assert (field == -50.0).all()


def test_calcification_never_darkens_a_voxel_and_is_at_least_200_hu():
    m, inside, depth, _ = _sphere(4.0, 0.5, 19)
    field = np.full(m.shape, 900.0)
    P._draw_calcification(field, m, inside, depth, np.full(3, 0.5), 3, np.random.default_rng(0))
    assert (field == 900.0).all()
    values = []
    for seed in range(40):
        field = np.full(m.shape, -50.0)
        P._draw_calcification(field, m, inside, depth, np.full(3, 0.5), 3, np.random.default_rng(seed))
        values.append(float(field[m][0]))
    assert min(values) >= 200.0 and max(values) <= 800.0 and max(values) > 600.0 and min(values) < 400.0


# ----------------------------------------------------------------------------- render_nodule


@pytest.fixture
def flat_noise(monkeypatch):
    """Heterogeneity noise of exactly +1 everywhere: the drawn field is body HU + heterogeneity."""
    monkeypatch.setattr(P, "_smooth_noise", lambda shape, sigma, rng: np.ones(shape, np.float32))


def _ball_mask(shape=(48, 48, 20), centre=(24, 24, 10), radius_vox=(8, 8, 3)):
    idx = np.indices(shape).transpose(1, 2, 3, 0)
    return (((idx - np.array(centre)) / np.array(radius_vox)) ** 2).sum(-1) <= 1.0


@pytest.mark.parametrize(("texture", "core_hu"), [(5.0, 20.0 + 20.0), (3.0, -315.0 + 20.0), (2.99, -316.675 + 60.0)])
def test_nodule_core_is_body_hu_plus_heterogeneity_60_for_ground_glass_20_for_solid(flat_noise, texture, core_hu):
    mask = _ball_mask()
    vol = np.full(mask.shape, -850.0, np.float32)
    P.render_nodule(vol, mask, (0.7, 0.7, 2.5), P.NoduleAppearance(texture, 5.0, 6, 1), np.random.default_rng(0))
    core = mask & (distance_transform_edt(mask, sampling=(0.7, 0.7, 2.5)) > 2.5)
    assert core.sum() > 20
    np.testing.assert_allclose(vol[core], core_hu, atol=0.05)


def test_nodule_opacity_is_the_mask_blurred_by_the_margin_sigma(flat_noise):
    """Opacity = the mask blurred by the margin's sigma (2 mm for margin 1) over the whole grid:
    the nodule's working box (3 x 2.5 mm beyond the mask) must hold the whole blur."""
    mask = _ball_mask()
    spacing = np.array([0.7, 0.7, 2.5])
    vol = np.full(mask.shape, -850.0, np.float32)
    a = P.NoduleAppearance(5.0, 1.0, 6, 1)  # body +20, heterogeneity +20: the field is +40 everywhere
    P.render_nodule(vol, mask, spacing, a, np.random.default_rng(0))
    alpha = (vol.astype(np.float64) + 850.0) / (40.0 + 850.0)
    expected = gaussian_filter(mask.astype(np.float64), sigma=2.0 / spacing)
    np.testing.assert_allclose(alpha, expected, atol=1e-3)
    assert (alpha[mask] < 0.99).any()  # a blurred edge, not a sharp one


def test_a_nodule_without_voxels_draws_nothing():
    vol = np.full((10, 10, 4), -850.0, np.float32)
    P.render_nodule(vol, np.zeros(vol.shape, bool), (1, 1, 1), P.NoduleAppearance(5, 5, 3, 4), np.random.default_rng(0))
    assert (vol == -850.0).all()


def test_nodule_partial_volume_smooths_the_field_over_04_mm(monkeypatch):
    """A field of white noise inside the nodule: its drawn core is that field smoothed by 0.4 mm."""
    white = {}

    def noise(shape, sigma, rng):
        white["v"] = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
        return white["v"]

    monkeypatch.setattr(P, "_smooth_noise", noise)
    mask = np.zeros((30, 30, 30), bool)
    mask[2:28, 2:28, 2:28] = True
    vol = np.zeros(mask.shape, np.float32)
    P.render_nodule(vol, mask, (1.0, 1.0, 1.0), P.NoduleAppearance(5.0, 5.0, 6, 1), np.random.default_rng(0))
    expected = 20.0 + gaussian_filter(white["v"] * 20.0, sigma=0.4)
    np.testing.assert_allclose(vol[10:20, 10:20, 10:20], expected[10:20, 10:20, 10:20], atol=1e-3)
