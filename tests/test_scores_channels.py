"""Region scores come from the channel they name: its consensus mask and its pixel size.

The fixture is an 11-channel dataset whose channels all differ: channel c holds a disc of
radius 4 + 0.9 c pixels and has pixels of 0.5 + 0.05 c mm. Any score computed from another
channel's mask or pixel size (or the right mask with the wrong size) gives other numbers.
Expected regions come from exact pairwise pixel distances (``brute_force_regions``), the
scores from their definitions (share = map energy in the region / all, enrichment = share /
area fraction).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_scores import brute_force_regions

from nodulekit import scores as S
from nodulekit.artifacts import provenance, write_maps
from nodulekit.datasets import Dataset, load_dataset, write_dataset

CHANNELS, N = 11, 4


def disc(radius_px: float) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    return (np.hypot(yy - 15.5, xx - 15.5) < radius_px).astype(np.uint8)


def channel_radius(c: int) -> float:
    return 4.0 + 0.9 * c


def channel_pixel_mm(c: int) -> float:
    return 0.5 + 0.05 * c


@pytest.fixture(scope="module")
def distinct_channels(tmp_path_factory):
    """(dataset path, maps path, maps_up [N, 2, 32, 32]): channels with their own masks and pixel sizes."""
    folder = tmp_path_factory.mktemp("channels")
    rng = np.random.default_rng(7)
    mask = np.stack([disc(channel_radius(c)) for c in range(CHANNELS)])[None].repeat(N, 0)
    pixel_mm = np.array([channel_pixel_mm(c) for c in range(CHANNELS)], np.float32)[None].repeat(N, 0)
    y = np.array([0, 1, 0, 1])
    ds = Dataset(
        x=rng.random((N, CHANNELS, 32, 32), dtype=np.float32),
        y=y,
        fold=np.array([0, 0, 1, 1]),
        patient_id=np.array([f"P{i}" for i in range(N)], dtype=object),
        nodule_id=np.array([f"P{i}:1" for i in range(N)], dtype=object),
        mask=mask,
        pixel_mm=pixel_mm,
        characteristics=np.full((N, 8), 3.0, np.float32),
        reader_malignancy=np.full((N, 4), 3.0, np.float32),
        malignancy_mean=np.full(N, 3.0, np.float32),
        diameter_mm=np.full(N, 10.0, np.float32),
        attrs={
            "channels": CHANNELS,
            "n_folds": 2,
            "split": "patient",
            "seed": 0,
            "name": "D11C",
            "label_rule": {"min_readers": 3},
            "normalisation": {"hu_window": [-1000.0, 400.0]},
        },
    )
    dataset = write_dataset(folder / "d11c.h5", ds, provenance(source="channels that differ"))
    maps = (rng.random((N, 2, 32, 32)) ** 3 - 0.2).astype(np.float32)  # some negative evidence too
    path = write_maps(
        folder / "maps.h5",
        nodule_id=list(ds.nodule_id),
        maps=maps,
        maps_up=maps,
        prob=np.array([0.2, 0.8, 0.6, 0.4]),
        method="gradcam",
        arch="hand",
        source="test",
        prov=provenance(),
        y=y,
        dataset_identity=load_dataset(dataset).identity,
    )
    return dataset, path, maps


def expected_scores(maps_up: np.ndarray, channel: int, radius_mm: float) -> dict[str, np.ndarray]:
    """Shares, areas and enrichments of the malignant maps against ``channel``'s regions."""
    lab = brute_force_regions(disc(channel_radius(channel)), (channel_pixel_mm(channel),) * 2, radius_mm)
    m = np.clip(maps_up[:, 1].astype(np.float64), 0, None)
    out = {}
    for r, name in enumerate(S.REGIONS):
        area = (lab == r).mean()
        share = (m * (lab == r)).sum(axis=(1, 2)) / m.sum(axis=(1, 2))
        out[f"area_{name}"] = np.full(len(m), area)
        out[f"share_{name}"] = share
        out[f"enrichment_{name}"] = share / area
    return out


def test_fixture_channels_give_different_regions():
    regions = {c: brute_force_regions(disc(channel_radius(c)), (channel_pixel_mm(c),) * 2, 1.0) for c in (0, 5, 10)}
    assert all((regions[c] == 0).any() for c in regions)
    assert not np.array_equal(regions[0], regions[5]) and not np.array_equal(regions[5], regions[10])
    # The same mask at another pixel size gives another band too.
    other_size = brute_force_regions(disc(channel_radius(5)), (channel_pixel_mm(0),) * 2, 1.0)
    assert not np.array_equal(other_size, regions[5])


@pytest.mark.parametrize("channel", [None, 0, 3, 10])
def test_scores_use_the_mask_and_pixel_size_of_their_channel(distinct_channels, channel):
    dataset, path, maps = distinct_channels
    df = S.score_maps([path], dataset, radius_mm=1.0, channel=channel)
    used = 5 if channel is None else channel  # default: the centre slice of D11C
    assert (df["mask_channel"] == used).all() and df.attrs["mask_channel"] == used
    np.testing.assert_allclose(df["pixel_mm"], channel_pixel_mm(used), rtol=1e-6)
    for column, values in expected_scores(maps, used, 1.0).items():
        np.testing.assert_allclose(df[column], values, rtol=1e-9, atol=1e-12, err_msg=column)


def test_radius_fraction_uses_the_channels_own_equivalent_radius(distinct_channels):
    dataset, path, maps = distinct_channels
    df = S.score_maps([path], dataset, radius_frac=0.4, channel=7)
    pixels = disc(channel_radius(7)).sum()
    radius = 0.4 * np.sqrt(pixels * channel_pixel_mm(7) ** 2 / np.pi)
    np.testing.assert_allclose(df["radius_mm"], radius, rtol=1e-6)
    for column, values in expected_scores(maps, 7, radius).items():
        np.testing.assert_allclose(df[column], values, rtol=1e-6, err_msg=column)
