"""The grid's final report (nodulekit.grid_report) from hand-written evaluate, wilcoxon and scores
records: every table layout, each cell's formatting and fallbacks, Table 5's blocks, the section
across seeds, the maps section and the files written; in-process (the grid runs it in a child).

The records hold a different number for each run, dataset and seed, so a cell read from the wrong
run, dataset, seed or metric shows.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from golden import assert_golden

from nodulekit import grid_report as R
from nodulekit.errors import NodulekitError
from nodulekit.grid import load_grid

CONFIG = """
datasets: {d1c: {path: a.h5}, d3c: {path: b.h5}}
seeds: [1, 2]
epochs: 3
bootstrap: 40
table2: {architectures: [cam, hesam], sensitivity_dataset: d1c}
ablations:
  table3:
    title: "Table 3: pooling"
    datasets: [d3c]
    variants: {GAP: {arch: hesam, options: {hf_pool: avg}}, GMP: hesam}
  table4:
    title: "Table 4: parts"
    variants: {SAM: sam, HESAM: hesam}
table5: {reference: hesam, against: [cam, sam]}
maps: {dataset: d3c, methods: {hesam: hesam, sam: sam}}
"""
ARCHS = {"cam": 0, "hesam": 1, "sam": 2, "hesam+hf_pool=avg": 3}
DATASETS = {"d1c": 0, "d3c": 1}


def accuracy(name: str, dataset: str, seed: int) -> float:
    """A distinct accuracy per run: 0.5 + 0.1 x architecture + 0.02 x dataset + 0.005 x seed."""
    return round(0.5 + 0.1 * ARCHS[name] + 0.02 * DATASETS[dataset] + 0.005 * seed, 4)


def record(plan, name: str, dataset: str, seed: int) -> dict:
    acc = accuracy(name, dataset, seed)
    ci = {m: {"estimate": round(acc + d, 4), "low": round(acc + d - 0.05, 4), "high": round(acc + d + 0.04, 4)}
          for m, d in (("accuracy", 0.0), ("sensitivity", -0.01), ("specificity", 0.01), ("auc", 0.02))}  # fmt: skip
    return {
        "rundir": plan.run_for(name, dataset, seed).rundir,
        "arch": name.split("+")[0],
        "model_options": {"hf_pool": "avg"} if "hf_pool" in name else {},
        "summary": {"accuracy": {"mean": acc, "std": round(acc / 10, 4)}},
        "pooled_nodule_ci": ci,
        "pooled_nodule": {"accuracy": acc},
        "not_reported": "x",
    }


def cam_p(dataset: str, seed: int) -> float:
    return 0.0004 * seed * (1 + 10 * DATASETS[dataset])  # < 0.001 on D1C, not on D3C


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def make_grid(folder: Path):
    for name in ("a.h5", "b.h5"):
        (folder / name).write_bytes(b"")
    (folder / "grid.yaml").write_text(textwrap.dedent(CONFIG))
    plan = load_grid(folder / "grid.yaml")
    for table in plan.tables:
        for dataset in table.datasets:
            for seed in plan.seeds:
                runs = [record(plan, n, dataset, seed) for n in dict.fromkeys(table.rows.values())]
                write_json(plan.root / plan.evaluate_report(table.name, dataset, seed), {"runs": runs})
    for dataset in ("d1c", "d3c"):
        for seed in plan.seeds:
            rows = [
                {"run_b": plan.run_for("cam", dataset, seed).rundir, "prob_p_value": cam_p(dataset, seed),
                 "prob_p_value_holm": 0.0123 + DATASETS[dataset] / 10, "auc_p": float("nan"),
                 "delong_p": None, "tost_p_holm": 0.5},
                {"run_b": str(plan.root / plan.run_for("sam", dataset, seed).rundir), "prob_p_value": 0.25 + DATASETS[dataset] / 10 + seed / 100,
                 "prob_p_value_holm": 0.5, "tost_p_holm": 0.98765},
            ]  # fmt: skip
            write_json(plan.root / plan.wilcoxon_report(dataset, seed), {"rows": rows})
    scores = plan.root / plan.maps_dir() / "scores.md"
    scores.parent.mkdir(parents=True)
    scores.write_text("# Map scores\n\nA sentence with a # sign.\n\n## By nodule class\n\n| a |\n")
    return plan


def fake_wilcoxon_runs(calls):
    def run(arms, n_resamples, n_permutations):
        calls.append((arms, n_resamples, n_permutations))
        k = len(calls)
        return pd.DataFrame(
            [
                {"auc_a": 0.81 + k / 100, "auc_b": 0.7512, "auc_diff": 0.0588 + k / 100, "auc_diff_low": -0.0123,
                 "auc_diff_high": 0.1301, "auc_p_holm": 0.00049, "delong_p_holm": 0.0456, "tost_p_holm": float("nan"),
                 "auc_verdict": "not shown different"},
                {"auc_a": 0.81, "auc_b": 0.9, "auc_diff": -0.09, "auc_diff_low": -0.2, "auc_diff_high": 0.02,
                 "auc_p_holm": 0.2, "delong_p_holm": 0.3, "tost_p_holm": 0.001, "auc_verdict": "worse"},
            ]
        )  # fmt: skip

    return run


def make_report(folder: Path):
    plan = make_grid(folder)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nodulekit.stats.wilcoxon_runs", fake_wilcoxon_runs(calls))
        markdown, rec = R.grid_report(plan)
    return plan, markdown, rec, calls


def test_whole_report_its_cells_record_and_files(tmp_path):
    """One test (the report is made once, and every check below reads the same run of the code)."""
    (tmp_path / "grid").mkdir()
    report = make_report(tmp_path / "grid")
    check_text(report)
    check_cells(report)
    check_record(report)
    files = tmp_path / "files"
    files.mkdir()
    check_files(report, files)


def check_text(report):
    plan, markdown, _, _ = report
    assert_golden("grid/report.md", markdown)


def check_cells(report):
    plan, markdown, _, _ = report
    seed2 = markdown.split("# Seed 2\n")[1]
    acc = accuracy("hesam", "d3c", 2)  # Table 2, Ours-HESAM, D3C, seed 2
    cell = f"{100 * acc:.2f} ± {100 * acc / 10:.2f} [{100 * (acc - 0.05):.1f}, {100 * (acc + 0.04):.1f}]"
    assert cell == "63.00 ± 6.30 [58.0, 67.0]"
    d1 = accuracy("hesam", "d1c", 2)
    line = next(x for x in seed2.splitlines() if x.startswith("| Ours-HESAM |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == cell
    assert cells[3] == f"{d1 - 0.01:.4f} [{d1 - 0.06:.3f}, {d1 + 0.03:.3f}]"  # sensitivity on D1C
    assert cells[4] == f"{d1 + 0.01:.4f} [{d1 - 0.04:.3f}, {d1 + 0.05:.3f}]"  # specificity on D1C


def check_record(report):
    plan, _, rec, calls = report
    assert rec["config"] == str(plan.config_path) and rec["seeds"] == [1, 2] and rec["epochs"] == 3
    assert sorted(rec["tables"]) == ["table2", "table3", "table4"]
    assert sorted(rec["tables"]["table2"]) == ["1", "2"]
    cell = rec["tables"]["table3"]["2"]["GAP"]["d3c"]
    full = record(plan, "hesam+hf_pool=avg", "d3c", 2)
    assert cell == {k: full[k] for k in ("rundir", "arch", "model_options", "summary", "pooled_nodule_ci")}
    assert list(rec["tables"]["table4"]["1"]) == ["SAM", "HESAM"]
    assert list(rec["tables"]["table4"]["1"]["SAM"]) == ["d1c", "d3c"]
    # Table 5: wilcoxon's rows as written, per seed and dataset
    rows = rec["table5"]["2"]["d3c"]
    assert [r["prob_p_value"] for r in rows] == [cam_p("d3c", 2), 0.25 + 0.1 + 0.02] and math.isnan(rows[0]["auc_p"])
    # across seeds: each arm is one method's runs of every seed, the reference first
    assert len(calls) == 2
    arms, n_resamples, n_permutations = calls[1]
    assert (n_resamples, n_permutations) == (40, 200)  # bootstrap, and 5 x bootstrap permutations
    names = ["hesam", "cam", "sam"]
    assert arms == [[plan.root / plan.run_for(n, "d3c", s).rundir for s in (1, 2)] for n in names]
    assert rec["table5_seeds"]["d3c"][0]["auc_a"] == 0.83 and rec["table5_seeds"]["d1c"][1]["auc_verdict"] == "worse"


def test_permutations_are_capped_at_9999(tmp_path, monkeypatch):
    plan = make_grid(tmp_path)
    plan.bootstrap = 2001
    calls = []
    monkeypatch.setattr("nodulekit.stats.wilcoxon_runs", fake_wilcoxon_runs(calls))
    R.seeds_section(plan)
    assert calls[0][1:] == (2001, 9999)
    plan.bootstrap = 1999
    R.seeds_section(plan)
    assert calls[-1][1:] == (1999, 9995)


def test_one_seed_has_no_seed_headings_and_no_section_across_seeds(tmp_path, monkeypatch):
    plan = make_grid(tmp_path)
    plan.seeds = [2]
    monkeypatch.setattr("nodulekit.stats.wilcoxon_runs", lambda *a, **k: pytest.fail("across seeds with one seed"))
    (plan.root / "maps/d3c-seed2").mkdir(parents=True)  # no scores.md: the section has no summary
    markdown, rec = R.grid_report(plan)
    assert "# Seed" not in markdown and "across seeds" not in markdown and "table5_seeds" not in rec
    assert sorted(rec["tables"]["table2"]) == ["2"] and sorted(rec["table5"]) == ["2"]
    assert markdown.endswith(
        "## Activation maps on D3C against the readers' contours\n\n"
        "Methods: hesam (from `runs/d3c/seed2/hesam`), sam (from `runs/d3c/seed2/sam`). "
        "Figures: `maps/d3c-seed2/figures/`.\n\n"
    )
    # without Table 5 and maps: the tables alone
    plan.table5, plan.maps = None, None
    markdown, rec = R.grid_report(plan)
    assert "## Table 5" not in markdown and "Activation maps" not in markdown and "table5" not in rec
    assert markdown.startswith("# Experiment grid: grid.yaml\n\n" + R.NOTES + "\n\n## Table 2: classification")


# --------------------------------------------------------------------------- cells and fallbacks


def test_accuracy_cell_without_an_interval():
    run = {"summary": {"accuracy": {"mean": 0.5, "std": None}}}
    assert R._accuracy(run) == "50.00 ± nan"
    run["pooled_nodule_ci"] = {"accuracy": {"estimate": 0.5, "low": None, "high": None}}
    assert R._accuracy(run) == "50.00 ± nan"
    run["pooled_nodule_ci"]["accuracy"].update(low=0.25, high=0.75)
    assert R._accuracy(run) == "50.00 ± nan [25.0, 75.0]"


def test_pooled_cell_falls_back_to_the_point_value_then_n_a():
    ci = {"estimate": 0.25, "low": 0.125, "high": 0.5}
    assert R._pooled({"pooled_nodule_ci": {"auc": ci}}, "auc") == "0.2500 [0.125, 0.500]"
    run = {"pooled_nodule_ci": {"auc": {**ci, "low": None}}, "pooled_nodule": {"auc": 0.75}}
    assert R._pooled(run, "auc") == "0.7500"
    run = {"pooled_nodule_ci": {"auc": {**ci, "estimate": None}}, "pooled_nodule": {"auc": 0.75}}
    assert R._pooled(run, "auc") == "0.7500"
    assert R._pooled({"pooled_nodule": {"auc": 0.125}}, "auc") == "0.1250"
    assert R._pooled({}, "auc") == "n/a"
    assert R._pooled({"pooled_nodule": {"auc": None}}, "auc") == "n/a"


def test_p_values():
    assert [R._p_value(v) for v in (None, float("nan"), 0.0009999, 0.001, 0.012345, 1.0, 0)] == [
        "–", "–", "<0.001", "0.001", "0.0123", "1", "<0.001"]  # fmt: skip


def test_markdown_table():
    assert R._markdown(["a", "b"], [["1", "2"], ["3", "4"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
    assert R._markdown(["x"], []) == "| x |\n|---|"


# --------------------------------------------------------------------------- missing or wrong records


def test_missing_or_broken_records_are_one_line(tmp_path):
    plan = make_grid(tmp_path)
    table2 = plan.tables[0]
    path = plan.root / plan.evaluate_report("table2", "d3c", 1)
    path.write_text(json.dumps({"runs": [record(plan, "cam", "d3c", 1)]}))
    with pytest.raises(NodulekitError) as info:
        R.table_cells(plan, table2, 1)
    rundir = (plan.root / "runs/d3c/seed1/hesam").resolve()
    assert str(info.value) == f"reports/table2/d3c-seed1/table2.json has no row for {rundir}"
    path.write_text("{not json")
    with pytest.raises(NodulekitError, match=rf"^{path} is not valid JSON: Expecting property name"):
        R.table_cells(plan, table2, 1)
    path.unlink()
    with pytest.raises(NodulekitError) as info:
        R.table_cells(plan, table2, 1)
    assert str(info.value) == f"{path} is missing: run the grid first (`nodulekit grid CONFIG`)"
    # a report without runs has no row for any
    path.write_text("{}")
    with pytest.raises(NodulekitError, match="has no row for"):
        R.table_cells(plan, table2, 1)


def test_table5_without_rows_shows_no_block(tmp_path):
    plan = make_grid(tmp_path)
    for dataset in ("d1c", "d3c"):
        write_json(plan.root / plan.wilcoxon_report(dataset, 1), {})
    text, rows = R.table5_markdown(plan, 1)
    assert text == "" and rows == {"d1c": [], "d3c": []}


# --------------------------------------------------------------------------- files


def check_files(report, tmp_path):
    plan, markdown, rec, _ = report
    with pytest.raises(NodulekitError) as info:
        R.write_grid_report(plan, tmp_path / "report.txt", (markdown, rec))
    assert str(info.value) == f"{tmp_path / 'report.txt'}: give the report a .md name (the JSON goes beside it)"
    assert list(tmp_path.iterdir()) == []
    paths = R.write_grid_report(plan, tmp_path / "out.md", (markdown, rec))
    assert paths == {"md": tmp_path / "out.md", "json": tmp_path / "out.json"}
    assert (tmp_path / "out.md").read_text() == markdown
    text = (tmp_path / "out.json").read_text()
    assert text == R.report_json(rec) and text.endswith("}\n") and '\n  "config": ' in text
    assert "NaN" in text  # wilcoxon's undefined p-values stay undefined
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.md"]  # no part files left


def test_report_json_writes_paths_as_text():
    assert R.report_json({"p": Path("a/b"), "x": float("nan")}) == '{\n  "p": "a/b",\n  "x": NaN\n}\n'


def test_write_grid_report_makes_the_report_when_not_given(tmp_path, monkeypatch):
    plan = make_grid(tmp_path)
    plan.seeds = [1]
    R.write_grid_report(plan, tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == R.grid_report(plan)[0]
    assert json.loads((tmp_path / "r.json").read_text())["seeds"] == [1]
