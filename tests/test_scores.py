"""Region scores (body / margin band / outside) with known answers."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nodulekit import scores as S
from nodulekit.artifacts import provenance, write_maps
from nodulekit.datasets import load_dataset
from nodulekit.errors import NodulekitError


def disc(radius_px=8.0, size=32):
    yy, xx = np.mgrid[:size, :size]
    return (np.hypot(yy - 15.5, xx - 15.5) < radius_px).astype(np.uint8)


def half_plane(col=16, size=32):
    m = np.zeros((size, size), np.uint8)
    m[:, :col] = 1
    return m


@pytest.mark.parametrize("pixel_mm,body_end,band_end", [(0.5, 12, 20), (1.0, 14, 18), (0.25, 8, 24)])
def test_radius_is_in_millimetres(pixel_mm, body_end, band_end):
    # Mask = columns 0..15. A pixel in column j<16 is (16-j) pixels from the background;
    # one in column j>=16 is (j-15) pixels from the mask. r = 2 mm.
    lab = S.region_labels(half_plane(), pixel_mm, 2.0)
    cols = lab[5]
    assert (cols[:body_end] == 0).all() and (cols[body_end:band_end] == 1).all() and (cols[band_end:] == 2).all()
    assert (lab == lab[:1]).all()  # same in every row


def test_zero_radius_band_is_empty_and_body_is_mask():
    mask = disc()
    lab = S.region_labels(mask, 0.7, 0.0)
    assert ((lab == 0) == mask.astype(bool)).all() and not (lab == 1).any()


def test_band_indicator_map_has_full_band_share():
    lab = S.region_labels(disc(), 0.5, 2.0)
    band = (lab == 1).astype(float)
    s = S.map_region_scores(band[None], lab[None])
    area = band.mean()
    assert s["share_margin_band"][0] == pytest.approx(1.0)
    assert s["share_body"][0] == 0 and s["share_outside"][0] == 0
    assert s["enrichment_margin_band"][0] == pytest.approx(1 / area)
    assert s["area_margin_band"][0] == pytest.approx(area)
    assert s["pointing"][0] == "margin_band"


def test_uniform_map_has_no_preference():
    lab = S.region_labels(disc(6), 0.8, 1.5)
    s = S.map_region_scores(np.full((1, 32, 32), 2.5), lab[None])
    for r in S.REGIONS:
        assert s[f"enrichment_{r}"][0] == pytest.approx(1.0)
        assert s[f"share_{r}"][0] == pytest.approx(s[f"area_{r}"][0])
    assert s["pointing"][0] == "none"


def test_pointing_and_clipping_of_negative_evidence():
    lab = S.region_labels(disc(8), 0.5, 1.0)
    m = np.full((32, 32), -5.0)
    by, bx = np.argwhere(lab == 0)[len(np.argwhere(lab == 0)) // 2]
    m[by, bx] = 1.0  # only positive evidence is the body pixel
    s = S.map_region_scores(np.stack([m, np.full((32, 32), -1.0)]), np.stack([lab, lab]))
    assert s["pointing"][0] == "body" and s["share_body"][0] == pytest.approx(1.0)
    assert s["empty_map"].tolist() == [False, True]
    assert np.isnan(s["share_body"][1])


def test_empty_region_gives_nan_enrichment():
    lab = S.region_labels(disc(2), 1.0, 3.0)  # a tiny nodule: erosion by 3 mm leaves no body
    assert not (lab == 0).any()
    s = S.map_region_scores(np.ones((1, 32, 32)), lab[None])
    assert np.isnan(s["enrichment_body"][0]) and s["share_body"][0] == 0


def test_bad_masks_are_one_line_errors():
    with pytest.raises(NodulekitError, match="consensus mask is empty"):
        S.region_labels(np.zeros((32, 32)), 0.5, 2.0)
    with pytest.raises(NodulekitError, match="radius must be"):
        S.region_labels(disc(), 0.5, -1)


def band_maps_file(tmp_path, dataset, name="band.h5", method="sam"):
    """A maps artifact whose malignant map is the margin-band indicator and benign map the body."""
    with h5py.File(dataset) as f:
        mask, pix, y = f["mask"][:, 5], f["pixel_mm"][:, 5], f["y"][()]
        ids = [v.decode() for v in f["nodule_id"][()]]
    maps = np.zeros((len(ids), 2, 32, 32), np.float32)
    for i in range(len(ids)):
        lab = S.region_labels(mask[i], pix[i], 2.0)
        maps[i, 1] = lab == 1
        maps[i, 0] = lab == 0
    return write_maps(
        tmp_path / name,
        nodule_id=ids,
        maps=maps,
        maps_up=maps,
        prob=np.where(y == 1, 0.9, 0.1),
        method=method,
        arch="hand",
        source="test",
        prov=provenance(),
        y=y,
        dataset_identity=load_dataset(dataset).identity,
    )


def test_score_maps_end_to_end(tmp_path, tiny_dataset):
    path = band_maps_file(tmp_path, tiny_dataset)
    df = S.score_maps([path], tiny_dataset, radius_mm=2.0, map_class=1)
    assert len(df) == 40 and set(df["class"]) == {"malignant", "benign"}
    assert np.allclose(df["share_margin_band"], 1.0) and (df["pointing"] == "margin_band").all()
    assert df["correct"].all()
    benign_map = S.score_maps([path], tiny_dataset, radius_mm=2.0, map_class=0)
    assert np.allclose(benign_map["share_body"], 1.0)
    summary = S.summarise_scores(df, "class")
    assert summary["n"].sum() == 40 and np.allclose(summary["mean_share_margin_band"], 1.0)
    assert np.allclose(summary["pointing_margin_band"], 1.0)
    spic = S.summarise_scores(df, "spiculation")
    assert set(spic["group"]) <= {"spiculated (>=3)", "not spiculated (<3)"} and spic["n"].sum() == 40
    expected_high = int((df["spiculation"] >= 3).sum())
    assert spic.loc[spic["group"] == "spiculated (>=3)", "n"].sum() == expected_high
    out = S.write_scores(df, tmp_path / "scores.csv")
    assert "margin band" in out["md"].read_text() and out["json"].exists() and out["csv"].exists()
    with pytest.raises(NodulekitError, match="already exists"):
        S.write_scores(df, tmp_path / "scores.csv")


def test_score_maps_refuses_empty_masks_and_maskless_dataset(tmp_path, tiny_dataset):
    from nodulekit.artifacts import set_json_attr

    path = band_maps_file(tmp_path, tiny_dataset)
    with h5py.File(tiny_dataset, "a") as f:
        f["mask"][3] = 0
    # maps computed before the masks changed are refused, saying what differs
    with pytest.raises(NodulekitError, match=r"is not the dataset of .*band.h5: consensus masks differ"):
        S.score_maps([path], tiny_dataset)
    with h5py.File(path, "a") as f:  # as if the maps had been computed on the changed dataset
        set_json_attr(f, "dataset_identity", load_dataset(tiny_dataset).identity)
    with pytest.raises(NodulekitError, match=r"1 nodule\(s\) have an empty consensus mask .*skip-empty-masks"):
        S.score_maps([path], tiny_dataset)
    df = S.score_maps([path], tiny_dataset, skip_empty_masks=True)
    assert len(df) == 39
    with h5py.File(tiny_dataset, "a") as f:
        del f["mask"]
    with pytest.raises(NodulekitError, match="missing mask"):
        S.score_maps([path], tiny_dataset)


def test_radius_as_fraction_of_equivalent_radius(tmp_path, tiny_dataset):
    path = band_maps_file(tmp_path, tiny_dataset)
    with h5py.File(tiny_dataset) as f:
        mask, pix = f["mask"][:, 5], f["pixel_mm"][:, 5]
    df = S.score_maps([path], tiny_dataset, radius_frac=0.5)
    eq_radius = np.sqrt(mask.sum(axis=(1, 2)) * pix**2 / np.pi)
    np.testing.assert_allclose(df["radius_mm"], 0.5 * eq_radius, rtol=1e-6)
    assert (df["band_rule"] == "r = 0.5 x equivalent radius").all()
    lab = S.region_labels(mask[7], pix[7], 0.5 * eq_radius[7])
    assert df.loc[7, "area_margin_band"] == pytest.approx((lab == 1).mean())
    with pytest.raises(NodulekitError, match="fraction must be >= 0"):
        S.score_maps([path], tiny_dataset, radius_frac=-1)


def test_map_channel_is_the_centre_slice_at_twice_the_diameter(tmp_path):
    from conftest import write_tiny_dataset

    from nodulekit.datasets import load_dataset

    expected = {1: 0, 3: 0, 11: 5, 21: 10}  # D3C: channel 0 is p = 2 (channels 1, 2 are p = 3, 4)
    for channels, index in expected.items():
        ds = load_dataset(write_tiny_dataset(tmp_path / f"d{channels}.h5", n=4, channels=channels, folds=2))
        assert S.map_channel(ds) == index


def test_d3c_is_scored_against_the_mask_and_pixel_size_of_its_p2_channel(tmp_path):
    """Each D3C channel shows the nodule at another scale: only channel 0's mask gives the map's answer."""
    from conftest import write_tiny_dataset

    ds_path = write_tiny_dataset(tmp_path / "d3c.h5", n=6, channels=3, folds=2)
    with h5py.File(ds_path, "a") as f:
        n = len(f["y"])
        for c, radius in enumerate((8.0, 16 / 3, 4.0)):  # the same nodule at ROI side 2, 3, 4 x diameter
            f["mask"][:, c] = disc(radius)
            f["pixel_mm"][:, c] = 0.5 * (c + 2) / 2
        y, ids = f["y"][()], [v.decode() for v in f["nodule_id"][()]]
    band = (S.region_labels(disc(8.0), 0.5, 1.0) == 1).astype(np.float32)
    maps = np.repeat(band[None, None], n, 0).repeat(2, 1)
    path = write_maps(
        tmp_path / "m.h5",
        nodule_id=ids,
        maps=maps,
        maps_up=maps,
        prob=np.full(n, 0.7),
        method="cam",
        arch="hand",
        source="test",
        prov=provenance(),
        y=y,
        dataset_identity=load_dataset(ds_path).identity,
    )
    df = S.score_maps([path], ds_path, radius_mm=1.0)
    assert (df["mask_channel"] == 0).all() and np.allclose(df["pixel_mm"], 0.5)
    assert np.allclose(df["share_margin_band"], 1.0)  # the map is channel 0's band exactly
    other = S.score_maps([path], ds_path, radius_mm=1.0, channel=2)
    assert np.allclose(other["pixel_mm"], 1.0) and (other["share_margin_band"] < 0.5).all()
    with pytest.raises(NodulekitError, match="--channel 3 does not exist"):
        S.score_maps([path], ds_path, channel=3)


def test_summaries_report_every_region_with_patient_intervals(tmp_path, tiny_dataset):
    from nodulekit.stats import cluster_bootstrap

    rng = np.random.default_rng(0)
    with h5py.File(tiny_dataset) as f:
        y, ids = f["y"][()], [v.decode() for v in f["nodule_id"][()]]
    maps = rng.random((len(ids), 2, 32, 32)).astype(np.float32) ** 4
    kwargs = dict(nodule_id=ids, maps=maps, maps_up=maps, prob=np.full(len(ids), 0.6), arch="hand", source="t", y=y)
    kwargs["dataset_identity"] = load_dataset(tiny_dataset).identity
    a = write_maps(tmp_path / "a.h5", method="gradcam", prov=provenance(), **kwargs)
    b = write_maps(tmp_path / "b.h5", method="gradcam", prov=provenance(), **{**kwargs, "arch": "other"})
    df = S.score_maps([a, b], tiny_dataset, radius_mm=1.0)
    assert set(df["map"]) == {"hand gradcam", "other gradcam"}  # same method, two runs: told apart
    summary = S.summarise_scores(df, "class", n_resamples=300, seed=1)
    row = summary[(summary["map"] == "hand gradcam") & (summary["group"] == "malignant")].iloc[0]
    part = df[(df["map"] == "hand gradcam") & (df["class"] == "malignant")]
    for r in S.REGIONS:
        assert row[f"mean_enrichment_{r}"] == pytest.approx(np.nanmean(part[f"enrichment_{r}"]))
        assert row[f"mean_share_{r}"] == pytest.approx(part[f"share_{r}"].mean())
    values = part["enrichment_outside"].to_numpy()
    ref = cluster_bootstrap(part["patient_id"], lambda w: (w @ values / w.sum(1))[None], n_resamples=300, seed=1)
    assert row["mean_enrichment_outside_low"] == pytest.approx(ref["low"][0])
    assert row["n_patients"] == len(set(part["patient_id"])) == 20
    out = S.write_scores(df, tmp_path / "s.csv", n_resamples=300, seed=1)
    md = out["md"].read_text()
    assert "enrichment_body" in md and "enrichment_outside" in md and "300 resamples of patients" in md
    assert f"{row['mean_enrichment_body']:.3f} [{row['mean_enrichment_body_low']:.3f}, " in md


def brute_force_regions(mask, spacing, radius_mm):
    """Reference: exact pairwise distances (mm) between pixel centres, no distance transform."""
    coords = np.argwhere(np.ones_like(mask, bool)) * np.asarray(spacing, float)
    inside = mask.ravel() > 0
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    to_outside = np.where(inside[None, :], np.inf, d).min(axis=1)
    to_inside = np.where(inside[None, :], d, np.inf).min(axis=1)
    body = inside & (to_outside > radius_mm)
    dilated = inside | (to_inside <= radius_mm)
    lab = np.full(mask.size, 2, np.int8)
    lab[dilated] = 1
    lab[body] = 0
    return lab.reshape(mask.shape)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["LIDC-IDRI-0001_R_1", "LIDC-IDRI-0003_R_2"])
def test_regions_on_real_readers_contours_match_brute_force(lidc_vois, name):
    import nibabel as nib

    img = nib.load(lidc_vois / "mask" / f"{name}.nii.gz")
    volume = np.asarray(img.dataobj) > 0
    z = int(np.argmax(volume.sum(axis=(0, 1))))  # the slice with the largest contour
    mask = volume[:, :, z].astype(np.uint8)
    (r0, c0), (r1, c1) = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    mask = mask[max(r0 - 6, 0) : r1 + 7, max(c0 - 6, 0) : c1 + 7]  # keeps the brute force small
    spacing = tuple(float(s) for s in img.header.get_zooms()[:2])
    for radius in (1.3, 2.0):
        lab = S.region_labels(mask, spacing, radius)
        np.testing.assert_array_equal(lab, brute_force_regions(mask, spacing, radius))
        assert (lab == 0).any() and (lab == 1).any()
