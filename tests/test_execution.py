"""Automatic execution choice (bf16 autocast, channels_last): probing, forced options, tolerance, bad options."""

from __future__ import annotations

import copy
import json
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_dataset
from torch import nn

from nodulekit import execution
from nodulekit.errors import NodulekitError

torch.set_num_threads(1)

ARCH, OPTIONS = "cam", {"base_width": 4}  # smallest registry model, as in test_training
FAKE_SECONDS = {"fp32": 1.0, "fp32+channels_last": 0.9, "bf16": 0.6, "bf16+channels_last": 0.5}


def fake_clock(seconds=FAKE_SECONDS, calls=None, scale=None):
    """A time_step that really runs each step but reports fixed seconds per variant."""

    def time_step(variant, run):
        out = run()
        if calls is not None:
            calls.append(variant)
        return seconds[variant], out * (scale or {}).get(variant, 1.0)

    return lambda device: time_step


@pytest.fixture(scope="module")
def ds3(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ds") / "d3c.h5", n=40, channels=3, folds=5)


@pytest.fixture
def probing(monkeypatch):
    """Probe even the tiny test workloads, with the fake clock; returns the list of timed variants."""
    calls = []
    monkeypatch.setattr(execution, "CHILD_PROBES", False)  # the fake clock times steps in this process
    monkeypatch.setattr(execution, "MIN_WORKLOAD_STEPS", 0)
    monkeypatch.setattr(execution, "_timed", fake_clock(calls=calls))
    return calls


def train(ds, rundir, **kw):
    from nodulekit.training import TrainConfig
    from nodulekit.training import train as train_

    base = dict(arch=ARCH, model_options=dict(OPTIONS), epochs=1, lr=0.01, device="cpu", seed=0)
    return train_(ds, rundir, TrainConfig(**(base | kw)), folds=[0], progress=False)


def fold_execution(rundir, fold=0):
    with h5py.File(rundir / f"fold{fold}" / "result.h5", "r") as f:
        return json.loads(f.attrs["execution"]), f["test_prob"][()]


def small_model():
    from nodulekit.models import create_model

    torch.manual_seed(0)
    return create_model("hesam", 3, base_width=8)


def batch(n=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, channels, 32, 32, generator=g), "y": torch.arange(n) % 2}


