"""The grid's final report: Tables 2-5 in the paper's layout, from the reports the grid's jobs wrote.

Nothing is recomputed here: every number is read from ``evaluate``'s ``table2.json``
(accuracy mean ± std over folds; pooled sensitivity, specificity and accuracy with their
patient-bootstrap 95 % intervals), ``wilcoxon``'s JSON (Table 5's p-values and whatever
paired comparisons it reports) and ``scores``' summary. The report says which command
wrote each table, so any number can be traced back to its artifact. One section is computed
here: with several seeds, Table 5 across seeds (``seeds_section``: ``stats.wilcoxon_runs`` with
each method's seeds as one arm, read from the runs' test predictions), the only comparison
that carries the spread between retrainings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from nodulekit.errors import NodulekitError
from nodulekit.grid import GridPlan, Table

# Table 5 columns shown when the wilcoxon report has them (first: the paper's test).
TABLE5_COLUMNS = (
    ("prob_p_value", "p (paired Wilcoxon, probabilities)"),
    ("prob_p_value_holm", "p Holm"),
    ("auc_p", "clustered AUC p (Obuchowski, patients as clusters)"),
    ("auc_p_holm", "clustered AUC p Holm"),
    ("delong_p", "DeLong p (AUC)"),
    ("delong_p_holm", "DeLong p Holm"),
    ("tost_p_holm", "equivalence (TOST) p Holm"),
)


def _read_json(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    if not path.is_file():
        raise NodulekitError(f"{path} is missing: run the grid first (`nodulekit grid CONFIG`)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise NodulekitError(f"{path} is not valid JSON: {exc}") from None


def _runs_by_rundir(root: Path, report: dict) -> dict[Path, dict]:
    return {(root / r["rundir"]).resolve(): r for r in report.get("runs", [])}


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _accuracy(run: dict) -> str:
    """Mean ± std over folds in %, then the pooled accuracy's 95 % interval."""
    acc = run["summary"]["accuracy"]
    ci = run.get("pooled_nodule_ci", {}).get("accuracy")
    text = f"{100 * _num(acc['mean']):.2f} ± {100 * _num(acc['std']):.2f}"
    if ci and ci.get("low") is not None:
        text += f" [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
    return text


def _pooled(run: dict, metric: str) -> str:
    """A pooled nodule-level number with its 95 % interval (falls back to the point value)."""
    ci = run.get("pooled_nodule_ci", {}).get(metric)
    if ci and ci.get("estimate") is not None and ci.get("low") is not None:
        return f"{ci['estimate']:.4f} [{ci['low']:.3f}, {ci['high']:.3f}]"
    value = run.get("pooled_nodule", {}).get(metric)
    return "n/a" if value is None else f"{value:.4f}"


def table_cells(plan: GridPlan, table: Table, seed: int) -> dict[str, dict[str, dict]]:
    """{row label: {dataset: evaluate's record of that run}} for one table and seed."""
    cells: dict[str, dict[str, dict]] = {label: {} for label in table.rows}
    for dataset in table.datasets:
        runs = _runs_by_rundir(plan.root, _read_json(plan.root, plan.evaluate_report(table.name, dataset, seed)))
        for label, name in table.rows.items():
            rundir = (plan.root / plan.run_for(name, dataset, seed).rundir).resolve()
            if rundir not in runs:
                raise NodulekitError(f"{plan.evaluate_report(table.name, dataset, seed)} has no row for {rundir}")
            cells[label][dataset] = runs[rundir]
    return cells


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def table2_markdown(plan: GridPlan, table: Table, cells: dict) -> str:
    sens = plan.sensitivity_dataset
    header = [
        "Method",
        *[d.upper() for d in table.datasets],
        f"Sensitivity ({sens.upper()})",
        f"Specificity ({sens.upper()})",
    ]
    rows = [
        [label, *[_accuracy(cells[label][d]) for d in table.datasets], _pooled(cells[label][sens], "sensitivity"),
         _pooled(cells[label][sens], "specificity")]
        for label in table.rows
    ]  # fmt: skip
    return _markdown(header, rows)


