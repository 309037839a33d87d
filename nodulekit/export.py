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

FORMAT = "nodulekit-onnx/1"
INPUT_NAME = "x"
OUTPUT_NAMES = ("prob", "map", "map_up")
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
    """A model ready for export plus what is known about how it was trained."""

    model: Any
    source: str
    fold: int | None = None
    epoch: int | None = None
    run: dict[str, Any] = field(default_factory=dict)


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
        return ModelSource(model, str(run.checkpoint_path(fold)), fold, ckpt.get("epoch"), run.record)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    # A checkpoint inside a RUNDIR (RUNDIR/fold<k>/checkpoint.pt) still finds its run.json.
    run = Run(path.parent.parent).record if (path.parent.parent / "run.json").exists() else {}
    # Training also stores provenance in the checkpoint: use it for a checkpoint copied out of its RUNDIR.
    for key in ("label_rule", "normalisation", "dataset_fingerprint"):
        if run.get(key) is None and ckpt.get(key) is not None:
            value = ckpt[key]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            run[key] = value
    if fold is None and path.parent.name.startswith("fold") and path.parent.name[4:].isdigit():
        fold = int(path.parent.name[4:])
    return ModelSource(model, str(path), fold, ckpt.get("epoch"), run)


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _wrapper(model):
    """nn.Module whose forward is exactly what the ONNX graph computes."""
    import torch
    import torch.nn.functional as F

    class SoftActivationMapExport(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            logits, soft_activation_map = self.inner.activation_map(x)
            prob = torch.softmax(logits, dim=1)
            map_up = F.interpolate(
                soft_activation_map, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
            return prob, soft_activation_map, map_up

    return SoftActivationMapExport(model).eval()


def reference_outputs(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch (prob, map, map_up) for ``x``: the reference the ONNX graph must reproduce."""
    import torch

    wrapper = _wrapper(model)
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
                    output_names=list(OUTPUT_NAMES),
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
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter warns about its own deprecation
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    else:
        raise NodulekitError(f"unknown exporter {exporter!r} (choose {' or '.join(EXPORTERS)})")


def _export_inputs(run: dict[str, Any], channels: int, n: int, seed: int) -> tuple[np.ndarray, str]:
    """Real inputs from the run's dataset when it can be read, else seeded uniform [0, 1]."""
    from nodulekit.datasets import load_dataset
    from nodulekit.run import recorded_dataset

    ds_path, _ = recorded_dataset(run)
    if ds_path and Path(ds_path).exists():
        try:
            ds = load_dataset(ds_path)
            if ds.channels == channels:
                rows = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
                return ds.x[rows], f"dataset {ds_path} rows {rows.tolist()}"
        except NodulekitError:
            pass
    rng = np.random.default_rng(seed)
    return rng.random((n, channels, INPUT_SIZE, INPUT_SIZE), dtype=np.float32), f"uniform [0,1) seed {seed}"


def compare_outputs(got: tuple[np.ndarray, ...], ref: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Max absolute differences and the map scale, as stored in metadata and checked."""
    prob_diff = float(np.max(np.abs(got[0] - ref[0])))
    scale = float(max(np.max(np.abs(ref[1])), np.max(np.abs(ref[2]))))
    map_diff = float(max(np.max(np.abs(got[1] - ref[1])), np.max(np.abs(got[2] - ref[2]))))
    return {
        "prob_max_abs_diff": prob_diff,
        "map_max_abs_diff": map_diff,
        "map_scale": scale,
        "map_tol": MAP_RTOL * scale + MAP_ATOL_FLOOR,
        "prob_tol": PROB_ATOL,
    }


def verify_against_torch(onnx_path: str | os.PathLike, model, x: np.ndarray) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) at batch 1 and batch len(x); raise if it disagrees."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {}
    for label, batch in (("batch1", x[:1]), (f"batch{len(x)}", x)):
        got = tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}))
        ref = reference_outputs(model, batch)
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


def build_metadata(src: ModelSource, opset: int, exporter: str) -> dict[str, str]:
    import torch

    from nodulekit.run import recorded_dataset

    model, run = src.model, src.run
    channels = int(getattr(model, "in_channels"))
    label_rule = run.get("label_rule")
    normalisation = run.get("normalisation")
    ds_path, fingerprint = recorded_dataset(run)
    meta = {
        "nodulekit_format": FORMAT,
        "nodulekit_version": __version__,
        "torch_version": torch.__version__,
        "exporter": f"torch.onnx.export ({exporter}), opset {opset}",
        "arch": str(getattr(model, "arch", type(model).__name__)),
        "model_config": json.dumps(getattr(model, "config", {}) or {}, default=str, sort_keys=True),
        "in_channels": str(channels),
        "num_classes": str(int(getattr(model, "num_classes", 2))),
        "class_names": json.dumps(list(CLASS_NAMES)),
        "input": f"{INPUT_NAME}: float32 [batch, {channels}, {INPUT_SIZE}, {INPUT_SIZE}] normalised as in 'normalisation'",
        "outputs": json.dumps(
            {
                "prob": "softmax of the logits [batch, classes]; column 1 = malignant",
                "map": "soft activation map on the final feature grid [batch, classes, h, w], raw (unnormalised)",
                "map_up": f"'map' resized bilinearly (align_corners=False) to [batch, classes, {INPUT_SIZE}, {INPUT_SIZE}]",
            }
        ),
        "map_kind": str(model.map_kind),
        "map_definition": MAP_DEFINITIONS[model.map_kind],
        "normalisation": json.dumps(normalisation) if normalisation is not None else "unknown",
        "label_rule": json.dumps(label_rule) if label_rule is not None else "unknown",
        "dataset": ds_path or "unknown",
        "dataset_fingerprint": fingerprint or "unknown",
        "fold": str(src.fold) if src.fold is not None else "unknown",
        "epoch": str(src.epoch) if src.epoch is not None else "unknown",
        "source": src.source,
    }
    return meta


def export_onnx(
    source: ModelSource | Any,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    overwrite: bool = False,
    n_check: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``source`` (a ModelSource or a bare NoduleClassifier) to one self-contained ONNX file.

    Returns the metadata written (including the verification report). The file appears at
    ``out`` only after ONNX Runtime reproduced PyTorch within the tolerances.
    """
    import onnx
    import torch

    from nodulekit.artifacts import atomic_path, check_output_path

    if not isinstance(source, ModelSource):
        source = ModelSource(source, source=f"in-memory {type(source).__name__}")
    model = source.model.eval().to("cpu")
    check_exportable(model)
    if exporter not in EXPORTERS:
        raise NodulekitError(f"unknown exporter {exporter!r} (choose {' or '.join(EXPORTERS)})")
    if not 13 <= int(opset) <= 23:
        raise NodulekitError(f"opset {opset} not supported (use 13..23; default {DEFAULT_OPSET})")
    out = check_output_path(out, overwrite)
    channels = int(model.in_channels)
    x_check, x_desc = _export_inputs(source.run, channels, max(2, n_check), seed)
    meta = build_metadata(source, opset, exporter)
    # Batch 2 as the traced example so no dimension is specialised to 1.
    example = torch.as_tensor(x_check[:2])
    with atomic_path(out, suffix=".part.onnx") as tmp:
        try:
            _torch_export(_wrapper(model), example, tmp, int(opset), exporter)
        except NodulekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - exporter errors are long; keep the first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise NodulekitError(f"torch.onnx.export ({exporter}) failed for {meta['arch']}: {first}") from None
        report = verify_against_torch(tmp, model, x_check)
        meta["verification"] = json.dumps(
            {
                "inputs": x_desc,
                "runtime": "onnxruntime CPUExecutionProvider",
                "prob_atol": PROB_ATOL,
                "map_rtol": MAP_RTOL,
                **report,
            }
        )
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "nodulekit"
        proto.producer_version = __version__
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp), save_as_external_data=False)
    return meta


# --------------------------------------------------------------------------------------
# Inference with ONNX Runtime
# --------------------------------------------------------------------------------------


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """The nodulekit metadata of an exported file; error if it is not a nodulekit export."""
    import onnx

    path = Path(onnx_path)
    if not path.exists():
        raise NodulekitError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf decode errors
        raise NodulekitError(f"{path} is not an ONNX model") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("nodulekit_format") != FORMAT:
        found = meta.get("nodulekit_format", "no nodulekit_format metadata")
        raise NodulekitError(f"{path} is not a nodulekit ONNX export ({found}); make one with `nodulekit export-onnx`")
    missing = [k for k in ("in_channels", "map_kind", "arch") if k not in meta]
    if missing:
        raise NodulekitError(f"{path} lacks nodulekit metadata {', '.join(missing)}")
    return meta


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
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
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


def run_session(session, x, batch: int = 256, binding_device: str | None = None, progress: bool = False):
    """Run an exported model over ``x`` (array-like [N, C, 32, 32]) in batches.

    With ``binding_device`` ("cuda" on GPU providers) inputs and outputs go through IO
    binding: the input is copied to the device once and outputs are allocated there by ORT
    and copied back once per batch, instead of ORT staging every tensor through host memory.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    n = len(x)
    outs: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    starts = range(0, n, batch)
    for start in tqdm(starts, desc="infer", unit="batch", disable=not progress):
        xb = np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
        if binding_device is None:
            res = session.run(list(OUTPUT_NAMES), {INPUT_NAME: xb})
        else:
            binding = session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(xb, binding_device, 0))
            for name in OUTPUT_NAMES:
                binding.bind_output(name, binding_device)
            session.run_with_iobinding(binding)
            res = binding.copy_outputs_to_cpu()
        for name, value in zip(OUTPUT_NAMES, res, strict=True):
            outs[name].append(value)
    if n == 0:
        raise NodulekitError("the input has no samples")
    return tuple(np.concatenate(outs[name]) for name in OUTPUT_NAMES)


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

    from nodulekit.artifacts import check_output_path, provenance, write_maps
    from nodulekit.datasets import load_dataset

    if batch < 1:
        raise NodulekitError(f"--batch must be at least 1 (got {batch})")
    meta = read_metadata(onnx_path)
    check_output_path(out, overwrite)
    ds = load_dataset(dataset_path)
    _check_inputs_match(meta, ds, onnx_path)
    x, y, ds_fold, nodule_id, label_rule = ds.x, ds.y, ds.fold, ds.nodule_id, ds.label_rule
    session, ran, note = make_session(onnx_path, provider)
    t0 = time.perf_counter()
    prob, maps, maps_up = run_session(
        session, x, batch, binding_device=None if ran == "cpu" else "cuda", progress=progress
    )
    seconds = time.perf_counter() - t0
    model_fold = int(meta["fold"]) if meta.get("fold", "unknown").lstrip("-").isdigit() else -1
    prov = provenance(
        onnx=str(onnx_path),
        dataset=str(dataset_path),
        provider=ran,
        provider_note=note,
        onnx_metadata={k: v for k, v in meta.items() if k != "verification"},
        label_rule=label_rule,
        batch=batch,
        seconds=round(seconds, 4),
    )
    write_maps(
        out,
        nodule_id=nodule_id,
        maps=maps,
        prob=prob[:, MALIGNANT],
        method=meta["map_kind"],
        arch=meta["arch"],
        source=f"onnx:{onnx_path}",
        prov=prov,
        y=y,
        fold=np.full(len(y), model_fold, np.int64),
        maps_up=maps_up,
        extra={"dataset_fold": np.asarray(ds_fold, np.int64)},
        overwrite=overwrite,
    )
    return {"provider": ran, "note": note, "n": int(len(y)), "seconds": seconds, "out": str(out)}


def _check_inputs_match(meta: dict[str, str], ds, onnx_path) -> None:
    """The dataset has the channels and normalisation the exported model was trained with."""
    if ds.channels != int(meta["in_channels"]):
        raise NodulekitError(
            f"channel mismatch: {onnx_path} expects {meta['in_channels']} channels, {ds.path} has {ds.channels}"
        )
    norm = ds.normalisation
    if norm is not None and meta.get("normalisation", "unknown") != "unknown":
        if json.loads(meta["normalisation"]) != norm:
            raise NodulekitError(
                f"normalisation mismatch: model trained with {meta['normalisation']}, {ds.path} uses {json.dumps(norm)}"
            )
