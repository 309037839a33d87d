"""nodulekit.maps.write_run_maps on hand-made maps (no model): every provenance key and every
array of the ``maps`` artifact read back, with and without per-slice maps."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit import maps as M
from nodulekit.artifacts import read_maps
from nodulekit.errors import NodulekitError


def run_maps(extra=None):
    rng = np.random.default_rng(3)
    return M.RunMaps(
        nodule_id=["P1:1", "P2:1"],
        rows=np.array([4, 0]),
        maps=rng.random((2, 2, 4, 4)).astype(np.float32),
        maps_up=rng.random((2, 2, 32, 32)).astype(np.float32),
        prob=np.array([0.25, 0.75]),
        y=np.array([0, 1]),
        fold=np.array([2, 0]),
        method="cam",
        arch="tiny-cam",
        dataset="data/../data/d.h5",
        label_rule={"malignant_above": 3},
        extra=extra or {},
        execution={"device": "cpu", "batch_size": 8},
        dataset_identity={"fingerprint": "abc"},
    )


def test_write_run_maps_records_what_was_mapped_and_how(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_maps()
    out = M.write_run_maps(res, tmp_path / "m.h5", rundir="runs/../runs/r1")
    back = read_maps(out)
    prov = back.provenance
    assert prov["stage"] == "maps"
    assert prov["rundir"] == str((tmp_path / "runs" / "r1").resolve())
    assert prov["dataset"] == str((tmp_path / "data" / "d.h5").resolve())
    assert prov["method"] == "cam" and prov["description"] == M.get_method("cam").description
    assert prov["label_rule"] == {"malignant_above": 3}
    assert prov["class_index"] == {"benign": 0, "malignant": 1}
    assert prov["map_model"] == "each nodule's map comes from the fold model that had it in its test fold"
    assert prov["per_slice"] is False and prov["execution"] == {"device": "cpu", "batch_size": 8}
    assert back.nodule_id == ["P1:1", "P2:1"] and (back.method, back.arch) == ("cam", "tiny-cam")
    assert back.source == str((tmp_path / "runs" / "r1").resolve())
    np.testing.assert_array_equal(back.maps, res.maps)
    np.testing.assert_array_equal(back.maps_up, res.maps_up)
    np.testing.assert_allclose(back.prob, [0.25, 0.75])
    assert back.y.tolist() == [0, 1] and back.fold.tolist() == [2, 0] and back.extra == {}
    assert back.dataset_identity == {"fingerprint": "abc"}
    with pytest.raises(NodulekitError, match="already exists"):
        M.write_run_maps(res, out, rundir="runs/r1")  # no overwrite unless asked
    M.write_run_maps(res, out, rundir="runs/r1", overwrite=True)
    sliced = M.write_run_maps(run_maps({"slice_maps": np.zeros((2, 3, 2, 4, 4))}), tmp_path / "s.h5", rundir="r")
    back = read_maps(sliced)
    assert back.provenance["per_slice"] is True and back.extra["slice_maps"].shape == (2, 3, 2, 4, 4)
