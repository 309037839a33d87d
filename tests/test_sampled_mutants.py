"""Tests for the survivors of the whole package's mutant sample (tools/mutant_sample.py, seed 1;
docs/testing.md): each names the property the surviving mutant broke, checked against a
known answer written here."""

from __future__ import annotations

import pytest

from nodulekit.errors import NodulekitError


def test_a_map_method_refused_names_the_models_class_when_it_has_no_arch():
    """A model without an ``arch`` (any torch module) is named by its class in the refusal."""
    import torch

    from nodulekit.map_methods import check_method

    with pytest.raises(NodulekitError) as err:
        check_method(torch.nn.Linear(2, 2), "hesam")
    assert str(err.value).startswith("method 'hesam' does not apply to model 'Linear': ")
    assert str(err.value).endswith("; it supports: none")


def test_wilcoxon_notes_define_each_column_the_report_shows():
    """The notes under the Table 5 report define its p-values; a reader relies on these sentences."""
    from nodulekit.stats import wilcoxon_notes

    text = wilcoxon_notes(n_resamples=2000, seed=0, n_permutations=10000)
    assert (
        "`prob_p_value`: the paper's Table 5 test, a Wilcoxon signed-rank test of the probabilities (a small p"
        " says the output distributions differ, not that either run is better; nodule level, patients not"
        " accounted for). `*_holm`: Holm's adjustment over the comparisons of the first arm with the others."
    ) in text
    assert "(10000 random sign patterns, or all when fewer; seed 0)" in text
    assert (
        "`auc_p`: Obuchowski's (1997) clustered test of the AUC difference, patients as clusters, the default;"
        " `delong_p`: DeLong's test (DeLong et al. 1988; nodules as independent cases) beside it;"
    ) in text


def test_scan_extent_text_in_voxel_indices_and_lps_mm(tmp_path):
    """The extent a refused centre is compared with: voxel centres +- half a voxel, in stored
    voxel indices, and in LPS mm for an axis-aligned scan (known answers for this affine)."""
    import nibabel as nib
    import numpy as np

    from nodulekit.scans import read_scan

    affine = np.diag([-0.5, -0.5, 2.0, 1.0])  # RAS affine of NIfTI: x and y flipped to LPS below
    affine[:3, 3] = (10.0, 20.0, -30.0)
    path = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(np.full((4, 6, 3), -800, np.int16), affine), str(path))
    scan = read_scan(path)
    assert scan.extent_text("voxel") == "voxel indices -0.5..3.5, -0.5..5.5, -0.5..2.5"
    # LPS x = -(10 - 0.5 i) for i in [-0.5, 3.5]: -10.25..-8.25; y = -(20 - 0.5 j), j in [-0.5, 5.5]; z = -30 + 2 k
    assert scan.extent_text("lps") == "x -10.2..-8.2, y -20.2..-17.2, z -31.0..-25.0 mm LPS"
    assert scan.extent_text("ras") == "x 8.2..10.2, y 17.2..20.2, z -31.0..-25.0 mm RAS"


def test_map_placement_states_the_half_pixel_offsets_of_a_32_pixel_input():
    """The model card's formula that puts map_up back on the CT: for 32 pixels the offset is
    32 / 2 - 0.5 = 15.5 (pixel centres), and the valid range of a and b is [-0.5, 31.5]."""
    from nodulekit.inputs.spec import paper_spec
    from nodulekit.modelcard import map_placement

    spec = paper_spec(3)
    assert spec.patch_px == 32
    to_ct = map_placement(spec)["to_ct"]
    assert "at a = (row - r) x s_r / t + 15.5, b = (col - c) x s_c / t + 15.5, 0 where a or b lies" in to_ct
    assert "outside [-0.5, 31.5]" in to_ct


def test_seed_patient_bootstrap_draws_exactly_n_resamples():
    """Resamples are drawn in blocks of 500: 1200 gives 500 + 500 + 200, not one less or more."""
    import numpy as np

    from nodulekit.stats import seed_patient_bootstrap

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    groups = np.repeat(np.arange(10), 2)
    out = seed_patient_bootstrap(y, rng.random((2, 20)), rng.random((1, 20)), groups, n_resamples=1200, seed=3)
    assert len(out["distribution"]) == 1200


