#!/usr/bin/env python
"""The paper's published tables, typed in, and what their own arithmetic says.

The paper (docs: ``../shared/paper/soft-activation-mapping.md``) reports 1145 nodules (510
malignant, 635 benign) in 5-fold cross-validation: a test fold holds 229 nodules, 102 malignant
and 127 benign (Table 1; 510 / 5 and 635 / 5). Checks, each on every published number:

1. accuracies that are a whole number of nodules out of 229 (one test fold), not a mean over
   five folds or a pooled figure over 1145;
2. sensitivities that are k / 102 and specificities that are k / 127 (one fold's classes);
3. accuracy implied by the stated sensitivity and specificity, (k_sens + k_spec) / 229, against
   the stated accuracy of the same row and dataset;
4. the ± spreads of Table 2 against the binomial standard deviation of one fold's accuracy,
   sqrt(p (1 - p) / 229), the least the fold-to-fold spread of a 5-fold estimate can be;
5. the D1C accuracies (the dataset where nodulekit's single-slice input matches the paper's).

A printed value "matches" k / d when k / d rounds to it at the printed number of decimals;
``--truncation`` also accepts k / d cut off (not rounded) there, as some tables seem to do.

    python benchmarks/paper_tables.py -o benchmarks/out/paper_tables     # .md and .json
    python -c "import sys; sys.path.insert(0, 'benchmarks'); import paper_tables; print(paper_tables.checks()['summary'])"
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple

N_NODULES, N_MALIGNANT, N_BENIGN, N_FOLDS = 1145, 510, 635, 5
FOLD = N_NODULES // N_FOLDS  # 229 test nodules per fold
FOLD_MALIGNANT, FOLD_BENIGN = N_MALIGNANT // N_FOLDS, N_BENIGN // N_FOLDS  # 102, 127
DATASETS = ("D1C", "D3C", "D11C", "D21C")


class Value(NamedTuple):
    """One published number: where it is, what it is, and the text as printed."""

    table: str
    row: str
    dataset: str
    metric: str  # accuracy (%), accuracy_spread (±), sensitivity, specificity
    text: str

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def decimals(self) -> int:
        return len(self.text.split(".")[1]) if "." in self.text else 0


# Table 2: accuracy (%) ± spread per dataset; sensitivity and specificity on D11C.
TABLE2 = """
PN-SAMP	84.28±0.006	91.70±0.005	97.82±0.006	97.38±0.006	0.9509	0.9763
SAG-C	83.41±0.005	91.70±0.005	96.94±0.004	96.07±0.005	0.9705	0.9685
ResNet18	81.22±0.005	91.27±0.005	95.63±0.004	95.79±0.006	0.9411	0.9685
ResNet34	80.79±0.005	90.83±0.006	96.07±0.005	95.20±0.006	0.9705	0.9763
VGG16	85.59±0.006	91.70±0.005	96.69±0.005	96.07±0.007	0.9411	0.9763
DenseNet121	79.91±0.007	87.77±0.006	93.45±0.004	90.83±0.006	0.9215	0.9527
ResNet18-CAM	81.66±0.005	88.21±0.005	95.36±0.003	95.20±0.006	0.9216	0.9764
ResNet34-CAM	81.66±0.006	86.90±0.005	97.82±0.005	96.94±0.006	0.9509	0.9781
VGG16-CAM	83.41±0.007	89.96±0.005	92.14±0.005	91.70±0.006	0.9117	0.9448
DenseNet121-CAM	80.35±0.007	86.46±0.006	95.63±0.004	89.08±0.005	0.9313	0.9527
ResNet18-SAM	84.28±0.005	89.96±0.005	97.38±0.004	96.94±0.005	0.9607	0.9763
ResNet34-SAM	83.41±0.005	88.69±0.006	98.25±0.005	96.51±0.005	0.9509	0.9843
VGG16-SAM	83.41±0.007	90.83±0.005	94.32±0.006	93.89±0.006	0.9411	0.9448
DenseNet121-SAM	81.22±0.007	88.65±0.007	97.28±0.005	94.76±0.005	0.9411	0.9685
Baseline	81.66±0.006	85.15±0.005	94.76±0.004	93.01±0.006	0.9215	0.9685
Ours-CAM	80.35±0.006	86.46±0.005	96.51±0.004	95.20±0.006	0.9509	0.9737
Ours-SAM	81.66±0.005	89.08±0.004	98.25±0.004	97.38±0.007	0.9509	0.9843
Ours-HESAM	83.41±0.005	92.58±0.005	99.13±0.003	98.69±0.006	0.9705	0.9921
"""

# Table 3 (D11C): accuracy (%), sensitivity, specificity per HF / FCF pooling.
TABLE3 = """
GAP / GAP	96.51	0.9216	1.0
GAP / GMP	96.51	0.9216	1.0
GMP / GMP	96.94	0.9313	1.0
GMP / GAP	99.13	0.9705	0.9921
"""

# Table 4: accuracy (%), sensitivity, specificity per dataset (D1C, D3C, D11C, D21C).
TABLE4 = """
accuracy	U+SAM (Baseline)	82.53	89.96	96.94	96.51
accuracy	U+RB+SAM	84.28	91.27	98.69	98.25
accuracy	U+GMP+SAM	83.41	90.39	98.25	96.94
accuracy	U+GMP+RB+SAM	84.72	93.01	99.13	98.69
sensitivity	U+SAM (Baseline)	0.7353	0.8627	0.9411	0.9314
sensitivity	U+RB+SAM	0.8137	0.8725	0.9608	0.9706
sensitivity	U+GMP+SAM	0.7059	0.8529	0.9314	0.9412
sensitivity	U+GMP+RB+SAM	0.7549	0.8921	0.9705	0.9706
specificity	U+SAM (Baseline)	0.8976	0.9291	0.9921	0.9921
specificity	U+RB+SAM	0.8661	0.9449	1.0	0.9921
specificity	U+GMP+SAM	0.9370	0.9449	1.0	0.9921
specificity	U+GMP+RB+SAM	0.9212	0.9606	0.9921	1.0
"""


def _lines(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.strip().splitlines()]


def published_values() -> list[Value]:
    """Every number of Tables 2-4, with the table, row and dataset it is printed in."""
    out = []
    for row, *cells in _lines(TABLE2):
        for dataset, cell in zip(DATASETS, cells[:4], strict=True):
            acc, spread = cell.split("±")
            out += [
                Value("Table 2", row, dataset, "accuracy", acc),
                Value("Table 2", row, dataset, "accuracy_spread", spread),
            ]
        out += [
            Value("Table 2", row, "D11C", "sensitivity", cells[4]),
            Value("Table 2", row, "D11C", "specificity", cells[5]),
        ]
    for row, acc, sens, spec in _lines(TABLE3):
        out += [
            Value("Table 3", row, "D11C", m, t)
            for m, t in (("accuracy", acc), ("sensitivity", sens), ("specificity", spec))
        ]
    for metric, row, *cells in _lines(TABLE4):
        out += [Value("Table 4", row, d, metric, c) for d, c in zip(DATASETS, cells, strict=True)]
    return out


def nearest_count(value: float, denominator: int, *, scale: float = 1.0, decimals: int, truncation: bool = False):
    """The k for which k / denominator (x scale) prints as ``value`` at ``decimals``, or None."""
    unit = 10.0**-decimals
    k = round(value / scale * denominator)
    for cand in (k - 1, k, k + 1):
        shown = scale * cand / denominator
        if abs(shown - value) <= unit / 2 + 1e-9 or (truncation and 0 <= shown - value < unit - 1e-9):
            return cand
    return None


def _count_of(v: Value, truncation: bool) -> int | None:
    if v.metric == "accuracy":
        return nearest_count(v.value, FOLD, scale=100.0, decimals=v.decimals, truncation=truncation)
    denominator = FOLD_MALIGNANT if v.metric == "sensitivity" else FOLD_BENIGN
    return nearest_count(v.value, denominator, decimals=v.decimals, truncation=truncation)


def _count_either(v: Value, truncation: bool) -> int | None:
    """A rate that is k / 102 or k / 127 (either class of one fold)."""
    for d in (FOLD_MALIGNANT, FOLD_BENIGN):
        if nearest_count(v.value, d, decimals=v.decimals, truncation=truncation) is not None:
            return d
    return None


def implied_accuracy_rows(values: list[Value], truncation: bool) -> list[dict]:
    """Rows with accuracy, sensitivity and specificity on one dataset: is the accuracy what they imply?"""
    index = {(v.table, v.row, v.dataset, v.metric): v for v in values}
    rows = []
    for (table, row, dataset, metric), acc in index.items():
        sens, spec = index.get((table, row, dataset, "sensitivity")), index.get((table, row, dataset, "specificity"))
        if metric != "accuracy" or sens is None or spec is None:
            continue
        ks, kp = _count_of(sens, truncation), _count_of(spec, truncation)
        implied = None if ks is None or kp is None else 100.0 * (ks + kp) / FOLD
        rows.append({
            "table": table, "row": row, "dataset": dataset, "accuracy": acc.text, "sensitivity": sens.text,
            "specificity": spec.text, "k_sensitivity": ks, "k_specificity": kp, "implied_accuracy": implied,
            "consistent": implied is not None and abs(implied - acc.value) <= 0.005 + 1e-9,
            "within_one_nodule": implied is not None and abs(implied - acc.value) <= 100.0 / FOLD + 0.005 + 1e-9,
        })  # fmt: skip
    return rows


def spread_rows(values: list[Value]) -> list[dict]:
    """Table 2's ± against one fold's binomial SD of the accuracy (both in accuracy points)."""
    index = {(v.table, v.row, v.dataset, v.metric): v for v in values}
    rows = []
    for (table, row, dataset, metric), spread in index.items():
        if metric != "accuracy_spread":
            continue
        p = index[(table, row, dataset, "accuracy")].value / 100
        sd = 100 * math.sqrt(p * (1 - p) / FOLD)
        # the ± could be a fraction (0.005 = 0.5 points) or already in points: the larger reading
        rows.append({"row": row, "dataset": dataset, "spread": spread.text, "spread_points": 100 * spread.value,
                     "binomial_sd_points": sd})  # fmt: skip
    return rows


def checks(truncation: bool = False) -> dict:
    """Every check on the typed-in tables (JSON-ready); ``summary`` holds the counts."""
    values = published_values()
    accs = [v for v in values if v.metric == "accuracy"]
    rates = [v for v in values if v.metric in ("sensitivity", "specificity")]
    acc_rows = [v._asdict() | {"k_of_229": _count_of(v, truncation)} for v in accs]
    rate_rows = [v._asdict() | {"k_own_class": _count_of(v, truncation), "matches_denominator": _count_either(v, truncation)}
                 for v in rates]  # fmt: skip
    implied = implied_accuracy_rows(values, truncation)
    spreads = spread_rows(values)
    d1c = [v.value for v in accs if v.dataset == "D1C" and v.table == "Table 2"]
    d11c = [r for r in implied if r["dataset"] == "D11C"]
    summary = {
        "fold": {"nodules": FOLD, "malignant": FOLD_MALIGNANT, "benign": FOLD_BENIGN},
        "rounding": "rounded or truncated" if truncation else "rounded",
        "accuracies": len(accs),
        "accuracies_k_of_229": sum(r["k_of_229"] is not None for r in acc_rows),
        "rates": len(rates),
        "rates_k_of_own_class": sum(r["k_own_class"] is not None for r in rate_rows),
        "rates_k_of_102_or_127": sum(r["matches_denominator"] is not None for r in rate_rows),
        "rows_with_sens_spec": len(implied),
        "rows_accuracy_not_implied": sum(not r["consistent"] for r in implied),
        "d11c_rows": len(d11c),
        "d11c_rows_accuracy_not_implied": sum(not r["consistent"] for r in d11c),
        "d11c_rows_off_by_more_than_one_nodule": sum(not r["within_one_nodule"] for r in d11c),
        "spread_points_range": [min(r["spread_points"] for r in spreads), max(r["spread_points"] for r in spreads)],
        "binomial_sd_points_range": [min(r["binomial_sd_points"] for r in spreads),
                                     max(r["binomial_sd_points"] for r in spreads)],
        "spreads_below_binomial_sd": sum(r["spread_points"] < r["binomial_sd_points"] for r in spreads),
        "spreads": len(spreads),
        "d1c_accuracy_range": [min(d1c), max(d1c)],
    }  # fmt: skip
    return {"summary": summary, "accuracies": acc_rows, "rates": rate_rows, "implied": implied, "spreads": spreads}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# The paper's tables: their own arithmetic",
        "",
        f"One test fold = {s['fold']['nodules']} nodules ({s['fold']['malignant']} malignant, "
        f"{s['fold']['benign']} benign); a printed value matches k / d when k / d is {s['rounding']} to it.",
        "",
        "| check | count |",
        "|---|---|",
        f"| accuracies that are k / 229 | {s['accuracies_k_of_229']} of {s['accuracies']} |",
        f"| sensitivities k / 102, specificities k / 127 | {s['rates_k_of_own_class']} of {s['rates']} |",
        f"| rates that are k / 102 or k / 127 | {s['rates_k_of_102_or_127']} of {s['rates']} |",
        f"| D11C rows whose accuracy is not (k_sens + k_spec) / 229 | {s['d11c_rows_accuracy_not_implied']} of "
        f"{s['d11c_rows']} |",
        f"| D11C rows off by more than one nodule (1/229) | {s['d11c_rows_off_by_more_than_one_nodule']} of "
        f"{s['d11c_rows']} |",
        f"| all rows with sens/spec whose accuracy is not implied | {s['rows_accuracy_not_implied']} of "
        f"{s['rows_with_sens_spec']} |",
        f"| Table 2 ± below one fold's binomial SD | {s['spreads_below_binomial_sd']} of {s['spreads']} "
        f"(± read as a fraction: {s['spread_points_range'][0]:.1f}-{s['spread_points_range'][1]:.1f} points; "
        f"binomial SD {s['binomial_sd_points_range'][0]:.2f}-{s['binomial_sd_points_range'][1]:.2f} points) |",
        f"| Table 2 D1C accuracies | {s['d1c_accuracy_range'][0]:.2f}-{s['d1c_accuracy_range'][1]:.2f} % |",
        "",
        "Rows whose stated accuracy does not follow from their sensitivity and specificity:",
        "",
        "| table | row | dataset | accuracy | sens | spec | k_sens / 102 | k_spec / 127 | implied accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["implied"]:
        if not r["consistent"]:
            implied = "–" if r["implied_accuracy"] is None else f"{r['implied_accuracy']:.2f}"
            lines.append(
                f"| {r['table']} | {r['row']} | {r['dataset']} | {r['accuracy']} | {r['sensitivity']} | "
                f"{r['specificity']} | {r['k_sensitivity']} | {r['k_specificity']} | {implied} |"
            )
    lines += ["", "Values that are not a whole count of one fold:", ""]
    odd = [r for r in result["accuracies"] if r["k_of_229"] is None]
    odd += [r for r in result["rates"] if r["matches_denominator"] is None]
    lines += [f"- {r['table']}, {r['row']}, {r['dataset']}, {r['metric']}: {r['text']}" for r in odd]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, help="stem of the .md and .json to write (default: print)")
    parser.add_argument("--truncation", action="store_true", help="also accept values cut off rather than rounded")
    args = parser.parse_args(argv)
    result = checks(args.truncation)
    text = markdown(result)
    if args.output is None:
        print(text, end="")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
