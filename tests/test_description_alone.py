"""A re-implementer who has only the model file reproduces nodulekit's probability exactly.

`reimplemented_input` below follows the arithmetic the model description states
(docs/model-description.md; the ONNX metadata `input_spec` and `preprocessing`), written here
with numpy and nibabel only: it imports none of nodulekit's input code. Its input, run through
ONNX Runtime, must give the probability `nodulekit predict` gives to 1e-6, on synthetic CT
(non-square pixels, a nodule at the scan's edge and end, a D3C model whose 4 x diameter crop
reaches the window's margin) and on real LIDC-IDRI VOIs (skipped without ../shared).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
nib = pytest.importorskip("nibabel")

TOL = 1e-6

# ----------------------------------------------------------------------------- the description, re-implemented


def read_description(onnx_path: Path) -> dict:
    """The input spec, as a user reads it: ONNX Runtime's custom metadata map, JSON."""
    meta = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_modelmeta()
    return json.loads(meta.custom_metadata_map["input_spec"])


def volume_of(path: Path):
    """hu[row, col, k]: rows towards posterior, columns towards the patient's left, slices by z (mm)."""
    img = nib.load(str(path))
    data = img.get_fdata(dtype=np.float64)
    to_target = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(("P", "L", "S"))
    )
    arr = nib.orientations.apply_orientation(data, to_target)
    affine = img.affine @ nib.orientations.inv_ornt_aff(to_target, data.shape)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    z = affine[2, 3] + affine[2, 2] * np.arange(arr.shape[2])
    return arr, spacing, z


def centre_and_diameter(mask: np.ndarray, spacing, z):
    idx = np.argwhere(mask > 0)
    r, c, k = idx.mean(axis=0)
    k0 = int(math.floor(k))
    zc = z[k0] + (k - k0) * (z[min(k0 + 1, len(z) - 1)] - z[k0])
    volume = len(idx) * spacing[0] * spacing[1] * spacing[2]
    return (r, c, zc), (6 * volume / math.pi) ** (1 / 3)


