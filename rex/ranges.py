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
- Softmax output: [0, 1] whatever the input; a softmax-weighted average of rows (attention's context,
  softmax(Q K^T) V) stays in the hull of the rows' interval.

Range propagation through a weight layer (``QuantSpec.range_propagation``, for a layer input that no
BatchNorm or LayerNorm precedes, e.g. the second of two convolutions, or the Linear after GELU):

- ``moments``: the per-channel mean and standard deviation of the layer's input (``Moments``, from the
  preceding BatchNorm or LayerNorm: beta_c, |gamma_c|) carried through the layer, mean W mu + b and
  standard deviation sqrt(sum_j w_ij^2 sigma_j^2) (inputs taken as independent; a convolution sums over its
  kernel taps and input channels), then the usual n-sigma interval (``bn_interval``). An estimate, like the
  BatchNorm rule itself: it may clip.
- ``interval``: sound interval arithmetic, out_hi = b + sum_j max(w_j lo, w_j hi) (``layer_interval``):
  never clips, loose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Interval = Optional[tuple[float, float]]

GELU_ARGMIN = -0.7517916243876858  # where d/dx x Phi(x) = 0
SILU_ARGMIN = -1.2784645427610738  # where d/dx x sigmoid(x) = 0


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def clipped_normal_moments(mu: torch.Tensor, var: torch.Tensor, lo: Optional[float], hi: Optional[float]):
    """Mean and variance of clamp(X, lo, hi) for X ~ N(mu, var) (lo/hi None = unbounded), elementwise."""
    mu, var = mu.double(), var.double().clamp(min=0)
    sd = var.sqrt().clamp(min=1e-12)
    a = torch.full_like(mu, -math.inf) if lo is None else (lo - mu) / sd
    b = torch.full_like(mu, math.inf) if hi is None else (hi - mu) / sd
    pa, pb = _Phi(a), _Phi(b)
    da = torch.where(torch.isfinite(a), _phi(a), torch.zeros_like(a))
    db = torch.where(torch.isfinite(b), _phi(b), torch.zeros_like(b))
    # E[X 1{a<Z<b}] and E[X^2 1{a<Z<b}] with Z the standardized X
    m_in = mu * (pb - pa) + sd * (da - db)
    az = torch.where(torch.isfinite(a), a * da, torch.zeros_like(a))
    bz = torch.where(torch.isfinite(b), b * db, torch.zeros_like(b))
    s2_in = (mu * mu + var) * (pb - pa) + 2 * mu * sd * (da - db) + var * (az - bz)
    lo_t = 0.0 if lo is None else lo
    hi_t = 0.0 if hi is None else hi
    mean = m_in + lo_t * pa + hi_t * (1 - pb)
    second = s2_in + lo_t * lo_t * pa + hi_t * hi_t * (1 - pb)
    out_var = (second - mean * mean).clamp(min=0)
    return mean.float(), out_var.float()


def bn_interval(mean: torch.Tensor, std: torch.Tensor, sigma: float) -> tuple[float, float]:
    """Per-tensor range of a tensor with per-channel (mean, std), e.g. a BN output with (beta, gamma):
    [min_c(mean_c - n|std_c|), max_c(mean_c + n|std_c|)]."""
    std = std.abs()
    return float((mean - sigma * std).min()), float((mean + sigma * std).max())


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


def softmax_average_interval(rows: Interval) -> Interval:
    """Range of sum_j p_j v_j with p_j >= 0, sum_j p_j = 1 (a softmax-weighted average, attention's context)
    and every v_j in ``rows``: a convex combination stays in the hull."""
    return rows


@dataclass(frozen=True)
class Moments:
    """Per-channel mean and standard deviation of a tensor along its channel axis ``dim`` (a non-negative
    index: 1 for N x C x H x W, the last axis for tokens N x T x D)."""

    mean: torch.Tensor  # [C], float64
    std: torch.Tensor  # [C], float64, >= 0
    dim: int

    @staticmethod
    def of(mean: torch.Tensor, std: torch.Tensor, dim: int) -> "Moments":
        return Moments(mean.detach().double().flatten(), std.detach().double().abs().flatten(), dim)


