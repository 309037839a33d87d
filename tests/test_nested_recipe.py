"""benchmarks/nested_recipe.py: nested selection of the recipe from outer runs, end to end on tiny data."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from nodulekit import recipes, training
from nodulekit.datasets import load_dataset
from nodulekit.run import read_fold_result
from nodulekit.training import TrainConfig, TrainingDiverged, train
from tests.conftest import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    arch="hesam",
    model_options={"base_width": 4},
    epochs=1,
    batch_size=8,
    lr=0.01,
    device="cpu",
    amp=False,
    channels_last=False,
)
FLIPS = recipes.Recipe(name="flips", flips=True, rot90=True)


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("nested_recipe_bench", REPO / "benchmarks" / "nested_recipe.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    return bench


bench = _bench()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny dataset, outer fold 0 of two candidates (paper, flips), and one nested run over it."""
    root = tmp_path_factory.mktemp("nested")
    ds = write_tiny_dataset(root / "d3c.h5", n=30, channels=3, folds=3)
    runs = {}
    for name, recipe in (("paper", recipes.PAPER), ("flips", FLIPS)):
        runs[name] = root / name
        train(ds, runs[name], TrainConfig(recipe=recipe, **TINY), folds=[0], progress=False)
    specs = [f"{n}={r}" for n, r in runs.items()]
    args = [str(ds), *specs, "--workdir", str(root / "work"), "--n-inner", "2", "--outer-folds", "0"]
    assert bench.main([*args, "--bootstrap", "50", "-o", str(root / "report.md")]) == 0
    report = json.loads((root / "report.json").read_text())
    return {"root": root, "ds": ds, "runs": runs, "specs": specs, "args": args, "report": report}


def _inner_auc(workdir: Path, name: str, n_inner: int) -> float:
    from sklearn.metrics import roc_auc_score

    res = [read_fold_result(workdir / "outer0" / name / f"fold{j}" / "result.h5", j) for j in range(n_inner)]
    return roc_auc_score(np.concatenate([r.test_y for r in res]), np.concatenate([r.test_prob for r in res]))


def test_report_is_the_inner_choice_and_the_chosen_outer_predictions(setup):
    report = setup["report"]
    (fold,) = report["folds"]
    assert fold["outer_fold"] == 0 and fold["inner_trained"] == 4 and fold["inner_reused"] == 0
    for name in ("paper", "flips"):  # the inner AUC is that of the inner runs' pooled test predictions
        assert fold["scores"][name] == pytest.approx(_inner_auc(setup["root"] / "work", name, 2), abs=1e-12)
    best = max(("paper", "flips"), key=lambda n: (fold["scores"][n], n == "paper"))
    assert fold["chosen"] == best
    rows = {r["model"]: r for r in report["comparisons"]["models"]}
    pairs = {(p["a"], p["b"]): p for p in report["comparisons"]["pairs"]}
    assert list(rows) == ["nested", "paper", "flips", "features (LR)"]
    assert list(pairs) == [("nested", "paper"), ("nested", "flips"), ("nested", "features (LR)")]
    assert all(0 <= p["holm_p"] <= 1 for p in pairs.values())
    # the nested model is the chosen candidate's own outer predictions: identical AUC, zero DeLong difference
    assert rows[best]["auc"]["estimate"] == pytest.approx(rows["nested"]["auc"]["estimate"], abs=1e-12)
    assert pairs[("nested", best)]["auc_diff"] == pytest.approx(0.0, abs=1e-12)
    outer = read_fold_result(setup["runs"][best] / "fold0" / "result.h5", 0)
    from sklearn.metrics import roc_auc_score

    assert rows["nested"]["auc"]["estimate"] == pytest.approx(roc_auc_score(outer.test_y, outer.test_prob), abs=1e-9)
    text = (setup["root"] / "report.md").read_text()
    assert "the chosen candidate's prediction in its own outer run" in text and f"**{best}**" in text