def test_status_table_marks_a_row_without_a_fold_with_a_dash():
    from nodulekit.status import status_table

    rows = [
        {"rundir": "runs/a", "fold": None, "state": "missing", "epochs_done": 0, "epochs": None, "note": None},
        {"rundir": "runs/b", "fold": 3, "state": "finished", "epochs_done": 15, "epochs": 15, "note": "ok"},
    ]
    assert status_table(rows).splitlines() == [
        "RUNDIR  fold  state     epochs  note",
        "runs/a     -  missing        -",
        "runs/b     3  finished   15/15  ok",
        "1 finished, 1 missing",
    ]


def test_dataset_identity_names_its_format(tmp_path):
    """The identity record (in run.json, checkpoints, ONNX metadata) says which identity format made
    its fingerprint, under the key 'format' (a reader of older records branches on it)."""
    from nodulekit.datasets import dataset_identity, load_dataset
    from tests.conftest import write_tiny_dataset

    identity = dataset_identity(load_dataset(write_tiny_dataset(tmp_path / "d.h5", n=12, channels=1, folds=2)))
    assert identity["format"] == 1 and identity["n"] == 12 and identity["n_folds"] == 2
    assert len(identity["fingerprint"]) == 16


def test_a_fold_that_does_not_exist_names_the_folds_there_are(tmp_path):
    from nodulekit.datasets import load_dataset
    from nodulekit.training import TrainConfig, fold_split
    from tests.conftest import write_tiny_dataset

    path = write_tiny_dataset(tmp_path / "d.h5", n=12, channels=1, folds=3)
    with pytest.raises(NodulekitError) as err:
        fold_split(load_dataset(path), 3, TrainConfig())
    assert str(err.value) == f"fold 3 does not exist: {path} has folds 0..2"


@pytest.mark.parametrize("decay", [-0.1, float("nan"), float("inf")])
def test_weight_decay_must_be_a_finite_non_negative_number(decay):
    from nodulekit.training import TrainConfig

    with pytest.raises(NodulekitError, match=r"--weight-decay must be >= 0 \(got "):
        TrainConfig(weight_decay=decay).validate()


