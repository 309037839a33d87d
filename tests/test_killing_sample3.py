"""Tests for survivors of the third whole-package mutant sample (tools/mutant_sample.py, seed 3;
docs/testing.md): written after that sample was measured, so they do not count in its score."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest

from nodulekit import outputs


class _Libc:
    """A libc whose renameat2 fails: the kernel or file system lacks RENAME_NOREPLACE."""

    def __init__(self, calls):
        self.calls = calls

    def renameat2(self, *args):
        self.calls.append(args)
        return -1


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EINVAL])
def test_rename_noreplace_falls_back_to_rename_where_the_file_system_lacks_it(tmp_path, monkeypatch, err):
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: _Libc(calls))
    monkeypatch.setattr(ctypes, "get_errno", lambda: err)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.txt").write_text("x")
    outputs._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert (tmp_path / "c" / "f.txt").read_text() == "x"
    assert len(calls) == 1 and calls[0][4] == 1  # RENAME_NOREPLACE asked for first


def test_rename_noreplace_names_the_target_of_any_other_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: _Libc([]))
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EXDEV)
    (tmp_path / "a").mkdir()
    with pytest.raises(OSError) as raised:
        outputs._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert raised.value.errno == errno.EXDEV and raised.value.filename == str(tmp_path / "c")
    assert (tmp_path / "a").is_dir() and not (tmp_path / "c").exists()


def test_lungs_grow_around_each_slice_of_a_nodule_by_that_slices_outline_only():
    """A nodule over two slices: one voxel in the first (row 120, column 250), a 4 x 4 block (rows
    120-123, columns 250-253) in the second. Each slice's lung grows 9 four-neighbour steps (6 mm at
    0.7 mm) around its own outline: a growth that also stepped across slices would carry the block's
    outline into the first slice."""
    from nodulekit import phantom

    geom = phantom.ScanGeometry("P1", "1.2", "1.2.3", 0.7, 2.5, (0.0, 2.5, 5.0))
    cmask = np.zeros((4, 4, 2), bool)
    cmask[0, 0, 0] = True
    cmask[:, :, 1] = True
    chest = phantom.chest_background(
        geom, np.random.default_rng(4), [(cmask, (slice(120, 124), slice(250, 254), slice(1, 3)))]
    )
    rows, cols = np.mgrid[:512, :512]
    from_voxel = np.abs(rows - 120) + np.abs(cols - 250)
    from_block = np.maximum(np.maximum(120 - rows, rows - 123), 0) + np.maximum(np.maximum(250 - cols, cols - 253), 0)
    assert np.mean(chest[:, :, 1][from_voxel <= 9] < -600) > 0.95
    assert (chest[:, :, 1][(from_voxel > 9) & (from_block <= 8)] == 40.0).all()  # mediastinum, not lung
    assert np.mean(chest[:, :, 2][from_block <= 9] < -600) > 0.95


def test_a_model_without_an_arch_name_is_described_by_its_class():
    """A model object that lost its `arch` attribute (older pickles, foreign wrappers) is named by
    its Python class in the description, never by "None"."""
    from nodulekit import modelcard
    from nodulekit.models.registry import create_model

    model = create_model("hesam", 1, base_width=4)
    assert modelcard.build_card([model], {}, [{"fold": 0, "epoch": 1}])["arch"] == "hesam"
    del model.arch
    assert modelcard.build_card([model], {}, [{"fold": 0, "epoch": 1}])["arch"] == type(model).__name__ != "None"


def test_ct_intensity_check_reads_every_voxel_of_a_volume_of_exactly_four_million():
    """Up to 4,000,000 voxels the check reads the whole volume; only larger ones are strided
    (every 4th row and column). Lung only in rows 1, 5, 9, ... is a quarter of this volume but
    none of the strided sample."""
    from nodulekit.errors import DataError
    from nodulekit.sources import check_ct_intensities

    hu = np.zeros((200, 200, 100), np.float32)  # 4,000,000 voxels of soft tissue
    hu[1::4] = -800.0
    hu[0, 0, 0] = -3000.0  # padding, left out
    check_ct_intensities(hu, "exact.nii")
    bigger = np.concatenate([hu, hu[:4]], axis=0)  # 4,080,000 voxels: strided, no lung seen
    with pytest.raises(DataError, match="^bigger.nii: intensities do not look like CT"):
        check_ct_intensities(bigger, "bigger.nii")
