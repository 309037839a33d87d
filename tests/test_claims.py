"""Fold claims (one job per fold, stale claims taken over) and `nodulekit status`, with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_tiny_dataset

from nodulekit import claims
from nodulekit.claims import CLAIM_FILE, FoldClaimed
from nodulekit.status import run_status

torch.set_num_threads(1)
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
TRAIN_OPTS = ["--arch", "cam", "--model-opt", "base_width=4", "--lr", "0.01", "--device", "cpu", "--no-progress"]


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def dead_claim(pid: int) -> str:
    """The record of a claim made on this machine (same boot and PID namespace) by process ``pid``."""
    record = dict(claims.this_process().__dict__, pid=pid, pid_start=None, started="t0")
    del record["touched"]
    return json.dumps(record)


def a_dead_pid() -> int:
    return int(subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def holder_process(fold_dir: Path) -> subprocess.Popen:
    """A separate process that claims ``fold_dir`` and then sleeps until killed."""
    code = f"from nodulekit import claims; import time; claims.acquire({str(fold_dir)!r}); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([PY, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def nodulekit(nodulekit_cli, *args, check_rc: int | None = None) -> subprocess.CompletedProcess:
    """``nodulekit ARGS`` in this process (``nodulekit_cli``: conftest's fixture); the job it
    contends with is another process."""
    out = nodulekit_cli(*args)
    if check_rc is not None:
        assert out.returncode == check_rc, out.stderr
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ds") / "d1c.h5", n=40, channels=1, folds=5)


def test_claim_records_who_and_a_live_claim_from_another_process_is_refused(tmp_path):
    fold_dir = tmp_path / "fold0"
    proc = holder_process(fold_dir)
    try:
        record = json.loads((fold_dir / CLAIM_FILE).read_text())
        assert record["pid"] == proc.pid and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(FoldClaimed, match=f"being trained by another job \\(pid {proc.pid} on "):
            claims.acquire(fold_dir)
        assert claims.live_claim(fold_dir).pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_stale_claim_of_a_killed_process_is_taken_over_and_said(tmp_path, capsys):
    fold_dir = tmp_path / "fold0"
    proc = holder_process(fold_dir)
    proc.send_signal(signal.SIGKILL)  # the claim file stays behind, like after a node crash
    proc.wait()
    assert claims.read_claim(fold_dir).pid == proc.pid and claims.live_claim(fold_dir) is None
    mine = claims.acquire(fold_dir)
    assert mine.pid == os.getpid() and claims.read_claim(fold_dir) == mine
    err = capsys.readouterr().err
    assert f"taking over {fold_dir / CLAIM_FILE}: its job (pid {proc.pid} on" in err
    claims.release(fold_dir, mine)
    assert not (fold_dir / CLAIM_FILE).exists()


def test_recycled_pid_and_foreign_host(tmp_path):
    fold_dir = tmp_path / "fold0"
    fold_dir.mkdir()
    # our own (live) PID, but a different process start tick: the PID was recycled, the claim is stale
    me = claims.this_process()
    assert me.pid_start is not None and me.alive() is True
    (fold_dir / CLAIM_FILE).write_text(json.dumps(dict(me.__dict__, pid_start="1")))
    assert claims.read_claim(fold_dir).alive() is False
    # another host's claim cannot be checked: respected, and the refusal says what to delete
    (fold_dir / CLAIM_FILE).write_text(json.dumps({"host": "node-x", "pid": 1, "started": "t0"}))
    with pytest.raises(
        FoldClaimed,
        match=f"pid 1 on node-x since t0\\); it is taken over once untouched for 10 min, or delete {fold_dir}",
    ):
        claims.acquire(fold_dir)
    # a damaged claim file holds nothing
    (fold_dir / CLAIM_FILE).write_text("{")
    assert claims.live_claim(fold_dir) is None


def test_racing_takeovers_have_exactly_one_winner(tmp_path):
    fold_dir = tmp_path / "fold0"
    fold_dir.mkdir()
    (fold_dir / CLAIM_FILE).write_text(dead_claim(a_dead_pid()))
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, time
        from nodulekit import claims
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        try:
            claims.acquire({str(fold_dir)!r})
            print("won", flush=True)
            time.sleep(600)
        except claims.FoldClaimed:
            print("refused", flush=True)
    """)
    procs = [subprocess.Popen([PY, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        time.sleep(1.0)  # let them all import and wait
        go.touch()
        results = [p.stdout.readline().strip() for p in procs]
        assert sorted(results) == ["refused"] * 3 + ["won"]
        winner = procs[results.index("won")]
        assert claims.read_claim(fold_dir).pid == winner.pid
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_second_train_on_a_claimed_fold_refuses_in_one_line(ds, tmp_path, nodulekit_cli):
    """Job A trains fold 0 and is held inside training; job B on fold 0 refuses; A still finishes."""
    rundir, release = tmp_path / "run", tmp_path / "release"
    code = textwrap.dedent(f"""
        import os, time
        from nodulekit.training import TrainConfig, train
        def hold(fold, epoch, metrics):
            print("epoch", epoch, flush=True)
            while not os.path.exists({str(release)!r}):
                time.sleep(0.02)
        cfg = TrainConfig(arch="cam", model_options={{"base_width": 4}}, epochs=1, lr=0.01, device="cpu")
        train({str(ds)!r}, {str(rundir)!r}, cfg, folds=[0], progress=False, on_epoch_end=hold)
        print("done", flush=True)
    """)
    job_a = subprocess.Popen([PY, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert job_a.stdout.readline().strip() == "epoch 1"  # A holds fold 0's claim now
        job_b = nodulekit(
            nodulekit_cli, "train", ds, "-o", rundir, "--fold", "0", "--epochs", "1", *TRAIN_OPTS, check_rc=2
        )
        lines = job_b.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0] == (
            f"nodulekit: error: {rundir / 'fold0'} is being trained by another job "
            f"(pid {job_a.pid} on {socket.gethostname()} since {claims.read_claim(rundir / 'fold0').started})"
        )
        rows = run_status(rundir)
        assert [r["state"] for r in rows] == ["running", "missing", "missing", "missing", "missing"]
        assert rows[0]["claim"]["pid"] == job_a.pid
        # B on another fold is not blocked by A
        nodulekit(nodulekit_cli, "train", ds, "-o", rundir, "--fold", "1", "--epochs", "1", *TRAIN_OPTS, check_rc=0)
        release.touch()
        assert job_a.stdout.readline().strip() == "done" and job_a.wait() == 0
    finally:
        job_a.kill()
        job_a.wait()
    assert not (rundir / "fold0" / CLAIM_FILE).exists()  # released after training
    rows = run_status(rundir)
    assert [(r["state"], r["epochs_done"]) for r in rows[:2]] == [("finished", 1), ("finished", 1)]


def test_status_states_and_exit_codes(ds, tmp_path, run_cli):
    from nodulekit.training import TrainConfig, train

    rundir = tmp_path / "run"
    cfg = TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=2, lr=0.01, device="cpu")
    train(ds, rundir, cfg, folds=[0, 1, 2, 3, 4], progress=False)
    rc, out, _ = run_cli("status", rundir)
    assert rc == 0 and out.strip().splitlines()[-1] == "5 finished"

    # fold 3 interrupted after its first epoch (Ctrl-C): its checkpoint says 1 of 2 epochs
    def stop(fold, epoch, metrics):
        raise KeyboardInterrupt

    (rundir / "fold3" / "result.h5").unlink()
    (rundir / "fold3" / "checkpoint.pt").unlink()
    (rundir / "fold4" / "result.h5").unlink()
    (rundir / "fold4" / "checkpoint.pt").unlink()
    with pytest.raises(KeyboardInterrupt):
        train(ds, rundir, cfg, folds=[3], progress=False, on_epoch_end=stop)
    # fold 2: a stale claim left by a dead process over a finished fold changes nothing
    (rundir / "fold2" / CLAIM_FILE).write_text(dead_claim(a_dead_pid()))
    # fold 1 is being trained again from scratch by a live job
    (rundir / "fold1" / "result.h5").unlink()
    (rundir / "fold1" / "checkpoint.pt").unlink()
    holder = holder_process(rundir / "fold1")
    try:
        rc, out, _ = run_cli("status", rundir, "--json")
        rc_table, table, _ = run_cli("status", rundir)
    finally:
        holder.kill()
        holder.wait()
    assert rc == rc_table == 3
    rows = {(Path(r["rundir"]).name, r["fold"]): r for r in json.loads(out)}
    assert rows["run", 0]["state"] == "finished" and rows["run", 0]["epochs_done"] == 2
    assert rows["run", 1]["state"] == "running" and rows["run", 1]["claim"]["pid"] == holder.pid
    assert rows["run", 2]["state"] == "finished"
    assert (rows["run", 3]["state"], rows["run", 3]["epochs_done"]) == ("interrupted", 1)
    assert (rows["run", 4]["state"], rows["run", 4]["epochs_done"]) == ("missing", 0)
    # the table shows the same, one line per fold and a count
    table = table.splitlines()
    assert "running" in table[2] and f"pid {holder.pid}" in table[2]
    assert "interrupted" in table[4] and "1/2" in table[4]
    assert table[-1] == "2 finished, 1 running, 1 interrupted, 1 missing"

    # a finished run extended to more epochs is not finished any more
    run_json = json.loads((rundir / "run.json").read_text())
    (rundir / "run.json").write_text(json.dumps(dict(run_json, epochs=3)))
    rc, out, _ = run_cli("status", rundir, "--json")
    rows = json.loads(out)
    assert rc == 3 and (rows[0]["state"], rows[0]["epochs_done"], rows[0]["epochs"]) == ("interrupted", 2, 3)


def test_status_bad_input_is_one_line(tmp_path, run_cli):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    rc, _, err = run_cli("status", tmp_path / "junk")
    assert (
        rc == 2 and err.strip() == f"nodulekit: error: {tmp_path / 'junk'} is not a nodulekit run folder (no run.json)"
    )


def test_overwrite_refused_while_another_job_trains(ds, tmp_path):
    from nodulekit.errors import NodulekitError
    from nodulekit.training import TrainConfig, train

    rundir = tmp_path / "run"
    cfg = TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=1, lr=0.01, device="cpu")
    train(ds, rundir, cfg, folds=[0], progress=False)
    holder = holder_process(rundir / "fold2")
    try:
        with pytest.raises(NodulekitError, match="fold2 is being trained by another job"):
            train(ds, rundir, TrainConfig(**{**cfg.__dict__, "seed": 1}), folds=[0], progress=False, overwrite=True)
        assert (rundir / "fold0" / "result.h5").exists()  # nothing discarded
    finally:
        holder.kill()
        holder.wait()


def test_claim_from_a_silent_host_is_taken_over(tmp_path, capsys):
    """A claim from another host that nobody touched for STALE_S (its node crashed) is stale."""
    fold_dir = tmp_path / "fold0"
    fold_dir.mkdir()
    path = fold_dir / CLAIM_FILE
    path.write_text(json.dumps({"host": "node-x", "pid": 1, "started": "t0"}))
    assert claims.read_claim(fold_dir).alive() is None  # fresh: respected
    old = time.time() - claims.STALE_S - 60
    os.utime(path, (old, old))
    assert claims.read_claim(fold_dir).alive() is False
    mine = claims.acquire(fold_dir)
    assert claims.read_claim(fold_dir) == mine
    assert "its job (pid 1 on node-x since t0) has not refreshed its claim for 11 min" in capsys.readouterr().err


def test_a_job_keeps_its_claims_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    folders = [tmp_path / "fold0", tmp_path / "fold1"]
    with claims.claimed(folders) as held:
        for folder in folders:
            os.utime(folder / CLAIM_FILE, (0, 0))  # as if last touched in 1970
        wait_for(lambda: all((f / CLAIM_FILE).stat().st_mtime > time.time() - 60 for f in folders), "a heartbeat")
        assert set(held) == set(folders)
    assert not any((f / CLAIM_FILE).exists() for f in folders)


def test_sigterm_releases_the_claims_and_keeps_the_checkpoint(ds, tmp_path):
    """A scheduler's SIGTERM (time limit) unwinds like Ctrl-C: exit 143, claim gone, checkpoint kept, rerun resumes."""
    rundir = tmp_path / "run"
    cmd = [PY, "-m", "nodulekit", "train", ds, "-o", rundir, "--fold", "0", "--epochs", "400", *TRAIN_OPTS]
    job = subprocess.Popen(list(map(str, cmd)), env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (rundir / "fold0" / "checkpoint.pt").exists(), "the first checkpoint")
        assert (rundir / "fold0" / CLAIM_FILE).exists()
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 143
    finally:
        job.kill()
    assert (
        job.stderr.read().strip().splitlines()[-1]
        == "nodulekit: error: terminated; finished work is kept and a re-run resumes"
    )
    assert not (rundir / "fold0" / CLAIM_FILE).exists()
    (row,) = [r for r in run_status(rundir) if r["fold"] == 0]
    assert row["state"] == "interrupted" and 1 <= row["epochs_done"] < 400


# --------------------------------------------------------------------------- issue 20: claims that cannot be fooled


def test_a_claim_names_its_job_by_token_boot_and_pid_namespace(tmp_path):
    mine = claims.acquire(tmp_path / "fold0")
    record = json.loads((tmp_path / "fold0" / CLAIM_FILE).read_text())
    assert record["token"] == mine.token and len(record["token"]) == 32
    assert record["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert record["pid_ns"] == os.readlink("/proc/self/ns/pid")
    assert {"host", "pid", "started", "pid_start"} <= set(record)  # the fields readers knew stay
    # the same PID and start but another token is another job's claim: never released as ours
    other = claims.Claim(**{**mine.__dict__, "token": "0" * 32})
    claims.release(tmp_path / "fold0", other)
    assert (tmp_path / "fold0" / CLAIM_FILE).exists()
    claims.release(tmp_path / "fold0", mine)
    assert not (tmp_path / "fold0" / CLAIM_FILE).exists()


def test_a_live_job_in_another_pid_namespace_keeps_its_fold(ds, tmp_path, nodulekit_cli):
    """Same host name, another PID namespace (a container): its PID says nothing here, only its heartbeat."""
    from reliability_cases import BY_ID

    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("a PID namespace needs unshare(1) and the right to use it (root)")
    rundir = tmp_path / "run"
    fold_dir = rundir / "fold0"
    code = f"import os, time; from nodulekit import claims; claims.acquire({str(fold_dir)!r}); print('held', os.getpid(), flush=True); time.sleep(600)"
    holder = subprocess.Popen([*unshare, PY, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().split()[0] == "held"
        theirs = claims.read_claim(fold_dir)
        assert theirs.pid_ns != claims.pid_namespace() and theirs.host == socket.gethostname()
        assert theirs.alive() is None  # its PID is meaningless here: neither alive nor dead
        job = nodulekit(nodulekit_cli, "train", ds, "-o", rundir, "--fold", "0", "--epochs", "1", *TRAIN_OPTS)
        BY_ID["claim-other-namespace"].check(job.returncode, job.stderr)
        assert claims.read_claim(fold_dir) == theirs  # not taken over
        old = time.time() - claims.STALE_S - 60  # its heartbeat stopped 11 min ago: now it is stale
        os.utime(fold_dir / CLAIM_FILE, (old, old))
        assert claims.read_claim(fold_dir).alive() is False
    finally:
        holder.kill()
        holder.wait()


def test_a_claim_or_lock_planted_as_a_link_is_refused_not_followed(ds, tmp_path, nodulekit_cli):
    from reliability_cases import BY_ID

    victim = tmp_path / "precious.txt"
    victim.write_text("the user's file")
    rundir = tmp_path / "run"
    (rundir / "fold0").mkdir(parents=True)
    (rundir / "fold0" / CLAIM_FILE).symlink_to(victim)
    job = nodulekit(nodulekit_cli, "train", ds, "-o", rundir, "--fold", "0", "--epochs", "1", *TRAIN_OPTS)
    BY_ID["link-as-lock"].check(job.returncode, job.stderr)
    (rundir / "fold0" / CLAIM_FILE).unlink()
    (rundir / "fold0" / ".claim.lock").symlink_to(victim)
    (rundir / "fold0" / CLAIM_FILE).write_text(dead_claim(a_dead_pid()))  # a stale claim: takeover locks
    with pytest.raises(claims.NodulekitError, match="claim.lock is a symbolic link, not a nodulekit lock file"):
        claims.acquire(rundir / "fold0")
    assert victim.read_text() == "the user's file"