def _grouped(weight: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """sum over (input channel of the group, kernel tap) of weight[o, i, ...] * v[group's i] for every output o:
    a Conv's [C_out, C_in / groups, *k] weight or a Linear's [C_out, C_in] on a per-input-channel vector."""
    w = weight.detach().double().reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)  # [g, o, i, k]
    return (w * v.reshape(groups, 1, weight.shape[1], 1)).sum(dim=(2, 3)).reshape(-1)


def layer_moments(m: Moments, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int = 1,
                  dim: int = 1) -> Moments:
    """Moments of a Conv/Linear output from its input's: mean W mu + b, std sqrt(sum_j w_j^2 sigma_j^2)
    (inputs independent; a convolution sums over its taps and input channels; zero padding ignored).
    ``dim`` is the channel axis of the output."""
    mean = _grouped(weight, m.mean, groups)
    if bias is not None:
        mean = mean + bias.detach().double()
    var = _grouped(weight.detach().double() ** 2, m.std ** 2, groups)
    return Moments(mean, var.clamp(min=0).sqrt(), dim)


def layer_interval(x: tuple[float, float], weight: torch.Tensor, bias: Optional[torch.Tensor],
                   zero_in_input: bool = False) -> tuple[float, float]:
    """Sound per-tensor range of a Conv/Linear output whose every input lies in ``x`` = [lo, hi]: per
    output channel o, b_o + sum_j min/max(w_oj lo, w_oj hi) over its weights j (taps and input channels; a
    grouped conv's weight holds only its group's inputs), then the hull over channels.
    ``zero_in_input``: zero padding (or a transposed conv, where an output sees a subset of the taps) also
    feeds zeros: the input interval is widened to hold 0, which makes every subset of the sum sound too."""
    lo, hi = float(x[0]), float(x[1])
    if zero_in_input:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    w = weight.detach().double().flatten(1)
    pos, neg = w.clamp(min=0).sum(1), w.clamp(max=0).sum(1)
    out_lo, out_hi = pos * lo + neg * hi, pos * hi + neg * lo
    if bias is not None:
        b = bias.detach().double()
        out_lo, out_hi = out_lo + b, out_hi + b
    return float(out_lo.min()), float(out_hi.max())


def clip_moments(m: Moments, lo: Optional[float], hi: Optional[float]) -> Moments:
    """Moments of clamp(X, lo, hi) (ReLU: lo = 0) for X per channel N(mean, std^2): the clipped normal."""
    mean, var = clipped_normal_moments(m.mean, m.std ** 2, lo, hi)
    return Moments(mean.double(), var.double().clamp(min=0).sqrt(), m.dim)


def prelu_moments(m: Moments, slope) -> Moments:
    """Moments of PReLU(X) = max(X, 0) + a min(X, 0) = X+ - a X- (X- = max(-X, 0); X+ X- = 0) for X per
    channel N(mean, std^2): E = E[X+] - a E[X-], E[Y^2] = E[X+^2] + a^2 E[X-^2]. ``slope`` a: one per channel
    or a number."""
    a = torch.as_tensor(slope).detach().double().flatten()
    var = m.std ** 2
    mp, vp = (t.double() for t in clipped_normal_moments(m.mean, var, 0.0, None))
    mn, vn = (t.double() for t in clipped_normal_moments(-m.mean, var, 0.0, None))
    mean = mp - a * mn
    second = vp + mp ** 2 + a ** 2 * (vn + mn ** 2)
    return Moments(mean, (second - mean ** 2).clamp(min=0).sqrt(), m.dim)


def sum_moments(a: Moments, b: Moments, sign: float = 1.0) -> Optional[Moments]:
    """Moments of a + sign * b for per-channel moments along the same axis (independent: variances add)."""
    if a.dim != b.dim or a.mean.numel() != b.mean.numel():
        return None
    return Moments(a.mean + sign * b.mean, (a.std ** 2 + b.std ** 2).sqrt(), a.dim)
