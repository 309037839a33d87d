"""nodulekit.outputs: the HDF5 sink that keeps a failing disk away from the HDF5 library, and (issue 20)
outputs that never replace inputs, folder outputs, lock files, safe printing and progress bars."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli_in_process as cli
from reliability_cases import BY_ID
from test_reliability import ENV, cli_process

from nodulekit.outputs import _FailSafeFile, hdf5_file
from tests.model_fixtures import export, trained_run
from tests.scan_fixtures import canonical_ct, lps_of, stored_variant, write_nifti


class SmallDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes: later writes fail with ENOSPC."""

    def __init__(self, path, room: int):
        super().__init__(path, "wb+")
        self.room = room

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if self.tell() + n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def write_arrays(f: h5py.File) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.normal(size=(64, 32, 32)).astype(np.float32) for i in range(4)}
    for name, value in arrays.items():  # chunked and compressed, as the artifacts are
        f.create_dataset(name, data=value, chunks=(8, 32, 32), compression="gzip")
    f.attrs["kind"] = "test"
    return arrays


@pytest.mark.parametrize("room", [0, 3_000, 200_000])
def test_a_full_disk_leaves_hdf5_a_consistent_file_and_keeps_the_error(tmp_path, room):
    """After the first failed write HDF5 must read back exactly what it wrote (garbage crashed h5py)."""
    sink = _FailSafeFile(SmallDisk(tmp_path / "f.h5", room))
    with h5py.File(sink, "w") as f:
        arrays = write_arrays(f)
    assert sink.error is not None and sink.error.errno == errno.ENOSPC
    sink.seek(0)
    image = io.BytesIO(sink.read())  # everything HDF5 wrote, as it sees it through the sink
    with h5py.File(image, "r") as f:
        assert f.attrs["kind"] == "test"
        for name, value in arrays.items():
            np.testing.assert_array_equal(f[name][()], value)


def test_a_disk_with_room_writes_through(tmp_path):
    sink = _FailSafeFile(SmallDisk(tmp_path / "f.h5", 10**9))
    with h5py.File(sink, "w") as f:
        arrays = write_arrays(f)
    assert sink.error is None and sink.memory is None
    sink.raw.close()
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["a3"][()], arrays["a3"])


def test_hdf5_file_raises_the_disk_error_naming_the_file(tmp_path, monkeypatch):
    import nodulekit.outputs as outputs

    monkeypatch.setattr(outputs, "open", lambda p, *a, **k: SmallDisk(p, 5_000), raising=False)
    with pytest.raises(OSError) as info:
        with hdf5_file(tmp_path / "x.h5") as f:
            write_arrays(f)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.h5")


# =========================================================================== issue 20, through the command line
# Outputs never replace inputs, folder outputs as safe as files, locks that are not links,
# strings from files printed safely, progress bars only on a terminal. Each test checks its
# case of the catalogue (tests/reliability_cases.py, docs/reliability.md).

