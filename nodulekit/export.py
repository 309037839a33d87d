"""ONNX export of a trained classifier *with its soft activation map*, and ONNX Runtime inference.

The exported graph has one input and three outputs:

- ``x``      float32 [batch, C, 32, 32] (dynamic batch), normalised like the training dataset;
- ``prob``   float32 [batch, classes]: softmax of the logits (column 1 = malignant);
- ``map``    float32 [batch, classes, h, w]: the model's own activation map
  M_c = sum_k gamma_k^c g_k (CAM Eq. 2, SAM Eq. 7, HESAM Eq. 11), computed inside the graph
  by ``model.activation_map`` on the final conv feature grid (16x16 for the paper's model);
- ``map_up`` float32 [batch, classes, 32, 32]: ``map`` resized bilinearly
  (``align_corners=False``) to the input grid, the same resize ``nodulekit maps`` uses.

Grad-CAM needs gradients, which an inference graph does not carry, so models without a
map-defining head (``map_kind is None``) are refused with a one-line error.

Everything needed to use the file without the RUNDIR is stored in the model's
``metadata_props`` (architecture, channels, normalisation, label rule, training-data
fingerprint, fold, map definition, verification tolerances and measured differences).
After export the file is run in ONNX Runtime (CPU) against PyTorch on real inputs when the
run's dataset is reachable (else seeded uniform [0, 1] inputs) and is only moved into
place when the outputs agree within ``PROB_ATOL`` / ``MAP_RTOL``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit import __version__
from nodulekit.constants import CLASS_NAMES, INPUT_SIZE, MALIGNANT
from nodulekit.errors import NodulekitError
from nodulekit.modelcard import array_record, decode_array  # the test_data_set array format

# Version 2 carries the model description (nodulekit.modelcard) and no local paths.
FORMAT = "nodulekit-onnx/2"
READABLE_FORMATS = ("nodulekit-onnx/1", FORMAT)
INPUT_NAME = "x"
OUTPUT_NAMES = ("prob", "map", "map_up")
MEMBER_OUTPUT = "member_prob"  # ensembles only: [batch, members] malignant probability of each fold model
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")

# Tolerances of the ONNX Runtime vs PyTorch check. Probabilities live in [0, 1]: an absolute
# bound. Maps are unnormalised sums over K channels whose scale depends on the weights, so
# their bound is relative to the largest |M| in the checked batch (with a tiny floor so an
# all-zero map does not demand exact equality).
PROB_ATOL = 1e-4
MAP_RTOL = 1e-4
MAP_ATOL_FLOOR = 1e-6

MAP_DEFINITIONS = {
    "cam": "CAM (Zhou et al. 2016, paper Eq. 2): M_c = sum_k w_k^c g_k, w = FC weights after global average pooling",
    "sam": "SAM (paper Eq. 7): M'_c = sum_k gamma_k^c g_k, gamma = final classifier weights over H_k = h_k(avgpool(g_k))",
    "hesam": "HESAM (paper Eq. 11): M^h_c = sum_k gamma_k^ch g_k, gamma = final classifier weights over H_k + d_k (GMP high-level feature)",
}

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# --------------------------------------------------------------------------------------
# Loading the model to export
# --------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """A model (or the fold models of an ensemble) ready for export, plus what is known about its training.

    ``source`` names where it came from without a local path (it goes into the model file).
    """

    model: Any
    source: str
    fold: int | None = None
    epoch: int | None = None
    run: dict[str, Any] = field(default_factory=dict)
    members: list[Any] = field(default_factory=list)  # fold models of an ensemble (empty: just `model`)
    member_info: list[dict[str, Any]] = field(default_factory=list)  # [{fold, epoch}] per member
    rundir: Path | None = None

    @property
    def models(self) -> list[Any]:
        return self.members or [self.model]

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def info(self) -> list[dict[str, Any]]:
        return self.member_info or [{"fold": self.fold, "epoch": self.epoch}]

    @property
    def recipe(self):
        """The training recipe (nodulekit.recipes.Recipe; the paper's when the run records none)."""
        from nodulekit.recipes import recipe_from_record

        return recipe_from_record(self.run.get("recipe"))


def load_model_source(path: str | os.PathLike, fold: int | None = None) -> ModelSource:
    """Load a model from a RUNDIR (``fold`` defaults to 0) or a ``checkpoint.pt`` file, on CPU."""
    from nodulekit.run import Run, load_checkpoint, model_from_checkpoint

    path = Path(path)
    if not path.exists():
        raise NodulekitError(f"{path} does not exist")
    if path.is_dir():
        run = Run(path)
        fold = 0 if fold is None else int(fold)
        if not run.checkpoint_path(fold).exists():
            folds = sorted(p.parent.name for p in path.glob("fold*/checkpoint.pt"))
            raise NodulekitError(f"{path} has no trained fold {fold} (found: {', '.join(folds) or 'no checkpoints'})")
        model, ckpt = run.load_model(fold, device="cpu")
        source = f"fold{fold}/checkpoint.pt of a nodulekit RUNDIR"
        return _identified(ModelSource(model, source, fold, ckpt.get("epoch"), run.record, rundir=path))
    ckpt = load_checkpoint(path)
    # A checkpoint inside a RUNDIR (RUNDIR/fold<k>/checkpoint.pt) still finds its run.json, and must fit it.
    run = {}
    if (path.parent.parent / "run.json").exists():
        owner = Run(path.parent.parent)
        owner.check_checkpoint(ckpt, path)
        run = owner.record
    model = model_from_checkpoint(ckpt, path)
    # Training also stores provenance in the checkpoint: use it for a checkpoint copied out of its RUNDIR.
    for key in ("label_rule", "normalisation", "input_spec", "dataset_fingerprint", "dataset_identity", "recipe"):
        if run.get(key) is None and ckpt.get(key) is not None:
            value = ckpt[key]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            run[key] = value
    if fold is None and ckpt.get("fold") is not None:
        fold = int(ckpt["fold"])
    if fold is None and path.parent.name.startswith("fold") and path.parent.name[4:].isdigit():
        fold = int(path.parent.name[4:])
    rundir = path.parent.parent if run else None
    return _identified(ModelSource(model, f"checkpoint file {path.name}", fold, ckpt.get("epoch"), run, rundir=rundir))


def load_ensemble_source(rundir: str | os.PathLike) -> ModelSource:
    """Every fold model of a RUNDIR, for one graph that averages them; every fold must be finished."""
    from nodulekit.run import Run

    run = Run(rundir)
    if run.n_folds < 2:
        raise NodulekitError(f"{run.path} has {run.n_folds} fold; an ensemble needs at least 2")
    run.require_finished(range(run.n_folds), " for an ensemble of every fold")
    members, info = [], []
    for k in range(run.n_folds):
        model, ckpt = run.load_model(k, device="cpu")
        members.append(model.eval())
        info.append({"fold": k, "epoch": ckpt.get("epoch")})
    source = f"all {run.n_folds} fold models of a nodulekit RUNDIR (mean of their probabilities and maps)"
    return _identified(
        ModelSource(members[0], source, None, None, run.record, members=members, member_info=info, rundir=run.path)
    )


def _identified(src: ModelSource) -> ModelSource:
    """A trained model must say which dataset (and folds) it was trained on: older runs and
    checkpoints, which do not, are refused in one line."""
    if not isinstance(src.run.get("dataset_identity"), dict):
        raise NodulekitError(
            f"{src.source} records no dataset identity (trained before fold assignments were part of it), "
            "so the data it was trained on cannot be checked; re-train it with this version"
        )
    return src


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def inference_module(model, tta: bool = False):
    """nn.Module whose forward is exactly what the ONNX graph computes.

    ``model`` is one classifier, or a list of fold models: then the probabilities and the
    maps are the members' means (``map_up`` of the mean = mean of the ``map_up``s, the resize
    being linear), and a fourth output holds each member's malignant probability.
    ``tta`` (a recipe's test-time augmentation): each member's probabilities and map are its
    means over the 8 flips/rotations of ``x``, maps turned back first
    (:func:`nodulekit.recipes.tta_activation_map`), as the run's test probabilities were.
    """
    import torch
    import torch.nn.functional as F

    from nodulekit.recipes import tta_activation_map

    class SoftActivationMapExport(torch.nn.Module):
        def __init__(self, members, tta):
            super().__init__()
            self.members = torch.nn.ModuleList(members)
            self.ensemble = len(members) > 1
            self.tta = tta

        def forward(self, x):
            probs, maps = [], []
            for member in self.members:
                if self.tta:
                    prob, soft_activation_map = tta_activation_map(member, x)
                else:
                    logits, soft_activation_map = member.activation_map(x)
                    prob = torch.softmax(logits, dim=1)
                probs.append(prob)
                maps.append(soft_activation_map)
            prob = torch.stack(probs).mean(0) if self.ensemble else probs[0]
            soft_activation_map = torch.stack(maps).mean(0) if self.ensemble else maps[0]
            map_up = F.interpolate(
                soft_activation_map, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
            if self.ensemble:
                return prob, soft_activation_map, map_up, torch.stack([p[:, 1] for p in probs], dim=1)
            return prob, soft_activation_map, map_up

    return SoftActivationMapExport(list(model) if isinstance(model, (list, tuple)) else [model], tta).eval()


def output_names(ensemble: bool) -> tuple[str, ...]:
    return (*OUTPUT_NAMES, MEMBER_OUTPUT) if ensemble else OUTPUT_NAMES


def reference_outputs(model, x: np.ndarray, tta: bool = False) -> tuple[np.ndarray, ...]:
    """PyTorch (prob, map, map_up[, member_prob]) for ``x``: the reference the ONNX graph must reproduce.

    ``model``: one classifier or a list of fold models; ``tta``: see :func:`inference_module`.
    """
    import torch

    wrapper = inference_module(model, tta)
    with torch.inference_mode():
        out = wrapper(torch.as_tensor(np.asarray(x, np.float32)))
    return tuple(t.detach().cpu().numpy() for t in out)


def check_exportable(model) -> None:
    kind = getattr(model, "map_kind", None)
    if kind is None:
        arch = getattr(model, "arch", type(model).__name__)
        raise NodulekitError(
            f"model {arch!r} has no map-defining head (map_kind None): its only map is Grad-CAM, which needs "
            "gradients and cannot live in an ONNX inference graph; export a cam, sam or hesam model"
        )
    if kind not in MAP_DEFINITIONS:
        raise NodulekitError(f"model map_kind {kind!r} is not one of {', '.join(MAP_DEFINITIONS)}")


def _torch_export(wrapper, example, path: Path, opset: int, exporter: str) -> None:
    import torch

    names = list(output_names(wrapper.ensemble))

    if exporter == "dynamo":
        import logging

        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        onnx_log = logging.getLogger("torch.onnx")
        level = onnx_log.level
        # The exporter logs optional-op registration notes (e.g. "torchvision is not installed") as warnings.
        onnx_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    optimize=True,
                )
        finally:
            onnx_log.setLevel(level)
    elif exporter == "torchscript":
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *names)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter warns about its own deprecation
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    else:
        raise NodulekitError(f"unknown exporter {exporter!r} (choose {' or '.join(EXPORTERS)})")


