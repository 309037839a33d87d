"""Safe outputs (nodulekit.outputs) in this process, line by line: what a path is (file, stream,
stdout), every refusal's text naming the output, atomic files and folders (what is left on disk
after success, refusal and failure), temporaries of dead writers, one writer at a time."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nodulekit import outputs
from nodulekit.errors import NodulekitError, WriteFailed


@pytest.fixture(autouse=True)
def _no_inputs():
    outputs.clear_inputs()
    yield
    outputs.clear_inputs()


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- what a path is


def test_output_target_of_each_kind_of_path(tmp_path):
    assert outputs.output_target("-") == "stdout"
    assert outputs.output_target(tmp_path / "new.csv") == "file"
    (tmp_path / "f").write_text("")
    assert outputs.output_target(tmp_path / "f") == "file"
    assert outputs.output_target(tmp_path) == "file"
    assert outputs.output_target("/dev/null") == "stream"
    os.mkfifo(tmp_path / "fifo")
    assert outputs.output_target(tmp_path / "fifo") == "stream"
    assert outputs.output_target("/dev/stdout") == "stream"
    assert outputs.output_target("/proc/self/fd/1") == "stream"
    assert outputs.output_target("/dev/nonexistent-thing") == "stream"  # under /dev, even when absent
    (tmp_path / "to-dev").symlink_to("/dev/null")
    assert outputs.output_target(tmp_path / "to-dev") == "stream"
    (tmp_path / "dangling").symlink_to("/dev/nodulekit-none")  # a link into /dev: still a stream
    assert outputs.output_target(tmp_path / "dangling") == "stream"
    (tmp_path / "devices").mkdir()
    assert outputs.output_target(tmp_path / "devices" / "x") == "file"  # a name like /dev is not /dev


def test_special_roots_are_whole_path_components():
    assert outputs._under_special(Path("/dev")) and outputs._under_special(Path("/proc/1"))
    assert not outputs._under_special(Path("/devx")) and not outputs._under_special(Path("/procs/a"))
    assert not outputs._under_special(Path("/tmp/dev"))


def test_a_chain_of_links_into_dev_is_a_stream(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to("/dev/null")
    assert outputs._through_special(tmp_path / "a")
    (tmp_path / "c").symlink_to(tmp_path / "d")
    (tmp_path / "d").symlink_to(tmp_path / "real")
    assert not outputs._through_special(tmp_path / "c")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert not outputs._through_special(tmp_path / "loop")  # a loop ends after 40 links


def test_is_stdout_only_for_dash_or_the_same_file(tmp_path, capsys):
    assert outputs.is_stdout("-")
    assert not outputs.is_stdout(tmp_path / "none")
    with capsys.disabled():
        with open(tmp_path / "out", "w") as fh:
            saved = sys.stdout
            sys.stdout = fh
            try:
                assert outputs.is_stdout(tmp_path / "out")
                assert not outputs.is_stdout(tmp_path)
            finally:
                sys.stdout = saved


def test_closed_and_taken_stdout_flags(monkeypatch):
    monkeypatch.setattr(outputs, "_closed", set())
    assert not outputs.stdout_closed()
    outputs.mark_closed("stderr")
    assert not outputs.stdout_closed()
    outputs.mark_closed("stdout")
    assert outputs.stdout_closed()
    monkeypatch.setattr(outputs, "_stdout_taken", False)
    assert not outputs.stdout_taken()


def test_stat_output_turns_loops_and_files_on_the_way_into_one_line(tmp_path):
    assert outputs._stat_output(tmp_path / "none") is None
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(NodulekitError) as err:
        outputs._stat_output(tmp_path / "loop")
    assert str(err.value) == f"-o {tmp_path / 'loop'}: a loop of symbolic links (it points back at itself)"
    (tmp_path / "f").write_text("")
    with pytest.raises(NodulekitError) as err:
        outputs._stat_output(tmp_path / "f" / "x")
    assert str(err.value) == f"-o {tmp_path / 'f' / 'x'}: a part of the path is a file, not a folder"
    assert outputs._stat_output(tmp_path / "f").st_size == 0
    long = tmp_path / ("x" * 300)  # ENAMETOOLONG: no answer, no error
    assert outputs._stat_output(long) is None


# --------------------------------------------------------------------------- checks before work


def test_check_output_path_refusals(tmp_path):
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_path("-", True)
    assert str(err.value) == "-o -: standard output; this output is binary, give a file path"
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_path("/dev/null", True)
    assert str(err.value) == (
        "-o /dev/null: not a regular file (a terminal, pipe or device); this output is binary, give a file path"
    )
    assert outputs.check_output_path("-", False, stream="CSV") == Path("-")
    assert outputs.check_output_path("/dev/null", False, stream="CSV") == Path("/dev/null")
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_path("/dev/nodulekit-none", False, stream="CSV")
    assert str(err.value) == "-o /dev/nodulekit-none: no such device or stream"
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_path(tmp_path, True)
    assert str(err.value) == f"-o {tmp_path} is a folder; give a file name"
    (tmp_path / "f").write_text("")
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_path(tmp_path / "f", False)
    assert str(err.value) == f"{tmp_path / 'f'} already exists (pass --overwrite to replace it)"
    assert outputs.check_output_path(str(tmp_path / "f"), True) == tmp_path / "f"
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_path(tmp_path / "no" / "f", False)
    assert str(err.value) == f"output folder {tmp_path / 'no'} does not exist"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "x")
    with pytest.raises(NodulekitError, match="output folder .* does not exist"):
        outputs.check_output_path(tmp_path / "link", False)  # the folder of what the link points at


def test_check_writable_dir_names_the_reason(tmp_path, monkeypatch):
    outputs.check_writable_dir(tmp_path, "x")
    monkeypatch.setattr(outputs.os, "access", lambda *a, **k: False)
    outputs.check_writable_dir(tmp_path, "x")  # access() may be wrong (root, ACLs): the probe decides
    assert _names(tmp_path) == []
    with pytest.raises(NodulekitError) as err:
        outputs.check_writable_dir(tmp_path / "none", "out.csv")
    assert str(err.value) == f"-o out.csv: cannot write in {tmp_path / 'none'}: No such file or directory"


def test_check_output_dir_refusals(tmp_path):
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_dir("-")
    assert str(err.value) == "-o -: this output is a folder; give a folder path, not a stream or -"
    (tmp_path / "f").write_text("")
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_dir(tmp_path / "f")
    assert str(err.value) == f"-o {tmp_path / 'f'} exists and is not a folder"
    (tmp_path / "d").mkdir()
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_dir(tmp_path / "d", False)
    assert str(err.value) == f"{tmp_path / 'd'} already exists (pass --overwrite to replace it)"
    assert outputs.check_output_dir(tmp_path / "d", True) == tmp_path / "d"
    assert outputs.check_output_dir(tmp_path / "d") == tmp_path / "d"
    assert outputs.check_output_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_dir(tmp_path / "f" / "b" / "c")
    assert str(err.value) in (
        f"-o {tmp_path / 'f' / 'b' / 'c'}: {tmp_path / 'f'} is a file, not a folder",
        f"-o {tmp_path / 'f' / 'b' / 'c'}: a part of the path is a file, not a folder",
    )
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_dir(tmp_path / "a" / "b", False)
    assert str(err.value) == f"output folder {tmp_path / 'a'} does not exist"
    assert outputs.check_output_dir(tmp_path / "new", False) == tmp_path / "new"


def test_a_file_above_a_new_folder_output_is_named(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(outputs, "_stat_output", lambda p: None)  # as if the path were simply absent
    with pytest.raises(NodulekitError) as err:
        outputs.check_output_dir(tmp_path / "f" / "b")
    assert str(err.value) == f"-o {tmp_path / 'f' / 'b'}: {tmp_path / 'f'} is a file, not a folder"


# --------------------------------------------------------------------------- inputs


def test_an_output_that_is_holds_or_lies_in_an_input_is_refused(tmp_path):
    data = tmp_path / "data.h5"
    data.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    series = tmp_path / "series"
    series.mkdir()
    outputs.declare_inputs(data, None, "-", run, series, tmp_path / "missing")
    suffix = ": an output never replaces an input (even with --overwrite); choose another -o"
    cases = [
        (data, f"is the input {data}"),
        (tmp_path, f"holds the input {data}"),
        (run / "x.csv", f"lies inside the input folder {run}"),
        (run / "fold0" / "x.csv", f"lies inside the input folder {run}"),
    ]
    for out, relation in cases:
        with pytest.raises(NodulekitError) as err:
            outputs.check_not_input(out)
        assert str(err.value) == f"-o {out} {relation}{suffix}"
    os.link(data, tmp_path / "hard.h5")
    with pytest.raises(NodulekitError, match="is the input"):
        outputs.check_not_input(tmp_path / "hard.h5")
    (tmp_path / "soft.h5").symlink_to(data)
    with pytest.raises(NodulekitError, match="is the input"):
        outputs.check_not_input(tmp_path / "soft.h5")
    outputs.check_not_input(series / "out.csv")  # an input folder that is not a RUNDIR may take outputs
    outputs.check_not_input(tmp_path / "missing")  # a missing input: its reader refuses it
    outputs.check_not_input("-")
    outputs.clear_inputs()
    outputs.check_not_input(data)


def test_lineage_and_sameness(tmp_path):
    (tmp_path / "a").mkdir()
    lineage = outputs._lineage(tmp_path / "a" / "b")
    assert [p for p, _ in lineage[:3]] == [tmp_path / "a" / "b", tmp_path / "a", tmp_path]
    assert lineage[0][1] is None and lineage[1][1] == (os.stat(tmp_path / "a").st_dev, os.stat(tmp_path / "a").st_ino)
    assert outputs._same((Path("x"), None), (Path("x"), None))
    assert not outputs._same((Path("x"), None), (Path("y"), None))
    assert outputs._same((Path("x"), (1, 2)), (Path("y"), (1, 2)))
    assert not outputs._same((Path("x"), (1, 2)), (Path("y"), (1, 3)))
    assert outputs._is_rundir(tmp_path) is False
    (tmp_path / "run.json").mkdir()
    assert outputs._is_rundir(tmp_path) is False


# --------------------------------------------------------------------------- temporaries


def test_temporary_names_carry_host_space_and_pid(tmp_path):
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"
    owner = outputs._owner()
    assert owner == f"{host}-{outputs._space()}-{os.getpid()}"
    assert re.fullmatch(r"[0-9a-f]{8}", outputs._space())
    import zlib

    from nodulekit.host import boot_id, pid_namespace

    assert outputs._space() == f"{zlib.crc32(f'{boot_id()} {pid_namespace()}'.encode()):08x}"
    m = outputs._temp_pattern("a.csv").match(f".a.csv.{owner}.x.part")
    assert (m["host"], m["space"], m["pid"]) == (host, outputs._space(), str(os.getpid()))
    m = outputs._temp_pattern("a.csv").match(".a.csv.node_1-123.x")  # an older name without the space
    assert (m["host"], m["space"], m["pid"]) == ("node_1", None, "123")
    assert outputs._temp_pattern("a.csv").match(".aXcsv.h-1.x") is None
    assert outputs._temp_pattern("a.csv").match("a.csv.h-1.x") is None


def test_a_dotted_or_odd_host_name_is_cut_to_its_first_label(monkeypatch):
    monkeypatch.setattr(outputs.socket, "gethostname", lambda: "node-7.cluster.example")
    assert outputs._owner().startswith("node_7-")
    monkeypatch.setattr(outputs.socket, "gethostname", lambda: "Node-7B")
    assert outputs._owner().startswith("Node_7B-")
    monkeypatch.setattr(outputs.socket, "gethostname", lambda: ".")
    assert outputs._owner().startswith("host-")


def test_pid_alive():
    assert outputs._pid_alive(os.getpid()) and outputs._pid_alive(1)
    assert not outputs._pid_alive(_dead_pid())


def test_clean_stale_temps_removes_only_dead_writers_of_this_host_and_space(tmp_path):
    target = tmp_path / "out.csv"
    host, space, _ = outputs._owner().rsplit("-", 2)
    dead = _dead_pid()
    names = {
        "dead": f".out.csv.{host}-{space}-{dead}.a.part",
        "dead_old": f".out.csv.{host}-{dead}.b.part",  # no space recorded: taken as this one's
        "dead_dir": f".out.csv.{host}-{space}-{dead}.c.part",
        "mine": f".out.csv.{host}-{space}-{os.getpid()}.d.part",
        "live": f".out.csv.{host}-{space}-1.e.part",
        "other_host": f".out.csv.elsewhere-{space}-{dead}.f.part",
        "other_space": f".out.csv.{host}-{'0' * 8 if space != '0' * 8 else '1' * 8}-{dead}.g.part",
        "other_file": f".other.csv.{host}-{space}-{dead}.h.part",
    }
    for key, name in names.items():
        if key == "dead_dir":
            (tmp_path / name).mkdir()
            (tmp_path / name / "inside").write_text("")
        else:
            (tmp_path / name).write_text("")
    removed = outputs.clean_stale_temps(target)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["dead_old"], names["dead_dir"]])
    assert _names(tmp_path) == sorted(n for k, n in names.items() if k not in ("dead", "dead_old", "dead_dir"))
    assert outputs.clean_stale_temps(tmp_path / "none" / "out.csv") == []


def test_a_stale_temporary_link_is_removed_not_followed(tmp_path):
    host, space, _ = outputs._owner().rsplit("-", 2)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x").write_text("")
    link = tmp_path / f".out.{host}-{space}-{_dead_pid()}.part"
    link.symlink_to(keep)
    assert outputs.clean_stale_temps(tmp_path / "out") == [link]
    assert (keep / "x").exists()


def test_write_failed_names_the_output_and_keeps_the_reason(tmp_path):
    err = outputs.write_failed(tmp_path / "o.csv", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, WriteFailed) and err.exit_code == 1
    assert str(err) == f"could not write {tmp_path / 'o.csv'}: No space left on device"
    assert err.reason == "No space left on device"
    assert str(outputs.write_failed("o", OSError("disk gone\nmore"))) == "could not write o: disk gone"
    assert str(outputs.write_failed("o", OSError())) == "could not write o: OSError"


def test_is_write_failure(tmp_path):
    tmp = tmp_path / "t"
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS):
        assert outputs._is_write_failure(OSError(code, "x"), tmp)
    assert not outputs._is_write_failure(OSError(errno.EACCES, "x"), tmp)
    assert outputs._is_write_failure(OSError(errno.EACCES, "x", str(tmp)), tmp)
    assert not outputs._is_write_failure(OSError(errno.EACCES, "x", "other"), tmp)
    assert not outputs._is_write_failure(ValueError("x"), tmp)
    assert not outputs._is_write_failure(WriteFailed("x"), tmp)


# --------------------------------------------------------------------------- atomic files


def test_atomic_path_moves_a_finished_file_in_with_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        with outputs.atomic_path(tmp_path / "o.txt", ".txt.part") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(f".o.txt.{outputs._owner()}.")
            assert tmp.name.endswith(".txt.part") and tmp.exists()
            tmp.write_text("done")
    finally:
        os.umask(old)
    assert (tmp_path / "o.txt").read_text() == "done" and _names(tmp_path) == ["o.txt"]
    assert (tmp_path / "o.txt").stat().st_mode & 0o777 == 0o640
    with outputs.atomic_path(tmp_path / "p") as tmp:
        assert tmp.name.endswith(".part")
        tmp.write_text("")


def test_atomic_path_replaces_or_refuses_an_existing_file(tmp_path):
    (tmp_path / "o").write_text("old")
    with outputs.atomic_path(tmp_path / "o") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "o").read_text() == "new"
    with pytest.raises(NodulekitError) as err:
        with outputs.atomic_path(tmp_path / "o", overwrite=False) as tmp:
            tmp.write_text("third")
    assert str(err.value) == (
        f"{tmp_path / 'o'} already exists: it appeared while this run was working (pass --overwrite to replace it)"
    )
    assert (tmp_path / "o").read_text() == "new" and _names(tmp_path) == ["o"]
    with outputs.atomic_path(tmp_path / "q", overwrite=False) as tmp:
        tmp.write_text("q")
    assert (tmp_path / "q").read_text() == "q" and _names(tmp_path) == ["o", "q"]


def test_atomic_path_through_a_link_replaces_its_target(tmp_path):
    (tmp_path / "target").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with outputs.atomic_path(tmp_path / "link") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_text() == "new"


def test_atomic_path_failures(tmp_path):
    with pytest.raises(WriteFailed) as err:
        with outputs.atomic_path(tmp_path / "o"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"could not write {tmp_path / 'o'}: No space left on device"
    with pytest.raises(ValueError):
        with outputs.atomic_path(tmp_path / "o"):
            raise ValueError("not a write failure")
    assert _names(tmp_path) == []
    with pytest.raises(NodulekitError) as err:
        with outputs.atomic_path("/dev/null"):
            pass
    assert str(err.value) == "-o /dev/null: not a regular file; this output must go to a file"
    with pytest.raises(WriteFailed) as err:
        with outputs.atomic_path(tmp_path / "none" / "o"):
            pass
    assert str(err.value) == f"could not write {tmp_path / 'none' / 'o'}: No such file or directory"


def test_commit_without_hard_links_falls_back_to_rename(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", no_links)
    (tmp_path / "t").write_text("x")
    outputs._commit(tmp_path / "t", tmp_path / "f", "shown", overwrite=False)
    assert (tmp_path / "f").read_text() == "x" and not (tmp_path / "t").exists()
    (tmp_path / "t").write_text("y")
    with pytest.raises(NodulekitError) as err:
        outputs._commit(tmp_path / "t", tmp_path / "f", "shown", overwrite=False)
    assert str(err.value) == "shown already exists (pass --overwrite to replace it)"

    def odd(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.os, "link", odd)
    with pytest.raises(PermissionError):
        outputs._commit(tmp_path / "t", tmp_path / "g", "shown", overwrite=False)


def test_atomic_paths_all_or_none(tmp_path):
    paths = {"a": tmp_path / "a.csv", "b": tmp_path / "b.md"}
    with outputs.atomic_paths(paths) as tmps:
        assert list(tmps) == ["a", "b"]
        assert tmps["a"].name.endswith(".csv.part") and tmps["b"].name.endswith(".md.part")
        for t in tmps.values():
            t.write_text(t.name)
    assert _names(tmp_path) == ["a.csv", "b.md"]
    (tmp_path / "b.md").write_text("theirs")
    paths = {"a": tmp_path / "c.csv", "b": tmp_path / "b.md"}
    with pytest.raises(NodulekitError, match="b.md already exists: it appeared while"):
        with outputs.atomic_paths(paths, overwrite=False) as tmps:
            for t in tmps.values():
                t.write_text("mine")
    assert _names(tmp_path) == ["a.csv", "b.md"] and (tmp_path / "b.md").read_text() == "theirs"
    with outputs.atomic_paths(paths, overwrite=True) as tmps:
        for t in tmps.values():
            t.write_text("mine")
    assert (tmp_path / "b.md").read_text() == "mine" and (tmp_path / "c.csv").read_text() == "mine"


def test_atomic_paths_failure_names_the_file_it_failed_on(tmp_path):
    paths = {"a": tmp_path / "a.csv", "b": tmp_path / "b.md"}
    with pytest.raises(WriteFailed) as err:
        with outputs.atomic_paths(paths) as tmps:
            raise OSError(errno.EACCES, "Permission denied", str(tmps["a"]))
    assert str(err.value) == f"could not write {tmp_path / 'a.csv'}: Permission denied"
    with pytest.raises(WriteFailed) as err:
        with outputs.atomic_paths(paths):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"could not write {tmp_path / 'b.md'}: No space left on device"
    with pytest.raises(OSError) as err:
        with outputs.atomic_paths(paths):
            raise OSError(errno.EACCES, "Permission denied", "/elsewhere")
    assert not isinstance(err.value, NodulekitError)
    assert _names(tmp_path) == []


def test_failed_output_prefers_the_named_temporary():
    targets = {"a": (Path("A"), Path("ta")), "b": (Path("B"), Path("tb"))}
    paths = {"a": Path("A"), "b": Path("B")}
    assert outputs._failed_output(OSError(errno.ENOSPC, "x", "ta"), targets, paths) == Path("A")
    assert outputs._failed_output(OSError(errno.ENOSPC, "x"), targets, paths) == Path("B")
    assert outputs._failed_output(OSError(errno.EACCES, "x"), targets, paths) is None


# --------------------------------------------------------------------------- text outputs


def test_text_output_to_a_file_a_stream_and_stdout(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(outputs, "_stdout_taken", False)
    outputs.write_text(tmp_path / "o.md", "line\r\n")
    assert (tmp_path / "o.md").read_bytes() == b"line\r\n"  # newlines as given
    with pytest.raises(NodulekitError, match="already exists"):
        outputs.write_text(tmp_path / "o.md", "x")
    outputs.write_text(tmp_path / "o.md", "y", overwrite=True)
    assert (tmp_path / "o.md").read_text() == "y" and not outputs.stdout_taken()
    os.mkfifo(tmp_path / "fifo")
    reader = subprocess.Popen(["cat", str(tmp_path / "fifo")], stdout=subprocess.PIPE)
    outputs.write_text(tmp_path / "fifo", "through\n")
    assert reader.communicate(timeout=30)[0] == b"through\n"
    outputs.write_text("-", "to stdout\n")
    assert capsys.readouterr().out == "to stdout\n" and outputs.stdout_taken()
    monkeypatch.setattr(outputs, "_closed", {"stdout"})
    with pytest.raises(NodulekitError) as err:
        outputs.write_text("-", "x")
    assert str(err.value) == "-o -: standard output is closed; give a file path or redirect it"


def test_text_to_a_stream_appends_and_a_failure_names_it(tmp_path, monkeypatch):
    log = tmp_path / "log"
    log.write_text("before\n")
    monkeypatch.setattr(outputs, "output_target", lambda p: "stream")
    outputs.write_text(log, "after\n")
    assert log.read_text() == "before\nafter\n"
    with pytest.raises(WriteFailed) as err:
        with outputs.text_output(tmp_path / "log"):
            raise OSError(errno.EIO, "Input/output error")
    assert str(err.value) == f"could not write {log}: Input/output error"
    with pytest.raises(NodulekitError) as err:
        with outputs.text_output(log):
            raise NodulekitError("mine")
    assert str(err.value) == "mine"


def test_write_bytes_replaces_by_default(tmp_path):
    outputs.write_bytes(tmp_path / "b.pt", b"one")
    outputs.write_bytes(tmp_path / "b.pt", memoryview(b"two"))
    assert (tmp_path / "b.pt").read_bytes() == b"two" and _names(tmp_path) == ["b.pt"]
    with pytest.raises(NodulekitError, match="already exists"):
        outputs.write_bytes(tmp_path / "b.pt", b"x", overwrite=False)


# --------------------------------------------------------------------------- HDF5 on a failing disk


class _Disk:
    """A raw file that accepts ``room`` bytes, then fails every write with ``code``."""

    def __init__(self, room, code=errno.ENOSPC, short=False):
        import io

        self.data, self.pos, self.room, self.code, self.short = bytearray(), 0, room, code, short
        self.io = io

    def write(self, b):
        b = bytes(b)
        if self.pos + len(b) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        if self.short and len(b) > 1:
            b = b[: len(b) // 2]
        self.data[self.pos : self.pos + len(b)] = b
        self.pos += len(b)
        return len(b)

    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else len(self.data) + offset)
        return self.pos

    def tell(self):
        return self.pos

    def readall(self):
        out = bytes(self.data[self.pos :])
        self.pos = len(self.data)
        return out

    def readinto(self, b):
        chunk = self.data[self.pos : self.pos + len(b)]
        b[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)

    def truncate(self, size=None):
        if self.code == errno.EIO:
            raise OSError(errno.EIO, "Input/output error")
        del self.data[self.pos if size is None else size :]
        return len(self.data)

    def flush(self):
        if self.code == errno.EDQUOT:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_failsafe_file_spills_to_memory_at_the_first_failure():
    disk = _Disk(room=4)
    f = outputs._FailSafeFile(disk)
    assert f.readable() and f.writable() and f.seekable()
    assert f.write(b"abc") == 3 and f.error is None and f.memory is None
    assert f.write(b"defg") == 4
    assert f.error.errno == errno.ENOSPC and f.memory.getvalue() == b"abcdefg"
    assert f.tell() == 7 and f.seek(1) == 1
    buf = bytearray(3)
    assert f.readinto(buf) == 3 and bytes(buf) == b"bcd"
    assert f.truncate(2) == 2 and f.memory.getvalue() == b"ab"
    f.flush()
    assert disk.data == b"abc"  # the disk kept what it took


def test_failsafe_file_retries_short_writes_and_reads_the_disk_until_it_fails():
    disk = _Disk(room=100, short=True)
    f = outputs._FailSafeFile(disk)
    assert f.write(b"abcdefgh") == 8 and disk.data == b"abcdefgh"
    f.seek(2)
    buf = bytearray(2)
    assert f.readinto(buf) == 2 and bytes(buf) == b"cd"
    assert f.truncate(4) == 4 and disk.data == b"abcd"
    f.flush()
    assert f.error is None


def test_failsafe_file_keeps_a_failed_truncate_and_flush():
    f = outputs._FailSafeFile(_Disk(room=100, code=errno.EIO))
    f.write(b"abcdef")
    f.seek(3)
    assert f.truncate(2) == 2 and f.error.errno == errno.EIO and f.memory.getvalue() == b"ab"
    g = outputs._FailSafeFile(_Disk(room=100, code=errno.EDQUOT))
    g.write(b"xyz")
    g.flush()
    assert g.error.errno == errno.EDQUOT and g.memory.getvalue() == b"xyz" and g.tell() == 3


def test_hdf5_file_names_the_file_when_a_write_failed(tmp_path, monkeypatch):
    import h5py

    with outputs.hdf5_file(tmp_path / "ok.h5") as f:
        f["x"] = [1, 2]
    with h5py.File(tmp_path / "ok.h5") as f:
        assert f["x"][()].tolist() == [1, 2]
    real_write = outputs._FailSafeFile.write

    def failing(self, b):
        if self.error is None:
            self._spill(OSError(errno.ENOSPC, "No space left on device"), self.raw.tell())
        return real_write(self, b)

    monkeypatch.setattr(outputs._FailSafeFile, "write", failing)
    with pytest.raises(OSError) as err:
        with outputs.hdf5_file(tmp_path / "full.h5") as f:
            f["x"] = [1, 2]
    assert (err.value.errno, err.value.strerror, err.value.filename) == (
        errno.ENOSPC, "No space left on device", str(tmp_path / "full.h5"))  # fmt: skip


# --------------------------------------------------------------------------- locks and folders


def test_output_lock_writes_its_holder_and_refuses_a_second(tmp_path):
    out = tmp_path / "o"
    with outputs.output_lock(out):
        lock = tmp_path / ".o.lock"
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with outputs.output_lock(out):  # this process holds it: nested use is fine
            pass
        assert lock.exists()
        code = (
            "import sys; from nodulekit import outputs\n"
            "try:\n    with outputs.output_lock(sys.argv[1], 'nodulekit predict'): pass\n"
            "except Exception as e: print(e)"
        )
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))  # fmt: skip
        assert r.stdout.strip() == (
            f"{out} is being written by another nodulekit predict job (pid {os.getpid()} on "
            f"{socket.gethostname()}); wait for it or choose another -o"
        )
    assert not lock.exists() and out.resolve() not in outputs._held_locks


def test_rename_noreplace_refuses_an_existing_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(OSError) as err:
        outputs._rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert err.value.errno == errno.EEXIST and err.value.filename == str(tmp_path / "b")
    assert err.value.strerror == os.strerror(errno.EEXIST)
    outputs._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert _names(tmp_path) == ["b", "c"]


def test_atomic_dir_builds_a_folder_and_moves_it_in(tmp_path):
    old = os.umask(0o022)
    try:
        with outputs.atomic_dir(tmp_path / "out") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(f".out.{outputs._owner()}.")
            assert tmp.name.endswith(".part")
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["a.txt"]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    with pytest.raises(NodulekitError, match="already exists"):
        with outputs.atomic_dir(tmp_path / "out"):
            pass
    with outputs.atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["b.txt"]


def test_atomic_dir_leaves_nothing_on_failure_and_names_a_full_disk(tmp_path):
    with pytest.raises(ValueError):
        with outputs.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("")
            raise ValueError("x")
    assert _names(tmp_path) == []
    with pytest.raises(WriteFailed) as err:
        with outputs.atomic_dir(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"could not write {tmp_path / 'out'}: No space left on device"
    with pytest.raises(PermissionError):
        with outputs.atomic_dir(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert _names(tmp_path) == []


def test_commit_dir_keeps_what_appeared_and_refuses_a_file(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "theirs").write_text("")
    with pytest.raises(NodulekitError) as err:
        outputs._commit_dir(tmp_path / "t", tmp_path / "final", "shown", overwrite=False)
    assert (
        str(err.value)
        == "shown already exists: it appeared while this run was working (pass --overwrite to replace it)"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(NodulekitError) as err:
        outputs._commit_dir(tmp_path / "t", tmp_path / "file", "shown", overwrite=True)
    assert str(err.value) == "-o shown exists and is not a folder"
    (tmp_path / "t" / "mine").write_text("")
    outputs._commit_dir(tmp_path / "t", tmp_path / "final", "shown", overwrite=True)
    assert _names(tmp_path / "final") == ["mine"] and _names(tmp_path) == ["file", "final"]


def test_commit_dir_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old").write_text("")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == tmp_path / "t":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OSError):
        outputs._commit_dir(tmp_path / "t", tmp_path / "final", "shown", overwrite=True)
    assert _names(tmp_path / "final") == ["old"] and _names(tmp_path) == ["final", "t"]


def test_folder_writer_and_output_folder(tmp_path):
    with outputs.folder_writer(None, False, "predict"):
        pass
    with outputs.folder_writer(tmp_path / "p", False, "predict"):
        assert (tmp_path / ".p.lock").read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(NodulekitError, match="already exists"):
        (tmp_path / "p").mkdir()
        with outputs.folder_writer(tmp_path / "p", False, "predict"):
            pass
    with outputs.output_folder(tmp_path / "a" / "figs") as folder:
        assert folder == tmp_path / "a" / "figs" and folder.is_dir()
        assert (tmp_path / "a" / ".figs.lock").exists()
    with outputs.output_folder(str(tmp_path / "a" / "figs")) as folder:
        assert folder == tmp_path / "a" / "figs"


def test_rename_noreplace_without_renameat2_falls_back_to_rename(tmp_path, monkeypatch):
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: object())  # an old libc: no renameat2
    (tmp_path / "a").mkdir()
    outputs._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert _names(tmp_path) == ["c"]


def test_rename_noreplace_of_relative_paths_is_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a").mkdir()
    outputs._rename_noreplace(Path("a"), Path("c"))
    assert _names(tmp_path) == ["c"]
