#!/usr/bin/env python
"""HESAM against ResNet18 across D1C / D3C / D11C / D21C, from finished ``table2.py`` outputs.

Reads each OUT/report/table2.json (pooled accuracy and AUC with their patient-bootstrap
intervals) and OUT/report/comparisons.json (the AUC difference, its interval and DeLong's p)
written by ``benchmarks/table2.py --archs hesam,resnet18``, and adjusts the DeLong p-values
with Holm's method over the datasets (one comparison per dataset). Prints a Markdown table.

    python benchmarks/datasets_table.py D1C=reduced-d1c D3C=reduced-d3c D11C=reduced-d11c D21C=reduced-d21c
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ci(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    e, lo, hi = (scale * stat[k] for k in ("estimate", "low", "high"))
    return f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def dataset_row(out: Path, reference: str, other: str) -> dict:
    """Pooled figures of the two archs and their comparison, from one table2.py output folder."""
    runs = {r["arch"]: r for r in json.loads((out / "report" / "table2.json").read_text())["runs"]}
    rows = json.loads((out / "report" / "comparisons.json").read_text())["rows"]
    (cmp,) = [r for r in rows if r["arch_a"] == reference and r["arch_b"] == other]
    a, b = runs[reference]["pooled_nodule_ci"], runs[other]["pooled_nodule_ci"]
    diff = {"estimate": -cmp["auc_diff"], "low": -cmp["auc_diff_high"], "high": -cmp["auc_diff_low"]}
    return {
        "acc_a": _ci(a["accuracy"], 100, 2),
        "acc_b": _ci(b["accuracy"], 100, 2),
        "auc_a": _ci(a["auc"]),
        "auc_b": _ci(b["auc"]),
        "diff": _ci(diff).replace("-", "−"),
        "p": cmp["delong_p"],
    }


def main(argv=None) -> int:
    from nodulekit.stats import holm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=OUT", help="dataset label and table2.py output folder")
    p.add_argument("--reference", default="hesam")
    p.add_argument("--other", default="resnet18")
    args = p.parse_args(argv)
    labels, rows = [], []
    for spec in args.runs:
        label, _, out = spec.partition("=")
        labels.append(label)
        rows.append(dataset_row(Path(out), args.reference, args.other))
    adjusted = holm([r["p"] for r in rows])
    a, b = args.reference, args.other
    print(f"| Dataset | {a} accuracy % | {b} accuracy % | {a} AUC | {b} AUC | AUC, {b} − {a} | DeLong p | Holm |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r, q in zip(labels, rows, adjusted, strict=True):
        print(
            f"| {label} | {r['acc_a']} | {r['acc_b']} | {r['auc_a']} | {r['auc_b']} | {r['diff']} | {r['p']:.2g} | {q:.2g} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
