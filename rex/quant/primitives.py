"""Uniform quantization primitives: small pure functions, no modules, no state.

Conventions (see docs/method.md §1):
- a *signed symmetric* b-bit grid is the restricted range [-(2^(b-1)-1), 2^(b-1)-1], so b = 2 is ternary;
- an *unsigned* b-bit grid is [0, 2^b - 1] (activations after ReLU);
- an *asymmetric* b-bit grid is [0, 2^b - 1] with an integer zero point;
- scales are per output channel (axis 0) or per tensor, broadcast back with ``_expand_to``;
- a channel whose values are all zero gets scale 0 and quantizes to exactly 0 (no division by zero).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import ConfigError, WeightError

MIN_BITS, MAX_BITS = 2, 16

RoundingFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def check_bits(bits: int, what: str = "bit-width") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ConfigError(
            f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}] (2 = ternary), got {bits!r}; "
            f"use e.g. wbits=4 or abits=8 (32 means float and is only valid for activations left unquantized)"
        )
    return bits


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise a WeightError naming the tensor when it holds NaN or Inf (rounding would silently corrupt it)."""
    # fast path: a finite sum implies finite entries (NaN and Inf propagate into the sum); one reduction
    # without the bool tensor of isfinite. A sum that overflows falls through to the exact test.
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise WeightError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf values out of {x.numel()}; "
            "quantization needs finite weights: check the checkpoint (a diverged training run or a corrupted file)"
        )


def qrange(bits: int, signed: bool = True, restricted: bool = True) -> tuple[int, int]:
    """Integer range of a b-bit grid. Signed grids are restricted (symmetric) by default: b=2 -> {-1,0,1}."""
    check_bits(bits)
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if restricted else -qmax - 1), qmax
    return 0, 2**bits - 1


def int_dtype(bits: int) -> torch.dtype:
    """Smallest torch integer dtype holding a signed b-bit grid (storage, not compute)."""
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    """Dimensions to reduce for per-channel (axis given) or per-tensor (axis None) statistics."""
    if axis is None:
        return tuple(range(x.dim()))
    return tuple(d for d in range(x.dim()) if d != axis % x.dim())


