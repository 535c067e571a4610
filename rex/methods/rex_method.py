"""REx (residual expansion, optionally group-sparse under a budget) and RTN (= REx order 1)."""
from __future__ import annotations

from ..engine import quantize_model
from ..errors import ConfigError
from . import register_method


@register_method("rex", "REx: residual expansion of order K, group-sparse under a BOPs budget")
def rex(model, spec, example_input=None, input_range=None):
    return quantize_model(model, spec, example_input, input_range)


@register_method("rtn", "RTN: plain round-to-nearest (identical to REx order 1)")
def rtn(model, spec, example_input=None, input_range=None):
    if spec.order != 1 or spec.budget is not None:
        raise ConfigError(f"rtn is order 1 without budget (got order={spec.order}, budget={spec.budget}); use method=rex for K>1")
    return quantize_model(model, spec, example_input, input_range)
