"""The training recipe in the model description, and its test-time augmentation in the exported graph.

`describe` of a RUNDIR (ensemble and one fold), of a checkpoint copied out of its RUNDIR and of
the exported ONNX (one fold and `--ensemble`) shows the same recipe; the ONNX graph of a TTA
recipe computes `recipes.tta_probabilities` and maps turned back onto the input.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nodulekit import export as ex  # noqa: E402
from nodulekit import recipes  # noqa: E402
from nodulekit.training import TrainConfig, load_fold_model, predict_logits, train  # noqa: E402
from tests.conftest import write_tiny_dataset  # noqa: E402

torch.set_num_threads(1)
TINY = dict(model_options={"base_width": 4}, epochs=1, batch_size=8, lr=0.01, device="cpu", amp=False)
# Long enough that the EMA weights leave their start and the probabilities depend on the view
# (1 epoch at 0.01 changes them by less than the export tolerance).
ROBUST_TINY = {**TINY, "epochs": 3, "lr": 0.1}
# The robust recipe as `describe` must print it, written out by hand.
ROBUST_LINE = (
    "robust: flips=true, rot90=true, shift_px=2, scale=0.1, targets=readers, label_smoothing=0, "
    "weight_decay=0.0005, dropout=0.2, ema_decay=0.98, ema_batch_norm=recompute, tta=true, seeds=1"
)
PAPER_LINE = (
    "paper: flips=false, rot90=false, shift_px=0, scale=0, targets=hard, label_smoothing=0, "
    "weight_decay=none, dropout=0, ema_decay=0, tta=false, seeds=1"
)


@pytest.fixture(scope="session")
def robust(tmp_path_factory):
    """A 2-fold HESAM trained with the robust recipe, its fold-0 and ensemble exports (the legacy
    exporter, for speed) and a copy of its fold-0 checkpoint outside the RUNDIR."""
    folder = tmp_path_factory.mktemp("recipe_export")
    dataset = write_tiny_dataset(folder / "d3c.h5", n=20, channels=3, folds=2)
    rundir = folder / "run"
    train(dataset, rundir, TrainConfig(arch="hesam", recipe=recipes.ROBUST, **ROBUST_TINY), progress=False)
    fold0 = folder / "fold0.onnx"
    ex.export_onnx(ex.load_model_source(rundir, 0), fold0, exporter="torchscript")
    ensemble = folder / "ensemble.onnx"  # what `export-onnx RUNDIR --ensemble` writes
    ex.export_onnx(ex.load_ensemble_source(rundir), ensemble, exporter="torchscript")
    loose = folder / "elsewhere" / "checkpoint.pt"
    loose.parent.mkdir()
    shutil.copy(rundir / "fold0" / "checkpoint.pt", loose)
    return {
        "folder": folder,
        "dataset": dataset,
        "rundir": rundir,
        "fold0": fold0,
        "ensemble": ensemble,
        "loose": loose,
    }


@pytest.fixture(scope="session")
def paper(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paper_export")
    dataset = write_tiny_dataset(folder / "d3c.h5", n=20, channels=3, folds=2)
    rundir = folder / "run"
    train(dataset, rundir, TrainConfig(arch="hesam", **TINY), folds=[0], progress=False)
    onnx_path = folder / "fold0.onnx"
    ex.export_onnx(ex.load_model_source(rundir, 0), onnx_path, exporter="torchscript")
    return {"rundir": rundir, "onnx": onnx_path}


def _describe(run_cli, *args) -> tuple[dict, str]:
    code, out, err = run_cli("describe", *args, "--json")
    assert code == 0, err
    card = json.loads(out)
    code, text, err = run_cli("describe", *args)
    assert code == 0, err
    return card, text


def _line(text: str, key: str) -> str:
    found = [ln[len(key) :].strip() for ln in text.splitlines() if ln.startswith(key + " ")]
    assert len(found) == 1, text
    return found[0]


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# ----------------------------------------------------------------------------- the recipe in describe


def test_recipe_round_trips_through_describe(robust, run_cli):
    sources = {
        "rundir": (robust["rundir"],),
        "rundir fold 0": (robust["rundir"], "--fold", "0"),
        "checkpoint out of its RUNDIR": (robust["loose"],),
        "onnx fold 0": (robust["fold0"],),
        "onnx ensemble": (robust["ensemble"],),
    }
    records, cards = {}, {}
    for name, args in sources.items():
        card, text = _describe(run_cli, *args)
        cards[name] = card
        records[name] = card["training_recipe"]
        assert _line(text, "recipe") == ROBUST_LINE, name
        assert _line(text, "test-time aug.").startswith("applied by the model: prob, map and map_up"), name
    first = records["rundir"]
    assert all(r == first for r in records.values()), records
    cards["onnx ensemble"].pop("export")  # what only a file has; the rest is one description
    assert cards["onnx ensemble"] == cards["rundir"]
    assert recipes.recipe_from_record(first) == recipes.ROBUST
    assert first["test_time_augmentation"]["in_model"] is True
    # ONNX metadata carry the recipe once: in the description's entry, read by older readers too
    for path in (robust["fold0"], robust["ensemble"]):
        meta = _meta(path)
        assert [k for k, v in meta.items() if '"ema_decay"' in v] == [recipes.RECIPE_KEY]
        assert recipes.recipe_from_record(meta[recipes.RECIPE_KEY]) == recipes.ROBUST


def test_paper_runs_say_paper_and_no_tta(paper, run_cli):
    for args in ((paper["rundir"], "--fold", "0"), (paper["onnx"],)):
        card, text = _describe(run_cli, *args)
        assert _line(text, "recipe") == PAPER_LINE
        assert _line(text, "test-time aug.").startswith("none: prob and map come from one forward pass")
        assert recipes.recipe_from_record(card["training_recipe"]) == recipes.PAPER
        assert card["training_recipe"]["test_time_augmentation"]["in_model"] is False


def _rewrite(src, dst, change):
    proto = onnx.load(str(src))
    change({p.key: p for p in proto.metadata_props}, proto)
    onnx.save(proto, str(dst))
    return dst


def test_files_exported_before_the_card_carried_the_recipe(robust, tmp_path, run_cli):
    """An earlier file stored the bare recipe (and its graph applied no TTA); an older one none."""

    def bare(entries, proto):
        entries[recipes.RECIPE_KEY].value = json.dumps(recipes.ROBUST.as_dict())

    def none(entries, proto):
        proto.metadata_props.remove(entries[recipes.RECIPE_KEY])

    card, text = _describe(run_cli, _rewrite(robust["fold0"], tmp_path / "bare.onnx", bare))
    assert recipes.recipe_from_record(card["training_recipe"]) == recipes.ROBUST
    assert card["training_recipe"]["test_time_augmentation"]["in_model"] is False
    assert _line(text, "recipe") == ROBUST_LINE
    assert _line(text, "test-time aug.").startswith("NOT applied by this graph")
    card, text = _describe(run_cli, _rewrite(robust["fold0"], tmp_path / "none.onnx", none))
    assert _line(text, "recipe") == PAPER_LINE


# ----------------------------------------------------------------------------- TTA in the graph


def _tta_prob(model, x: np.ndarray) -> np.ndarray:
    """recipes.tta_probabilities: what training reported for the test fold."""
    xt = torch.as_tensor(x)
    return recipes.tta_probabilities(model, xt, np.arange(len(x)), 4, False, predict_logits).numpy()


def _off_centre(ds_x: np.ndarray) -> np.ndarray:
    """Dataset rows with a bright blob added in one corner: evidence that is not symmetric."""
    x = ds_x.copy()
    x[:, :, 3:11, 20:29] = 0.9
    return x


def test_onnx_probabilities_are_the_tta_probabilities(robust):
    from nodulekit.datasets import load_dataset

    x = _off_centre(load_dataset(robust["dataset"]).x[:6])
    members = [load_fold_model(robust["rundir"], k)[0].eval() for k in range(2)]
    tta = [_tta_prob(m, x) for m in members]
    with torch.no_grad():
        plain = torch.softmax(members[0](torch.as_tensor(x)), 1).numpy()
    prob = ort.InferenceSession(str(robust["fold0"]), providers=["CPUExecutionProvider"]).run(["prob"], {"x": x})[0]
    np.testing.assert_allclose(prob, tta[0], atol=ex.PROB_ATOL, rtol=0)
    assert np.abs(prob - plain).max() > 10 * ex.PROB_ATOL, "TTA changes nothing here: the check proves nothing"
    sess = ort.InferenceSession(str(robust["ensemble"]), providers=["CPUExecutionProvider"])
    prob, member_prob = sess.run(["prob", "member_prob"], {"x": x})
    np.testing.assert_allclose(prob, (tta[0] + tta[1]) / 2, atol=ex.PROB_ATOL, rtol=0)
    np.testing.assert_allclose(member_prob, np.stack([p[:, 1] for p in tta], 1), atol=ex.PROB_ATOL, rtol=0)
    # the file's reference pair still reproduces, and is a TTA output
    for path in (robust["fold0"], robust["ensemble"]):
        assert set(ex.check_test_data_set(path)) >= {"prob", "map", "map_up"}
    ref = json.loads(_meta(robust["fold0"])["test_data_set"])
    ref_x = ex.decode_array(ref["inputs"]["x"])
    np.testing.assert_allclose(ex.decode_array(ref["outputs"]["prob"]), _tta_prob(members[0], ref_x), atol=ex.PROB_ATOL)


def _maps_turned_back(model, x: torch.Tensor, sign: int) -> torch.Tensor:
    """Mean over the 8 views of each view's map rotated by sign x k quarter turns (torch.rot90;
    sign -1 undoes the view, +1 is the mistake of turning it further)."""
    out = []
    for k in range(4):
        for flip in (False, True):
            view = torch.rot90(x, k, dims=(-2, -1))
            view = torch.flip(view, dims=(-1,)) if flip else view
            amap = model.activation_map(view)[1]
            amap = torch.flip(amap, dims=(-1,)) if flip else amap
            out.append(torch.rot90(amap, sign * k, dims=(-2, -1)))
    return torch.stack(out).mean(0)


def test_onnx_map_lies_on_the_input(robust):
    """The graph's map of an off-centre input is the mean of the views' maps turned back (torch.rot90
    here, not the graph's code); turning them the wrong way would give a map far outside tolerance."""
    from nodulekit.datasets import load_dataset

    x = _off_centre(load_dataset(robust["dataset"]).x[:4])
    model = load_fold_model(robust["rundir"], 0)[0].eval()
    with torch.no_grad():
        right = _maps_turned_back(model, torch.as_tensor(x), -1).numpy()
        wrong = _maps_turned_back(model, torch.as_tensor(x), +1).numpy()
    amap, map_up = ort.InferenceSession(str(robust["fold0"]), providers=["CPUExecutionProvider"]).run(
        ["map", "map_up"], {"x": x}
    )
    tol = ex.MAP_RTOL * np.abs(right).max() + ex.MAP_ATOL_FLOOR
    assert np.abs(amap - right).max() <= tol
    assert np.abs(wrong - right).max() > 100 * tol, "the inverse does not matter here: the check proves nothing"
    up = torch.nn.functional.interpolate(torch.as_tensor(right), size=(32, 32), mode="bilinear", align_corners=False)
    assert np.abs(map_up - up.numpy()).max() <= tol


class _Equivariant(torch.nn.Module):
    """A model whose map is its input's mean channel, pooled 2x2: a TTA map turned back correctly
    equals the un-augmented map exactly, whatever the input."""

    in_channels, num_classes, map_kind, arch = 3, 2, "cam", "equivariant"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32))

    def activation_map(self, x):
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 2)
        logits = torch.stack([-(x * self.w).sum((1, 2, 3)), (x * self.w).sum((1, 2, 3))], 1)
        return logits, torch.cat([-m, m], 1)

    def forward(self, x):
        return self.activation_map(x)[0]