def test_choice_never_reads_the_outer_test_fold(setup, tmp_path):
    """Outer test rows made unusable (NaN images, flipped labels) leave every inner score as it was;
    the same poison in a training row makes the choice fail, so the check can fail."""
    ds = load_dataset(setup["ds"])
    cands = bench.load_candidates(setup["specs"], ds)
    cfg = bench.train_config(cands[0].run, cands[0].rundir, None)

    def poisoned(fold):
        rows = ds.fold == fold
        x, y = ds.x.copy(), ds.y.copy()
        x[rows], y[rows] = np.nan, 1 - y[rows]
        return dataclasses.replace(ds, x=x, y=y)

    choice = bench.choose(poisoned(0), 0, cands, cfg, tmp_path / "outer", 2, 0)
    (clean,) = setup["report"]["folds"]
    assert choice["scores"] == clean["scores"] and choice["chosen"] == clean["chosen"]
    with pytest.raises(TrainingDiverged):
        bench.choose(poisoned(1), 0, cands, cfg, tmp_path / "inner", 2, 0)


def _count_epochs(monkeypatch) -> list:
    epochs = []
    original = training.run_epoch
    monkeypatch.setattr(training, "run_epoch", lambda ctx, state: epochs.append(state.fold) or original(ctx, state))
    return epochs


def test_rerun_reuses_finished_inner_runs_and_resumes_the_rest(setup, monkeypatch, tmp_path):
    work = setup["root"] / "work"
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("fold*/*")}
    epochs = _count_epochs(monkeypatch)
    assert bench.main([*setup["args"], "--bootstrap", "20", "-o", str(tmp_path / "again.md")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["folds"][0]
    assert epochs == [] and again["inner_reused"] == 4 and again["inner_trained"] == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("fold*/*")} == stamps
    assert again["scores"] == setup["report"]["folds"][0]["scores"]
    # an inner fold lost (as if interrupted before its first checkpoint): only it is trained again
    shutil.copytree(work, tmp_path / "work")
    shutil.rmtree(tmp_path / "work" / "outer0" / "flips" / "fold1")
    args = [a if a != str(work) else str(tmp_path / "work") for a in setup["args"]]
    assert bench.main([*args, "--bootstrap", "20", "-o", str(tmp_path / "resumed.md")]) == 0
    resumed = json.loads((tmp_path / "resumed.json").read_text())["folds"][0]
    assert epochs == [1] and resumed["inner_reused"] == 3 and resumed["inner_trained"] == 1
    assert resumed["scores"] == again["scores"]


def test_time_one_trains_one_inner_fold_and_keeps_nothing(setup, tmp_path, monkeypatch, capsys):
    epochs = _count_epochs(monkeypatch)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the temporary run folder goes here, and must be gone after
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert bench.main([setup["args"][0], *setup["specs"], "--outer-folds", "0", "--time-one", "flips"]) == 0
    out = capsys.readouterr().out
    assert (
        "one inner fold of flips (outer fold 0, inner fold 0" in out and "1 outer x 2 candidates x 3 inner = 6" in out
    )
    assert epochs == [0] and os.listdir(tmp_path) == []


def _edited_copy(rundir: Path, dest: Path, edit) -> Path:
    shutil.copytree(rundir, dest)
    record = json.loads((dest / "run.json").read_text())
    edit(record)
    (dest / "run.json").write_text(json.dumps(record))
    return dest


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda r: r["optimiser"].update(lr=0.02), "differs from"),
        (lambda r: r.update(epochs=2), "in epochs"),
        (lambda r: r.update(seed=1), "in seed"),
    ],
)
def test_runs_that_differ_beyond_the_recipe_are_refused(setup, tmp_path, capsys, edit, says):
    other = _edited_copy(setup["runs"]["flips"], tmp_path / "other", edit)
    out = tmp_path / "r.md"
    args = [setup["args"][0], setup["specs"][0], f"flips={other}", "--workdir", str(tmp_path / "w"), "-o", str(out)]
    assert bench.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested_recipe: error:") and says in err and "\n" not in err
    assert not out.exists() and not (tmp_path / "w").exists()


