"""Training recipes (nodulekit.recipes): each value's bounds at their edges with its one-line message,
the options' parsing and names, records, and the augmentation against an independent resampling."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nodulekit import recipes
from nodulekit.errors import NodulekitError
from nodulekit.recipes import PAPER, ROBUST, Recipe, check_values, resolve_recipe

# --------------------------------------------------------------------------- values and their bounds


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shift_px": 8.01}, "recipe shift_px must be in [0, 8] (got 8.01)"),
        ({"shift_px": -0.5}, "recipe shift_px must be in [0, 8] (got -0.5)"),
        ({"scale": 0.5}, "recipe scale must be in [0, 0.5) (got 0.5)"),
        ({"scale": -0.1}, "recipe scale must be in [0, 0.5) (got -0.1)"),
        ({"label_smoothing": 0.5}, "recipe label_smoothing must be in [0, 0.5) (got 0.5)"),
        ({"label_smoothing": -0.1}, "recipe label_smoothing must be in [0, 0.5) (got -0.1)"),
        ({"dropout": 1.0}, "recipe dropout must be in [0, 1) (got 1.0)"),
        ({"dropout": -0.1}, "recipe dropout must be in [0, 1) (got -0.1)"),
        ({"ema_decay": 1.0}, "recipe ema_decay must be in [0, 1) (got 1.0)"),
        ({"ema_decay": -0.5}, "recipe ema_decay must be in [0, 1) (got -0.5)"),
        ({"seeds": 0}, "recipe seeds must be at least 1 (got 0)"),
        ({"weight_decay": -1e-4}, "recipe weight_decay must be >= 0 (got -0.0001)"),
        ({"weight_decay": math.inf}, "recipe weight_decay must be >= 0 (got inf)"),
        ({"shift_px": math.nan}, "recipe shift_px must be in [0, 8] (got nan)"),
        ({"dropout": 2.0, "scale": 0.6}, "recipe scale must be in [0, 0.5) (got 0.6)"),  # the first in order
        ({"targets": "soft"}, "recipe targets must be one of hard, readers, smooth (got 'soft')"),
        ({"ema_batch_norm": "x"}, "recipe ema_batch_norm must be one of recompute, average (got 'x')"),
        ({"targets": "smooth"}, "recipe targets=smooth needs label_smoothing > 0"),
    ],
)
def test_check_values_refuses_each_value_past_its_bound(change, message):
    with pytest.raises(NodulekitError) as info:
        check_values(dataclasses.replace(PAPER, **change))
    assert str(info.value) == message


def test_check_values_accepts_each_bound_that_is_inside():
    edges = dict(shift_px=8.0, scale=0.4999, label_smoothing=0.4999, dropout=0.999, ema_decay=0.999, seeds=1,
                 weight_decay=0.0, targets="smooth", ema_batch_norm="average")  # fmt: skip
    check_values(dataclasses.replace(PAPER, **edges))
    check_values(dataclasses.replace(PAPER, shift_px=0.0, scale=0.0, dropout=0.0, ema_decay=0.0, weight_decay=None))
    check_values(dataclasses.replace(PAPER, targets="readers"))


def test_resolve_recipe_names_and_parses_overrides():
    assert resolve_recipe("paper") is PAPER and resolve_recipe("robust", {}) is ROBUST
    got = resolve_recipe("robust", {"tta": "off", "dropout": "0.1", "seeds": "3", "weight_decay": "none"})
    assert (got.tta, got.dropout, got.seeds, got.weight_decay) == (False, 0.1, 3, None)
    assert got.name == "robust+dropout=0.1,seeds=3,tta=False,weight_decay=None"  # sorted by key
    assert resolve_recipe("robust", {"weight_decay": None}).weight_decay is None
    assert resolve_recipe("robust", {"weight_decay": "0.01"}).weight_decay == 0.01
    # overrides equal to the recipe's own values: still that recipe, by name
    same = resolve_recipe("robust", {"flips": "true", "dropout": 0.2})
    assert same == ROBUST and same.name == "robust"
    targets = resolve_recipe("paper", {"targets": "smooth", "label_smoothing": "0.1"})
    assert targets.name == "paper+label_smoothing=0.1,targets=smooth" and targets.targets == "smooth"
    with pytest.raises(NodulekitError) as info:
        resolve_recipe("fancy")
    assert str(info.value) == "unknown --recipe 'fancy'; choose one of paper, robust"
    with pytest.raises(NodulekitError) as info:
        resolve_recipe("paper", {"wings": 1})
    assert str(info.value) == (
        "unknown --recipe-opt 'wings'; known: flips, rot90, shift_px, scale, targets, label_smoothing, "
        "weight_decay, dropout, ema_decay, ema_batch_norm, tta, seeds"
    )
    with pytest.raises(NodulekitError, match=r"^recipe dropout must be in \[0, 1\) \(got 1.5\)$"):
        resolve_recipe("robust", {"dropout": "1.5"})  # the values are checked after the overrides


@pytest.mark.parametrize(
    "raw, value",
    [(True, True), (False, False), ("true", True), (" Yes ", True), ("ON", True), ("1", True), (1, True),
     ("false", False), ("no", False), ("Off", False), ("0", False), (0, False)],
)  # fmt: skip
def test_boolean_options_take_the_usual_spellings(raw, value):
    assert recipes._parse_value("flips", raw, bool) is value


def test_option_values_of_the_wrong_kind_are_one_line():
    with pytest.raises(NodulekitError) as info:
        recipes._parse_value("tta", "maybe", bool)
    assert str(info.value) == "--recipe-opt tta expects true or false, got 'maybe'"
    with pytest.raises(NodulekitError) as info:
        recipes._parse_value("scale", "big", float)
    assert str(info.value) == "--recipe-opt scale expects a number, got 'big'"
    with pytest.raises(NodulekitError, match="expects a number, got None"):
        recipes._parse_value("seeds", None, int)
    with pytest.raises(NodulekitError, match="expects a number, got '2.5'"):
        recipes._parse_value("seeds", "2.5", int)
    assert recipes._parse_value("targets", 5, str) == "5"
    assert recipes._parse_value("seeds", "4", int) == 4


def test_recipe_from_record():
    for absent in (None, "", "unknown"):
        assert recipes.recipe_from_record(absent) is PAPER
    text = '{"name": "robust", "flips": true, "ema_decay": 0.5, "future_key": 1}'
    got = recipes.recipe_from_record(text)
    assert got == Recipe(name="robust", flips=True, ema_decay=0.5, ema_batch_norm="average")
    assert recipes.recipe_from_record({"ema_decay": 0.5, "ema_batch_norm": "recompute"}).ema_batch_norm == "recompute"
    assert recipes.recipe_from_record({"ema_decay": 0}).ema_batch_norm == "recompute"
    assert recipes.recipe_from_record(ROBUST.as_dict()) == ROBUST
    assert ROBUST.as_dict()["shift_px"] == 2.0 and ROBUST.as_dict()["name"] == "robust"
    # the robust recipe is as documented (README): fixed before any result on the real data
    assert ROBUST == Recipe(name="robust", flips=True, rot90=True, shift_px=2.0, scale=0.1, targets="readers",
                            weight_decay=5e-4, dropout=0.2, ema_decay=0.98, tta=True, seeds=1)  # fmt: skip
    assert PAPER == Recipe() and PAPER.name == "paper" and not PAPER.augments and ROBUST.augments
    assert recipes.RECIPES == {"paper": PAPER, "robust": ROBUST}
    assert recipes.RECIPE_KEY == "training_recipe" and recipes.TARGETS == ("hard", "readers", "smooth")


# --------------------------------------------------------------------------- what a dataset can take


def data(h=32, w=32, ratings=None):
    ratings = np.array([[3.0, 4.0], [np.nan, np.nan], [1.0, np.nan]]) if ratings is None else ratings
    return SimpleNamespace(x=np.zeros((3, 1, h, w)), y=np.array([1, 0, 0]), reader_malignancy=ratings,
                           path="d.h5", label_rule=None)  # fmt: skip


def test_check_applicable_messages():
    rot = dataclasses.replace(PAPER, name="r", rot90=True)
    with pytest.raises(NodulekitError) as info:
        recipes.check_applicable(rot, data(w=16))
    assert str(info.value) == (
        "recipe r: 90-degree rotations need square inputs, d.h5 has 32x16; "
        "use --recipe-opt rot90=false --recipe-opt tta=false"
    )
    with pytest.raises(NodulekitError, match="has 16x32"):
        recipes.check_applicable(dataclasses.replace(PAPER, tta=True), data(h=16))
    recipes.check_applicable(dataclasses.replace(PAPER, flips=True), data(w=16))  # flips need no square
    readers = dataclasses.replace(PAPER, name="s", targets="readers")
    with pytest.raises(NodulekitError) as info:
        recipes.check_applicable(readers, data())
    assert str(info.value) == (
        "recipe s: soft targets from the readers need reader_malignancy ratings, but 1 of 3 nodules in d.h5 "
        "have none; use --recipe-opt targets=hard or smooth"
    )
    with pytest.raises(NodulekitError, match="but 3 of 3 nodules"):
        recipes.check_applicable(readers, data(ratings=np.array([1.0, 2.0, 3.0])))  # not one row per nodule
    recipes.check_applicable(readers, data(ratings=np.array([[3.0, np.nan], [1.0, 2.0], [5.0, 5.0]])))


def test_targets_of_each_kind():
    y = np.array([0, 1, 1])
    np.testing.assert_allclose(recipes.smoothed_targets(y, 0.1), [[0.95, 0.05], [0.05, 0.95], [0.05, 0.95]])
    assert recipes.smoothed_targets(y, 0.1).dtype == np.float32
    d = data(ratings=np.array([[5.0, 1.0], [2.0, np.nan], [3.0, np.nan]]))
    assert recipes.target_table(PAPER, d) is None
    np.testing.assert_allclose(recipes.target_table(Recipe(targets="readers"), d), [[0.5, 0.5], [1, 0], [0.5, 0.5]])
    np.testing.assert_allclose(
        recipes.target_table(Recipe(targets="smooth", label_smoothing=0.2), d), [[0.1, 0.9], [0.9, 0.1], [0.9, 0.1]]
    )
    # no rating at all: no vote, probability 0 (not a division by zero)
    none = recipes.reader_soft_targets(np.array([[np.nan, np.nan]]))
    np.testing.assert_array_equal(none, [[1.0, 0.0]])
    assert none.dtype == np.float32


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("k", [-5, -1, 0, 1, 2, 3, 4, 6])
def test_rot90_is_torchs(k):
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(recipes._rot90(x, k), torch.rot90(x, k, dims=(-2, -1)))
    for flip in (False, True):
        view = recipes.dihedral(x, k, flip)
        assert torch.equal(view, torch.rot90(x, k, dims=(-2, -1)).flip(-1) if flip else torch.rot90(x, k, (-2, -1)))
        assert torch.equal(recipes.undo_dihedral(view, k, flip), x)
    assert recipes.DIHEDRAL == ((0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False),
                                (3, True))  # fmt: skip


def expected_augmentation(x: np.ndarray, recipe: Recipe, seed: int) -> np.ndarray:
    """The same random draws, applied with scipy's affine resampling (bilinear, edge values beyond)."""
    from scipy.ndimage import affine_transform

    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    rand = torch.rand((b, 4), generator=g).double().numpy()
    u = torch.rand(b, generator=g).double().numpy()
    v = torch.rand((b, 2), generator=g).double().numpy()
    out = np.empty_like(x)
    for i in range(b):
        k = math.floor(rand[i, 0] * 4) if recipe.rot90 else 0
        sx = -1.0 if recipe.flips and rand[i, 1] < 0.5 else 1.0
        s = 1.0 + recipe.scale * (2 * u[i] - 1)
        t = recipe.shift_px * (2 * v[i] - 1)  # pixels (x, y)
        c, n = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
        # output pixel (x, y) about the centre reads input (c*sx*x - n*y, n*sx*x + c*y) / s + t
        a = np.array([[c * sx, -n], [n * sx, c]]) / s
        matrix = a[::-1, ::-1]  # scipy's axes are (y, x)
        centre = np.array([(h - 1) / 2, (w - 1) / 2])
        offset = centre - matrix @ centre + t[::-1]
        for ch in range(x.shape[1]):
            out[i, ch] = affine_transform(x[i, ch].astype(np.float64), matrix, offset, order=1, mode="nearest")
    return out


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(flips=True),
        Recipe(rot90=True),
        Recipe(shift_px=3.0),
        Recipe(scale=0.3),
        Recipe(flips=True, rot90=True, shift_px=2.0, scale=0.2),
    ],
    ids=["flips", "rot90", "shift", "scale", "all"],
)
def test_augment_batch_is_the_affine_resampling_of_its_draws(recipe):
    x = torch.rand(12, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    out, others = recipes.augment_batch(x, recipe, torch.Generator().manual_seed(11))
    assert others == [] and out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), expected_augmentation(x.numpy(), recipe, 11), atol=2e-5)
    assert not torch.allclose(out, x)


