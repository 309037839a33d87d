"""HDF5 artifacts (nodulekit.artifacts) key by key: what every artifact's root says, every refusal's
text naming the file, maps written and read back field by field; also the small pieces every
stage shares (text files a user gives, the error classes)."""

from __future__ import annotations

import json
import re
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nodulekit import __version__, artifacts, textfiles
from nodulekit.artifacts import open_artifact, read_kind, read_maps, write_artifact, write_maps
from nodulekit.errors import ArtifactError, DataError, NodulekitError, WriteFailed


def _cohort(path, **attrs):
    with write_artifact(path, "cohort", {"seed": 3}) as f:
        artifacts.write_strings(f, "nodule_id", ["a", "b"])
        f.attrs.update(attrs)
    return path


# --------------------------------------------------------------------------- writing and reading


def test_provenance_has_command_version_time_and_extras(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nodulekit", "build", "x"])
    p = artifacts.provenance(seed=1, source="s")
    assert list(p) == ["command", "nodulekit_version", "created", "seed", "source"]
    assert p["command"] == "nodulekit build x" and p["nodulekit_version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["created"])
    assert artifacts.provenance(command="mine")["command"] == "mine"  # a stage may say it itself


def test_an_artifact_says_its_kind_version_and_provenance(tmp_path):
    path = _cohort(tmp_path / "c.h5")
    with h5py.File(path) as f:
        assert f.attrs["nodulekit_kind"] == "cohort" and f.attrs["schema_version"] == 1
        assert json.loads(f.attrs["provenance"]) == {"seed": 3}
        assert artifacts.get_provenance(f) == {"seed": 3}
        assert artifacts.read_strings(f["nodule_id"]) == ["a", "b"]
        assert f["nodule_id"].dtype == artifacts.STR
    assert read_kind(path) == "cohort"
    with open_artifact(path, ("rois", "cohort")) as f:
        assert f.artifact_path == path
    with pytest.raises(NodulekitError, match="already exists"):
        _cohort(path)
    with write_artifact(path, "cohort", {"t": tmp_path}, overwrite=True) as f:
        artifacts.write_strings(f, "nodule_id", [1])
    with h5py.File(path, "r+") as f:
        assert artifacts.get_provenance(f) == {"t": str(tmp_path)}
        del f.attrs["provenance"]
        assert artifacts.get_provenance(f) == {}


def test_write_artifact_refuses_an_unknown_kind_and_a_missing_member(tmp_path):
    with pytest.raises(ValueError) as err:
        with write_artifact(tmp_path / "x.h5", "scores", {}):
            pass
    assert str(err.value) == "unknown artifact kind 'scores'"
    with pytest.raises(ArtifactError) as err:
        with write_artifact(tmp_path / "x.h5", "fold_result", {}) as f:
            f["history"] = [1.0]
            f["test_y"] = [1]
    assert str(err.value) == "internal: fold_result artifact lacks test_index, test_prob, test_nodule_id"
    assert list(tmp_path.iterdir()) == []


def test_read_kind_refusals(tmp_path):
    with pytest.raises(ArtifactError) as err:
        read_kind(tmp_path / "none.h5")
    assert str(err.value) == f"{tmp_path / 'none.h5'} does not exist"
    with pytest.raises(ArtifactError) as err:
        read_kind(tmp_path)
    assert str(err.value) == f"{tmp_path} is a folder, not an artifact file"
    (tmp_path / "t.h5").write_text("text")
    with pytest.raises(ArtifactError) as err:
        read_kind(tmp_path / "t.h5")
    assert str(err.value) == f"{tmp_path / 't.h5'} is not an HDF5 file"
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ArtifactError) as err:
        read_kind(tmp_path / "plain.h5")
    assert str(err.value) == f"{tmp_path / 'plain.h5'} is not a nodulekit artifact (no nodulekit_kind attribute)"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ArtifactError) as err:
        read_kind(tmp_path / "loop")
    assert str(err.value).startswith(f"{tmp_path / 'loop'} ")


def test_read_kind_of_an_unreadable_file_names_the_reason(tmp_path, monkeypatch):
    (tmp_path / "x.h5").write_bytes(b"")

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(artifacts.h5py, "is_hdf5", denied)
    with pytest.raises(ArtifactError) as err:
        read_kind(tmp_path / "x.h5")
    assert str(err.value) == f"{tmp_path / 'x.h5'} cannot be read: Permission denied"