def _export_inputs(src: ModelSource, channels: int, n: int, seed: int) -> tuple[np.ndarray, str]:
    """Real inputs from the run's dataset when it can be read, else seeded uniform [0, 1].

    A dataset at the recorded path that is not the one the model was trained on (rebuilt
    with other folds, say) is refused: the metadata would name the wrong data.
    """
    from nodulekit.datasets import check_identity, load_dataset
    from nodulekit.run import recorded_dataset

    ds_path, _ = recorded_dataset(src.run)
    ds = None
    if ds_path and Path(ds_path).exists():
        try:
            ds = load_dataset(ds_path)
        except NodulekitError:
            ds = None  # unreadable: verify on uniform inputs instead
    if ds is not None and src.run.get("dataset_identity") is not None:
        check_identity(src.run["dataset_identity"], ds, src.source, ds_path)
    if ds is not None:
        from nodulekit.modelcard import run_spec

        check_spec(run_spec(src.run, channels), ds, src.source)
    if ds is not None and ds.channels == channels:
        rows = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
        return ds.x[rows], f"dataset {ds.name} rows {rows.tolist()}"  # no local path: it goes in the file
    rng = np.random.default_rng(seed)
    return rng.random((n, channels, INPUT_SIZE, INPUT_SIZE), dtype=np.float32), f"uniform [0,1) seed {seed}"


