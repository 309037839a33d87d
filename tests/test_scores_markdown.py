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
    text = scores_markdown(scores, {"class": table})
    assert "consensus mask of input channel ? (" in text  # a scores table that does not say its channel
    lines = table_lines(text, "By nodule class")
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


def test_band_rule_from_the_attrs_then_the_column_then_r():
    from nodulekit.scores import band_rule

    scores = scores_table()
    assert band_rule(scores) == "r" and band_rule(scores.iloc[:0]) == "r"
    scores["band_rule"] = "r = 0.25 x equivalent radius"
    assert band_rule(scores) == "r = 0.25 x equivalent radius"
    assert band_rule(scores.iloc[:0]) == "r"  # no row to read it from
    assert band_rule(scores.iloc[:1]) == "r = 0.25 x equivalent radius"  # one row: its own
    scores.attrs["band_rule"] = "r = 2 mm"
    assert band_rule(scores) == "r = 2 mm"


def test_report_names_the_map_class_channel_band_and_what_was_left_out():
    from nodulekit.scores import scores_markdown, summarise_scores
    from nodulekit.stats import bootstrap_note

    scores = scores_table()
    scores["map_class"] = "benign"
    scores.loc[[1, 4], "empty_map"] = True
    scores.attrs.update(mask_channel=5, band_rule="r = 2 mm", skipped_empty_masks={"D3C": 2, "D1C": 0})
    summaries = {"class": summarise_scores(scores, "class", n_resamples=20, seed=7)}
    text = scores_markdown(scores, summaries)
    assert text.startswith(
        "# Region scores of activation maps\nMap of the **benign** class, clipped at 0; regions from the "
        "consensus mask of input channel 5 (the centre slice at ROI side 2 x diameter), r = 2 mm: body = mask "
        "eroded by r, margin band = mask dilated by r minus body, outside = the rest."
    )
    assert f" {bootstrap_note(20, 7)}.\n\n## By nodule class\n\n" in text
    assert "\n2 map(s) were zero everywhere after clipping; their shares are left out.\n" in text
    assert text.endswith('\nNodules left out for an empty consensus mask: {"D3C": 2, "D1C": 0}.\n')
    scores["empty_map"] = False
    scores.attrs["skipped_empty_masks"] = {"D3C": 0}
    text = scores_markdown(scores, summaries)
    assert "zero everywhere" not in text and "left out for an empty" not in text