NODULE = (11.3, 13.6, 6.4)  # where canonical_ct() draws its nodule (row, col, slice)
LAYOUT = ((1, 0, 2), (0, 1))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A trained RUNDIR, its dataset, a fold-0 ONNX model, a CT with one nodule, a maps file."""
    from nodulekit.maps import run_maps, write_run_maps

    folder = tmp_path_factory.mktemp("io")
    dataset, rundir = trained_run(folder)
    stored, affine = stored_variant(canonical_ct(), *LAYOUT)
    maps = folder / "maps.h5"
    write_run_maps(run_maps(rundir, "hesam", device="cpu", progress=False), maps, rundir=rundir)
    return {
        "folder": folder,
        "dataset": dataset,
        "rundir": rundir,
        "onnx": export(rundir, folder / "fold0.onnx", fold=0),
        "ct": write_nifti(folder / "ct.nii.gz", stored, affine),
        "centre": ",".join(f"{v:.6f}" for v in lps_of(NODULE)),
        "maps": maps,
    }


def predict_args(work, out, *extra) -> list:
    model = ["predict", work["onnx"], work["ct"], "--centre", work["centre"], "--diameter", "10"]
    return [*model, "--provider", "cpu", "-o", out, *extra]


def run_process(*args, env=ENV, **kw) -> subprocess.CompletedProcess:
    """`nodulekit ARGS` in a new process with its own environment or start-up (``preexec_fn``)."""
    argv = [sys.executable, "-m", "nodulekit", *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, **kw)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- 2: an output that is an input


def test_an_output_that_is_an_input_is_refused_before_any_work(work, tmp_path, monkeypatch, capsys):
    import nodulekit.maps as M

    run, ds = work["rundir"], work["dataset"]
    monkeypatch.setattr(M, "run_maps", lambda *a, **k: pytest.fail("maps did work before refusing"))
    kept = tree_digest(run) | {"dataset": digest(ds), "maps": digest(work["maps"])}
    link = tmp_path / "link.h5"
    link.symlink_to(ds)
    hard = tmp_path / "hard.h5"
    os.link(ds, hard)

    def refused(*args) -> str:
        code, _, err = cli(monkeypatch, capsys, *args)
        last = err.splitlines()[-1] if err.strip() else ""
        assert str(args[args.index("-o") + 1]) in last, err  # names the output...
        assert any(str(p) in last for p in args[1:3]), err  # ...and the input
        return code, err

    for args in (
        ["infer", work["onnx"], ds, "-o", ds, "--overwrite"],
        ["infer", work["onnx"], ds, "-o", hard, "--overwrite"],  # a hard link
        ["infer", work["onnx"], ds, "-o", link, "--overwrite"],  # a symbolic link
        ["scores", work["maps"], "-d", ds, "-o", work["maps"], "--overwrite"],
    ):
        BY_ID["output-is-input"].check(*refused(*args))
    for args in (
        ["maps", run, "-m", "hesam", "-o", run / "fold0" / "result.h5", "--overwrite"],
        ["maps", run, "-m", "hesam", "-o", run / "fold0" / "result.h5"],
        ["export-onnx", run, "--fold", "1", "-o", run / "fold1" / "checkpoint.pt", "--overwrite"],
    ):
        BY_ID["output-inside-input"].check(*refused(*args))
    BY_ID["output-holds-input"].check(*refused("train", run / "fold0" / "result.h5", "-o", run / "fold0"))
    assert tree_digest(run) | {"dataset": digest(ds), "maps": digest(work["maps"])} == kept


def test_predict_into_the_folder_holding_its_model_and_scan_is_refused(work, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "case"
    folder.mkdir()
    model, scan = shutil.copy(work["onnx"], folder), shutil.copy(work["ct"], folder)
    before = tree_digest(folder)
    args = ["predict", model, scan, "--centre", work["centre"], "--diameter", "10", "--provider", "cpu"]
    code, out, err = cli(monkeypatch, capsys, *args, "-o", folder, "--overwrite")
    BY_ID["output-holds-input"].check(code, err)
    assert out == "" and tree_digest(folder) == before
    code, out, err = cli(monkeypatch, capsys, *args, "-o", tmp_path, "--overwrite")  # its parent too
    BY_ID["output-holds-input"].check(code, err)
    assert tree_digest(folder) == before


# --------------------------------------------------------------------------- 3: folder outputs


def test_a_folder_that_appears_meanwhile_is_kept(work, tmp_path, monkeypatch, capsys):
    import nodulekit.predict_output as P

    out = tmp_path / "out"
    write_overlay = P.write_overlay

    def the_user_creates_it_meanwhile(path, *a, **k):
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
        return write_overlay(path, *a, **k)

    monkeypatch.setattr(P, "write_overlay", the_user_creates_it_meanwhile)
    code, _, err = cli(monkeypatch, capsys, *predict_args(work, out))
    BY_ID["folder-appeared"].check(code, err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and hidden(tmp_path) == []


SLOW_PREDICT = """
import sys, time
from pathlib import Path
import nodulekit.predict_output as P
from nodulekit.cli import main

MARKER = Path(sys.argv[1])

def slow(path, *a, **k):
    MARKER.touch()
    time.sleep(600)

