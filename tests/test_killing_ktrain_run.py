"""One tiny cross-validation run (2 folds, 2 epochs, 4 rows a batch) checked against the paper's loop
written out here step by step, and what it leaves: the summaries, the progress bars, each fold's
result.h5 (predictions recomputed from the checkpoint) and its resume at and after the last epoch."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nodulekit import training as tr
from nodulekit.training import TrainConfig
from tests.conftest import write_tiny_dataset

CFG = dict(arch="cam", model_options={"base_width": 4}, epochs=2, batch_size=4, lr=0.05, device="cpu", seed=5)


class FakeBar:
    """tqdm's interface as train_fold uses it, recording what a reader would see."""

    made: list = []

    def __init__(self, **kw):
        self.kw, self.postfix, self.updates, self.closed = kw, [], 0, False
        FakeBar.made.append(self)

    def set_postfix(self, values):
        self.postfix.append(values)

    def update(self, n):
        self.updates += n

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import tqdm.auto

    folder = tmp_path_factory.mktemp("run")
    dataset = write_tiny_dataset(folder / "d1c.h5", n=20, channels=1, folds=2)
    epochs_seen, chosen = [], []
    FakeBar.made = []
    torch.manual_seed(123)
    callers_rng = torch.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tqdm.auto, "tqdm", FakeBar)
        out = tr.train(
            dataset, folder / "run", TrainConfig(**CFG), on_epoch_end=lambda *a: epochs_seen.append(a), progress=True,
            on_execution=chosen.append,
        )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), callers_rng)  # training seeds itself, the caller's state is kept
    assert chosen == [out["execution"]]
    return dataset, folder / "run", out, epochs_seen, list(FakeBar.made)


def paper_loop(dataset, fold):
    """The paper's training of one fold written out: seeded from (seed, fold), SGD with momentum 0.9 and
    weight decay 1e-4, step schedule, cross-entropy; per epoch the batch-size-weighted mean loss and accuracy."""
    from nodulekit.datasets import load_dataset
    from nodulekit.run import build_model

    data = load_dataset(dataset)
    seed = tr.fold_seed(CFG["seed"], fold)
    torch.manual_seed(seed)
    model = build_model("cam", 1, 2, CFG["model_options"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_rows = np.flatnonzero(data.fold != fold)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    rows = []
    for _ in range(2):
        model.train()
        order = torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=gen)]
        ce_sum, right, seen = 0.0, 0, 0
        for start in range(0, len(order), 4):
            idx = order[start : start + 4]
            if len(idx) < 2:
                continue
            batch = {"x": x[idx], "y": y[idx], "index": idx, "mask": torch.from_numpy(data.mask[idx.numpy()]),
                     "characteristics": torch.from_numpy(data.characteristics[idx.numpy()])}  # fmt: skip
            logits, aux = model.training_forward(batch)
            ce = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            (ce + aux).backward()
            opt.step()
            ce_sum += float(ce.detach()) * len(idx)
            right += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        sched.step()
        rows.append((ce_sum / seen, right / seen))
    return model, rows


