"""Folds side by side (one batched computation) against the same folds trained one after another."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

from nodulekit import concurrent_folds as CF
from nodulekit import training as T
from nodulekit.concurrent_folds import batch_norm_by_hand, refusal, train_epoch_side_by_side
from nodulekit.datasets import load_dataset

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """46 nodules in 5 patient folds of 10, 10, 10, 8, 8: training parts of 36 and 38 rows.

    With batches of 6, folds 0-2 have 6 batches per epoch and folds 3-4 have 7 (the last of
    2 rows), so the side-by-side epoch must run steps where only some folds take part.
    """
    path = write_tiny_dataset(tmp_path_factory.mktemp("ds") / "d3c.h5", n=46, channels=3, folds=5)
    return load_dataset(path)


def context(data, cfg, dtype):
    """The shared training context of training.train_fold, on CPU, data in ``dtype``."""
    ctx = T.train_context(data, cfg, "unused", run={}, device=torch.device("cpu"))
    ctx.device_data.x = ctx.device_data.x.to(dtype)
    ctx.device_data.characteristics = ctx.device_data.characteristics.to(dtype)
    return ctx


def fold_state(ctx, k, dtype):
    """Fold k's model, optimiser, scheduler and generator, made by training's own set-up step."""
    state = T.new_fold_state(ctx, k)
    state.model.to(dtype)  # in place: the optimiser keeps the same parameters
    state.forward = state.model.training_forward
    return state


def compare(data, arch, options, *, epochs, dtype, lr, folds=(0, 1, 2, 3, 4), batch_size=6):
    """Train ``folds`` for ``epochs`` both ways; the largest differences of losses, weights, buffers, momentum."""
    cfg = T.TrainConfig(arch=arch, model_options=options, lr=lr, lr_step=1, batch_size=batch_size, device="cpu")
    ctx = context(data, cfg, dtype)
    dd = ctx.device_data
    alone = [fold_state(ctx, k, dtype) for k in folds]
    together = [fold_state(ctx, k, dtype) for k in folds]
    diffs = {"loss": 0.0, "acc": 0.0, "weights": 0.0, "buffers": 0.0, "momentum": 0.0, "eval": 0.0}
    for epoch in range(1, epochs + 1):
        ref = [
            T._train_epoch(f.model, f.forward, f.optimizer, dd, f.split.train_index, f.generator, batch_size, False,
                           f.fold, epoch)
            for f in alone
        ]  # fmt: skip
        got = train_epoch_side_by_side(together, dd, batch_size, False)
        for state in alone + together:
            state.scheduler.step()  # lr_step=1: every epoch runs at another learning rate
        for (loss, acc), res in zip(ref, got, strict=True):
            diffs["loss"] = max(diffs["loss"], abs(loss - res.train_loss))
            diffs["acc"] = max(diffs["acc"], abs(acc - res.train_acc))
    for a, b in zip(alone, together, strict=True):
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
            diffs["weights"] = max(diffs["weights"], float((p - q).detach().abs().max()))
            m, n = a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"]
            diffs["momentum"] = max(diffs["momentum"], float((m - n).abs().max()))
        for u, v in zip(a.model.buffers(), b.model.buffers(), strict=True):
            diffs["buffers"] = max(diffs["buffers"], float((u.to(dtype) - v.to(dtype)).abs().max()))
        # eval mode uses the running statistics: same predictions on the test fold
        la = T.predict_logits(a.model, dd.x, a.split.test_index)
        lb = T.predict_logits(b.model, dd.x, b.split.test_index)
        diffs["eval"] = max(diffs["eval"], float((la - lb).abs().max()))
    return diffs, alone


def test_uneven_folds_have_different_batch_counts(uneven):
    rows = [len(T.fold_split(uneven, k, T.TrainConfig()).train_index) for k in range(5)]
    assert rows == [36, 36, 36, 38, 38]  # 6 batches vs 6 + a last one of 2


def test_side_by_side_equals_sequential_exactly_in_float64(uneven):
    """In float64 both ways agree to rounding (1e-12): same batches, BN statistics, momentum, masked steps."""
    diffs, alone = compare(uneven, "hesam", {"base_width": 4}, epochs=2, dtype=torch.float64, lr=0.01)
    assert diffs["weights"] < 1e-12 and diffs["buffers"] < 1e-12 and diffs["momentum"] < 1e-10
    assert diffs["loss"] < 1e-6 and diffs["acc"] == 0 and diffs["eval"] < 1e-6  # losses are float32 as in training
    # the folds really trained (and differently): a copy of the initial weights would not pass
    w = [next(f.model.parameters()).detach() for f in alone]
    assert float((w[0] - w[1]).abs().max()) > 1e-3
    # batch normalisation counted every fold's own steps: 2 x 6 and 2 x 7 batches
    counts = [int(dict(f.model.named_buffers())["unet.inc.0.1.num_batches_tracked"]) for f in alone]
    assert counts == [12, 12, 12, 14, 14]


def test_side_by_side_equals_sequential_in_float32(uneven):
    """The issue's check: fp32, 5 steps per fold (last batches of 4 and 6 rows), within 1e-4.

    Few steps on purpose: fp32 training of these small models is chaotic (a near-tie in a
    max pool flips under rounding), so sequential training alone, run with 1 vs 2 threads,
    already differs by ~1e-3 in the weights after 3 epochs; float64 above shows exactness.
    With torch 2.13 on this CPU one fold hits such a tie within the 5 steps (one momentum
    element moves by 5e-2, the weights by 2.5e-5; a fold stacked alone agrees to 3e-8), so the
    bound is 1e-4, still ~80x below how far these 5 steps move the weights (8e-3): another
    fold's batch or state would exceed it.
    """
    diffs, _ = compare(uneven, "hesam", {"base_width": 8}, epochs=1, dtype=torch.float32, lr=5e-4, batch_size=8)
    assert diffs["loss"] < 1e-4 and diffs["weights"] < 1e-4 and diffs["buffers"] < 1e-4, diffs


def _bn_with_state(seed):
    """A BatchNorm2d whose affine weights and running statistics are far from the defaults."""
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    return bn


def test_batch_norm_by_hand_equals_torch_batch_norm():
    """Outputs, running mean, unbiased running variance and batch count, train and eval, float64."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 3, 4, 6, generator=g, dtype=torch.float64) * 3 + 2 for _ in range(2)]
    ref, mine = _bn_with_state(0), _bn_with_state(0)
    for x in xs:  # two training steps: the second uses the first's running statistics
        torch.testing.assert_close(batch_norm_by_hand(mine, x), ref(x), rtol=0, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(mine, name), getattr(ref, name), rtol=0, atol=1e-12)
    assert int(mine.num_batches_tracked) == 2
    ref.eval(), mine.eval()
    torch.testing.assert_close(batch_norm_by_hand(mine, xs[0]), ref(xs[0]), rtol=0, atol=1e-12)


