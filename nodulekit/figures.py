"""Figures of the maps stage (matplotlib, Agg backend; PNG, PDF or SVG at a chosen dpi).

- ``map_grid``: like the paper's Fig. 7: one row per nodule, the ROI with the readers' contour
  (the channel ``scores`` measures against, ``scores.map_channel``), then each method's map overlaid; the malignant probability under each
  map, in red for a false positive / false negative.
- ``slice_grid``: like Fig. 5: per nodule, maps of single slices duplicated to all channels
  (``maps --per-slice``) and, last, the map of the real multi-slice input.
- ``region_score_plot``: box plots of the energy share in the margin band and in the body
  per method and nodule class (from ``scores``).

Maps are shown clipped at 0 (positive evidence only; 0 is left transparent over the CT) in a
perceptually uniform colour map (``MAP_CMAP``), each panel with its colour bar. ``scale="panel"``
divides each map by its own maximum (colour bar: fraction of that maximum); ``scale="shared"``
shows one column's maps (one method) on one scale, in the map's own units, so panels of a
column compare. The ROI panel carries the readers' contour (solid) and the margin band the
region scores use (dashed, r = ``band_mm``), a scale bar in mm and the orientation letters
of the axial plane (rows run anterior to posterior, columns patient right to left).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nodulekit.artifacts import read_maps
from nodulekit.constants import MALIGNANT, predict_label
from nodulekit.errors import NodulekitError

FORMATS = ("png", "pdf", "svg")
DEFAULT_DPI = 150
MAP_CMAP = "magma"  # perceptually uniform, readable in grey scale and by colour-blind readers
SCALES = ("panel", "shared")
ORIENTATION = {"top": "A", "bottom": "P", "left": "R", "right": "L"}  # rows +y (posterior), columns +x (left)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_format(fmt: str) -> str:
    """A figure format ``--format`` accepts, or one error line."""
    if fmt not in FORMATS:
        raise NodulekitError(f"unknown figure format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def check_dpi(dpi: int) -> int:
    if not 30 <= int(dpi) <= 2400:
        raise NodulekitError(f"--dpi {dpi} is not between 30 and 2400")
    return int(dpi)


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise NodulekitError(f"unknown map scaling {scale!r}: use one of {', '.join(SCALES)}")
    return scale


def save_figure(fig, path: str | Path, fmt: str = "png", dpi: int = DEFAULT_DPI) -> None:
    """Write and close ``fig`` (no atomicity: callers write into temporary paths)."""
    # PDF/SVG text stays text and the file has no creation date, so a rerun gives the same bytes.
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[check_format(fmt)]
    fig.savefig(path, dpi=check_dpi(dpi), format=fmt, metadata=metadata)
    _pyplot().close(fig)


def _save(fig, out: str | Path, overwrite: bool, fmt: str = "png", dpi: int = DEFAULT_DPI) -> Path:
    from nodulekit.artifacts import atomic_path, check_output_path

    out = check_output_path(out, overwrite)
    with atomic_path(out, suffix=f".{fmt}") as tmp:
        # no bbox_inches="tight": constrained layout fits the figure, whose size stays figsize x dpi
        fig.savefig(tmp, dpi=check_dpi(dpi), format=check_format(fmt))
    _pyplot().close(fig)
    return out


def _display(m: np.ndarray) -> np.ndarray:
    m = np.clip(np.asarray(m, float), 0, None)
    top = m.max()
    return m / top if top > 0 else m


def show_map(ax, m: np.ndarray, vmax: float | None, label: str):
    """Overlay a map's positive part on ``ax`` (0 transparent), with its colour bar labelled ``label``.

    ``vmax`` None: scaled to the map's own maximum (the colour bar runs 0..1)."""
    m = np.clip(np.asarray(m, float), 0, None)
    if vmax is None:
        m, vmax = _display(m), 1.0
    im = ax.imshow(
        np.ma.masked_less_equal(m, 0), cmap=MAP_CMAP, alpha=0.7, vmin=0, vmax=vmax or 1.0, interpolation="nearest"
    )
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=5, length=2)
    bar.set_label(label, fontsize=5)
    return bar