P.write_overlay = slow
sys.argv = ["nodulekit", *sys.argv[2:]]
main()
"""


def slow_predict(work, tmp_path, out, *extra) -> tuple[subprocess.Popen, Path]:
    """A real `predict` process that stops inside its folder writing (until killed)."""
    script, marker = tmp_path / "slow.py", tmp_path / "writing"
    script.write_text(SLOW_PREDICT)
    argv = [sys.executable, script, marker, *predict_args(work, out, *extra)]
    proc = subprocess.Popen(list(map(str, argv)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    return proc, marker


def test_one_predict_at_a_time_into_a_folder_and_kill_9_leaves_nothing(work, tmp_path):
    out = tmp_path / "out"
    first, _ = slow_predict(work, tmp_path, out, "--overwrite")
    try:
        second = cli_process(*predict_args(work, out, "--overwrite"))
        BY_ID["folder-second-writer"].check(second.returncode, second.stderr)
        assert f"pid {first.pid} on" in second.stderr and second.stdout == ""
    finally:
        first.kill()  # SIGKILL: no cleanup runs in it
        first.wait()
    assert [n for n in hidden(tmp_path) if n.startswith(".out.")], "the killed run left nothing to clean"
    rerun = cli_process(*predict_args(work, out))
    BY_ID["folder-stale-temps"].check(rerun.returncode, rerun.stderr)
    assert hidden(tmp_path) == [] and (out / "predictions.jsonl").is_file()


def test_a_linked_folder_is_written_through_and_leaves_nothing(work, tmp_path, monkeypatch, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old result")
    link = tmp_path / "out"
    link.symlink_to(real)
    for _ in range(2):  # the second --overwrite must work as well as the first
        code, out, err = cli(monkeypatch, capsys, *predict_args(work, link, "--overwrite"))
        BY_ID["folder-link"].check(code, err)
        assert link.is_symlink() and link.resolve() == real
        nodule = json.loads(out)["id"]
        assert sorted(p.name for p in real.iterdir()) == [f"{nodule}_map.nii.gz", f"{nodule}_overlay.png",
                                                          "predictions.jsonl"]  # fmt: skip
        assert hidden(tmp_path) == []
        assert json.loads((real / "predictions.jsonl").read_text()) == json.loads(out)


def test_dash_for_a_folder_output_is_refused(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args in (
        predict_args(work, "-"),
        ["figures", work["maps"], "-d", work["dataset"], "-o", "-"],
        ["train", work["dataset"], "-o", "-", "--epochs", "1"],
        ["phantom", "-o", "-", "--nodules", "2"],
    ):
        code, _, err = cli(monkeypatch, capsys, *args)
        BY_ID["folder-dash"].check(code, err)
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_planted_as_a_link_is_refused(tmp_path, monkeypatch, capsys):
    victim = tmp_path / "precious.h5"
    victim.write_bytes(b"the user's data")
    (tmp_path / ".rois.h5.lock").symlink_to(victim)
    vois = tmp_path / "vois"
    vois.mkdir()
    (vois / "manifest.csv").write_text("patient_id,series_uid,nodule_index,image,mask\n")
    code, _, err = cli(monkeypatch, capsys, "extract", "--vois", vois, "-o", tmp_path / "rois.h5")
    BY_ID["link-as-lock"].check(code, err)
    assert victim.read_bytes() == b"the user's data" and not (tmp_path / "rois.h5").exists()


# --------------------------------------------------------------------------- where an output cannot go


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs as root (root ignores permissions), else mode 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", folder]).returncode:
            pytest.skip("cannot mount a read-only tmpfs")
        yield folder
        subprocess.run(["umount", "-l", folder], check=False)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_a_read_only_destination_is_refused_before_the_work(work, read_only, monkeypatch, capsys):
    import nodulekit.maps as M

    monkeypatch.setattr(M, "run_maps", lambda *a, **k: pytest.fail("maps did work before refusing"))
    code, _, err = cli(monkeypatch, capsys, "maps", work["rundir"], "-m", "hesam", "-o", read_only / "m.h5")
    BY_ID["read-only-output"].check(code, err)
    code, _, err = cli(monkeypatch, capsys, *predict_args(work, read_only / "out"))
    BY_ID["read-only-output"].check(code, err)


def test_a_link_loop_as_output_is_one_line(work, tmp_path, monkeypatch, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for args in (["maps", work["rundir"], "-m", "hesam", "-o", loop], predict_args(work, loop)):
        code, _, err = cli(monkeypatch, capsys, *args)
        BY_ID["link-loop"].check(code, err)


def test_ascii_locale_and_closed_stdout(work, tmp_path):
    run = tmp_path / "run-ä"  # a path the locale cannot encode
    shutil.copytree(work["rundir"], run)
    res = run_process("evaluate", run, "--bootstrap", "20", env=dict(ENV, PYTHONIOENCODING="ascii"))
    BY_ID["ascii-locale"].check(res.returncode, res.stderr)
    assert "±" not in res.stdout and "\\xb1" in res.stdout  # the table's ± as an escape
    res = run_process("scores", work["maps"], "-d", work["dataset"], "-o", "-", preexec_fn=lambda: os.close(1))
    BY_ID["stdout-closed"].check(res.returncode, res.stderr)
    res = run_process(*predict_args(work, tmp_path / "p"), preexec_fn=lambda: os.close(1))
    BY_ID["stdout-closed"].check(res.returncode, res.stderr)
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- 7: strings from files


ESC = "\x1b]0;owned\x07\x1b[2J"  # sets the window title, clears the screen


def test_escape_sequences_from_files_never_reach_the_terminal(work, tmp_path, monkeypatch, capsys):
    import onnx

    run = tmp_path / "run"
    shutil.copytree(work["rundir"], run)
    record = json.loads((run / "run.json").read_text())
    record["dataset"]["name"] = f"D11C{ESC}"
    (run / "run.json").write_text(json.dumps(record))
    model = onnx.load(str(work["onnx"]))
    planted_name = '"dataset_name": ' + json.dumps(f"D11C{ESC}")
    changed = 0
    for prop in model.metadata_props:
        prop.value, n = re.subn(r'"dataset_name":\s*"[^"]*"', lambda _: planted_name, prop.value)
        changed += n
    assert changed, "no dataset name in the ONNX metadata"
    planted = tmp_path / "planted.onnx"
    onnx.save(model, str(planted))
    for args, shown in (
        (["evaluate", run, "--bootstrap", "20"], "D11C\\x1b]0;owned\\x07\\x1b[2J"),
        (["describe", run], "D11C\\x1b]0;owned\\x07"),
        (["describe", planted], "D11C\\x1b]0;owned\\x07"),
        (["describe", planted, "--json"], "D11C\\u001b]0;owned\\u0007"),
    ):
        code, out, err = cli(monkeypatch, capsys, *args)
        BY_ID["terminal-escape"].check(code, err)
        assert "\x1b" not in out + err and "\x07" not in out + err, args
        assert shown in out, (args, out[:500])


# --------------------------------------------------------------------------- 8: progress bars


def test_progress_bars_only_on_a_terminal_unless_asked(work):
    args = ["maps", work["rundir"], "-m", "hesam", "--device", "cpu", "--overwrite", "-o"]
    res = cli_process(*args, work["folder"] / "m1.h5")  # stderr is a pipe, as in a log file
    BY_ID["progress-not-a-terminal"].check(res.returncode, res.stderr)
    assert "\r" not in res.stderr and "batch" not in res.stderr
    res = cli_process(*args, work["folder"] / "m2.h5", "--progress")
    assert res.returncode == 0 and "hesam maps" in res.stderr and "batch" in res.stderr


def test_printable_escapes_controls_and_keeps_text():
    from nodulekit.printing import printable

    assert printable("±5 % naïve 中\n\tok") == "±5 % naïve 中\n\tok"
    assert printable("a\x1b[2Jb\x9bc\u202ed\x00") == "a\\x1b[2Jb\\x9bc\\u202ed\\x00"
    assert printable("one\nline\r", lines=False) == "one\\x0aline\\x0d"
    assert printable(os.fsdecode(b"bad\xffname")) == "bad\\udcffname"  # an undecodable file name
