"""The two engines (nodulekit.engines) on the shared tiny trained run: names, cards, outputs that agree
with each other and with the fold models, batches, and the one-line errors of open_engine/load_card.

A TorchEngine costs a model card and forward passes (seconds on a loaded machine): one is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodulekit import engines
from nodulekit.errors import NodulekitError
from tests.model_fixtures import export, trained_run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    dataset, rundir = trained_run(folder)
    onnx = export(rundir, folder / "ensemble.onnx")
    from nodulekit.datasets import load_dataset

    x = load_dataset(dataset).x[:3].astype(np.float32)
    return rundir, onnx, x, reference(rundir, x)


def reference(rundir, x):
    """The malignant probability and map of each fold model, computed here with the export wrapper of one model."""
    from nodulekit.export import inference_module, load_model_source

    probs, maps = [], []
    for fold in (0, 1):
        wrapper = inference_module(load_model_source(rundir, fold).models, False).eval()
        with torch.no_grad():
            out = wrapper(torch.from_numpy(x))
        probs.append(out[0][:, 1].numpy())
        maps.append(out[2][:, 1].numpy())
    return np.stack(probs, 1), np.mean(maps, 0)


def test_torch_engine_of_a_rundir_is_the_mean_of_its_fold_models(model, monkeypatch):
    import nodulekit.execution as ex

    rundir, _, x, (members, amap) = model
    seen = {}
    real = ex.choose_execution

    def spy(wrapper, example, device, amp, channels_last, **kw):
        seen.update(example=example, device=device, amp=amp, channels_last=channels_last, **kw)
        return real(wrapper, example, device, amp, channels_last, **kw)

    monkeypatch.setattr(ex, "choose_execution", spy)
    engine = engines.open_engine(rundir, device="cpu", amp=False, channels_last=False)
    assert isinstance(engine, engines.TorchEngine)
    assert engine.name == "PyTorch on cpu (2 fold models)" and engine.provider == "cpu" and engine.ensemble
    assert engine.note == "" and engine.tta is False
    scores = engine.run(x, batch=2)  # two batches: 2 + 1
    np.testing.assert_allclose(scores.members, members, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.prob, members.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.map_up, amap, rtol=1e-4, atol=1e-6)
    assert scores.prob.shape == (3,) and scores.map_up.shape == (3, 32, 32) and scores.members.shape == (3, 2)
    assert engine.note.startswith("fp32") and ": " in engine.note
    # the execution is chosen for this workload: 2 steps of 2, inference, on the wrapper's own outputs
    assert seen["workload_steps"] == 2 and seen["train"] is False and seen["amp"] is False
    assert seen["channels_last"] is False and str(seen["device"]) == "cpu"
    assert tuple(seen["example"].shape) == (2, *x.shape[1:]) and seen["example"].dtype == torch.float32
    forward = seen["forward_fn"]
    wrapper = lambda xb: (xb[:, :1], xb[:, 1:2] * 2)  # noqa: E731
    assert torch.equal(forward(wrapper, torch.ones(1, 2, 1, 1)), torch.tensor([1.0, 2.0]))


def test_onnx_engine_agrees_with_the_torch_engine(model):
    _, onnx, x, (members, amap) = model
    engine = engines.open_engine(onnx, provider="cpu")
    assert isinstance(engine, engines.OnnxEngine) and engine.ensemble
    assert engine.provider == "cpu" and engine.name == "ONNX Runtime, cpu provider"
    scores = engine.run(x, batch=2)
    np.testing.assert_allclose(scores.members, members, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores.prob, members.mean(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores.map_up, amap, rtol=1e-3, atol=1e-5)
    assert engines.load_card(onnx) == engine.card and len(engine.card["members"]) == 2


def test_missing_model_and_fold_of_an_onnx_file_are_one_line(model, tmp_path):
    _, onnx, _, _ = model
    for call in (engines.open_engine, engines.load_card):
        with pytest.raises(NodulekitError) as info:
            call(tmp_path / "none.onnx")
        assert str(info.value) == f"model {tmp_path / 'none.onnx'} does not exist"
    with pytest.raises(NodulekitError) as info:
        engines.open_engine(onnx, fold=0)
    assert str(info.value) == "--fold applies to a RUNDIR; an ONNX file is one model (or one ensemble)"
    upper = tmp_path / "MODEL.ONNX"
    upper.write_bytes(onnx.read_bytes())
    assert isinstance(engines.open_engine(upper, provider="cpu"), engines.OnnxEngine)  # the suffix in any case
    assert engines.load_card(upper) == engines.load_card(onnx)