def test_settings_the_inner_runs_cannot_reproduce_are_refused(setup, tmp_path, capsys):
    """Both runs agree, but on a setting training cannot take (Nesterov momentum): no inner run
    could be trained like them, so their outer folds cannot stand for the nested model."""
    specs = [
        f"{n}={_edited_copy(setup['runs'][n], tmp_path / n, lambda r: r['optimiser'].update(nesterov=True))}"
        for n in ("paper", "flips")
    ]
    assert bench.main([setup["args"][0], *specs, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "optimiser" in err and "cannot be reproduced" in err and "\n" not in err
    assert not (tmp_path / "w").exists()


def test_an_outer_fold_reused_only_if_trained_on_its_whole_training_part(setup):
    ds = load_dataset(setup["ds"])
    cands = bench.load_candidates(setup["specs"], ds)
    cfg = bench.train_config(cands[0].run, cands[0].rundir, None)
    res = read_fold_result(setup["runs"]["paper"] / "fold0" / "result.h5", 0)
    assert bench._reuse_problem(res, ds, 0, cfg) is None
    seed1 = json.dumps(dict(json.loads(res.attrs["run"]), seed=1))
    for changed, says in (
        (dict(train_index=res.train_index[1:]), "not trained on exactly the rows outside"),  # a row left out
        (dict(train_index=np.append(res.train_index, res.test_index[0])), "not trained on exactly"),  # a test row in
        (dict(test_index=res.test_index[1:]), "test rows are not the dataset's fold"),
        (dict(train_index=None), "records no training rows"),
        (dict(attrs=dict(res.attrs, run=seed1)), "seed 1, not 0"),
        (dict(epochs=2), "2 epochs, not 1"),
    ):
        assert says in bench._reuse_problem(dataclasses.replace(res, **changed), ds, 0, cfg)


def test_bad_inputs_are_one_line_and_write_nothing(setup, tmp_path, capsys):
    ds_other = write_tiny_dataset(tmp_path / "other.h5", n=30, channels=3, folds=3, seed=1)
    work = tmp_path / "w"
    cases = [
        ([str(ds_other), *setup["specs"]], "is not the dataset of"),  # another dataset
        ([setup["args"][0], setup["specs"][0], "flips"], "NAME=RUNDIR"),
        ([setup["args"][0], setup["specs"][0]], "at least two candidates"),
        ([setup["args"][0], *setup["specs"], "--outer-folds", "1"], "fold1"),  # not finished in the outer runs
        ([setup["args"][0], *setup["specs"], "--outer-folds", "7"], "--outer-folds"),
    ]
    for argv, says in cases:
        assert bench.main([*argv, "--workdir", str(work), "-o", str(tmp_path / "r.md")]) == 2, says
        err = capsys.readouterr().err.strip()
        assert err.startswith("nested_recipe: error:") and says in err and "\n" not in err, err
        assert not work.exists() and not (tmp_path / "r.md").exists()


def test_a_workdir_made_otherwise_is_refused(setup, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(setup["root"] / "work", work)
    args = [a if a != str(setup["root"] / "work") else str(work) for a in setup["args"]]
    assert bench.main([*args, "--seed", "1"]) == 2  # another inner split
    assert "inner_split_seed" in capsys.readouterr().err
    # the same name for another recipe: its inner runs are not this recipe's
    paper, flips = setup["specs"]
    assert bench.main([args[0], paper.replace("paper=", "flips="), flips.replace("flips=", "paper="), *args[3:]]) == 2
    assert "another recipe named" in capsys.readouterr().err
    assert sorted(os.listdir(work)) == sorted(os.listdir(setup["root"] / "work"))
