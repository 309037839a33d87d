"""Resampling conventions and the HU window, against values worked out in the test.

- Maps are resized to the 32x32 input grid bilinearly with half-pixel centres
  (``align_corners=False``): output pixel u of a map of side h samples the map at
  s = (u + 0.5) h / 32 - 0.5, clamped to [0, h - 1]. Linear interpolation reproduces a ramp
  exactly, so a ramp a i + b j + c must come back as a s_i + b s_j + c.
- Dataset inputs: HU clipped to [-1000, 400] *before* interpolation, scaled by
  (HU + 1000) / 1400; volumes reach far above (bone, contrast: > 400) and below (padding
  -2048, air -3000) the window.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nodulekit import maps as M
from nodulekit.datasets import channel_layout, normalise_hu, resample_nodule
from nodulekit.errors import DataError

torch.set_num_threads(1)


def half_pixel_coords(h: int, size: int = 32) -> np.ndarray:
    """Where each output pixel of a bilinear resize h -> size samples the input (align_corners=False)."""
    return np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)


def ramp(h: int, w: int, a: float, b: float, c: float) -> np.ndarray:
    i, j = np.mgrid[:h, :w]
    return a * i + b * j + c


def test_upsample_known_values_of_a_2x2_map():
    # s = (u + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped 0, 0.25, 0.75, 1 in both axes.
    m = np.array([[[[0.0, 1.0], [2.0, 3.0]]]], np.float32)
    expected = np.array(
        [
            [0.0, 0.25, 0.75, 1.0],
            [0.5, 0.75, 1.25, 1.5],
            [1.5, 1.75, 2.25, 2.5],
            [2.0, 2.25, 2.75, 3.0],
        ]
    )
    np.testing.assert_allclose(M.upsample(m, size=4)[0, 0], expected, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 16),
    w_extra=st.integers(0, 3),
    coef=st.tuples(*[st.floats(-5, 5, allow_nan=False) for _ in range(3)]),
    as_tensor=st.booleans(),
)
def test_upsample_reproduces_ramps_at_half_pixel_centres(h, w_extra, coef, as_tensor):
    a, b, c = coef
    w = h + w_extra
    maps = np.stack([ramp(h, w, a, b, c), ramp(h, w, -b, a, 1.0)])[None].astype(np.float32)  # [1, 2, h, w]
    out = M.upsample(torch.from_numpy(maps) if as_tensor else maps)
    assert isinstance(out, torch.Tensor) == as_tensor
    out = out.numpy() if as_tensor else out
    si, sj = half_pixel_coords(h)[:, None], half_pixel_coords(w)[None, :]
    scale = 1 + abs(a) * h + abs(b) * w + abs(c)
    np.testing.assert_allclose(out[0, 0], a * si + b * sj + c, atol=1e-5 * scale)
    np.testing.assert_allclose(out[0, 1], -b * si + a * sj + 1.0, atol=1e-5 * scale)


def test_normalise_hu_clips_to_the_window_above_and_below():
    hu = np.array([-3024, -2048, -1001, -1000, -300, 0, 399, 400, 401, 1200, 3071])
    expected = np.array([0, 0, 0, 0, 700 / 1400, 1000 / 1400, 1399 / 1400, 1, 1, 1, 1])
    out = normalise_hu(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("hot, cold", [(3000.0, -500.0), (-2048.0, 200.0)])
def test_resampling_clips_before_interpolating(hot, cold):
    """Columns alternate between a value outside the window and one inside: every output
    pixel lies between two columns, and must be the interpolation of the *clipped* values."""
    side, spacing, diameter = 41, 1.0, 13.0  # D1C: patch side 2 x 13 = 26 mm, 26/32 mm per pixel
    cols = np.arange(side)
    plane = np.where(cols % 2 == 0, hot, cold)[None, :].repeat(side, 0)
    hu = np.broadcast_to(plane, (21, side, side)).astype(np.float64)
    x, _, pixel_mm = resample_nodule(hu, np.zeros_like(hu, np.uint8), (spacing, spacing), diameter, channel_layout(1))
    assert pixel_mm[0] == pytest.approx(26 / 32)
    # Output column j samples input column c = 20 + (j + 0.5 - 16) * 26/32 (the window centre is 20).
    c = 20 + (np.arange(32) + 0.5 - 16) * 26 / 32
    lo = np.floor(c).astype(int)
    frac = c - lo

    def window(v):
        return (min(max(v, -1000.0), 400.0) + 1000.0) / 1400.0

    value = np.array([window(hot), window(cold)])
    left, right = value[lo % 2], value[(lo + 1) % 2]
    expected = (1 - frac) * left + frac * right
    np.testing.assert_allclose(x[0], np.broadcast_to(expected, (32, 32)), atol=1e-6)
    assert x.min() >= 0 and x.max() <= 1


def test_mask_is_kept_where_the_resampled_mask_reaches_one_half():
    """docs/build.md: the mask is resampled linearly and kept where >= 0.5. With a 16 mm nodule
    at 1 mm pixels, D1C's output column j samples input column j + 4.5; the mask holds
    columns 0..19, so column 15 samples exactly half mask, half background, and is kept."""
    side = 41
    mask = np.zeros((21, side, side), np.uint8)
    mask[:, :, :20] = 1
    _, m, _ = resample_nodule(np.zeros(mask.shape), mask, (1.0, 1.0), 16.0, channel_layout(1))
    expected = np.zeros((32, 32), np.uint8)
    expected[:, :16] = 1
    np.testing.assert_array_equal(m[0], expected)


@pytest.mark.parametrize("diameter, fits", [(17.0, True), (17.5, False)])
def test_a_window_even_half_a_pixel_too_small_is_refused(diameter, fits):
    """33 px window at 1 mm, centre 16: D1C's outermost sample lies 15.5 x 2d/32 px from the
    centre, and may reach at most half a pixel beyond the last pixel (32.5): d <= 17.03 mm."""
    hu = np.zeros((21, 33, 33))
    args = (hu, np.zeros(hu.shape, np.uint8), (1.0, 1.0), diameter, channel_layout(1))
    if fits:
        resample_nodule(*args)
    else:
        with pytest.raises(DataError, match="smaller than the 35.0 mm patch"):
            resample_nodule(*args)
