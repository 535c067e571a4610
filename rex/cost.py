"""The cost model, used everywhere: MACs, BOPs and model size.

    MACs(Conv2d) = C_out * H_out * W_out * (C_in / groups) * k_h * k_w      (per sample)
    MACs(Linear) = out_features * in_features * (number of input rows per sample)
    BOPs(layer)  = MACs * b_w * b_a * sum_k d(k)                             (method.md §3)

A float layer counts 32 x 32 with one term. Layers other than Conv2d/Linear (BN, pooling, activations,
adds) are not counted: their cost is negligible next to the MACs and every paper in this line omits it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

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
    kh, kw = _pair(kernel)
    oh, ow = output_hw or conv2d_output_hw(input_hw, kernel, stride, padding, dilation)
    return out_channels * oh * ow * (in_channels // groups) * kh * kw


def conv_transpose2d_macs(in_channels: int, out_channels: int, input_hw: tuple[int, int], kernel, groups: int = 1) -> int:
    """MACs of one ConvTranspose2d for one sample: every input pixel is multiplied into a kh x kw x
    (C_out / groups) patch (whatever the stride; output padding and cropping add no multiplications)."""
    kh, kw = _pair(kernel)
    return in_channels * input_hw[0] * input_hw[1] * (out_channels // groups) * kh * kw


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
    """MACs of one Conv2d / ConvTranspose2d / Linear (or a quantized layer wrapping one) for one sample, from
    its input and output shapes (batch dimension included, ignored). The one dispatch by layer type."""
    core = getattr(module, "inner", module)  # quantized layers wrap the float module
    if isinstance(core, nn.Conv2d):
        return conv2d_macs(
            core.in_channels, core.out_channels, tuple(in_shape[-2:]), core.kernel_size, core.stride,
            core.padding, core.dilation, core.groups, output_hw=tuple(out_shape[-2:]),
        )
    if isinstance(core, nn.ConvTranspose2d):
        return conv_transpose2d_macs(core.in_channels, core.out_channels, tuple(in_shape[-2:]), core.kernel_size,
                                     core.groups)
    if isinstance(core, nn.Linear):
        rows = math.prod(in_shape[1:-1])  # vectors per sample (tokens)
        return linear_macs(core.in_features, core.out_features, rows)
    raise TypeError(f"no MAC formula for {type(core).__name__}")


def _is_costed(module: nn.Module) -> bool:
    from .nn.layers import QuantLayer

    if isinstance(module, QuantLayer):
        return True
    return isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and not _inside_quant(module)


def _inside_quant(module: nn.Module) -> bool:
    return getattr(module, "_rex_wrapped", False)


def cost_table(model: nn.Module, example_input) -> list[LayerCostRecord]:
    """Per-layer MACs/BOPs/size for one sample, from one forward pass of ``example_input``."""
    from .nn.layers import QuantLayer

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
    try:
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return records


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


def model_size_bits(model: nn.Module) -> int:
    """Weight storage in bits: b bits per kept integer weight per term (+32 bits per channel scale),
    32 bits per float parameter elsewhere (biases, BN, unquantized layers)."""
    from .nn.layers import QuantLayer

    total = 0
    counted: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantLayer):
            total += m.size_bits()
            for p in m.inner.parameters(recurse=True):
                counted.add(id(p))
            if m.inner.bias is not None:
                total += m.inner.bias.numel() * FLOAT_BITS
    for p in model.parameters():
        if id(p) not in counted:
            total += p.numel() * FLOAT_BITS
    return total
