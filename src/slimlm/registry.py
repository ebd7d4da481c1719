"""One registry from (family, method name) to (config class, apply function).

A method module registers itself with `@register("quantize", "gptq", GPTQConfig, needs_data=True)` on its
apply function `apply(model, config, data) -> dict`. The CLI, the Python API and recipe files look methods up
here; nothing dispatches on method names elsewhere.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import SlimlmError

FAMILIES = ("quantize", "prune")
# Modules whose import registers methods; imported lazily on first lookup.
_METHOD_MODULES = {
    "quantize": ("slimlm.quant.methods",),
    "prune": ("slimlm.pruning.methods", "slimlm.pruning.structured"),
}


@dataclass(frozen=True)
class Method:
    family: str
    name: str
    config_cls: type
    apply: Callable[..., Any]
    needs_data: bool | Callable[[Any], bool]   # or a function of the config (structured: by its score)
    help: str

    def data_needed(self, config: Any) -> bool:
        """Whether this configuration of the method needs calibration data."""
        return bool(self.needs_data(config) if callable(self.needs_data) else self.needs_data)


_REGISTRY: dict[str, dict[str, Method]] = {f: {} for f in FAMILIES}
_loaded: set[str] = set()


def register(family: str, name: str, config_cls: type, *, needs_data: bool | Callable[[Any], bool] = False,
             help: str = ""):
    """Decorator registering `apply(model, config, data)` as method `name` of `family`."""
    if family not in _REGISTRY:
        raise ValueError(f"unknown family {family!r}")

    def deco(fn):
        _REGISTRY[family][name] = Method(family, name, config_cls, fn, needs_data, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def _load(family: str) -> None:
    if family in _loaded:
        return
    _loaded.add(family)
    for mod in _METHOD_MODULES.get(family, ()):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # family not built yet in this checkout
            if e.name != mod and not mod.startswith(str(e.name)):
                raise


def methods(family: str) -> dict[str, Method]:
    _load(family)
    return dict(_REGISTRY[family])


def get(family: str, name: str) -> Method:
    table = methods(family)
    if name not in table:
        valid = ", ".join(sorted(table)) or "none available"
        raise SlimlmError(f"unknown {family} method {name!r}; choose one of: {valid}")
    return table[name]
