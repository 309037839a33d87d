"""benchmarks/gpu_training.py runs unchanged on a CPU with --tiny (its smoke test) and refuses a busy machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def load_bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_training_bench", REPO / "benchmarks" / "gpu_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tiny_run_measures_both_modes_and_the_paper_run_path(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--allow-busy", "--nodules", "40", "--epochs", "2", "-o", str(out)]) == 0
    record = json.loads(out.read_text())
    seq, sbs = record["throughput"]
    assert (seq["mode"], sbs["mode"]) == ("sequential", "side_by_side")
    for r in (seq, sbs):
        assert sorted(r["samples_per_s_per_fold"]) == ["0", "1", "2", "3", "4"] and r["samples_per_s_all_folds"] > 0
    # side by side: the 5 folds together are the sum of the per-fold figures; sequential: one fold's
    assert abs(sbs["samples_per_s_all_folds"] - sum(sbs["samples_per_s_per_fold"].values())) < 1e-6
    assert record["paper_run"]["epochs"] == 2 and record["paper_run"]["wall_s"] > 0
    assert record["cuda_device"] is None and record["git"]["commit"]
    assert "side by side / sequential" in capsys.readouterr().out


def test_busy_machine_is_refused(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert bench.main(["--tiny"]) == 2
    assert "gpu_training: refused: 1-min load average 99.00" in capsys.readouterr().err