def test_tta_map_of_an_equivariant_model_is_not_rotated(tmp_path):
    x = np.zeros((2, 3, 32, 32), np.float32)
    x[0, :, 2:9, 21:30] = 1.0  # top right
    x[1, :, 20:30, 4:8] = 1.0  # bottom left, tall
    model = _Equivariant().eval()
    src = ex.ModelSource(model, "in-memory equivariant", run={"recipe": recipes.ROBUST.as_dict()})
    ex.export_onnx(src, tmp_path / "eq.onnx", exporter="torchscript")
    amap, map_up = ort.InferenceSession(str(tmp_path / "eq.onnx"), providers=["CPUExecutionProvider"]).run(
        ["map", "map_up"], {"x": x}
    )
    with torch.no_grad():
        plain = model.activation_map(torch.as_tensor(x))[1].numpy()
    np.testing.assert_allclose(amap, plain, atol=1e-6)
    peak = np.unravel_index(np.argmax(map_up[0, 1]), (32, 32))
    assert 2 <= peak[0] <= 8 and 21 <= peak[1] <= 29, peak
    # the views really differ (TTA of a non-equivariant probability is not the plain one)
    with torch.no_grad():
        p_plain = torch.softmax(model(torch.as_tensor(x)), 1).numpy()
    p_graph = ort.InferenceSession(str(tmp_path / "eq.onnx"), providers=["CPUExecutionProvider"]).run(
        ["prob"], {"x": x}
    )[0]
    np.testing.assert_allclose(p_graph, _tta_prob(model, x), atol=ex.PROB_ATOL)
    assert np.abs(p_graph - p_plain).max() > 0.01


def test_predict_with_pytorch_applies_the_same_tta(robust):
    """A RUNDIR run with PyTorch (predict, describe) gives the exported graph's probabilities."""
    from nodulekit.datasets import load_dataset
    from nodulekit.engines import TorchEngine

    x = _off_centre(load_dataset(robust["dataset"]).x[:5])
    engine = TorchEngine(robust["rundir"], None, device="cpu", amp=False, channels_last=False)
    got = engine.run(x)
    prob, map_up, member_prob = ort.InferenceSession(str(robust["ensemble"]), providers=["CPUExecutionProvider"]).run(
        ["prob", "map_up", "member_prob"], {"x": x}
    )
    np.testing.assert_allclose(got.prob, prob[:, 1], atol=ex.PROB_ATOL)
    np.testing.assert_allclose(got.members, member_prob, atol=ex.PROB_ATOL)
    np.testing.assert_allclose(got.map_up, map_up[:, 1], atol=ex.MAP_RTOL * np.abs(map_up).max() + ex.MAP_ATOL_FLOOR)
