"""A trained model ready to score inputs, from an ONNX file (ONNX Runtime) or a RUNDIR/checkpoint (PyTorch).

Both engines expose the same thing: the model description (:mod:`nodulekit.modelcard`)
and ``run(x)``, which returns the malignant probability, the malignant-class activation
map on the input grid (``map_up``) and, for a fold ensemble, each member's probability.
The PyTorch engine computes exactly what the exported graph computes (the export wrapper
itself), so the two differ only by floating-point noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.constants import MALIGNANT
from nodulekit.errors import NodulekitError


@dataclass
class Scores:
    prob: np.ndarray  # [N] malignant probability (ensemble: mean over members)
    map_up: np.ndarray  # [N, 32, 32] malignant-class map on the input grid
    members: np.ndarray | None  # [N, K] each member's malignant probability, ensembles only


class OnnxEngine:
    """An exported ``.onnx`` file run with ONNX Runtime (CUDA provider when present)."""

    def __init__(self, path: Path, provider: str = "auto"):
        from nodulekit.export import make_session, output_names, read_model_card

        self.meta, self.card = read_model_card(path)
        self.ensemble = len(self.card["members"]) > 1
        self.names = output_names(self.ensemble)
        self.session, self.provider, self.note = make_session(path, provider)
        self.name = f"ONNX Runtime, {self.provider} provider"

    def run(self, x: np.ndarray, batch: int = 256, progress: bool = False) -> Scores:
        from nodulekit.export import run_session

        binding = None if self.provider == "cpu" else "cuda"
        out = run_session(
            self.session, x, batch, binding_device=binding, progress=progress, names=self.names, desc="model"
        )
        members = out[3] if self.ensemble else None
        return Scores(out[0][:, MALIGNANT], out[2][:, MALIGNANT], members)


class TorchEngine:
    """A RUNDIR (every finished fold, averaged; or one ``fold``) or a checkpoint file, run with PyTorch.

    bf16 autocast and channels_last follow ``nodulekit.execution`` (``amp``/``channels_last``:
    True/False force, "auto" chooses; probed only when there is enough work).
    """

    def __init__(self, path: Path, fold: int | None = None, device: str = "auto", amp="auto", channels_last="auto"):
        from nodulekit import modelcard
        from nodulekit.devices import resolve_device
        from nodulekit.export import check_exportable, load_ensemble_source, load_model_source

        if path.is_dir() and fold is None:
            src = load_ensemble_source(path)
        else:
            src = load_model_source(path, fold)
        for m in src.models:
            check_exportable(m)  # predict needs the model's own map, as the ONNX graph has
        self.card = modelcard.build_card(src.models, src.run, src.info(), src.rundir)
        self.tta = src.recipe.tta  # the recipe's test-time augmentation, as in the exported graph
        self.device = resolve_device(device)
        self.models = [m.to(self.device).eval() for m in src.models]
        self.ensemble = len(self.models) > 1
        self.provider = str(self.device)
        self.note = ""
        self.amp, self.channels_last = amp, channels_last
        what = f"{len(self.models)} fold models" if self.ensemble else "1 model"
        self.name = f"PyTorch on {self.device} ({what})"

    def run(self, x: np.ndarray, batch: int = 256, progress: bool = False) -> Scores:
        import torch

        from nodulekit.export import inference_module

        wrapper = inference_module(self.models, self.tta).to(self.device)
        choice = self._execution(wrapper, x, batch)
        wrapper = choice.apply(wrapper)
        self.note = f"{choice.variant}: {choice.reason}"
        outs: list[list[np.ndarray]] = []
        with torch.inference_mode(), choice.autocast():
            for start in range(0, len(x), batch):
                xb = torch.as_tensor(np.ascontiguousarray(x[start : start + batch], np.float32), device=self.device)
                outs.append([t.float().cpu().numpy() for t in wrapper(choice.input(xb))])
        cat = [np.concatenate(parts) for parts in zip(*outs, strict=True)]
        return Scores(cat[0][:, MALIGNANT], cat[2][:, MALIGNANT], cat[3] if self.ensemble else None)

    def _execution(self, wrapper, x: np.ndarray, batch: int):
        """bf16 / channels_last for this run, compared with fp32 on the graph's own outputs."""
        import torch

        from nodulekit.execution import choose_execution

        def forward(m, xb):
            return torch.cat([t.flatten() for t in m(xb)])

        example = torch.from_numpy(np.ascontiguousarray(x[:batch], np.float32))
        steps = -(-len(x) // batch)
        return choose_execution(
            wrapper,
            example,
            self.device,
            self.amp,
            self.channels_last,
            train=False,
            forward_fn=forward,
            workload_steps=steps,
        )


def open_engine(
    model: str | Path,
    *,
    provider: str = "auto",
    device: str = "auto",
    fold: int | None = None,
    amp="auto",
    channels_last="auto",
) -> Any:
    """The engine for a model file: ``.onnx`` -> ONNX Runtime; RUNDIR or checkpoint -> PyTorch."""
    path = Path(model)
    if not path.exists():
        raise NodulekitError(f"model {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".onnx":
        if fold is not None:
            raise NodulekitError("--fold applies to a RUNDIR; an ONNX file is one model (or one ensemble)")
        return OnnxEngine(path, provider)
    return TorchEngine(path, fold, device, amp, channels_last)


def load_card(model: str | Path, fold: int | None = None) -> dict[str, Any]:
    """The model description of an ONNX file, or of a RUNDIR (ensemble, or one ``fold``) / checkpoint."""
    path = Path(model)
    if not path.exists():
        raise NodulekitError(f"model {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".onnx":
        from nodulekit.export import read_model_card

        return read_model_card(path)[1]
    return TorchEngine(path, fold, device="cpu").card