def test_batch_norm_by_hand_under_vmap_updates_each_folds_statistics():
    """Three folds' stacked states under vmap: each fold's output and statistics as if run alone."""
    from torch.func import functional_call, stack_module_state, vmap

    g = torch.Generator().manual_seed(2)
    folds = [_bn_with_state(s) for s in range(3)]
    alone = [_bn_with_state(s) for s in range(3)]
    params, buffers = stack_module_state(folds)
    x = torch.randn(3, 4, 3, 5, 5, generator=g, dtype=torch.float64)
    shell = _bn_with_state(9)
    shell.forward = lambda inp: batch_norm_by_hand(shell, inp)
    out = vmap(lambda p, b, xi: functional_call(shell, (p, b), (xi,)))(params, buffers, x)
    for i, bn in enumerate(alone):
        torch.testing.assert_close(out[i], bn(x[i]), rtol=0, atol=1e-12)
        torch.testing.assert_close(buffers["running_var"][i], bn.running_var, rtol=0, atol=1e-12)
        torch.testing.assert_close(buffers["running_mean"][i], bn.running_mean, rtol=0, atol=1e-12)
    assert buffers["num_batches_tracked"].tolist() == [1, 1, 1]


def test_batch_norm_by_hand_keeps_bf16_in_bf16():
    """Under bf16 autocast torch's kernel returns bf16 computed in float32: so does the hand-written one."""
    bn = torch.nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4).to(torch.bfloat16)
    out = batch_norm_by_hand(bn, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.nn.BatchNorm2d(3)(x.float()), rtol=1e-2, atol=1e-2)


