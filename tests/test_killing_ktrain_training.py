"""Known answers for the pieces of one fold's training (``nodulekit.training``) called one by one on a
tiny synthetic dataset: what run.json and a checkpoint record, how a fold's state starts, is saved and
resumed (at, before and after its last epoch), how the splits refuse degenerate folds, and the
messages of a diverged fold. No training run here: each piece gets hand-made inputs."""

from __future__ import annotations

import json
import math
import platform
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from nodulekit import __version__
from nodulekit import training as tr
from nodulekit.errors import NodulekitError
from nodulekit.execution import ExecutionChoice, default_execution
from nodulekit.training import TrainConfig
from tests.conftest import write_tiny_dataset

CPU = torch.device("cpu")
OPTS = {"base_width": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 nodules of 10 patients (one benign, one malignant each), 1 channel, 2 folds of 10 rows."""
    from nodulekit.datasets import load_dataset

    return load_dataset(write_tiny_dataset(tmp_path_factory.mktemp("d") / "d1c.h5", n=20, channels=1, folds=2))


def cfg_(**kw):
    return TrainConfig(**({"arch": "cam", "model_options": dict(OPTS), "device": "cpu", "seed": 11} | kw))


# --------------------------------------------------------------------------- run.json


def test_run_record_names_every_setting(data):
    cfg = cfg_(
        epochs=3, batch_size=5, last_batch="drop", lr=0.01, momentum=0.8, weight_decay=2e-4, lr_step=7,
        lr_gamma=0.5, select="val", val_fraction=0.2,
    )  # fmt: skip
    choice = ExecutionChoice("cpu", True, False, "forced", "set by the options")
    record = tr.run_record(cfg, data, CPU, choice)
    created = record.pop("created")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", created)
    assert record == {
        "format": 1,
        "arch": "cam",
        "model_options": {"base_width": 4},
        "in_channels": 1,
        "num_classes": 2,
        "channels": 1,
        "dataset": {
            "path": str(data.path.resolve()),
            "name": "D1C",
            "fingerprint": data.fingerprint,
            "n": 20,
            "n_malignant": 10,
            "split": "patient",
            "seed": 0,
        },
        "dataset_identity": data.identity,
        "dataset_fingerprint": data.fingerprint,
        "n_folds": 2,
        "seed": 11,
        "epochs": 3,
        "batch_size": 5,
        "last_batch": "drop",
        "optimiser": {"name": "SGD", "lr": 0.01, "momentum": 0.8, "weight_decay": 2e-4, "nesterov": False},
        "scheduler": {"name": "StepLR", "step_size": 7, "gamma": 0.5},
        "loss": "cross_entropy + model.auxiliary_loss",
        "selection": {
            "mode": "val",
            "val_fraction": 0.2,
            "split": "StratifiedGroupKFold by patient",
            "rule": "highest validation accuracy, then lowest validation loss, then earliest epoch",
        },
        "threshold": 0.5,
        "label_rule": data.label_rule,
        "normalisation": data.normalisation,
        "input_spec": data.input_spec.as_dict() if data.input_spec is not None else None,
        "device": "cpu",
        "amp": True,
        "channels_last": False,
        "execution": choice.as_dict(),
        "compile": False,
        "cuda_graphs": False,
        "versions": {
            "nodulekit": __version__,
            "torch": str(torch.__version__),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
    }
    assert data.label_rule == {"min_readers": 3, "malignant_above": 3.0, "benign_below": 3.0}
    assert type(record["versions"]["torch"]) is str


def test_run_record_of_the_default_selection_execution_and_recipes(data):
    from nodulekit.recipes import PAPER, resolve_recipe

    record = tr.run_record(cfg_(amp=True, channels_last=True, compile=True), data, CPU)
    assert record["selection"] == {"mode": "last", "rule": "model after the last epoch"}
    assert record["execution"] == default_execution(CPU, True, True).as_dict()
    assert (record["amp"], record["channels_last"], record["compile"]) == (True, True, True)
    assert "recipe" not in record and "recipe" not in tr.run_record(cfg_(recipe=PAPER), data, CPU)
    other = resolve_recipe("paper", {"weight_decay": 5e-4})
    assert tr.run_record(cfg_(recipe=other), data, CPU)["recipe"] == other.as_dict()


# --------------------------------------------------------------------------- splits


def test_fold_seed_depends_on_seed_and_fold():
    assert tr.fold_seed(3, 1) == int(np.random.SeedSequence([3, 1]).generate_state(1)[0])
    assert len({tr.fold_seed(3, 1), tr.fold_seed(3, 0), tr.fold_seed(4, 1), tr.fold_seed(1, 3)}) == 4


def test_fold_split_rows_and_refusals(data):
    split = tr.fold_split(data, 1, cfg_())
    assert split.fold == 1 and split.val_index is None
    assert split.test_index.tolist() == [i for i in range(20) if (i // 2) % 2 == 1]
    assert split.train_index.tolist() == [i for i in range(20) if (i // 2) % 2 == 0]
    for bad in (-1, 2):
        with pytest.raises(
            NodulekitError, match=f"^fold {bad} does not exist: {re.escape(str(data.path))} has folds 0..1$"
        ):
            tr.fold_split(data, bad, cfg_())
    benign_test = replace(data, y=np.where(data.fold == 0, 0, data.y))
    with pytest.raises(
        NodulekitError, match=r"^fold 0: the test part \(10 rows\) has only benign nodules; both classes are needed$"
    ):
        tr.fold_split(benign_test, 0, cfg_())
    malignant_train = replace(data, y=np.where(data.fold == 1, 1, data.y))
    with pytest.raises(NodulekitError, match=r"^fold 0: the training part \(10 rows\) has only malignant nodules;"):
        tr.fold_split(malignant_train, 0, cfg_())


def test_fold_split_of_an_empty_part_says_no_nodules(data):
    all_in_fold_0 = replace(data, fold=np.zeros(20, np.int64), attrs=dict(data.attrs, n_folds=2))
    with pytest.raises(NodulekitError, match=r"^fold 0: the training part \(0 rows\) has no nodules; both classes"):
        tr.fold_split(all_in_fold_0, 0, cfg_())


def test_validation_split_by_patient_seeded_from_the_fold(data):
    cfg = cfg_(select="val", val_fraction=0.2)
    split = tr.fold_split(data, 0, cfg)
    rows = np.flatnonzero(data.fold != 0)
    tr_pos, va_pos = tr.validation_split(data.y[rows], data.patient_id[rows], 0.2, tr.fold_seed(11, 0))
    assert split.val_index.tolist() == rows[va_pos].tolist() and split.train_index.tolist() == rows[tr_pos].tolist()
    assert len(split.val_index) == 2  # 1 of 5 patients
    assert not set(data.patient_id[split.val_index]) & set(data.patient_id[split.train_index])
    # 1 / 0.45 rounds to 2 splits, 1 / 0.7 to 1, raised to 2: half the patients validate
    for fraction in (0.45, 0.7):
        _, va = tr.validation_split(data.y[rows], data.patient_id[rows], fraction, 0)
        assert len(va) in (4, 6)
    with pytest.raises(NodulekitError, match=r"^--val-fraction 0\.1 needs at least 10 training patients, found 5$"):
        tr.validation_split(data.y[rows], data.patient_id[rows], 0.1, 0)
    tr.validation_split(data.y[rows], data.patient_id[rows], 0.2, 2**32 + 5)  # seeds beyond 32 bits wrap


# --------------------------------------------------------------------------- the loop's small pieces


def test_validation_selector_prefers_accuracy_then_loss_then_the_earliest_epoch():
    sel = tr.ValidationSelector()
    assert (sel.best_epoch, sel.best_acc, sel.best_loss) == (None, -math.inf, math.inf)
    assert sel.update(1, 0.5, 0.6) is True
    assert sel.update(2, 0.4, 0.6) is True  # same accuracy, lower loss
    assert sel.update(3, 0.4, 0.6) is False  # a tie keeps the earlier epoch
    assert sel.update(4, 0.9, 0.7) is True
    assert sel.update(5, 0.1, 0.65) is False
    assert sel.state() == {"best_epoch": 4, "best_acc": 0.7, "best_loss": 0.9}
    again = tr.ValidationSelector(sel.state())
    assert again.state() == sel.state() and again.update(6, 0.95, 0.7) is False


def test_divergence_messages():
    assert tr.divergence_message(2, 1, float("nan")) == (
        "fold 2 diverged in epoch 1: training loss is nan; no checkpoint was written; try a lower --lr"
    )
    assert tr.divergence_message(0, 3, float("inf")) == (
        "fold 0 diverged in epoch 3: training loss is inf; the last good checkpoint (epoch 2) is kept; try a lower --lr"
    )
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, float("inf")], [2.0, 2.0], [0.0, 0.0]])
    tr.check_outputs(logits[[0, 3, 4]], 0, 1, "test")
    with pytest.raises(tr.TrainingDiverged) as err:
        tr.check_outputs(logits, 1, 2, "validation")
    assert str(err.value) == (
        "fold 1 failed in epoch 2: its model's outputs on 2 of 5 validation rows are not finite (NaN/inf); "
        "the last good checkpoint (epoch 1) is kept and no result is written; try a lower --lr"
    )
    with pytest.raises(tr.TrainingDiverged, match=r"on 1 of 1 test rows .*; no checkpoint was written and no result"):
        tr.check_outputs(logits[[1]], 0, 1, "test")
    assert tr.TrainingDiverged.exit_code == 1


def test_predict_logits_in_chunks_and_score():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Dropout(0.5))
    x = torch.rand(7, 1, 2, 2)
    index = np.array([6, 0, 3, 2, 5])
    out = tr.predict_logits(model, x, index, batch_size=2)
    assert not model.training and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, model(x[index]).detach())  # eval mode: no dropout
    assert tr.predict_logits(model, x, np.array([], np.int64)).shape == (0, 2)
    half = tr.predict_logits(model, x, index, batch_size=512, amp=True)
    assert half.dtype == torch.float32 and not torch.equal(half, out)  # bf16 autocast, cast back
    torch.testing.assert_close(half, out, rtol=0.05, atol=0.05)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [0.0, -1.0]])
    loss, acc = tr._score(logits, np.array([0, 0, 1, 1]))
    p = torch.softmax(logits, 1)
    assert loss == pytest.approx(float(-(p[0, 0].log() + p[1, 0].log() + p[2, 1].log() + p[3, 1].log()) / 4))
    assert acc == 0.5


def test_the_papers_optimiser_and_schedule():
    from nodulekit.recipes import resolve_recipe

    model = torch.nn.Linear(2, 2)
    opt = tr.make_optimizer(model, cfg_(lr=0.2, momentum=0.7, weight_decay=3e-4))
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and len(group["params"]) == 2
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.2, 0.7, 3e-4, False)
    recipe = resolve_recipe("paper", {"weight_decay": 5e-4})
    assert tr.make_optimizer(model, cfg_(weight_decay=3e-4, recipe=recipe)).param_groups[0]["weight_decay"] == 5e-4
    assert (
        tr.make_optimizer(model, cfg_(weight_decay=3e-4, recipe=resolve_recipe("paper"))).param_groups[0][
            "weight_decay"
        ]
        == 3e-4
    )
    sched = tr.make_scheduler(opt, cfg_(lr_step=2, lr_gamma=0.5))
    lrs = []
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.2, 0.1, 0.1, 0.05, 0.05])


# --------------------------------------------------------------------------- a fold's state, saved and resumed


@pytest.fixture
def ctx(data, tmp_path):
    cfg = cfg_(epochs=2, batch_size=4, lr=0.05)
    return tr.train_context(data, cfg, tmp_path / "run", run=tr.run_record(cfg, data, CPU), device=CPU)


def test_train_context_defaults(data, tmp_path):
    import nodulekit.run as run_module

    (tmp_path / "run").mkdir()
    cfg = cfg_(amp=True)
    run_module.prepare_rundir(tmp_path / "run", tr.run_record(cfg, data, CPU))
    ctx = tr.train_context(data, cfg, str(tmp_path / "run"))
    assert ctx.rundir == tmp_path / "run" and ctx.run["arch"] == "cam" and ctx.device == CPU
    assert ctx.execution.variant == "bf16" and ctx.amp is True and ctx.execution.how == "default"
    assert ctx.device_data.x.shape == (20, 1, 32, 32) and ctx.device_data.device == CPU
    b = ctx.device_data.batch(torch.tensor([3, 1]))
    assert set(b) == {"x", "y", "index", "mask", "characteristics"}
    assert b["y"].tolist() == [1, 1] and b["index"].tolist() == [3, 1]
    torch.testing.assert_close(b["x"], torch.from_numpy(data.x[[3, 1]]))
    torch.testing.assert_close(b["mask"], torch.from_numpy(np.ascontiguousarray(data.mask[[3, 1]])))
    torch.testing.assert_close(b["characteristics"], torch.from_numpy(data.characteristics[[3, 1]]))


def test_a_new_fold_is_seeded_from_seed_and_fold(ctx):
    from nodulekit.run import build_model

    state = tr.new_fold_state(ctx, 1)
    after = torch.get_rng_state()
    seed = tr.fold_seed(11, 1)
    torch.manual_seed(seed)
    expected = build_model("cam", 1, 2, OPTS)
    for (name, p), q in zip(state.model.state_dict().items(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert (state.fold, state.seed, state.epoch, state.status) == (1, seed, 0, "trained")
    assert state.split.test_index.tolist() == tr.fold_split(ctx.data, 1, ctx.cfg).test_index.tolist()
    assert torch.equal(state.generator.get_state(), torch.Generator().manual_seed(seed).get_state())
    assert state.optimizer.param_groups[0]["lr"] == 0.05 and state.scheduler.step_size == 30
    assert state.selector is None and state.hooks is None and state.history == []
    assert state.checkpoint_path == ctx.rundir / "fold1" / "checkpoint.pt"
    assert state.result_path == ctx.rundir / "fold1" / "result.h5" and state.fold_dir == ctx.rundir / "fold1"
    torch.manual_seed(seed)  # dropout starts from the fold's seed too (fresh or resumed)
    assert torch.equal(after, torch.get_rng_state())
    val = tr.new_fold_state(replace(ctx, cfg=replace(ctx.cfg, select="val", val_fraction=0.2)), 0)
    assert isinstance(val.selector, tr.ValidationSelector) and len(val.split.val_index) == 2


def test_a_checkpoint_records_the_fold_and_how_to_resume_it(ctx):
    from nodulekit.recipes import PAPER

    state = tr.new_fold_state(ctx, 0)
    state.epoch, state.history, state.epoch_seconds = 1, [[1.0, 0.7, 0.5, 0.6, 0.4]], [0.25]
    ckpt = tr.checkpoint_dict(ctx, state, finished=False)
    resume = ckpt.pop("resume")
    state_dict = ckpt.pop("state_dict")
    for k, v in state.model.state_dict().items():
        assert torch.equal(state_dict[k], v) and state_dict[k] is not v
    assert ckpt == {
        "format": 1,
        "arch": "cam",
        "in_channels": 1,
        "num_classes": 2,
        "config": dict(state.model.config),
        "epoch": 1,
        "selected_epoch": 1,
        "select": "last",
        "finished": False,
        "fold": 0,
        "seed": 11,
        "fold_seed": tr.fold_seed(11, 0),
        "dataset_fingerprint": ctx.data.fingerprint,
        "dataset_identity": ctx.data.identity,
        "dataset_name": "D1C",
        "label_rule": json.dumps(ctx.data.label_rule),
        "normalisation": json.dumps(ctx.data.normalisation),
        "input_spec": json.dumps(ctx.data.input_spec.as_dict() if ctx.data.input_spec is not None else None),
        "device": "cpu",
        "amp": False,
        "channels_last": False,
        "execution": ctx.execution.as_dict(),
        "versions": tr._versions(),
        "recipe": PAPER.as_dict(),
    }
    assert dict(state.model.config)["base_width"] == 4
    assert set(resume) == {
        "recipe", "model", "optimizer", "scheduler", "generator", "torch_rng", "cuda_rng", "history",
        "val_history", "epoch_seconds", "selector",
    }  # fmt: skip
    assert resume["recipe"] is None and resume["model"] is None and resume["selector"] is None
    assert resume["cuda_rng"] is None and torch.equal(resume["torch_rng"], torch.get_rng_state())
    assert torch.equal(resume["generator"], state.generator.get_state())
    assert resume["history"] == [[1.0, 0.7, 0.5, 0.6, 0.4]] and resume["epoch_seconds"] == [0.25]
    assert resume["optimizer"] == state.optimizer.state_dict() and resume["scheduler"]["step_size"] == 30
    assert tr.checkpoint_dict(ctx, state, finished=True)["finished"] is True


def test_a_validation_checkpoint_reports_the_best_epoch_and_keeps_the_last_weights(ctx):
    vctx = replace(ctx, cfg=replace(ctx.cfg, select="val", val_fraction=0.2))
    state = tr.new_fold_state(vctx, 0)
    first = tr.checkpoint_dict(vctx, state, finished=False)
    assert first["selected_epoch"] is None and first["select"] == "val"
    for k, v in state.model.state_dict().items():  # no best yet: the current weights
        assert torch.equal(first["state_dict"][k], v) and torch.equal(first["resume"]["model"][k], v)
    best = {k: torch.zeros_like(v) for k, v in state.model.state_dict().items()}
    state.selector.update(1, 0.3, 0.9)
    state.best_state, state.epoch, state.val_history = best, 2, [[1.0, 0.3, 0.9]]
    ckpt = tr.checkpoint_dict(vctx, state, finished=False)
    assert ckpt["selected_epoch"] == 1 and ckpt["state_dict"] is best
    assert ckpt["resume"]["selector"] == {"best_epoch": 1, "best_acc": 0.9, "best_loss": 0.3}
    assert ckpt["resume"]["val_history"] == [[1.0, 0.3, 0.9]]
    for k, v in state.model.state_dict().items():
        assert torch.equal(ckpt["resume"]["model"][k], v)
    # restored: the selector, its best weights and the last weights come back
    again = tr.new_fold_state(vctx, 0)
    tr.restore_fold_state(vctx, again, ckpt)
    assert again.selector.state() == {"best_epoch": 1, "best_acc": 0.9, "best_loss": 0.3}
    assert again.best_state is best and again.val_history == [[1.0, 0.3, 0.9]]
    assert (again.epoch, again.status) == (2, "finalised")
    for k, v in state.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)
    tr.restore_fold_state(vctx, again, first)  # saved before any validation: no best weights yet
    assert again.best_state is None and again.selector.best_epoch is None


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # stepped by hand
@pytest.mark.parametrize(
    ("saved_epoch", "epochs", "status"), [(1, 2, "resumed"), (2, 2, "finalised"), (3, 2, "finalised")]
)
def test_a_restored_fold_continues_where_its_checkpoint_stopped(ctx, saved_epoch, epochs, status):
    state = tr.new_fold_state(ctx, 0)
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)
    state.optimizer.param_groups[0]["lr"] = 0.123
    state.scheduler.step()
    torch.randperm(5, generator=state.generator)
    state.epoch, state.history, state.epoch_seconds = saved_epoch, [[1, 2, 3, 4, 5]], [2]
    torch.manual_seed(99)
    ckpt = tr.checkpoint_dict(ctx, state, finished=False)
    torch.manual_seed(0)
    fresh = tr.new_fold_state(replace(ctx, cfg=replace(ctx.cfg, epochs=epochs)), 0)
    tr.restore_fold_state(replace(ctx, cfg=replace(ctx.cfg, epochs=epochs)), fresh, ckpt)
    assert torch.equal(torch.get_rng_state(), ckpt["resume"]["torch_rng"])  # dropout continues as it was
    assert (fresh.epoch, fresh.status) == (saved_epoch, status)
    assert fresh.history == [[1.0, 2.0, 3.0, 4.0, 5.0]] and type(fresh.history[0][0]) is float
    assert fresh.epoch_seconds == [2.0] and type(fresh.epoch_seconds[0]) is float and fresh.val_history == []
    for k, v in state.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v)
    assert fresh.optimizer.param_groups[0]["lr"] == 0.123 and fresh.scheduler.last_epoch == 1
    assert torch.equal(fresh.generator.get_state(), state.generator.get_state())


def test_restore_reads_older_checkpoints_without_optional_records(ctx):
    state = tr.new_fold_state(ctx, 0)
    state.epoch = 1
    ckpt = tr.checkpoint_dict(ctx, state, finished=False)
    for key in ("history", "val_history", "epoch_seconds", "model"):
        del ckpt["resume"][key]
    del ckpt["epoch"]
    fresh = tr.new_fold_state(ctx, 0)
    tr.restore_fold_state(ctx, fresh, ckpt)
    assert (fresh.history, fresh.val_history, fresh.epoch_seconds, fresh.epoch, fresh.status) == (
        [],
        [],
        [],
        0,
        "resumed",
    )


def test_start_fold_fresh_resumed_skipped_or_refused(ctx):
    from nodulekit.run import save_checkpoint

    state = tr.start_fold(ctx, 1)
    assert state.fold_dir.is_dir() and state.epoch == 0
    assert state.forward == state.model.training_forward and state.eval_model is state.model
    state.epoch = 2
    save_checkpoint(state.checkpoint_path, tr.checkpoint_dict(ctx, state, finished=True))
    resumed = tr.start_fold(ctx, 1)  # finished, but its result is missing: only the results are written
    assert not isinstance(resumed, dict) and (resumed.epoch, resumed.status) == (2, "finalised")
    state.result_path.write_bytes(b"")
    assert tr.start_fold(ctx, 1) == {"fold": 1, "status": "skipped", "epochs": 2, "epochs_run": 0, "selected_epoch": 2}
    longer = replace(ctx, cfg=replace(ctx.cfg, epochs=3))
    assert tr.start_fold(longer, 1).status == "resumed"
    state.epoch = 1
    save_checkpoint(state.checkpoint_path, tr.checkpoint_dict(ctx, state, finished=False))
    assert tr.start_fold(ctx, 1).status == "resumed"  # a result beside an unfinished checkpoint is not trusted
    other = replace(ctx, cfg=replace(ctx.cfg, arch="hesam"))
    with pytest.raises(
        NodulekitError,
        match=f"^{re.escape(str(state.checkpoint_path))} is a cam model for 1-channel input, not hesam for 1 "
        "channels; use a new -o RUNDIR or --overwrite$",
    ):
        tr.start_fold(other, 1)
    moved = replace(ctx, data=replace(ctx.data, y=1 - ctx.data.y))
    with pytest.raises(
        NodulekitError,
        match=f"^{re.escape(str(state.checkpoint_path))} was not trained on {re.escape(str(ctx.data.path))}: "
        "images or labels differ: .*; use a new -o RUNDIR or --overwrite$",
    ):
        tr.start_fold(moved, 1)


def test_training_forward_as_the_step_runs_it(monkeypatch):
    model = torch.nn.Linear(2, 2)
    model.training_forward = lambda batch: batch
    assert tr.training_forward(model, cfg_()) is model.training_forward
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn, kw)) or "compiled")
    assert tr.training_forward(model, cfg_(compile=True)) == "compiled"
    assert tr.training_forward(model, cfg_(cuda_graphs=True, last_batch="drop")) == "compiled"
    assert calls == [(model.training_forward, {}), (model.training_forward, {"mode": "reduce-overhead"})]


@pytest.mark.parametrize(("batch_size", "partial"), [(4, 2), (3, None), (5, None)])
def test_the_execution_probe_sees_the_shapes_training_uses(data, tmp_path, monkeypatch, batch_size, partial):
    """A training batch, the epoch's last partial batch when it trains (>= 2 rows), the first evaluation
    chunk; the workload is epochs x batches per epoch x folds steps."""
    from nodulekit import execution
    from nodulekit.run import build_model

    got = {}
    monkeypatch.setattr(execution, "choose_execution", lambda *a, **kw: got.update(args=a, kw=kw) or "choice")
    cfg = cfg_(epochs=3, batch_size=batch_size, eval_batch_size=6, lr=0.07)
    dd = tr._DeviceData(data, CPU)
    model = build_model("cam", 1, 2, OPTS)
    (tmp_path / "run.json").write_text("{}")
    choice, watched = tr._choose_execution(model, data, cfg, dd, [0, 1], {"variant": "fp32"}, tmp_path)
    assert choice == "choice"
    model_, example, device, amp, channels_last = got["args"]
    train_rows = np.flatnonzero(data.fold != 0)  # fold 0 trains on 10 rows
    assert model_ is model and device == CPU and (amp, channels_last) == ("auto", "auto")
    assert example["index"].tolist() == train_rows[:batch_size].tolist() and example["x"].shape[0] == batch_size
    kw = got["kw"]
    labels = [(label, len(b["x"]), kind) for label, b, kind in kw["extra"]]
    assert labels == ([("last partial batch", partial, "step")] if partial else []) + [("evaluation batch", 6, "eval")]
    torch.testing.assert_close(kw["extra"][-1][1]["x"], torch.from_numpy(data.x[np.flatnonzero(data.fold == 0)[:6]]))
    assert kw["workload_steps"] == 3 * -(-10 // batch_size) * 2
    assert kw["loss_fn"] is tr.probe_loss and kw["lr"] == 0.07 and kw["recorded"] == {"variant": "fp32"}
    assert kw["isolate"] is True and kw["convert_input"] is False and kw["rundir"] == tmp_path
    assert watched == {"machine": execution.machine_key(CPU), "workload": execution.workload_key(model, example)}
    (tmp_path / "run.json").unlink()
    tr._choose_execution(model, data, cfg, dd, [1], None, tmp_path)
    assert got["kw"]["rundir"] is None and got["kw"]["workload_steps"] == 3 * -(-10 // batch_size)


def test_a_model_that_cannot_train_side_by_side_says_why(capsys):
    from nodulekit.recipes import resolve_recipe

    run = {"in_channels": 1}
    assert tr._side_by_side_possible(cfg_(), run, None) is True
    assert capsys.readouterr().err == ""
    assert tr._side_by_side_possible(cfg_(recipe=resolve_recipe("paper")), run, None) is True
    other = resolve_recipe("paper", {"weight_decay": 5e-4})
    assert tr._side_by_side_possible(cfg_(recipe=other), run, None) is False
    assert capsys.readouterr().err == (
        f"nodulekit: recipe {other.name} has no side-by-side implementation; its folds train one after another\n"
    )
    dropout = cfg_(arch="vgg16", model_options={"base_width": 4, "fc_width": 8})
    assert tr._side_by_side_possible(dropout, run, None) is False
    assert capsys.readouterr().err.startswith("nodulekit: vgg16 draws random numbers in training (Dropout)")


def test_write_result_records_the_fold_with_its_provenance(data, tmp_path):
    from nodulekit.run import read_fold_result

    split = tr.fold_split(data, 1, cfg_(select="val", val_fraction=0.2))
    cfg = cfg_(select="val", val_fraction=0.2, epochs=3)
    run = {"arch": "cam", "model_options": OPTS, "seed": 11, "n_folds": 2, "dataset_fingerprint": "f", "other": 1}
    prob = np.linspace(0.1, 0.9, len(split.test_index))
    history = [[1, 0.7, 0.5, 0.6, 0.4], [2, 0.6, 0.6, 0.5, 0.5], [3, 0.5, 0.7, 0.4, 0.6]]
    path = tr.write_result(
        tmp_path / "result.h5", data=data, split=split, cfg=cfg, run=run, history=history,
        val_history=[[1, 0.6, 0.5], [2, 0.5, 0.6], [3, 0.4, 0.7]], epoch_seconds=[0.5, 0.25, 0.125], test_prob=prob,
        selected_epoch=None, device=CPU, amp=True,
    )  # fmt: skip
    res = read_fold_result(path, 1)
    assert res.history.tolist() == history and res.val_history[:, 0].tolist() == [1, 2, 3]
    assert res.test_index.tolist() == split.test_index.tolist() and res.test_prob.tolist() == prob.tolist()
    assert res.test_y.tolist() == data.y[split.test_index].tolist()
    assert res.test_nodule_id == list(data.nodule_id[split.test_index])
    assert res.test_patient_id == list(data.patient_id[split.test_index])
    assert res.train_index.tolist() == split.train_index.tolist()
    assert res.val_index.tolist() == split.val_index.tolist() and res.epoch_seconds.tolist() == [0.5, 0.25, 0.125]
    import h5py

    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    assert "execution" not in attrs
    assert (attrs["fold"], attrs["arch"], attrs["dataset_name"], attrs["select"]) == (1, "cam", "D1C", "val")
    assert (attrs["selected_epoch"], attrs["epochs"]) == (-1, 3)  # no best epoch: -1
    assert json.loads(attrs["run"]) == {
        k: run[k] for k in ("arch", "model_options", "seed", "n_folds", "dataset_fingerprint")
    }
    prov = json.loads(attrs["provenance"])
    assert {k: prov[k] for k in ("stage", "arch", "fold", "seed", "dataset", "device", "amp", "select", "selected_epoch")} == {
        "stage": "train", "arch": "cam", "fold": 1, "seed": 11, "dataset": str(data.path), "device": "cpu", "amp": True,
        "select": "val", "selected_epoch": None,
    }  # fmt: skip
    assert prov["dataset_fingerprint"] == data.fingerprint and prov["dataset_identity"] == data.identity
    assert prov["label_rule"] == data.label_rule and prov["versions"] == tr._versions()
    choice = default_execution(CPU)
    tr.write_result(
        tmp_path / "r2.h5", data=data, split=split, cfg=cfg, run=run, history=history,
        val_history=[[1, 0.6, 0.5]] * 3, epoch_seconds=None, test_prob=prob, selected_epoch=np.int64(2), device=CPU,
        amp=False, execution=choice,
    )  # fmt: skip
    with h5py.File(tmp_path / "r2.h5", "r") as f:
        assert json.loads(f.attrs["execution"]) == choice.as_dict() and f.attrs["selected_epoch"] == 2
