"""The HDF5 sink that keeps a failing disk away from the HDF5 library (nodulekit.outputs)."""

from __future__ import annotations

import errno
import io

import h5py
import numpy as np
import pytest

from nodulekit.outputs import _FailSafeFile, hdf5_file


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
