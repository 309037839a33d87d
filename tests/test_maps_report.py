"""benchmarks/maps_report.py on two tiny trained runs: every map of a run comes from that run's model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nodulekit.errors import NodulekitError

torch.set_num_threads(1)


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "maps_report.py"
    spec = importlib.util.spec_from_file_location("maps_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """hesam and cam, 2 folds x 1 epoch at base width 4, on the tiny 3-channel dataset."""
    from conftest import write_tiny_dataset

    from nodulekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("report")
    ds = write_tiny_dataset(root / "d3c.h5", channels=3, folds=2)
    for arch in ("hesam", "cam"):
        cfg = TrainConfig(arch=arch, model_options={"base_width": 4}, epochs=1, batch_size=8, device="cpu")
        train(ds, root / arch, cfg, progress=False)
    return ds, root / "hesam", root / "cam"


def test_maps_report_maps_each_run_with_its_own_model(two_runs, tmp_path):
    from nodulekit.artifacts import read_maps
    from nodulekit.maps import compute_maps
    from nodulekit.run import Run
    from nodulekit.stats import cluster_sign_flip_test, holm

    bench = _benchmark_module()
    ds, hesam, cam = two_runs
    out = tmp_path / "report"
    args = ["--run", f"hesam={hesam}", "--run", f"cam={cam}", "--device", "cpu", "--n-figure", "2"]
    args += ["--bootstrap", "200", "--permutations", "499", "-o", str(out)]
    assert bench.main(args) == 0
    made = sorted(p.name for p in out.glob("maps_*.h5"))
    expected = {"maps_hesam_hesam.h5", "maps_hesam_hesam-faithful.h5", "maps_hesam_gradcam.h5"}
    assert set(made) == expected | {"maps_cam_cam.h5", "maps_cam_gradcam.h5"}  # no faithful map of a CAM head
    # Grad-CAM of each run is computed on that run's own fold models (not borrowed from the CAM run)
    x = __import__("h5py").File(ds)["x"][()]
    for rundir, name in ((hesam, "maps_hesam_gradcam.h5"), (cam, "maps_cam_gradcam.h5")):
        m = read_maps(out / name)
        model, _ = Run(rundir).load_model(1)
        rows = np.flatnonzero(m.fold == 1)[:4]
        ref = compute_maps(model, x[rows], "gradcam", device="cpu")
        np.testing.assert_allclose(m.maps[rows], ref["maps"], rtol=1e-4, atol=1e-6)
        assert m.arch == Run(rundir).arch
    # the faithful HESAM map of the trained run sums (+ the head's constants) to the stored logits
    faithful = read_maps(out / "maps_hesam_hesam-faithful.h5")
    model, _ = Run(hesam).load_model(0)
    rows = np.flatnonzero(faithful.fold == 0)
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x[rows]))
        _, offset = model.head.faithful_map(feats["features"], feats["high_level"])
    np.testing.assert_allclose(
        faithful.maps[rows].sum(axis=(2, 3)) + offset.numpy(), faithful.extra["logits"][rows], atol=1e-4
    )
    text = (out / "maps_report.md").read_text()
    assert "| hesam:hesam | malignant | 20 |" in text and "LIDC-IDRI" in text and (out / "map_grid.png").exists()
    assert "outside enrichment" in text and "200 resamples of patients" in text and "spiculation rating" in text
    assert bench.main(args) == 2  # the report exists: refused without --overwrite
    scores = pd.read_csv(out / "scores.csv")
    tests = pd.read_csv(out / "tests.csv")
    family = tests[(tests["class"] == "malignant") & (tests["region"] == "margin_band")]
    assert set(family["other"]) == set(scores["map"]) - {"hesam:hesam"}
    np.testing.assert_allclose(family["p_holm"], holm(family["p_patients"]))
    row = family[family["other"] == "cam:gradcam"].iloc[0]
    part = scores[scores["class"] == "malignant"].pivot_table(
        index=["nodule_id", "patient_id"], columns="map", values="share_margin_band"
    )
    part = part[["hesam:hesam", "cam:gradcam"]].dropna()
    diff = (part["hesam:hesam"] - part["cam:gradcam"]).to_numpy()
    flip = cluster_sign_flip_test(diff, part.index.get_level_values("patient_id"), n_resamples=499)
    assert row["p_patients"] == pytest.approx(flip["p_value"])
    assert row["mean_diff"] == pytest.approx(diff.mean(), abs=1e-5)  # scores.csv keeps 6 digits
    assert row["n"] == len(part) and row["diff_low"] <= row["mean_diff"] <= row["diff_high"]


def test_maps_report_arguments():
    bench = _benchmark_module()
    with pytest.raises(NodulekitError, match="given twice"):
        bench.parse_runs(["cam=a", "cam=b"])
    with pytest.raises(NodulekitError, match="LABEL=RUNDIR"):
        bench.parse_runs(["cam"])
