"""HQQ (Badri & Shaji 2023, Half-Quadratic Quantization) as a weight-only, data-free baseline, through the
`hqq` package (`pip install hqq==0.2.8.post1`, or `pip install -e .[hqq]`): the library is called, not
re-implemented.

    rex.quantize(model, method="hqq", wbits=4, abits=None, options={"group_size": 64}, example_input=ex)

Each weight layer's matrix (nn.Linear; a Conv1d/2d/3d weight flattened to [C_out, C_in*prod(kernel)]) goes
through the library's `Quantizer.quantize` with the arguments `HQQLinear(..., quant_config=BaseQuantizeConfig(nbits,
group_size), compute_dtype=float32, device="cpu")` gives it, bit packing off (`hqq_qtensor`: packing is lossless,
and HQQLinear's fails on shapes it does not divide, e.g. an odd output count at W4 per channel): an asymmetric
grid (a scale and a zero point per group of `group_size` consecutive input weights, or per output row when
`group_size` is None) whose zero points are optimised by HQQ's half-quadratic solver without data. The layer
becomes a QuantLayer, as with every other method, holding HQQ's codes, scales and (float) zero points, and HQQ's
dequantized weight as its weight (fake quantization, as `mode="fake"` for the other methods): its bit-width
and group size are what the cost model reads (BOPs b_w x 32 per MAC, bits per weight). Activations stay
float: the spec must be weight-only (abits=None); orders and budgets are REx's and are refused here. HQQ
quantizes to 2, 3, 4, 5, 6 or 8 bits (`hqq_bits`); another bit-width is refused before anything runs.

Options (`spec.config`, an HQQConfig): `group_size` (None = one group per output row, i.e. per channel; else a multiple
of 8 dividing every quantized layer's input size, e.g. 64 or 128). The spec's own `granularity="per_group",
group_size=G` (the protocol's, shared with the other methods' rows of a grid) sets the same thing.

First/last-layer policy (spec.first_last, like the engine's, on the same execution order from tracing
`example_input`): '8bit' gives the first and last layers 8 bits, 'same' quantizes them like the rest,
'fp' leaves them float. Without an example input (or one the model cannot run), the order is the module
registration order and a note says so. Tied weights (an LM head sharing the embedding matrix) are untied:
the quantized layer gets its own parameter and the embedding stays float, as with the engine's QuantLayer.
Bits per weight (`rex.cost.weight_memory`, the same count as every method's, in `rex_info.extra["memory"]`):
scales and zero points stored in 16 bits each, HQQ's default meta-data format (fp16; its zero point is a float
off the grid, where a min/max grid's is a b-bit integer): wbits + 32 / group_size, or wbits + 32 / C_in per
channel. `rex_info.extra["hqq"]`: the library version, the group size and each layer's bits and error.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, RexError
from ..quant import QTensor
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


@functools.cache
def hqq_bits() -> tuple:
    """The integer bit-widths HQQ quantizes to that a spec can ask for (wbits >= 2): 2, 3, 4, 5, 6, 8."""
    _, Quantizer = require_hqq()
    return tuple(b for b in Quantizer.SUPPORTED_BITS if isinstance(b, int) and b >= 2)[::-1]


def require_hqq():
    """The hqq entry points (BaseQuantizeConfig, Quantizer), or a RexError naming the install command."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # hqq prints backend notices at import
            from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError as exc:
        raise RexError(f"the hqq baseline needs the hqq package ({type(exc).__name__}: {exc}); install it with "
                       f"`pip install hqq=={HQQ_VERSION}` (or `pip install -e .[hqq]`)") from None
    return BaseQuantizeConfig, Quantizer


def hqq_params(nbits: int, group_size: Optional[int], in_features: int) -> dict:
    """The keyword arguments HQQLinear passes to ``Quantizer.quantize`` for this config (BaseQuantizeConfig's
    ``weight_quant_params``: axis 1, i.e. groups of consecutive inputs of a row, zero-point rounding at
    4 bits, the half-quadratic optimiser on), with HQQLinear's own substitution: per channel
    (``group_size=None``) is one group of the whole row."""
    BaseQuantizeConfig, _ = require_hqq()
    params = dict(BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)["weight_quant_params"])
    if params["group_size"] is None:
        params["group_size"] = in_features
    return params