def test_auto_picks_fastest_agreeing_variant_records_it_and_trains_with_it(ds3, tmp_path, probing, monkeypatch):
    import nodulekit.training as training

    seen = []
    original = training.batch_loss

    def spy(forward, batch):
        convs = [p for p in forward.__self__.parameters() if p.dim() == 4]  # forward: model.training_forward
        seen.append(
            (torch.is_autocast_enabled("cpu"), all(p.is_contiguous(memory_format=torch.channels_last) for p in convs))
        )
        return original(forward, batch)

    monkeypatch.setattr(training, "batch_loss", spy)
    out = train(ds3, tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    rec = run["execution"]
    assert rec["variant"] == "bf16+channels_last" and rec["how"] == "probed"
    assert run["amp"] is True and run["channels_last"] is True and out["execution"] == rec
    assert rec["step_seconds"] == FAKE_SECONDS and set(rec["rel_diff"]) == set(FAKE_SECONDS)
    assert rec["machine"]["cores"] >= 1 and "avx512_bf16" in rec["machine"]
    # every variant was stepped warm-up + timed times, round-robin
    assert sorted(probing) == sorted(list(FAKE_SECONDS) * (execution.WARMUP_STEPS + execution.TIMED_STEPS))
    fold_rec, prob = fold_execution(tmp_path / "run")
    assert fold_rec == rec and np.isfinite(prob).all()
    ckpt = torch.load(tmp_path / "run" / "fold0" / "checkpoint.pt", weights_only=True)
    assert ckpt["amp"] is True and ckpt["channels_last"] is True and ckpt["execution"]["variant"] == rec["variant"]
    # 12 probe steps on copies, then fold 0's one training step (32 rows): bf16 autocast, channels_last weights
    assert len(seen) == 13 and seen[-1] == (True, True)


def test_a_variant_outside_the_tolerance_or_failing_is_not_chosen(monkeypatch):
    model, b = small_model(), batch()
    # the fastest variant's losses are off by 10 %: rejected; the next fastest (bf16) agrees
    clock = fake_clock(scale={"bf16+channels_last": 1.10})
    choice = execution.choose_execution(model, b, "cpu", time_step=clock("cpu"))
    assert choice.variant == "bf16" and choice.how == "probed"
    assert "bf16+channels_last" in choice.rejected and choice.rel_diff["bf16+channels_last"] == pytest.approx(
        0.10, abs=0.01
    )
    assert 0 < choice.rel_diff["bf16"] <= execution.TOLERANCE  # bf16 really ran in bf16, and agrees
    # a variant that is not faster by MIN_GAIN does not replace fp32
    slow = dict.fromkeys(FAKE_SECONDS, 1.0) | {"bf16": 0.97}
    assert execution.choose_execution(model, b, "cpu", time_step=fake_clock(slow)("cpu")).variant == "fp32"


def test_probe_leaves_model_and_random_state_untouched(ds3, tmp_path, monkeypatch):
    model, b = small_model(), batch()
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    execution.choose_execution(model, b, "cpu", time_step=fake_clock()("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics
    assert all(p.is_contiguous() for p in model.parameters())
    # seeded training after a probe that chose fp32 = training with fp32 forced (no probe)
    monkeypatch.setattr(execution, "MIN_WORKLOAD_STEPS", 0)
    monkeypatch.setattr(execution, "CHILD_PROBES", False)
    monkeypatch.setattr(execution, "_timed", fake_clock(dict.fromkeys(FAKE_SECONDS, 1.0)))
    train(ds3, tmp_path / "probed")
    train(ds3, tmp_path / "forced", amp=False, channels_last=False)
    (a, pa), (f, pf) = fold_execution(tmp_path / "probed"), fold_execution(tmp_path / "forced")
    assert a["how"] == "probed" and f["how"] == "forced" and a["variant"] == f["variant"] == "fp32"
    assert np.array_equal(pa, pf)


def test_forced_options_win_without_probing(ds3, tmp_path, probing):
    train(ds3, tmp_path / "r", amp=False, channels_last=True)
    rec, _ = fold_execution(tmp_path / "r")
    assert rec["variant"] == "fp32+channels_last" and rec["how"] == "forced" and rec["step_seconds"] == {}
    assert probing == []  # nothing timed
    # one option forced: only the other is probed (fp32 still runs as the reference)
    train(ds3, tmp_path / "half", amp=False)
    rec, _ = fold_execution(tmp_path / "half")
    assert rec["variant"] == "fp32+channels_last" and set(rec["step_seconds"]) == {"fp32", "fp32+channels_last"}


def test_rundir_reuses_its_choice_and_tiny_workloads_are_not_probed(ds3, tmp_path, probing, monkeypatch):
    train(ds3, tmp_path / "r")
    n = len(probing)
    train(ds3, tmp_path / "r", epochs=2)  # extend: same choice, no new probe
    rec, _ = fold_execution(tmp_path / "r")
    assert rec["how"] == "recorded" and rec["variant"] == "bf16+channels_last" and len(probing) == n
    monkeypatch.setattr(execution, "MIN_WORKLOAD_STEPS", 240)
    train(ds3, tmp_path / "tiny")  # 1 epoch x 1 step: default, no probe
    rec, _ = fold_execution(tmp_path / "tiny")
    assert rec["how"] == "default" and rec["variant"] == "fp32" and len(probing) == n


def test_a_job_that_created_the_rundir_first_sets_the_choice(ds3, tmp_path, probing, monkeypatch):
    """Parallel --fold jobs on a fresh RUNDIR: whoever writes run.json first decides for all."""
    import nodulekit.training as training

    original = training.prepare_rundir

    def race(rundir, record, overwrite=False, **kw):
        theirs = dict(record["execution"], amp=False, channels_last=True, variant="fp32+channels_last")
        original(rundir, dict(record, execution=theirs))  # the other job's run.json lands first
        return original(rundir, record, overwrite, **kw)

    monkeypatch.setattr(training, "prepare_rundir", race)
    train(ds3, tmp_path / "r")
    rec, _ = fold_execution(tmp_path / "r")
    assert rec["variant"] == "fp32+channels_last" and rec["how"] == "recorded"


def test_bf16_and_fp32_losses_of_the_first_steps_agree_within_tolerance():
    """Independent of the probe: three SGD steps of a small HESAM in fp32 and in bf16 autocast."""
    model, b = small_model(), batch(n=32)

    def losses(amp):
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=5e-4, momentum=0.9)
        out = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(m(b["x"]).float(), b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return np.array(out)

    fp32, bf16 = losses(False), losses(True)
    rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < rel <= execution.TOLERANCE
    choice = execution.choose_execution(model, b, "cpu", time_step=fake_clock()("cpu"))
    assert choice.rel_diff["bf16"] == pytest.approx(rel, rel=0.5)  # the probe measures the same thing


class PlainModel(nn.Module):
    """A bare module given the one training forward every nodulekit model has."""

    def training_forward(self, batch):
        return self(batch["x"]), torch.zeros(())


class NumpyInside(PlainModel):
    """A model with a numpy step: cannot run under bf16 autocast (numpy has no bfloat16)."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        h = torch.from_numpy(np.tanh(h.detach().numpy())) + h - h.detach()
        return self.fc(h.mean((2, 3)))


class ViewFlatten(PlainModel):
    """A model that flattens with .view: breaks on channels_last activations."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


def test_bad_options_one_clear_error_and_auto_avoids_them():
    b = batch(n=4)
    with pytest.raises(NodulekitError, match=r"^--amp: bf16 autocast cannot run this model on cpu \(TypeError"):
        execution.choose_execution(NumpyInside(), b, "cpu", amp=True, channels_last=False)
    with pytest.raises(NodulekitError, match=r"^--channels-last: the model does not run in channels_last"):
        execution.choose_execution(ViewFlatten(), b, "cpu", amp=False, channels_last=True)
    with pytest.raises(NodulekitError, match="--amp must be on, off or auto"):
        execution.choose_execution(ViewFlatten(), b, "cpu", amp="yes")
    # auto: the failing variants are rejected with their reason, the model still runs
    choice = execution.choose_execution(ViewFlatten(), b, "cpu", time_step=fake_clock()("cpu"))
    assert not choice.channels_last and "view" in choice.rejected["fp32+channels_last"]


@pytest.mark.parametrize(
    ("model", "flag", "start"),
    [(NumpyInside, "--amp", "--amp: bf16 autocast"), (ViewFlatten, "--channels-last", "--channels-last: the model")],
)
def test_cli_bad_option_is_one_line_and_writes_nothing(ds3, tmp_path, monkeypatch, capsys, model, flag, start):
    import nodulekit.models
    from nodulekit.cli import main

    monkeypatch.setattr(nodulekit.models, "create_model", lambda arch, c, num_classes=2, **kw: model(c))
    out = tmp_path / "r"
    monkeypatch.setattr(sys, "argv", ["nodulekit", "train", str(ds3), flag, "--fold", "0", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nodulekit: error: {start}")
    assert not out.exists()


def test_maps_apply_and_record_the_choice(ds3, tmp_path):
    from nodulekit.artifacts import get_provenance
    from nodulekit.datasets import load_dataset
    from nodulekit.maps import run_maps, write_run_maps

    train(ds3, tmp_path / "run", arch="hesam", epochs=2)
    ds = load_dataset(ds3)
    ids = list(ds.nodule_id[ds.fold == 0])

    def maps(**kw):
        return run_maps(tmp_path / "run", "hesam", nodules=ids, device="cpu", progress=False, **kw)

    fp32, bf16, auto = maps(amp=False, channels_last=False), maps(amp=True, channels_last=True), maps()
    assert (fp32.execution["variant"], bf16.execution["variant"]) == ("fp32", "bf16+channels_last")
    rel = np.linalg.norm(bf16.maps - fp32.maps) / np.linalg.norm(fp32.maps)
    assert 0 < rel <= execution.TOLERANCE  # bf16 was applied, and stays close
    assert auto.execution["how"] == "default" and np.array_equal(auto.maps, fp32.maps)  # 1 batch: not probed
    write_run_maps(bf16, tmp_path / "m.h5", rundir=tmp_path / "run")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert get_provenance(f)["execution"]["variant"] == "bf16+channels_last"


def test_cost_benchmark_refuses_a_busy_machine(tmp_path, monkeypatch, capsys):
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import execution_cost

    monkeypatch.setattr(execution_cost.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    out = tmp_path / "cost.json"
    tiny = ["--width", "4", "--n", "40", "--epochs", "1", "--steps", "1", "--json", str(out)]
    assert execution_cost.main([*tiny, "--max-load", "1.5"]) == 2
    assert "refused: 1-min load average 5.00 is above 1.5" in capsys.readouterr().err and not out.exists()
