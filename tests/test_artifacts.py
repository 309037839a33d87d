"""The artifact layer (nodulekit.artifacts): atomic writes, kind / schema-version / member checks.

A crashed or interrupted writer must leave no file under the final name and must not touch
an artifact it was replacing; a reader must refuse a file of another schema version instead
of misreading it.
"""

from __future__ import annotations

import json
import os
import stat

import h5py
import numpy as np
import pytest

from nodulekit import artifacts as A
from nodulekit.errors import ArtifactError, NodulekitError


class Crash(Exception):
    pass


def write_cohort(path, value: str = "a", overwrite: bool = False, crash_after_member: bool = False):
    with A.write_artifact(path, "cohort", A.provenance(stage="test"), overwrite=overwrite) as f:
        A.write_strings(f, "nodule_id", [value, value + "2"])
        f["payload"] = np.arange(1000)
        if crash_after_member:
            raise Crash("disk full")
    return path


def folder_listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_crash_mid_write_leaves_no_file_and_no_temporary(tmp_path):
    with pytest.raises(Crash):
        write_cohort(tmp_path / "c.h5", crash_after_member=True)
    assert folder_listing(tmp_path) == []


def test_an_interrupt_mid_write_keeps_the_artifact_it_was_replacing(tmp_path):
    path = write_cohort(tmp_path / "c.h5", "old")
    before = path.read_bytes()
    for error in (Crash, KeyboardInterrupt):
        with pytest.raises(error):
            with A.write_artifact(path, "cohort", A.provenance(), overwrite=True) as f:
                A.write_strings(f, "nodule_id", ["new"])
                raise error()
        assert path.read_bytes() == before
        assert folder_listing(tmp_path) == ["c.h5"]
    with A.open_artifact(path, "cohort") as f:
        assert A.read_strings(f["nodule_id"]) == ["old", "old2"]


def test_the_final_name_appears_only_when_the_artifact_is_complete(tmp_path):
    path = tmp_path / "c.h5"
    old = write_cohort(tmp_path / "old.h5", "old")
    with A.write_artifact(path, "cohort", A.provenance()) as f:
        A.write_strings(f, "nodule_id", ["x"])
        f.flush()
        assert not path.exists()  # readers never see a half-written file
    assert path.exists()
    before = old.read_bytes()
    with A.write_artifact(old, "cohort", A.provenance(), overwrite=True) as f:
        A.write_strings(f, "nodule_id", ["new"])
        f.flush()
        assert old.read_bytes() == before  # the replaced artifact is whole until the rename
    with A.open_artifact(old, "cohort") as f:
        assert A.read_strings(f["nodule_id"]) == ["new"]
    assert folder_listing(tmp_path) == ["c.h5", "old.h5"]


def test_written_artifact_records_kind_version_and_provenance(tmp_path):
    path = write_cohort(tmp_path / "c.h5")
    with h5py.File(path) as f:
        assert f.attrs["nodulekit_kind"] == "cohort" and int(f.attrs["schema_version"]) == 1
        prov = json.loads(f.attrs["provenance"])
    assert prov["stage"] == "test" and {"command", "nodulekit_version", "created"} <= set(prov)


def test_artifact_permissions_follow_the_umask_not_the_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_cohort(tmp_path / "c.h5")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_existing_output_is_refused_without_overwrite(tmp_path):
    path = write_cohort(tmp_path / "c.h5", "old")
    before = path.read_bytes()
    with pytest.raises(NodulekitError, match="already exists"):
        write_cohort(path, "new")
    assert path.read_bytes() == before
    with pytest.raises(NodulekitError, match="does not exist"):
        write_cohort(tmp_path / "missing" / "c.h5")


def test_a_writer_that_forgets_a_required_member_writes_nothing(tmp_path):
    with pytest.raises(ArtifactError, match="cohort artifact lacks nodule_id"):
        with A.write_artifact(tmp_path / "c.h5", "cohort", A.provenance()) as f:
            f["something_else"] = 1
    assert folder_listing(tmp_path) == []
    with pytest.raises(ValueError, match="unknown artifact kind"):
        with A.write_artifact(tmp_path / "c.h5", "nonsense", A.provenance()):
            pass