def test_masks_get_the_same_transform_nearest_and_keep_their_type():
    x = torch.zeros(6, 1, 16, 16)
    x[:, :, 3:7, 9:14] = 1.0
    mask = (x > 0.5).to(torch.uint8)
    recipe = Recipe(flips=True, rot90=True, shift_px=2.0)
    out, (m,) = recipes.augment_batch(x, recipe, torch.Generator().manual_seed(2), [mask])
    assert m.dtype == torch.uint8 and set(m.unique().tolist()) <= {0, 1}
    # where the image is clearly in or out after the (bilinear) resampling, the mask agrees
    sure = (out > 0.9) | (out < 0.1)
    assert torch.equal(m[sure], (out[sure] > 0.5).to(torch.uint8))
    assert int(m.sum()) > 0


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)
        self.a = torch.nn.Linear(2, 4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.a(self.bn(self.conv(x)).mean((2, 3))))


def test_hooks_dropout_on_the_last_linear_layer_only_in_training():
    model = _Head()
    assert recipes.last_linear(model) is model.fc
    assert recipes.last_linear(torch.nn.Conv2d(1, 1, 1)) is None
    seen = []
    recipes.RecipeHooks(Recipe(dropout=0.5), data(), model, 0, torch.device("cpu"))
    model.fc.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))  # runs after the dropout
    x = torch.rand(64, 1, 8, 8)
    model.train()
    model(x)
    dropped = seen[-1]
    zeros = float((dropped == 0).float().mean())
    assert 0.3 < zeros < 0.7  # p = 0.5 of the last layer's inputs are zeroed
    model.eval()
    model(x)
    assert float((seen[-1] == 0).float().mean()) == 0.0
    with pytest.raises(NodulekitError) as info:
        recipes.RecipeHooks(Recipe(dropout=0.1), data(), torch.nn.Conv2d(1, 1, 1), 0, torch.device("cpu"))
    assert str(info.value) == "recipe dropout needs a linear output layer; Conv2d has none"