def test_side_by_side_with_batch_norm_by_hand_equals_sequential(uneven, monkeypatch):
    """The GPU path (batch norm written out, since CUDA's kernels fail under vmap) run on the CPU:
    same weights, running statistics and batch counts as the folds trained alone."""
    monkeypatch.setattr(CF, "batch_norm_by_hand_needed", lambda device, amp=False: True)
    calls = []
    monkeypatch.setattr(CF, "batch_norm_by_hand", lambda bn, x: calls.append(1) or batch_norm_by_hand(bn, x))
    diffs, alone = compare(uneven, "hesam", {"base_width": 4}, epochs=2, dtype=torch.float64, lr=0.01)
    assert calls  # the side-by-side steps really normalised by hand
    assert diffs["weights"] < 1e-11 and diffs["buffers"] < 1e-11 and diffs["momentum"] < 1e-9, diffs
    assert diffs["loss"] < 1e-6 and diffs["acc"] == 0 and diffs["eval"] < 1e-6, diffs


def test_batch_norm_by_hand_is_used_off_the_cpu_or_under_bf16():
    assert not CF.batch_norm_by_hand_needed(torch.device("cpu"))
    assert CF.batch_norm_by_hand_needed(torch.device("cpu"), amp=True)
    assert CF.batch_norm_by_hand_needed(torch.device("cuda", 0)) and CF.batch_norm_by_hand_needed("cuda")


def test_auxiliary_loss_model_side_by_side(uneven):
    """PN-SAMP: segmentation and attribute losses per fold, on each fold's own masks and ratings."""
    diffs, _ = compare(uneven, "pn-samp", {"base_width": 4}, epochs=1, dtype=torch.float64, lr=0.01, folds=(1, 3, 4))
    assert diffs["weights"] < 1e-12 and diffs["buffers"] < 1e-12 and diffs["loss"] < 1e-6, diffs


def test_dropout_models_are_refused():
    from nodulekit.models import create_model

    assert refusal(create_model("vgg16-sam", 3, base_width=4)) is None
    reason = refusal(create_model("vgg16", 3, base_width=4, fc_width=8))
    assert reason == (
        "vgg16 draws random numbers in training (Dropout), so its folds side by side could not match folds trained alone"
    )


def test_finished_fold_untouched_by_the_others_extra_steps(uneven):
    """A fold with fewer batches keeps its weights and momentum while the others take their extra step."""
    cfg = T.TrainConfig(arch="cam", model_options={"base_width": 4}, lr=0.01, batch_size=6, device="cpu")
    ctx = context(uneven, cfg, torch.float64)
    short_alone, short, long_ = (fold_state(ctx, k, torch.float64) for k in (0, 0, 3))  # 6, 6 and 7 batches
    T._train_epoch(short_alone.model, short_alone.forward, short_alone.optimizer, ctx.device_data,
                   short_alone.split.train_index, short_alone.generator, 6, False, 0, 1)  # fmt: skip
    train_epoch_side_by_side([short, long_], ctx.device_data, 6, False)
    for p, q in zip(short_alone.model.parameters(), short.model.parameters(), strict=True):
        assert float((p - q).detach().abs().max()) < 1e-12
        m, n = short_alone.optimizer.state[p]["momentum_buffer"], short.optimizer.state[q]["momentum_buffer"]
        assert float((m - n).abs().max()) < 1e-12
    assert np.isfinite([float(p.detach().sum()) for p in long_.model.parameters()]).all()


# --------------------------------------------------------------------------- through `train`


def run_train(dataset, rundir, concurrent, **kw):
    on_epoch_end = kw.pop("on_epoch_end", None)
    base = dict(arch="cam", model_options={"base_width": 4}, epochs=2, lr=5e-4, batch_size=8, device="cpu")
    cfg = T.TrainConfig(**{**base, **kw}, concurrent_folds=concurrent)
    return T.train(dataset, rundir, cfg, progress=False, on_epoch_end=on_epoch_end)


def fold_files(rundir, k):
    ckpt = torch.load(rundir / f"fold{k}" / "checkpoint.pt", weights_only=True)
    with h5py.File(rundir / f"fold{k}" / "result.h5", "r") as f:
        result = {name: f[name][()] for name in ("history", "test_prob", "test_index", "train_index")}
    return ckpt, result


