"""REx: residual expansion of order K (method.md §2), optionally group-sparse under a BOPs budget (§3)."""
from __future__ import annotations

from ..engine import quantize_model
from . import NoOptions, register_method


@register_method("rex", "REx: residual expansion of order K, group-sparse under a BOPs budget", config=NoOptions,
                 display="REx")
def rex(model, spec, example_input=None, input_range=None):
    return quantize_model(model, spec, example_input, input_range)
