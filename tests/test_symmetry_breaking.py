"""Fixtures that break the symmetries the other tests happen to have.

Each test sits where an independent set of mutants survived the suite (issue 24): the
in-plane window with row spacing != column spacing, ties at exactly .5 when a plane or a
pixel value is rounded, several nodules numbered by position, a claim held on another
host, the seed a grid gives each run, the probe's warm-up step. Every expected value is
worked out here from the definition (or is a literal), not read back from the code.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
from conftest import write_tiny_dataset

# --------------------------------------------------------------------------- anisotropic pixels


def ramp(rows: int, cols: int, slices: int) -> np.ndarray:
    """HU = -500 + 6 row + 4 col on every slice (integers: the int16 rounding is exact)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.repeat((-500 + 6 * r + 4 * c)[:, :, None], slices, axis=2).astype(np.int16)


@pytest.mark.parametrize("spacing", [(0.8, 0.6), (0.6, 0.8)])
def test_window_and_patch_with_unequal_row_and_column_spacing(spacing):
    """A 4 x diameter crop of a linear HU ramp comes back exactly at every output pixel centre,
    along rows and along columns; the window (4.5 x diameter) is sized by the smaller spacing,
    so sizing it by the larger one (or by the row spacing alone) is refused as too small."""
    from nodulekit.inputs import Channel, InputSpec, model_input
    from nodulekit.inputs.sampling import window_side_px

    d, p = 10.0, 4.0
    assert window_side_px(d, spacing) == 75  # 45 mm / 0.6 mm = 75 px (odd), whichever axis is finer
    sy, sx = spacing
    hu = ramp(120, 110, 9)
    zvals = np.arange(9, dtype=float) * 1.25
    centre = (57.3, 51.8)
    made = model_input(hu, zvals, spacing, centre, 5.0, d, InputSpec((Channel(0.0, p),)))
    step = p * d / 32  # mm per output pixel, both axes
    offsets = (np.arange(32) + 0.5 - 16) * step
    rows = centre[0] + offsets / sy
    cols = centre[1] + offsets / sx
    expected_hu = -500 + 6 * rows[:, None] + 4 * cols[None, :]
    expected = (expected_hu + 1000) / 1400  # the [-1000, 400] HU window scaled to [0, 1]
    np.testing.assert_allclose(made.x[0], expected, atol=2e-6)
    assert made.pixel_mm[0] == pytest.approx(step)


# --------------------------------------------------------------------------- ties at .5 in z


def test_nearest_label_plane_at_an_exact_tie_is_the_upper_slice():
    """Slices 2 mm apart; a plane exactly half-way between two slices takes the upper one
    (0.5 -> 1 and 1.5 -> 2: not round-half-to-even, not round-half-down)."""
    from nodulekit.inputs.sampling import sample_window

    zvals = np.array([0.0, 2.0, 4.0, 6.0, 8.0])
    hu = np.zeros((9, 9, 5), np.int16)
    labels = np.broadcast_to(np.arange(1, 6, dtype=np.uint8), (9, 9, 5)).copy()  # slice k holds k + 1
    for z, expected in ((1.0, 2), (3.0, 3), (2.9, 2), (3.1, 3), (5.0, 4), (7.0, 5)):
        _, lab, _ = sample_window(hu, zvals, (4, 4), z, 5, labels, planes_mm=[0.0])
        assert np.all(lab[0] == expected), (z, lab[0, 2, 2])


def test_interpolated_hu_at_an_exact_half_rounds_to_even():
    """HU interpolated half-way between slices of 0 and 1 HU is 0.5, stored as 0; between 1 and 2
    it is 1.5, stored as 2 (round half to even, as the sampling documents)."""
    from nodulekit.inputs.sampling import sample_window

    zvals = np.array([0.0, 1.0, 2.0])
    hu = np.broadcast_to(np.array([0, 1, 2], np.int16), (5, 5, 3)).copy()
    win, _, _ = sample_window(hu, zvals, (2, 2), 0.5, 3, planes_mm=[0.0])
    assert np.all(win == 0)
    win, _, _ = sample_window(hu, zvals, (2, 2), 1.5, 3, planes_mm=[0.0])
    assert np.all(win == 2)
    win, _, _ = sample_window(-hu, zvals, (2, 2), 0.5, 3, planes_mm=[0.0])  # -0.5 -> -0 (even)
    assert np.all(win == 0)


