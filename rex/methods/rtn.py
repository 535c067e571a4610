"""RTN: plain round-to-nearest, the order-1 case of REx (same operator, same protocol)."""
from __future__ import annotations

from ..engine import quantize_model
from ..errors import ConfigError
from . import NoOptions, register_method


@register_method("rtn", "RTN: plain round-to-nearest (identical to REx order 1)", config=NoOptions, display="RTN")
def rtn(model, spec, example_input=None, input_range=None):
    if spec.order != 1 or spec.budget is not None:
        raise ConfigError(f"rtn is order 1 without budget (got order={spec.order}, budget={spec.budget}); use method=rex for K>1")
    return quantize_model(model, spec, example_input, input_range)
