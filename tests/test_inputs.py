"""The input spec: the paper's Table 1 as numbers, stored, read back, derived for older files, compared."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nodulekit.errors import NodulekitError
from nodulekit.inputs import Channel, InputSpec, legacy_spec, model_input, paper_spec, stored_spec


def test_paper_layouts_are_table_1():
    assert [(c.z_offset_mm, c.p) for c in paper_spec(1).channels] == [(0.0, 2.0)]
    assert [(c.z_offset_mm, c.p) for c in paper_spec(3).channels] == [(0.0, 2.0), (0.0, 3.0), (0.0, 4.0)]
    assert [c.z_offset_mm for c in paper_spec(11).channels] == list(range(-5, 6))
    assert [c.z_offset_mm for c in paper_spec(21).channels] == list(range(-10, 11))
    spec = paper_spec(21)
    assert spec.hu_window == (-1000.0, 400.0) and spec.patch_px == 32 and len(spec.planes_mm) == 21
    assert (spec.window_diameters, spec.min_window_mm) == (4.5, 16.0)
    with pytest.raises(NodulekitError, match="--channels must be one of 1, 3, 11, 21"):
        paper_spec(5)


def test_stored_record_round_trips_through_json():
    for channels in (1, 3, 11, 21):
        spec = paper_spec(channels)
        assert InputSpec.from_dict(json.loads(spec.to_json())) == spec
        assert InputSpec.from_dict(spec.to_json()) == spec


def test_older_files_get_their_spec_from_their_old_fields():
    assert legacy_spec(11) == paper_spec(11)
    layout = [{"z_offset_mm": 0, "p": 2.0}, {"z_offset_mm": 0, "p": 3.0}, {"z_offset_mm": 0, "p": 4.0}]
    assert legacy_spec(3, layout, {"hu_window": [-1000.0, 400.0], "scale": "prose"}) == paper_spec(3)
    assert legacy_spec(3, None, {"hu_window": [-1200, 600]}).hu_window == (-1200.0, 600.0)
    assert legacy_spec(5) is None  # no layout and not a paper channel count: unknown
    assert stored_spec(None, 11, None, json.dumps({"hu_window": [-1000, 400]})) == paper_spec(11)
    assert stored_spec(paper_spec(1).as_dict(), 11) == paper_spec(1)  # a stored spec wins


def test_difference_names_the_numbers():
    d11 = paper_spec(11)
    assert d11.difference(paper_spec(11)) is None
    assert d11.difference(paper_spec(21)) == "11 channels vs 21"
    shifted = InputSpec(tuple(Channel(c.z_offset_mm + 1, 2.0) for c in d11.channels))
    assert (
        d11.difference(shifted) == "channel 0 is the plane at -5 mm with a 2 x diameter crop vs -4 mm with 2 x diameter"
    )
    wider = InputSpec(d11.channels, hu_window=(-1000.0, 600.0))
    assert d11.difference(wider) == "hu_window [-1000, 400] HU vs [-1000, 600] HU"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(schema="other/9"), "schema 'other/9' is not"),
        (lambda r: r.update(window_spacing="max"), "asks for window_spacing = 'max'"),
        (lambda r: r.update(in_plane_interpolation="bicubic"), "asks for in_plane_interpolation = 'bicubic'"),
        (lambda r: r["channels"][0].update(z_offset_mm=0.5), r"plane \+0.5 mm is not one of the window's planes"),
        (lambda r: r["channels"][0].update(p=4.5), r"crop side 4.5 x diameter does not fit the window"),
        (lambda r: r.pop("patch_px"), "its input spec is malformed"),
    ],
)
def test_a_spec_this_nodulekit_cannot_follow_is_one_line(change, message):
    record = paper_spec(3).as_dict()
    change(record)
    with pytest.raises(NodulekitError, match=message):
        InputSpec.from_dict(record, "m.onnx")


def test_model_input_follows_the_spec_numbers():
    """A spec with another HU window scales by it; one channel at +2 mm takes the plane 2 mm up."""
    hu = np.zeros((40, 40, 20), np.int16)
    hu[:, :, 12] = 200  # one slice 2 mm above the centre slice (1 mm slices)
    zvals = np.arange(20, dtype=float)
    up = InputSpec((Channel(0.0, 2.0), Channel(2.0, 2.0)), hu_window=(-200.0, 200.0))
    made = model_input(hu, zvals, (0.8, 0.8), (20.0, 20.0), 10.0, 6.0, up)
    assert made.x.shape == (2, 32, 32)
    np.testing.assert_allclose(made.x[0], 0.5)  # HU 0 in [-200, 200]
    np.testing.assert_allclose(made.x[1], 1.0)  # HU 200 at the top of the window
    assert made.centre_hu == 0.0 and made.filled_offsets_mm == []
