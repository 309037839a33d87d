"""Which torch device a command runs on: ``--device auto|cpu|cuda|cuda:N`` checked in one place.

Used by training, maps, predict and loading a fold's model; it imports nothing of nodulekit's
but its errors, so any layer may use it.
"""

from __future__ import annotations

from nodulekit.errors import NodulekitError


def resolve_device(name: str):
    """The torch device ``name`` names (``auto``: CUDA when usable, else the CPU); a one-line error if unusable."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NodulekitError(
                f"--device {name} requested but no CUDA GPU is usable here (torch {torch.__version__}); use --device cpu or auto"
            )
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, AssertionError (xpu) or ImportError (hpu)
        why = (str(exc).splitlines() or [type(exc).__name__])[0]  # an AssertionError may carry no message
        raise NodulekitError(f"--device {name} is not usable: {why}") from None
    return device
