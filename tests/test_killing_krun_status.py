"""`nodulekit status` record by record: every key of a fold's row, every state a fold can be in
(finished, running here or on another host, interrupted with or without a stale claim, crashed,
missing), and the table's exact text, on hand-made RUNDIRs whose answer is known."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
from conftest import fake_identity

from nodulekit import claims, crashes
from nodulekit.artifacts import provenance
from nodulekit.errors import NodulekitError
from nodulekit.run import save_checkpoint, write_fold_result, write_run_json
from nodulekit.status import STATES, all_finished, run_status, status_table

HOST = socket.gethostname()


def _result(rundir, k, epochs):
    (rundir / f"fold{k}").mkdir(parents=True, exist_ok=True)
    write_fold_result(
        rundir / f"fold{k}" / "result.h5",
        prov=provenance(),
        history=np.zeros((epochs, 5)),
        test_index=[2 * k, 2 * k + 1],
        test_prob=[0.25, 0.75],
        test_y=[0, 1],
        test_nodule_id=[f"P{k}:1", f"P{k}:2"],
        attrs={"epochs": epochs, "fold": k, "dataset_identity": fake_identity()},
    )


def _checkpoint(rundir, k, epoch):
    (rundir / f"fold{k}").mkdir(parents=True, exist_ok=True)
    save_checkpoint(rundir / f"fold{k}" / "checkpoint.pt", {"epoch": epoch})


def _claim(fold_dir, host, pid, started="t0", age_s=0.0):
    fold_dir.mkdir(parents=True, exist_ok=True)
    path = fold_dir / claims.CLAIM_FILE
    record = {"host": host, "pid": pid, "started": started}
    if host == HOST:  # checkable here: same boot and PID namespace
        record.update(boot_id=claims.boot_id(), pid_ns=claims.pid_namespace())
    path.write_text(json.dumps(record))
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))


def _dead_watch(rundir, folds, *, fault=None, started="2026-01-01T00:00:00+00:00", name="a"):
    folder = rundir / crashes.WATCH_DIR
    folder.mkdir(exist_ok=True)
    header = {"pid": 4242, "host": "node7", "started": started, "variant": "bf16"}
    lines = ["nodulekit-watch " + json.dumps(header), "training folds " + json.dumps(folds)]
    if fault:
        lines += [f"Fatal Python error: {fault}", "", "Current thread 0x01 (most recent call first):", '  File "x.py"']
    path = folder / f"{name}.log"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def rundir(tmp_path):
    """Five folds of 3 epochs: 0 finished, 1 checkpoint at epoch 2, 2 nothing, 3 result of 1 epoch, 4 nothing."""
    run = tmp_path / "run"
    run.mkdir()
    write_run_json(run, {"arch": "cam", "n_folds": 5, "epochs": 3, "dataset": "d.h5"})
    _result(run, 0, epochs=3)
    _checkpoint(run, 0, 3)
    _checkpoint(run, 1, 2)
    _result(run, 3, epochs=1)
    _checkpoint(run, 3, 1)
    return run


def _by_fold(rows):
    return {r["fold"]: r for r in rows}


def test_every_key_of_every_row_without_claims(rundir):
    rows = run_status(rundir)
    assert [r["fold"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == {"rundir": str(rundir), "fold": 0, "state": "finished", "epochs_done": 3, "epochs": 3,
                       "claim": None, "note": ""}  # fmt: skip
    assert rows[1] == {"rundir": str(rundir), "fold": 1, "state": "interrupted", "epochs_done": 2, "epochs": 3,
                       "claim": None, "note": ""}  # fmt: skip
    assert rows[2] == {"rundir": str(rundir), "fold": 2, "state": "missing", "epochs_done": 0, "epochs": 3,
                       "claim": None, "note": ""}  # fmt: skip
    # a result of fewer epochs than run.json asks for is not finished: the run was extended
    assert rows[3]["state"] == "interrupted" and rows[3]["epochs_done"] == 1
    assert not all_finished(rows)
    assert all_finished([rows[0], rows[0]]) and all_finished([])


def test_a_live_claim_here_is_running_and_a_dead_one_is_a_stale_note(rundir):
    mine = claims.acquire(rundir / "fold1")  # this process: alive
    _claim(rundir / "fold3", HOST, pid=2**22 + 12345)  # a PID no process has here
    rows = _by_fold(run_status(rundir))
    assert rows[1]["state"] == "running"
    assert rows[1]["note"] == f"pid {os.getpid()} on {HOST} since {mine.started}"
    assert rows[1]["claim"]["pid"] == os.getpid() and rows[1]["claim"]["token"] == mine.token
    assert rows[3]["state"] == "interrupted"
    assert rows[3]["note"] == f"stale claim: pid {2**22 + 12345} on {HOST} since t0 is not running"
    assert rows[3]["claim"] is None
    # a claim on a missing fold: running when live, else still missing (no stale note)
    _claim(rundir / "fold4", HOST, pid=2**22 + 12345)
    assert _by_fold(run_status(rundir))[4] == {**rows[4], "note": ""}
    claims.acquire(rundir / "fold2")
    assert _by_fold(run_status(rundir))[2]["state"] == "running"
    # a finished fold stays finished whatever its claim says
    claims.acquire(rundir / "fold0")
    assert _by_fold(run_status(rundir))[0]["state"] == "finished"


def test_a_fresh_claim_on_another_host_is_running_unchecked_and_a_silent_one_is_stale(rundir):
    _claim(rundir / "fold1", "other-node", pid=77, started="s1")
    row = _by_fold(run_status(rundir))[1]
    assert row["state"] == "running"
    assert row["note"] == "pid 77 on other-node since s1 (other host: not checked)"
    assert row["claim"]["host"] == "other-node" and row["claim"]["pid"] == 77
    _claim(rundir / "fold1", "other-node", pid=77, started="s1", age_s=claims.STALE_S + 60)
    row = _by_fold(run_status(rundir))[1]
    assert row["state"] == "interrupted"
    assert row["note"] == "stale claim: pid 77 on other-node since s1 is not running"


def test_dead_watches_make_interrupted_and_missing_folds_crashed_only(rundir):
    path = _dead_watch(rundir, [1, 2], fault="Aborted")
    _dead_watch(rundir, [0], fault="Segmentation fault", name="b")  # fold 0 finished later: stays finished
    rows = _by_fold(run_status(rundir))
    note = f"SIGABRT in native code with bf16 (pid 4242 on node7, started 2026-01-01T00:00:00+00:00; see {path})"
    assert rows[1]["state"] == "crashed" and rows[1]["note"] == note
    assert rows[2]["state"] == "crashed" and rows[2]["note"] == note
    assert rows[0]["state"] == "finished" and rows[0]["note"] == ""
    assert rows[3]["state"] == "interrupted" and rows[4]["state"] == "missing"  # no watch names them
    claims.acquire(rundir / "fold1")  # trained again now: running wins over the old crash
    assert _by_fold(run_status(rundir))[1]["state"] == "running"


def test_a_watch_without_a_fault_is_a_kill(rundir):
    _dead_watch(rundir, [4], started="s2")
    row = _by_fold(run_status(rundir))[4]
    assert row["state"] == "crashed"
    assert (
        row["note"]
        == "killed without a fault message (SIGKILL, out of memory or a stop; pid 4242 on node7, started s2)"
    )


def test_an_empty_folder_is_one_missing_row_and_an_absent_one_an_error(tmp_path):
    assert run_status(tmp_path) == [{"rundir": str(tmp_path), "fold": None, "state": "missing", "epochs_done": 0,
                                     "epochs": None, "claim": None, "note": "not started"}]  # fmt: skip
    with pytest.raises(NodulekitError) as err:
        run_status(tmp_path / "nope")
    assert str(err.value) == f"{tmp_path / 'nope'} does not exist"
    (tmp_path / "x").write_text("")  # not empty, no run.json: the Run reader's refusal
    with pytest.raises(NodulekitError, match="no run.json"):
        run_status(tmp_path)


def test_the_table_text_aligns_columns_and_counts_states():
    rows = [
        {"rundir": "runs/a", "fold": 0, "state": "finished", "epochs_done": 12, "epochs": 12, "note": ""},
        {"rundir": "runs/a", "fold": 10, "state": "crashed", "epochs_done": 3, "epochs": 12, "note": "SIGSEGV x"},
        {"rundir": "runs/a", "fold": 2, "state": "missing", "epochs_done": 0, "epochs": 12, "note": None},
        {"rundir": "r", "fold": None, "state": "missing", "epochs_done": 0, "epochs": None, "note": "not started"},
    ]
    assert status_table(rows).split("\n") == [
        "RUNDIR  fold  state     epochs  note",
        "runs/a     0  finished   12/12",
        "runs/a    10  crashed     3/12  SIGSEGV x",
        "runs/a     2  missing     0/12",
        "r          -  missing        -  not started",
        "1 finished, 1 crashed, 2 missing",
    ]
    assert status_table([]) == "RUNDIR  fold  state  epochs  note\nno folds"
    assert STATES == ("finished", "running", "crashed", "interrupted", "missing")


def test_the_summary_lists_states_in_the_documented_order():
    rows = [{"rundir": "r", "fold": k, "state": s, "epochs_done": 0, "epochs": 1, "note": ""}
            for k, s in enumerate(["missing", "interrupted", "running", "crashed", "finished", "running"])]  # fmt: skip
    assert status_table(rows).splitlines()[-1] == "1 finished, 2 running, 1 crashed, 1 interrupted, 1 missing"
