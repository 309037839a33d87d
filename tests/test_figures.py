"""Publication figures: what each image holds (colour bars, contour, band, scale bar, ROC band), its
size in pixels, its file format, and one-line refusals of bad figure options."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_tiny_dataset
from PIL import Image

from nodulekit import figures as F
from nodulekit.errors import NodulekitError

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def maps_env(tmp_path_factory):
    """A tiny dataset and two maps files (random positive maps, known maxima) on it."""
    from nodulekit.artifacts import provenance, write_maps
    from nodulekit.datasets import dataset_identity, load_dataset

    folder = tmp_path_factory.mktemp("figures")
    path = write_tiny_dataset(folder / "d.h5", n=8)
    ds = load_dataset(path)
    rng = np.random.default_rng(0)
    files = []
    for k, method in enumerate(("hesam", "gradcam")):
        up = rng.uniform(-0.5, 1.0, (8, 2, 32, 32)).astype(np.float32) * (k + 1) * np.arange(1, 9)[:, None, None, None]
        files.append(
            write_maps(
                folder / f"{method}.h5",
                nodule_id=ds.nodule_id.tolist(),
                maps=up[:, :, ::4, ::4],
                maps_up=up,
                prob=rng.uniform(0, 1, 8),
                method=method,
                arch="hesam",
                source="test",
                prov=provenance(),
                y=ds.y,
                dataset_identity=dataset_identity(ds),
            )  # fmt: skip
        )
    return {"dataset": path, "ds": ds, "maps": files, "folder": folder}


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures drawn during a test, kept open (saving closes them otherwise)."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_map_grid_panels_have_colour_bars_contour_band_scale_bar_and_letters(maps_env, kept_figures, tmp_path):
    from nodulekit.scores import map_channel, region_labels

    F.map_grid(maps_env["maps"], maps_env["dataset"], tmp_path / "g.png", n=4)
    (fig,) = kept_figures
    ds = maps_env["ds"]
    grid = [ax for ax in _image_axes(fig)]
    roi_axes, map_axes = grid[::3], [ax for i, ax in enumerate(grid) if i % 3]
    assert len(roi_axes) == 4 and len(map_axes) == 8
    for ax in map_axes:
        overlay = ax.images[-1]
        assert overlay.get_cmap().name == "magma" and overlay.colorbar is not None
        assert overlay.colorbar.ax.get_ylabel() == "fraction of panel max"
        assert overlay.get_array().max() == pytest.approx(1.0)  # per-panel scaling: the panel max is 1
        assert np.ma.getmaskarray(overlay.get_array()).any()  # non-positive part left transparent
    channel = map_channel(ds)
    row = ds.nodule_id.tolist().index(roi_axes[0].get_ylabel().split("\n")[0])
    ax = roi_axes[0]
    contour, band = [c for c in ax.collections if hasattr(c, "levels")]
    assert list(contour.levels) == [0.5] and list(band.levels) == [0.5, 1.5]
    # the band drawn is the regions `scores` uses: its dashed lines enclose exactly the band pixels
    regions = region_labels(ds.mask[row, channel], float(ds.pixel_mm[row, channel]), 2.0)
    assert (regions == 1).any() and (regions == 0).any()
    (bar,) = [a for a in ax.artists if type(a).__name__ == "AnchoredSizeBar"]
    length_mm = float(bar.txt_label.get_text().split()[0])
    assert bar.size_bar.get_children()[0].get_width() == pytest.approx(length_mm / ds.pixel_mm[row, channel])
    assert sorted(t.get_text() for t in ax.texts) == ["A", "L", "P", "R"]
    assert "each map scaled to its own maximum" in fig._suptitle.get_text()


def test_shared_scale_is_one_scale_per_column_in_map_units(maps_env, kept_figures, tmp_path):
    from nodulekit.artifacts import read_maps

    F.map_grid(maps_env["maps"], maps_env["dataset"], tmp_path / "g.png", n=4, scale="shared")
    (fig,) = kept_figures
    grid = _image_axes(fig)
    ids = [ax.get_ylabel().split("\n")[0] for ax in grid[::3]]
    for col, path in enumerate(maps_env["maps"], start=1):
        m = read_maps(path)
        top = max(float(m.maps_up[m.nodule_id.index(i), 1].max()) for i in ids)
        for ax in grid[col::3]:
            assert ax.images[-1].get_clim() == pytest.approx((0.0, top))
            assert ax.images[-1].colorbar.ax.get_ylabel() == "map value"


@pytest.mark.parametrize("fmt, header", [("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF-"), ("svg", b"<?xml")])
def test_formats_and_pixel_size(maps_env, tmp_path, fmt, header):
    out = tmp_path / "figs"
    written = F.draw_figures(maps_env["maps"], maps_env["dataset"], out, n=2, fmt=fmt, dpi=80)
    assert [p.name for p in written] == [f"map_grid.{fmt}"]
    data = written[0].read_bytes()
    assert data.startswith(header) and (fmt != "svg" or b"<svg" in data[:2000])
    if fmt == "png":
        width, height = Image.open(written[0]).size
        assert (width, height) == (round(2.2 * 3 * 80), round(2.0 * 2 * 80))  # figsize (in) x dpi


def _main(monkeypatch, capsys, *args) -> tuple[int, str]:
    import sys

    from nodulekit.cli import main

    monkeypatch.setattr(sys, "argv", ["nodulekit", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_figure_options_are_one_line_and_write_nothing(maps_env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "figs"
    for extra, message in (
        (["--format", "tiff"], "unknown figure format 'tiff': use one of png, pdf, svg"),
        (["--dpi", "5"], "--dpi 5 is not between 30 and 2400"),
        (["--scale", "log"], "unknown map scaling 'log': use one of panel, shared"),
    ):
        code, err = _main(
            monkeypatch, capsys, "figures", *maps_env["maps"], "-d", maps_env["dataset"], "-o", out, *extra
        )
        assert (code, err) == (2, f"nodulekit: error: {message}\n") and not out.exists()
    (tmp_path / "run").mkdir()  # the format is refused before the run is read
    code, err = _main(monkeypatch, capsys, "evaluate", tmp_path / "run", "-o", out, "--format", "eps")
    assert (code, err) == (2, "nodulekit: error: unknown figure format 'eps': use one of png, pdf, svg\n")
    assert not out.exists()


# ----------------------------------------------------------------------------- evaluate's plots


def test_roc_band_is_the_patient_bootstrap_of_the_pooled_roc():
    from sklearn.metrics import roc_curve

    from nodulekit.evaluation import ROC_GRID, roc_band

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 60)
    prob = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 120), 0, 1)
    patients = [f"P{i // 3}" for i in range(120)]
    band = roc_band(y, prob, patients, n_resamples=300, seed=0)
    fpr, tpr, _ = roc_curve(y, prob)  # independent: the staircase at each grid rate
    expected = [tpr[fpr <= g + 1e-12].max() for g in ROC_GRID]
    np.testing.assert_allclose(band["tpr"], expected)
    assert np.all(band["low"] <= band["tpr"] + 1e-12) and np.all(band["tpr"] <= band["high"] + 1e-12)
    assert 0.05 < np.mean(band["high"] - band["low"]) < 0.5  # a real band: neither a line nor everything
    # more patients, narrower band
    y4, p4 = np.tile(y, 4), np.tile(prob, 4)
    wide = roc_band(y4, p4, [f"{p}-{k}" for k in range(4) for p in patients], n_resamples=300, seed=0)
    assert np.mean(wide["high"] - wide["low"]) < 0.7 * np.mean(band["high"] - band["low"])


def test_evaluate_plots_band_n_integer_epochs_and_size(tmp_path, kept_figures):
    from test_evaluation import fake_run

    from nodulekit.evaluation import evaluate_runs

    fake_run(tmp_path / "run", per_fold=40, epochs=7, n_folds=3)
    out = evaluate_runs([tmp_path / "run"], tmp_path / "rep", n_resamples=200, fmt="png", dpi=90)
    roc, curves, _ = kept_figures
    (ax,) = roc.axes
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 1 and len(bands[0].get_paths()[0].vertices) > 100
    legend = ax.get_legend().get_texts()[0].get_text()
    assert "n = 120 (60 malignant), 60 patients" in legend and "AUC" in legend
    for axis in curves.axes[::2]:  # accuracy axes (each has its loss twin)
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert Image.open(tmp_path / "rep" / "roc.png").size == (round(5.5 * 90), round(5 * 90))
    assert sorted(p.rsplit(".", 1)[1] for p in out["files"] if "table2" not in p and "folds" not in p) == ["png"] * 3


def test_evaluate_pdf_and_unknown_format(tmp_path):
    from test_evaluation import fake_run

    from nodulekit.evaluation import evaluate_runs

    fake_run(tmp_path / "run", per_fold=10, epochs=3, n_folds=3)
    evaluate_runs([tmp_path / "run"], tmp_path / "rep", n_resamples=50, fmt="pdf")
    for name in ("roc.pdf", "curves.pdf", "reliability.pdf"):
        assert (tmp_path / "rep" / name).read_bytes()[:5] == b"%PDF-"
    with pytest.raises(NodulekitError, match=r"^unknown figure format 'jpg': use one of png, pdf, svg$"):
        evaluate_runs([tmp_path / "run"], tmp_path / "rep2", n_resamples=50, fmt="jpg")
    assert not (tmp_path / "rep2").exists()
