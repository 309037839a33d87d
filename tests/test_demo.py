"""`python -m nodulekit.demo`: stage bookkeeping (the full run is `make demo`, minutes)."""

from __future__ import annotations

import pytest

from nodulekit import demo


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """demo.main sets torch to every core for `make demo`; in a test process that setting would
    leak into later tests (the fp32 parity of concurrent folds is tuned for one thread)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _stages(record):
    def ok(d):
        record.append("a")
        return "done a"

    def missing(d):
        import nodulekit.no_such_stage  # noqa: F401 - a stage this version lacks

    def broken(d):
        raise RuntimeError("disk on fire\nsecond line")

    def after(d):
        record.append("d")
        return "done d"

    return [
        ("a", ok, ()),
        ("b", missing, ("a",)),
        ("c", broken, ("a",)),
        ("d", after, ("a",)),
        ("e", after, ("b",)),
        ("f", after, ("c",)),
    ]


def test_missing_or_failing_stages_never_crash_the_demo(tmp_path, monkeypatch, capsys):
    import logging

    record: list[str] = []
    monkeypatch.setattr(demo, "STAGES", _stages(record))
    monkeypatch.delenv("NODULEKIT_DEMO_STRICT", raising=False)
    # the demo logs under the package's logger: a program that embeds nodulekit sees its records there
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.name)
    logging.getLogger("nodulekit").addHandler(handler)
    try:
        assert demo.main(["--out", str(tmp_path / "out"), "--schedule", "cpu"]) == 0
    finally:
        logging.getLogger("nodulekit").removeHandler(handler)
    assert seen and set(seen) == {"nodulekit.demo"}
    out = capsys.readouterr().out
    assert "[b] stage b not available in this version" in out
    assert "[c] failed: RuntimeError: disk on fire (traceback in" in out and "second line" not in out
    assert "[e] skipped: needs b" in out and "[f] skipped: needs c" in out
    assert record == ["a", "d"]  # independent stages still ran
    assert "disk on fire" in (tmp_path / "out" / "demo.log").read_text()  # the traceback is kept
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert summary.startswith("\nnodulekit demo summary\n" + "=" * 22 + "\nschedule: ")
    assert "short CPU schedule" in summary and "hesam_fold0.onnx" in summary


def test_strict_mode_reports_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "STAGES", _stages([]))
    monkeypatch.setenv("NODULEKIT_DEMO_STRICT", "1")
    assert demo.main(["--out", str(tmp_path / "out"), "--schedule", "cpu"]) == 1


def test_schedules_and_reuse_checks(tmp_path, tiny_dataset):
    assert demo.pick_schedule("cpu").device == "cpu" and demo.pick_schedule("paper").epochs == 90
    assert demo.pick_schedule("paper").base_width == 64 and demo.pick_schedule("paper").n_folds == 5
    # A stage output counts as finished only when it is a valid artifact of the right kind.
    assert demo._valid_artifact(tiny_dataset, "dataset")
    assert not demo._valid_artifact(tiny_dataset, "rois")
    half = tmp_path / "half.h5"
    half.write_bytes(b"\x89HDF\r\n")
    assert not demo._valid_artifact(half, "dataset")
    assert not demo._valid_artifact(tmp_path / "absent.h5", "dataset")


@pytest.mark.parametrize("name", [s[0] for s in demo.STAGES])
def test_every_stage_exists_in_this_version(name):
    """By the end of issue 6 every stage's library function exists."""
    import importlib

    needs = {
        "phantom": ("nodulekit.phantom", "make_phantom_vois"),
        "extract": ("nodulekit.extract", "extract_rois"),
        "build": ("nodulekit.datasets", "build_dataset"),
        "train": ("nodulekit.training", "train"),
        "evaluate": ("nodulekit.evaluation", "evaluate_runs"),
        "maps": ("nodulekit.maps", "run_maps"),
        "scores": ("nodulekit.scores", "score_maps"),
        "figures": ("nodulekit.figures", "map_grid"),
        "export-onnx": ("nodulekit.export", "export_onnx"),
        "infer": ("nodulekit.export", "infer"),
    }
    module, function = needs[name]
    assert callable(getattr(importlib.import_module(module), function))


def test_a_redone_stage_makes_its_dependents_redo(tmp_path, monkeypatch):
    seen = []
    upstream = {"message": "made a"}

    def a(d):
        return upstream["message"]

    def b(d):
        seen.append(d.reusable(True))  # b's output exists and is valid: may it be reused?
        return "reused" if d.reusable(True) else "made b"

    monkeypatch.setattr(demo, "STAGES", [("a", a, ()), ("b", b, ("a",))])
    out = ["--out", str(tmp_path / "out"), "--schedule", "cpu"]
    demo.main(out)
    upstream["message"] = "reused"
    demo.main(out)
    assert seen == [False, True]