@pytest.mark.parametrize("version", [0, 2, 99])
def test_another_schema_version_is_refused(tmp_path, version):
    path = write_cohort(tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(ArtifactError, match=f"has cohort schema version {version}; this nodulekit reads version 1"):
        A.open_artifact(path, "cohort")


def test_a_file_without_schema_version_is_refused(tmp_path):
    path = write_cohort(tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        del f.attrs["schema_version"]
    with pytest.raises(ArtifactError, match="schema version -1"):
        A.open_artifact(path, "cohort")


def test_kind_and_members_are_checked_on_reading(tmp_path):
    path = write_cohort(tmp_path / "c.h5")
    with pytest.raises(ArtifactError, match=r"is a 'cohort' artifact, expected 'maps'"):
        A.open_artifact(path, "maps")
    with A.open_artifact(path, ("maps", "cohort")) as f:
        assert "nodule_id" in f
    with h5py.File(path, "a") as f:
        del f["nodule_id"]
    with pytest.raises(ArtifactError, match="malformed cohort artifact: missing nodule_id"):
        A.open_artifact(path, "cohort")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    with pytest.raises(ArtifactError, match="not a nodulekit artifact"):
        A.open_artifact(plain, "cohort")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ArtifactError, match="not an HDF5 file"):
        A.open_artifact(tmp_path / "text.h5", "cohort")
    with pytest.raises(ArtifactError, match="does not exist"):
        A.open_artifact(tmp_path / "none.h5", "cohort")


def _maps_kwargs(maps, **extra):
    n = len(maps)
    return dict(
        nodule_id=[f"P{i}:1" for i in range(n)],
        maps=maps,
        prob=np.linspace(0.1, 0.9, n),
        method="cam",
        arch="hand",
        source="test",
        prov=A.provenance(),
        **extra,
    )


def test_write_maps_resizes_missing_maps_up_at_half_pixel_centres(tmp_path):
    # A ramp on the 8x8 grid: output pixel u samples s = (u + 0.5) / 4 - 0.5, clamped to [0, 7].
    i, j = np.mgrid[:8, :8]
    maps = np.stack([2.0 * i - j, 0.5 * j + 1.0])[None].repeat(3, 0).astype(np.float32)
    A.write_maps(tmp_path / "m.h5", **_maps_kwargs(maps))
    out = A.read_maps(tmp_path / "m.h5")
    s = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
    np.testing.assert_allclose(out.maps_up[:, 0], np.broadcast_to(2 * s[:, None] - s[None, :], (3, 32, 32)), atol=1e-5)
    np.testing.assert_allclose(out.maps_up[:, 1], np.broadcast_to(0.5 * s[None, :] + 1, (3, 32, 32)), atol=1e-5)
    np.testing.assert_array_equal(out.y, -1)
    np.testing.assert_array_equal(out.fold, -1)


def test_non_finite_maps_are_refused_on_writing_and_reading(tmp_path):
    maps = np.ones((2, 2, 4, 4), np.float32)
    bad = maps.copy()
    bad[1, 0, 2, 2] = np.nan
    with pytest.raises(ArtifactError, match="maps holds 1 NaN or infinite"):
        A.write_maps(tmp_path / "bad.h5", **_maps_kwargs(bad))
    assert folder_listing(tmp_path) == []
    path = A.write_maps(tmp_path / "m.h5", **_maps_kwargs(maps))
    with h5py.File(path, "a") as f:
        f["prob"][0] = np.inf
    with pytest.raises(ArtifactError, match="prob holds 1 NaN or infinite"):
        A.read_maps(path)


def test_atomic_path_for_other_outputs(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(Crash):
        with A.atomic_path(target, suffix=".csv.part") as tmp:
            tmp.write_text("half")
            raise Crash()
    assert target.read_text() == "old\n" and folder_listing(tmp_path) == ["table.csv"]
    with A.atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and folder_listing(tmp_path) == ["table.csv"]
