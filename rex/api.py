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


def activation_coverage(qmodel: nn.Module) -> dict:
    """Which layer inputs the quantized model really quantizes, and where their ranges come from, so that a
    result row never claims activations it did not quantize (a "W4A4" row whose layers saw float inputs).

    ``act_float`` counts the layers whose input stays float although the spec asks for ``abits`` (no
    data-free range, or the first/last policy left the layer float); ``act_layers`` counts all planned layers.
    Activations are quantized at layer inputs only: residual adds, pooling and concatenations run in float,
    in integer-exact mode too (``act_points``)."""
    info = getattr(qmodel, "rex_info", None)
    if info is None:
        raise TypeError("activation_coverage needs a model returned by rex.quantize (it reads model.rex_info)")
    plans = info.plans
    if info.spec.abits is None:
        return dict(act_layers=len(plans), act_float=len(plans), act_float_layers=[],
                    act_ranges="none (weight-only)", act_points="none")
    floats = [p.name for p in plans if p.abits is None]
    source = ("distilled data (ZeroQ)" if "zeroq" in info.extra
              else "BatchNorm statistics (beta + n|gamma|)")
    if plans and plans[0].abits is not None:
        source += "; network input from its normalisation"
    return dict(act_layers=len(plans), act_float=len(floats), act_float_layers=floats, act_ranges=source,
                act_points="layer inputs (adds, pooling, concatenation in float)")


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
