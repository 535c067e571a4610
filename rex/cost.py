"""The cost model, used everywhere: MACs, BOPs and model size.

    MACs(ConvNd) = C_out * prod(output spatial size) * (C_in / groups) * prod(kernel)   (per sample; Conv1d,
                   Conv2d, Conv3d: C_out * H_out * W_out * (C_in / groups) * k_h * k_w for a Conv2d)
    MACs(Linear) = out_features * in_features * (number of input rows per sample: tokens)
    MACs(Embedding) = 0 (a lookup; its table still counts in the model size)
    BOPs(layer)  = MACs * b_w * b_a * sum_k d(k)                             (method.md §3)

A float layer counts 32 x 32 with one term. Activation x activation matmuls (attention's Q K^T and P V)
are counted too, 32 x 32 while their operands are float (``cost_table``). Other layers (BN, pooling,
activations, adds) are not counted: their cost is negligible next to the MACs and every paper in this line omits it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .nn.layers import CONVS, QuantLayer, is_conv, is_embedding, is_hf_conv1d

FLOAT_BITS = 32


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def conv2d_output_hw(
    hw: tuple[int, int], kernel, stride=1, padding=0, dilation=1
) -> tuple[int, int]:
    """Output spatial size of a convolution; ``padding`` may be an int, a pair, 'same' or 'valid'."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if padding == "same":
        return (math.ceil(hw[0] / sh), math.ceil(hw[1] / sw))
    ph, pw = (0, 0) if padding == "valid" else _pair(padding)
    h = (hw[0] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w = (hw[1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return h, w


def conv2d_macs(
    in_channels: int,
    out_channels: int,
    input_hw: tuple[int, int],
    kernel,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    output_hw: tuple[int, int] | None = None,
) -> int:
    """MACs of one Conv2d for one sample. ``output_hw`` overrides the computed size (e.g. a subclass
    that pads inside its forward)."""
    out = output_hw or conv2d_output_hw(input_hw, kernel, stride, padding, dilation)
    return conv_macs(in_channels, out_channels, _pair(kernel), out, groups)


def conv_transpose2d_macs(in_channels: int, out_channels: int, input_hw: tuple[int, int], kernel, groups: int = 1) -> int:
    """MACs of one ConvTranspose2d for one sample: every input pixel is multiplied into a kh x kw x
    (C_out / groups) patch (whatever the stride; output padding and cropping add no multiplications)."""
    kh, kw = _pair(kernel)
    return in_channels * input_hw[0] * input_hw[1] * (out_channels // groups) * kh * kw


def conv_macs(in_channels: int, out_channels: int, kernel: Sequence[int], output_size: Sequence[int],
              groups: int = 1) -> int:
    """MACs of one Conv1d / Conv2d / Conv3d for one sample: every output element (C_out x the output's
    spatial size) sums (C_in / groups) x prod(kernel) products. The output size is read from the layer's
    real output (a subclass may pad inside its forward)."""
    return out_channels * math.prod(output_size) * (in_channels // groups) * math.prod(kernel)


def linear_macs(in_features: int, out_features: int, rows: int = 1) -> int:
    """MACs of one Linear for one sample; ``rows`` = number of vectors per sample (tokens)."""
    return in_features * out_features * rows


def layer_bops(macs: int, wbits: int, abits: int, densities: Sequence[float] = (1.0,)) -> int:
    """BOPs = MACs * b_w * b_a * sum of order densities (d(1) = 1)."""
    return int(round(macs * wbits * abits * float(sum(densities))))


@dataclass
class LayerCostRecord:
    name: str
    kind: str
    macs: int
    wbits: int
    abits: int
    densities: tuple[float, ...]
    bops: int
    params: int
    size_bits: int


def module_macs(module: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
    """MACs of one Conv1d/2d/3d / ConvTranspose2d / Linear (or a quantized layer wrapping one) for one sample,
    from its input and output shapes (batch dimension included, ignored). The one dispatch by layer type."""
    core = getattr(module, "inner", module)  # quantized layers wrap the float module
    if isinstance(core, CONVS):
        rank = len(core.kernel_size)  # the last `rank` dims are spatial (batched or not)
        return conv_macs(core.in_channels, core.out_channels, core.kernel_size, tuple(out_shape[-rank:]), core.groups)
    if isinstance(core, nn.ConvTranspose2d):
        return conv_transpose2d_macs(core.in_channels, core.out_channels, tuple(in_shape[-2:]), core.kernel_size,
                                     core.groups)
    if isinstance(core, nn.Linear):
        rows = math.prod(in_shape[1:-1])  # vectors per sample (tokens)
        return linear_macs(core.in_features, core.out_features, rows)
    if is_hf_conv1d(core):  # weight stored (in, out)
        rows = math.prod(in_shape[1:-1])
        return linear_macs(core.weight.shape[0], core.weight.shape[1], rows)
    if is_embedding(core):
        return 0  # a table lookup: no multiply-accumulate
    raise TypeError(f"no MAC formula for {type(core).__name__}")


def _is_costed(module: nn.Module) -> bool:
    if isinstance(module, QuantLayer):
        return True
    return (is_conv(module) or isinstance(module, nn.Linear) or is_hf_conv1d(module)
            or is_embedding(module)) and not _inside_quant(module)


def _inside_quant(module: nn.Module) -> bool:
    return getattr(module, "_rex_wrapped", False)


def cost_table(model: nn.Module, example_input, attention_abits: int = FLOAT_BITS) -> list[LayerCostRecord]:
    """Per-layer MACs/BOPs/size for one sample, from one forward pass of ``example_input``; activation x
    activation matmuls (attention) are rows of kind ``matmul`` at ``attention_abits`` x ``attention_abits``."""
    records: list[LayerCostRecord] = []
    handles = []

    def hook(name):
        def fn(module, args, out):
            inp = args[0]
            macs = module_macs(module, tuple(inp.shape), tuple(out.shape))  # per sample: the formulas exclude the batch
            if isinstance(module, QuantLayer):
                wb, ab, dens = module.wbits, module.abits or FLOAT_BITS, tuple(module.densities)
                size = module.size_bits()
                params = module.inner.weight.numel()
            else:
                wb, ab, dens = FLOAT_BITS, FLOAT_BITS, (1.0,)
                params = module.weight.numel()
                size = params * FLOAT_BITS
            kind = type(getattr(module, "inner", module)).__name__
            records.append(LayerCostRecord(name, kind, macs, wb, ab, dens, layer_bops(macs, wb, ab, dens), params, size))
        return fn

    for name, m in model.named_modules():
        if _is_costed(m):
            handles.append(m.register_forward_hook(hook(name)))
    counter = _MatmulCounter()
    try:
        with torch.no_grad(), counter:
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    batch = max(1, _batch_size(example_input))
    for i, mm in enumerate(counter.macs):
        macs = mm // batch
        records.append(LayerCostRecord(f"matmul#{i}", "matmul", macs, attention_abits, attention_abits, (1.0,),
                                       layer_bops(macs, attention_abits, attention_abits), 0, 0))
    return records


# ---- memory: bits per weight ----------------------------------------------------------------------
# Weight-only rows are about memory, not BOPs. Stored per quantized layer and per expansion term k:
#   integers      kept rows x fan_in x b bits
#   scales        kept rows x (scales per row: 1 per channel, G per group) x SCALE_BITS  (fp16 / bf16)
#   zero points   the same count x b bits (asymmetric grids only; an integer on the b-bit grid), or x 16 bits
#                 where the zero point is a float off the grid (HQQ: its solver optimises it; kept as fp16,
#                 ``QuantLayer.zero_bits``). HQQ W3 g64: 3 + (16 + 16) / 64 = 3.5; min/max W3 g64 asymmetric:
#                 3 + (16 + 3) / 64; symmetric (no zero point): 3 + 16 / 64
#   mask          C_out bits for a sparse order (density < 1): which rows it keeps; a dense order has none
# divided by the weight count C_out x fan_in. W4 K=2 dense per channel: 8 + 2 x 16 / fan_in bits; a
# budget that keeps half the rows at order 2: 6 + (1 + 1/2) x 16 / fan_in + 1 / fan_in bits. A float
# layer is 32 bits per weight. (``model_size_bits`` keeps its older 32-bit-scale convention.)
SCALE_BITS = 16


@dataclass
class WeightMemory:
    name: str
    weights: int  # C_out x fan_in
    bits: int  # total storage of the layer's weight (all terms, scales, zero points, masks)
    integer_bits: int
    scale_bits: int
    mask_bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


def layer_weight_memory(layer, name: str = "") -> WeightMemory:
    """Storage of one quantized layer's weight (a ``QuantLayer``), see the rules above."""
    c_out = layer._wshape[0]
    fan_in = math.prod(layer._wshape[1:])
    ints = scales = masks = 0
    for k in range(layer.order):
        q, s, z, m = layer.term(k)
        rows = int(m.sum())
        if rows == 0:
            continue
        per_row = s.shape[1] if getattr(layer, "group_size", None) else 1
        ints += rows * fan_in * layer.wbits
        zbits = (layer.zero_bits or layer.wbits) if z is not None else 0
        scales += rows * per_row * (SCALE_BITS + zbits)
        if rows < c_out:
            masks += c_out
    return WeightMemory(name or layer.layer_name, c_out * fan_in, ints + scales + masks, ints, scales, masks)


def weight_memory(model: nn.Module) -> dict:
    """Bits per weight of a quantized model: per quantized layer and for the model (quantized layers'
    weights only, ``bits_per_weight``; without the embedding tables, which the first/last policy may keep
    at 8 bits and which dominate a small transformer, ``bits_per_weight_no_embeddings``; and with every
    other weight layer at 32 bits, ``bits_per_weight_all``)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    rows = [layer_weight_memory(m, n) for n, m in layers]
    float_weights = sum(m.weight.numel() for m in model.modules() if _is_costed(m) and not isinstance(m, QuantLayer))
    qw = sum(r.weights for r in rows)
    qb = sum(r.bits for r in rows)
    mm = [r for r, (_, m) in zip(rows, layers) if not getattr(m, "embedding", False)]  # matmul layers only
    mw, mb = sum(r.weights for r in mm), sum(r.bits for r in mm)
    return dict(
        scale_bits=SCALE_BITS,
        bits_per_weight=(qb / qw) if qw else None,
        bits_per_weight_no_embeddings=(mb / mw) if mw else None,
        bits_per_weight_all=((qb + 32 * float_weights) / (qw + float_weights)) if qw + float_weights else None,
        quantized_weights=qw, float_weights=float_weights,
        per_layer={r.name: round(r.bits_per_weight, 6) for r in rows},
    )


# ---- activation x activation matmuls (attention) --------------------------------------------------
# Detected during the cost pass with a TorchFunctionMode: a matmul / bmm / scaled_dot_product_attention
# whose operands are all non-Parameter tensors (a Linear's or Conv1D's weight is a Parameter; attention's
# Q K^T and P V multiply two activations). Both operands are float in this simulation (no quantizer sits
# on them), so they count 32 x 32; ``attention_abits`` is the bit-width to count instead when both are
# quantized. MACs per sample: the batch (first dim of the example input) divided out.
_MATMULS = {"matmul", "bmm", "__matmul__", "__rmatmul__", "scaled_dot_product_attention", "baddbmm"}


def _matmul_macs(name: str, args, kwargs) -> int:
    if name == "scaled_dot_product_attention":
        q, k, v = args[0], args[1] if len(args) > 1 else kwargs["key"], args[2] if len(args) > 2 else kwargs["value"]
        lead = math.prod(q.shape[:-2])
        return lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])  # Q K^T, then P V
    a, b = (args[1], args[2]) if name == "baddbmm" else (args[0], args[1])
    if a.dim() < 2 or b.dim() < 2:
        return 0
    lead = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return lead * a.shape[-2] * a.shape[-1] * b.shape[-1]


class _MatmulCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.macs: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _MATMULS:
            ts = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            if len(ts) >= 2 and not any(isinstance(t, nn.Parameter) for t in ts):
                try:
                    self.macs.append(_matmul_macs(name, args, kwargs))
                except Exception:  # counting must never break a forward pass
                    pass
        return func(*args, **kwargs)


def _batch_size(example_input) -> int:
    for t in (example_input.values() if isinstance(example_input, dict) else
              example_input if isinstance(example_input, (tuple, list)) else [example_input]):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


def _call(model: nn.Module, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def macs(model: nn.Module, example_input) -> int:
    return sum(r.macs for r in cost_table(model, example_input))


def bops(model: nn.Module, example_input) -> int:
    """Total BOPs per sample: float layers 32x32, quantized layers b_w x b_a x sum of kept densities."""
    return sum(r.bops for r in cost_table(model, example_input))


def order1_bops(table: Sequence[LayerCostRecord]) -> int:
    """BOPs of the same model at order 1 (every layer's first, dense term alone: the plain W/A model), from the
    cost table of any order and budget. Exactly ``bops`` of the spec quantized again with order=1, budget=None:
    the plan (which layers, their bits, their input ranges: from the float model) and the forward's shapes do
    not depend on the order or the budget; only a quantized layer's densities do."""
    return sum(layer_bops(r.macs, r.wbits, r.abits) for r in table)


def model_size_bits(model: nn.Module) -> int:
    """Weight storage in bits: b bits per kept integer weight per term (+32 bits per channel scale),
    32 bits per float parameter elsewhere (biases, BN, unquantized layers)."""
    total = 0
    counted: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantLayer):
            total += m.size_bits()
            for p in m.inner.parameters(recurse=True):
                counted.add(id(p))
            bias = getattr(m.inner, "bias", None)  # an Embedding has none
            if bias is not None:
                total += bias.numel() * FLOAT_BITS
    for p in model.parameters():
        if id(p) not in counted:
            total += p.numel() * FLOAT_BITS
    return total
