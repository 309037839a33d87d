"""Warnings before a plausible wrong answer (`predict`): each must fire where it should and only there."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from nodulekit import plausibility as pl  # noqa: E402
from nodulekit import predict as pr  # noqa: E402
from nodulekit.errors import NodulekitError  # noqa: E402
from nodulekit.scans import read_scan  # noqa: E402
from tests.model_fixtures import export, trained_run  # noqa: E402

torch.set_num_threads(1)
SHAPE = (40, 40, 12)  # stored (x, y, z) = LPS axes
SPACING = (1.0, 1.0, 2.5)
ORIGIN = (-19.5, -19.5, -15.0)  # LPS of voxel 0: the scan is centred on x = y = 0
NODULE = (8.0, 6.0, 0.0)  # LPS mm of a solid 5 mm-radius sphere
AIR = (-8.0, -6.0, 0.0)  # the nodule's point with x and y negated: an air pocket (the RAS/LPS mistake)


def _grid():
    return np.stack(
        np.meshgrid(*(o + s * np.arange(n) for o, s, n in zip(ORIGIN, SPACING, SHAPE, strict=True)), indexing="ij"), -1
    )


def _within(point, radius):
    return np.linalg.norm(_grid() - np.asarray(point), axis=-1) <= radius


def _write(path, data):
    lps = np.diag([*SPACING, 1.0])
    lps[:3, 3] = ORIGIN
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), str(path))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plausibility")
    hu = np.random.default_rng(0).integers(-860, -780, SHAPE).astype(np.int16)  # lung
    hu[_within(NODULE, 5.0)] = 40
    hu[_within(AIR, 6.0)] = -1000
    labels = _within(NODULE, 5.0).astype(np.uint8)
    labels[2, 3, 1] = 1  # a one-voxel fragment far from the nodule: 1.7 mm
    _, rundir = trained_run(folder)
    return {
        "model": export(rundir, folder / "m.onnx"),
        "ct": _write(folder / "ct.nii.gz", hu),
        "mask": _write(folder / "mask.nii.gz", labels),
        "folder": folder,
    }


def _centre(point) -> str:
    return ",".join(f"{v:g}" for v in point)


def _predict(env, **kw):
    return pr.predict(env["model"], env["ct"], provider="cpu", **kw)


def _codes(rec) -> list[str]:
    """The warnings that do not depend on the toy model's training ranges (tested on their own below)."""
    return [w["code"] for w in rec["warnings"] if not w["code"].endswith("_outside_training")]


def test_a_plausible_nodule_gets_no_warning(env):
    from nodulekit.engines import load_card

    lo, hi = pl.training_ranges(load_card(env["model"]))["diameter_mm"]
    d = max((lo + hi) / 2, 3.0)  # inside the toy model's training diameters
    res = _predict(env, centre=_centre(NODULE), diameter=d)
    assert res.records[0]["warnings"] == [] and res.warnings == []
    strict = _predict(env, centre=_centre(NODULE), diameter=d, strict=True)
    assert strict.records[0]["probability"] == res.records[0]["probability"]


def test_centre_in_air_names_the_frame_mistake(env):
    """RAS coordinates given as LPS: the point lands in air; the hint finds the nodule at the negated point."""
    ras_of_nodule = np.array(NODULE) * [-1, -1, 1]
    res = _predict(env, centre=_centre(ras_of_nodule), diameter=10.0)
    (w,) = [w for w in res.records[0]["warnings"] if w["code"] == "centre_in_air"]
    assert "-1000 HU" in w["message"] and "40 HU" in w["message"]
    assert f"nodule 1: {w['message']}" in res.warnings
    assert _codes(_predict(env, centre=_centre(ras_of_nodule), diameter=10.0, coords="ras").records[0]) == []


@pytest.mark.parametrize(
    "diameter, codes", [(1.31, ["diameter_looks_like_cm"]), (99.0, ["diameter_implausible"]), (3.0, []), (60.0, [])]
)
def test_diameter_in_cm_or_implausible(env, diameter, codes):
    assert _codes(_predict(env, centre=_centre(NODULE), diameter=diameter).records[0]) == codes