# --------------------------------------------------------------------------- several nodules in one mask


def test_mask_components_are_numbered_by_slice_then_row_then_column(tmp_path):
    """Four separate nodules whose scan order (rows first), column order and slice order all
    differ: ids 1..4 follow (slice, row, col) of each component's centre."""
    from nodulekit import scans
    from nodulekit.predict import mask_specs
    from tests.scan_fixtures import SHAPE, SPACING, canonical_ct, stored_variant, write_nifti

    layout = ((1, 0, 2), (0, 1))  # stored like a RAS NIfTI: x and y reversed, columns first
    stored, affine = stored_variant(canonical_ct(), *layout)
    ct = write_nifti(tmp_path / "ct.nii.gz", stored, affine)
    r, c, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    # (row, col, slice) centres; expected order: a (slice 2), b (slice 6), then d before c
    # (both slice 11: row 5 < row 17, though d's column 22 > c's 6), scan order is b, d, c, a.
    centres = {"a": (20, 4, 2), "b": (3, 20, 6), "c": (17, 6, 11), "d": (5, 22, 11)}
    labels = np.zeros(SHAPE, np.uint8)
    for rr, cc, kk in centres.values():  # 3 x 3 x 1 crosses: centre exactly at the given voxel
        labels[(abs(r - rr) + abs(c - cc) <= 1) & (k == kk)] = 1
    mask_stored, _ = stored_variant(labels, *layout)
    path = write_nifti(tmp_path / "m.nii.gz", mask_stored, affine)
    specs = mask_specs(scans.read_scan(ct), path, "components")
    assert [s.id for s in specs] == ["1", "2", "3", "4"]
    got = [tuple(np.round(s.centre, 6)) for s in specs]
    assert got == [centres[n] for n in "abdc"]
    assert [s.origin for s in specs] == [f"mask component {i}" for i in (1, 2, 3, 4)]
    assert SPACING[0] != SPACING[1]  # the scan's pixels are not square either


# --------------------------------------------------------------------------- NaN folds


def fold(k, y, prob, first_patient):
    from nodulekit.run import FoldResult

    y = np.asarray(y)
    return FoldResult(
        fold=k, history=np.zeros((1, 5)), columns=["epoch", "a", "b", "c", "d"], test_index=np.arange(len(y)),
        test_prob=np.asarray(prob, float), test_y=y, test_nodule_id=[f"N{first_patient + i}:1" for i in range(len(y))],
        test_patient_id=[f"P{first_patient + i}" for i in range(len(y))], selected_epoch=1, epochs=1,
    )  # fmt: skip


