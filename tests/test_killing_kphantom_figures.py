"""What each figure of ``nodulekit figures`` is specified to show, read back from the matplotlib
objects (texts, labels, font sizes, figure sizes, axes, colour maps, legend entries): the figure
module's docstring and each function's docstring are the specification."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import write_tiny_dataset

from nodulekit import figures as F
from nodulekit.errors import NodulekitError

pytest.importorskip("torch")

N = 8
CHANNELS = 11


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny dataset, two maps files (HESAM with slice maps, Grad-CAM), known probabilities."""
    from nodulekit.artifacts import provenance, write_maps
    from nodulekit.datasets import dataset_identity, load_dataset

    folder = tmp_path_factory.mktemp("kfigures")
    path = write_tiny_dataset(folder / "d.h5", n=N)
    ds = load_dataset(path)
    rng = np.random.default_rng(1)
    probs = {"hesam": np.linspace(0.05, 0.95, N), "gradcam": np.linspace(0.9, 0.1, N)}
    files = {}
    for k, method in enumerate(("hesam", "gradcam")):
        up = (
            rng.uniform(-0.5, 1.0, (N, 2, 32, 32)).astype(np.float32)
            * (k + 1)
            * np.arange(1, N + 1)[:, None, None, None]
        )
        extra = None
        if method == "hesam":
            extra = {
                "slice_maps": rng.uniform(0.1, 1.0, (N, CHANNELS, 8, 8)).astype(np.float32),
                "slice_prob": np.tile(np.linspace(0.0, 1.0, CHANNELS), (N, 1)).astype(np.float32),
            }
        files[method] = write_maps(
            folder / f"{method}.h5", nodule_id=ds.nodule_id.tolist(), maps=up[:, :, ::4, ::4], maps_up=up,
            prob=probs[method], method=method, arch="hesam", source="test", prov=provenance(), y=ds.y,
            dataset_identity=dataset_identity(ds), extra=extra,
        )  # fmt: skip
    return {"dataset": path, "ds": ds, "maps": [files["hesam"], files["gradcam"]], "probs": probs}


@pytest.fixture
def kept(monkeypatch):
    """Figures drawn during a test, kept open (saving closes them otherwise)."""
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    return figs


def _grid(fig):
    return [ax for ax in fig.axes if ax.images]


# ----------------------------------------------------------------------------- option checks


def test_dpi_bounds_are_inclusive_and_the_value_an_integer():
    assert F.check_dpi(30) == 30 and F.check_dpi(2400) == 2400 and F.check_dpi(72.0) == 72
    assert isinstance(F.check_dpi(72.0), int)
    for bad in (29, 2401):
        with pytest.raises(NodulekitError, match=f"^--dpi {bad} is not between 30 and 2400$"):
            F.check_dpi(bad)
    assert F.check_format("svg") == "svg" and F.check_scale("shared") == "shared"
    assert F.DEFAULT_DPI == 150 and F.FORMATS == ("png", "pdf", "svg") and F.SCALES == ("panel", "shared")