def compare_outputs(got: tuple[np.ndarray, ...], ref: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Max absolute differences and the map scale, as stored in metadata and checked."""
    # probabilities: `prob` and, for an ensemble, each member's (`member_prob`)
    prob_diff = float(max(np.max(np.abs(g - r)) for g, r in zip([got[0], *got[3:]], [ref[0], *ref[3:]], strict=True)))
    scale = float(max(np.max(np.abs(ref[1])), np.max(np.abs(ref[2]))))
    map_diff = float(max(np.max(np.abs(got[1] - ref[1])), np.max(np.abs(got[2] - ref[2]))))
    return {
        "prob_max_abs_diff": prob_diff,
        "map_max_abs_diff": map_diff,
        "map_scale": scale,
        "map_tol": MAP_RTOL * scale + MAP_ATOL_FLOOR,
        "prob_tol": PROB_ATOL,
    }


def ort_session(onnx_path: str | os.PathLike, providers: list[str], options=None):
    """An ONNX Runtime session, or one line naming the file when this onnxruntime cannot load it
    (an opset newer than it supports, an unknown operator, a damaged graph)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        # ORT's message carries a C++ source location and signature; its last sentence says why.
        sentences = [t.strip() for t in " ".join(str(exc).split()).split(". ") if t.strip()]
        why = sentences[-1].rstrip(".")[:200] if sentences else type(exc).__name__
        raise NodulekitError(f"{onnx_path}: this onnxruntime {ort.__version__} cannot load the model: {why}") from None


def verify_against_torch(onnx_path: str | os.PathLike, model, x: np.ndarray, tta: bool = False) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) at batch 1 and batch len(x); raise if it disagrees.

    ``model``: one classifier or the list of an ensemble's fold models; ``tta``: see :func:`inference_module`.
    """

    session = ort_session(onnx_path, ["CPUExecutionProvider"])
    names = list(output_names(isinstance(model, (list, tuple)) and len(model) > 1))
    report: dict[str, Any] = {}
    for label, batch in (("batch1", x[:1]), (f"batch{len(x)}", x)):
        got = tuple(session.run(names, {INPUT_NAME: batch}))
        ref = reference_outputs(model, batch, tta)
        shapes_ok = all(g.shape == r.shape for g, r in zip(got, ref, strict=True))
        if not shapes_ok:
            raise NodulekitError(
                f"ONNX Runtime output shapes {[g.shape for g in got]} differ from PyTorch {[r.shape for r in ref]} at {label}"
            )
        d = compare_outputs(got, ref)
        report[label] = d
        if not (d["prob_max_abs_diff"] <= d["prob_tol"] and d["map_max_abs_diff"] <= d["map_tol"]):
            raise NodulekitError(
                f"ONNX Runtime disagrees with PyTorch at {label}: max |dprob| {d['prob_max_abs_diff']:.3g} "
                f"(tol {PROB_ATOL:g}), max |dmap| {d['map_max_abs_diff']:.3g} (tol {d['map_tol']:.3g} = "
                f"{MAP_RTOL:g} x map scale {d['map_scale']:.3g}); the file was not written"
            )
    return report


def build_metadata(src: ModelSource, opset: int, exporter: str, model_version: int | None = None) -> dict[str, str]:
    """Everything the file says about itself (no local paths): legacy keys plus the model description."""
    import torch

    from nodulekit import modelcard
    from nodulekit.run import recorded_dataset

    model, run = src.model, src.run
    channels = int(getattr(model, "in_channels"))
    label_rule = run.get("label_rule")
    normalisation = run.get("normalisation")
    _, fingerprint = recorded_dataset(run)
    card = modelcard.build_card(src.models, run, src.info(), src.rundir)
    outputs = {
        "prob": "softmax of the logits [batch, classes]; column 1 = malignant",
        "map": "soft activation map on the final feature grid [batch, classes, h, w], raw (unnormalised)",
        "map_up": f"'map' resized bilinearly (align_corners=False) to [batch, classes, {INPUT_SIZE}, {INPUT_SIZE}]",
    }
    if src.recipe.tta:
        outputs = {k: f"{modelcard.TTA_MEAN}: {v}" for k, v in outputs.items()}
    if src.ensemble:
        outputs = {k: f"mean over the {len(src.models)} fold models of: {v}" for k, v in outputs.items()}
        outputs[MEMBER_OUTPUT] = "malignant probability of each fold model [batch, members], in 'members' order"
    meta = {
        "nodulekit_format": FORMAT,
        "model_version": str(model_version if model_version is not None else default_model_version(run)),
        "nodulekit_version": __version__,
        "torch_version": torch.__version__,
        "exporter": f"torch.onnx.export ({exporter}), opset {opset}",
        "arch": card["arch"],
        "model_config": card["model_config"],
        "in_channels": str(channels),
        "num_classes": str(int(getattr(model, "num_classes", 2))),
        "class_names": json.dumps(list(CLASS_NAMES)),
        "input": f"{INPUT_NAME}: float32 [batch, {channels}, {INPUT_SIZE}, {INPUT_SIZE}] built as in 'preprocessing'",
        "outputs": json.dumps(outputs),
        "map_kind": str(model.map_kind),
        "map_definition": MAP_DEFINITIONS[model.map_kind] + (f"; {modelcard.TTA_MEAN}" if src.recipe.tta else ""),
        "normalisation": json.dumps(normalisation) if normalisation is not None else "unknown",
        "label_rule": json.dumps(label_rule) if label_rule is not None else "unknown",
        "dataset_name": str(card["training_data"]["dataset_name"]),
        "dataset_fingerprint": fingerprint or "unknown",
        "dataset_identity": json.dumps(run["dataset_identity"]) if run.get("dataset_identity") else "unknown",
        "fold": "ensemble" if src.ensemble else (str(src.fold) if src.fold is not None else "unknown"),
        "epoch": "ensemble" if src.ensemble else (str(src.epoch) if src.epoch is not None else "unknown"),
        "source": src.source,
        **modelcard.to_metadata(card),  # its training_recipe: the recipe and whether the graph applies its TTA
    }
    return meta


def graph_digest(proto) -> str:
    """sha256 of the serialised graph (metadata excluded): ties the description to this graph."""
    import hashlib

    return hashlib.sha256(proto.graph.SerializeToString()).hexdigest()


def export_onnx(
    source: ModelSource | Any,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    overwrite: bool = False,
    n_check: int = 8,
    seed: int = 0,
    model_version: int | None = None,
) -> dict[str, Any]:
    """Export ``source`` (a ModelSource, possibly an ensemble, or a bare NoduleClassifier) to one ONNX file.

    Returns the metadata written (including the verification report). The file appears at
    ``out`` only after ONNX Runtime reproduced PyTorch within the tolerances.
    """
    import torch

    from nodulekit.artifacts import atomic_path, check_output_path

    if not isinstance(source, ModelSource):
        source = ModelSource(source, source=f"in-memory {type(source).__name__}")
    models = [m.eval().to("cpu") for m in source.models]
    for m in models:
        check_exportable(m)
    if exporter not in EXPORTERS:
        raise NodulekitError(f"unknown exporter {exporter!r} (choose {' or '.join(EXPORTERS)})")
    if not 13 <= int(opset) <= 23:
        raise NodulekitError(f"opset {opset} not supported (use 13..23; default {DEFAULT_OPSET})")
    out = check_output_path(out, overwrite)
    channels = int(models[0].in_channels)
    x_check, x_desc = _export_inputs(source, channels, max(2, n_check), seed)
    meta = build_metadata(source, opset, exporter, model_version)
    tta = source.recipe.tta  # the graph applies the recipe's test-time augmentation, as the run's figures did
    # Batch 2 as the traced example so no dimension is specialised to 1.
    example = torch.as_tensor(x_check[:2])
    with atomic_path(out, suffix=".part.onnx") as tmp:
        try:
            _torch_export(inference_module(models, tta), example, tmp, int(opset), exporter)
        except NodulekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - exporter errors are long; keep the first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise NodulekitError(f"torch.onnx.export ({exporter}) failed for {meta['arch']}: {first}") from None
        report = verify_against_torch(tmp, models, x_check, tta)
        meta["verification"] = json.dumps(
            {
                "inputs": x_desc,
                "runtime": "onnxruntime CPUExecutionProvider",
                "prob_atol": PROB_ATOL,
                "map_rtol": MAP_RTOL,
                **report,
            }
        )
        meta["test_data_set"] = json.dumps(make_test_data_set(tmp, x_check[:1], x_desc, len(models) > 1))
        _write_metadata(tmp, meta)
        check_test_data_set(tmp)  # the stored vectors are what the written file computes
    return meta


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    """Store ``meta`` (plus the graph's digest) in the ONNX file at ``path``, checked."""
    import onnx

    proto = onnx.load(str(path))
    _document(proto, meta)  # doc strings are part of the graph: set before its digest
    meta["graph_sha256"] = graph_digest(proto)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "nodulekit"
    proto.producer_version = __version__
    proto.model_version = int(meta["model_version"])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path), save_as_external_data=False)