def test_hooks_batch_state_and_refresh():
    model = _Head()
    recipe = Recipe(flips=True, targets="readers", ema_decay=0.5)
    d = data(ratings=np.array([[5.0, 5.0], [1.0, np.nan], [3.0, 4.0]]))
    hooks = recipes.RecipeHooks(recipe, d, model, 7, torch.device("cpu"))
    # the augmentation's stream is seeded from the fold's seed: 7 ^ 0x5EED
    assert torch.equal(hooks.generator.get_state(), torch.Generator().manual_seed(7 ^ 0x5EED).get_state())
    x = torch.rand(3, 1, 8, 8)
    mask = (x > 0.5).to(torch.uint8)
    batch = hooks.batch({"x": x, "mask": mask, "index": torch.tensor([2, 0])})
    expected, (m,) = recipes.augment_batch(x, recipe, torch.Generator().manual_seed(7 ^ 0x5EED), [mask])
    assert torch.equal(batch["x"], expected) and torch.equal(batch["mask"], m)
    torch.testing.assert_close(batch["target"], torch.tensor([[0.25, 0.75], [0.0, 1.0]]))
    no_mask = hooks.batch({"x": x, "mask": None, "index": torch.tensor([1])})
    assert no_mask["mask"] is None and torch.equal(no_mask["target"], torch.tensor([[1.0, 0.0]]))
    # no augmentation, hard targets: the batch is left as it is
    plain = recipes.RecipeHooks(Recipe(dropout=0.1), d, _Head(), 0, torch.device("cpu"))
    same = plain.batch({"x": x, "index": torch.tensor([0])})
    assert same["x"] is x and "target" not in same
    # state: the generator and the EMA's weights; loading it back restores both
    hooks.after_step(model)
    state = hooks.state()
    assert sorted(state) == ["ema", "generator"] and state["ema"] is not None
    again = recipes.RecipeHooks(recipe, d, _Head(), 1, torch.device("cpu"))
    again.load_state(state)
    assert torch.equal(again.generator.get_state(), hooks.generator.get_state())
    for key, value in hooks.ema.state_dict().items():
        assert torch.equal(again.ema.state_dict()[key], value)
    again.load_state(None)
    again.load_state({})
    assert plain.state()["ema"] is None and plain.reported_state({"w": 1}) == {"w": 1}
    assert not plain.refresh_batch_norm(model, x, [0, 1, 2], 2)
    # recomputed batch norm: the statistics of the training rows under these weights, in eval mode after
    assert hooks.refresh_batch_norm(model, x, [0, 2], 1)
    assert not model.training
    feats = model.conv(x[[0, 2]]).detach()
    torch.testing.assert_close(model.bn.running_mean, feats.mean((0, 2, 3)))
    avg = recipes.RecipeHooks(dataclasses.replace(recipe, ema_batch_norm="average"), d, model, 0, torch.device("cpu"))
    assert not avg.refresh_batch_norm(model, x, [0], 1)
    reported = hooks.reported_state({})
    assert set(reported) == set(hooks.ema.module.state_dict()) and all(
        v.device.type == "cpu" for v in reported.values()
    )


