"""The region scores' Markdown report: a well-formed table per grouping, each cell as documented.

mutmut (docs/testing.md) found the table's text unpinned: a broken header, separator or row
prefix, or "n/a" never written for an undefined mean, passed every test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def scores_table() -> pd.DataFrame:
    """Six nodules of four patients; the benign ones have no outside region (enrichment NaN)."""
    from nodulekit.scores import REGIONS, SUMMARISED

    n = 6
    rng = np.random.default_rng(4)
    df = pd.DataFrame({
        "map": ["sam"] * n, "map_class": ["malignant"] * n,
        "class": ["malignant", "malignant", "malignant", "benign", "benign", "benign"],
        "nodule_id": [f"LIDC-IDRI-000{i // 2 + 1}:{i % 2 + 1}" for i in range(n)],
        "empty_map": [False] * n, "pointing": [REGIONS[i % 3] for i in range(n)], "area_margin_band": np.ones(n),
        **{c: rng.uniform(0.1, 0.9, n) for c in SUMMARISED},
    })  # fmt: skip
    df.loc[df["class"] == "benign", "enrichment_outside"] = np.nan
    return df


def table_lines(markdown: str, title: str) -> list[str]:
    section = markdown.split(f"## {title}\n\n", 1)[1]
    return section.split("\n\n", 1)[0].strip("\n").splitlines()


def test_markdown_table_rows_and_cells():
    from nodulekit.scores import SUMMARY_COLUMNS, scores_markdown, summarise_scores

    scores = scores_table()
    table = summarise_scores(scores, "class", n_resamples=20)
    lines = table_lines(scores_markdown(scores, {"class": table}), "By nodule class")
    assert lines[0] == "| " + " | ".join(SUMMARY_COLUMNS) + " |"
    assert lines[1] == "|" + "---|" * len(SUMMARY_COLUMNS)
    assert len(lines) == 2 + len(table)
    for line, (_, row) in zip(lines[2:], table.iterrows(), strict=True):
        assert line.startswith("| ") and line.endswith(" |")
        cells = dict(zip(SUMMARY_COLUMNS, line[2:-2].split(" | "), strict=True))
        assert cells["map"] == "sam" and cells["group"] == row["group"] and cells["n"] == "3"
        for column in ("share_body", "enrichment_outside"):
            mean, low, high = (row[f"mean_{column}{s}"] for s in ("", "_low", "_high"))
            expected = "n/a" if np.isnan(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"
            assert cells[column] == expected
        assert cells["pointing_body"] == f"{row['pointing_body']:.3f}"
    by_group = {line.split(" | ")[1]: line for line in lines[2:]}
    assert "| n/a |" in by_group["benign"] and "| n/a |" not in by_group["malignant"]
    assert by_group["malignant"].count("[") == 6  # share and enrichment of 3 regions, each with its interval


@pytest.mark.parametrize("by", ["spiculation"])
def test_a_grouping_without_rated_nodules_says_so(by):
    from nodulekit.scores import scores_markdown, summarise_scores

    scores = scores_table()
    summaries = {"class": summarise_scores(scores, "class", n_resamples=20), by: pd.DataFrame()}
    text = scores_markdown(scores, summaries)
    assert "## By spiculation (mean rating)\n\n(no rated nodules)\n" in text