def test_open_artifact_refusals(tmp_path):
    path = _cohort(tmp_path / "c.h5")
    with pytest.raises(ArtifactError) as err:
        open_artifact(path, ("maps", "dataset"))
    assert str(err.value) == f"{path} is a 'cohort' artifact, expected 'maps' or 'dataset'"
    with pytest.raises(ArtifactError, match=r"is a 'cohort' artifact, expected 'rois'$"):
        open_artifact(path, "rois")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(ArtifactError) as err:
        open_artifact(path, "cohort")
    assert str(err.value) == f"{path} has cohort schema version 2; this nodulekit reads version 1"
    with h5py.File(path, "r+") as f:
        del f.attrs["schema_version"]
    with pytest.raises(ArtifactError, match="has cohort schema version -1;"):
        open_artifact(path, "cohort")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
        del f["nodule_id"]
    with pytest.raises(ArtifactError) as err:
        open_artifact(path, "cohort")
    assert str(err.value) == f"{path} is a malformed cohort artifact: missing nodule_id"
    with write_artifact(tmp_path / "r.h5", "fold_result", {}) as f:
        for name in artifacts.REQUIRED["fold_result"]:
            f[name] = [0]
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        del f["test_prob"], f["test_y"]
    with pytest.raises(ArtifactError, match=r"malformed fold_result artifact: missing test_prob, test_y$"):
        open_artifact(tmp_path / "r.h5", "fold_result")


def test_unreadable_says_truncated_or_corrupt():
    assert str(artifacts.unreadable("f.h5", OSError("Unable to open (truncated file: eof = 1)\nmore"))) == (
        "f.h5 is not a readable HDF5 file: truncated (an interrupted copy or write?)"
    )
    assert str(artifacts.unreadable("f.h5", OSError("bad superblock\nmore"))) == (
        "f.h5 is not a readable HDF5 file: corrupt (bad superblock)"
    )
    assert (
        str(artifacts.unreadable("f.h5", RuntimeError())) == "f.h5 is not a readable HDF5 file: corrupt (RuntimeError)"
    )


