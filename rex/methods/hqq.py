"""HQQ (Badri & Shaji 2023, Half-Quadratic Quantization) as a weight-only, data-free baseline, through the
`hqq` package (`pip install hqq==0.2.8.post1`, or `pip install -e .[hqq]`): the library is called, not
re-implemented.

    rex.quantize(model, method="hqq", wbits=4, abits=None, options={"group_size": 64}, example_input=ex)

Each weight layer's matrix (nn.Linear; a Conv2d's weight flattened to [C_out, C_in*kh*kw]) goes through
`hqq.core.quantize.HQQLinear(..., quant_config=BaseQuantizeConfig(nbits, group_size), compute_dtype=float32,
device="cpu")`: an asymmetric grid (a scale and a zero point per group of `group_size` consecutive input
weights, or per output row when `group_size` is None) whose zero points are optimised by HQQ's
half-quadratic solver without data. `.dequantize()` gives the float weight that replaces the layer's
weight, so the returned model is a plain float module computing with the HQQ-quantized weights (fake
quantization, as `mode="fake"` for the other methods). Activations stay float: the spec must be
weight-only (abits=None); orders and budgets are REx's and are refused here.

Options (`spec.config`, an HQQConfig): `group_size` (None = one group per output row, i.e. per channel; else a multiple
of 8 dividing every quantized layer's input size, e.g. 64 or 128). The spec's own `granularity="per_group",
group_size=G` (the protocol's, shared with the other methods' rows of a grid) sets the same thing.

First/last-layer policy (spec.first_last, like the engine's, on the same execution order from tracing
`example_input`): '8bit' gives the first and last layers 8 bits, 'same' quantizes them like the rest,
'fp' leaves them float. Without an example input (or one the model cannot run), the order is the module
registration order and a note says so. Tied weights (an LM head sharing the embedding matrix) are untied:
the quantized layer gets its own parameter and the embedding stays float, as with the engine's QuantLayer.
Bits per weight (scales and zero points stored in 16 bits each, HQQ's default meta-data format):
wbits + 32 / group_size, or wbits + 32 / C_in per channel; reported in `rex_info.extra["hqq"]`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, RexError
from . import MethodConfig, register_method


@dataclass(frozen=True)
class HQQConfig(MethodConfig):
    group_size: Optional[int] = None  # None: one group per output row (per channel)

    def validate(self) -> None:
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 8 or g % 8):
            raise ConfigError(f"options.group_size must be a multiple of 8 (e.g. 64, 128) or null, got {g!r}")

    def describe(self) -> str:
        return "" if self.group_size is None else f"g{self.group_size}"

HQQ_VERSION = "0.2.8.post1"
META_BITS = 16  # HQQ keeps each scale and zero point as a 16-bit float (compute dtype float16 by default)


def require_hqq():
    """The hqq entry points, or a RexError naming the install command."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # hqq prints backend notices at import
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as exc:
        raise RexError(f"the hqq baseline needs the hqq package ({type(exc).__name__}: {exc}); install it with "
                       f"`pip install hqq=={HQQ_VERSION}` (or `pip install -e .[hqq]`)") from None
    return BaseQuantizeConfig, HQQLinear


def hqq_dequantized(weight: torch.Tensor, nbits: int, group_size: Optional[int]) -> torch.Tensor:
    """HQQ's quantize -> dequantize of a 2-D weight [out, in] (float32 in, float32 out, same shape)."""
    BaseQuantizeConfig, HQQLinear = require_hqq()
    if weight.dim() != 2:
        raise ConfigError(f"hqq quantizes 2-D weight matrices, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if group_size is not None and in_f % group_size:
        raise ConfigError(f"options.group_size={group_size} does not divide a layer's input size {in_f}; use a "
                          "divisor of every layer's input size, or group_size: null (per channel)")
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight.detach().float())
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    with contextlib.redirect_stdout(io.StringIO()):
        h = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        w = h.dequantize()
    return w.detach().to(torch.float32).reshape(out_f, in_f).clone()


def bits_per_weight(nbits: int, group_size: Optional[int], in_features: int) -> float:
    """Storage per weight: the code plus one 16-bit scale and one 16-bit zero point per group."""
    g = group_size or in_features
    return nbits + 2 * META_BITS / g


