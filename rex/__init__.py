"""REx: data-free residual quantization error expansion (Yvinec et al., arXiv 2203.14645), with the
data-free baselines it is compared with, on one operator and one protocol.

    import rex
    qmodel = rex.quantize(model, rex.QuantSpec(method="rex", wbits=4, abits=8, order=2, budget=1.5))
    rex.bops(qmodel, torch.randn(1, 3, 224, 224)); rex.report(qmodel)

Importing ``rex`` imports neither torch nor any submodule: the names below load on first use (PEP 562), so
the torch-free parts (``rex.pipeline.grid``, ``rex.labels``, ``rex.errors``, ``rex.io``) serve the workflow
while it builds the DAG.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (  # noqa: F401  (standard library only)
    CheckpointError,
    ConfigError,
    DatasetError,
    RexError,
    UnknownNameError,
    WeightError,
)

__version__ = "0.1.0"

# public name -> the submodule defining it (imported on first access)
_LAZY = {"activation_coverage": "api", "bops": "api", "expand": "api", "quantize": "api", "report": "api",
         "summary": "api", "QuantSpec": "spec"}

__all__ = sorted([*_LAZY, "CheckpointError", "ConfigError", "DatasetError", "RexError", "UnknownNameError",
                  "WeightError", "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below does the imports
    from .api import activation_coverage, bops, expand, quantize, report, summary  # noqa: F401
    from .spec import QuantSpec  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # `rex.models`, `rex.nn`, ... work after a bare `import rex`, as when the package imported them eagerly
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