def test_save_figure_writes_reproducible_files_at_the_dpi_and_closes_the_figure(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    def draw():
        fig = plt.figure(figsize=(2, 1))
        fig.text(0.5, 0.5, "x")
        return fig

    for fmt in ("pdf", "svg"):
        F.save_figure(draw(), tmp_path / f"a.{fmt}", fmt)
        F.save_figure(draw(), tmp_path / f"b.{fmt}", fmt)
        assert (tmp_path / f"a.{fmt}").read_bytes() == (tmp_path / f"b.{fmt}").read_bytes()  # no date
    fig = draw()
    F.save_figure(fig, tmp_path / "c.png", "png", dpi=40)
    assert not plt.fignum_exists(fig.number)
    assert Image.open(tmp_path / "c.png").size == (80, 40)
    assert b"Software" not in (tmp_path / "c.png").read_bytes()
    F.save_figure(draw(), tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").size == (300, 150)  # the default 150 dpi
    with pytest.raises(NodulekitError, match="unknown figure format"):
        F.save_figure(draw(), tmp_path / "e.bmp", "bmp")


def test_save_refuses_an_existing_file_and_closes_the_figure(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    out = tmp_path / "f.png"
    fig = plt.figure(figsize=(1, 1))
    assert F._save(fig, out, False, "png", 50) == out and Image.open(out).size == (50, 50)
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(NodulekitError):
        F._save(plt.figure(), out, False)
    F._save(plt.figure(figsize=(1, 1)), out, True)
    assert Image.open(out).size == (150, 150)
    plt.close("all")


def test_display_keeps_the_positive_part_as_a_fraction_of_its_maximum():
    np.testing.assert_allclose(F._display([[-1.0, 0.0], [2.0, 4.0]]), [[0.0, 0.0], [0.5, 1.0]])
    np.testing.assert_array_equal(F._display([[-1.0, -2.0]]), [[0.0, 0.0]])


# ----------------------------------------------------------------------------- panel pieces


def test_show_map_overlays_the_positive_part_with_a_labelled_colour_bar():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    m = np.array([[-1.0, 0.0], [1.0, 3.0]])
    bar = F.show_map(ax, m, None, "fraction of panel max")
    im = ax.images[-1]
    assert im.get_cmap().name == F.MAP_CMAP == "magma" and im.get_alpha() == 0.7
    assert im.get_clim() == (0.0, 1.0) and im.get_interpolation() == "nearest"
    np.testing.assert_allclose(im.get_array().filled(-9), [[-9, -9], [1 / 3, 1.0]])
    assert bar.ax.get_ylabel() == "fraction of panel max" and bar.ax.yaxis.label.get_fontsize() == 5
    assert bar.ax.yaxis.get_major_ticks()[0].label1.get_fontsize() == 5
    F.show_map(ax, m, 6.0, "map value")
    assert ax.images[-1].get_clim() == (0.0, 6.0)
    np.testing.assert_allclose(ax.images[-1].get_array().filled(-9), [[-9, -9], [1.0, 3.0]])
    F.show_map(ax, m, 0.0, "map value")  # a zero scale falls back to 1
    assert ax.images[-1].get_clim() == (0.0, 1.0)
    plt.close(fig)


def test_show_roi_draws_grey_ct_contour_band_scale_bar_and_letters():
    import matplotlib.pyplot as plt

    roi = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    mask = np.zeros((32, 32), bool)
    mask[10:22, 10:22] = True
    fig, ax = plt.subplots()
    F.show_roi(ax, roi, mask, 0.5, 2.0)
    im = ax.images[0]
    assert im.get_cmap().name == "gray" and im.get_clim() == (0.0, 1.0) and im.get_interpolation() == "nearest"
    contour, band = [c for c in ax.collections if hasattr(c, "levels")]
    assert list(contour.levels) == [0.5] and list(band.levels) == [0.5, 1.5]
    assert contour.get_linewidths()[0] == 0.8 and band.get_linewidths()[0] == 0.6
    assert tuple(contour.get_edgecolor()[0][:3]) == (0.0, 1.0, 0.0)  # lime
    assert tuple(band.get_edgecolor()[0][:3]) == (0.0, 1.0, 1.0)  # cyan
    assert band.get_linestyle()[0][1] is not None  # dashed
    assert ax.get_xlim() == (-0.5, 31.5) and ax.get_ylim() == (31.5, -0.5)
    assert len(ax.artists) == 1 and sorted(t.get_text() for t in ax.texts) == ["A", "L", "P", "R"]
    # no band without its radius or the pixel size; no contour for an empty mask; no bar without pixel size
    for args, contours, bars in (
        ((mask, 0.5, None), 1, 1),
        ((mask, None, 2.0), 1, 0),
        ((~mask & False, 0.5, 2.0), 0, 1),
    ):
        fig2, ax2 = plt.subplots()
        F.show_roi(ax2, roi, *args)
        assert len([c for c in ax2.collections if hasattr(c, "levels")]) == contours and len(ax2.artists) == bars
        plt.close(fig2)
    fig3, ax3 = plt.subplots()
    F.show_roi(ax3, roi, None, 0.5, 2.0)
    assert not ax3.collections
    plt.close("all")


@pytest.mark.parametrize(
    ("width_px", "pixel_mm", "length"),
    [
        (32, 0.5, 2),
        (32, 1.0, 5),
        (32, 2.5, 20),
        (32, 0.1, 1),
        (32, 0.05, 1),
        (40, 1.0, 10),
        (64, 3.2, 50),
        (32, 30.0, 50),
    ],
)
def test_scale_bar_is_the_largest_round_length_up_to_a_quarter_of_the_panel(width_px, pixel_mm, length):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    F.scale_bar(ax, width_px, pixel_mm)
    (bar,) = ax.artists
    assert bar.txt_label.get_text() == f"{length} mm"
    assert bar.size_bar.get_children()[0].get_width() == pytest.approx(length / pixel_mm)
    assert bar.size_bar.get_children()[0].get_height() == pytest.approx(0.4)
    assert bar.loc == 3 and bar.pad == 0.2 and not bar.patch.get_visible()  # lower left, no frame
    text = bar.txt_label.get_children()[0]
    assert text.get_fontsize() == 5 and text.get_color() == "white"
    plt.close(fig)


def test_orientation_letters_sit_at_the_four_sides_in_small_yellow_type():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    F.orientation_letters(ax)
    where = {t.get_text(): t.get_position() for t in ax.texts}
    assert where == {"A": (0.5, 0.94), "P": (0.5, 0.06), "R": (0.05, 0.5), "L": (0.95, 0.5)}
    for t in ax.texts:
        assert t.get_color() == "yellow" and t.get_fontsize() == 5 and t.get_transform() == ax.transAxes
        assert t.get_ha() == "center" and t.get_va() == "center"
    plt.close(fig)


@pytest.mark.parametrize(
    ("prob", "y", "colour"),
    [(0.7, 1, "black"), (0.7, 0, "red"), (0.5, 0, "black"), (0.5, 1, "red"), (0.2, 1, "red"), (0.9, None, "black"),
     (0.9, -1, "black"), (0.2, 0, "black")],
)  # fmt: skip
def test_probability_label_is_red_for_a_wrong_call(prob, y, colour):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    F._prob_label(ax, prob, y)
    assert ax.get_xlabel() == f"{prob:.3f}" and ax.xaxis.label.get_color() == colour
    assert ax.xaxis.label.get_fontsize() == 9
    plt.close(fig)


def test_picked_nodules_are_half_malignant_half_benign_evenly_spread():
    ids = [f"n{i}" for i in range(10)]
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    assert F._pick_nodules(ids, y, 4) == ["n0", "n4", "n5", "n9"]
    assert F._pick_nodules(ids, y, 5) == ["n0", "n2", "n4", "n5", "n9"]  # the odd one: malignant
    assert F._pick_nodules(ids, y, 1) == ["n0"]
    assert F._pick_nodules(ids, y, 30) == ids  # no more than there are
    assert F._pick_nodules(ids[:3], np.array([0, 0, 0]), 4) == ["n0", "n2"]  # benign only: half of n
    assert F._pick_nodules(ids[:3], np.array([-1, -1, -1]), 2) == ["n0", "n1"]  # unlabelled: the first n


# ----------------------------------------------------------------------------- map grid


def test_map_grid_layout_titles_labels_and_font_sizes(env, kept, tmp_path):
    ds = env["ds"]
    F.map_grid(env["maps"], env["dataset"], tmp_path / "g.png", n=4, band_mm=1.5, labels=["one", "two"], dpi=30)
    (fig,) = kept
    assert tuple(fig.get_size_inches()) == pytest.approx((2.2 * 3, 2.0 * 4))
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"  # fits the fixed figure size
    grid = _grid(fig)
    assert len(grid) == 12
    rows = [grid[3 * r : 3 * r + 3] for r in range(4)]
    assert rows[0][0].get_title() == "ROI" and rows[0][0].title.get_fontsize() == 9
    assert [ax.get_title() for ax in rows[0][1:]] == ["ONE", "TWO"]
    assert all(ax.title.get_fontsize() == 8 for ax in rows[0][1:])
    assert all(ax.get_title() == "" for row in rows[1:] for ax in row)
    ids = ds.nodule_id.tolist()
    picked = F._pick_nodules(ids, ds.y, 4)
    for row, nid in zip(rows, picked, strict=True):
        y = int(ds.y[ids.index(nid)])
        assert row[0].get_ylabel() == f"{nid}\n{'M' if y == 1 else 'B'}" and row[0].yaxis.label.get_fontsize() == 7
        for ax, method in zip(row[1:], ("hesam", "gradcam"), strict=True):
            assert ax.get_xlabel() == f"{env['probs'][method][ids.index(nid)]:.3f}"
            ct = ax.images[0]  # the ROI under each map, on the ROI panel's grey scale
            assert ct.get_cmap().name == "gray" and ct.get_clim() == (0.0, 1.0) and ct.get_interpolation() == "nearest"
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in grid)
    title = (
        "Malignant-class maps (positive part; each map scaled to its own maximum); value = predicted malignant "
        "probability (red: FP/FN). ROI: readers' contour (green), margin band r = 1.5 mm (cyan, dashed); axial, "
        "A top, R left"
    )
    assert fig._suptitle.get_text() == textwrap.fill(title, width=int(2.2 * 3 * 15))
    assert fig._suptitle.get_fontsize() == 7


def test_map_grid_default_titles_and_the_class_shown(env, kept, tmp_path):
    from nodulekit.artifacts import read_maps

    ids = env["ds"].nodule_id.tolist()[1:3]
    F.map_grid(env["maps"][:1], env["dataset"], tmp_path / "g.png", nodules=ids, map_class=0, scale="shared", dpi=30)
    (fig,) = kept
    assert tuple(fig.get_size_inches()) == pytest.approx((2.2 * 2, 2.0 * 2))
    grid = _grid(fig)
    assert grid[1].get_title() == "HESAM"
    m = read_maps(env["maps"][0])
    picks = [m.nodule_id.index(i) for i in ids]
    top = max(float(np.clip(m.maps_up[i, 0], 0, None).max()) for i in picks)
    for ax, i in zip(grid[1::2], picks, strict=True):
        assert ax.images[-1].get_clim() == pytest.approx((0.0, top))
        np.testing.assert_allclose(ax.images[-1].get_array().filled(0), np.clip(m.maps_up[i, 0], 0, None), atol=1e-6)
    title = fig._suptitle.get_text()
    assert "one scale per column, in the map's units" in " ".join(title.split())
    assert "margin band r = 2 mm" in " ".join(title.split())
    assert max(len(line) for line in title.splitlines()) <= int(2.2 * 2 * 15) < len(title)  # wrapped to the width


def test_map_grid_draws_six_nodules_by_default_and_one_row_alone(env, kept, tmp_path):
    ds = env["ds"]
    F.map_grid(env["maps"][1:], env["dataset"], tmp_path / "g.png", dpi=30)
    rows = [ax.get_ylabel().split("\n")[0] for ax in _grid(kept[0])[::2]]
    assert rows == F._pick_nodules(ds.nodule_id.tolist(), ds.y, 6) and len(rows) == 6
    one = ds.nodule_id.tolist()[:1]
    F.map_grid(env["maps"][1:], env["dataset"], tmp_path / "one.png", nodules=one, dpi=30)
    assert len(_grid(kept[1])) == 2 and _grid(kept[1])[0].get_ylabel().startswith(one[0])
    with pytest.raises(NodulekitError):  # not overwritten unless asked
        F.map_grid(env["maps"][1:], env["dataset"], tmp_path / "one.png", nodules=one, dpi=30)


def test_map_grid_refuses_bad_requests(env, tmp_path):
    with pytest.raises(NodulekitError, match="^give at least one maps file$"):
        F.map_grid([], env["dataset"], tmp_path / "g.png")
    with pytest.raises(NodulekitError, match="^nodule\\(s\\) not in every maps file and the dataset: zz, yy$"):
        F.map_grid(env["maps"], env["dataset"], tmp_path / "g.png", nodules=["zz", "yy"])
    with pytest.raises(NodulekitError, match="unknown map scaling"):
        F.map_grid(env["maps"], env["dataset"], tmp_path / "g.png", scale="log")
    assert not (tmp_path / "g.png").exists()


# ----------------------------------------------------------------------------- slice grid


def test_slice_grid_shows_evenly_spread_slices_then_the_whole_volume(env, kept, tmp_path):
    ds = env["ds"]
    F.slice_grid(env["maps"][0], env["dataset"], tmp_path / "s.png", n=2, slices=4, dpi=30)
    (fig,) = kept
    shown = [0, 3, 7, 10]  # linspace(0, 10, 4) rounded
    assert tuple(fig.get_size_inches()) == pytest.approx((1.8 * 5, 2.0 * 2))
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    grid = _grid(fig)
    assert len(grid) == 10
    assert [ax.get_title() for ax in grid[:5]] == [f"slice {s}" for s in shown] + ["all slices"]
    assert all(ax.title.get_fontsize() == 9 for ax in grid[:5])
    ids = ds.nodule_id.tolist()
    first = F._pick_nodules(ids, ds.y, 2)[0]
    row = ids.index(first)
    assert grid[0].get_ylabel() == f"{first}\n{'M' if ds.y[row] == 1 else 'B'}"
    assert [ax.get_xlabel() for ax in grid[:4]] == [f"{s / 10:.3f}" for s in shown]  # slice_prob = s / 10
    assert grid[4].get_xlabel() == f"{env['probs']['hesam'][row]:.3f}"
    np.testing.assert_allclose(grid[1].images[0].get_array(), ds.x[row, 3])  # the CT of that slice
    assert fig._suptitle.get_text() == (
        "HESAM: single slices copied to all channels, then the real volume "
        "(positive part, each map scaled to its own maximum)"
    )
    assert fig._suptitle.get_fontsize() == 9


def test_slice_grid_shows_five_slices_by_default(env, kept, tmp_path):
    one = env["ds"].nodule_id.tolist()[:1]
    F.slice_grid(env["maps"][0], env["dataset"], tmp_path / "s.png", nodules=one, dpi=30)
    titles = [ax.get_title() for ax in _grid(kept[0])]
    assert titles == [
        "slice 0",
        "slice 2",
        "slice 5",
        "slice 8",
        "slice 10",
        "all slices",
    ]  # linspace(0, 10, 5) rounded
    assert tuple(kept[0].get_size_inches()) == pytest.approx((1.8 * 6, 2.0))


def test_slice_grid_needs_slice_maps_and_known_nodules(env, tmp_path):
    with pytest.raises(NodulekitError, match="has no slice_maps; make it with `nodulekit maps --per-slice`"):
        F.slice_grid(env["maps"][1], env["dataset"], tmp_path / "s.png")
    with pytest.raises(NodulekitError, match="^nodule\\(s\\) not in .* and the dataset: qq$"):
        F.slice_grid(env["maps"][0], env["dataset"], tmp_path / "s.png", nodules=["qq"])


# ----------------------------------------------------------------------------- region scores


def _scores(methods, classes=("malignant", "benign"), rule="2 mm"):
    rows = []
    for k, m in enumerate(methods):
        for j, cls in enumerate(classes):
            for i in range(3):
                rows.append({"map": m, "class": cls, "share_margin_band": 0.1 * (k + 1) + 0.01 * i + 0.05 * j,
                             "share_body": 0.5 - 0.01 * i, "map_class": "malignant", "band_rule": rule})  # fmt: skip
    return pd.DataFrame(rows)


def test_region_score_plot_side_by_side_for_few_maps(kept, tmp_path):
    F.region_score_plot(_scores(["hesam", "grad-cam: b"]), tmp_path / "r.png", dpi=30)
    (fig,) = kept
    assert tuple(fig.get_size_inches()) == pytest.approx((6.4, 3.6))  # max(6, 3.2 x 2 maps)
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    band, body = fig.axes
    assert band.get_position().y0 == pytest.approx(body.get_position().y0, abs=0.05)  # one row
    assert band.get_title() == "energy share in the margin band" and body.get_title() == "energy share in the body"
    assert band.title.get_fontsize() == 10 and band.get_ylim() == (0.0, 1.0)
    assert band.get_ylabel() == "share of positive map energy" and body.get_ylabel() == ""
    assert [t.get_text() for t in band.get_xticklabels()] == ["HESAM", "GRAD-CAM\n\nB"]
    assert all(t.get_fontsize() == 7 for t in band.get_xticklabels())
    legend = band.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["malignant", "benign"] and body.get_legend() is None
    assert legend.get_texts()[0].get_fontsize() == 8
    boxes = [p for p in band.patches if type(p).__name__ == "PathPatch"]
    assert len(boxes) == 4
    colours = [tuple(np.round(p.get_facecolor()[:3], 3)) for p in boxes]
    assert colours[:2] == [(0.839, 0.153, 0.157)] * 2 and colours[2:] == [(0.122, 0.467, 0.706)] * 2
    assert all(p.get_alpha() == 0.6 for p in boxes)
    # boxes of a class side by side around each map's position, 0.8 wide in all, 90 % filled
    xs = sorted(np.round([np.ptp(v := p.get_path().vertices[:, 0]) / 2 + v.min() for p in boxes], 2))
    assert xs == pytest.approx([-0.2, 0.2, 0.8, 1.2], abs=0.01)
    # each box spans its class's quartiles: map 1 malignant 0.10..0.12, benign 0.15..0.17 (three values each)
    spans = {round(float(p.get_path().vertices[:, 0].min()), 2): p.get_path().vertices[:, 1] for p in boxes}
    assert (spans[-0.38].min(), spans[-0.38].max()) == pytest.approx((0.105, 0.115))
    assert (spans[0.02].min(), spans[0.02].max()) == pytest.approx((0.155, 0.165))
    widths = [np.ptp(p.get_path().vertices[:, 0]) for p in boxes]
    assert widths == pytest.approx([0.36] * 4)
    assert fig._suptitle.get_text() == (
        "Where the malignant-class maps put their energy (margin band: within r of the contour, 2 mm)"
    )
    assert fig._suptitle.get_fontsize() == 10


def test_region_score_plot_stacks_many_maps_and_handles_one_class(kept, tmp_path):
    methods = [f"m{k}" for k in range(7)]
    scores = _scores(methods, classes=("benign",)).drop(columns=["band_rule"]).rename(columns={"map": "method"})
    F.region_score_plot(scores, tmp_path / "r.png", dpi=30)
    (fig,) = kept
    assert tuple(fig.get_size_inches()) == pytest.approx((max(6, 1.2 * 7), 6.4))
    band, body = fig.axes
    assert band.get_position().y0 > body.get_position().y1 - 0.05  # one above the other
    assert [t.get_text() for t in band.get_legend().get_texts()] == ["benign"]
    boxes = [p for p in band.patches if type(p).__name__ == "PathPatch"]
    assert len(boxes) == 7 and np.ptp(boxes[0].get_path().vertices[:, 0]) == pytest.approx(0.72)
    assert fig._suptitle.get_text() == "Where the malignant-class maps put their energy"
    five = _scores([f"m{k}" for k in range(5)])
    F.region_score_plot(five, tmp_path / "r5.png", dpi=30)
    assert tuple(kept[-1].get_size_inches()) == pytest.approx((6.0, 6.4))  # 5 maps: stacked, at least 6 wide
    four = _scores([f"m{k}" for k in range(4)])
    F.region_score_plot(four, tmp_path / "r4.png", dpi=30)
    assert tuple(kept[-1].get_size_inches()) == pytest.approx((12.8, 3.6))


def test_region_score_plot_skips_a_class_without_values_and_refuses_no_scores(kept, tmp_path):
    scores = _scores(["a", "b"])
    scores.loc[(scores["map"] == "b") & (scores["class"] == "benign"), "share_margin_band"] = np.nan
    F.region_score_plot(scores, tmp_path / "r.png", dpi=30)
    band, body = kept[0].axes
    assert len([p for p in band.patches if type(p).__name__ == "PathPatch"]) == 3
    assert len([p for p in body.patches if type(p).__name__ == "PathPatch"]) == 4
    with pytest.raises(NodulekitError, match="^no region scores to plot$"):
        F.region_score_plot(scores.iloc[:0], tmp_path / "e.png")


# ----------------------------------------------------------------------------- draw_figures


def test_draw_figures_names_every_figure_and_passes_the_options(env, tmp_path, monkeypatch):
    calls = []

    def recorder(name):
        def draw(*args, **kwargs):
            calls.append((name, args, kwargs))
            out = args[2] if name != "region_score_plot" else args[1]
            out.write_text(name)

        return draw

    for name in ("map_grid", "slice_grid", "region_score_plot"):
        monkeypatch.setattr(F, name, recorder(name))
    out = tmp_path / "figs"
    with pytest.raises(NodulekitError, match="^--n must be at least 1, got 0$"):
        F.draw_figures(env["maps"], env["dataset"], out, n=0)
    written = F.draw_figures(env["maps"], env["dataset"], out, n=5, fmt="svg", dpi=40, scale="shared", nodules=["a"])
    assert [p.name for p in written] == ["map_grid.svg", "slices_hesam.svg"]
    assert [p.read_text() for p in written] == ["map_grid", "slice_grid"]
    (_, margs, mkw), (_, sargs, skw) = calls
    assert margs[:2] == (env["maps"], env["dataset"]) and sargs[:2] == (env["maps"][0], env["dataset"])
    style = {"overwrite": True, "fmt": "svg", "dpi": 40}
    assert mkw == {"nodules": ["a"], "n": 5, "scale": "shared", **style}
    assert skw == {"nodules": ["a"], "n": 4, **style}  # at most four nodules in a slice grid
