"""The model registry: every architecture of the paper under one name.

A family file decorates a factory ``fn(in_channels, num_classes=2, *, option=default, ...)``
with :func:`register_model`; the registry reads the keyword defaults from the signature,
so ``model.config`` always holds every option and ``create_model(arch, C, **config)``
rebuilds the same network. Family files are discovered automatically: adding an
architecture is one new file in ``nodulekit/models/`` that registers itself.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodulekit.errors import NodulekitError

MAP_KINDS = ("cam", "sam", "hesam", None)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., Any]
    description: str
    map_kind: str | None
    defaults: dict[str, Any] = field(default_factory=dict)
    alias_of: str | None = None
    paper_name: str | None = None  # the row name in the paper's tables (Table 2), if it has one


_REGISTRY: dict[str, ModelSpec] = {}
_LOADED = False
# Modules of this package that define no architecture.
_NOT_FAMILIES = {"registry", "base", "heads", "blocks"}


def _option_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    params = list(inspect.signature(factory).parameters.values())
    if len(params) < 2 or params[0].name != "in_channels" or params[1].name != "num_classes":
        raise TypeError(f"model factory {factory.__name__} must start with (in_channels, num_classes, ...)")
    defaults = {}
    for p in params[2:]:
        if p.kind != p.KEYWORD_ONLY or p.default is p.empty:
            raise TypeError(f"model factory {factory.__name__}: option {p.name!r} must be keyword-only with a default")
        defaults[p.name] = p.default
    return defaults


def register_model(
    name: str,
    description: str,
    map_kind: str | None = None,
    aliases: tuple[str, ...] = (),
    paper_name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``factory`` under ``name`` (and ``aliases``, same implementation).

    ``paper_name``: how the paper's tables name it (e.g. "Ours-HESAM"); reports show it in
    place of the registry name, for the aliases too.
    """
    if map_kind not in MAP_KINDS:
        raise ValueError(f"map_kind must be one of {MAP_KINDS}, not {map_kind!r}")

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        defaults = _option_defaults(factory)
        for alias in (name, *aliases):
            if alias in _REGISTRY and _REGISTRY[alias].factory is not factory:
                raise ValueError(f"model name {alias!r} is registered twice")
            _REGISTRY[alias] = ModelSpec(
                alias, factory, description, map_kind, defaults, None if alias == name else name, paper_name
            )
        return factory

    return decorate


def _load_families() -> None:
    """Import every family module of this package once, so they register themselves."""
    global _LOADED
    if _LOADED:
        return
    import nodulekit.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_FAMILIES and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def available_models() -> list[str]:
    """Every registered architecture name (aliases included), sorted."""
    _load_families()
    return sorted(_REGISTRY)


def describe_models() -> list[tuple[str, str, str | None]]:
    """``(name, description, map_kind)`` for every name, for ``--help`` and the README."""
    _load_families()
    rows = []
    for name in sorted(_REGISTRY):
        spec = _REGISTRY[name]
        text = spec.description if spec.alias_of is None else f"alias of {spec.alias_of}: {spec.description}"
        rows.append((name, text, spec.map_kind))
    return rows


def paper_name(arch: str) -> str:
    """The paper's name of architecture ``arch`` (e.g. "Ours-HESAM"); ``arch`` itself when it has none
    or is not registered (a run of an architecture this version no longer has)."""
    _load_families()
    spec = _REGISTRY.get(arch)
    return spec.paper_name if spec is not None and spec.paper_name else arch


def model_spec(name: str) -> ModelSpec:
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NodulekitError(
            f"unknown model architecture {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _count(what: str, value: Any, minimum: int) -> int:
    """A plain int from ints and numpy integers; anything else (bool, float, str) is refused."""
    import operator

    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise NodulekitError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return number


def create_model(name: str, in_channels: int, num_classes: int = 2, **options: Any):
    """Build architecture ``name`` for ``in_channels`` input slices and ``num_classes`` classes.

    ``options`` are the architecture's keyword options (see ``model_spec(name).defaults``);
    unknown options are refused. The returned model's ``config`` holds all options, defaults
    included, and ``arch`` is ``name``.
    """
    spec = model_spec(name)
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(sorted(spec.defaults)) or "none"
        raise NodulekitError(f"model {name!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}")
    in_channels = _count("in_channels", in_channels, 1)
    num_classes = _count("num_classes", num_classes, 2)
    config = {**spec.defaults, **options}
    model = spec.factory(in_channels, num_classes, **config)
    model.arch = name
    model.config = dict(config)
    if model.map_kind != spec.map_kind:  # the registry's word and the model must agree
        raise RuntimeError(f"internal: {name} registered as map_kind {spec.map_kind!r} but built {model.map_kind!r}")
    return model
