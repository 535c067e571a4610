"""The method registry: one signature for every method, ``fn(model, spec, example_input, input_range) -> nn.Module``.

Add a method: write ``rex/methods/<name>.py`` with a function decorated ``@register_method("<name>")`` and
import it in ``_BUILTIN`` below.
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..errors import UnknownNameError

MethodFn = Callable[..., "object"]
_REGISTRY: dict[str, MethodFn] = {}
_DOCS: dict[str, str] = {}
_BUILTIN = ("rex_method", "baselines", "hqq")
_loaded = False


def register_method(name: str, doc: str = ""):
    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[name] = fn
        _DOCS[name] = doc or (fn.__doc__ or "").strip().splitlines()[0] if (doc or fn.__doc__) else ""
        return fn

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # optional module not written yet
            if e.name != f"{__name__}.{mod}":
                raise


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def list_methods() -> dict[str, str]:
    _load_builtin()
    return {k: _DOCS.get(k, "") for k in sorted(_REGISTRY)}


def get_method(name: str) -> MethodFn:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownNameError("method", name, _REGISTRY)
    return _REGISTRY[name]