# --------------------------------------------------------------------------------------
# Inference with ONNX Runtime
# --------------------------------------------------------------------------------------


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The nodulekit metadata of an exported file, checked against its graph.

    One-line errors: not ONNX, not written by nodulekit, or a graph that is not the one the
    metadata describes (another input or outputs, or a graph changed after export).
    """
    import onnx

    path = Path(onnx_path)
    if not path.exists():
        raise NodulekitError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf decode errors
        raise NodulekitError(f"{path} is not an ONNX model") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("nodulekit_format") not in READABLE_FORMATS:
        found = meta.get("nodulekit_format", "no nodulekit_format metadata")
        raise NodulekitError(f"{path} is not a nodulekit ONNX export ({found}); make one with `nodulekit export-onnx`")
    missing = [k for k in ("in_channels", "map_kind", "arch") if k not in meta]
    if missing:
        raise NodulekitError(f"{path} lacks nodulekit metadata {', '.join(missing)}")
    check_graph(proto, meta, path)
    return meta


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def check_graph(proto, meta: dict[str, str], path: Path) -> None:
    """The graph's input, outputs and digest must be what the metadata says."""
    why = None
    inputs = {i.name: _dims(i) for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    expected_in = [int(meta["in_channels"]), INPUT_SIZE, INPUT_SIZE] if meta["in_channels"].isdigit() else None
    if INPUT_NAME not in inputs or expected_in is None or inputs[INPUT_NAME][1:] != expected_in:
        why = f"input {INPUT_NAME} is {inputs.get(INPUT_NAME)}, the metadata says [batch, {meta['in_channels']}, {INPUT_SIZE}, {INPUT_SIZE}]"
    elif outputs[:3] != list(OUTPUT_NAMES) or (meta.get("fold") == "ensemble") != (MEMBER_OUTPUT in outputs):
        why = f"outputs are {outputs}"
    elif "graph_sha256" in meta and graph_digest(proto) != meta["graph_sha256"]:
        why = "the graph was changed after export (its digest differs from graph_sha256)"
    if why:
        raise NodulekitError(f"{path}: the graph does not match its nodulekit metadata: {why}")


def read_model_card(onnx_path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, model description) of an exported file, for predict and describe."""
    from nodulekit.modelcard import from_metadata

    meta = read_metadata(onnx_path)
    return meta, from_metadata(meta, str(onnx_path))


def make_session(onnx_path: str | os.PathLike, provider: str = "auto"):
    """An InferenceSession on the requested provider; returns (session, provider_that_runs, note).

    ONNX Runtime silently falls back to CPU when a GPU provider cannot load (missing CUDA
    libraries), so the provider actually used is read back from ``session.get_providers()``.
    """
    import onnxruntime as ort

    provider = provider.lower()
    if provider not in ("auto", *PROVIDERS):
        raise NodulekitError(f"unknown provider {provider!r} (choose auto, cuda, tensorrt or cpu)")
    available = ort.get_available_providers()
    if provider == "auto":
        wanted = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    else:
        wanted = provider
        if PROVIDERS[wanted] not in available:
            hint = " (install the onnxruntime-gpu wheel on a machine with a GPU)" if wanted != "cpu" else ""
            raise NodulekitError(
                f"provider {wanted} is not available in this onnxruntime {ort.__version__} "
                f"(available: {', '.join(available)}){hint}"
            )
    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}[wanted]
    providers = [PROVIDERS[p] for p in chain if PROVIDERS[p] in available]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own fallback warnings are replaced by our one line
    session = ort_session(onnx_path, providers, options)
    active = session.get_providers()[0]
    ran = next((k for k, v in PROVIDERS.items() if v == active), active)
    note = ""
    if ran != wanted:
        if provider != "auto":
            raise NodulekitError(
                f"provider {wanted} is installed but failed to initialise (ONNX Runtime fell back to {ran}); "
                "check the CUDA/cuDNN/TensorRT libraries"
            )
        note = f"auto: {wanted} failed to initialise, running on {ran}"
    elif provider == "auto":
        note = f"auto: running on {ran}" + ("" if ran != "cpu" else " (no CUDA provider in this onnxruntime)")
    return session, ran, note


def run_session(
    session,
    x,
    batch: int = 256,
    binding_device: str | None = None,
    progress: bool = False,
    names=OUTPUT_NAMES,
    desc: str = "infer",
):
    """Run an exported model over ``x`` (array-like [N, C, 32, 32]) in batches.

    With ``binding_device`` ("cuda" on GPU providers) inputs and outputs go through IO
    binding: the input is copied to the device once and outputs are allocated there by ORT
    and copied back once per batch, instead of ORT staging every tensor through host memory.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    n = len(x)
    names = tuple(names)
    outs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    starts = range(0, n, batch)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        xb = np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
        if binding_device is None:
            res = session.run(list(names), {INPUT_NAME: xb})
        else:
            binding = session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(xb, binding_device, 0))
            for name in names:
                binding.bind_output(name, binding_device)
            session.run_with_iobinding(binding)
            res = binding.copy_outputs_to_cpu()
        for name, value in zip(names, res, strict=True):
            outs[name].append(value)
    if n == 0:
        raise NodulekitError("the input has no samples")
    return tuple(np.concatenate(outs[name]) for name in names)