def test_laminated_calcification_brightens_concentric_shells_of_the_nodule():
    """calcification 2 (laminated): the voxels whose depth inside the nodule, modulo half the
    deepest depth, is below a quarter of it (shells), and no others, become >= 200 HU."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    from nodulekit.phantom import _draw_calcification

    spacing = np.array([1.0, 1.0, 1.0])
    r = np.linalg.norm(np.indices((21, 21, 21)).transpose(1, 2, 3, 0) - 10, axis=-1)
    m = r <= 8
    inside = distance_transform_edt(m, sampling=spacing).astype(np.float32)
    depth = float(inside.max())
    field = np.full(m.shape, -50.0)
    _draw_calcification(field, m, inside, depth, spacing, 2, np.random.default_rng(0))
    shells = m & (np.mod(inside, depth / 2.0) < 0.25 * depth)  # depth ~8 mm: above the rule's 1 and 0.6 mm floors
    assert depth > 4 and 0 < shells.sum() < m.sum()
    assert (field[shells] >= 200).all() and (field[~shells] == -50.0).all()


@pytest.mark.parametrize(("structure", "hu"), [(2, 5.0), (3, -90.0)])
def test_fluid_or_fat_fills_the_core_deeper_than_35_percent_of_the_depth(structure, hu):
    import numpy as np

    from nodulekit.phantom import _draw_internal_structure

    inside = np.linspace(0.0, 10.0, 11).reshape(11, 1, 1) * np.ones((1, 2, 2))  # depth 0..10 mm
    field = np.full(inside.shape, -50.0)
    _draw_internal_structure(field, inside, 10.0, np.ones(3), structure, np.random.default_rng(0))
    assert (field[4:] == hu).all() and (field[:4] == -50.0).all()  # 4 mm and deeper: > 3.5 mm


def test_a_failed_extract_without_parts_drops_nothing_and_reports_the_failure(tmp_path):
    """The run failed before its parts folder existed: nothing to drop, the error is returned as is."""
    from nodulekit.extract import _keep_or_drop_parts

    exc = RuntimeError("interrupted before any unit")
    assert _keep_or_drop_parts(tmp_path / "never-made.parts", tmp_path / "rois.h5", exc) is exc


@pytest.mark.parametrize(
    ("estimate", "p_lower", "p_upper"),
    [(-0.02, 1.0, 0.0), (0.02, 0.0, 1.0), (-0.0199, 0.0, 0.0), (0.0, 0.0, 0.0)],
)
def test_equivalence_with_no_variability_excludes_the_margin_itself(estimate, p_lower, p_upper):
    """With a standard error of 0 each one-sided test is decided by the estimate: a difference of
    exactly -margin or +margin is not inside the open interval (-margin, +margin)."""
    from nodulekit.stats import equivalence_test

    out = equivalence_test(estimate, 0.0, 0.02)
    assert (out["p_lower"], out["p_upper"]) == (p_lower, p_upper)
    assert out["equivalent"] is (p_lower == p_upper == 0.0)


def test_a_nodules_csv_with_an_id_used_twice_names_it(tmp_path):
    import nibabel as nib
    import numpy as np

    from nodulekit.errors import DataError
    from nodulekit.predict import csv_specs
    from nodulekit.scans import read_scan

    nib.save(nib.Nifti1Image(np.full((40, 40, 20), -800, np.int16), np.eye(4)), str(tmp_path / "ct.nii"))
    path = tmp_path / "nodules.csv"
    path.write_text("id,x,y,z,diameter_mm\na,-10,-12,5,6\nb,-20,-22,6,7\na,-15,-16,9,8\n")
    with pytest.raises(DataError) as err:
        csv_specs(read_scan(tmp_path / "ct.nii"), path, "lps")
    assert str(err.value) == f"nodules CSV {path}: id 'a' is used twice"


def _dead_watch(rundir, folds: list[int]) -> None:
    """A watch of ``folds`` left by a process that was killed (-9) while it trained them."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time; from nodulekit import crashes\n"
        f"with crashes.watch({str(rundir)!r}, {folds!r}, {{}}):\n"
        "    print('watching', flush=True); time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "watching"
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_clearing_dead_watches_removes_only_those_of_the_folds_trained_again(tmp_path):
    from nodulekit.crashes import clear_dead, dead_watches

    _dead_watch(tmp_path, [0, 1])
    _dead_watch(tmp_path, [3])
    assert sorted(tuple(w.folds) for w in dead_watches(tmp_path)) == [(0, 1), (3,)]
    clear_dead(tmp_path, [2])  # neither watch names fold 2
    assert len(dead_watches(tmp_path)) == 2
    clear_dead(tmp_path, [1, 2])  # fold 1 is trained again: the watch of folds 0 and 1 goes
    assert [tuple(w.folds) for w in dead_watches(tmp_path)] == [(3,)]


def test_the_phantoms_generators_depend_on_the_seed_and_every_key():
    from nodulekit.phantom import _rng

    def draw(*args):
        return _rng(*args).random(4).tolist()

    assert draw(0, "series", 2, "voi") == draw(0, "series", 2, "voi")  # not on call order
    others = [
        draw(1, "series", 2, "voi"),
        draw(0, "other", 2, "voi"),
        draw(0, "series", 3, "voi"),
        draw(0, "series", 2, "nodule"),
    ]
    assert all(o != draw(0, "series", 2, "voi") for o in others)


def test_an_unknown_mask_mode_lists_the_modes(tmp_path):
    from nodulekit.predict import MASK_MODES, mask_specs

    with pytest.raises(NodulekitError) as err:
        mask_specs(None, tmp_path / "mask.nii", "largest")
    assert str(err.value) == f"--mask-nodules must be one of {', '.join(MASK_MODES)} (got 'largest')"
    assert MASK_MODES == ("auto", "components", "labels")