def _expand_to(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Broadcast a per-channel vector (or a scalar) along ``axis`` of ``x``."""
    if axis is None or v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def absmax(x: torch.Tensor, axis: int | None = 0) -> torch.Tensor:
    if x.numel() == 0:
        raise WeightError("cannot quantize an empty tensor")
    dims = reduce_dims(x, axis)
    if not dims:
        return x.abs()
    # max|x| = max(max x, -min x): two reductions, no |x| tensor (same value, bit for bit)
    return torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg())


def symmetric_scale(x: torch.Tensor, bits: int, axis: int | None = 0) -> torch.Tensor:
    """s = max|x| / qmax per channel (axis) or per tensor (axis=None); 0 for an all-zero channel."""
    _, qmax = qrange(bits, signed=True)
    return absmax(x, axis).to(torch.float32) / qmax


def asymmetric_qparams(x: torch.Tensor, bits: int, axis: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max affine parameters on [0, 2^b-1]; the range always contains 0 so zero is exact."""
    dims = reduce_dims(x, axis)
    lo = x.amin(dim=dims).clamp(max=0) if dims else x.clamp(max=0)
    hi = x.amax(dim=dims).clamp(min=0) if dims else x.clamp(min=0)
    return _affine_from_range(lo, hi, bits)


def _affine_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of the unsigned b-bit grid covering [lo, hi] (lo <= 0 <= hi)."""
    qmin, qmax = qrange(bits, signed=False)
    scale = ((hi - lo) / (qmax - qmin)).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.where(scale > 0, (qmin - torch.round(lo / safe)), torch.zeros_like(scale))
    return scale, zero_point.clamp(qmin, qmax).to(torch.int32)


# ---- group-wise scales ---------------------------------------------------------------------------
# A row (one output channel, flattened over its inputs: C_in x kh x kw for a conv, in_features for a
# Linear) is cut into groups of ``group_size`` consecutive inputs, each with its own scale. A ragged last
# group (fan_in not a multiple of group_size, e.g. 576 = 4.5 x 128) is handled: it is simply shorter. It is
# padded with zeros for the reduction only, which changes no group's statistics (|0| never raises a max;
# the asymmetric range always contains 0 already).


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer (inputs per scale along a row, e.g. 128), got "
                          f"{group_size!r}")
    return group_size


def n_groups(fan_in: int, group_size: int) -> int:
    """Groups per row: ceil(fan_in / group_size) (the last one ragged when it does not divide)."""
    return -(-fan_in // group_size)


def to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[C, ...] -> [C, G, group_size], zero-padded at the end of each row."""
    c = x.shape[0]
    flat = x.reshape(c, -1)
    g = n_groups(flat.shape[1], group_size)
    pad = g * group_size - flat.shape[1]
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(c, g, group_size)


def expand_groups(v: torch.Tensor, shape: tuple, group_size: int) -> torch.Tensor:
    """A per-group tensor [C, G] broadcast to the weight's shape (every input gets its group's value)."""
    c, fan_in = shape[0], math.prod(shape[1:])
    return v.repeat_interleave(group_size, dim=1)[:, :fan_in].reshape(shape)


def group_symmetric_scale(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """[C, G] scales s = max|x| / qmax over each group (0 for an all-zero group)."""
    _, qmax = qrange(bits, signed=True)
    return to_groups(x, group_size).abs().amax(-1).to(torch.float32) / qmax


def group_asymmetric_qparams(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, G] min/max affine parameters, one pair per group."""
    xg = to_groups(x, group_size)
    return _affine_from_range(xg.amin(-1).clamp(max=0), xg.amax(-1).clamp(min=0), bits)


def round_nearest(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest (ties to even) then clamp: the default rounding rule."""
    return torch.round(x).clamp_(qmin, qmax)  # the clamp in place: one tensor, not two


def quantize_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    axis: int | None = 0,
    rounding: RoundingFn = round_nearest,
    out_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """q = clamp(round(x / s) + z). Channels with s = 0 map to q = z (exactly zero after dequantization)."""
    s = _expand_to(scale, x, axis)
    if bool((s > 0).all()):  # the common case: no all-zero channel, one division pass
        scaled = x / s
    else:
        safe = torch.where(s > 0, s, torch.ones_like(s))
        scaled = torch.where(s > 0, x / safe, torch.zeros_like(x))
    if zero_point is not None:
        z = _expand_to(zero_point, x, axis).to(scaled.dtype)
        q = rounding(scaled + z, qmin, qmax)
    else:
        q = rounding(scaled, qmin, qmax)
    return q.to(out_dtype)


def dequantize_affine(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None, axis: int | None = 0
) -> torch.Tensor:
    s = _expand_to(scale, q, axis)
    # a tensor of our own (never the caller's q), updated in place below
    qf = q.to(torch.float32) if q.dtype != torch.float32 else q.clone()
    if zero_point is not None:
        qf = qf.sub_(_expand_to(zero_point, q, axis).to(torch.float32))
    return qf.mul_(s) if s.dim() <= qf.dim() and torch.broadcast_shapes(s.shape, qf.shape) == qf.shape else qf * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor activation fake quantization (symmetric or unsigned, zero point 0)."""
    if isinstance(scale, torch.Tensor) and scale.dim() == 0:
        scale = float(scale)
    if scale == 0:
        return torch.zeros_like(x)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def quantize_bias(b: torch.Tensor, bits: int) -> torch.Tensor:
    """A bias on a symmetric per-tensor b-bit grid (DFQ's 16-bit biases): s = max|b| / (2^(b-1) - 1),
    round to nearest. An all-zero bias is returned as it is."""
    s = symmetric_scale(b.detach().float(), bits, axis=None)
    if float(s) == 0.0:
        return b.detach().clone()
    _, qmax = qrange(bits, signed=True)
    return (round_nearest(b.detach().float() / s, -qmax, qmax) * s).to(b.dtype)