def test_hooks_for_the_paper_recipe_is_none():
    assert recipes.hooks_for(None, data(), _Head(), 0, "cpu") is None
    assert recipes.hooks_for(PAPER, data(), _Head(), 0, "cpu") is None
    assert isinstance(recipes.hooks_for(Recipe(flips=True), data(), _Head(), 0, "cpu"), recipes.RecipeHooks)


class _MapModel(torch.nn.Module):
    """A model whose map is not invariant to flips/rotations: logits and map from a fixed weighting."""

    def __init__(self):
        super().__init__()
        self.w = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)

    def activation_map(self, x):
        amap = x.sum(1, keepdim=True) * self.w.transpose(0, 1)  # [B, 2, 16, 16]
        return amap.mean((2, 3)), amap


def test_tta_activation_map_turns_each_view_back():
    model = _MapModel()
    x = torch.rand(3, 1, 16, 16)
    prob, amap = recipes.tta_activation_map(model, x)
    probs, maps = [], []
    for k, flip in recipes.DIHEDRAL:
        logits, m = model.activation_map(recipes.dihedral(x, k, flip))
        probs.append(torch.softmax(logits, 1))
        maps.append(recipes.undo_dihedral(m, k, flip))
    torch.testing.assert_close(prob, torch.stack(probs).mean(0))
    torch.testing.assert_close(amap, torch.stack(maps).mean(0))
    assert prob.shape == (3, 2) and amap.shape == (3, 2, 16, 16)