@pytest.mark.parametrize(("amp", "channels_last", "option"), [("yes", None, "--amp"), (None, 1.5, "--channels-last")])
def test_an_execution_option_that_is_not_on_off_or_auto_is_named(amp, channels_last, option):
    from nodulekit.execution import default_execution

    bad = amp if amp is not None else channels_last
    with pytest.raises(NodulekitError) as err:
        default_execution("cpu", amp, channels_last)
    assert str(err.value) == f"{option} must be on, off or auto (got {bad!r})"


def test_an_oblique_grid_of_anisotropic_voxels_names_its_tilt(tmp_path):
    """0.5 x 0.5 x 5 mm voxels tilted 2 degrees about the y axis: the angle is that of the axes
    (columns of the affine, each divided by its voxel size), not of the affine's rows."""
    import numpy as np

    from nodulekit.errors import DataError
    from nodulekit.sources.formats import check_axis_aligned

    a = np.radians(2.0)
    affine = np.eye(4)
    affine[:3, 0] = 0.5 * np.array([np.cos(a), 0.0, np.sin(a)])
    affine[:3, 1] = [0.0, 0.5, 0.0]
    affine[:3, 2] = 5.0 * np.array([-np.sin(a), 0.0, np.cos(a)])
    with pytest.raises(DataError, match="an axis is rotated 2 degrees from the scanner axes"):
        check_axis_aligned(affine, tmp_path / "ct.nii")
    check_axis_aligned(np.diag([0.5, 0.5, 5.0, 1.0]), tmp_path / "ct.nii")  # aligned: accepted


def test_an_os_error_in_a_command_is_one_line_naming_the_file(monkeypatch, nodulekit_cli):
    """A disk or permission error the command did not turn into its own message: the CLI prints
    the system's reason and the file, exits 1, no traceback."""
    import errno

    import nodulekit.catalogue as catalogue

    def denied(channels):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/registry.json")

    monkeypatch.setattr(catalogue, "model_catalogue", denied)
    r = nodulekit_cli("models")
    assert r.returncode == 1 and r.stderr == "nodulekit: error: Permission denied (/data/registry.json)\n"


def test_a_dense_layer_has_no_conv_biases():
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3, both convolutions without bias (the next BN has one):
    in 4, growth 2, bn_size 2 -> BN 2x4 + conv 4x4 + BN 2x4 + conv 4x2x3x3 = 8 + 16 + 8 + 72."""
    from nodulekit.models.densenet import DenseLayer

    assert sum(p.numel() for p in DenseLayer(4, 2, bn_size=2).parameters()) == 104


def test_each_fold_result_records_the_runs_dataset_fingerprint(tmp_path):
    import json

    import h5py

    from tests.model_fixtures import trained_run

    _, rundir = trained_run(tmp_path)
    fingerprint = json.loads((rundir / "run.json").read_text())["dataset"]["fingerprint"]
    with h5py.File(rundir / "fold1" / "result.h5", "r") as f:
        run = json.loads(f.attrs["run"])
    assert run["dataset_fingerprint"] == fingerprint and run["arch"] == "hesam" and run["n_folds"] == 2


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 32, 32)])
def test_a_dataset_whose_patches_are_not_32_by_32_is_refused(tmp_path, shape):
    import numpy as np

    from nodulekit.datasets import _validate
    from nodulekit.errors import ArtifactError

    with pytest.raises(ArtifactError) as err:
        _validate({"x": np.zeros(shape, np.float32)}, {}, tmp_path / "d.h5")
    assert str(err.value) == f"{tmp_path / 'd.h5'}: x has shape {shape}, expected [N, C, 32, 32]"


def test_run_json_records_the_datasets_input_spec(tmp_path):
    """run.json carries the input spec the model was trained on (what predict rebuilds from a CT)."""
    import json

    from nodulekit.datasets import load_dataset
    from tests.model_fixtures import trained_run

    dataset, rundir = trained_run(tmp_path)
    spec = load_dataset(dataset).input_spec
    assert spec is not None
    assert json.loads((rundir / "run.json").read_text())["input_spec"] == json.loads(json.dumps(spec.as_dict()))