def hqq_group_size(spec) -> Optional[int]:
    """The group size HQQ uses: the protocol's (granularity='per_group', group_size=G: the same groups as the
    other methods' rows of a grid) or options.group_size; None = per channel. Both set and different: refused."""
    if spec.granularity == "per_tensor":
        raise ConfigError("hqq works per channel or per group: use granularity per_channel, or per_group with "
                          "group_size")
    opt = spec.config.group_size
    proto = spec.group_size if spec.granularity == "per_group" else None
    if opt is not None and proto is not None and opt != proto:
        raise ConfigError(f"hqq: options.group_size={opt} contradicts the protocol's group_size={proto}; set one")
    if proto is not None:
        HQQConfig(group_size=proto)  # the same check as the option's (a multiple of 8)
    return proto if proto is not None else opt


def _execution_order(model: nn.Module, example_input, notes: list) -> list:
    from ..trace import is_weight_layer, trace

    names = [n for n, m in model.named_modules() if is_weight_layer(m)]
    if example_input is not None:
        try:
            order = trace(model, example_input).order
            return order + [n for n in names if n not in order]  # layers the input did not reach, last
        except Exception as exc:  # an input the model cannot run: weight-only needs no forward pass
            notes.append(f"hqq: example input not usable ({type(exc).__name__}); first/last by module order")
    else:
        notes.append("hqq: no example input; first/last layers by module registration order")
    return names


def hqq_quantize(model: nn.Module, spec, example_input=None, input_range=None) -> nn.Module:
    from ..engine import QuantInfo, check_model_weights, end_policy
    from ..transforms import get_module

    if spec.abits is not None:
        raise ConfigError(f"hqq is a weight-only method: set abits=None (got abits={spec.abits}); its activations "
                          "stay float")
    if spec.order != 1 or spec.budget is not None:
        raise ConfigError(f"hqq is an order-1 baseline (got order={spec.order}, budget={spec.budget})")
    group_size = hqq_group_size(spec)
    # spec.symmetric is not used: HQQ's grid is always asymmetric (a scale and a zero point per group)
    t0 = time.perf_counter()
    check_model_weights(model)
    m = copy.deepcopy(model).eval()
    info = QuantInfo(spec)
    order = _execution_order(m, example_input, info.notes)
    layers = []
    for i, name in enumerate(order):
        mod = get_module(m, name)
        role = "first" if i == 0 else "last" if i == len(order) - 1 else "body"
        bits = spec.wbits
        policy = end_policy(spec, role)[0]  # first_layer / last_layer, else first_last
        if policy == "fp":
            info.extra.setdefault("float_by_policy", []).append(name)
            continue
        if policy == "8bit":
            bits = max(8, spec.wbits)
        if isinstance(mod, nn.ConvTranspose2d):
            raise ConfigError(f"hqq does not handle ConvTranspose2d ({name}); use another method for this model")
        w = mod.weight.detach()
        w2 = w.reshape(w.shape[0], -1)
        gs = group_size if (group_size is not None and w2.shape[1] % group_size == 0) else None
        if group_size is not None and gs is None:
            info.notes.append(f"hqq: {name} (input size {w2.shape[1]}) per channel: group {group_size} does not divide it")
        dq = hqq_dequantized(w2, bits, gs).reshape(w.shape).to(w.dtype)
        mod.weight = nn.Parameter(dq, requires_grad=False)  # a new parameter: unties a shared embedding
        layers.append(dict(name=name, role=role, wbits=bits, group_size=gs,
                           bits_per_weight=bits_per_weight(bits, gs, w2.shape[1]), weights=w.numel(),
                           mean_abs_err=float((dq.float() - w.float()).abs().mean())))
    n = sum(r["weights"] for r in layers)
    # weight-only: every quantized layer keeps a float input (the count every result row shows)
    info.extra["float_inputs"] = dict(count=len(layers), of=len(layers), names=[r["name"] for r in layers])
    info.extra["hqq"] = dict(version=HQQ_VERSION, group_size=group_size, layers=layers,
                             bits_per_weight=(sum(r["bits_per_weight"] * r["weights"] for r in layers) / n) if n else None)
    info.extra["quantized_in_place"] = [r["name"] for r in layers]  # not "left float" (rex.api.planned_float)
    info.seconds = time.perf_counter() - t0
    m.rex_info = info
    return m


@register_method("hqq", "HQQ (Badri & Shaji 2023) via the hqq package: weight-only, data-free half-quadratic "
                 "zero-point optimisation, per channel or per group", config=HQQConfig, display="HQQ")
def hqq(model, spec, example_input=None, input_range=None):
    return hqq_quantize(model, spec, example_input=example_input, input_range=input_range)