def infer(
    onnx_path: str | os.PathLike,
    dataset_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    provider: str = "auto",
    batch: int = 256,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run an exported model over a ``dataset`` artifact and write a ``maps`` artifact.

    Returns a summary dict (provider that ran, note, N, seconds).
    """
    import time

    from nodulekit.artifacts import check_output_path
    from nodulekit.datasets import load_dataset

    if batch < 1:
        raise NodulekitError(f"--batch must be at least 1 (got {batch})")
    meta = read_metadata(onnx_path)
    check_output_path(out, overwrite)
    ds = load_dataset(dataset_path)
    _check_inputs_match(meta, ds, onnx_path)
    trained, overlap = training_rows(meta, ds)
    session, ran, note = make_session(onnx_path, provider)
    t0 = time.perf_counter()
    outputs = run_session(session, ds.x, batch, binding_device=None if ran == "cpu" else "cuda", progress=progress)
    seconds = time.perf_counter() - t0
    _write_inferred_maps(out, onnx_path, meta, ds, outputs, trained, ran, note, batch, seconds, overwrite)
    warning = (
        f"{int(trained.sum())} of {len(ds)} nodules were in the model's training data ({overlap}); their "
        "probabilities are not held-out estimates (the maps file marks them in `trained_on`)"
        if trained.any()
        else ""
    )
    return {
        "provider": ran,
        "note": note,
        "n": len(ds),
        "seconds": seconds,
        "out": str(out),
        "trained_on": int(trained.sum()),
        "warning": warning,
    }


def _write_inferred_maps(out, onnx_path, meta, ds, outputs, trained, ran, note, batch, seconds, overwrite) -> None:
    """The ``maps`` artifact of ``infer``: ONNX Runtime's outputs for every row of ``ds``."""
    from nodulekit.artifacts import provenance, write_maps

    prob, maps, maps_up = outputs
    model_fold = int(meta["fold"]) if meta.get("fold", "unknown").lstrip("-").isdigit() else -1
    prov = provenance(
        onnx=str(onnx_path),
        dataset=str(ds.path),
        provider=ran,
        provider_note=note,
        onnx_metadata={k: v for k, v in meta.items() if k != "verification"},
        label_rule=ds.label_rule,
        batch=batch,
        seconds=round(seconds, 4),
    )
    write_maps(
        out,
        nodule_id=ds.nodule_id,
        maps=maps,
        prob=prob[:, MALIGNANT],
        method=meta["map_kind"],
        arch=meta["arch"],
        source=f"onnx:{onnx_path}",
        prov=prov,
        y=ds.y,
        fold=np.full(len(ds), model_fold, np.int64),
        maps_up=maps_up,
        extra={"dataset_fold": np.asarray(ds.fold, np.int64), "trained_on": trained.astype(np.uint8)},
        overwrite=overwrite,
        dataset_identity=ds.identity,
    )


def _check_inputs_match(meta: dict[str, str], ds, onnx_path) -> None:
    """The dataset's inputs were made as the exported model's were: same channels and input spec
    (compared as numbers; files from before input specs get theirs from their older fields)."""
    if ds.channels != int(meta["in_channels"]):
        raise NodulekitError(
            f"channel mismatch: {onnx_path} expects {meta['in_channels']} channels, {ds.path} has {ds.channels}"
        )
    check_spec(metadata_spec(meta, str(onnx_path)), ds, str(onnx_path))


def metadata_spec(meta: dict[str, str], where: str):
    """The input spec an ONNX file records, or the one its older metadata imply (None: unknown)."""
    from nodulekit.inputs import stored_spec

    layout = None
    try:
        layout = (json.loads(meta.get("preprocessing", "null")) or {}).get("channels")
    except ValueError:
        pass
    channels = int(meta["in_channels"])
    return stored_spec(meta.get("input_spec"), channels, layout, meta.get("normalisation"), where)


def check_spec(model_spec, ds, owner: str) -> None:
    """Refuse, in one line, a dataset whose inputs were made by another spec than the model's."""
    data_spec = ds.input_spec
    if model_spec is None or data_spec is None:
        return
    diff = model_spec.difference(data_spec)
    if diff is not None:
        raise NodulekitError(f"input spec mismatch: {owner} vs {ds.path}: {diff}")


def training_rows(meta: dict[str, str], ds) -> tuple[np.ndarray, str]:
    """Which rows of a dataset the model was trained on, and how that is known.

    The training dataset itself (same fingerprint): every row outside the model's test fold
    (an ensemble: every row). Another dataset: the rows whose nodule id is one the model
    description lists as a training nodule.
    """
    from nodulekit.datasets import dataset_fingerprint

    fingerprint = meta.get("dataset_fingerprint", "unknown")
    if fingerprint != "unknown" and dataset_fingerprint(ds) == fingerprint:
        fold = meta.get("fold", "unknown")
        if fold.isdigit():
            return ds.fold != int(fold), f"this is its training dataset; rows outside test fold {fold}"
        what = "an ensemble of every fold" if fold == "ensemble" else "a model of unknown fold"
        return np.ones(len(ds), bool), f"this is its training dataset and the model is {what}"
    try:
        ids = json.loads(meta.get("training_data", "{}")).get("nodule_ids") or []
    except ValueError:
        ids = []
    return np.isin(np.asarray(ds.nodule_id, dtype=object), list(ids)), "by nodule id"


# --------------------------------------------------------------------------------------
# A file that stands alone: version, doc strings, reference vectors
# --------------------------------------------------------------------------------------

# Reference vectors (like the ONNX model zoo's test_data_set): one input and the outputs ONNX
# Runtime (CPU) gives for it, checked at export; a re-run elsewhere must agree within these.
TEST_PROB_ATOL = 1e-5
TEST_MAP_RTOL = 1e-4


def default_model_version(run: dict[str, Any]) -> int:
    """The run's creation time as YYYYMMDDHHMMSS (UTC): every export of a run carries the same
    version and a later run a larger one; the export time when there is no run."""
    from datetime import UTC, datetime

    created = run.get("created") if isinstance(run, dict) else None
    try:
        when = datetime.fromisoformat(str(created)).astimezone(UTC)
    except (TypeError, ValueError):
        when = datetime.now(UTC)
    return int(when.strftime("%Y%m%d%H%M%S"))


def make_test_data_set(onnx_path, x: np.ndarray, source: str, ensemble: bool) -> dict[str, Any]:
    """One input and ONNX Runtime's (CPU) outputs for it, as stored in the file's metadata."""
    import onnxruntime as ort

    names = output_names(ensemble)
    session = ort_session(onnx_path, ["CPUExecutionProvider"])
    outputs = session.run(list(names), {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    return {
        "format": "arrays: base64 of little-endian float32 in C order (numpy: np.frombuffer(b64decode(data), "
        "'<f4').reshape(shape))",
        "source": source.split(" rows ")[0] + (" (its first checked row)" if " rows " in source else ""),
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "tolerance": {"prob_atol": TEST_PROB_ATOL, "map_rtol": TEST_MAP_RTOL, "map_atol_floor": MAP_ATOL_FLOOR},
        "inputs": {INPUT_NAME: array_record(x)},
        "outputs": {name: array_record(v) for name, v in zip(names, outputs, strict=True)},
    }


def check_test_data_set(onnx_path, provider: str = "cpu") -> dict[str, float]:
    """Run the file's reference input and compare with its stored outputs; raise when they differ
    beyond the stored tolerance. Returns the max differences."""
    meta = read_metadata(onnx_path)
    if "test_data_set" not in meta:
        raise NodulekitError(f"{onnx_path} carries no reference vectors (test_data_set); re-export it")
    ref = json.loads(meta["test_data_set"])
    session, _, _ = make_session(onnx_path, provider)
    names = list(ref["outputs"])
    got = session.run(names, {INPUT_NAME: decode_array(ref["inputs"][INPUT_NAME])})
    tol = ref["tolerance"]
    diffs: dict[str, float] = {}
    for name, value in zip(names, got, strict=True):
        expected = decode_array(ref["outputs"][name])
        diff = float(np.max(np.abs(value - expected)))
        bound = (
            tol["prob_atol"]
            if "prob" in name
            else tol["map_rtol"] * float(np.abs(expected).max()) + tol["map_atol_floor"]
        )
        if value.shape != expected.shape or not diff <= bound:
            raise NodulekitError(
                f"{onnx_path}: output {name} of the reference input differs from the stored one by {diff:.3g} "
                f"(tolerance {bound:.3g})"
            )
        diffs[name] = diff
    return diffs


def _document(proto, meta: dict[str, str]) -> None:
    """ONNX doc strings on the model, the graph, its input and outputs (a file that explains itself)."""
    spec = json.loads(meta["input_spec"]) if meta.get("input_spec", "null") != "null" else None
    outputs = json.loads(meta["outputs"])
    proto.doc_string = (
        f"nodulekit {meta['arch']} ({meta['map_kind']} map): {meta.get('task', '')}. {meta.get('intended_use', '')} "
        f"License: {meta.get('license', '')} The metadata_props hold the whole model description "
        "(description_schema), the input spec and its arithmetic (input_spec, preprocessing), the map placement, "
        "training data and ranges, training recipe, cross-validated performance and reference vectors (test_data_set)."
    )
    proto.graph.doc_string = f"{meta['map_definition']}. map_up: {outputs['map_up']}."
    if spec is not None:
        chans = ", ".join(f"{c['z_offset_mm']:+g} mm x{c['p']:g}" for c in spec["channels"])
        lo, hi = spec["hu_window"]
        x_doc = (
            f"float32 [batch, {len(spec['channels'])}, {spec['patch_px']}, {spec['patch_px']}]: one channel per "
            f"axial plane (offset from the nodule centre, crop side in diameters: {chans}), HU clipped to "
            f"[{lo:g}, {hi:g}] and scaled to [0, 1]; built as metadata 'preprocessing' says"
        )
    else:
        x_doc = meta["input"]
    for value_info in proto.graph.input:
        if value_info.name == INPUT_NAME:
            value_info.doc_string = x_doc
    for value_info in proto.graph.output:
        value_info.doc_string = outputs.get(value_info.name, "")
