"""Data-free activation ranges for transformer blocks: pure functions on intervals (method.md §4).

An interval is ``(lo, hi)`` with lo <= hi, or None when nothing sound can be said (the input then stays
float and is counted as such). The tracer (``rex.trace``) applies these rules op by op.

- LayerNorm: the normalised features x_hat have zero mean and unit variance over the D features of a
  token, so, as for a BatchNorm's output, beta_c + n |gamma_c| bounds feature c with n the protocol's
  sigma (``QuantSpec.sigma``). Over D features, standardisation also bounds every x_hat exactly:
  |x_hat_i| <= sqrt(D - 1) (equality when all but one feature are equal), so n is capped at sqrt(D - 1):
  for D <= 37 at sigma 6 the range is a hard bound, not a clipping choice.
- GELU of an interval: GELU(x) = x Phi(x) is decreasing below x* = -0.7518 and increasing above, with
  minimum GELU(x*) = -0.16997; the image of [lo, hi] is exact from these facts.
- SiLU likewise (minimum -0.27846 at x = -1.27846).
- Residual add of two intervals: [a_lo + b_lo, a_hi + b_hi] (sound whatever the correlation).
- Softmax output: [0, 1] whatever the input.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

Interval = Optional[tuple[float, float]]

GELU_ARGMIN = -0.7517916243876858  # where d/dx x Phi(x) = 0
SILU_ARGMIN = -1.2784645427610738  # where d/dx x sigmoid(x) = 0


def layernorm_interval(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], sigma: float,
                       features: Optional[int] = None) -> tuple[float, float]:
    """Per-tensor range of a LayerNorm output: [min_c(beta_c - n|gamma_c|), max_c(beta_c + n|gamma_c|)],
    n = min(sigma, sqrt(D - 1)) with D the normalised feature count (``features``, default the size of
    ``weight``). No affine parameters: gamma = 1, beta = 0."""
    if weight is None and bias is None and features is None:
        raise ValueError("layernorm_interval needs the affine parameters or the number of features")
    d = features if features is not None else (weight if weight is not None else bias).numel()
    n = min(float(sigma), math.sqrt(max(d - 1, 0)))
    g = torch.ones(d) if weight is None else weight.detach().float().flatten().abs()
    b = torch.zeros(d) if bias is None else bias.detach().float().flatten()
    return float((b - n * g).min()), float((b + n * g).max())


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _valley(iv: Interval, f, argmin: float) -> Interval:
    """Image of [lo, hi] under a function decreasing before ``argmin`` and increasing after."""
    if iv is None:
        return None
    lo, hi = iv
    ends = (f(lo), f(hi))
    low = f(argmin) if lo <= argmin <= hi else min(ends)
    return (low, max(ends))


def gelu_interval(iv: Interval) -> Interval:
    """Exact image of an interval under the (erf) GELU; the tanh approximation differs by < 1e-3."""
    return _valley(iv, _gelu, GELU_ARGMIN)


def silu_interval(iv: Interval) -> Interval:
    return _valley(iv, _silu, SILU_ARGMIN)


def add_interval(a: Interval, b: Interval) -> Interval:
    """Range of x + y for x in a, y in b (a residual add)."""
    if a is None or b is None:
        return None
    return (a[0] + b[0], a[1] + b[1])


def softmax_interval(_: Interval = None) -> tuple[float, float]:
    """Softmax outputs are probabilities, whatever the input range."""
    return (0.0, 1.0)


def layer_norm_rule(args: Sequence, kwargs: dict, sigma: float) -> tuple[float, float]:
    """The tracer's rule for ``F.layer_norm(input, normalized_shape, weight, bias, eps)``."""
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    features = math.prod(shape) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    return layernorm_interval(weight, bias, sigma, features)
