"""benchmarks/gpu_training.py and predict_speed.py --model-only run unchanged on a CPU with tiny
settings (their smoke tests: the figures themselves need a GPU), refuse a busy machine, and say in
one line that CUDA is not there."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
NO_CUDA = not torch.cuda.is_available()


def load_bench(name: str = "gpu_training"):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tiny_run_measures_three_modes_and_the_paper_run_path(tmp_path, capsys, monkeypatch):
    """One tiny run of every mode (each mode starts processes that import torch: run once).

    The processes mode is checked inside the run, before its temporary folder goes: per fold,
    training rows / the median of that fold's epoch times after the first (from result.h5).
    """
    bench = load_bench()
    checked = []

    def processes_throughput(args, dataset, tmp, size):
        from nodulekit.run import Run

        r = real_processes_throughput(args, dataset, tmp, size)
        run, rows = Run(tmp / "run-processes"), bench._train_rows(dataset)
        for k in range(5):
            seconds = run.fold_result(k).epoch_seconds  # the first epoch (warm-up) is left out
            assert len(seconds) == 2
            assert r["samples_per_s_per_fold"][k] == pytest.approx(rows[k] / seconds[1])
        assert r["samples_per_s_all_folds"] == pytest.approx(sum(r["samples_per_s_per_fold"].values()))
        checked.append(r)
        return r

    real_processes_throughput = bench.processes_throughput
    monkeypatch.setattr(bench, "processes_throughput", processes_throughput)
    out = tmp_path / "bench.json"
    args = ["--tiny", "--allow-busy", "--nodules", "40", "--epochs", "2", "--threads", "1", "-o", str(out)]
    assert bench.main(args) == 0
    assert len(checked) == 1
    record = json.loads(out.read_text())
    seq, sbs, procs = record["throughput"]
    assert (seq["mode"], sbs["mode"], procs["mode"]) == ("sequential", "side_by_side", "processes")
    assert procs["samples_per_s_per_fold"] == {str(k): v for k, v in checked[0]["samples_per_s_per_fold"].items()}
    for r in (seq, sbs, procs):
        assert sorted(r["samples_per_s_per_fold"]) == ["0", "1", "2", "3", "4"] and r["samples_per_s_all_folds"] > 0
    # side by side and processes: the 5 folds together are the sum of the per-fold figures; sequential: one fold's
    for r in (sbs, procs):
        assert abs(r["samples_per_s_all_folds"] - sum(r["samples_per_s_per_fold"].values())) < 1e-6
    # the paper run uses the mode that was fastest
    best = max(record["throughput"], key=lambda r: r["samples_per_s_all_folds"])["mode"]
    assert record["fastest"] == best and record["paper_run"]["mode"] == best
    assert record["paper_run"]["epochs"] == 2 and record["paper_run"]["wall_s"] > 0
    assert record["cuda_device"] is None and record["git"]["commit"] and record["torch"] == str(torch.__version__)
    text = capsys.readouterr().out
    assert "side by side / sequential" in text and "processes / sequential" in text


def test_busy_machine_is_refused(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert bench.main(["--tiny"]) == 2
    assert "gpu_training: refused: 1-min load average 99.00" in capsys.readouterr().err


@pytest.mark.skipif(not NO_CUDA, reason="checks the message of a machine without CUDA")
def test_cuda_requests_without_cuda_are_one_line(capsys):
    assert load_bench().main(["--tiny", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gpu_training: --cuda-graphs needs CUDA, and torch sees no GPU on this machine; nothing measured"]
    assert load_bench("predict_speed").main(["--model-only", "--provider", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict_speed: CUDA is not available on this machine")


def test_model_only_speed_on_cpu(tmp_path, capsys):
    """Eager and ONNX Runtime at each batch size, patches/s = patches / median seconds."""
    bench = load_bench("predict_speed")
    out = tmp_path / "m.json"
    args = ["--model-only", "--width", "4", "--batches", "1,8", "--patches", "16", "--repeats", "1"]
    assert bench.main([*args, "--allow-busy", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    got = [(r["engine"], r["batch"], r["patches"]) for r in record["results"]]
    assert got == [("pytorch eager", 1, 16), ("onnxruntime cpu", 1, 16), ("pytorch eager", 8, 16),
                   ("onnxruntime cpu", 8, 16)]  # fmt: skip
    for r in record["results"]:
        assert r["patches_per_s"] == pytest.approx(r["patches"] / r["seconds"])
    assert "| onnxruntime cpu | 8 | 16 |" in capsys.readouterr().out
