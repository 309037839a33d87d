"""build and the dataset file against hand computations: a rois nodule whose rows and columns have
different spacings on an HU ramp (every output pixel known), fill flags from rounded offsets, each
refusal's text, the identity record recomputed from its definition, and a dataset file read back
member by member."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from nodulekit import datasets
from nodulekit.datasets import (
    Dataset,
    assign_folds,
    build_dataset,
    check_identity,
    dataset_identity,
    identity_difference,
    load_dataset,
    replicated_border,
    write_dataset,
)
from nodulekit.errors import ArtifactError, DataError, NodulekitError
from tests.test_datasets import write_rois

SY, SX = 0.5, 0.8  # row, column spacing (mm)
SIDE = 61
DIAMETER = 6.0  # D3C needs 4 x 6 = 24 mm: 48 rows of 0.5 mm, 30 columns of 0.8 mm
CENTRE = (30.4, 29.7)  # the nodule's sub-pixel centre in the window (row, column)


def _ramp_window() -> np.ndarray:
    """HU [21, S, S] = -500 + 20 mm-1 x y - 15 mm-1 x x + 10 x plane (inside the HU window)."""
    z, r, c = np.meshgrid(np.arange(21), np.arange(SIDE), np.arange(SIDE), indexing="ij")
    return np.rint(-500.0 + 20.0 * r * SY - 15.0 * c * SX + 10.0 * z).astype(np.int16)


def _sphere_mask() -> np.ndarray:
    z, r, c = np.meshgrid(np.arange(21) - 10.0, np.arange(SIDE) - 30.0, np.arange(SIDE) - 30.0, indexing="ij")
    return ((z**2 + (r * SY) ** 2 + (c * SX) ** 2) <= (DIAMETER / 2) ** 2).astype(np.uint8)


def _nodules(n=4, **attrs) -> list[dict]:
    hu, mask = _ramp_window(), _sphere_mask()
    base = {"pixel_spacing_mm": [SY, SX], "source_slice_spacing_mm": 1.25, **attrs}
    return [
        dict(patient=f"P{i}", cluster=1, label=i % 2, diameter=DIAMETER, spacing=[SY, SX], hu=hu, mask=mask, attrs=base)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def aniso(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aniso")
    attrs = {"z_filled_offsets_mm": [-10.2, 9.6, 4.4], "centre_in_window": list(CENTRE)}
    rois = write_rois(folder / "r.h5", _nodules(**attrs))
    return rois, load_dataset(build_dataset(rois, folder / "d3.h5", channels=3, n_folds=2, seed=3, progress=False))


def test_channels_follow_the_ramp_with_each_axis_at_its_own_spacing(aniso):
    _, ds = aniso
    for c, p in enumerate((2, 3, 4)):
        step = p * DIAMETER / 32
        offsets = (np.arange(32) + 0.5 - 16) * step
        ys, xs = CENTRE[0] + offsets / SY, CENTRE[1] + offsets / SX  # window rows, columns
        hu = -500.0 + 20.0 * ys[:, None] * SY - 15.0 * xs[None, :] * SX + 10.0 * 10
        # the window's HU are rounded to whole numbers: a bilinear mix of them is within 0.5 HU
        np.testing.assert_allclose(ds.x[0, c], (hu + 1000) / 1400, atol=0.5 / 1400 + 1e-6)
        assert ds.pixel_mm[0, c] == pytest.approx(step)
    # the sphere: its centre slice's disk has radius 3 mm, so p = 2 puts it in a 12 mm patch
    yy, xx = np.mgrid[:32, :32]
    d = np.hypot((yy + 0.5 - 16) * 12 / 32, (xx + 0.5 - 16) * 12 / 32)
    agree = ds.mask[0, 0] == (d <= 3.0)
    assert agree.mean() > 0.97  # linear resampling of a voxelised disk: only its rim may differ
    assert ds.extras["pixel_spacing_mm"].tolist() == [SY] * 4  # the smaller spacing
    assert ds.extras["slice_spacing_mm"].tolist() == [1.25] * 4
    assert ds.extras["centre_hu"][0] == _ramp_window()[10, 30, 30]


def test_filled_offsets_are_rounded_to_whole_millimetres(tmp_path, aniso):
    _, d3 = aniso
    assert d3.filled_channels.sum() == 0  # D3C uses the 0 mm plane only
    rois = write_rois(tmp_path / "r.h5", _nodules(z_filled_offsets_mm=[-10.2, 9.6, 4.4]))
    d21 = load_dataset(build_dataset(rois, tmp_path / "d21.h5", channels=21, n_folds=2, progress=False))
    expected = np.zeros(21, np.uint8)
    expected[[0, 14, 20]] = 1  # -10, +4 and +10 mm
    np.testing.assert_array_equal(d21.filled_channels, np.tile(expected, (4, 1)))
    rois = write_rois(tmp_path / "e.h5", _nodules(z_filled_offsets_mm=[]))
    d11 = load_dataset(build_dataset(rois, tmp_path / "d11.h5", channels=11, n_folds=2, progress=False))
    assert d11.filled_channels.shape == (4, 11) and d11.filled_channels.sum() == 0


def test_the_dataset_records_how_it_was_built(aniso):
    rois, ds = aniso
    a = ds.attrs
    assert a["name"] == "D3C" and a["channels"] == 3 and a["n_folds"] == 2 and a["seed"] == 3
    assert a["split"] == "patient" and a["split_note"] == datasets.SPLIT_NOTES["patient"]
    assert a["source"] == str(rois) and a["rois_source"] == "synthetic"
    assert a["consensus_level"] == 0.5 and a["consensus_definition"] == "agreement / 3 >= 0.5"
    assert a["channel_layout"] == [
        {"z_offset_mm": 0, "p": 2.0},
        {"z_offset_mm": 0, "p": 3.0},
        {"z_offset_mm": 0, "p": 4.0},
    ]
    assert a["normalisation"] == datasets.NORMALISATION
    prov = a["provenance"]
    assert prov["stage"] == "build" and prov["name"] == "D3C" and prov["source_kind"] == "rois"
    assert prov["seed"] == 3 and prov["n_folds"] == 2 and prov["split"] == "patient" and prov["channels"] == 3
    assert prov["source_sha256"] == hashlib.sha256(rois.read_bytes()).hexdigest()
    assert prov["consensus_level"] == 0.5 and prov["inplane_fill_undetermined"] == []
    assert prov["source_provenance"]["source"] == "synthetic rois for tests"
    assert ds.split_indices(1)[1].tolist() == np.flatnonzero(ds.fold == 1).tolist()
    np.testing.assert_array_equal(ds.consensus_min_readers, [2, 2, 2, 2])
    assert ds.extras["series_uid"].tolist() == ["1.2.3.P0", "1.2.3.P1", "1.2.3.P2", "1.2.3.P3"]
    assert ds.extras["n_readers"].tolist() == [3] * 4 and ds.extras["cluster_index"].tolist() == [1] * 4
    with h5py.File(ds.path) as f:
        assert f["mask"].attrs["meaning"] == ("the readers' consensus at level 0.5: agreement >= consensus_min_readers")
        assert f["agreement"].attrs["meaning"] == "readers marking the pixel; " + datasets.NORMALISATION["agreement"]
        assert f["filled_channels"].attrs["meaning"] == datasets.FILL_MEANINGS["filled_channels"]
        assert f["inplane_filled_channels"].attrs["meaning"] == datasets.FILL_MEANINGS["inplane_filled_channels"]
        assert f["mask"].compression == "gzip" and f["agreement"].compression == "gzip"
        assert f["x"].dtype == np.float32 and f["fold"].dtype == np.int64 and f["pixel_mm"].dtype == np.float32


def _group_attr_rois(tmp_path, name="r.h5", **attrs):
    return write_rois(tmp_path / name, _nodules(**attrs))


@pytest.mark.parametrize(
    "attrs, message",
    [
        (
            {"pixel_spacing_mm": [0.5, -0.8]},
            "nodule P0:1: invalid pixel_spacing_mm array([ 0.5, -0.8]) in the rois file",
        ),
        ({"pixel_spacing_mm": [0.5, 0.8, 0.8]}, "nodule P0:1: invalid pixel_spacing_mm"),
        ({"pixel_spacing_mm": np.nan}, "nodule P0:1: invalid pixel_spacing_mm"),
        ({"centre_in_window": [30.0]}, "nodule P0:1: invalid centre_in_window array([30.])"),
        ({"centre_in_window": [30.0, np.inf]}, "nodule P0:1: invalid centre_in_window"),
        ({"z_step_mm": 2.0}, "nodule P0:1: z_step_mm is 2.0, the datasets need 1 mm slices"),
    ],
)
def test_bad_nodule_attributes_are_one_line_data_errors(tmp_path, attrs, message):
    rois = _group_attr_rois(tmp_path, **attrs)
    with pytest.raises(DataError) as err:
        build_dataset(rois, tmp_path / "d.h5", channels=1, n_folds=2, progress=False)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "d.h5").exists()


def test_a_window_too_small_names_the_nodule(tmp_path):
    rois = _group_attr_rois(tmp_path, pixel_spacing_mm=[0.3, 0.3])  # 61 x 0.3 mm = 18.3 mm < 24 mm
    with pytest.raises(DataError) as err:
        build_dataset(rois, tmp_path / "d.h5", channels=3, n_folds=2, progress=False)
    assert str(err.value) == (
        "nodule P0:1: its rois window (61x61 px at 0.3x0.3 mm = 18.3x18.3 mm) is smaller than the 24.0 mm patch "
        "this dataset needs"
    )


def test_a_scalar_spacing_and_a_z_step_within_a_micrometre_are_accepted(tmp_path):
    rois = _group_attr_rois(tmp_path, pixel_spacing_mm=0.5, z_step_mm=1.0000005)
    ds = load_dataset(build_dataset(rois, tmp_path / "d.h5", channels=1, n_folds=2, progress=False))
    assert ds.extras["pixel_spacing_mm"].tolist() == [0.5] * 4


def _edit_rois(tmp_path, edit, name="r.h5"):
    rois = write_rois(tmp_path / name, _nodules())
    with h5py.File(rois, "r+") as f:
        edit(f)
    return rois


@pytest.mark.parametrize(
    "edit, kind, message",
    [
        (
            lambda f: f["nodules"].__delitem__("P1_1"),
            ArtifactError,
            "r.h5: group /nodules/P1_1 for nodule P1:1 is missing",
        ),
        (lambda f: f["nodules/P0_1"].__delitem__("mask"), ArtifactError, "r.h5: /nodules/P0_1 lacks hu or mask"),
        (lambda f: f["nodules/P0_1"].__delitem__("hu"), ArtifactError, "r.h5: /nodules/P0_1 lacks hu or mask"),
        (
            lambda f: f["nodules/P0_1"].__delitem__("agreement"),
            ArtifactError,
            "r.h5: nodule P0:1 has no readers' agreement map",
        ),
        (
            lambda f: f["nodules/P0_1"].attrs.__delitem__("consensus_min_readers"),
            ArtifactError,
            "r.h5: nodule P0:1 has no readers' agreement map (a rois file from before the readers' consensus); "
            "re-run nodulekit extract",
        ),
        (
            lambda f: (
                f["nodules/P2_1"].__delitem__("hu"),
                f["nodules/P2_1"].create_dataset("hu", data=np.zeros((20, 61, 61))),
            ),
            DataError,
            "nodule P2:1: hu has shape (20, 61, 61), expected [21, S, S]",
        ),
        (
            lambda f: f["nodules/P3_1/agreement"].__setitem__((10, 0, 0), 2),
            ArtifactError,
            "r.h5: nodule P3:1: mask is not agreement >= 2; a corrupt rois file",
        ),
        (
            lambda f: f.attrs.__delitem__("label_rule"),
            ArtifactError,
            "r.h5 has no label_rule attribute; re-run nodulekit extract",
        ),
        (
            lambda f: f.attrs.__setitem__("label_rule", "{not json"),
            ArtifactError,
            "r.h5: its label_rule attribute is not valid JSON",
        ),
        (
            lambda f: f.attrs.__delitem__("consensus_level"),
            ArtifactError,
            "r.h5 has no readers' consensus (made before consensus masks); re-run nodulekit extract",
        ),
        (lambda f: f["diameter_mm"].__setitem__(2, 0.0), DataError, "r.h5: nodule P2:1 has invalid diameter_mm 0.0"),
        (lambda f: f["diameter_mm"].__setitem__(1, np.nan), DataError, "r.h5: nodule P1:1 has invalid diameter_mm nan"),
        (
            lambda f: f["label"].__setitem__(3, 2),
            DataError,
            "r.h5: nodule P3:1 has label 2; a rois file must hold only labelled nodules (1 malignant, 0 benign)",
        ),
    ],
)
def test_bad_rois_files_are_one_line_errors(tmp_path, edit, kind, message):
    rois = _edit_rois(tmp_path, edit)
    with pytest.raises(kind) as err:
        build_dataset(rois, tmp_path / "d.h5", channels=1, n_folds=2, progress=False)
    assert str(err.value).replace(str(tmp_path) + "/", "").startswith(message)
    assert not (tmp_path / "d.h5").exists()


def _replace(f, name, data):
    del f[name]
    f[name] = data


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda f: _replace(f, "patient_id", np.array([b"P0", b"P1", b"P2"])),
            "patient_id has shape (3,), expected (4,)",
        ),
        (lambda f: _replace(f, "malignancy_mean", np.zeros(5)), "malignancy_mean has shape (5,), expected (4,)"),
        (
            lambda f: _replace(f, "reader_malignancy", np.zeros((4, 3))),
            "reader_malignancy has shape (4, 3), expected (4, 4)",
        ),
        (
            lambda f: _replace(f, "characteristics", np.zeros((4, 7))),
            "characteristics has shape (4, 7), expected (4, 8)",
        ),
        (lambda f: _replace(f, "nodule_id", np.array([b"A", b"B", b"A", b"C"])), "nodule_id has duplicates"),
        (lambda f: _replace(f, "nodule_id", np.array([], "S1")), "holds no nodules"),
    ],
)
def test_a_rois_table_of_the_wrong_shape_is_refused(tmp_path, edit, message):
    rois = _edit_rois(tmp_path, edit)
    with pytest.raises((ArtifactError, DataError)) as err:
        build_dataset(rois, tmp_path / "d.h5", channels=1, n_folds=2, progress=False)
    assert str(err.value) == f"{rois}: {message}" or str(err.value) == f"{rois} {message}"


def test_the_rois_table_defaults_characteristic_names_and_casts_labels(tmp_path):
    rois = _edit_rois(tmp_path, lambda f: f["characteristics"].attrs.__delitem__("names"))
    from nodulekit.artifacts import open_artifact

    with open_artifact(rois, "rois") as f:
        table = datasets.read_rois_table(f)
    assert table["characteristic_names"] == list(datasets.CHARACTERISTICS)
    assert table["y"].dtype == np.int64 and table["y"].tolist() == [0, 1, 0, 1]
    assert table["diameter_mm"].dtype == np.float64 and table["characteristics"].dtype == np.float32
    assert table["series_uid"] == ["1.2.3.P0", "1.2.3.P1", "1.2.3.P2", "1.2.3.P3"]
    assert sorted(table["extras"]) == ["cluster_index", "n_readers", "reader_characteristics"]
    assert json.loads(table["label_rule"])["min_readers"] == 3


def test_the_output_may_not_be_the_input(tmp_path):
    rois = write_rois(tmp_path / "r.h5", _nodules())
    with pytest.raises(NodulekitError) as err:
        build_dataset(rois, rois, channels=1, n_folds=2, overwrite=True, progress=False)
    assert str(err.value) == f"the output {rois} would overwrite the input rois file"
    with pytest.raises(NodulekitError, match=r"^--folds must be at least 2 \(got 1\)$"):
        build_dataset(rois, tmp_path / "d.h5", channels=1, n_folds=1, progress=False)
    with pytest.raises(NodulekitError, match=r"^--split must be 'patient' or 'nodule' \(got 'x'\)$"):
        build_dataset(rois, tmp_path / "d.h5", channels=1, split="x", progress=False)


# ----------------------------------------------------------------------------- folds


def test_folds_refusals_word_for_word():
    y = np.array([0, 1] * 6)
    pid = np.arange(12).astype(str)
    cases = [
        (dict(split="x"), "--split must be 'patient' or 'nodule' (got 'x')"),
        (dict(n_folds=1), "--folds must be at least 2 (got 1)"),
        (dict(n_folds=13), "only 12 nodules for 13 folds; use fewer --folds or more data"),
        (dict(n_folds=7), "only 6 benign nodules, fewer than the 7 folds; use fewer --folds or more data"),
    ]
    for kwargs, message in cases:
        with pytest.raises(NodulekitError) as err:
            assign_folds(y, pid, **kwargs)
        assert str(err.value) == message
    with pytest.raises(NodulekitError) as err:
        assign_folds(y, np.repeat(["a", "b", "c"], 4), n_folds=4)
    assert str(err.value) == "only 3 patients for 4 patient-grouped folds; use fewer --folds or more data"
    # exactly as many of each class as folds, and as many patients as folds, is enough
    fold = assign_folds(np.array([0, 1, 0, 1]), np.array(["a", "a", "b", "b"]), n_folds=2, seed=0)
    assert sorted(fold.tolist()) == [0, 0, 1, 1] and fold[0] == fold[1] and fold[2] == fold[3]
    fold = assign_folds(np.array([0, 1, 0, 1]), np.array(["a", "b", "c", "d"]), n_folds=2, seed=0, split="nodule")
    assert sorted(fold.tolist()) == [0, 0, 1, 1]


def test_a_fold_of_one_class_is_refused_naming_it():
    # two patients, each of one class: a patient fold holds one class only
    with pytest.raises(NodulekitError) as err:
        assign_folds(np.array([0, 0, 1, 1]), np.array(["a", "a", "b", "b"]), n_folds=2)
    assert str(err.value).endswith(
        "has only one class with 2 patient folds; use fewer --folds (or another --seed)"
    ) and str(err.value).startswith("test fold ")


def test_folds_are_seeded_and_the_split_kinds_differ():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    y[:10] = [0, 1] * 5
    pid = np.repeat(np.arange(20).astype(str), 3)
    a = assign_folds(y, pid, n_folds=4, seed=1)
    assert np.array_equal(a, assign_folds(y, pid, n_folds=4, seed=1))
    assert not np.array_equal(a, assign_folds(y, pid, n_folds=4, seed=2))
    for p in np.unique(pid):
        assert len(set(a[pid == p])) == 1
    b = assign_folds(y, pid, n_folds=4, seed=1, split="nodule")
    assert any(len(set(b[pid == p])) > 1 for p in np.unique(pid))  # the leaky split ignores patients
    assert sorted(set(a.tolist())) == [0, 1, 2, 3] == sorted(set(b.tolist()))


# ----------------------------------------------------------------------------- the border and its flags


def test_replicated_border_by_hand():
    rng = np.random.default_rng(1)
    core = rng.integers(-900, 100, (2, 5, 6))
    padded = np.pad(core, ((0, 0), (2, 1), (0, 3)), mode="edge")  # 8 x 9
    assert replicated_border(padded) == (2, 6, 0, 5)
    assert replicated_border(core) == (0, 4, 0, 5)
    flat = np.zeros((2, 4, 5))
    assert replicated_border(flat) == (0, 3, 0, 4)  # nothing varies: nothing to call a border
    rows_only = np.tile(np.arange(4)[None, :, None], (2, 1, 5))  # columns all equal, rows vary
    assert replicated_border(rows_only) == (0, 3, 0, 4)


def test_inplane_flags_at_half_a_pixel_from_the_border():
    coords = np.zeros((3, 2, 2, 2))
    coords[1, 0] = [[1.5, 1.5], [4.5, 4.5]]  # rows: exactly half a pixel outside rows 2..4
    coords[2, 0] = [[3.0, 3.0], [3.0, 3.0]]
    coords[1, 1] = [[1.49, 2.0], [2.0, 2.0]]  # a little further
    coords[2, 1] = [[3.0, 3.0], [3.0, 3.0]]
    rect = (2, 4, 1, 5)
    assert datasets._inplane_filled_channels(coords, rect).tolist() == [0, 1]
    coords[1] = 3.0
    coords[2, 0] = 0.5  # columns: half a pixel outside column 1
    coords[2, 1] = 5.51
    assert datasets._inplane_filled_channels(coords, rect).tolist() == [0, 1]
    coords[2, 1] = 5.5
    assert datasets._inplane_filled_channels(coords, rect).tolist() == [0, 0]


# ----------------------------------------------------------------------------- the file and its identity


def _tiny(n=6, c=2) -> Dataset:
    rng = np.random.default_rng(4)
    return Dataset(
        x=rng.uniform(0, 1, (n, c, 32, 32)).astype(np.float32),
        y=np.array([0, 1] * (n // 2), np.int64),
        fold=np.arange(n, dtype=np.int64) % 3,
        patient_id=np.array([f"P{i // 2}" for i in range(n)], object),
        nodule_id=np.array([f"P{i // 2}:{i % 2 + 1}" for i in range(n)], object),
        mask=(rng.uniform(0, 1, (n, c, 32, 32)) > 0.5).astype(np.uint8),
        pixel_mm=np.full((n, c), 0.4, np.float32),
        characteristics=rng.uniform(1, 5, (n, 8)).astype(np.float32),
        reader_malignancy=np.full((n, 4), 3.0, np.float32),
        malignancy_mean=np.full(n, 3.0, np.float32),
        diameter_mm=np.linspace(4, 9, n).astype(np.float32),
        attrs={
            "name": "D2C",
            "channels": c,
            "n_folds": 3,
            "split": "nodule",
            "seed": 7,
            "label_rule": {"min_readers": 3},
            "normalisation": {"hu_window": [-1000, 400]},
            "consensus_level": 0.5,
        },
        filled_channels=np.zeros((n, c), np.uint8),
        inplane_filled_channels=np.ones((n, c), np.uint8),
        extras={"series_uid": np.array([f"1.{i}" for i in range(n)], object), "n_readers": np.full(n, 4)},
        agreement=np.full((n, c, 32, 32), 3, np.uint8),
        consensus_min_readers=np.full(n, 2, np.int64),
    )


def test_a_written_dataset_reads_back_member_by_member(tmp_path):
    from nodulekit.artifacts import provenance

    ds = _tiny()
    path = write_dataset(tmp_path / "d.h5", ds, provenance(source="hand-made"))
    back = load_dataset(path)
    for name in ("x", "y", "fold", "mask", "pixel_mm", "characteristics", "reader_malignancy", "malignancy_mean"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
        assert getattr(back, name).dtype == getattr(ds, name).dtype
    for name in ("diameter_mm", "agreement", "consensus_min_readers", "filled_channels", "inplane_filled_channels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    assert back.patient_id.tolist() == ds.patient_id.tolist() and back.nodule_id.tolist() == ds.nodule_id.tolist()
    assert back.extras["series_uid"].tolist() == ds.extras["series_uid"].tolist()
    assert back.extras["n_readers"].tolist() == [4] * 6
    assert back.attrs["label_rule"] == {"min_readers": 3} and back.attrs["split"] == "nodule"
    assert back.attrs["consensus_level"] == 0.5 and "rois_source" not in back.attrs
    assert back.attrs["characteristic_names"] == list(datasets.CHARACTERISTICS)
    assert back.name == "D2C" and back.channels == 2 and back.n_folds == 3 and back.split == "nodule"
    assert back.normalisation == {"hu_window": [-1000, 400]} and back.path == path
    assert back.identity == dataset_identity(ds) and back.fingerprint == back.identity["fingerprint"]
    with pytest.raises(NodulekitError) as err:
        back.split_indices(3)
    assert str(err.value) == "fold 3 does not exist; this dataset has folds 0..2"
    with pytest.raises(NodulekitError, match="fold -1 does not exist"):
        back.split_indices(-1)
    train, test = back.split_indices(0)
    assert test.tolist() == [0, 3] and train.tolist() == [1, 2, 4, 5]


def test_a_dataset_without_optional_members_reads_back_without_them(tmp_path):
    from nodulekit.artifacts import provenance

    ds = _tiny()
    ds.agreement = ds.consensus_min_readers = ds.filled_channels = ds.inplane_filled_channels = None
    ds.extras = {}
    del ds.attrs["consensus_level"]
    path = write_dataset(tmp_path / "d.h5", ds, provenance(source="hand-made"))
    with h5py.File(path) as f:
        assert "agreement" not in f and "filled_channels" not in f and "meaning" not in f["mask"].attrs
    back = load_dataset(path)
    assert back.agreement is None and back.filled_channels is None and back.inplane_filled_channels is None
    assert back.extras == {} and "consensus_level" not in back.attrs


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda f: _replace(f, "x", np.zeros((6, 2, 32, 31), np.float32)),
            "x has shape (6, 2, 32, 31), expected [N, C, 32, 32]",
        ),
        (lambda f: _replace(f, "x", np.zeros((0, 2, 32, 32), np.float32)), "the dataset holds no nodules"),
        (
            lambda f: _replace(f, "fold", np.zeros(5, np.int64)),
            "fold has shape (5,), expected (6,) to match x (6, 2, 32, 32)",
        ),
        (
            lambda f: _replace(f, "agreement", np.zeros((6, 1, 32, 32), np.uint8)),
            "agreement has shape (6, 1, 32, 32), expected (6, 2, 32, 32)",
        ),
        (
            lambda f: _replace(f, "consensus_min_readers", np.zeros(5, np.int64)),
            "consensus_min_readers has shape (5,), expected (6,)",
        ),
        (
            lambda f: _replace(f, "filled_channels", np.zeros((6, 3), np.uint8)),
            "filled_channels has shape (6, 3), expected (6, 2)",
        ),
        (lambda f: f["x"].__setitem__((0, 0, 0, slice(0, 3)), np.inf), "x holds 3 non-finite values"),
        (lambda f: f["y"].__setitem__(slice(0, 2), [3, -1]), "y holds values other than 0 and 1: [-1, 3]"),
        (lambda f: f["fold"].__setitem__(1, -1), "fold values -1..2 are outside 0..2"),
        (lambda f: f["fold"].__setitem__(1, 3), "fold values 0..3 are outside 0..2"),
        (lambda f: f.attrs.__setitem__("n_folds", 0), "fold values 0..2 are outside 0..-1"),
        (lambda f: _replace(f, "nodule_id", np.array([b"a"] * 6)), "nodule_id has duplicates"),
        (lambda f: f.attrs.__setitem__("label_rule", "{x"), "attribute 'label_rule' is not valid JSON"),
        (lambda f: f.attrs.__delitem__("seed"), "is a malformed dataset artifact: attribute 'seed' is missing"),
    ],
)
def test_load_names_each_inconsistency(tmp_path, edit, message):
    from nodulekit.artifacts import provenance

    path = write_dataset(tmp_path / "d.h5", _tiny(), provenance(source="hand-made"))
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(ArtifactError) as err:
        load_dataset(path)
    assert str(err.value) in (f"{path}: {message}", f"{path} {message}")


def _sha16(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def test_the_identity_record_from_its_definition():
    ds = _tiny()
    ds.x = ds.x.astype(np.float64)  # the record hashes float32 x and int64 y, whatever the arrays hold
    ds.y = ds.y.astype(np.int32)
    fields = {
        "content": _sha16(ds.x.astype(np.float32), ds.y.astype(np.int64)),
        "mask": _sha16(ds.mask.astype(np.uint8)),
        "folds": _sha16(ds.fold.astype(np.int64)),
        "split": "nodule",
        "seed": 7,
        "n_folds": 3,
    }
    fingerprint = hashlib.sha256(json.dumps({"format": 1, **fields}, sort_keys=True).encode()).hexdigest()[:16]
    assert dataset_identity(ds) == {"fingerprint": fingerprint, "format": 1, "n": 6, **fields}
    assert datasets.dataset_fingerprint(ds) == fingerprint
    ds.attrs["seed"] = None
    del ds.attrs["split"]
    ident = dataset_identity(ds)
    assert ident["seed"] is None and ident["split"] == "unknown"


def test_each_identity_difference_in_words():
    ds = _tiny()
    rec = dataset_identity(ds)
    assert identity_difference(rec, ds) is None
    assert identity_difference(None, ds) == (
        "it records no dataset identity (made before fold assignments were part of it), so its folds cannot be checked"
    )
    assert identity_difference({"content": rec["content"]}, ds).startswith("it records no dataset identity")
    other = {**rec, "fingerprint": "0" * 16, "content": "c" * 16, "n": 9}
    assert identity_difference(other, rec) == (
        f"images or labels differ: dataset content {rec['content']} (6 nodules), trained on {'c' * 16} (9 nodules)"
    )
    other = {**rec, "fingerprint": "0" * 16, "mask": "m" * 16}
    assert (
        identity_difference(other, ds) == f"consensus masks differ: dataset masks {rec['mask']}, trained on {'m' * 16}"
    )
    other = {**rec, "fingerprint": "0" * 16, "seed": 8}
    assert identity_difference(other, ds) == (
        "fold assignment differs: dataset split nodule/seed 7, 3 folds, trained on nodule/seed 8, 3 folds"
    )
    for key, value in (("split", "patient"), ("n_folds", 5)):
        assert identity_difference({**rec, "fingerprint": "0" * 16, key: value}, ds).startswith(
            "fold assignment differs"
        )
    other = {**rec, "fingerprint": "0" * 16, "folds": "f" * 16}
    assert identity_difference(other, ds) == (
        f"fold assignment differs: same split nodule/seed 7, 3 folds but other folds (dataset {rec['folds']}, "
        f"trained on {'f' * 16})"
    )
    other = {**rec, "fingerprint": "0" * 16}
    assert (
        identity_difference(other, ds)
        == f"dataset fingerprint {rec['fingerprint']} differs from the recorded {'0' * 16}"
    )


def test_check_identity_refuses_in_one_line(tmp_path):
    ds = _tiny()
    rec = dataset_identity(ds)
    check_identity(rec, ds, "RUN")
    with pytest.raises(NodulekitError) as err:
        check_identity({**rec, "fingerprint": "0" * 16, "mask": "m" * 16}, ds, "RUN", path=tmp_path / "d.h5")
    assert (
        str(err.value)
        == f"{tmp_path / 'd.h5'} is not the dataset of RUN: consensus masks differ: dataset masks {rec['mask']}, trained on {'m' * 16}"
    )
    ds.path = tmp_path / "own.h5"
    with pytest.raises(NodulekitError, match=r"^\S*own.h5 is not the dataset of RUN: "):
        check_identity({**rec, "fingerprint": "0" * 16}, ds, "RUN")
    with pytest.raises(NodulekitError) as err:
        check_identity(None, ds, "CKPT", remedy="export it again")
    assert str(err.value) == (
        "CKPT: it records no dataset identity (made before fold assignments were part of it), so its folds cannot be "
        "checked; export it again"
    )
    with pytest.raises(NodulekitError, match="; re-train it with this version$"):
        check_identity({}, ds, "RUN")