def test_a_fold_trains_as_the_papers_loop_written_out(run):
    dataset, rundir, _, _, _ = run
    model, rows = paper_loop(dataset, 1)
    with h5py.File(rundir / "fold1" / "result.h5", "r") as f:
        history = f["history"][()]
    assert history[:, 0].tolist() == [1.0, 2.0]
    np.testing.assert_allclose(history[:, 1:3], np.array(rows), rtol=1e-4, atol=1e-6)
    ckpt = torch.load(rundir / "fold1" / "checkpoint.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_the_runs_summary_and_the_callbacks(run):
    _, rundir, out, epochs_seen, _ = run
    assert out["rundir"] == str(rundir) and out["run"] == json.loads((rundir / "run.json").read_text())
    assert out["execution"]["how"] == "default" and out["execution"]["variant"] == "fp32"
    assert (
        out["execution"]["reason"] == "not probed: 12 steps of work, fewer than 240"
    )  # 2 epochs x 3 batches x 2 folds
    assert [s["fold"] for s in out["folds"]] == [0, 1]
    for s in out["folds"]:
        assert set(s) == {"fold", "status", "epochs", "epochs_run", "selected_epoch", "test_acc", "test_loss"}
        assert (s["status"], s["epochs"], s["epochs_run"], s["selected_epoch"]) == ("trained", 2, 2, 2)
    assert [(f, e, sorted(m)) for f, e, m in epochs_seen] == [
        (f, e, ["epoch", "train_acc", "train_loss"]) for f in (0, 1) for e in (1, 2)
    ]
    assert all(m["epoch"] == e for _, e, m in epochs_seen)
    from nodulekit.run import build_model

    assert out["run"]["model_options"] == dict(build_model("cam", 1, 2, {"base_width": 4}).config)


def test_each_folds_progress_bar(run):
    *_, bars = run
    assert [b.kw for b in bars] == [
        {"total": 2, "initial": 0, "desc": f"cam fold {k}", "unit": "epoch", "leave": True} for k in (0, 1)
    ]
    for b in bars:
        assert b.updates == 2 and b.closed and len(b.postfix) == 2
        assert list(b.postfix[0]) == ["train_loss", "train_acc"]
        assert all(len(v.split(".")[1]) == 3 for v in b.postfix[0].values())  # three decimals


def test_result_predictions_are_the_checkpoints_model_on_the_test_fold(run):
    from nodulekit.datasets import load_dataset
    from nodulekit.run import build_model, read_fold_result

    dataset, rundir, out, _, _ = run
    data = load_dataset(dataset)
    for fold in (0, 1):
        res = read_fold_result(rundir / f"fold{fold}" / "result.h5", fold)
        ckpt = torch.load(rundir / f"fold{fold}" / "checkpoint.pt", weights_only=True)
        assert ckpt["finished"] is True and ckpt["epoch"] == 2 and ckpt["selected_epoch"] == 2
        model = build_model("cam", 1, 2, {"base_width": 4})
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        test = np.flatnonzero(data.fold == fold)
        with torch.no_grad():
            logits = model(torch.from_numpy(data.x[test]))
        prob = torch.softmax(logits, 1)[:, 1].numpy()
        np.testing.assert_allclose(res.test_prob, prob, rtol=1e-5, atol=1e-6)
        assert res.test_index.tolist() == test.tolist() and res.test_y.tolist() == data.y[test].tolist()
        assert res.train_index.tolist() == np.flatnonzero(data.fold != fold).tolist() and res.val_index is None
        assert res.test_nodule_id == list(data.nodule_id[test]) and res.test_patient_id == list(data.patient_id[test])
        assert res.selected_epoch == 2 and res.epochs == 2 and len(res.epoch_seconds) == 2
        assert all(t > 0 for t in res.epoch_seconds)
        summary = out["folds"][fold]
        loss = float(F.cross_entropy(logits, torch.from_numpy(data.y[test])))
        assert summary["test_loss"] == pytest.approx(loss, rel=1e-5)
        assert summary["test_acc"] == pytest.approx(float(((prob > 0.5) == data.y[test]).mean()))
        # the learning curve's last test point is the reported model (select=last)
        assert res.history[-1, 3] == pytest.approx(loss, rel=1e-5)
        assert res.history[-1, 4] == pytest.approx(summary["test_acc"])


def test_result_attributes_and_provenance(run):
    from nodulekit.datasets import load_dataset

    dataset, rundir, out, _, _ = run
    data = load_dataset(dataset)
    with h5py.File(rundir / "fold1" / "result.h5", "r") as f:
        attrs = dict(f.attrs)
    prov = json.loads(attrs["provenance"])
    assert (attrs["fold"], attrs["arch"], attrs["dataset_name"], attrs["select"]) == (1, "cam", "D1C", "last")
    assert (attrs["selected_epoch"], attrs["epochs"]) == (2, 2)
    assert json.loads(attrs["label_rule"]) == data.label_rule
    assert json.loads(attrs["dataset_identity"]) == data.identity
    assert json.loads(attrs["run"]) == {
        "arch": "cam",
        "model_options": out["run"]["model_options"],
        "seed": 5,
        "n_folds": 2,
        "dataset_fingerprint": data.fingerprint,
    }
    assert json.loads(attrs["execution"]) == out["execution"]
    assert {k: prov[k] for k in ("stage", "arch", "fold", "seed", "dataset", "device", "amp", "select")} == {
        "stage": "train",
        "arch": "cam",
        "fold": 1,
        "seed": 5,
        "dataset": str(dataset),
        "device": "cpu",
        "amp": False,
        "select": "last",
    }
    assert prov["selected_epoch"] == 2 and prov["dataset_fingerprint"] == data.fingerprint
    assert prov["dataset_identity"] == data.identity and prov["label_rule"] == data.label_rule
    assert prov["versions"] == tr._versions()


def test_rerun_skips_finished_folds_and_finalises_one_whose_result_is_missing(run, tmp_path):
    from nodulekit.run import read_fold_result

    dataset, rundir, _, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(rundir, copy)
    before = read_fold_result(copy / "fold1" / "result.h5", 1).test_prob
    (copy / "fold1" / "result.h5").unlink()
    out = tr.train(dataset, copy, TrainConfig(**CFG), progress=False)
    assert out["folds"][0] == {"fold": 0, "status": "skipped", "epochs": 2, "epochs_run": 0, "selected_epoch": 2}
    finalised = out["folds"][1]
    assert (finalised["status"], finalised["epochs"], finalised["epochs_run"]) == ("finalised", 2, 0)
    np.testing.assert_array_equal(read_fold_result(copy / "fold1" / "result.h5", 1).test_prob, before)
    # one fold asked for: only it is reported
    again = tr.train(dataset, copy, TrainConfig(**CFG), folds=[1], n_folds=2, progress=False)
    assert [s["fold"] for s in again["folds"]] == [1] and again["folds"][0]["status"] == "skipped"


def test_a_fold_count_that_does_not_match_the_dataset_is_refused(run, tmp_path):
    from nodulekit.errors import NodulekitError

    dataset, *_ = run
    with pytest.raises(NodulekitError, match=f"^--folds 3 does not match {dataset}, which was split into 2 folds$"):
        tr.train(dataset, tmp_path / "r", TrainConfig(**CFG), n_folds=3, progress=False)
    assert not (tmp_path / "r").exists()


def test_folds_side_by_side_give_the_same_folds_bars_and_callbacks(run, tmp_path):
    """--concurrent-folds: the same checkpoints and predictions as the folds trained in turn (float32
    rounding apart), one bar per fold labelled as side by side, the same callbacks."""
    import tqdm.auto

    from nodulekit.run import read_fold_result

    dataset, rundir, _, epochs_seen, _ = run
    seen = []
    FakeBar.made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tqdm.auto, "tqdm", FakeBar)
        out = tr.train(
            dataset, tmp_path / "run", TrainConfig(**CFG, concurrent_folds=True), on_epoch_end=lambda *a: seen.append(a)
        )
    assert [b.kw for b in FakeBar.made] == [
        {"total": 2, "initial": 0, "desc": f"cam fold {k} (side by side)", "unit": "epoch", "leave": True,
         "position": k}
        for k in (0, 1)
    ]  # fmt: skip
    assert all(b.updates == 2 and b.closed and list(b.postfix[-1]) == ["train_loss", "train_acc"] for b in FakeBar.made)
    assert sorted((f, e) for f, e, _ in seen) == sorted((f, e) for f, e, _ in epochs_seen)
    for (f, e, m), (f2, e2, m2) in zip(sorted(seen, key=lambda a: a[:2]), epochs_seen, strict=True):
        assert m["epoch"] == e and m == pytest.approx(m2, rel=1e-4)
    assert [s["status"] for s in out["folds"]] == ["trained", "trained"]
    for fold in (0, 1):
        mine = read_fold_result(tmp_path / "run" / f"fold{fold}" / "result.h5", fold)
        theirs = read_fold_result(rundir / f"fold{fold}" / "result.h5", fold)
        np.testing.assert_allclose(mine.test_prob, theirs.test_prob, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mine.history[:, :5], theirs.history[:, :5], rtol=1e-4, atol=1e-5)


def test_overwriting_one_fold_keeps_the_others(run, tmp_path):
    """--fold 1 --overwrite retrains fold 1 only; fold 0's finished work stays."""
    dataset, rundir, _, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(rundir, copy)
    kept = (copy / "fold0" / "result.h5").read_bytes()
    out = tr.train(dataset, copy, TrainConfig(**CFG), folds=[1], overwrite=True, progress=False)
    assert [(s["fold"], s["status"], s["epochs_run"]) for s in out["folds"]] == [(1, "trained", 2)]
    assert (copy / "fold0" / "result.h5").read_bytes() == kept
    assert (copy / "fold0" / "checkpoint.pt").exists()


def test_every_diverged_fold_is_named_after_the_others_ran(run, tmp_path):
    dataset, *_ = run
    with pytest.raises(tr.TrainingDiverged) as err:
        tr.train(dataset, tmp_path / "run", TrainConfig(**(CFG | {"epochs": 1, "lr": 1e30})), progress=False)
    parts = str(err.value).split(" | ")
    assert len(parts) == 2 and parts[0].startswith("fold 0 ") and parts[1].startswith("fold 1 ")
    assert all("; try a lower --lr" in p for p in parts)
    assert not list((tmp_path / "run").glob("fold*/result.h5"))
