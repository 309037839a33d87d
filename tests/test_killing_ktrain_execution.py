"""Known answers for the execution choice (``nodulekit.execution``): the names, reasons and records a
run keeps of how it ran, the boundaries of the tolerance, the gain and the workload, and the paths of
``choose_execution`` (reused, forced, not probed, probed), on a tiny model and hand-made probe results."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nodulekit import execution
from nodulekit.errors import NodulekitError
from nodulekit.execution import ExecutionChoice

CPU = torch.device("cpu")
torch.set_num_threads(1)  # tiny tensors: threads only add contention (as in test_execution)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, 3, 8, 8, generator=g), "y": torch.arange(n) % 2}


@pytest.fixture
def in_process(monkeypatch):
    """Probes in this process (children would not see a fake clock)."""
    monkeypatch.setattr(execution, "CHILD_PROBES", False)


def clock(seconds):
    def time_step(variant, run):
        return seconds[variant], run()

    return time_step


# --------------------------------------------------------------------------- names, options, records


def test_variant_names_and_preference_order():
    assert [execution.variant_name(a, c) for a, c in execution.VARIANTS] == [
        "fp32",
        "fp32+channels_last",
        "bf16",
        "bf16+channels_last",
    ]
    assert (execution.TOLERANCE, execution.WARMUP_STEPS, execution.TIMED_STEPS) == (0.02, 1, 2)
    assert (execution.MIN_WORKLOAD_STEPS, execution.MIN_GAIN, execution.PROBE_SEED) == (240, 0.05, 12345)


@pytest.mark.parametrize("value", ["on", 1, "yes"])
def test_an_option_that_is_not_on_off_or_auto(value):
    with pytest.raises(NodulekitError, match=f"^--amp must be on, off or auto \\(got {re.escape(repr(value))}\\)$"):
        execution.default_execution("cpu", amp=value)


def test_default_execution_on_the_cpu_and_on_a_gpu(monkeypatch):
    choice = execution.default_execution(CPU)
    assert (choice.device, choice.amp, choice.channels_last, choice.how) == ("cpu", False, False, "default")
    assert choice.reason == "default (not probed)" and choice.machine == execution.machine_info(CPU)
    assert choice.machine["gpu"] is None and choice.tolerance == 0.02
    forced = execution.default_execution(CPU, True, None, "why")
    assert (forced.amp, forced.channels_last, forced.reason) == (True, False, "why")
    assert execution.default_execution(CPU, "auto", True).channels_last is True
    monkeypatch.setattr(execution, "machine_info", lambda device: {})
    monkeypatch.setattr(execution, "_cuda_bf16", lambda device: True)
    assert execution.default_execution("cuda:0").amp is True  # bf16 autocast by default on a bf16 GPU
    assert execution.default_execution("cuda:0", False).amp is False
    monkeypatch.setattr(execution, "_cuda_bf16", lambda device: False)
    assert execution.default_execution("cuda:1").amp is False


def test_a_choice_as_recorded_and_read_back():
    choice = ExecutionChoice("cpu", True, True, "probed", "r", {"fp32": 1.0}, {"fp32": 0.0}, {"bf16": "no"})
    record = choice.as_dict()
    assert record == {
        "device": "cpu",
        "amp": True,
        "channels_last": True,
        "how": "probed",
        "reason": "r",
        "step_seconds": {"fp32": 1.0},
        "rel_diff": {"fp32": 0.0},
        "rejected": {"bf16": "no"},
        "tolerance": 0.02,
        "probe": {},
        "machine": {},
        "variant": "bf16+channels_last",
    }
    assert ExecutionChoice.from_dict(record | {"unknown": 1}) == choice


def test_a_choice_applies_its_memory_format_and_autocast():
    on, off = ExecutionChoice("cpu", True, True, "forced", ""), ExecutionChoice("cpu", False, False, "forced", "")
    x = torch.rand(2, 3, 4, 5)
    assert on.input(x).is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last
    )
    one = x[0]
    assert off.input(x) is x and on.input(one) is one  # only [B, C, H, W] batches change format
    conv = on.apply(nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert off.apply(nn.Conv2d(3, 4, 3)).weight.is_contiguous()
    with on.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with off.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_crash_record_keys_name_machine_and_workload(monkeypatch):
    model = nn.Linear(2, 3)  # 9 parameters
    assert execution.workload_key(model, {"x": torch.zeros(4, 2)}) == "Linear 9 parameters, training on [4, 2]"
    assert (
        execution.workload_key(model, {"x": torch.zeros(1, 2)}, train=False)
        == "Linear 9 parameters, inference on [1, 2]"
    )
    info = {"cpu": "Some CPU", "torch_cpu_capability": "AVX2", "gpu": None}
    monkeypatch.setattr(execution, "machine_info", lambda device: info)
    assert execution.machine_key("cpu") == f"Some CPU | torch {torch.__version__} AVX2 | cpu"
    info["gpu"] = "Big GPU"
    assert execution.machine_key("cpu") == f"Some CPU | torch {torch.__version__} AVX2 | Big GPU"


def test_cpu_features_record():
    features = execution.cpu_features()
    assert set(features) == {"cpu", "cores", "avx512_bf16", "amx_bf16", "torch_cpu_capability"}
    assert isinstance(features["cpu"], str) and features["cpu"]
    assert features["cores"] == len(os.sched_getaffinity(0))
    assert isinstance(features["avx512_bf16"], bool) and isinstance(features["amx_bf16"], bool)
    assert features["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert execution.machine_info(CPU) == dict(features, gpu=None)


def test_first_line_of_an_error_and_relative_difference():
    assert execution._first_line(ValueError("\n  first  \nsecond")) == "ValueError: first"
    assert execution._first_line(RuntimeError("")) == "RuntimeError: "
    assert execution._first_line(TypeError("x" * 400)) == ("TypeError: " + "x" * 400)[:300]
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])
    assert execution.relative_difference(a, b) == pytest.approx(((9 + 1) ** 0.5) / 5)
    assert execution.relative_difference(b, b) == 0.0
    assert execution.relative_difference(None, b) == float("inf")
    assert execution.relative_difference(torch.tensor([1.0, float("nan")]), b) == float("inf")
    assert execution.relative_difference(torch.tensor([1e-13]), torch.tensor([0.0])) == pytest.approx(0.1)


def test_as_batch_adds_alternating_labels_to_a_bare_tensor():
    x = torch.zeros(5, 3, 4, 4)
    b = execution._as_batch(x, CPU)
    assert b["x"] is x and b["y"].tolist() == [0, 1, 0, 1, 0]
    kept = execution._as_batch({"x": x, "y": torch.ones(5, dtype=torch.int64), "note": "n"}, "cpu")
    assert kept["y"].tolist() == [1] * 5 and kept["note"] == "n"


def test_the_probes_training_step_is_one_sgd_step_with_its_lr_and_momentum():
    model, b = tiny_model(), batch()
    reference = tiny_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.5)
    expected = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(reference(b["x"]), b["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
    run = execution.train_step(lr=0.3, momentum=0.5)(model)
    got = [run(b, execution.nullcontext()) for _ in range(2)]
    assert model.training and got[0].shape == (1,)
    assert [float(v) for v in got] == pytest.approx(expected, rel=1e-5)
    start = list(tiny_model().parameters())
    for p, q, p0 in zip(model.parameters(), reference.parameters(), start, strict=True):
        torch.testing.assert_close(p - p0, q - p0, rtol=1e-2, atol=1e-6)  # the updates, up to float noise
    # the defaults are the paper's learning rate and momentum 0.9
    m2, r2 = tiny_model(), tiny_model()
    run = execution.train_step()(m2)
    run(b, execution.nullcontext())
    run(b, execution.nullcontext())
    opt = torch.optim.SGD(r2.parameters(), lr=5e-4, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(r2(b["x"]), b["y"]).backward()
        opt.step()
    for p, q, p0 in zip(m2.parameters(), r2.parameters(), start, strict=True):
        torch.testing.assert_close(p - p0, q - p0, rtol=1e-2, atol=1e-9)


def test_the_probes_inference_step_is_eval_mode_without_gradients():
    model, b = tiny_model(), batch()
    model.train()
    out = execution.infer_step()(model)(b, execution.nullcontext())
    assert not model.training and not out.requires_grad and out.dtype == torch.float32
    torch.testing.assert_close(out, model(b["x"]).detach())
    doubled = execution.infer_step(lambda m, x: 2 * m(x))(model)(b, execution.nullcontext())
    torch.testing.assert_close(doubled, 2 * out)


# --------------------------------------------------------------------------- select_variant


def result(seconds, outputs):
    return {"seconds": list(seconds), "outputs": torch.tensor(outputs, dtype=torch.float32)}


REF = [3.0, 4.0]  # norm 5


def test_select_variant_times_after_warm_up_and_prefers_the_default_unless_5_percent_faster():
    results = {
        "fp32": result([0.01, 1.0, 1.2], REF),  # the warm-up step is never counted
        "fp32+channels_last": result([0.01, 0.96, 0.97], REF),
        "bf16": result([0.01, 0.951, 2.0], [3.0, 4.1]),  # rel. diff 0.02: exactly the tolerance, eligible
        "bf16+channels_last": result([0.01, 0.9, 0.9], [3.0, 4.2]),  # rel. diff 0.04: rejected
    }
    choice = execution.select_variant(results, "cpu")
    assert choice.step_seconds == {"fp32": 1.0, "fp32+channels_last": 0.96, "bf16": 0.951, "bf16+channels_last": 0.9}
    assert choice.rel_diff["bf16"] == pytest.approx(0.02) and choice.rel_diff["fp32"] == 0.0
    assert choice.rejected == {"bf16+channels_last": "outputs differ from fp32 by 0.04 (tolerance 0.02)"}
    assert choice.variant == "fp32" and choice.how == "probed"  # 0.951 is not 5 % faster than 1.0
    assert choice.reason == (
        "fastest of fp32, fp32+channels_last, bf16 whose outputs agree with fp32 within 0.02 (relative); "
        "another variant must be 5% faster than fp32"
    )
    assert choice.machine == execution.machine_info(CPU) and choice.device == "cpu"
    results["bf16"] = result([0.01, 0.95, 2.0], [3.0, 4.1])  # exactly 5 % faster: it wins
    assert execution.select_variant(results, "cpu").variant == "bf16"


def test_select_variant_forced_options_errors_and_no_reference():
    ok = result([1, 1, 1], REF)
    off = result([1, 0.5, 0.5], [3.0, 5.0])
    results = {"fp32": ok, "fp32+channels_last": ok, "bf16": off, "bf16+channels_last": {"error": "E: boom"}}
    # forced bf16: the tolerance gives way (it is what the user asked for), an error does not
    forced = execution.select_variant(results, "cpu", amp=True)
    assert forced.variant == "bf16" and forced.rejected["bf16+channels_last"] == "E: boom"
    assert execution.select_variant(results, "cpu", channels_last=False).variant == "fp32"
    with pytest.raises(
        NodulekitError,
        match=r"^--channels-last: no variant with this option runs here \(bf16: outputs differ .*; "
        r"bf16\+channels_last: E: boom\)$",
    ):
        no_cl = {"fp32": ok, "bf16": off, "bf16+channels_last": {"error": "E: boom"}}
        execution.select_variant(no_cl, "cpu", amp=False, channels_last=True)
    with pytest.raises(NodulekitError, match=r"^--amp: no variant with this option runs here \(bf16: E: b\)$"):
        execution.select_variant({"fp32": ok, "bf16": {"error": "E: b"}}, "cpu", amp=True)
    with pytest.raises(NodulekitError, match=r"^the model cannot run a plain fp32 step on cpu \(E: f\)$"):
        execution.select_variant({"fp32": {"error": "E: f", "outputs": None}}, "cpu")
    nan = result([1, 1, 1], [float("nan"), 1.0])
    with pytest.raises(NodulekitError, match=r"^the model cannot run a plain fp32 step on cpu \(non-finite output\)$"):
        execution.select_variant({"fp32": nan}, "cpu")


# --------------------------------------------------------------------------- choose_execution's paths


def test_a_recorded_choice_is_reused_for_the_same_device_type(in_process):
    model, b = tiny_model(), batch()
    recorded = ExecutionChoice("cpu", True, False, "probed", "fastest", {"bf16": 0.5}).as_dict()
    choice = execution.choose_execution(model, b, "cpu", recorded=recorded)
    assert (choice.variant, choice.how, choice.device) == ("bf16", "recorded", "cpu")
    assert choice.reason == "reused: chosen earlier for this run (probed: fastest)"
    assert choice.step_seconds == {"bf16": 0.5} and choice.machine == execution.machine_info(CPU)
    # an option forced now wins over the record; the other part is reused
    forced = execution.choose_execution(model, b, "cpu", channels_last=True, recorded=recorded)
    assert (forced.variant, forced.how) == ("bf16+channels_last", "forced")
    assert forced.reason == "set by the options; the other part reused from the run"
    # forcing what was recorded is still a reuse
    assert execution.choose_execution(model, b, "cpu", amp=True, recorded=recorded).how == "recorded"
    # a choice made on a GPU is not reused on the CPU
    gpu = dict(recorded, device="cuda:0")
    fresh = execution.choose_execution(model, b, "cpu", recorded=gpu, workload_steps=1)
    assert fresh.how == "default" and fresh.variant == "fp32"


def test_a_variant_that_crashed_here_is_never_reused_or_chosen(in_process, monkeypatch):
    from nodulekit import crashes

    model, b = tiny_model(), batch()
    seen = []

    def crashed(machine, workload, rundir):
        seen.append((machine, workload, rundir))
        return {"bf16": "crashed here before (SIGSEGV)", "fp32": "crashed too"}

    monkeypatch.setattr(crashes, "crashed_variants", crashed)
    recorded = ExecutionChoice("cpu", True, False, "probed", "fastest").as_dict()
    seconds = {"fp32": 1.0, "fp32+channels_last": 1.0, "bf16": 0.1, "bf16+channels_last": 1.0}
    choice = execution.choose_execution(
        model, b, "cpu", recorded=recorded, isolate=True, rundir="R", time_step=clock(seconds)
    )
    assert choice.how == "probed" and choice.variant == "fp32"  # bf16 would be fastest, but it crashed here
    assert choice.rejected == {"bf16": "crashed here before (SIGSEGV)"}  # fp32 is never avoided
    assert seen == [(execution.machine_key(CPU), execution.workload_key(model, execution._as_batch(b, CPU)), "R")]


def test_forced_options_and_small_workloads_are_not_probed(in_process):
    model, b = tiny_model(), batch()
    both = execution.choose_execution(model, b, "cpu", amp=False, channels_last=True)
    assert (both.variant, both.how, both.reason) == ("fp32+channels_last", "forced", "set by the options")
    small = execution.choose_execution(model, b, "cpu", workload_steps=239)
    assert (small.variant, small.how) == ("fp32", "default")
    assert small.reason == "not probed: 239 steps of work, fewer than 240"
    assert small.device == "cpu" and small.machine == execution.machine_info(CPU)
    partly = execution.choose_execution(model, b, "cpu", amp=True, workload_steps=10)
    assert (partly.variant, partly.how) == ("bf16", "default")
    layout = execution.choose_execution(model, b, "cpu", channels_last=True, workload_steps=10)
    assert (layout.variant, layout.how) == ("fp32+channels_last", "default")
    seconds = {"fp32": 1.0, "fp32+channels_last": 0.5, "bf16": 2.0, "bf16+channels_last": 2.0}
    probed = execution.choose_execution(model, b, "cpu", workload_steps=240, time_step=clock(seconds))
    assert (probed.variant, probed.how) == ("fp32+channels_last", "probed")


def test_the_probe_record_names_its_steps_and_checked_shapes(in_process):
    model, b = tiny_model(), batch(6)
    extra = (("last partial batch", batch(3, seed=1), "step"), ("evaluation batch", {"x": batch(4)["x"]}, "eval"))
    seconds = dict.fromkeys(("fp32", "fp32+channels_last", "bf16", "bf16+channels_last"), 1.0)
    choice = execution.choose_execution(model, b, "cpu", time_step=clock(seconds), extra=extra)
    probe = dict(choice.probe)
    assert probe.pop("seconds") >= 0
    assert probe == {
        "warmup_steps": 1,
        "timed_steps": 2,
        "batch": 6,
        "checked": ["last partial batch (3 rows)", "evaluation batch (4 rows)"],
        "in_child_process": False,
    }
    assert choice.variant == "fp32" and set(choice.step_seconds) == set(seconds)
    only_amp = execution.choose_execution(model, b, "cpu", amp="auto", channels_last=False, time_step=clock(seconds))
    assert set(only_amp.step_seconds) == {"fp32", "bf16"}


def test_probe_variants_runs_each_step_and_check_round_robin_with_labels():
    model, b = tiny_model(), batch(6)
    calls = []
    extra = (("last partial batch", batch(3, seed=1), "step"), ("evaluation batch", {"x": batch(4)["x"]}, "eval"))
    variants = [(False, False), (True, True)]
    out = execution.probe_variants(
        model, b, CPU, variants, execution.train_step(), steps=2, time_step=lambda v, run: (0.25, run()),
        extra=extra, on_step=lambda variant, label: calls.append((variant, label)),
    )  # fmt: skip
    assert calls == [
        ("fp32", "timed step (6 rows)"),
        ("bf16+channels_last", "timed step (6 rows)"),
        ("fp32", "timed step (6 rows)"),
        ("bf16+channels_last", "timed step (6 rows)"),
        ("fp32", "last partial batch step (3 rows)"),
        ("bf16+channels_last", "last partial batch step (3 rows)"),
        ("fp32", "evaluation batch step (4 rows)"),
        ("bf16+channels_last", "evaluation batch step (4 rows)"),
    ]
    assert out["fp32"]["seconds"] == [0.25, 0.25]
    assert out["fp32"]["outputs"].shape == (1 + 1 + 1 + 4 * 2,)  # two losses, one loss, 4 rows of logits
    # the eval check's logits are the copy's in eval mode after the steps; the model itself is untouched
    assert model.training and all(p.grad is None for p in model.parameters())


def test_a_variant_failing_in_a_check_is_named_with_the_check():
    class NoBf16(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            if torch.is_autocast_enabled("cpu") and not self.training:
                raise RuntimeError("no bf16 here\nsecond line")
            return self.lin(x.flatten(1)[:, :4])

    b = {"x": torch.rand(4, 1, 2, 2), "y": torch.tensor([0, 1, 0, 1])}
    extra = (("evaluation batch", {"x": torch.rand(3, 1, 2, 2)}, "eval"),)
    out = execution.probe_variants(
        NoBf16(), b, CPU, [(False, False), (True, False)], execution.train_step(), steps=1,
        time_step=lambda v, run: (0.0, run()), extra=extra,
    )  # fmt: skip
    assert out["bf16"]["error"] == "RuntimeError: no bf16 here (in the evaluation batch check)"
    assert out["bf16"]["outputs"] is None and out["fp32"]["outputs"].shape == (1 + 3 * 2,)


def test_the_probe_feeds_each_variant_the_same_random_numbers():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.flatten(1)) + torch.rand(len(x), 2)

    b = {"x": torch.rand(4, 4), "y": torch.tensor([0, 1, 0, 1])}
    out = execution.probe_variants(
        Noisy(), b, CPU, [(False, False), (False, True)], execution.infer_step(), steps=2,
        time_step=lambda v, run: (0.0, run()),
    )  # fmt: skip
    torch.manual_seed(12345)
    first = torch.rand(4, 2)
    torch.manual_seed(12346)
    second = torch.rand(4, 2)
    torch.testing.assert_close(out["fp32"]["outputs"], out["fp32+channels_last"]["outputs"])
    steps = out["fp32"]["outputs"].reshape(2, 4, 2)
    assert not torch.equal(steps[0], steps[1])
    torch.testing.assert_close(steps[1] - steps[0], second - first)


# --------------------------------------------------------------------------- forced options checked to run


def stub_probe(errors, device=CPU, isolate=False):
    asked = []

    def run(variants, steps, timed=True, time_step=None):
        asked.append((list(variants), steps, timed))
        return {execution.variant_name(*v): ({"error": errors[v]} if v in errors else {}) for v in variants}

    return SimpleNamespace(device=device, run=run, isolate=isolate), asked


def test_check_forced_runs_one_untimed_step_of_each_forced_part():
    probe, asked = stub_probe({})
    execution._check_forced(probe, True, True)
    assert asked == [([(True, False), (False, True), (True, True)], 1, False)]
    probe, asked = stub_probe({})
    execution._check_forced(probe, False, False)
    assert asked == []
    probe, asked = stub_probe({})
    execution._check_forced(probe, False, True)
    assert asked == [([(False, True)], 1, False)]


@pytest.mark.parametrize(
    ("amp", "channels_last", "errors", "message"),
    [
        (
            False,
            True,
            {(False, True): "RuntimeError: bad layout"},
            "--channels-last: the model does not run in channels_last memory format on cpu (RuntimeError: bad "
            "layout); leave the option out to choose automatically",
        ),
        (
            True,
            False,
            {(True, False): "RuntimeError: no"},
            "--amp: bf16 autocast cannot run this model on cpu (RuntimeError: no); leave the option out to "
            "choose automatically",
        ),
        (
            True,
            True,
            {(True, True): "RuntimeError: both"},
            "--amp with --channels-last: bf16 autocast cannot run this model on cpu (RuntimeError: both); leave "
            "the option out to choose automatically",
        ),
        (
            True,
            False,
            {(True, False): "crashed in a test process (SIGSEGV) in its timed step"},
            "--amp: bf16 crashed in a test process (SIGSEGV) in its timed step on cpu; leave the option out to "
            "choose automatically",
        ),
    ],
)
def test_a_forced_option_that_cannot_run_is_named(amp, channels_last, errors, message):
    probe, _ = stub_probe(errors)
    with pytest.raises(NodulekitError, match=f"^{re.escape(message)}$"):
        execution._check_forced(probe, amp, channels_last)


def test_a_default_other_than_fp32_is_checked_when_isolating():
    bf16 = ExecutionChoice("cuda", True, False, "default", "not probed: 3 steps")
    probe, asked = stub_probe({}, isolate=False)
    assert execution._checked_default(probe, bf16, "auto", "auto") is bf16 and asked == []
    probe, asked = stub_probe({}, isolate=True)
    assert execution._checked_default(probe, bf16, True, False) is bf16 and asked == []  # forced: checked already
    assert execution._checked_default(probe, bf16, "auto", "auto") is bf16
    assert asked == [([(True, False)], 1, False)]
    probe, asked = stub_probe({(True, False): "crashed in a test process (SIGABRT)"}, isolate=True)
    fallback = execution._checked_default(probe, bf16, "auto", "auto")
    assert (fallback.variant, fallback.how, fallback.reason) == ("fp32", "default", "not probed: 3 steps")
    assert fallback.rejected == {"bf16": "crashed in a test process (SIGABRT)"}
    fp32 = ExecutionChoice("cpu", False, False, "default", "x")
    probe, asked = stub_probe({}, isolate=True)
    assert execution._checked_default(probe, fp32, "auto", "auto") is fp32 and asked == []


def test_an_unprobed_default_that_crashed_here_falls_back_to_fp32(in_process, monkeypatch):
    """As on a GPU whose default is bf16 and where bf16 crashed before: fp32, with the crash named."""
    from nodulekit import crashes

    original = execution.default_execution

    def gpu_like(device, amp="auto", channels_last="auto", reason=""):
        return original(device, True if amp in ("auto", None) else amp, channels_last, reason)

    monkeypatch.setattr(execution, "default_execution", gpu_like)
    monkeypatch.setattr(crashes, "crashed_variants", lambda *a: {"bf16": "crashed here before (SIGSEGV)"})
    choice = execution.choose_execution(tiny_model(), batch(), "cpu", workload_steps=1, isolate=True)
    assert (choice.variant, choice.how, choice.device) == ("fp32", "default", "cpu")
    assert choice.reason == "not probed: 1 steps of work, fewer than 240"
    assert choice.rejected == {"bf16": "crashed here before (SIGSEGV)"}