def test_strict_refuses_and_writes_nothing(env, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NodulekitError, match=r"^--strict: nodule 1: diameter 1.31 mm .* give 13.1"):
        _predict(env, centre=_centre(NODULE), diameter=1.31, strict=True, output=out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_mask_fragments_are_skipped_with_a_warning(env):
    res = _predict(env, mask=env["mask"])
    assert [r["id"] for r in res.records] == ["2"]  # component 1 (the fragment, lower z) skipped
    assert res.records[0]["centre_mm"] == pytest.approx(NODULE, abs=0.05)
    assert res.warnings[0].startswith("mask component 1: skipped, a 1.68 mm fragment")
    kept = _predict(env, mask=env["mask"], min_diameter=0)
    assert [r["id"] for r in kept.records] == ["1", "2"]
    assert _codes(kept.records[0]) == ["diameter_looks_like_cm", "centre_in_lung"]  # scored, so warned
    assert kept.records[1]["probability"] == res.records[0]["probability"]
    with pytest.raises(NodulekitError, match=r"every mask component is smaller than --min-diameter 20 mm"):
        _predict(env, mask=env["mask"], min_diameter=20)
    with pytest.raises(NodulekitError, match=r"^--strict: mask component 1: skipped"):
        _predict(env, mask=env["mask"], strict=True)


def test_training_ranges_from_the_model_description(env):
    """With recorded ranges: diameter, spacing and centre HU are checked against them (and only then)."""
    scan = read_scan(env["ct"])
    spec = pr.centre_spec(scan, _centre(NODULE), 10.0, "lps")
    lung = pr.centre_spec(scan, "0,-15,0", 10.0, "lps")

    def card(**ranges):  # as modelcard.ranges_record writes them
        return {"training_data": {"ranges": {k: {"min": lo, "max": hi, "n": 9} for k, (lo, hi) in ranges.items()}}}

    def codes(card, s=spec):
        return [w["code"] for w in pl.check_request(scan, [s], card, 3.0, False)[1][0]]

    assert pl.training_ranges({"training_data": {}}) is None and pl.check_request(scan, [spec], {}, 3.0, False)[3]
    assert pl.training_ranges(card(diameter_mm=(3.2, 38.0))) == {"diameter_mm": (3.2, 38.0)}
    assert codes(card(diameter_mm=[3.2, 38.0], pixel_spacing_mm=[0.5, 1.0], slice_spacing_mm=[1.0, 2.5])) == []
    assert codes(card(diameter_mm=[12.0, 38.0])) == ["diameter_outside_training"]
    assert codes(card(slice_spacing_mm=(0.6, 2.0))) == ["spacing_outside_training"]
    assert codes(card(pixel_spacing_mm=[1.5, 2.0])) == ["spacing_outside_training"]
    assert codes(card(centre_hu=[-700, 200])) == []  # the solid nodule: 40 HU
    assert codes(card(centre_hu=[100, 200])) == ["centre_hu_outside_training"]
    assert codes(card(centre_hu=[-900, 200]), lung) == ["centre_in_lung"]  # lung, about -820: below any nodule
    assert codes({}, lung) == ["centre_in_lung"]  # needs no recorded range
    _, _, lines, note = pl.check_request(scan, [spec, lung], card(slice_spacing_mm=[0.6, 2.0]), 3.0, False)
    assert lines[0] == "scan: slice spacing 2.5 mm lies outside the training data's 0.6..2 mm" and note is None
    assert [line.split(":")[0] for line in lines] == ["scan", "nodule 1"]  # the scan's once; the lung centre's


def test_the_models_recorded_diameter_range_is_used(env):
    from nodulekit.engines import load_card

    lo, hi = pl.training_ranges(load_card(env["model"]))["diameter_mm"]
    inside, outside = (lo + hi) / 2, hi * 1.5
    for d, fires in ((inside, False), (outside, True)):
        rec = _predict(env, centre=_centre(NODULE), diameter=d).records[0]
        warned = [w["message"] for w in rec["warnings"] if w["code"] == "diameter_outside_training"]
        assert bool(warned) == fires and (not fires or f"{lo:g}..{hi:g} mm" in warned[0])


def test_cli_warning_on_stderr_and_in_the_json_line(env, monkeypatch, capsys):
    from nodulekit.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["nodulekit", "predict", str(env["model"]), str(env["ct"]), *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = run("--centre", _centre(NODULE), "--diameter", "1.31", "--provider", "cpu", "--no-progress")
    assert code == 0 and json.loads(out)["warnings"][0]["code"] == "diameter_looks_like_cm"
    assert "nodulekit: warning: nodule 1: diameter 1.31 mm" in err
    code, out, err = run("--centre", _centre(NODULE), "--diameter", "1.31", "--strict", "--provider", "cpu")
    errors = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    assert code == 2 and out == "" and len(errors) == 1 and errors[0].startswith("nodulekit: error: --strict: nodule 1")
    code, out, err = run("--centre", _centre(NODULE), "--diameter", "10", "-o", env["folder"] / "o", "--format", "bmp")
    assert (code, out, err) == (2, "", "nodulekit: error: unknown figure format 'bmp': use one of png, pdf, svg\n")
    assert not (env["folder"] / "o").exists()
    code, out, err = run("--centre", _centre(NODULE), "--diameter", "10", "--min-diameter", "2", "--provider", "cpu")
    assert (
        code == 2
        and out == ""
        and err
        == (
            "nodulekit: error: --min-diameter applies to --mask components; with --centre or --nodules it checks nothing\n"
        )
    )
