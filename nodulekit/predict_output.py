"""What ``predict -o DIR`` writes: per nodule an overlay PNG and the map on the scan's own grid (NIfTI).

The folder is written under a temporary name beside DIR and renamed into place when every
file is complete, so an interrupted or failed run leaves no partial DIR.

- ``predictions.jsonl``: the JSON lines printed on stdout.
- ``<id>_overlay.<png|pdf|svg>``: the model's input plane through the nodule centre (grey),
  the nodule's mask contour when the nodule came from a mask (green), and the
  malignant-class activation map (positive part, scaled to its maximum, with its colour
  bar), a scale bar in mm and the orientation letters (``figures.show_roi``).
- ``<id>_map.nii.gz``: that map placed in the scan's own space: on the scan's grid and
  affine, 0 outside the nodule's crop square, on the slices the model's planes span. It
  opens on top of the scan in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nodulekit.errors import NodulekitError

PREDICTIONS = "predictions.jsonl"


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, a ``-o`` that cannot be this folder (see :func:`nodulekit.outputs.check_output_dir`)."""
    from nodulekit.outputs import check_output_dir as check

    return check(path, overwrite)


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text) or "nodule"


def reference_channel(layout) -> int:
    """The channel drawn and mapped: the plane at the centre with the smallest crop (the map's scale)."""
    return min(range(len(layout)), key=lambda c: (abs(layout[c]["z_offset_mm"]), layout[c]["p"]))


def map_volume(scan, spec, map_up: np.ndarray, layout) -> np.ndarray:
    """The 32x32 map of one nodule on the scan's volume grid (float32, 0 outside its crop square).

    Volume pixel (row, col) sits at patch coordinate (row - centre_row) x row_spacing / step + 15.5
    (likewise for columns), the inverse of the sampling in ``datasets.sample_grid``; the map is
    sampled there bilinearly. It fills the slices within the model's planes (+- half a plane).
    """
    from scipy.ndimage import map_coordinates

    from nodulekit.datasets import PATCH

    vol = scan.volume
    ref = layout[reference_channel(layout)]
    step = ref["p"] * spec.diameter_mm / PATCH
    (cr, cc, _), (sr, sc) = spec.centre, vol.pixel_spacing
    half = PATCH / 2 * step
    rows = np.arange(max(0, int(np.floor(cr - half / sr))), min(vol.shape[0], int(np.ceil(cr + half / sr)) + 1))
    cols = np.arange(max(0, int(np.floor(cc - half / sc))), min(vol.shape[1], int(np.ceil(cc + half / sc)) + 1))
    a = (rows - cr) * sr / step + PATCH / 2 - 0.5
    b = (cols - cc) * sc / step + PATCH / 2 - 0.5
    aa, bb = np.meshgrid(a, b, indexing="ij")
    plane = map_coordinates(np.asarray(map_up, np.float64), [aa, bb], order=1, mode="nearest")
    inside = (aa >= -0.5) & (aa <= PATCH - 0.5) & (bb >= -0.5) & (bb <= PATCH - 0.5)
    z_c = float(scan.voxel_to_lps(spec.centre)[2])
    offsets = [c["z_offset_mm"] for c in layout]
    near = np.abs(vol.zvals - z_c)
    slices = np.flatnonzero((vol.zvals >= z_c + min(offsets) - 0.5) & (vol.zvals <= z_c + max(offsets) + 0.5))
    if slices.size == 0:
        slices = np.array([int(np.argmin(near))])
    out = np.zeros(vol.shape, np.float32)
    block = np.where(inside, plane, 0.0).astype(np.float32)
    out[np.ix_(rows, cols, slices)] = block[:, :, None]
    return out


def write_map_nifti(path: Path, scan, data: np.ndarray, description: str) -> None:
    """``data`` (volume grid) written on the scan's own grid and affine."""
    import nibabel as nib

    img = nib.Nifti1Image(scan.to_src_array(data).astype(np.float32), scan.src_affine_ras)
    img.set_qform(scan.src_affine_ras, code=1)
    img.set_sform(scan.src_affine_ras, code=1)
    img.header["descrip"] = description[:79].encode()
    nib.save(img, str(path))


def write_overlay(path: Path, inp, map_up: np.ndarray, layout, rec: dict, fmt: str = "png", dpi: int = 150) -> None:
    from nodulekit.figures import _pyplot, save_figure, show_map, show_roi

    plt = _pyplot()
    c = reference_channel(layout)
    fig, axes = plt.subplots(1, 2, figsize=(5.6, 2.9), layout="constrained")
    mask = None if inp.mask is None else inp.mask[c]
    for ax, title in zip(axes, ("model input (centre plane)", "malignant-class map"), strict=True):
        show_roi(ax, inp.x[c], mask, float(inp.pixel_mm[c]), None)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    show_map(axes[1], map_up, None, "fraction of its max")
    side = layout[c]["p"] * rec["diameter_mm"]
    fig.suptitle(
        f"nodule {rec['id']}: p(malignant) = {rec['probability']:.3f} -> {rec['label']}  ({side:.1f} mm square)",
        fontsize=8,
    )
    save_figure(fig, path, fmt, dpi)


def write_outputs(
    output,
    scan,
    specs,
    inputs,
    scores,
    records,
    card,
    *,
    overwrite: bool = False,
    fmt: str = "png",
    dpi: int = 150,
    dicom: bool = False,
) -> Path:
    """Write the folder whole: everything under a temporary name, moved into place at the end
    (:func:`nodulekit.outputs.atomic_dir`: one writer at a time, nothing deleted that appeared meanwhile);
    with ``dicom`` also the maps and findings as DICOM (:mod:`nodulekit.dicom_out`)."""
    from nodulekit.outputs import atomic_dir

    layout = card["preprocessing"]["channels"]
    with atomic_dir(output, overwrite=overwrite) as tmp:
        names: set[str] = set()
        volumes = []
        for spec, inp, rec, m in zip(specs, inputs, records, scores.map_up, strict=True):
            name = safe_name(rec["id"])
            if name in names:
                raise NodulekitError(f"nodule ids {rec['id']!r} and another give the same file name {name!r}")
            names.add(name)
            write_overlay(tmp / f"{name}_overlay.{fmt}", inp, m, layout, rec, fmt, dpi)
            desc = f"nodulekit {card['map_kind']} map, nodule {rec['id']}, p={rec['probability']:.3f}"
            volumes.append(map_volume(scan, spec, m, layout))
            write_map_nifti(tmp / f"{name}_map.nii.gz", scan, volumes[-1], desc)
        if dicom:
            from nodulekit.dicom_out import write_dicom_outputs

            write_dicom_outputs(tmp, scan, [safe_name(r["id"]) for r in records], volumes, records, card)
        with open(tmp / PREDICTIONS, "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
    return Path(output)