def test_a_truncated_artifact_is_one_line(tmp_path):
    path = _cohort(tmp_path / "c.h5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as err:
        open_artifact(path, "cohort")
    assert str(err.value) == f"{path} is not a readable HDF5 file: truncated (an interrupted copy or write?)"


def test_an_error_while_reading_names_the_file(tmp_path):
    path = _cohort(tmp_path / "c.h5")
    with pytest.raises(ArtifactError) as err:
        with open_artifact(path, "cohort"):
            raise OSError("Can't read data (inflate() failed)")
    assert str(err.value) == f"{path} is not a readable HDF5 file: corrupt (Can't read data (inflate() failed))"
    with pytest.raises(ArtifactError, match=r"corrupt \(boom\)"):
        with open_artifact(path, "cohort"):
            raise RuntimeError("boom")
    with pytest.raises(KeyError):
        with open_artifact(path, "cohort"):
            raise KeyError("not a read error")
    with pytest.raises(WriteFailed):
        with open_artifact(path, "cohort"):
            raise WriteFailed("mine")


def test_json_attributes_and_string_datasets(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        artifacts.set_json_attr(f, "a", {"p": tmp_path})
        assert artifacts.get_json_attr(f, "a") == {"p": str(tmp_path)}
        assert artifacts.get_json_attr(f, "none") is None and artifacts.get_json_attr(f, "none", 5) == 5
        artifacts.write_strings(f, "s", ["é", 3])
        assert artifacts.read_strings(f["s"]) == ["é", "3"]
        f["n"] = [7, 8]  # ids stored as numbers by an older writer are read as text
        assert artifacts.read_strings(f["n"]) == ["7", "8"]
    assert artifacts.rois_group("LIDC-0001:2") == "LIDC-0001_2"
    assert artifacts.rois_group(7) == "7"


# --------------------------------------------------------------------------- maps


def _maps(n=2):
    rng = np.random.default_rng(0)
    return rng.random((n, 2, 4, 4)).astype(np.float32), np.array([0.25, 0.75][:n])


def test_maps_round_trip_field_by_field(tmp_path):
    maps, prob = _maps()
    path = write_maps(tmp_path / "sam.h5", nodule_id=["a:1", "b:1"], maps=maps.astype(np.float64), prob=prob,
                      method="sam", arch="hesam", source="run", prov={"k": 1}, y=[0, 1], fold=[3, 4],
                      extra={"logits": np.ones((2, 2))}, dataset_identity={"fingerprint": "f"})  # fmt: skip
    assert path == tmp_path / "sam.h5"
    m = read_maps(path)
    assert m.path == path and m.nodule_id == ["a:1", "b:1"]
    assert m.maps.dtype == np.float32 and m.maps_up.dtype == np.float32 and m.prob.dtype == np.float32
    np.testing.assert_array_equal(m.maps, maps)
    up = F.interpolate(torch.from_numpy(maps), size=(32, 32), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(m.maps_up, up, rtol=0, atol=1e-6)
    assert m.prob.tolist() == [0.25, 0.75] and m.y.tolist() == [0, 1] and m.fold.tolist() == [3, 4]
    assert m.y.dtype == np.int64 and m.fold.dtype == np.int64
    assert (m.method, m.arch, m.source) == ("sam", "hesam", "run")
    assert list(m.extra) == ["logits"] and m.extra["logits"].tolist() == [[1, 1], [1, 1]]
    assert m.provenance == {"k": 1} and m.dataset_identity == {"fingerprint": "f"}
    with h5py.File(path) as f:
        assert f["maps"].compression == "gzip" and f["maps"].compression_opts == 4
        assert f["maps_up"].compression == "gzip" and f["maps_up"].compression_opts == 4


def test_maps_defaults(tmp_path):
    maps, prob = _maps()
    given_up = np.zeros((2, 2, 32, 32))
    write_maps(tmp_path / "cam.h5", nodule_id=["a", "b"], maps=maps, prob=prob, method="cam", arch="a", source="s",
               prov={}, maps_up=given_up)  # fmt: skip
    m = read_maps(tmp_path / "cam.h5")
    assert m.y.tolist() == [-1, -1] and m.fold.tolist() == [-1, -1]
    assert m.extra == {} and m.dataset_identity is None and np.all(m.maps_up == 0)
    with h5py.File(tmp_path / "cam.h5", "r+") as f:
        for name in ("method", "arch", "source"):
            del f.attrs[name]
        f.create_group("grp")
    m = read_maps(tmp_path / "cam.h5")
    assert (m.method, m.arch, m.source) == ("cam", "", "")  # the method from the file name
    assert m.extra == {}  # a group is not an extra member
    with pytest.raises(NodulekitError, match="already exists"):
        write_maps(tmp_path / "cam.h5", nodule_id=["a", "b"], maps=maps, prob=prob, method="cam", arch="a",
                   source="s", prov={})  # fmt: skip
    write_maps(tmp_path / "cam.h5", nodule_id=["c", "d"], maps=maps, prob=prob, method="cam", arch="a",
               source="s", prov={}, overwrite=True)  # fmt: skip
    assert read_maps(tmp_path / "cam.h5").nodule_id == ["c", "d"]


def test_maps_that_are_not_finite_are_refused_before_and_after(tmp_path):
    maps, prob = _maps()
    maps[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ArtifactError) as err:
        write_maps(tmp_path / "m.h5", nodule_id=["a", "b"], maps=maps, prob=prob, method="m", arch="a", source="s",
                   prov={})  # fmt: skip
    assert str(err.value) == (
        f"{tmp_path / 'm.h5'}: maps holds 3 NaN or infinite value(s); the model that made them failed (diverged?), "
        "so there is nothing to score; retrain it"
    )
    assert not (tmp_path / "m.h5").exists()
    maps, prob = _maps()
    with pytest.raises(ArtifactError, match=r": prob holds 1 NaN"):
        write_maps(tmp_path / "m.h5", nodule_id=["a", "b"], maps=maps, prob=[np.nan, 0.5], method="m", arch="a",
                   source="s", prov={})  # fmt: skip
    with pytest.raises(ArtifactError, match=r": maps_up holds 128 NaN"):
        write_maps(tmp_path / "m.h5", nodule_id=["a", "b"], maps=maps, prob=prob, method="m", arch="a", source="s",
                   prov={}, maps_up=np.full((2, 2, 32, 32), 0.0) + np.where(np.arange(32) < 1, np.nan, 0))  # fmt: skip
    write_maps(tmp_path / "m.h5", nodule_id=["a", "b"], maps=maps, prob=prob, method="m", arch="a", source="s", prov={})
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["prob"][0] = np.inf
    with pytest.raises(ArtifactError, match=rf"^{re.escape(str(tmp_path / 'm.h5'))}: prob holds 1 NaN"):
        read_maps(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["prob"][0] = 0.5
        f["maps_up"][0, 0, 0, 0] = np.nan
    with pytest.raises(ArtifactError, match=r": maps_up holds 1 NaN"):
        read_maps(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["maps_up"][0, 0, 0, 0] = 0
        f["maps"][1, 1, 1, 1] = np.nan
    with pytest.raises(ArtifactError, match=r": maps holds 1 NaN"):
        read_maps(tmp_path / "m.h5")
    artifacts.check_finite_maps("p", maps=None, prob=np.array([0.5]))
    with pytest.raises(ArtifactError, match=r"^p: prob holds 1 NaN"):
        artifacts.check_finite_maps("p", maps=None, prob=np.array([np.nan]))  # a missing member is skipped


# --------------------------------------------------------------------------- text files, errors


def test_read_text_refusals_name_what_and_the_file(tmp_path):
    with pytest.raises(DataError) as err:
        textfiles.read_text(tmp_path, "manifest")
    assert str(err.value) == f"manifest {tmp_path} is a folder, not a file"
    with pytest.raises(DataError) as err:
        textfiles.read_text(tmp_path / "none.csv", "manifest")
    assert str(err.value) == f"manifest {tmp_path / 'none.csv'} does not exist"
    (tmp_path / "l1.csv").write_bytes("a,b\nx,y\nna\xefve\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        textfiles.read_text(tmp_path / "l1.csv", "table")
    assert str(err.value) == f"table {tmp_path / 'l1.csv'} is not UTF-8 text (byte 0xef on line 3); save it as UTF-8"
    (tmp_path / "first.csv").write_bytes(b"\x80")
    with pytest.raises(DataError, match=r"\(byte 0x80 on line 1\)"):
        textfiles.read_text(tmp_path / "first.csv", "table")
    (tmp_path / "bom.csv").write_bytes("\ufeffa,b\n".encode())
    assert textfiles.read_text(str(tmp_path / "bom.csv"), "t") == "a,b\n"


def test_read_text_of_a_file_that_cannot_be_read(tmp_path, monkeypatch):
    (tmp_path / "x.csv").write_text("a")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(textfiles.Path, "read_bytes", denied)
    with pytest.raises(DataError) as err:
        textfiles.read_text(tmp_path / "x.csv", "table")
    assert str(err.value) == f"table {tmp_path / 'x.csv'} cannot be read (Permission denied)"


def test_read_csv_rows_with_line_numbers(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(' a , b ,,c\n1, 2 ,z\n\n , \n"x\ny",3,4,5,6\n')
    header, rows = textfiles.read_csv(path, "table")
    assert header == ["a", "b", "", "c"]
    assert rows == [(2, {"a": "1", "b": "2", "c": ""}), (6, {"a": "x\ny", "b": "3", "c": "5"})]


def test_read_csv_refusals(tmp_path):
    path = tmp_path / "t.csv"
    for text in ("", "\n", " , \n1,2\n"):
        path.write_text(text)
        with pytest.raises(DataError) as err:
            textfiles.read_csv(path, "table")
        assert str(err.value) == f"table {path} is empty (no header row)"
    path.write_text("a,b, a\n")
    with pytest.raises(DataError) as err:
        textfiles.read_csv(path, "table")
    assert str(err.value) == f"table {path} has the column 'a' twice"
    path.write_text(",x,,y\n1,2,3,4\n")
    assert textfiles.read_csv(path, "t")[0] == ["", "x", "", "y"]  # empty names are not duplicates
    path.write_text("a,b\n1,2\n" + "x" * 200_000 + "\n")
    with pytest.raises(DataError) as err:
        textfiles.read_csv(path, "table")
    assert str(err.value) == f"table {path} line 3: not valid CSV (field larger than field limit (131072))"


def test_error_classes_exit_codes_and_pickling():
    import pickle

    assert NodulekitError.exit_code == 2 and ArtifactError.exit_code == 2 and DataError.exit_code == 2
    assert issubclass(ArtifactError, NodulekitError) and issubclass(DataError, NodulekitError)
    assert WriteFailed.exit_code == 1 and issubclass(WriteFailed, NodulekitError)
    e = WriteFailed("could not write x: full", reason="full")
    assert (str(e), e.reason) == ("could not write x: full", "full")
    assert WriteFailed("m").reason == "m"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is WriteFailed and (str(back), back.reason) == ("could not write x: full", "full")
