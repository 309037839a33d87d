"""benchmarks/recipe_compare.py: seed ensembles and the pairs it tests (issue 21's comparison table)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_compare  # noqa: E402

from nodulekit.errors import NodulekitError  # noqa: E402
from nodulekit.run import read_fold_result  # noqa: E402
from nodulekit.training import TrainConfig, train  # noqa: E402
from tests.conftest import write_tiny_dataset  # noqa: E402

TINY = dict(model_options={"base_width": 4}, epochs=1, batch_size=8, lr=0.01, device="cpu", amp=False)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """A tiny dataset of 3 patient folds and two runs on it that differ only in the seed."""
    root = tmp_path_factory.mktemp("recipe_compare")
    ds = write_tiny_dataset(root / "d3c.h5", n=30, channels=3, folds=3)
    for seed in (0, 1):
        train(ds, root / f"s{seed}", TrainConfig(arch="hesam", seed=seed, **TINY), progress=False)
    return ds, root / "s0", root / "s1"


def _by_row(rundir: Path, n: int) -> np.ndarray:
    """Each row's test probability read fold by fold (independently of recipe_compare)."""
    prob = np.full(n, np.nan)
    for k in range(3):
        res = read_fold_result(rundir / f"fold{k}" / "result.h5", k)
        prob[np.asarray(res.test_index)] = res.test_prob
    return prob


def test_several_rundirs_are_their_mean_probability(two_seeds):
    _, a, b = two_seeds
    pa, pb = _by_row(a, 30), _by_row(b, 30)
    assert not np.allclose(pa, pb)  # the seeds differ, so a wrong pick (first run only) would show
    rows, mean = recipe_compare.ensemble_of([a, b], [0, 1, 2])
    assert np.array_equal(rows, np.arange(30))
    np.testing.assert_allclose(mean, (pa + pb) / 2, rtol=1e-6)


def test_pairs_are_the_named_ones_holm_over_them(two_seeds, capsys):
    from nodulekit.datasets import load_dataset
    from nodulekit.stats import delong_test

    ds_path, a, b = two_seeds
    ds = load_dataset(ds_path)
    code = recipe_compare.main(
        [
            str(ds_path),
            f"s0={a}",
            f"s1={b}",
            f"both={a},{b}",
            "--pair",
            "s1:s0",
            "--pair",
            "both:s1",
            "--bootstrap",
            "50",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = [ln for ln in out.splitlines() if " − " in ln]
    assert [r.split("|")[1].strip() for r in rows] == ["s1 − s0", "both − s1"]  # only the pairs asked, in order
    pa, pb = _by_row(a, 30), _by_row(b, 30)
    p = [delong_test(ds.y, pb, pa)["p_value"], delong_test(ds.y, (pa + pb) / 2, pb)["p_value"]]
    # Holm by hand for two tests: the smaller p doubled, the larger at least that
    lo, hi = sorted(p)
    holm = {lo: min(1.0, 2 * lo), hi: min(1.0, max(2 * lo, hi))}
    for row, raw in zip(rows, p, strict=True):
        cells = [c.strip() for c in row.split("|")]
        assert float(cells[3]) == pytest.approx(raw, rel=0.05, abs=1e-3)
        assert float(cells[4]) == pytest.approx(holm[raw], rel=0.05, abs=1e-3)


def test_bad_pair_and_unequal_folds_are_one_line(two_seeds, tmp_path, capsys):
    ds_path, a, b = two_seeds
    with pytest.raises(NodulekitError, match="bogus"):
        recipe_compare.parse_pairs(["s0:bogus"], ["s0", "s1"])
    with pytest.raises(NodulekitError, match="A:B"):
        recipe_compare.parse_pairs(["s0"], ["s0", "s1"])
    assert recipe_compare.parse_pairs([], ["r", "x", "y"]) == [("x", "r"), ("y", "r")]
    # a run on other folds of the same nodules cannot join an ensemble
    other = write_tiny_dataset(tmp_path / "other.h5", n=30, channels=3, folds=4)
    train(other, tmp_path / "o", TrainConfig(arch="hesam", **TINY), folds=[0], progress=False)
    code = recipe_compare.main([str(ds_path), f"x={a},{tmp_path / 'o'}", "--bootstrap", "20"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "recipe_compare: error:" in err
