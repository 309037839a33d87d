"""benchmarks/fill_fractions.py: the edge-replicated shares of built datasets, on hand-made VOIs."""

from __future__ import annotations

import numpy as np
import pytest
from test_datasets import write_rois
from test_evaluation import load_benchmark

from nodulekit.datasets import build_dataset

fill_fractions = load_benchmark("fill_fractions")


def test_fill_shares_of_d11c_and_d21c(tmp_path):
    """Two nodules whose VOI lacks offsets beyond +-7 mm (and -10, -9 below), two lacking beyond +-4 mm."""
    diameter, spacing, side = 12.0, 0.5, 109
    z = (np.arange(21) - 10.0)[:, None, None]
    yy = ((np.arange(side) - 54) * spacing)[None, :, None]
    xx = ((np.arange(side) - 54) * spacing)[None, None, :]
    mask = (z**2 + yy**2 + xx**2 <= (diameter / 2) ** 2).astype(np.uint8)
    hu = np.where(mask, 40, -800).astype(np.int16)
    wide = [-10.0, -9.0, -8.0, 8.0, 9.0, 10.0]  # 6 of 21 slices copied, none within +-5
    tight = [float(v) for v in range(-10, 11) if abs(v) >= 5]  # 12 of 21 copied, +-5 among them
    nodules = [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=diameter, spacing=spacing, hu=hu, mask=mask,
             attrs={"z_filled_offsets_mm": wide if i < 2 else tight})
        for i in range(4)
    ]  # fmt: skip
    rois = write_rois(tmp_path / "r.h5", nodules)
    d11 = build_dataset(rois, tmp_path / "d11.h5", channels=11, n_folds=2, progress=False)
    d21 = build_dataset(rois, tmp_path / "d21.h5", channels=21, n_folds=2, progress=False)
    r11, r21 = fill_fractions.fill_fractions(d11), fill_fractions.fill_fractions(d21)
    # D11C (offsets -5..+5): only the tight nodules' +-5 are copies: 2 x 2 of 4 x 10 extra slices
    assert r11["z_filled_share_non_centre_channels"] == pytest.approx(4 / 40)
    assert r11["z_filled_share_all_channels"] == pytest.approx(4 / 44)
    # D21C: 2 x 6 + 2 x 12 copied of 4 x 20 extra slices (the centre is never a copy)
    assert r21["z_filled_share_non_centre_channels"] == pytest.approx(36 / 80)
    assert r21["z_filled_share_all_channels"] == pytest.approx(36 / 84)
    assert r21["nodules_with_any_z_filled"] == 4 and r11["nodules_with_any_z_filled"] == 2
    text = fill_fractions.markdown([r11, r21])
    assert "10.0 % of the non-centre channels" in text and "45.0 % of the non-centre channels" in text
