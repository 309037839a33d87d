"""`nodulekit build` / nodulekit.datasets on small synthetic `rois` artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from nodulekit.artifacts import provenance, set_json_attr, write_artifact, write_strings
from nodulekit.constants import CHARACTERISTICS
from nodulekit.datasets import (
    assign_folds,
    build_dataset,
    channel_layout,
    dataset_fingerprint,
    load_dataset,
)
from nodulekit.errors import ArtifactError, DataError, NodulekitError

REPO = Path(__file__).resolve().parents[1]
LABEL_RULE = {"min_readers": 3, "malignant_above": 3.0, "benign_below": 3.0, "exclude": "mean == 3"}
NAMES = list(CHARACTERISTICS)


def sphere_volume(diameter_mm: float, spacing_mm: float, side_px: int, rng=None, noise: float = 0.0):
    """HU [21, S, S] (lung -800, nodule +40) and mask of a sphere centred on the window.

    The centre is the geometric centre of the window, ((S-1)/2, (S-1)/2), and slice 10.
    """
    z = (np.arange(21) - 10.0)[:, None, None]
    c = (side_px - 1) / 2.0
    yy = ((np.arange(side_px) - c) * spacing_mm)[None, :, None]
    xx = ((np.arange(side_px) - c) * spacing_mm)[None, None, :]
    inside = z**2 + yy**2 + xx**2 <= (diameter_mm / 2.0) ** 2
    hu = np.where(inside, 40.0, -800.0)
    if rng is not None and noise:
        hu = hu + rng.normal(0, noise, hu.shape)
    return hu.astype(np.int16), inside.astype(np.uint8)


def write_rois(path: Path, nodules: list[dict], label_rule=LABEL_RULE) -> Path:
    """A `rois` artifact in the contract layout from dicts with patient, cluster, label,
    diameter, spacing, hu, mask and optionally agreement (three readers; consensus = at
    least two; without agreement, all three readers agree on the mask)."""
    n = len(nodules)
    rng = np.random.default_rng(1)
    with write_artifact(path, "rois", provenance(source="synthetic rois for tests")) as f:
        ids = [f"{d['patient']}:{d['cluster']}" for d in nodules]
        write_strings(f, "nodule_id", ids)
        write_strings(f, "patient_id", [d["patient"] for d in nodules])
        write_strings(f, "series_uid", [f"1.2.3.{d['patient'][-4:]}" for d in nodules])
        f["cluster_index"] = np.array([d["cluster"] for d in nodules], np.int64)
        f["label"] = np.array([d["label"] for d in nodules], np.int64)
        readers = np.full((n, 4), np.nan)
        readers[:, :3] = np.array([[4, 5, 4] if d["label"] else [1, 2, 2] for d in nodules])
        f["reader_malignancy"] = readers
        f["malignancy_mean"] = np.nanmean(readers, axis=1)
        f["characteristics"] = rng.uniform(1, 5, (n, 8))
        f["characteristics"].attrs["names"] = NAMES
        f["reader_characteristics"] = rng.uniform(1, 5, (n, 4, 8))
        f["diameter_mm"] = np.array([d["diameter"] for d in nodules], np.float64)
        f["n_readers"] = np.full(n, 3, np.int64)
        group = f.create_group("nodules")
        for nid, d in zip(ids, nodules, strict=True):
            g = group.create_group(nid.replace(":", "_"))
            g["hu"] = np.asarray(d["hu"], np.int16)
            agreement = np.asarray(d.get("agreement", 3 * np.asarray(d["mask"])), np.uint8)
            g["agreement"] = agreement
            g["mask"] = (agreement >= 2).astype(np.uint8)
            g.attrs["consensus_min_readers"] = 2
            g.attrs["pixel_spacing_mm"] = d["spacing"]
            g.attrs["z_step_mm"] = 1.0
            g.attrs["diameter_mm"] = d["diameter"]
            g.attrs["z_filled"] = 0
            g.attrs["inplane_filled"] = 0
            g.attrs["fill_method"] = "none"
            for key, value in d.get("attrs", {}).items():
                g.attrs[key] = value
        set_json_attr(f, "label_rule", label_rule)
        f.attrs["source"] = "synthetic"
        f.attrs["source_path"] = "/nowhere"
        f.attrs["consensus_level"] = 0.5
        f.attrs["consensus_definition"] = "agreement / 3 >= 0.5"
    return path


def sphere_nodules(n_patients: int = 10, per_patient: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        for k in range(per_patient):
            diameter = float(rng.uniform(4, 12))
            spacing = float(rng.choice([0.6, 0.7, 0.8]))
            side = int(np.ceil(4.6 * diameter / spacing)) + int(rng.integers(0, 2))  # odd and even windows
            hu, mask = sphere_volume(diameter, spacing, side, rng, noise=30.0)
            out.append(
                dict(
                    patient=f"SYN-{p:04d}",
                    cluster=k + 1,
                    label=(p + k) % 2,
                    diameter=diameter,
                    spacing=spacing,
                    hu=hu,
                    mask=mask,
                )
            )
    return out


@pytest.fixture(scope="module")
def rois(tmp_path_factory) -> Path:
    return write_rois(tmp_path_factory.mktemp("rois") / "rois.h5", sphere_nodules())


@pytest.fixture(scope="module")
def built(rois, tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("built")
    return {
        c: build_dataset(rois, folder / f"d{c}c.h5", channels=c, n_folds=3, seed=0, progress=False)
        for c in (1, 3, 11, 21)
    }


@pytest.mark.parametrize("channels", [1, 3, 11, 21])
def test_each_channel_setting_has_the_contract_shapes(built, channels):
    ds = load_dataset(built[channels])
    n = 20
    assert ds.x.shape == (n, channels, 32, 32) and ds.x.dtype == np.float32
    assert ds.mask.shape == ds.x.shape and ds.mask.dtype == np.uint8
    assert ds.pixel_mm.shape == (n, channels)
    assert ds.y.dtype == np.int64 and set(ds.y.tolist()) == {0, 1}
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert ds.name == f"D{channels}C" and ds.channels == channels and ds.n_folds == 3
    # Table 1: ROI side p x diameter, p = 2 except D3C's multi-scale 2, 3, 4.
    p = np.array({1: [2.0], 3: [2.0, 3.0, 4.0], 11: [2.0] * 11, 21: [2.0] * 21}[channels])
    np.testing.assert_allclose(ds.pixel_mm, ds.diameter_mm[:, None] * p[None, :] / 32, rtol=1e-5)
    assert ds.attrs["label_rule"] == LABEL_RULE
    assert ds.attrs["normalisation"]["hu_window"] == [-1000.0, 400.0]
    assert ds.attrs["split"] == "patient" and ds.attrs["seed"] == 0
    with h5py.File(built[channels]) as f:
        assert f["characteristics"].attrs["names"].tolist() == NAMES
        assert f["reader_characteristics"].shape == (n, 4, 8)
        prov = json.loads(f.attrs["provenance"])
    assert prov["source_provenance"]["source"] == "synthetic rois for tests"
    assert len(prov["source_sha256"]) == 64 and prov["name"] == f"D{channels}C"


def test_channel_layout_is_table_1():
    # (slice index into the 21 one-mm slices, 10 = centre; ROI side factor p)
    expected = {
        1: [(10, 2.0)],
        3: [(10, 2.0), (10, 3.0), (10, 4.0)],
        11: [(z, 2.0) for z in range(5, 16)],
        21: [(z, 2.0) for z in range(21)],
    }
    for channels, layout in expected.items():
        assert [(c.z_index, c.p) for c in channel_layout(channels)] == layout
        assert [c.z_offset_mm for c in channel_layout(channels)] == [z - 10 for z, _ in layout]


def test_channel_sets_nest_as_in_the_paper(built):
    d1, d3, d11, d21 = (load_dataset(built[c]) for c in (1, 3, 11, 21))
    np.testing.assert_array_equal(d1.x[:, 0], d11.x[:, 5])  # D1C = centre of D11C
    np.testing.assert_array_equal(d11.x, d21.x[:, 5:16])  # D11C = middle 11 of D21C
    np.testing.assert_array_equal(d3.x[:, 0], d1.x[:, 0])  # D3C channel 0 = D1C
    np.testing.assert_array_equal(d11.mask, d21.mask[:, 5:16])
    np.testing.assert_array_equal(d3.mask[:, 0], d1.mask[:, 0])
    # The channels really differ (so the equalities above are not trivial).
    assert not np.array_equal(d21.x[:, 0], d21.x[:, 10])
    assert not np.array_equal(d3.x[:, 0], d3.x[:, 2])
    assert d21.mask[:, 0].sum() < d21.mask[:, 10].sum()  # far slices miss the sphere
    for other in (d3, d11, d21):
        np.testing.assert_array_equal(other.fold, d1.fold)
        np.testing.assert_array_equal(other.nodule_id, d1.nodule_id)


def test_each_channel_takes_its_own_slice(tmp_path):
    # Slice z holds the constant HU -1000 + 60 z, so channel k's value names its slice.
    side = 50
    hu = np.broadcast_to((-1000 + 60 * np.arange(21))[:, None, None], (21, side, side)).copy()
    mask = np.zeros_like(hu, np.uint8)
    nodules = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=8.0, spacing=0.7, hu=hu, mask=mask) for i in range(4)
    ]
    rois = write_rois(tmp_path / "r.h5", nodules)
    for channels, first in ((21, 0), (11, 5), (1, 10)):
        ds = load_dataset(
            build_dataset(rois, tmp_path / f"{channels}.h5", channels=channels, n_folds=2, progress=False)
        )
        expected = 60 * np.arange(first, first + channels) / 1400  # (HU + 1000) / 1400, all in the window
        np.testing.assert_allclose(ds.x[0], np.broadcast_to(expected[:, None, None], (channels, 32, 32)), atol=1e-6)


@pytest.mark.parametrize("side", [80, 81])
def test_resampling_geometry_matches_an_analytic_ramp(tmp_path, side):
    # Linear interpolation reproduces a linear HU ramp exactly, so each output pixel must
    # equal the ramp at its centre: centre + (j + 0.5 - 16) * side_mm / 32, in mm.
    spacing, diameter = 0.7, 10.0
    c = (side - 1) / 2.0
    rows, cols = np.mgrid[:side, :side]
    plane = -300.0 + 4.0 * (rows - c) * spacing - 7.0 * (cols - c) * spacing  # HU; stays in window
    hu = np.broadcast_to(plane, (21, side, side))
    nodules = [
        dict(
            patient=f"P{i}",
            cluster=1,
            label=i % 2,
            diameter=diameter,
            spacing=spacing,
            hu=np.rint(hu),
            mask=np.zeros((21, side, side)),
        )
        for i in range(4)
    ]
    rois = write_rois(tmp_path / "r.h5", nodules)
    ds = load_dataset(build_dataset(rois, tmp_path / "d3.h5", channels=3, n_folds=2, progress=False))
    for ch, p in enumerate((2, 3, 4)):
        mm = (np.arange(32) + 0.5 - 16) * p * diameter / 32
        ref = -300.0 + 4.0 * mm[:, None] - 7.0 * mm[None, :]
        # Tolerance: the int16 rounding of the HU input (0.5 HU).
        np.testing.assert_allclose(ds.x[0, ch], (ref + 1000) / 1400, atol=0.6 / 1400)


def test_sphere_mask_area_matches_the_disk_fraction(tmp_path):
    # A sphere of diameter d cut through its centre is a disk of diameter d; in a square of
    # side p d its area fraction is pi / (4 p^2): pi/16 for p = 2, pi/64 for p = 4.
    diameter, spacing = 12.0, 0.5
    side = int(np.ceil(4.5 * diameter / spacing))
    hu, mask = sphere_volume(diameter, spacing, side)
    nodules = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=diameter, spacing=spacing, hu=hu, mask=mask)
        for i in range(4)
    ]
    rois = write_rois(tmp_path / "r.h5", nodules)
    ds = load_dataset(build_dataset(rois, tmp_path / "d3.h5", channels=3, n_folds=2, progress=False))
    for ch, p in enumerate((2, 3, 4)):
        fraction = ds.mask[0, ch].mean()
        assert fraction == pytest.approx(np.pi / (4 * p * p), rel=0.05), (p, fraction)
        inside = ds.x[0, ch][ds.mask[0, ch] == 1]
        assert inside.min() > 600 / 1400  # the nodule is bright where the mask is: above -400 HU
    # The disk is centred: its centroid is the patch centre (15.5, 15.5).
    yy, xx = np.nonzero(ds.mask[0, 0])
    assert abs(yy.mean() - 15.5) < 0.1 and abs(xx.mean() - 15.5) < 0.1


def test_agreement_map_keeps_consensus_and_union_as_its_level_sets(tmp_path):
    # Three readers outline concentric spheres of 6, 9 and 12 mm: agreement 3 in the core,
    # 1 in the outer shell. The consensus (>= 2 readers) is the 9 mm sphere, the union the 12 mm one.
    spacing, side = 0.5, 120
    hu, s6 = sphere_volume(6.0, spacing, side)
    _, s9 = sphere_volume(9.0, spacing, side)
    _, s12 = sphere_volume(12.0, spacing, side)
    agreement = s6 + s9 + s12
    nodules = [
        dict(
            patient=f"P{i}", cluster=1, label=i % 2, diameter=9.0, spacing=spacing, hu=hu, mask=s9, agreement=agreement
        )
        for i in range(4)
    ]
    ds = load_dataset(build_dataset(write_rois(tmp_path / "r.h5", nodules), tmp_path / "d.h5", channels=1, n_folds=2))
    assert ds.agreement is not None and ds.agreement.max() == 3 and ds.attrs["consensus_level"] == 0.5
    np.testing.assert_array_equal(ds.consensus_min_readers, 2)
    np.testing.assert_array_equal(ds.mask, ds.agreement >= 2)
    # Each level set is the resampled sphere of that level, built on its own as a mask.
    for j, sphere in ((1, s12), (3, s6)):
        alone = [dict(d, mask=sphere, agreement=3 * sphere) for d in nodules]
        ref = load_dataset(
            build_dataset(write_rois(tmp_path / f"r{j}.h5", alone), tmp_path / f"d{j}.h5", channels=1, n_folds=2)
        )
        np.testing.assert_array_equal(ds.agreement >= j, ref.mask)
    # The union and the consensus cover their spheres' centre-slice areas: source pixels
    # (0.5 mm) in output pixels (2 x 9 mm / 32); whole rings of 4-8 pixels make smaller disks coarse.
    for j, sphere in ((1, s12), (2, s9)):
        expected = sphere[10].sum() * (spacing / (18.0 / 32)) ** 2
        assert (ds.agreement[0, 0] >= j).sum() == pytest.approx(expected, rel=0.05)


def test_rois_without_agreement_map_is_refused(tmp_path):
    hu, mask = sphere_volume(8.0, 0.7, 60)
    nodules = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=8.0, spacing=0.7, hu=hu, mask=mask) for i in range(4)
    ]
    rois = write_rois(tmp_path / "r.h5", nodules)
    with h5py.File(rois, "a") as f:
        del f.attrs["consensus_level"]
    with pytest.raises(ArtifactError, match="re-run nodulekit extract"):
        build_dataset(rois, tmp_path / "d.h5", channels=1, n_folds=2, progress=False)
    assert not (tmp_path / "d.h5").exists()


def test_sub_pixel_centre_and_filled_slices_from_extract_are_used(tmp_path):
    # extract records the true sub-pixel centre (centre_in_window) and which z offsets were
    # edge-replicated (z_filled_offsets_mm); build must centre on the former and flag the latter.
    diameter, spacing, side = 12.0, 0.5, 109
    centre = ((side - 1) / 2 + 0.45, (side - 1) / 2 - 0.4)
    z = (np.arange(21) - 10.0)[:, None, None]
    yy = ((np.arange(side) - centre[0]) * spacing)[None, :, None]
    xx = ((np.arange(side) - centre[1]) * spacing)[None, None, :]
    mask = (z**2 + yy**2 + xx**2 <= (diameter / 2) ** 2).astype(np.uint8)
    hu = np.where(mask, 40, -800).astype(np.int16)
    attrs = {"centre_in_window": list(centre), "z_filled_offsets_mm": [-10.0, -9.0, 8.0, 9.0, 10.0]}
    nodules = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=diameter, spacing=spacing, hu=hu, mask=mask, attrs=attrs)
        for i in range(4)
    ]
    rois = write_rois(tmp_path / "r.h5", nodules)
    d21 = load_dataset(build_dataset(rois, tmp_path / "d21.h5", channels=21, n_folds=2, progress=False))

    def centroid(img):  # brightness-weighted, finer than the thresholded mask
        w = img - img.min()
        r, c = np.mgrid[:32, :32]
        return (w * r).sum() / w.sum(), (w * c).sum() / w.sum()

    cy, cx = centroid(d21.x[0, 10])
    assert abs(cy - 15.5) < 0.1 and abs(cx - 15.5) < 0.1
    yy_, xx_ = np.nonzero(d21.mask[0, 10])
    assert abs(yy_.mean() - 15.5) < 0.1 and abs(xx_.mean() - 15.5) < 0.1
    expected = np.zeros(21, np.uint8)
    expected[[0, 1, 18, 19, 20]] = 1
    np.testing.assert_array_equal(d21.filled_channels, np.tile(expected, (4, 1)))
    d11 = load_dataset(build_dataset(rois, tmp_path / "d11.h5", channels=11, n_folds=2, progress=False))
    assert d11.filled_channels.sum() == 0
    # Ignoring the recorded centre shifts the disk by the offset (in input pixels x spacing).
    plain = write_rois(tmp_path / "plain.h5", [{**d, "attrs": {}} for d in nodules])
    off = load_dataset(build_dataset(plain, tmp_path / "off.h5", channels=1, n_folds=2, progress=False))
    cy, cx = centroid(off.x[0, 0])
    assert cy - 15.5 == pytest.approx(0.45 * spacing / off.pixel_mm[0, 0], abs=0.05)
    assert 15.5 - cx == pytest.approx(0.4 * spacing / off.pixel_mm[0, 0], abs=0.05)


def test_inplane_edge_replicated_border_is_flagged_per_channel(tmp_path):
    # A source crop smaller than the window, padded by edge replication as extract does: the
    # 2x ROI stays inside the real pixels, the 4x ROI reaches into the replicated border.
    diameter, spacing = 10.0, 0.5
    side = int(np.ceil(4.5 * diameter / spacing)) | 1  # 91 px, odd like extract's windows
    rng = np.random.default_rng(5)
    hu, mask = sphere_volume(diameter, spacing, side, rng, noise=20.0)
    keep = slice(10, side - 10)  # real rows/cols 10..80 = centre 45 +- 35 px; 3x ROI = +- 30 px, 4x = +- 40 px
    core = hu[:, keep, keep]
    padded = np.pad(core, ((0, 0), (10, 10), (10, 10)), mode="edge")
    assert padded.shape == hu.shape
    n_filled = side * side - core.shape[1] * core.shape[2]
    good = dict(
        patient="P0",
        cluster=1,
        label=0,
        diameter=diameter,
        spacing=spacing,
        hu=padded,
        mask=mask,
        attrs={"inplane_filled": n_filled},
    )
    wrong = {**good, "patient": "P1", "label": 1, "attrs": {"inplane_filled": n_filled + 7}}
    others = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=diameter, spacing=spacing, hu=hu, mask=mask)
        for i in range(2, 4)
    ]
    rois = write_rois(tmp_path / "r.h5", [good, wrong] + others)
    path = build_dataset(rois, tmp_path / "d3.h5", channels=3, n_folds=2, progress=False)
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.inplane_filled_channels[0], [0, 0, 1])
    np.testing.assert_array_equal(ds.inplane_filled_channels[1:], 0)  # count mismatch: unknown; no fill
    assert ds.attrs["provenance"]["inplane_fill_undetermined"] == ["P1:1"]


def test_patient_folds_are_grouped_stratified_and_seeded():
    rng = np.random.default_rng(3)
    patients = np.repeat([f"LIDC-IDRI-{i:04d}" for i in range(120)], rng.integers(1, 5, 120))
    y = (rng.uniform(size=len(patients)) < 0.45).astype(int)
    fold = assign_folds(y, patients, n_folds=5, seed=7, split="patient")
    assert set(fold.tolist()) == set(range(5))
    for pid in np.unique(patients):
        assert len(np.unique(fold[patients == pid])) == 1, pid
    overall = y.mean()
    for k in range(5):
        assert abs(y[fold == k].mean() - overall) < 0.1
        assert abs((fold == k).mean() - 0.2) < 0.06
    np.testing.assert_array_equal(fold, assign_folds(y, patients, 5, seed=7, split="patient"))
    assert not np.array_equal(fold, assign_folds(y, patients, 5, seed=8, split="patient"))
    leaky = assign_folds(y, patients, 5, seed=7, split="nodule")
    for k in range(5):
        assert abs(y[leaky == k].mean() - overall) < 0.03  # per-nodule stratification is tighter
    np.testing.assert_array_equal(leaky, assign_folds(y, patients, 5, seed=7, split="nodule"))


def test_same_seed_builds_identical_files_and_split_is_recorded(rois, built, tmp_path):
    again = load_dataset(build_dataset(rois, tmp_path / "again.h5", channels=11, n_folds=3, seed=0, progress=False))
    first = load_dataset(built[11])
    np.testing.assert_array_equal(again.fold, first.fold)
    assert dataset_fingerprint(again) == dataset_fingerprint(first)
    leaky = load_dataset(
        build_dataset(rois, tmp_path / "leaky.h5", channels=1, n_folds=3, split="nodule", progress=False)
    )
    assert leaky.attrs["split"] == "nodule" and "LEAKY" in leaky.attrs["split_note"]


def test_fingerprint_tracks_x_and_y(built):
    ds = load_dataset(built[1])
    fp = dataset_fingerprint(ds)
    assert len(fp) == 16 and int(fp, 16) >= 0
    # The original value is put back exactly: x + 0.5 - 0.5 is not x in float32 for every x.
    original = ds.x[0, 0, 0, 0].copy()
    ds.x[0, 0, 0, 0] = np.nextafter(original, np.float32(2))  # the smallest change a float32 can make
    assert dataset_fingerprint(ds) != fp
    ds.x[0, 0, 0, 0] = original
    assert dataset_fingerprint(ds) == fp
    ds.y[0] = 1 - ds.y[0]
    assert dataset_fingerprint(ds) != fp
    ds.y[0] = 1 - ds.y[0]
    ds.fold[0] = (ds.fold[0] + 1) % ds.n_folds
    assert dataset_fingerprint(ds) != fp  # the fold assignment is part of the identity


def test_refuses_existing_output_unless_overwrite(rois, built):
    before = built[1].stat().st_mtime_ns
    with pytest.raises(NodulekitError, match="already exists"):
        build_dataset(rois, built[1], channels=1, n_folds=3, progress=False)
    assert built[1].stat().st_mtime_ns == before
    build_dataset(rois, built[1], channels=1, n_folds=3, progress=False, overwrite=True)
    assert load_dataset(built[1]).channels == 1


def test_wrong_kind_input_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(ArtifactError, match="is a 'dataset' artifact, expected 'rois'"):
        build_dataset(tiny_dataset, tmp_path / "out.h5", channels=1)
    assert not (tmp_path / "out.h5").exists()


def test_bad_requests_are_refused(rois, tmp_path):
    with pytest.raises(NodulekitError, match="--channels must be one of 1, 3, 11, 21"):
        build_dataset(rois, tmp_path / "o.h5", channels=5)
    with pytest.raises(NodulekitError, match="--split must be"):
        build_dataset(rois, tmp_path / "o.h5", split="random")
    with pytest.raises(NodulekitError, match="only 10 benign nodules, fewer than the 12 folds"):
        build_dataset(rois, tmp_path / "o.h5", n_folds=12, progress=False)
    with pytest.raises(NodulekitError, match="only 4 patients for 5 patient-grouped folds"):
        assign_folds(np.arange(20) % 2, np.repeat(["A", "B", "C", "D"], 5), n_folds=5)
    with pytest.raises(NodulekitError, match="only 20 nodules for 25 folds"):
        build_dataset(rois, tmp_path / "o.h5", n_folds=25, split="nodule", progress=False)
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(NodulekitError, match="only 3 malignant nodules, fewer than the 5 folds"):
        assign_folds(y, np.arange(13).astype(str), n_folds=5)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_window_too_small_and_bad_labels_are_data_errors(tmp_path):
    hu, mask = sphere_volume(10.0, 0.7, 40)  # 28 mm window < 40 mm needed by D3C (4 x 10 mm)
    nodules = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=10.0, spacing=0.7, hu=hu, mask=mask) for i in range(4)
    ]
    rois = write_rois(tmp_path / "r.h5", nodules)
    build_dataset(rois, tmp_path / "d1.h5", channels=1, n_folds=2, progress=False)  # 20 mm fits
    with pytest.raises(DataError, match="smaller than the 40.0 mm patch"):
        build_dataset(rois, tmp_path / "d3.h5", channels=3, n_folds=2, progress=False)
    nodules[0]["label"] = -1
    rois = write_rois(tmp_path / "r2.h5", nodules)
    with pytest.raises(DataError, match="has label -1"):
        build_dataset(rois, tmp_path / "d1b.h5", channels=1, n_folds=2, progress=False)
    assert not (tmp_path / "d3.h5").exists() and not (tmp_path / "d1b.h5").exists()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f["y"].__setitem__(0, 2), "y holds values other than 0 and 1"),
        (lambda f: f["x"].__setitem__((1, 0, 0, 0), np.nan), "non-finite"),
        (
            lambda f: (f.__delitem__("pixel_mm"), f.create_dataset("pixel_mm", data=np.zeros((3, 11)))),
            "pixel_mm has shape",
        ),
        (lambda f: f.attrs.__delitem__("label_rule"), "'label_rule' is missing"),
        (lambda f: f.attrs.__setitem__("channels", 3), "channels=3 but x has 11"),
        (lambda f: f["fold"].__setitem__(0, 9), "outside 0..4"),
    ],
)
def test_load_dataset_rejects_inconsistent_files(tiny_dataset, corrupt, message):
    assert len(load_dataset(tiny_dataset)) == 40
    with h5py.File(tiny_dataset, "r+") as f:
        corrupt(f)
    with pytest.raises(ArtifactError, match=message):
        load_dataset(tiny_dataset)


def test_cli_builds_and_errors_in_one_line(rois, tmp_path, run_cli):
    out = tmp_path / "cli.h5"
    code, stdout, stderr = run_cli(
        "build", str(rois), "--channels", "11", "-o", str(out), "--folds", "2", "--no-progress"
    )
    assert code == 0, stderr
    assert "D11C x (20, 11, 32, 32)" in stdout and "fingerprint" in stdout
    assert load_dataset(out).n_folds == 2
    for args, message in (
        ((str(rois), "--channels", "11", "-o", str(out)), "already exists (pass --overwrite"),
        ((str(out), "-o", str(tmp_path / "x.h5")), "expected 'rois'"),
        ((str(rois), "-o", str(tmp_path / "x.h5"), "--folds", "30"), "only 20 nodules for 30 folds"),
    ):
        code, stdout, stderr = run_cli("build", *args)
        assert code == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nodulekit: error:") and message in lines[0], stderr
    # --channels is a choice: a usage error that lists the allowed values
    code, _, stderr = run_cli("build", str(rois), "--channels", "5", "-o", str(tmp_path / "x.h5"))
    assert code == 2 and "'5' is not one of '1', '3', '11', '21'" in stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.h5"]


def test_module_entry_point_runs_build(rois, tmp_path):
    # One real subprocess: `python -m nodulekit build` is wired up end to end.
    out = tmp_path / "sub.h5"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodulekit",
            "build",
            str(rois),
            "-c",
            "1",
            "-o",
            str(out),
            "--folds",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert load_dataset(out).x.shape == (20, 1, 32, 32)


@pytest.mark.shared
def test_real_vois_build_d11c(lidc_vois, tmp_path):
    # Real LIDC VOIs through the real extract stage, then build (skipped without the data).
    extract = pytest.importorskip("nodulekit.extract", reason="nodulekit.extract not available")
    patients = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0004", "LIDC-IDRI-0005", "LIDC-IDRI-0008"]
    rois = tmp_path / "rois.h5"
    extract.extract_rois(rois, vois=lidc_vois, patients=patients, progress=False)
    ds = load_dataset(build_dataset(rois, tmp_path / "d11c.h5", channels=11, n_folds=2, progress=False))
    n = len(ds)
    assert n >= 6 and set(ds.y.tolist()) == {0, 1}
    assert ds.x.shape == (n, 11, 32, 32) and np.isfinite(ds.x).all()
    assert set(ds.patient_id.tolist()) <= set(patients)
    for pid in set(ds.patient_id.tolist()):
        assert len(set(ds.fold[ds.patient_id == pid].tolist())) == 1
    # A 2 x diameter ROI of a real nodule: the consensus mask covers a sizeable central part
    # (pi/16 ~ 0.20 for a round nodule) and the nodule is denser than its surroundings.
    centre = ds.mask[:, 5]
    frac = centre.reshape(n, -1).mean(axis=1)
    assert np.all(frac > 0.03) and np.median(frac) == pytest.approx(np.pi / 16, abs=0.1)
    inside = (ds.x[:, 5] * centre).sum(axis=(1, 2)) / centre.sum(axis=(1, 2))
    outside = (ds.x[:, 5] * (1 - centre)).sum(axis=(1, 2)) / (1 - centre).sum(axis=(1, 2))
    assert np.mean(inside > outside) >= 0.8
    assert ds.attrs["label_rule"] and ds.attrs["provenance"]["source_provenance"]["source"] == "vois"
    # The training ranges' per-nodule quantities, against each VOI's own header: its pixel and
    # slice spacing (VOI files are named <patient>_R_<cluster>), and a nodule centre denser than lung.
    import nibabel as nib

    for i, nid in enumerate(ds.nodule_id):
        patient, cluster = nid.split(":")
        zooms = nib.load(str(lidc_vois / "image" / f"{patient}_R_{cluster}.nii.gz")).header.get_zooms()
        assert ds.extras["pixel_spacing_mm"][i] == pytest.approx(min(zooms[:2]), abs=1e-5)
        assert ds.extras["slice_spacing_mm"][i] == pytest.approx(zooms[2], abs=1e-3)
    assert np.median(ds.extras["centre_hu"]) > -500


def test_build_records_the_input_spec_and_the_training_ranges(rois, built):
    """The dataset stores the input spec's numbers, and per nodule its scan's pixel spacing and the
    HU at its centre (the 0 mm plane's middle pixel of the rois window), for the model's ranges."""
    from nodulekit.inputs import paper_spec

    ds = load_dataset(built[3])
    assert ds.attrs["input_spec"] == paper_spec(3).as_dict() and ds.input_spec == paper_spec(3)
    with h5py.File(rois) as f:
        ids = [v.decode() for v in f["nodule_id"][()]]
        for i, nid in enumerate(ids):
            g = f["nodules"][nid.replace(":", "_")]
            s = g["hu"].shape[1] // 2
            assert ds.extras["centre_hu"][i] == g["hu"][10, s, s]
            assert ds.extras["pixel_spacing_mm"][i] == pytest.approx(float(np.min(g.attrs["pixel_spacing_mm"])))
    assert np.isnan(ds.extras["slice_spacing_mm"]).all()  # these synthetic rois do not record it
    # A dataset from before input specs: its spec comes from its channels and normalisation.
    del ds.attrs["input_spec"]
    ds.__dict__.pop("input_spec", None)
    assert ds.input_spec == paper_spec(3)