def assert_same_folds(a, b, folds=range(5), tol=1e-3):
    """Per fold: same checkpoint contents (RNG, generator, optimiser layout), results within ``tol``.

    The tolerance is fp32's here: a near-tie in a max pool flips under rounding and moves one
    gradient element (momentum by up to ~2 % after 2 epochs; the weights by < 1e-4), as it does
    between two sequential runs with different thread counts. The float64 tests above show
    the computation itself is the same; these check the plumbing (a wrong fold's state, a
    lost momentum or RNG state would be off by far more).
    """
    for k in folds:
        (ca, ra), (cb, rb) = fold_files(a, k), fold_files(b, k)
        assert (ca["epoch"], ca["finished"], ca["fold"], ca["fold_seed"]) == (
            cb["epoch"],
            cb["finished"],
            cb["fold"],
            cb["fold_seed"],
        )
        assert torch.equal(ca["resume"]["torch_rng"], cb["resume"]["torch_rng"])  # each fold's own RNG state
        assert torch.equal(ca["resume"]["generator"], cb["resume"]["generator"])  # same batch orders drawn
        assert ca["resume"]["scheduler"] == cb["resume"]["scheduler"]
        ma = ca["resume"]["optimizer"]["state"]
        mb = cb["resume"]["optimizer"]["state"]
        assert ma.keys() == mb.keys() and all(
            float((ma[i]["momentum_buffer"] - mb[i]["momentum_buffer"]).abs().max()) <= 50 * tol for i in ma
        )
        for name, value in ca["state_dict"].items():
            assert float((value.double() - cb["state_dict"][name].double()).abs().max()) <= tol, (k, name)
        np.testing.assert_array_equal(ra["test_index"], rb["test_index"])
        np.testing.assert_array_equal(ra["train_index"], rb["train_index"])
        np.testing.assert_allclose(ra["history"][:, 0], rb["history"][:, 0])
        np.testing.assert_allclose(ra["history"], rb["history"], atol=tol)
        np.testing.assert_allclose(ra["test_prob"], rb["test_prob"], atol=tol)