def test_per_fold_mean_and_sd_leave_out_a_fold_whose_auc_is_undefined():
    """Three folds of unequal size; fold 1 holds benign nodules only, so its AUC and
    sensitivity are undefined (NaN): the means and SDs are over folds 0 and 2 only."""
    from sklearn.metrics import roc_auc_score

    from nodulekit.evaluation import RunResult, summarise_run

    y0, p0 = [0, 0, 1, 1, 1], [0.1, 0.7, 0.6, 0.9, 0.4]
    y1, p1 = [0, 0, 0], [0.2, 0.3, 0.8]
    y2, p2 = [0, 1, 0, 1, 1, 0, 1], [0.4, 0.45, 0.3, 0.8, 0.2, 0.1, 0.9]
    folds = [fold(0, y0, p0, 0), fold(1, y1, p1, 10), fold(2, y2, p2, 20)]
    s = summarise_run(RunResult("r", {"arch": "cam"}, folds), n_resamples=20)["summary"]
    aucs = [roc_auc_score(y0, p0), roc_auc_score(y2, p2)]
    assert s["auc"]["mean"] == pytest.approx(np.mean(aucs)) and s["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    sens = [2 / 3, 2 / 4]  # p > 0.5: fold 0 finds 0.6, 0.9 (not 0.4); fold 2 finds 0.8, 0.9 (not 0.45, 0.2)
    assert s["sensitivity"]["mean"] == pytest.approx(np.mean(sens))
    assert s["sensitivity"]["std"] == pytest.approx(np.std(sens, ddof=1))
    spec = [1 / 2, 2 / 3, 3 / 3]  # every fold has benign nodules: all three count
    assert s["specificity"]["mean"] == pytest.approx(np.mean(spec))


def test_region_score_means_and_intervals_leave_out_nan_entries():
    """NaN entries (an empty region) are left out of the mean and of every bootstrap draw: a
    column that is 0.8 wherever defined has mean and interval 0.8, not less. Patient P2 has
    two nodules, one of them NaN."""
    from nodulekit.scores import mean_intervals

    values = np.array([[0.8, 0.2], [0.8, np.nan], [np.nan, 0.6], [0.8, 1.0], [0.8, 0.4]])
    patients = np.array(["P1", "P2", "P2", "P3", "P4"])
    mean, low, high = mean_intervals(values, patients, n_resamples=200, seed=3)
    assert mean[0] == pytest.approx(0.8) and low[0] == pytest.approx(0.8) and high[0] == pytest.approx(0.8)
    assert mean[1] == pytest.approx(0.55)  # (0.2 + 0.6 + 1.0 + 0.4) / 4, not / 5
    assert 0.2 <= low[1] < 0.55 < high[1] <= 1.0


# --------------------------------------------------------------------------- margin and spiculation strata


def test_margin_and_spiculation_strata_at_and_around_the_threshold():
    """Margin: mean rating <= 3 is poorly defined, > 3 sharp (the scale runs 1 = poorly defined
    to 5 = sharp); spiculation: >= 3 is spiculated. Exactly 3 sits on the documented side of each."""
    import pandas as pd

    from nodulekit.scores import REGIONS, SUMMARISED, summarise_scores

    ratings = [1.0, 3.0, 3.5, 5.0, np.nan, 2.5, 2.0, np.nan]  # each group: two patients or more
    n = len(ratings)
    df = pd.DataFrame({
        "map": ["sam"] * n, "class": ["malignant"] * n, "nodule_id": [f"LIDC-IDRI-000{i}:1" for i in range(n)],
        "patient_id": [f"P{i}" for i in range(n)], "margin": ratings, "spiculation": ratings,
        "empty_map": [False] * n, "pointing": [REGIONS[0]] * n, "area_margin_band": np.ones(n),
        **{c: np.linspace(0.1, 0.6, n) for c in SUMMARISED},
    })  # fmt: skip
    groups = {
        by: dict(zip(out["group"], out["n"], strict=True))
        for by, out in ((b, summarise_scores(df, b, n_resamples=10)) for b in ("margin", "spiculation"))
    }
    assert groups["margin"] == {"poorly defined (<=3)": 4, "sharp (>3)": 2, "unrated": 2}  # 1, 3, 2.5, 2 | 3.5, 5
    assert groups["spiculation"] == {
        "spiculated (>=3)": 3,
        "not spiculated (<3)": 3,
        "unrated": 2,
    }  # 3, 3.5, 5 | 1, 2.5, 2


# --------------------------------------------------------------------------- a claim from another host


def test_status_of_a_fold_claimed_on_another_host(tmp_path):
    """A fresh claim from another host cannot be checked: the fold is running there (said so);
    the same claim untouched for longer than STALE_S is not running any more."""
    from test_evaluation import fake_run

    from nodulekit.claims import CLAIM_FILE, STALE_S
    from nodulekit.status import run_status

    rundir = tmp_path / "run"
    fake_run(rundir, n_folds=3, skip=(1,))
    host = "node-" + socket.gethostname()[:8] + "-x"
    claim = rundir / "fold1" / CLAIM_FILE
    claim.parent.mkdir()
    claim.write_text(json.dumps({"host": host, "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}))
    rows = run_status(rundir)
    assert [r["state"] for r in rows] == ["finished", "running", "finished"]
    assert rows[1]["claim"]["host"] == host and rows[1]["claim"]["pid"] == 4242
    assert rows[1]["note"] == f"pid 4242 on {host} since 2026-01-01T00:00:00+00:00 (other host: not checked)"
    old = time.time() - STALE_S - 60
    os.utime(claim, (old, old))
    rows = run_status(rundir)
    assert rows[1]["state"] == "missing" and rows[1]["claim"] is None


# --------------------------------------------------------------------------- the seed of each grid run


def test_grid_trains_each_run_with_its_own_seed_not_the_split_seed(tmp_path):
    """seeds [3, 7] and split_seed 5: each run's train command carries --seed of its own run
    folder (seed3 / seed7), build carries the split seed."""
    import shlex

    from test_datasets import sphere_nodules, write_rois

    from nodulekit.grid import build_command, load_grid, train_command

    write_rois(tmp_path / "rois.h5", sphere_nodules(n_patients=12))
    (tmp_path / "grid.yaml").write_text(
        "output: out\nrois: rois.h5\ndatasets: {d1c: 1}\nfolds: 2\nepochs: 1\nsplit_seed: 5\nseeds: [3, 7]\n"
        "train: {lr: 0.01, device: cpu, threads: 1}\nmodel_options: {base_width: 4}\nbootstrap: 50\n"
        "table2:\n  architectures: [cam]\n"
    )
    plan = load_grid(tmp_path / "grid.yaml")
    assert len(plan.runs) == 2
    for rundir in plan.runs:
        args = shlex.split(train_command(plan, rundir, threads=1).split(" ", 1)[1])
        seed = int(rundir.split("/seed")[1].split("/")[0])
        assert args[args.index("--seed") + 1] == str(seed) and args.count("--seed") == 1
    seeds = sorted(int(r.split("/seed")[1].split("/")[0]) for r in plan.runs)
    assert seeds == [3, 7]
    build = shlex.split(build_command(plan, "d1c", "x.h5"))
    assert build[build.index("--seed") + 1] == "5"


# --------------------------------------------------------------------------- the probe's warm-up step


def test_probe_times_only_the_steps_after_the_warm_up():
    """The first step of each variant is warm-up (kernel selection) and never counts: fp32's
    slow first step does not hide its fastest timed step, and channels_last's quick first step
    does not make it the fastest. The quickest timed step counts, not the mean or the last."""
    import torch

    from nodulekit.execution import WARMUP_STEPS, select_variant

    assert WARMUP_STEPS == 1
    ref = torch.linspace(-1, 1, 12)
    seconds = {
        "fp32": [9.0, 1.0, 5.0],  # min of the timed steps 1.0; mean 3.0, last 5.0
        "fp32+channels_last": [0.1, 2.0, 2.0],
        "bf16": [0.1, 4.0, 4.0],
        "bf16+channels_last": [0.1, 4.0, 4.0],
    }
    results = {name: {"seconds": s, "outputs": ref.clone()} for name, s in seconds.items()}
    choice = select_variant(results, "cpu")
    assert (choice.amp, choice.channels_last) == (False, False)
    # and when channels_last's timed steps are the quicker ones, it is chosen
    results["fp32+channels_last"]["seconds"] = [9.0, 0.5, 0.5]
    choice = select_variant(results, "cpu")
    assert (choice.amp, choice.channels_last) == (False, True)


def test_probe_runs_one_warm_up_and_two_timed_steps_per_variant(tmp_path, monkeypatch):
    """Every variant is stepped WARMUP_STEPS + TIMED_STEPS = 3 times, round-robin."""
    from nodulekit import execution

    calls = []

    def time_step(variant, run):
        calls.append(variant)
        return 1.0, run()

    monkeypatch.setattr(execution, "MIN_WORKLOAD_STEPS", 0)
    monkeypatch.setattr(execution, "CHILD_PROBES", False)  # the clock above times steps in this process
    monkeypatch.setattr(execution, "_timed", lambda device: time_step)
    from nodulekit.training import TrainConfig, train

    ds = write_tiny_dataset(tmp_path / "d.h5", n=20, channels=1, folds=2)
    cfg = TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=1, lr=0.01, device="cpu", seed=0)
    train(ds, tmp_path / "run", cfg, folds=[0], progress=False)
    names = ["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]
    ran = [n for n in names if n in calls]
    assert "fp32" in ran and calls == ran * 3


# --------------------------------------------------------------------------- a scores table rated on one feature


def _rated(column: str):
    """The six-nodule scores table of test_scores_markdown, rated on ``column`` only."""
    from test_scores_markdown import scores_table

    scores = scores_table()
    scores[column] = [1.0, 2.0, 3.0, 4.0, 5.0, 3.0]
    scores["maps_file"] = ["b.h5", "a.h5", "b.h5", "b.h5", "a.h5", "b.h5"]
    scores.attrs.update(band_rule="r = 2 px", mask_channel=5)
    return scores


@pytest.mark.parametrize("rated", ["spiculation", "margin"])
def test_scores_summaries_group_by_what_is_rated_and_the_record_says_how(rated):
    """A table rated on one feature gets the class summary and that feature's, each the same as
    summarise_scores with the same seed (0 when none is given); the JSON record states the
    stage, band rule, channel, bootstrap, the maps files (once each, sorted) and the clipping."""
    import pandas as pd

    from nodulekit.scores import REGIONS, scores_record, scores_summaries, summarise_scores

    scores = _rated(rated)
    summaries = scores_summaries(scores, n_resamples=20, seed=3)
    assert list(summaries) == ["class", rated]
    for by, table in summaries.items():
        pd.testing.assert_frame_equal(table, summarise_scores(scores, by, n_resamples=20, seed=3))
    default = scores_summaries(scores, n_resamples=20)
    pd.testing.assert_frame_equal(default[rated], summarise_scores(scores, rated, n_resamples=20, seed=0))
    record = scores_record(scores, summaries, n_resamples=20, seed=3)
    prov = {k: v for k, v in record["provenance"].items() if k not in ("command", "nodulekit_version", "created")}
    assert prov == {
        "stage": "scores",
        "band_rule": "r = 2 px",
        "mask_channel": 5,
        "bootstrap": {"n_resamples": 20, "seed": 3, "unit": "patient"},
        "maps_files": ["a.h5", "b.h5"],
        "clipping": "maps clipped at 0 (positive evidence for the class)",
    }
    assert record["regions"] == list(REGIONS) and list(record["summaries"]) == ["class", rated]
    assert len(record["summaries"][rated]) == len(summaries[rated])


def test_a_stratum_of_one_patient_has_a_mean_but_no_interval():
    """Spiculation rated 1 and 2 only on patient 1's two nodules: the 'not spiculated' stratum
    has one patient, so its mean is the plain mean of those two nodules and its patient-bootstrap
    interval is undefined (NaN, 'n/a' in the report), not a crash of the whole summary."""
    import numpy as np

    from nodulekit.scores import summarise_scores

    scores = _rated("spiculation")
    table = summarise_scores(scores, "spiculation", n_resamples=20).set_index("group")
    one = table.loc["not spiculated (<3)"]
    assert one["n"] == 2 and one["n_patients"] == 1
    assert one["mean_share_body"] == pytest.approx(scores["share_body"].iloc[:2].mean())
    assert np.isnan(one["mean_share_body_low"]) and np.isnan(one["mean_share_body_high"])
    many = table.loc["spiculated (>=3)"]
    assert many["n_patients"] == 2 and many["mean_share_body_low"] <= many["mean_share_body_high"]


def test_write_scores_files_beside_the_csv_with_the_seed_it_states(tmp_path):
    """scores.csv gets scores.md and scores.json beside it (those exact names); the JSON's
    summaries are the ones of the seed it records (0 by default, else the one given); an
    existing set is replaced only with overwrite; a .md or .json name is refused in one line."""
    import json

    import pandas as pd

    from nodulekit.errors import NodulekitError
    from nodulekit.scores import summarise_scores, write_scores

    scores = _rated("margin")
    for seed, kw in ((0, {}), (7, {"seed": 7, "overwrite": True})):
        paths = write_scores(scores, tmp_path / "scores.csv", n_resamples=20, **kw)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "scores.json", "scores.md"]
        assert {k: p.name for k, p in paths.items()} == {"csv": "scores.csv", "md": "scores.md", "json": "scores.json"}
        record = json.loads((tmp_path / "scores.json").read_text())
        assert record["provenance"]["bootstrap"]["seed"] == seed
        expected = summarise_scores(scores, "margin", n_resamples=20, seed=seed)
        got = pd.DataFrame.from_records(record["summaries"]["margin"])
        np.testing.assert_allclose(got["mean_share_body_low"], expected["mean_share_body_low"])
        assert record["provenance"]["bootstrap"]["n_resamples"] == 20 and record["skipped_empty_masks"] == {}
    # the CSV: the table's columns only (no index), floats to 6 significant digits
    back = pd.read_csv(tmp_path / "scores.csv")
    assert list(back.columns) == list(scores.columns)
    np.testing.assert_array_equal(back["share_body"], [float(f"{v:.6g}") for v in scores["share_body"]])
    assert not np.array_equal(back["share_body"], scores["share_body"])  # the fixture has more digits
    # attributes read from HDF5 are numpy scalars; empty masks skipped are listed
    scores.attrs.update(mask_channel=np.int64(5), skipped_empty_masks={"LIDC-IDRI-0009:1": "empty consensus"})
    write_scores(scores, tmp_path / "scores.csv", n_resamples=20, overwrite=True)
    record = json.loads((tmp_path / "scores.json").read_text())
    assert record["skipped_empty_masks"] == {"LIDC-IDRI-0009:1": "empty consensus"}
    assert record["provenance"]["mask_channel"] in (5, "5")
    with pytest.raises(NodulekitError, match="exists"):
        write_scores(scores, tmp_path / "scores.csv", n_resamples=20)
    with pytest.raises(NodulekitError, match=r"scores\.md: give the scores a \.csv name \(Markdown and JSON go beside"):
        write_scores(scores, tmp_path / "scores.md", n_resamples=20)


def test_report_of_a_single_scored_nodule():
    """One nodule (one patient): the summary has its values with undefined intervals, and the
    report names the map class of that one row (here benign)."""
    from nodulekit.scores import scores_markdown, scores_summaries

    scores = _rated("margin").iloc[[3]].copy()
    scores["map_class"] = "benign"
    summaries = scores_summaries(scores, n_resamples=20)
    assert summaries["class"]["n"].tolist() == [1] and np.isnan(summaries["class"]["mean_share_body_low"].iloc[0])
    assert "Map of the **benign** class" in scores_markdown(scores, summaries)


def test_write_scores_never_replaces_a_report_that_appeared_after_the_check(tmp_path, monkeypatch):
    """Another run writes scores.md between write_scores' check and its move: without overwrite
    its file stays, and none of this run's report files is left behind (together or not at all)."""
    import nodulekit.outputs as outputs
    from nodulekit.errors import NodulekitError
    from nodulekit.scores import write_scores

    monkeypatch.setattr(outputs, "check_output_path", lambda path, overwrite: path)  # the check passed earlier
    (tmp_path / "scores.md").write_text("the other run's report")
    with pytest.raises(NodulekitError, match="scores.md already exists: it appeared while this run was working"):
        write_scores(_rated("margin"), tmp_path / "scores.csv", n_resamples=20)
    assert (tmp_path / "scores.md").read_text() == "the other run's report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.md"]  # no scores.json/.csv, no temporaries


@pytest.mark.parametrize("appears", ["a.json", "c.md"])
def test_atomic_paths_moves_a_group_in_together_or_not_at_all(tmp_path, appears):
    """Three files; one of them appears (another job) after they were written: without overwrite
    the group is refused and whichever of its files were already moved in are taken back."""
    from nodulekit.errors import NodulekitError
    from nodulekit.outputs import atomic_paths

    paths = {name: tmp_path / name for name in ("a.json", "b.csv", "c.md")}
    with pytest.raises(NodulekitError, match=f"{appears} already exists"):
        with atomic_paths(paths, overwrite=False) as tmp:
            for name, t in tmp.items():
                t.write_text(f"this run's {name}")
            (tmp_path / appears).write_text("the other job's")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {appears: "the other job's"}
    with atomic_paths(paths, overwrite=True) as tmp:
        for name, t in tmp.items():
            t.write_text(f"this run's {name}")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"this run's {n}" for n in paths}


def test_atomic_paths_names_the_file_whose_write_failed(tmp_path):
    """A write that fails on the second file is one line naming that file (not a temporary, not the
    last file of the group), and nothing of the group is left."""
    import errno

    from nodulekit.errors import WriteFailed
    from nodulekit.outputs import atomic_paths

    paths = {name: tmp_path / name for name in ("a.json", "b.csv", "c.md")}
    with pytest.raises(WriteFailed) as info:
        with atomic_paths(paths) as tmp:
            tmp["a.json"].write_text("{}")
            raise OSError(errno.EIO, "Input/output error", str(tmp["b.csv"]))
    assert str(info.value) == f"could not write {paths['b.csv']}: Input/output error"
    assert list(tmp_path.iterdir()) == []


def test_report_of_a_table_with_no_nodules():
    """Every nodule left out (no rows): the report still opens with the default map class (the
    malignant one, as score_maps' default), says there are no rated nodules, and counts no
    zero maps."""
    from nodulekit.scores import scores_markdown, scores_summaries

    scores = _rated("margin").iloc[:0].copy()
    summaries = scores_summaries(scores, n_resamples=20)
    text = scores_markdown(scores, summaries)
    assert "Map of the **malignant** class" in text and "(no rated nodules)" in text
    assert "were zero everywhere" not in text


# --------------------------------------------------------------------------- the scores report, word for word

REPORT_HEAD = [
    "# Region scores of activation maps",
    "Map of the **malignant** class, clipped at 0; regions from the consensus mask of input channel 5 (the centre "
    "slice at ROI side 2 x diameter), r = 2 px: body = mask eroded by r, margin band = mask dilated by r minus body, "
    "outside = the rest. Share = fraction of map energy in the region (mean over nodules); enrichment = share / area "
    "fraction (1 = no preference; mean over nodules with a non-empty region); pointing = fraction of nodules whose "
    "map peak lies in the region. 95 % intervals: percentile bootstrap, 20 resamples of patients with replacement "
    "(all of a patient's nodules together), seed 0.",
]
REPORT_COLUMNS = (
    "| map | group | n | share_body | share_margin_band | share_outside | enrichment_body | enrichment_margin_band "
    "| enrichment_outside | pointing_body | pointing_margin_band | pointing_outside |"
)


def _report_rated_on_both():
    """The report of the six-nodule table rated on spiculation and on margin (patient 1's two
    nodules alone in the 'not spiculated' and 'sharp' strata), with its summaries."""
    from nodulekit.scores import scores_markdown, scores_summaries

    scores = _rated("spiculation")
    scores["margin"] = [5.0, 4.0, 3.0, 2.0, 1.0, 3.0]
    summaries = scores_summaries(scores, n_resamples=20)
    return scores, scores_markdown(scores, summaries)


def test_report_headings_columns_and_the_sentences_that_define_its_numbers():
    """The lines a reader relies on, word for word: the title, the paragraph that defines share,
    enrichment, pointing and the intervals, one heading per grouping (the margin scale's
    direction in it) and each table's column header and separator."""
    _, text = _report_rated_on_both()
    lines = text.splitlines()
    assert lines[:3] == [*REPORT_HEAD, ""]
    assert [line for line in lines if line.startswith("#")] == [
        "# Region scores of activation maps",
        "## By nodule class",
        "## By spiculation (mean rating)",
        "## By margin (mean rating; 1 = poorly defined, 5 = sharp)",
    ]
    for heading in (line for line in lines if line.startswith("## ")):
        at = lines.index(heading)
        assert lines[at + 1 : at + 4] == ["", REPORT_COLUMNS, "|" + "---|" * 12]


def test_report_writes_n_a_for_an_undefined_mean_or_interval():
    """Benign nodules have no outside region: that mean is undefined and its cell reads "n/a".
    Patient 1 alone in the 'sharp' stratum: a mean, but no patient-bootstrap interval, so
    "mean [n/a]" (not "[nan, nan]"); with two patients the interval is written out."""
    scores, text = _report_rated_on_both()
    rows = {line.split(" | ")[1]: line[2:-2].split(" | ") for line in text.splitlines() if line.startswith("| sam |")}
    assert rows["benign"][8] == "n/a"  # enrichment_outside
    body = scores["share_body"].iloc[:2].mean()  # patient 1's two nodules
    assert rows["sharp (>3)"][3] == f"{body:.3f} [n/a]"
    assert rows["sharp (>3)"][:3] == ["sam", "sharp (>3)", "2"]
    assert rows["poorly defined (<=3)"][3].count("[") == 1 and "n/a" not in rows["poorly defined (<=3)"][3]
    assert "[nan" not in text and "nan]" not in text


def test_interval_text_of_each_undefined_part():
    from nodulekit.scores import interval_text

    nan = float("nan")
    assert interval_text(0.25, 0.125, 0.5) == "0.250 [0.125, 0.500]"
    assert interval_text(nan, 0.125, 0.5) == "n/a"
    assert interval_text(0.25, nan, nan) == "0.250 [n/a]"
    assert interval_text(0.25, nan, 0.5) == "0.250 [n/a]"  # either end undefined: no interval
    assert interval_text(0.25, 0.125, nan) == "0.250 [n/a]"


def test_markdown_table_cells_of_floats_ints_text_and_non_finite_floats():
    """Floats to 3 decimals in lower case as Python writes them (nan, inf, -inf), ints and text as they are."""
    import pandas as pd

    from nodulekit.scores import _markdown_table

    df = pd.DataFrame({"a": ["x", "y"], "n": [3, 12], "v": [0.12345, np.nan], "w": [np.inf, -np.inf]})
    assert _markdown_table(df, ["a", "n", "v", "w"]) == (
        "| a | n | v | w |\n|---|---|---|---|\n| x | 3 | 0.123 | inf |\n| y | 12 | nan | -inf |\n"
    )
