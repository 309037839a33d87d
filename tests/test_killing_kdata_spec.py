"""model_input near a scan's last slice (which channels are filled), and the input spec's stored
record: refusals word for word, and the specs of files older than stored specs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nodulekit.errors import NodulekitError
from nodulekit.inputs import model_input, paper_spec
from nodulekit.inputs.spec import Channel, InputSpec, legacy_spec, stored_spec


def _scan():
    rng = np.random.default_rng(2)
    hu = rng.integers(-900, -700, (50, 40, 12)).astype(np.int16)
    hu[20:30, 15:25, 8:12] = 50
    return hu, -20.0 + 2.0 * np.arange(12)  # z -20..2 mm


def test_channels_beyond_the_last_slice_are_named_and_the_centre_hu_is_its_pixel():
    hu, z = _scan()
    labels = np.zeros(hu.shape, np.uint8)
    labels[20:30, 15:25, 8:12] = 1
    # centre at z -4.5 mm: planes from +7 mm on (z 2.5..) lie past the last slice (z 2)
    got = model_input(hu, z, (0.7, 0.6), (24.6, 19.4), -4.5, 5.0, paper_spec(21), labels, (0, 0, 0), "n")
    assert got.filled_offsets_mm == [7.0, 8.0, 9.0, 10.0]
    assert got.window["z_filled_offsets_mm"] == [7.0, 8.0, 9.0, 10.0]
    assert paper_spec(11).channels[-1].z_offset_mm == 5.0
    d11 = model_input(hu, z, (0.7, 0.6), (24.6, 19.4), -4.5, 5.0, paper_spec(11), labels)
    assert d11.filled_offsets_mm == [] and d11.x.shape == (11, 32, 32) and d11.mask.any()
    # the centre pixel: row 25, column 19 (rounded), z -4.5 between slices 7 (-6 mm) and 8 (-4 mm)
    expected = np.rint(0.25 * hu[25, 19, 7] + 0.75 * hu[25, 19, 8])
    assert got.centre_hu == expected
    # the window: 4.5 x 5 mm over the smaller spacing 0.6 mm = 37.5 -> 38 -> 39 px (odd), half 19
    assert got.window["window_origin_rc"] == (25 - 19, 19 - 19)
    np.testing.assert_allclose(got.pixel_mm, [2 * 5.0 / 32] * 21)
    unlabelled = model_input(hu, z, (0.7, 0.6), (24.6, 19.4), -4.5, 5.0, paper_spec(1))
    assert not unlabelled.mask.any() and unlabelled.mask.shape == (1, 32, 32)


def test_from_dict_refusals_word_for_word():
    good = paper_spec(3).as_dict()
    assert InputSpec.from_dict(json.dumps(good)) == paper_spec(3)
    cases = [
        ("{x", "f: input_spec is not valid JSON"),
        ([1, 2], "f: input spec schema 'list' is not 'nodulekit-input-spec/1'; update nodulekit"),
        (
            {**good, "schema": "other/2"},
            "f: input spec schema 'other/2' is not 'nodulekit-input-spec/1'; update nodulekit",
        ),
        (
            {**good, "hu_rounding": "floor"},
            "f: its input spec asks for hu_rounding = 'floor'; this nodulekit builds inputs only with hu_rounding = 'half_to_even'",
        ),
        ({k: v for k, v in good.items() if k != "patch_px"}, "f: its input spec is malformed"),
        ({**good, "hu_window": [-1000]}, "f: its input spec is malformed"),
        ({**good, "channels": [{"p": 2}]}, "f: its input spec is malformed"),
    ]
    for record, message in cases:
        with pytest.raises(NodulekitError) as err:
            InputSpec.from_dict(record, "f")
        assert str(err.value) == message
    spec = InputSpec.from_dict({**good, "patch_px": "64", "min_window_mm": 20, "window_diameters": 5})
    assert spec.patch_px == 64 and spec.min_window_mm == 20.0 and spec.window_diameters == 5.0


def test_spec_checks_word_for_word():
    with pytest.raises(NodulekitError, match=r"^an input spec needs at least one channel$"):
        InputSpec(())
    with pytest.raises(NodulekitError) as err:
        InputSpec((Channel(0.0, 2.0), Channel(11.0, 2.0)))
    assert (
        str(err.value)
        == "input spec channel 1: plane +11 mm is not one of the window's planes (-10..+10 mm, 1 mm apart)"
    )
    with pytest.raises(NodulekitError) as err:
        InputSpec((Channel(0.0, 4.01),))
    assert str(err.value) == (
        "input spec channel 0: crop side 4.01 x diameter does not fit the window (4.5 x diameter; p must be in (0, 4])"
    )
    InputSpec((Channel(0.0, 4.0),))  # the largest crop that fits
    with pytest.raises(NodulekitError, match="crop side 0 x diameter"):
        InputSpec((Channel(0.0, 0.0),))
    with pytest.raises(NodulekitError) as err:
        InputSpec((Channel(0.0, 2.0),), hu_window=(400.0, 400.0))
    assert str(err.value) == "input spec HU window [400.0, 400.0] is empty"


def test_older_files_specs():
    assert legacy_spec(11) == paper_spec(11)
    assert legacy_spec(5) is None
    layout = [{"z_offset_mm": -1, "p": 2}, {"z_offset_mm": 1, "p": 3}]
    spec = legacy_spec(5, layout, {"hu_window": [-900, 300]})
    assert spec.channels == (Channel(-1.0, 2.0), Channel(1.0, 3.0)) and spec.hu_window == (-900.0, 300.0)
    assert legacy_spec(3, [{"p": 2}]) is None
    assert legacy_spec(1, None, {"hu_window": None}).hu_window == (-1000.0, 400.0)
    assert legacy_spec(1, [{"z_offset_mm": 30, "p": 2}]) is None  # not a plane of the window
    assert stored_spec(paper_spec(1).as_dict(), 3) == paper_spec(1)
    assert stored_spec("unknown", 3) == paper_spec(3)
    assert stored_spec(None, 1, None, json.dumps({"hu_window": [-500, 500]})).hu_window == (-500.0, 500.0)
    assert stored_spec(None, 1, None, "{not json").hu_window == (-1000.0, 400.0)
    with pytest.raises(NodulekitError, match=r"^run.json: input spec schema"):
        stored_spec({"schema": "x"}, 1, where="run.json")


def test_differences_in_numbers():
    a = paper_spec(3)
    assert a.difference(paper_spec(3)) is None
    assert a.difference(paper_spec(1)) == "3 channels vs 1"
    b = InputSpec((Channel(0.0, 2.0), Channel(0.0, 3.0), Channel(1.0, 4.0)))
    assert a.difference(b) == "channel 2 is the plane at +0 mm with a 4 x diameter crop vs +1 mm with 4 x diameter"
    c = InputSpec(a.channels, hu_window=(-1000.0, 500.0))
    assert a.difference(c) == "hu_window [-1000, 400] HU vs [-1000, 500] HU"
    assert a.difference(InputSpec(a.channels, patch_px=64)) == "patch_px 32 px vs 64 px"
    assert a.difference(InputSpec(a.channels, min_window_mm=20.0)) == "min_window_mm 16 mm vs 20 mm"
    assert (
        a.difference(InputSpec(a.channels, window_diameters=5.0)) == "window_diameters 4.5 x diameter vs 5 x diameter"
    )
    assert a.reference_channel == 0 and a.name == "D3C" and a.centre_plane == 10 and a.plane_index(2) == 10