def show_roi(ax, roi: np.ndarray, mask: np.ndarray | None, pixel_mm: float | None, band_mm: float | None) -> None:
    """The ROI in grey with the readers' contour, the margin band, a scale bar and orientation letters."""
    ax.imshow(roi, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        if band_mm and pixel_mm:
            from nodulekit.scores import region_labels

            regions = region_labels(mask, pixel_mm, band_mm)  # 0 body, 1 band, 2 outside: as `scores` uses
            ax.contour(regions, levels=[0.5, 1.5], colors="cyan", linewidths=0.6, linestyles="--")
    if pixel_mm:
        scale_bar(ax, roi.shape[1], float(pixel_mm))
    orientation_letters(ax)
    ax.set_xlim(-0.5, roi.shape[1] - 0.5)
    ax.set_ylim(roi.shape[0] - 0.5, -0.5)


def scale_bar(ax, width_px: int, pixel_mm: float) -> None:
    """A bar of a round length in mm (about a quarter of the panel), bottom left."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    target = width_px * pixel_mm / 4
    length = max(v for v in (1, 2, 5, 10, 20, 50) if v <= max(target, 1))
    bar = AnchoredSizeBar(
        ax.transData, length / pixel_mm, f"{length:g} mm", "lower left", pad=0.2, color="white", frameon=False,
        size_vertical=0.4, fontproperties={"size": 5},
    )  # fmt: skip
    ax.add_artist(bar)


def orientation_letters(ax) -> None:
    style = {"color": "yellow", "fontsize": 5, "transform": ax.transAxes, "ha": "center", "va": "center"}
    for (x, y), side in (((0.5, 0.94), "top"), ((0.5, 0.06), "bottom"), ((0.05, 0.5), "left"), ((0.95, 0.5), "right")):
        ax.text(x, y, ORIENTATION[side], **style)


def _prob_label(ax, prob: float, y: int | None) -> None:
    wrong = y is not None and y >= 0 and predict_label(prob) != y
    ax.set_xlabel(f"{prob:.3f}", color="red" if wrong else "black", fontsize=9)


def _pick_nodules(ids: list[str], y: np.ndarray, n: int) -> list[str]:
    """Up to n nodules, half malignant and half benign, evenly spread over the list."""
    chosen: list[str] = []
    for cls, k in ((1, (n + 1) // 2), (0, n // 2)):
        pool = [i for i, v in zip(ids, y, strict=True) if v == cls]
        if pool and k:
            chosen += [pool[j] for j in np.unique(np.linspace(0, len(pool) - 1, min(k, len(pool))).round().astype(int))]
    return chosen or ids[:n]


def _grid_nodules(runs, ds, row_of: dict, nodules: Sequence[str] | None, n: int) -> list[str]:
    """``nodules`` (each in every maps file and the dataset), else ``n`` picked among those shared."""
    common = [i for i in runs[0].nodule_id if all(i in set(r.nodule_id) for r in runs[1:])]
    if nodules:
        missing = [i for i in nodules if i not in common or i not in row_of]
        if missing:
            raise NodulekitError(f"nodule(s) not in every maps file and the dataset: {', '.join(missing[:5])}")
        return list(nodules)
    common = [i for i in common if i in row_of]
    if not common:
        raise NodulekitError("the maps files share no nodule with each other and the dataset")
    return _pick_nodules(common, ds.y[[row_of[i] for i in common]], n)


def map_grid(
    maps_paths: Sequence[str | Path],
    dataset: str | Path,
    out: str | Path,
    *,
    nodules: Sequence[str] | None = None,
    n: int = 6,
    map_class: int = 1,
    overwrite: bool = False,
    labels: Sequence[str] | None = None,
    scale: str = "panel",
    band_mm: float = 2.0,
    fmt: str = "png",
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Fig. 7-style grid: the ROI (the channel maps are scored against) + each method's map for the chosen nodules.

    Column titles are ``labels`` if given, else :func:`nodulekit.scores.map_labels`; ``scale``
    and the ROI panel's marks as in the module's description."""
    from nodulekit.datasets import load_dataset
    from nodulekit.scores import check_maps_dataset, map_channel, map_labels

    check_scale(scale)
    check_format(fmt)
    check_dpi(dpi)
    if not maps_paths:
        raise NodulekitError("give at least one maps file")
    ds = load_dataset(dataset)
    runs = [read_maps(p) for p in maps_paths]
    for r in runs:
        check_maps_dataset(r, ds)
    row_of = {nid: i for i, nid in enumerate(ds.nodule_id.tolist())}
    chosen = _grid_nodules(runs, ds, row_of, nodules, n)
    plt = _pyplot()
    cols = 1 + len(runs)
    fig, axes = plt.subplots(
        len(chosen), cols, figsize=(2.2 * cols, 2.0 * len(chosen)), squeeze=False, layout="constrained"
    )
    shown = map_channel(ds)  # the same channel (and scale) `scores` measures against
    titles = list(labels) if labels is not None else map_labels(runs)
    picks = [[run.nodule_id.index(nid) for nid in chosen] for run in runs]
    tops = [
        max(float(np.clip(run.maps_up[i, map_class], 0, None).max()) for i in idx)
        for run, idx in zip(runs, picks, strict=True)
    ]
    for r, nid in enumerate(chosen):
        row = row_of[nid]
        roi = ds.x[row, shown]
        y = int(ds.y[row])
        ax = axes[r, 0]
        show_roi(ax, roi, ds.mask[row, shown], float(ds.pixel_mm[row, shown]), band_mm)
        ax.set_ylabel(f"{nid}\n{'M' if y == 1 else 'B'}", fontsize=7)
        if r == 0:
            ax.set_title("ROI", fontsize=9)
        for c, run in enumerate(runs, start=1):
            i = picks[c - 1][r]
            ax = axes[r, c]
            ax.imshow(roi, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if scale == "panel":
                show_map(ax, run.maps_up[i, map_class], None, "fraction of panel max")
            else:
                show_map(ax, run.maps_up[i, map_class], tops[c - 1], "map value")
            _prob_label(ax, float(run.prob[i]), y)
            if r == 0:
                ax.set_title(titles[c - 1].upper(), fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    how = "each map scaled to its own maximum" if scale == "panel" else "one scale per column, in the map's units"
    title = (
        f"Malignant-class maps (positive part; {how}); value = predicted malignant probability (red: FP/FN). "
        f"ROI: readers' contour (green), margin band r = {band_mm:g} mm (cyan, dashed); axial, A top, R left"
    )
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 15)), fontsize=7)
    return _save(fig, out, overwrite, fmt, dpi)


