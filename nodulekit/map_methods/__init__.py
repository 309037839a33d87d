"""Activation-map methods: one base class, a registry, one small class per method.

A method turns a trained classifier and a batch ``x`` [B, C, 32, 32] into
``(logits [B, classes], maps [B, classes, h, w])`` on the model's final feature grid g
(``model.feature_layer``). :class:`MapMethod` owns the plumbing every method shares:
which models it applies to (``supports``), the forward hook that captures g, and for
gradient methods the backward pass per class in eval mode. A method supplies only

- its map, from the model's own head (:meth:`MapMethod.maps`; CAM, SAM, HESAM), or
- its per-class weights of g from the gradients (:meth:`MapMethod.weights`; Grad-CAM),
  which the base combines as ReLU(sum_k w_k g_k) (:meth:`MapMethod.combine`).

Adding a method is one new file in this package that subclasses :class:`MapMethod` and
decorates the class with :func:`register_map_method`: the package imports its modules
itself, ``nodulekit maps --method`` lists it, and ``run_maps``/``compute_maps`` take its
name. See docs/ARCHITECTURE.md, "Adding a map method".
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from nodulekit.constants import INPUT_SIZE
from nodulekit.errors import NodulekitError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def has_high_level(model: nn.Module) -> bool:
    """Whether the model adds a high-level feature d (GMP of the encoder) to its head.

    Models may say so with a ``high_level`` attribute/config entry; otherwise one probe
    forward on a zero input tells (``forward_features(x)["high_level"]`` is not None).
    """
    import torch

    flag = getattr(model, "high_level", None)
    if isinstance(flag, bool):
        return flag
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "fusion"):  # nodulekit's ClassifierHead
        return head.fusion is not None
    config = getattr(model, "config", None) or {}
    for key in ("high_level", "high_level_feature"):
        if isinstance(config.get(key), bool):
            return config[key]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, model.in_channels, INPUT_SIZE, INPUT_SIZE, device=device))
    finally:
        model.train(was_training)
    return out.get("high_level") is not None


class MapMethod:
    """Base of every map method; subclasses set the class attributes and supply one hook.

    Attributes: ``name`` (the CLI's ``--method`` value), ``description``, ``equations`` (the
    paper's equation numbers it implements; methods are listed in the paper's order),
    ``map_kind`` (the head a method reads: ``"cam"``, ``"sam"``, ``"hesam"``; ``None`` = any
    model with a ``feature_layer``), ``high_level`` (only models with the high-level feature
    d), ``needs_gradients`` (the map comes from d logit / d g).
    """

    name: str = ""
    description: str = ""
    equations: tuple[int, ...] = ()
    map_kind: str | None = None
    high_level: bool = False
    needs_gradients: bool = False

    # -- which models ---------------------------------------------------------------------
    def supports(self, model: nn.Module) -> str | None:
        """``None`` if the method applies to ``model``, else why not (one phrase)."""
        if self.map_kind is not None:
            kind = getattr(model, "map_kind", None)
            if kind != self.map_kind:
                what = "no" if kind is None else repr(kind)
                return f"its head defines {what} activation map, {self.name} needs map_kind {self.map_kind!r}"
        elif not hasattr(model, "feature_layer"):
            return "it has no feature_layer to take gradients at"
        if self.high_level and not has_high_level(model):
            return f"{self.name} needs a model with the high-level feature (it has none)"
        return None

    # -- what a method supplies -------------------------------------------------------------
    def maps(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, maps) of a method that reads the map off the model (no gradients)."""
        raise NotImplementedError

    def weights(self, g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """[B, K] weights of the feature maps g [B, K, h, w] for one class, from d logit_c / d g."""
        raise NotImplementedError

    def combine(self, g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One class's map [B, h, w] from its weights: ReLU(sum_k w_k g_k) (Grad-CAM's Eq. 4)."""
        import torch

        return torch.relu(torch.einsum("bk,bkhw->bhw", weights, g))

    # -- the plumbing ------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if not self.needs_gradients:
            with torch.no_grad():
                return self.maps(model, x)
        logits, g, grads = self.class_gradients(model, x)
        maps = [self.combine(g, self.weights(g, grad)) for grad in grads]
        return logits, torch.stack(maps, dim=1)

    @staticmethod
    def class_gradients(model: nn.Module, x: torch.Tensor):
        """(logits, g, [d logit_c / d g for each class c]) of a batch, g hooked at ``feature_layer``.

        The gradient of the *batch sum* of a class score with respect to the batched
        features is each sample's own gradient, because in eval mode (BatchNorm running
        statistics, no dropout) samples do not interact; training mode is refused.
        """
        import torch

        if model.training:
            raise NodulekitError("internal: gradient maps need the model in eval mode (BatchNorm would mix samples)")
        captured: list[torch.Tensor] = []
        handle = model.feature_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.enable_grad():
                # The input requires grad so g is part of the graph even with frozen weights.
                logits = model(x.detach().requires_grad_(True))
                g = captured[-1]
                n = logits.shape[1]
                grads = [torch.autograd.grad(logits[:, c].sum(), g, retain_graph=c < n - 1)[0] for c in range(n)]
        finally:
            handle.remove()
        return logits.detach(), g.detach(), grads


_METHODS: dict[str, MapMethod] = {}
_LOADED = False


def register_map_method(cls: type[MapMethod]) -> type[MapMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"map method {cls.__name__} has no name")
    if cls.name in _METHODS and type(_METHODS[cls.name]) is not cls:
        raise ValueError(f"map method name {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls()
    return cls


def _load_methods() -> None:
    """Import every module of this package once, so its methods register themselves."""
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def _paper_order(method: MapMethod) -> tuple:
    # The paper's order: plain maps by equation (CAM, Grad-CAM, SAM, HESAM), then the
    # high-level-feature variants (Fig. 6), then methods the paper does not have, by name.
    return (method.high_level, min(method.equations, default=float("inf")), method.name)


def map_methods() -> dict[str, MapMethod]:
    """Every registered method by name, in the paper's order."""
    _load_methods()
    return {m.name: m for m in sorted(_METHODS.values(), key=_paper_order)}


def method_names() -> list[str]:
    return list(map_methods())


def get_method(name: str) -> MapMethod:
    methods = map_methods()
    if name not in methods:
        raise NodulekitError(f"unknown map method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


def supported_methods(model: nn.Module) -> list[str]:
    return [name for name, method in map_methods().items() if method.supports(model) is None]


def check_method(model: nn.Module, name: str) -> MapMethod:
    """The method, or a one-line error naming the methods this model does support."""
    method = get_method(name)
    reason = method.supports(model)
    if reason is not None:
        arch = getattr(model, "arch", type(model).__name__)
        raise NodulekitError(
            f"method {name!r} does not apply to model {arch!r}: {reason}; "
            f"it supports: {', '.join(supported_methods(model)) or 'none'}"
        )
    return method
