"""The public verbs: quantize, bops, report, expand."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .cost import bops as _bops
from .cost import cost_table, model_size_bits
from .expansion import expand  # noqa: F401  (re-exported)
from .methods import get_method
from .nn.layers import QuantLayer
from .spec import QuantSpec


def quantize(
    model: nn.Module,
    spec: Optional[QuantSpec] = None,
    example_input=None,
    input_range: Optional[tuple[float, float]] = None,
    **spec_kwargs,
) -> nn.Module:
    """Quantize ``model`` without data and return a new model (the input is left untouched).

    ``rex.quantize(model, rex.QuantSpec(method="rex", wbits=4, order=2, budget=1.5))`` or
    ``rex.quantize(model, method="rex", wbits=4, order=2, budget=1.5)``. ``example_input`` fixes the input
    shape used for tracing and BOPs (default 1x3x224x224); its values are never used to set anything.
    ``input_range`` is the range of the network input (e.g. from its normalisation), used to quantize the
    first layer's input; without it the first layer's input stays float.
    """
    if spec is None:
        spec = QuantSpec(**spec_kwargs)
    elif spec_kwargs:
        spec = spec.replace(**spec_kwargs)
    fn = get_method(spec.method)
    return fn(model, spec, example_input=example_input, input_range=input_range)


def bops(model: nn.Module, example_input=None) -> int:
    """BOPs per sample of a float (32x32) or quantized model."""
    if example_input is None:
        from .engine import default_example_input

        example_input = default_example_input(model)
    return _bops(model, example_input)


def report(qmodel: nn.Module) -> list[dict]:
    """Per quantized layer: name, kind, role, bits, order, densities, measured max error and its bound,
    activation range and source, int32 safety."""
    rows = []
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantLayer):
            continue
        rows.append(
            dict(
                name=name,
                kind=type(m.inner).__name__,
                role=getattr(m, "role", ""),
                wbits=m.wbits,
                abits=m.abits,
                order=m.order,
                densities=[round(d, 4) for d in m.densities],
                max_err=getattr(m, "max_err", None),
                bound=getattr(m, "bound_max", None),
                bound_ok=getattr(m, "bound_ok", None),
                act_range=None if m.act is None else (round(m.act.lo, 4), round(m.act.hi, 4)),
                act_signed=None if m.act is None else m.act.signed,
                int32_safe=m.int32_safe(),
            )
        )
    return rows


def summary(qmodel: nn.Module, example_input=None) -> dict:
    """Model-level numbers: BOPs, MACs, size, and the quantization time."""
    if example_input is None:
        from .engine import default_example_input

        example_input = default_example_input(qmodel)
    table = cost_table(qmodel, example_input)
    info = getattr(qmodel, "rex_info", None)
    return dict(
        bops=sum(r.bops for r in table),
        macs=sum(r.macs for r in table),
        size_bits=model_size_bits(qmodel),
        layers=len(table),
        quant_seconds=None if info is None else info.seconds,
    )