# --------------------------------------------------------------------------- seed ensembles


def test_ensemble_predictions_average_each_nodule_over_runs(monkeypatch):
    import pandas as pd

    frames = {
        "r1": pd.DataFrame({"nodule_id": ["a", "b", "c"], "fold": [0, 1, 1], "prob": [0.2, 0.4, 0.9], "y": [0, 1, 1]}),
        "r2": pd.DataFrame({"nodule_id": ["c", "a", "b"], "fold": [1, 0, 1], "prob": [0.5, 0.6, 0.1], "y": [1, 0, 1]}),
        "bad": pd.DataFrame({"nodule_id": ["a", "b", "c"], "fold": [0, 0, 1], "prob": [0.1, 0.1, 0.1], "y": [0, 1, 1]}),
        "less": pd.DataFrame({"nodule_id": ["a", "b"], "fold": [0, 1], "prob": [0.1, 0.1], "y": [0, 1]}),
    }
    monkeypatch.setattr("nodulekit.stats.run_predictions", lambda r: frames[str(r)].copy())
    out = recipes.ensemble_predictions(["r1", "r2"])
    assert list(out["nodule_id"]) == ["a", "b", "c"] and list(out["fold"]) == [0, 1, 1]  # the first run's order
    np.testing.assert_allclose(out["prob"], [0.4, 0.25, 0.7])
    assert list(out["y"]) == [0, 1, 1]
    only = recipes.ensemble_predictions(["r1", "r2"], folds=[1])
    assert list(only["nodule_id"]) == ["b", "c"]
    np.testing.assert_allclose(only["prob"], [0.25, 0.7])
    assert list(recipes.ensemble_predictions(["r1"])["prob"]) == [0.2, 0.4, 0.9]
    for other in ("bad", "less"):
        with pytest.raises(NodulekitError) as info:
            recipes.ensemble_predictions(["r1", "r2", other])
        assert str(info.value) == f"{other} does not hold the same nodules in the same test folds as r1"
