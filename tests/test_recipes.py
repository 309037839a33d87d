"""Training recipes (nodulekit.recipes): soft targets, augmentation, EMA, TTA, nested selection, records."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from nodulekit import recipes, training
from nodulekit.datasets import load_dataset, write_dataset
from nodulekit.errors import NodulekitError
from nodulekit.training import TrainConfig, train
from tests.conftest import write_tiny_dataset

TINY = dict(model_options={"base_width": 4}, epochs=1, batch_size=8, lr=0.01, device="cpu", amp=False)
TINY_ARGS = ["--model-opt", "base_width=4", "--epochs", "1", "--batch-size", "8", "--no-amp", "--no-channels-last"]


@pytest.fixture(scope="module")
def d3c(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("recipes") / "d3c.h5", n=30, channels=3, folds=3)


# ----------------------------------------------------------------------------- soft targets


def test_soft_targets_are_the_readers_calls_by_hand():
    ratings = np.array(
        [
            [5, 4, 2, np.nan],  # two malignant calls, one benign: 2/3
            [3, 3, 4, 4],  # two abstentions (half each), two malignant: 3/4
            [1, 2, 2, 2],  # all benign: 0
            [4, np.nan, np.nan, np.nan],  # one reader: 1
        ],
        np.float32,
    )
    got = recipes.reader_soft_targets(ratings, {"malignant_above": 3.0, "benign_below": 3.0})
    np.testing.assert_allclose(got[:, 1], [2 / 3, 3 / 4, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
    # the label rule's thresholds are used, not a fixed 3: with "above 4" the 4s become abstentions (half each)
    strict = recipes.reader_soft_targets(ratings, {"malignant_above": 4.0, "benign_below": 3.0})
    np.testing.assert_allclose(strict[:, 1], [(1 + 0.5) / 3, (0.5 * 4) / 4, 0.0, 0.5], rtol=1e-6)


def test_soft_targets_reach_the_loss():
    """The loss of a batch with soft targets is the cross-entropy against those targets, not the labels."""
    from nodulekit.training import batch_loss

    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    target = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    batch = {"y": torch.tensor([1, 0]), "target": target}
    loss, ce, _ = batch_loss(lambda b: (logits, torch.zeros(())), batch)
    expected = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert float(ce) == pytest.approx(float(expected), rel=1e-6)
    hard = batch_loss(lambda b: (logits, torch.zeros(())), {"y": batch["y"]})[1]
    assert float(hard) != pytest.approx(float(expected), rel=1e-3)


# ----------------------------------------------------------------------------- augmentation


def test_rotations_and_flips_are_exact_dihedral_copies():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out, _ = recipes.augment_batch(x, recipes.Recipe(flips=True, rot90=True), gen)
    views = [recipes.dihedral(x, k, f) for k in range(4) for f in (False, True)]
    seen = set()
    for i in range(len(x)):
        err = [float((out[i] - v[i]).abs().max()) for v in views]
        assert min(err) < 1e-5, "each sample must be one of its 8 flips/rotations"
        seen.add(int(np.argmin(err)))
    assert len(seen) == 8  # all eight are drawn
    # shifts move the content by at most shift_px pixels and keep it otherwise
    out, _ = recipes.augment_batch(x, recipes.Recipe(shift_px=2.0), torch.Generator().manual_seed(1))
    assert not torch.allclose(out, x)
    centre = (slice(None), slice(None), slice(4, 28), slice(4, 28))
    assert float((out - x)[centre].abs().mean()) < float((torch.rand_like(x) - x)[centre].abs().mean())


def test_masks_follow_the_images():
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 4:10, 20:30] = 1.0
    mask = (x > 0.5).to(torch.uint8)
    out, (m,) = recipes.augment_batch(x, recipes.Recipe(flips=True, rot90=True), gen, [mask])
    assert torch.equal((out > 0.5).to(torch.uint8), m)


def test_augmentation_never_mixes_patients_across_folds(d3c, tmp_path, monkeypatch):
    """Every augmented batch holds training rows of its fold only: no test patient is ever transformed."""
    seen = []
    original = recipes.RecipeHooks.batch

    def spy(self, batch):
        seen.append(batch["index"].cpu().numpy().copy())
        return original(self, batch)

    monkeypatch.setattr(recipes.RecipeHooks, "batch", spy)
    cfg = TrainConfig(arch="hesam", recipe=recipes.ROBUST, **TINY)
    train(d3c, tmp_path / "run", cfg, folds=[1], progress=False)
    ds = load_dataset(d3c)
    rows = np.concatenate(seen)
    assert len(rows) >= len(np.flatnonzero(ds.fold != 1)) - 1
    assert set(ds.fold[rows]) == {0, 2}
    assert not set(ds.patient_id[rows]) & set(ds.patient_id[ds.fold == 1])


# ----------------------------------------------------------------------------- EMA, TTA


def test_ema_is_the_exponential_average_of_the_weights():
    model = torch.nn.Linear(3, 2)
    w0 = model.weight.detach().clone()
    hooks = recipes.RecipeHooks(recipes.Recipe(ema_decay=0.9), _NoData(), model, 0, torch.device("cpu"))
    with torch.no_grad():
        model.weight.add_(1.0)
    hooks.after_step(model)  # first update copies the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    hooks.after_step(model)
    reported = hooks.reported_state(model.state_dict())
    torch.testing.assert_close(reported["weight"], 0.9 * (w0 + 1) + 0.1 * (w0 + 2))


class _NoData:
    reader_malignancy = np.zeros((1, 4))
    y = np.zeros(1, np.int64)
    label_rule = None


def test_tta_is_the_mean_over_the_eight_views():
    from nodulekit.training import predict_logits

    torch.manual_seed(0)
    model = _Tiny()
    x = torch.rand(5, 2, 32, 32)
    got = recipes.tta_probabilities(model, x, np.arange(5), 4, False, predict_logits)
    views = [torch.softmax(model(recipes.dihedral(x, k, f)), 1) for k in range(4) for f in (False, True)]
    torch.testing.assert_close(got, torch.stack(views).mean(0))
    assert not torch.allclose(got, views[0])  # the model is not invariant, so TTA changes something


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2 * 32 * 32, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


# ----------------------------------------------------------------------------- nested selection


def test_nested_selection_never_reads_the_outer_test_fold(d3c, tmp_path):
    """Poisoning the outer test fold (noise inputs, flipped labels) leaves every inner score unchanged;
    poisoning a training fold changes them (so the check can fail)."""
    ds = load_dataset(d3c)
    candidates = {"paper": recipes.PAPER, "flips": recipes.Recipe(name="flips", flips=True, rot90=True)}
    cfg = TrainConfig(arch="hesam", **TINY)

    def poisoned(fold):
        rows = ds.fold == fold
        x = ds.x.copy()
        x[rows] = np.random.default_rng(1).random(x[rows].shape, dtype=np.float32)
        y = ds.y.copy()
        y[rows] = 1 - y[rows]
        return dataclasses.replace(ds, x=x, y=y)

    clean = training.nested_selection(ds, 0, candidates, cfg, tmp_path / "a", n_inner=2)
    outer = training.nested_selection(poisoned(0), 0, candidates, cfg, tmp_path / "b", n_inner=2)
    assert outer["scores"] == clean["scores"] and outer["chosen"] == clean["chosen"]
    inner = training.nested_selection(poisoned(2), 0, candidates, cfg, tmp_path / "c", n_inner=2)
    assert inner["scores"] != clean["scores"]


def test_training_part_holds_no_outer_row(d3c):
    ds = load_dataset(d3c)
    part, keep = recipes.training_part(ds, 1)
    assert len(part.y) == int((ds.fold != 1).sum()) and not (part.fold == 1).any()
    assert not set(part.nodule_id) & set(ds.nodule_id[ds.fold == 1])
    folds = recipes.inner_folds(part, 2, 0)
    for k in (0, 1):
        assert not set(part.patient_id[folds == k]) & set(part.patient_id[folds != k])


# ----------------------------------------------------------------------------- records


def test_recipe_round_trips_through_run_checkpoint_and_onnx(d3c, tmp_path, run_cli):
    from nodulekit.export import export_onnx, load_model_source, read_metadata
    from nodulekit.run import load_checkpoint, load_run

    rd = tmp_path / "run"
    code, _, err = run_cli("train", d3c, "-o", rd, "--fold", "0", "--recipe", "robust", *TINY_ARGS)
    assert code == 0, err
    assert recipes.recipe_from_record(load_run(rd)["recipe"]) == recipes.ROBUST
    ckpt = load_checkpoint(rd / "fold0" / "checkpoint.pt")
    assert recipes.recipe_from_record(ckpt["recipe"]) == recipes.ROBUST
    # the reported weights are the EMA's, the raw ones are kept to resume
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["resume"]["model"][k]) for k in ckpt["state_dict"])
    out = tmp_path / "m.onnx"
    export_onnx(load_model_source(rd, fold=0), out, exporter="torchscript")
    meta = read_metadata(out)
    assert recipes.recipe_from_record(meta[recipes.RECIPE_KEY]) == recipes.ROBUST


def test_paper_recipe_changes_nothing(d3c, tmp_path):
    """--recipe paper (the default) trains exactly as a run without recipes, and run.json says nothing new."""
    from nodulekit.run import load_run, read_fold_result

    a = train(d3c, tmp_path / "a", TrainConfig(arch="hesam", **TINY), folds=[0], progress=False)
    b = train(d3c, tmp_path / "b", TrainConfig(arch="hesam", recipe=recipes.PAPER, **TINY), folds=[0], progress=False)
    assert "recipe" not in load_run(tmp_path / "b")
    pa = read_fold_result(tmp_path / "a" / "fold0" / "result.h5", 0).test_prob
    pb = read_fold_result(tmp_path / "b" / "fold0" / "result.h5", 0).test_prob
    assert np.array_equal(pa, pb) and a["folds"][0]["test_acc"] == b["folds"][0]["test_acc"]
    robust = train(
        d3c, tmp_path / "c", TrainConfig(arch="hesam", recipe=recipes.ROBUST, **TINY), folds=[0], progress=False
    )
    pc = read_fold_result(tmp_path / "c" / "fold0" / "result.h5", 0).test_prob
    assert robust["folds"][0]["status"] == "trained" and not np.array_equal(pa, pc)


# ----------------------------------------------------------------------------- bad input


def _one_line_exit_2(result, *words):
    code, _, err = result
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nodulekit: error:"), err
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--recipe", "bogus"], ["bogus", "paper, robust"]),
        (["--recipe", "robust", "--recipe-opt", "wings=3"], ["wings"]),
        (["--recipe", "robust", "--recipe-opt", "dropout=1.5"], ["dropout"]),
        (["--recipe", "robust", "--recipe-opt", "tta=maybe"], ["tta"]),
    ],
)
def test_bad_recipe_is_one_line_exit_2_nothing_written(d3c, tmp_path, extra, words, run_cli):
    out = tmp_path / "run"
    _one_line_exit_2(run_cli("train", d3c, "-o", out, *TINY_ARGS, *extra), *words)
    assert not out.exists()


def test_soft_targets_without_reader_ratings_refused(d3c, tmp_path, run_cli):
    ds = load_dataset(d3c)
    bare = dataclasses.replace(ds, reader_malignancy=np.full_like(ds.reader_malignancy, np.nan))
    path = tmp_path / "bare.h5"
    from nodulekit.artifacts import provenance

    write_dataset(path, bare, provenance(source="test"))
    out = tmp_path / "run"
    result = run_cli("train", path, "-o", out, *TINY_ARGS, "--recipe", "robust")
    _one_line_exit_2(result, "reader_malignancy", "targets=hard")
    assert not out.exists()
    # the same dataset trains with hard targets
    ok = run_cli(
        "train",
        path,
        "-o",
        out,
        *TINY_ARGS,
        "--fold",
        "0",
        "--recipe",
        "robust",
        "--recipe-opt",
        "targets=hard",
    )
    assert ok[0] == 0, ok[2]


def test_rotations_of_non_square_inputs_refused(d3c):
    ds = load_dataset(d3c)
    wide = dataclasses.replace(ds, x=np.zeros((len(ds.y), 3, 32, 16), np.float32))
    with pytest.raises(NodulekitError, match="square"):
        recipes.check_applicable(recipes.ROBUST, wide)
    recipes.check_applicable(dataclasses.replace(recipes.ROBUST, rot90=False, tta=False), wide)  # flips still fine


def test_resuming_with_another_recipe_is_refused(d3c, tmp_path, run_cli):
    rd = tmp_path / "run"
    assert run_cli("train", d3c, "-o", rd, "--fold", "0", *TINY_ARGS)[0] == 0
    before = json.loads((rd / "run.json").read_text())
    result = run_cli("train", d3c, "-o", rd, "--fold", "1", *TINY_ARGS, "--recipe", "robust")
    _one_line_exit_2(result, "recipe")
    assert json.loads((rd / "run.json").read_text()) == before and not (rd / "fold1").exists()


# ----------------------------------------------------------------------------- EMA batch norm


def _first_batch_norm_input_stats(model, x):
    """Mean and unbiased variance per channel of what the first BatchNorm2d receives (its input
    depends on no batch-norm statistic, so any weights' eval pass gives it)."""
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    a = torch.cat(seen).transpose(0, 1).reshape(bn.num_features, -1).double()
    return a.mean(1), a.var(1, unbiased=True)


@pytest.mark.parametrize("mode", ["recompute", "average"])
def test_ema_weights_get_their_own_batch_norm_statistics(d3c, tmp_path, mode):
    from nodulekit.run import build_model, load_checkpoint

    recipe = dataclasses.replace(recipes.ROBUST, tta=False, ema_batch_norm=mode)
    cfg = TrainConfig(arch="hesam", recipe=recipe, **{**TINY, "epochs": 2})
    train(d3c, tmp_path / "r", cfg, folds=[0], progress=False)
    ckpt = load_checkpoint(tmp_path / "r" / "fold0" / "checkpoint.pt")
    model = build_model(ckpt["arch"], ckpt["in_channels"], 2, ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    ds = load_dataset(d3c)
    train_rows = torch.from_numpy(ds.x[ds.fold != 0])
    mean, var = _first_batch_norm_input_stats(model, train_rows)
    bn_key = next(k for k in ckpt["state_dict"] if k.endswith("running_mean"))
    got_mean = ckpt["state_dict"][bn_key].double()
    got_var = ckpt["state_dict"][bn_key.replace("running_mean", "running_var")].double()
    matches = torch.allclose(got_mean, mean, rtol=1e-4, atol=1e-5) and torch.allclose(
        got_var, var, rtol=1e-3, atol=1e-5
    )
    # recomputed: exactly the training rows' statistics under the EMA weights; averaged: not those
    assert matches == (mode == "recompute")
    assert recipes.recipe_from_record(ckpt["recipe"]).ema_batch_norm == mode


def test_recipes_recorded_before_ema_batch_norm_read_as_averaged():
    old_robust = {k: v for k, v in recipes.ROBUST.as_dict().items() if k != "ema_batch_norm"}
    assert recipes.recipe_from_record(old_robust).ema_batch_norm == "average"
    old_paper = {k: v for k, v in recipes.PAPER.as_dict().items() if k != "ema_batch_norm"}
    assert recipes.recipe_from_record(old_paper) == recipes.PAPER  # no EMA: nothing to say, still the paper's
    assert recipes.ROBUST.ema_batch_norm == "recompute"
    with pytest.raises(NodulekitError, match="ema_batch_norm"):
        recipes.resolve_recipe("robust", {"ema_batch_norm": "sometimes"})