def hqq_qtensor(weight: torch.Tensor, nbits: int, group_size: Optional[int]) -> tuple[QTensor, torch.Tensor]:
    """HQQ's quantization of a 2-D weight [out, in]: (its codes, scales and zero points as a QTensor, and
    HQQ's own dequantized weight [out, in], float32).

    The library's ``Quantizer.quantize`` with the very arguments HQQLinear gives it (``hqq_params``), except
    ``bitpack=False``: packing is lossless storage (two 4-bit codes per byte taken from the two halves of the
    rows, ten 3-bit codes per int32, four 2-bit codes per byte) that only works when the packing divides
    the row count, so HQQLinear fails on an odd output count at W4 per channel (and on 7 x 64 in groups of
    64, 6 rows at W2, ...). Unpacked, the codes, scales and zero points are the same numbers: HQQLinear's
    dequantized weight (compute_dtype float32, on the CPU; on a zero-padded copy where it cannot pack the shape)
    is exactly ``(q - zero) * scale`` of these (tests/test_hqq.py). The whole matrix goes through one call, as in HQQLinear: the solver's early stop
    looks at the mean error of the whole matrix.

    Layout: q [out, in] (integers 0 .. 2^b - 1, stored as int32), scale and zero [out, in / group] per
    group or [out] per channel (group_size None). The zero point is a float (the solver moves it off the
    integer grid), one per group like the scale."""
    _, Quantizer = require_hqq()
    if weight.dim() != 2:
        raise ConfigError(f"hqq quantizes 2-D weight matrices, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if group_size is not None and in_f % group_size:
        raise ConfigError(f"options.group_size={group_size} does not divide a layer's input size {in_f}; use a "
                          "divisor of every layer's input size, or group_size: null (per channel)")
    if nbits not in hqq_bits():
        raise ConfigError(f"hqq quantizes to {', '.join(map(str, hqq_bits()))} bits, not {nbits}; use one of those")
    params = hqq_params(nbits, group_size, in_f)
    w = weight.detach().to(torch.float32).contiguous()
    with contextlib.redirect_stdout(io.StringIO()):
        w_q, meta = Quantizer.quantize(w, device="cpu", compute_dtype=torch.float32, bitpack=False, **params)
        meta["compute_dtype"] = torch.float32  # HQQLinear(compute_dtype=float32) dequantizes in float32
        dq = Quantizer.dequantize(w_q, meta)
    groups = in_f // params["group_size"]
    q = w_q.reshape(out_f, in_f).to(torch.int32)
    scale = meta["scale"].reshape(out_f, groups).to(torch.float32)
    zero = meta["zero"].reshape(out_f, groups).to(torch.float32)
    if group_size is None:  # one group per row: the per-channel layout of QTensor
        scale, zero = scale[:, 0].contiguous(), zero[:, 0].contiguous()
    qt = QTensor(q, scale, zero, nbits, group_size, zero_bits=META_BITS)
    return qt, dq.detach().to(torch.float32).reshape(out_f, in_f).clone()


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
    from ..cost import weight_memory
    from ..engine import QuantInfo, check_model_weights, end_policy
    from ..expansion import ExpansionTerm
    from ..nn.layers import make_quant_layer
    from ..transforms import get_module, set_module

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
    plan = []  # (name, role, bits): every layer's bit-width checked before the (slow) solver runs on any
    for i, name in enumerate(order):
        mod = get_module(m, name)
        role = "first" if i == 0 else "last" if i == len(order) - 1 else "body"
        policy = end_policy(spec, role)[0]  # first_layer / last_layer, else first_last
        if policy == "fp":
            info.extra.setdefault("float_by_policy", []).append(name)
            continue
        bits = max(8, spec.wbits) if policy == "8bit" else spec.wbits
        if isinstance(mod, nn.ConvTranspose2d):
            raise ConfigError(f"hqq does not handle ConvTranspose2d ({name}); use another method for this model")
        if bits not in hqq_bits():
            raise ConfigError(f"hqq: layer {name} ({role}) would get {bits} bits, but HQQ quantizes to "
                              f"{', '.join(map(str, hqq_bits()))} bits only; use one of those wbits")
        plan.append((name, role, bits))
    layers = []
    for name, role, bits in plan:
        mod = get_module(m, name)
        w = mod.weight.detach()
        w2 = w.reshape(w.shape[0], -1)  # Conv1d/2d/3d: [C_out, C_in / groups * prod(kernel)], HQQ's rows
        gs = group_size if (group_size is not None and w2.shape[1] % group_size == 0) else None
        if group_size is not None and gs is None:
            info.notes.append(f"hqq: {name} (input size {w2.shape[1]}) per channel: group {group_size} does not divide it")
        try:
            qt, dq = hqq_qtensor(w2, bits, gs)
        except RexError:
            raise
        except Exception as exc:  # the library's own assertion or shape error: named, in one line
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise RexError(f"hqq failed on layer {name} (weight {tuple(w.shape)}, {bits} bits, group {gs}): "
                           f"{type(exc).__name__}: {msg}; use rtn for this layer's model or another group size"
                           ) from None
        qt.q = qt.q.reshape(w.shape)  # the layer's own weight shape; groups run along the flattened fan-in
        term = ExpansionTerm(qt, torch.ones(w.shape[0], dtype=torch.bool))
        # a QuantLayer like every other method's: it carries the bit-width, group size and zero points that the
        # BOPs (b_w x 32) and the bits per weight are read from; its weight is HQQ's dequantized one, a new
        # parameter (unties an LM head shared with the embedding)
        layer = make_quant_layer(mod, [term], None, bits, name=name, mode=spec.mode,
                                 dequantized=dq.reshape(w.shape))
        err = (dq.reshape(w.shape) - w.float()).abs()
        layer.max_err, layer.bound_max, layer.bound_ok = float(err.max()), None, None  # HQQ has no error bound
        layer.role = role
        set_module(m, name, layer)
        layers.append(dict(name=name, role=role, wbits=bits, group_size=gs, weights=w.numel(),
                           mean_abs_err=float(err.mean())))
    # weight-only: every quantized layer keeps a float input (the count every result row shows)
    info.extra["float_inputs"] = dict(count=len(layers), of=len(layers), names=[r["name"] for r in layers])
    info.extra["memory"] = weight_memory(m)  # bits per weight, counted as for every method (rex.cost)
    info.extra["hqq"] = dict(version=HQQ_VERSION, group_size=group_size, layers=layers)
    info.seconds = time.perf_counter() - t0
    m.rex_info = info
    return m


@register_method("hqq", "HQQ (Badri & Shaji 2023) via the hqq package: weight-only, data-free half-quadratic "
                 "zero-point optimisation, per channel or per group", config=HQQConfig, display="HQQ")
def hqq(model, spec, example_input=None, input_range=None):
    return hqq_quantize(model, spec, example_input=example_input, input_range=input_range)