def bilinear(v: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    i, j = np.floor(y).astype(int), np.floor(x).astype(int)
    u, q = y - i, x - j
    n_r, n_c = v.shape

    def at(a, b):
        return v[np.clip(a, 0, n_r - 1), np.clip(b, 0, n_c - 1)].astype(np.float64)

    return (
        (1 - u) * (1 - q) * at(i, j)
        + (1 - u) * q * at(i, j + 1)
        + u * (1 - q) * at(i + 1, j)
        + u * q * at(i + 1, j + 1)
    )


def reimplemented_input(spec: dict, hu, spacing, z, centre, d) -> np.ndarray:
    """x [C, N, N] from the description's numbers and formulas alone."""
    r, c, zc = centre
    s_r, s_c = spacing[0], spacing[1]
    n_rows, n_cols, n_k = hu.shape
    side = math.ceil(max(spec["window_diameters"] * d, spec["min_window_mm"]) / min(s_r, s_c) - 1e-9)
    side += 1 - side % 2
    r0, c0 = round(r) - (side - 1) // 2, round(c) - (side - 1) // 2  # Python's round: half to even
    rows = np.clip(r0 + np.arange(side), 0, n_rows - 1)
    cols = np.clip(c0 + np.arange(side), 0, n_cols - 1)
    lo, hi = spec["hu_window"]
    n = spec["patch_px"]
    x = np.empty((len(spec["channels"]), n, n), np.float32)
    for ch, channel in enumerate(spec["channels"]):
        f = np.interp(zc + channel["z_offset_mm"], z, np.arange(n_k, dtype=float))
        k0 = int(math.floor(f))
        k1, w = min(k0 + 1, n_k - 1), f - k0
        plane = (1 - w) * hu[np.ix_(rows, cols, [k0])][..., 0] + w * hu[np.ix_(rows, cols, [k1])][..., 0]
        plane = np.clip(np.rint(plane), -32768, 32767).astype(np.int16)
        v = (np.clip(plane.astype(np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
        t = channel["p"] * d / n
        steps = np.arange(n) + 0.5 - n // 2
        ys = (r - r0) + steps * (t / s_r)
        xs = (c - c0) + steps * (t / s_c)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        x[ch] = np.clip(bilinear(v, yy, xx).astype(np.float32), 0.0, 1.0)
    return x


def probability(onnx_path: Path, x: np.ndarray) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return float(session.run(["prob"], {"x": x[None].astype(np.float32)})[0][0, 1])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Random-weight narrow HESAMs (D3C and D21C) with non-trivial batch-norm statistics."""
    from nodulekit.export import export_onnx
    from nodulekit.models import create_model

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("alone")
    out = {}
    for channels in (3, 21):
        torch.manual_seed(channels)
        net = create_model("hesam", channels, base_width=4).eval()
        gen = torch.Generator().manual_seed(1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
        out[channels] = folder / f"d{channels}c.onnx"
        export_onnx(net, out[channels], exporter="torchscript")
    return out


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _nodulekit(model: Path, ct: Path, mask: Path):
    from nodulekit.predict import predict

    res = predict(model, ct, mask=mask, mask_mode="labels", provider="cpu")
    return {r["id"]: (r["probability"], inp.x) for r, inp in zip(res.records, res.inputs, strict=True)}


def _check(model: Path, ct: Path, mask: Path) -> float:
    spec = read_description(model)
    hu, spacing, z = volume_of(ct)
    labels = nib.orientations.apply_orientation(
        np.asanyarray(nib.load(str(mask)).dataobj),
        nib.orientations.ornt_transform(
            nib.orientations.io_orientation(nib.load(str(mask)).affine), nib.orientations.axcodes2ornt(("P", "L", "S"))
        ),
    )
    got = _nodulekit(model, ct, mask)
    worst = 0.0
    for value in np.unique(labels[labels > 0]):
        centre, d = centre_and_diameter(labels == value, spacing, z)
        x = reimplemented_input(spec, hu, spacing, z, centre, d)
        p_nodulekit, x_nodulekit = got[str(int(value))]
        assert np.abs(x - x_nodulekit).max() <= TOL, f"label {value}: inputs differ"
        worst = max(worst, abs(probability(model, x) - p_nodulekit))
    return worst


# ----------------------------------------------------------------------------- tests


def test_synthetic_ct_probability_from_the_description_alone(models, tmp_path):
    rng = np.random.default_rng(3)
    shape, spacing = (60, 52, 23), (0.62, 0.77, 1.7)  # stored i, j, k: non-square pixels
    data = rng.integers(-950, -700, shape).astype(np.int16)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    labels = np.zeros(shape, np.int16)
    # A nodule in the middle; one in a corner and at the last slices (edges repeated in-plane and in z).
    for value, (ci, cj, ck, radius) in enumerate(((31.4, 24.2, 11.3, 4.6), (3.2, 48.5, 21.4, 2.7)), start=1):
        dist = np.sqrt(((ii - ci) * spacing[0]) ** 2 + ((jj - cj) * spacing[1]) ** 2 + ((kk - ck) * spacing[2]) ** 2)
        body = dist <= radius
        data[body] = rng.integers(-40, 90, int(body.sum()))
        labels[body] = value
    # Stored as a RAS NIfTI with the first two axes reversed and swapped: the re-implementation
    # must bring it to rows = posterior, columns = left itself.
    affine = np.array([[0, -spacing[1], 0, 40.0], [-spacing[0], 0, 0, 10.0], [0, 0, spacing[2], -80.0], [0, 0, 0, 1]])
    ct = _write(tmp_path / "ct.nii.gz", data, affine)
    mask = _write(tmp_path / "mask.nii.gz", labels, affine)
    for channels, model in models.items():
        worst = _check(model, ct, mask)
        print(f"D{channels}C synthetic: max |dp| {worst:.2e}")
        assert worst <= TOL


def test_coarse_ct_where_rounding_and_the_window_edge_matter(models, tmp_path):
    """1.95 mm pixels, 2 mm slices and a 2x2x1-voxel nodule centred at (20.5, 14.5, 11): the window
    origin rounds half to even (20, 14), D3C's 4 x diameter crop reaches past the 9-pixel window,
    and D21C's odd planes fall halfway between slices, where HU round half to even."""
    rng = np.random.default_rng(5)
    shape, spacing = (40, 30, 24), (1.95, 1.95, 2.0)
    data = rng.integers(-950, -600, shape).astype(np.int16)
    labels = np.zeros(shape, np.int16)
    data[20:22, 14:16, 11] = rng.integers(-60, 80, (2, 2))
    labels[20:22, 14:16, 11] = 1
    affine = np.diag([-spacing[1], -spacing[0], spacing[2], 1.0])[[1, 0, 2, 3]]  # stored rows = RAS -y
    ct = _write(tmp_path / "coarse.nii.gz", data, affine)
    mask = _write(tmp_path / "coarse_mask.nii.gz", labels, affine)
    for channels, model in models.items():
        worst = _check(model, ct, mask)
        print(f"D{channels}C coarse: max |dp| {worst:.2e}")
        assert worst <= TOL


@pytest.mark.shared
def test_real_vois_probability_from_the_description_alone(models, lidc_vois, tmp_path):
    import csv

    from scipy import ndimage

    picked = []
    with open(lidc_vois / "manifest.csv", newline="") as fh:
        rows = [{k: lidc_vois / row[k] for k in ("image", "mask")} for row in csv.DictReader(fh)]
    for row in rows[::50]:  # VOIs across the collection whose union mask is one 26-connected nodule
        mask = np.asanyarray(nib.load(str(row["mask"])).dataobj) > 0
        if ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 1:
            picked.append(row)
        if len(picked) == 6:
            break
    worst = 0.0
    for row in picked:
        img = nib.load(str(row["mask"]))
        mask = _write(tmp_path / Path(row["mask"]).name, (np.asanyarray(img.dataobj) > 0).astype(np.uint8), img.affine)
        for model in models.values():
            worst = max(worst, _check(model, Path(row["image"]), mask))
    print(f"{len(picked)} real VOIs, D3C and D21C: max |dp| {worst:.2e}")
    assert worst <= TOL