def table3_markdown(table: Table, cells: dict) -> str:
    (dataset,) = table.datasets
    header = ["Settings", f"Accuracy % ({dataset.upper()})", "Sensitivity", "Specificity", "AUC"]
    rows = [
        [label, _accuracy(c[dataset]), _pooled(c[dataset], "sensitivity"), _pooled(c[dataset], "specificity"),
         _pooled(c[dataset], "auc")]
        for label, c in cells.items()
    ]  # fmt: skip
    return _markdown(header, rows)


def table4_markdown(table: Table, cells: dict) -> str:
    header = ["Metrics", "Methods", *[d.upper() for d in table.datasets]]
    rows = []
    for metric in ("accuracy", "sensitivity", "specificity"):
        for i, (label, c) in enumerate(cells.items()):
            values = [_accuracy(c[d]) if metric == "accuracy" else _pooled(c[d], metric) for d in table.datasets]
            rows.append([metric.capitalize() if i == 0 else "", label, *values])
    return _markdown(header, rows)


def table5_markdown(plan: GridPlan, seed: int) -> tuple[str, dict]:
    """One block per reported column: rows = the compared methods, columns = datasets."""
    t5, by_dataset = plan.table5, {}
    for dataset in t5["datasets"]:
        rows = _read_json(plan.root, plan.wilcoxon_report(dataset, seed)).get("rows", [])
        by_dataset[dataset] = {(plan.root / r["run_b"]).resolve(): r for r in rows}
    blocks = []
    for column, title in TABLE5_COLUMNS:
        body = []
        for name in t5["against"]:
            label = plan.label(name, t5["datasets"][0], seed)
            values = []
            for dataset in t5["datasets"]:
                row = by_dataset[dataset].get((plan.root / plan.run_for(name, dataset, seed).rundir).resolve(), {})
                values.append(_p_value(row.get(column)))
            body.append([label, *values])
        if any(v != "–" for r in body for v in r[1:]):
            blocks.append(f"{title}:\n\n" + _markdown(["Methods", *[d.upper() for d in t5["datasets"]]], body))
    return "\n\n".join(blocks), {d: list(v.values()) for d, v in by_dataset.items()}


def seeds_section(plan: GridPlan) -> tuple[str, dict]:
    """Table 5 across seeds: per dataset, the reference's seeds as one arm against each method's
    seeds (AUC difference of the mean-over-seeds AUCs with its seed x patient interval, the
    clustered test on seed-averaged probabilities, DeLong, TOST and the verdict)."""
    from nodulekit.stats import wilcoxon_runs

    t5 = plan.table5
    header = ["Methods", "Dataset", "AUC ref / method (mean over seeds)", "ΔAUC [95 % CI, seeds × patients]",
              "clustered p Holm", "DeLong p Holm", "TOST p Holm", "verdict"]  # fmt: skip
    rows, record = [], {}
    for dataset in t5["datasets"]:
        names = [t5["reference"], *t5["against"]]
        arms = [[plan.root / plan.run_for(n, dataset, s).rundir for s in plan.seeds] for n in names]
        table = wilcoxon_runs(arms, n_resamples=plan.bootstrap, n_permutations=min(9999, 5 * plan.bootstrap))
        record[dataset] = json.loads(table.to_json(orient="records"))
        for name, (_, r) in zip(t5["against"], table.iterrows(), strict=True):
            rows.append([
                plan.label(name, dataset, plan.seeds[0]), dataset.upper(), f"{r['auc_a']:.3f} / {r['auc_b']:.3f}",
                f"{r['auc_diff']:+.3f} [{r['auc_diff_low']:+.3f}, {r['auc_diff_high']:+.3f}]",
                _p_value(r["auc_p_holm"]), _p_value(r["delong_p_holm"]), _p_value(r["tost_p_holm"]), r["auc_verdict"],
            ])  # fmt: skip
    note = (
        f"Each method's {len(plan.seeds)} seeds ({', '.join(map(str, plan.seeds))}) form one arm; ΔAUC = reference "
        "minus method. The interval resamples patients and, per arm, seeds, so it carries the spread between "
        "retrainings; the p-values are on the seed-averaged probabilities; Holm over the methods of one dataset. "
        "Equivalence margin ±0.02 AUC (docs/statistics.md)."
    )
    return _markdown(header, rows) + "\n\n" + note, record


def _p_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3g}"


