"""Training variance in the grid's comparisons: Table 5 across seeds, from the runs' predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_grid import TINY, edit, write_config
from test_stats import fake_run

from nodulekit.grid import load_grid
from nodulekit.grid_report import seeds_section


def test_grid_report_compares_the_seeds_of_each_method_as_one_arm(tmp_path):
    """Two seeds per method (hand-made RUNDIRs where the grid would train them): the section's AUCs
    are means over seeds, its interval is the seed x patient bootstrap, one row per method."""
    (tmp_path / "rois.h5").write_bytes(b"")  # only its existence is checked when planning
    plan = load_grid(write_config(tmp_path, edit(TINY, "bootstrap: 50", "bootstrap: 50\nseeds: [0, 1]"), rois=False))
    rng = np.random.default_rng(0)
    n = 48
    ids = [f"P{i // 2:03d}:{i % 2 + 1}" for i in range(n)]
    y = rng.integers(0, 2, n)
    aucs = {}
    for name in ("hesam+base_width=4", "cam+base_width=4"):
        for seed in plan.seeds:
            prob = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1)
            rundir = plan.root / plan.run_for(name, "d3c", seed).rundir
            rundir.parent.mkdir(parents=True, exist_ok=True)
            fake_run(rundir, ids, y, prob, folds=2, arch=name.split("+")[0])
            aucs.setdefault(name, []).append(roc_auc_score(y, prob))
    text, record = seeds_section(plan)
    (row,) = record["d3c"]
    assert (row["n_seeds_a"], row["n_seeds_b"]) == (2, 2)
    assert row["auc_a"] == pytest.approx(np.mean(aucs["hesam+base_width=4"]))
    assert row["auc_b"] == pytest.approx(np.mean(aucs["cam+base_width=4"]))
    assert f"{row['auc_diff']:+.3f} [{row['auc_diff_low']:+.3f}, {row['auc_diff_high']:+.3f}]" in text
    assert "| Ours-CAM | D3C |" in text and row["auc_verdict"] in text and "seeds (0, 1)" in text
    assert (
        "ΔAUC = reference minus method. The interval resamples patients and, per arm, seeds, so it carries the"
        " spread between retrainings; the p-values are on the seed-averaged probabilities;"
    ) in text