@pytest.fixture(scope="module")
def paths(uneven, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    sequential, together = folder / "sequential", folder / "together"
    run_train(uneven.path, sequential, False)
    out = run_train(uneven.path, together, True)
    return {"dataset": uneven.path, "sequential": sequential, "together": together, "out": out, "tmp": folder}


def test_train_side_by_side_writes_the_same_folds(paths):
    assert [s["status"] for s in paths["out"]["folds"]] == ["trained"] * 5
    assert_same_folds(paths["sequential"], paths["together"])
    # a finished run is skipped, side by side or not
    again = run_train(paths["dataset"], paths["together"], True)
    assert [s["status"] for s in again["folds"]] == ["skipped"] * 5


def test_interrupted_side_by_side_resumes_and_catches_up(paths):
    """Ctrl-C after fold 0's checkpoint of epoch 1: the other folds restart from scratch and
    catch up with fold 0 (folds at different epochs), then all finish as an uninterrupted run."""
    rundir = paths["tmp"] / "interrupted"

    def stop(fold, epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(paths["dataset"], rundir, True, on_epoch_end=stop)
    assert torch.load(rundir / "fold0" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (rundir / "fold1" / "checkpoint.pt").exists()
    assert not list(rundir.glob("fold*/claim.json"))  # claims released on the way out
    out = run_train(paths["dataset"], rundir, True)
    assert [s["status"] for s in out["folds"]] == ["resumed", "trained", "trained", "trained", "trained"]
    assert_same_folds(paths["together"], rundir)


def test_one_fold_diverging_side_by_side_keeps_the_others(paths, monkeypatch):
    import nodulekit.concurrent_folds as C

    original = C.train_epoch_side_by_side

    def poisoned(folds, *args):
        for state in folds:
            if state.fold == 0 and state.epoch == 1:  # fold 0's second epoch
                with torch.no_grad():
                    next(state.model.parameters()).fill_(float("nan"))
        return original(folds, *args)

    monkeypatch.setattr(C, "train_epoch_side_by_side", poisoned)
    rundir = paths["tmp"] / "diverged"
    with pytest.raises(T.TrainingDiverged, match="fold 0 diverged in epoch 2.*epoch 1"):
        run_train(paths["dataset"], rundir, True)
    assert torch.load(rundir / "fold0" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (rundir / "fold0" / "result.h5").exists()
    assert_same_folds(paths["together"], rundir, folds=range(1, 5), tol=1e-9)  # NaN did not reach them


def test_one_fold_with_non_finite_outputs_side_by_side_keeps_the_others(paths, monkeypatch):
    """Finite training loss but NaN batch-norm statistics (eval outputs NaN) in fold 0's
    second epoch: that fold fails alone, keeps its epoch-1 checkpoint, writes no result."""
    import nodulekit.concurrent_folds as C

    original = C.train_epoch_side_by_side

    def poisoned(folds, *args):
        results = original(folds, *args)
        for state in folds:
            if state.fold == 0 and state.epoch == 1:  # after fold 0's second training pass
                bn = next(m for m in state.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
                bn.running_var.fill_(float("nan"))
        return results

    monkeypatch.setattr(C, "train_epoch_side_by_side", poisoned)
    rundir = paths["tmp"] / "nan-outputs"
    with pytest.raises(T.TrainingDiverged, match="fold 0 failed in epoch 2: its model's outputs .* not finite"):
        run_train(paths["dataset"], rundir, True)
    assert torch.load(rundir / "fold0" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (rundir / "fold0" / "result.h5").exists()
    assert_same_folds(paths["together"], rundir, folds=range(1, 5), tol=1e-9)


def test_dropout_model_falls_back_to_folds_in_turn(uneven, tmp_path, capfd):
    options = {"base_width": 4, "fc_width": 8}
    out = run_train(uneven.path, tmp_path / "vgg", True, arch="vgg16", model_options=options, epochs=1)
    err = capfd.readouterr().err
    assert "vgg16 draws random numbers in training (Dropout)" in err and "its folds train one after another" in err
    run_train(uneven.path, tmp_path / "vgg-seq", False, arch="vgg16", model_options=options, epochs=1)
    assert [s["status"] for s in out["folds"]] == ["trained"] * 5
    assert_same_folds(tmp_path / "vgg-seq", tmp_path / "vgg", tol=0)  # it really ran the sequential path


@pytest.mark.parametrize("device, amp", [("cuda", True), ("cuda:0", True), ("cuda", False), ("cpu", True)])
def test_bf16_no_longer_sends_folds_in_turn(capfd, device, amp):
    """bf16 autocast side by side works (its layers cast by hand): no fallback to folds in turn."""
    from nodulekit.execution import ExecutionChoice

    cfg = T.TrainConfig(arch="hesam", model_options={"base_width": 4}, concurrent_folds=True)
    choice = ExecutionChoice(device, amp, False, "forced", "test")
    assert T._side_by_side_possible(cfg, {"in_channels": 3}, choice) is True
    assert "one after another" not in capfd.readouterr().err


# --------------------------------------------------------------------------- bf16 autocast under vmap


def test_vmap_skips_autocast_for_convolutions_with_stacked_weights():
    """The torch behaviour the hand-written casts exist for (if torch fixes it, this says so):
    under vmap a convolution with stacked weights ignores bf16 autocast, alone it does not."""
    from torch.func import functional_call, stack_module_state, vmap

    convs = [torch.nn.Conv2d(3, 4, 3) for _ in range(2)]
    params, buffers = stack_module_state(convs)
    x = torch.randn(2, 5, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = convs[0](x[0])
        stacked = vmap(lambda p, b, xi: functional_call(convs[0], (p, b), (xi,)))(params, buffers, x)
    assert alone.dtype == torch.bfloat16 and stacked.dtype == torch.float32


@pytest.mark.parametrize(
    "layer",
    [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.ConvTranspose2d(3, 4, 2, stride=2),
     torch.nn.Linear(3, 4)],
    ids=["conv", "conv-no-bias", "conv-transpose", "linear"],
)  # fmt: skip
def test_lower_precision_by_hand_is_autocast_under_vmap(layer):
    """Each stacked layer gives, in bf16, what autocast gives that fold's layer alone; without
    autocast it is the layer's own float32 forward."""
    import copy
    import functools

    from torch.func import functional_call, stack_module_state, vmap

    g = torch.Generator().manual_seed(3)
    folds = [copy.deepcopy(layer) for _ in range(3)]
    for f in folds:
        with torch.no_grad():
            for p in f.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    params, buffers = stack_module_state(folds)
    shape = (3, 5, 3) if isinstance(layer, torch.nn.Linear) else (3, 5, 3, 6, 6)
    x = torch.randn(*shape, generator=g)
    shell = copy.deepcopy(layer)
    shell.forward = functools.partial(CF.lower_precision_by_hand, shell)
    batched = vmap(lambda p, b, xi: functional_call(shell, (p, b), (xi,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = batched(params, buffers, x)
        want = [f(x[i]) for i, f in enumerate(folds)]
    assert got.dtype == torch.bfloat16
    for i in range(3):  # a grouped bf16 convolution rounds in another order: within bf16's step (2^-7)
        scale = float(want[i].detach().float().abs().max())
        torch.testing.assert_close(got[i].float(), want[i].float(), rtol=2**-7, atol=2**-7 * scale)
    plain = batched(params, buffers, x)
    assert plain.dtype == torch.float32
    for i, f in enumerate(folds):
        torch.testing.assert_close(plain[i], f(x[i]), rtol=1e-6, atol=1e-6)


def test_side_by_side_under_bf16_autocast_computes_in_bf16(uneven):
    """Every convolution of the stacked HESAM returns bf16 under autocast, as in a fold alone
    (before the fix they returned float32 on the CPU and failed on CUDA)."""
    cfg = T.TrainConfig(arch="hesam", model_options={"base_width": 4}, batch_size=8, device="cpu")
    ctx = context(uneven, cfg, torch.float32)
    folds = [fold_state(ctx, k, torch.float32) for k in (0, 1)]
    stacked = CF.StackedFolds(folds, amp=True)
    dtypes = []
    for m in stacked.module.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    idx = torch.stack([torch.from_numpy(f.split.train_index[:8]) for f in folds])
    stacked.step([0, 1], ctx.device_data.batch(idx), amp=True)
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes


def bf16_compare(data):
    """Folds 0-4 for one epoch (5 steps each, last batches of 4 and 6 rows), both under bf16
    autocast: side by side vs alone. (loss difference, weight difference, how far the weights moved)."""
    import copy

    batch_size = 8
    cfg = T.TrainConfig(arch="hesam", model_options={"base_width": 8}, lr=5e-4, batch_size=batch_size, device="cpu")
    ctx = context(data, cfg, torch.float32)
    dd = ctx.device_data
    alone = [fold_state(ctx, k, torch.float32) for k in range(5)]
    together = [fold_state(ctx, k, torch.float32) for k in range(5)]
    start = [copy.deepcopy(list(f.model.parameters())) for f in alone]
    ref = [
        T._train_epoch(f.model, f.forward, f.optimizer, dd, f.split.train_index, f.generator, batch_size, True,
                       f.fold, 1)
        for f in alone
    ]  # fmt: skip
    got = train_epoch_side_by_side(together, dd, batch_size, True)
    loss = max(abs(a[0] - b.train_loss) for a, b in zip(ref, got, strict=True))

    def largest(pairs):
        return max(float((p - q).detach().abs().max()) for p, q in pairs)

    pairs = [zip(a.model.parameters(), b.model.parameters(), strict=True) for a, b in zip(alone, together, strict=True)]
    weights = largest(pq for fold in pairs for pq in fold)
    moved = largest(pq for a, s in zip(alone, start, strict=True) for pq in zip(a.model.parameters(), s, strict=True))
    return loss, weights, moved


# docs/training.md, "Folds side by side": bf16 rounds a grouped convolution in another order than a
# fold's own, and bf16 training of these small models amplifies that as it does any rounding change
BF16_TOLERANCE = {"loss": 1e-2, "weights": 3e-3}


def test_side_by_side_under_bf16_equals_sequential_bf16_within_tolerance(uneven):
    """The issue's check under bf16: side by side and one after another, both under CPU bf16
    autocast, agree within the documented tolerance, which is well below how far one epoch moves
    the weights (so a fold that did not train, or trained on another fold's batches, fails)."""
    loss, weights, moved = bf16_compare(uneven)
    assert loss < BF16_TOLERANCE["loss"] and weights < BF16_TOLERANCE["weights"], (loss, weights)
    assert moved > 2 * BF16_TOLERANCE["weights"], moved