def slice_grid(
    maps_path: str | Path,
    dataset: str | Path,
    out: str | Path,
    *,
    nodules: Sequence[str] | None = None,
    n: int = 4,
    slices: int = 5,
    overwrite: bool = False,
    fmt: str = "png",
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Fig. 5-style grid from a ``maps --per-slice`` file: single-slice maps, then the full-volume map
    (each map scaled to its own maximum)."""
    from nodulekit.datasets import load_dataset
    from nodulekit.scores import check_maps_dataset, map_channel

    run = read_maps(maps_path)
    if "slice_maps" not in run.extra:
        raise NodulekitError(f"{maps_path} has no slice_maps; make it with `nodulekit maps --per-slice`")
    ds = load_dataset(dataset)
    check_maps_dataset(run, ds)
    row_of = {nid: i for i, nid in enumerate(ds.nodule_id.tolist())}
    ids = [i for i in run.nodule_id if i in row_of]
    if nodules:
        missing = [i for i in nodules if i not in ids]
        if missing:
            raise NodulekitError(f"nodule(s) not in {maps_path} and the dataset: {', '.join(missing[:5])}")
        chosen = list(nodules)
    else:
        chosen = _pick_nodules(ids, ds.y[[row_of[i] for i in ids]], n)
    from nodulekit.maps import upsample

    channels = run.extra["slice_maps"].shape[1]
    shown = np.unique(np.linspace(0, channels - 1, min(slices, channels)).round().astype(int))
    plt = _pyplot()
    cols = len(shown) + 1
    fig, axes = plt.subplots(
        len(chosen), cols, figsize=(1.8 * cols, 2.0 * len(chosen)), squeeze=False, layout="constrained"
    )
    for r, nid in enumerate(chosen):
        i, row = run.nodule_id.index(nid), row_of[nid]
        y = int(ds.y[row])
        up = upsample(run.extra["slice_maps"][i : i + 1])[0]
        for c, s in enumerate(shown):
            ax = axes[r, c]
            ax.imshow(ds.x[row, s], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            show_map(ax, up[s], None, "fraction of panel max")
            _prob_label(ax, float(run.extra["slice_prob"][i, s]), y)
            if r == 0:
                ax.set_title(f"slice {s}", fontsize=9)
        ax = axes[r, -1]
        ax.imshow(ds.x[row, map_channel(ds)], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        show_map(ax, run.maps_up[i, MALIGNANT], None, "fraction of panel max")
        _prob_label(ax, float(run.prob[i]), y)
        axes[r, 0].set_ylabel(f"{nid}\n{'M' if y == 1 else 'B'}", fontsize=7)
        if r == 0:
            ax.set_title("all slices", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{run.method.upper()}: single slices copied to all channels, then the real volume "
        "(positive part, each map scaled to its own maximum)",
        fontsize=9,
    )
    return _save(fig, out, overwrite, fmt, dpi)


def region_score_plot(
    scores, out: str | Path, *, overwrite: bool = False, fmt: str = "png", dpi: int = DEFAULT_DPI
) -> Path:
    """Box plots of margin-band and body energy share per method x nodule class."""
    if len(scores) == 0:
        raise NodulekitError("no region scores to plot")
    plt = _pyplot()
    key = "map" if "map" in scores else "method"
    methods = list(dict.fromkeys(scores[key]))
    classes = [c for c in ("malignant", "benign") if c in set(scores["class"])]
    colours = {"malignant": "#d62728", "benign": "#1f77b4"}
    # Side by side for a few maps; one above the other when many would make the figure too wide.
    stacked = len(methods) > 4
    shape, size = (
        ((2, 1), (max(6, 1.2 * len(methods)), 6.4)) if stacked else ((1, 2), (max(6, 3.2 * len(methods)), 3.6))
    )
    fig, axes = plt.subplots(*shape, figsize=size, sharey=True, squeeze=False, layout="constrained")
    axes = axes.ravel()
    for ax, region, title in zip(axes, ("margin_band", "body"), ("margin band", "body"), strict=True):
        width = 0.8 / max(1, len(classes))
        for j, cls in enumerate(classes):
            data = [
                scores.loc[(scores[key] == m) & (scores["class"] == cls), f"share_{region}"].dropna().to_numpy()
                for m in methods
            ]
            pos = np.arange(len(methods)) + (j - (len(classes) - 1) / 2) * width
            keep = [k for k, d in enumerate(data) if len(d)]
            if keep:
                bp = ax.boxplot(
                    [data[k] for k in keep],
                    positions=pos[keep],
                    widths=width * 0.9,
                    patch_artist=True,
                    showfliers=False,
                )
                for patch in bp["boxes"]:
                    patch.set_facecolor(colours.get(cls, "grey"))
                    patch.set_alpha(0.6)
            ax.plot([], [], color=colours.get(cls, "grey"), lw=6, alpha=0.6, label=cls)
        ticks = [m.upper().replace(" ", "\n").replace(":", "\n") for m in methods]
        ax.set_xticks(range(len(methods)), ticks, fontsize=7)
        ax.set_title(f"energy share in the {title}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of positive map energy")
    axes[0].legend(fontsize=8)
    rule = scores["band_rule"].iloc[0] if "band_rule" in scores else None
    fig.suptitle(
        f"Where the {scores['map_class'].iloc[0]}-class maps put their energy"
        + (f" (margin band: within r of the contour, {rule})" if rule is not None else ""),
        fontsize=10,
    )
    return _save(fig, out, overwrite, fmt, dpi)


def draw_figures(
    maps_paths: Sequence[str | Path],
    dataset: str | Path,
    out_dir: str | Path,
    *,
    nodules: Sequence[str] | None = None,
    n: int = 6,
    scores_csv: str | Path | None = None,
    overwrite: bool = False,
    scale: str = "panel",
    fmt: str = "png",
    dpi: int = DEFAULT_DPI,
) -> list[Path]:
    """Every figure of ``nodulekit figures`` into ``out_dir``: map_grid.<fmt>, slices_<method>.<fmt> for
    maps with slice maps, region_scores.<fmt> from ``scores_csv``. Inputs and outputs are checked
    before anything is drawn, and the files appear together or not at all."""
    from nodulekit.outputs import atomic_paths, check_output_dir, check_output_path, output_folder
    from nodulekit.scores import read_scores

    check_format(fmt)
    check_dpi(dpi)
    check_scale(scale)
    if n < 1:
        raise NodulekitError(f"--n must be at least 1, got {n}")
    out_dir = check_output_dir(out_dir)
    scores = read_scores(scores_csv) if scores_csv is not None else None
    read = {Path(p): read_maps(p) for p in maps_paths}
    slices = {p: m.method for p, m in read.items() if "slice_maps" in m.extra}
    names = ["map_grid"] + [f"slices_{m}" for m in slices.values()]
    names += ["region_scores"] if scores is not None else []
    targets = {name: out_dir / f"{name}.{fmt}" for name in names}
    style = {"overwrite": True, "fmt": fmt, "dpi": dpi}
    with output_folder(out_dir):  # one `figures` at a time into a folder
        for path in targets.values():
            check_output_path(path, overwrite)  # refuse before any work
        with atomic_paths(targets, overwrite=overwrite) as tmp:
            map_grid(maps_paths, dataset, tmp["map_grid"], nodules=nodules, n=n, scale=scale, **style)
            for path, method in slices.items():
                slice_grid(path, dataset, tmp[f"slices_{method}"], nodules=nodules, n=min(n, 4), **style)
            if scores is not None:
                region_score_plot(scores, tmp["region_scores"], **style)
    return list(targets.values())