NOTES = (
    "Accuracy: mean ± sample standard deviation over the test folds (%), then in brackets the 95 % interval "
    "of the pooled accuracy (`nodulekit evaluate`: bootstrap over patients). Sensitivity, specificity and AUC: "
    "pooled over all test folds at the fixed threshold 0.5, with their 95 % intervals. Table 5: two-sided "
    "paired tests from `nodulekit wilcoxon` (reference run against each other run on the same nodules)."
)


def _table_section(plan: GridPlan, table: Table, seed: int) -> tuple[str, dict]:
    cells = table_cells(plan, table, seed)
    if table.layout == "table2":
        body = table2_markdown(plan, table, cells)
    elif table.layout == "table3":
        body = table3_markdown(table, cells)
    else:
        body = table4_markdown(table, cells)
    sources = ", ".join(f"`{plan.evaluate_report(table.name, d, seed)}`" for d in table.datasets)
    record = {
        label: {d: {k: run.get(k) for k in ("rundir", "arch", "model_options", "summary", "pooled_nodule_ci")}
                for d, run in per.items()}
        for label, per in cells.items()
    }  # fmt: skip
    return f"## {table.title}\n\n{body}\n\nFrom {sources}.\n", record


def _maps_section(plan: GridPlan) -> str:
    maps_dir = plan.maps_dir()
    summary = (plan.root / maps_dir / "scores.md").read_text() if (plan.root / maps_dir / "scores.md").exists() else ""
    methods = ", ".join(f"{m} (from `{plan.run_for(n, plan.maps['dataset'], plan.seeds[0]).rundir}`)"
                        for m, n in plan.maps["methods"].items())  # fmt: skip
    text = f"## Activation maps on {plan.maps['dataset'].upper()} against the readers' contours\n\n"
    text += f"Methods: {methods}. Figures: `{maps_dir}/figures/`.\n\n"
    # scores.md's own headings go two levels down, under this section
    return text + re.sub(r"(?m)^(#+) ", r"##\1 ", summary)


def grid_report(plan: GridPlan) -> tuple[str, dict]:
    """(Markdown, JSON record) of the whole grid."""
    parts = [f"# Experiment grid: {plan.config_path.name}\n", NOTES + "\n"]
    record: dict[str, Any] = {"config": str(plan.config_path), "seeds": plan.seeds, "epochs": plan.epochs, "tables": {}}
    for seed in plan.seeds:
        if len(plan.seeds) > 1:
            parts.append(f"# Seed {seed}\n")
        for table in plan.tables:
            text, rec = _table_section(plan, table, seed)
            parts.append(text)
            record["tables"].setdefault(table.name, {})[str(seed)] = rec
        if plan.table5:
            text, rows = table5_markdown(plan, seed)
            reference = plan.label(plan.table5["reference"], plan.table5["datasets"][0], seed)
            parts.append(f"## Table 5: {reference} against the other methods\n\n{text}\n")
            record.setdefault("table5", {})[str(seed)] = rows
    if plan.table5 and len(plan.seeds) > 1:
        text, rows = seeds_section(plan)
        parts.append(f"## Table 5 across seeds: the spread between retrainings included\n\n{text}\n")
        record["table5_seeds"] = rows
    if plan.maps:
        parts.append(_maps_section(plan))
    return "\n".join(parts), record


def report_json(record: dict) -> str:
    """The grid report's JSON record as text (what report.json holds and ``--json`` prints)."""
    return json.dumps(record, indent=2, default=str, allow_nan=True) + "\n"


def write_grid_report(plan: GridPlan, output: str | Path, report: tuple[str, dict] | None = None) -> dict[str, Path]:
    """Write report.md and report.json (same stem) atomically; ``report`` is :func:`grid_report`'s
    result when already made."""
    from nodulekit.artifacts import atomic_path

    out = Path(output)
    if out.suffix != ".md":
        raise NodulekitError(f"{out}: give the report a .md name (the JSON goes beside it)")
    markdown, record = report or grid_report(plan)
    paths = {"md": out, "json": out.with_suffix(".json")}
    with atomic_path(paths["md"], suffix=".md.part") as tmp:
        tmp.write_text(markdown)
    with atomic_path(paths["json"], suffix=".json.part") as tmp:
        tmp.write_text(report_json(record))
    return paths
