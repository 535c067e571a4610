"""The method registry: one signature for every method, ``fn(model, spec, example_input, input_range) -> nn.Module``,
and one typed config per method (the dataclass that ``spec.options`` is validated into, defaults in one place).

Add a method: write ``rex/methods/<name>.py`` with a frozen ``MethodConfig`` subclass (its fields are the
method's options) and a function decorated ``@register_method("<name>", doc, config=..., display=...)`` (every
module of this package is loaded on the first lookup), and add ``conf/method/<name>.yaml`` for the pipeline.

This module imports neither torch nor the engine: ``QuantSpec`` validates method names and options through it
(the built-in method files, which import the engine, are loaded on the first lookup), so there is no import
loop spec -> methods -> engine -> spec.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import ConfigError, NotApplicableError, UnknownNameError

MethodFn = Callable[..., "object"]
_loaded = False


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class MethodConfig:
    """A method's options (``QuantSpec.options``) as a typed, frozen record. Subclasses declare the options as
    fields with their defaults and check (and coerce) the values in ``validate``, raising a ConfigError."""

    @classmethod
    def from_options(cls, method: str, options: dict) -> "MethodConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                accepted = ", ".join(sorted(known)) if known else "none"
                raise ConfigError(f"method {method!r} has no option {key!r}{did_you_mean(key, known)}; "
                                  f"its options: {accepted}")
        return cls(**options)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check and coerce the field values (``self._set`` to coerce); nothing to check by default."""

    def _set(self, key: str, value) -> None:
        object.__setattr__(self, key, value)

    def describe(self) -> str:
        """The non-obvious settings, for a table row label ('' = nothing to say)."""
        return ""


@dataclass(frozen=True)
class NoOptions(MethodConfig):
    """A method without options."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    fn: MethodFn
    config: Optional[type]  # a MethodConfig subclass; None: options are not checked (third-party methods)
    doc: str
    display: str  # the method's name in tables (e.g. "SQuant")


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, doc: str = "", *, config: Optional[type] = NoOptions, display: Optional[str] = None):
    """Register ``fn`` as method ``name``. ``config``: the MethodConfig subclass ``spec.options`` is validated
    into (``spec.config`` in the method); ``display``: the name shown in tables (default: ``name``)."""
    if config is not None and not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"register_method({name!r}): config must be a MethodConfig subclass, got {config!r}")

    def deco(fn: MethodFn) -> MethodFn:
        text = doc or (fn.__doc__ or "").strip().splitlines()[0] if (doc or fn.__doc__) else ""
        _REGISTRY[name] = MethodEntry(name, fn, config, text, display or name)
        return fn

    return deco


def _load_builtin() -> None:
    """Import every module of this package (each registers its methods): a new method file needs no list."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def list_methods() -> dict[str, str]:
    _load_builtin()
    return {k: _REGISTRY[k].doc for k in sorted(_REGISTRY)}


def get_entry(name: str) -> MethodEntry:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownNameError("method", name, _REGISTRY)
    return _REGISTRY[name]


def get_method(name: str) -> MethodFn:
    return get_entry(name).fn


def method_config(name: str, options: dict) -> Optional[MethodConfig]:
    """``options`` validated into method ``name``'s config (None for a method registered without one)."""
    entry = get_entry(name)
    return None if entry.config is None else entry.config.from_options(name, options)


def coerce(kind, key: str, value):
    """``kind(value)`` (how the methods always read their options), or a ConfigError naming the option."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"options.{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def require_order_one(spec, name: str, combo: Optional[str]) -> None:
    """The baselines are order 1 without budget; REx on top of one is its own method (``combo``)."""
    if spec.order != 1 or spec.budget is not None:
        hint = f"; use method={combo} for REx on top of it" if combo else ""
        raise ConfigError(f"{name} is an order-1 baseline (got order={spec.order}, budget={spec.budget}){hint}")


def require_batchnorm(model, name: str, why: str) -> None:
    """A method built on BatchNorm statistics (DFQ's bias correction and high-bias absorption, ZeroQ's
    distillation target) does not apply to a model without any: NotApplicableError, which the pipeline records
    as the row's result "n/a (no BatchNorm)" instead of a failure or a silently weaker method."""
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise NotApplicableError(f"{name} needs BatchNorm layers ({why}); this model has none: n/a (no BatchNorm); "
                                 "use rtn, squant, ocs, hqq or rex on it", reason="no BatchNorm")
