"""benchmarks/paper_tables.py: the typed-in tables and the arithmetic checks on them."""

from __future__ import annotations

import pytest
from test_evaluation import load_benchmark

P = load_benchmark("paper_tables")


def test_the_typed_tables_hold_every_published_number():
    values = P.published_values()
    counts = {
        m: sum(v.metric == m for v in values) for m in ("accuracy", "accuracy_spread", "sensitivity", "specificity")
    }
    # Table 2: 18 rows x 4 datasets + Table 3: 4 + Table 4: 4 x 4 accuracies; 18 + 4 + 16 of each rate
    assert counts == {"accuracy": 92, "accuracy_spread": 72, "sensitivity": 38, "specificity": 38}
    hesam = {(v.dataset, v.metric): v.text for v in values if v.table == "Table 2" and v.row == "Ours-HESAM"}
    assert hesam[("D11C", "accuracy")] == "99.13" and hesam[("D11C", "sensitivity")] == "0.9705"


def test_counts_of_one_fold_known_answers():
    assert P.nearest_count(99.13, 229, scale=100, decimals=2) == 227  # 227/229 = 99.127
    assert P.nearest_count(96.69, 229, scale=100, decimals=2) is None  # 221/229 = 96.51, 222/229 = 96.94
    assert P.nearest_count(0.9216, 102, decimals=4) == 94  # 0.92157 rounds to 0.9216
    assert P.nearest_count(0.9705, 102, decimals=4) is None  # 99/102 = 0.970588 rounds to 0.9706 ...
    assert P.nearest_count(0.9705, 102, decimals=4, truncation=True) == 99  # ... and is cut to 0.9705


def test_hesam_accuracy_does_not_follow_from_its_sensitivity_and_specificity():
    result = P.checks(truncation=True)
    row = next(r for r in result["implied"] if r["table"] == "Table 2" and r["row"] == "Ours-HESAM")
    assert (row["k_sensitivity"], row["k_specificity"]) == (99, 126)
    assert row["implied_accuracy"] == pytest.approx(100 * 225 / 229) and not row["consistent"]
    baseline = next(r for r in result["implied"] if r["table"] == "Table 2" and r["row"] == "Baseline")
    assert baseline["consistent"]  # 94/102 and 123/127 give 217/229 = 94.76, as printed
    s = result["summary"]
    assert s["accuracies_k_of_229"] == 87 and s["rates_k_of_own_class"] == 74
    assert s["spreads_below_binomial_sd"] == s["spreads"] == 72
    assert s["d1c_accuracy_range"] == [79.91, 85.59]
    assert "| accuracies that are k / 229 | 87 of 92 |" in P.markdown(result)
