"""Quantized layers.

``QuantLayer`` wraps the original float module (``inner``), so any Conv2d subclass with its own forward
(same-padding convs of other zoos, mmcv's wrappers) keeps its exact semantics: the layer only swaps the
weight and quantizes the input.

Two execution modes (method.md §6):
- ``fake``: the K terms are summed once into one float weight, so an expanded layer costs one float conv;
  the input is fake-quantized per tensor.
- ``int``: integer-exact. The input is mapped to integers q_x, every term is applied as an integer
  convolution q_x (*) q_k accumulated exactly (float64 holds every partial sum exactly as long as
  |acc| < 2^53; we also check the int32 bound), then rescaled per channel by s_k * s_x and summed.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..expansion import ExpansionTerm
from ..quant import qrange

MODES = ("fake", "int")


class ActQuantizer(nn.Module):
    """Per-tensor uniform activation quantizer with a data-free range: unsigned when the range is >= 0
    (after ReLU/ReLU6), signed symmetric otherwise."""

    def __init__(self, bits: int, lo: float, hi: float, source: str = "bn"):
        super().__init__()
        self.bits, self.source = bits, source
        self.signed = lo < 0
        self.qmin, self.qmax = qrange(bits, signed=self.signed)
        amax = max(abs(lo), abs(hi)) if self.signed else max(hi, 0.0)
        self.lo, self.hi = float(lo), float(hi)
        self.register_buffer("scale", torch.tensor(amax / self.qmax, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'signed' if self.signed else 'unsigned'}, range=[{self.lo:.3g}, {self.hi:.3g}], source={self.source}"

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integers (as float64 values, exact) of the quantized input."""
        s = float(self.scale)
        if s == 0:
            return torch.zeros_like(x, dtype=torch.float64)
        return torch.clamp(torch.round(x.double() / s), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        if float(s) == 0:
            return torch.zeros_like(x)
        return torch.clamp(torch.round(x / s), self.qmin, self.qmax) * s


class QuantLayer(nn.Module):
    def __init__(
        self,
        inner: nn.Module,
        terms: Sequence[ExpansionTerm],
        act: Optional[ActQuantizer],
        wbits: int,
        name: str = "",
        mode: str = "fake",
        bound: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.inner = inner
        inner._rex_wrapped = True
        self.act = act
        self.wbits = wbits
        self.layer_name = name
        self.mode = mode
        self.order = len(terms)
        self._wshape = tuple(inner.weight.shape)
        for k, t in enumerate(terms):
            self.register_buffer(f"q{k}", t.qt.q)
            self.register_buffer(f"s{k}", t.qt.channel_scale(t.qt.q.shape[0]).float())
            self.register_buffer(f"z{k}", t.qt.zero_point if t.qt.zero_point is not None else None)
            self.register_buffer(f"m{k}", t.mask)
        self.register_buffer("bound", bound)
        self.active_terms: Optional[list[int]] = None
        self._refresh_weight()

    # -- structure -------------------------------------------------------------------------------
    @property
    def abits(self) -> Optional[int]:
        return self.act.bits if self.act is not None else None

    def term(self, k: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        return getattr(self, f"q{k}"), getattr(self, f"s{k}"), getattr(self, f"z{k}"), getattr(self, f"m{k}")

    @property
    def densities(self) -> list[float]:
        return [float(self.term(k)[3].float().mean()) for k in self._terms()]

    def _terms(self) -> list[int]:
        return list(range(self.order)) if self.active_terms is None else list(self.active_terms)

    def _channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        if isinstance(self.inner, nn.Conv2d):
            return v.reshape([1, -1] + [1] * (ndim - 2))
        return v.reshape([1] * (ndim - 1) + [-1])

    def term_weight(self, k: int) -> torch.Tensor:
        q, s, z, m = self.term(k)
        qf = q.float() - (z.reshape([-1] + [1] * (q.dim() - 1)).float() if z is not None and z.dim() > 0 else (z.float() if z is not None else 0.0))
        w = qf * s.reshape([-1] + [1] * (q.dim() - 1))
        return w * m.reshape([-1] + [1] * (q.dim() - 1)).to(w.dtype)

    def dequantized_weight(self, terms: Optional[Sequence[int]] = None) -> torch.Tensor:
        ks = self._terms() if terms is None else list(terms)
        w = torch.zeros(self._wshape, device=self.q0.device)
        for k in ks:
            w = w + self.term_weight(k)
        return w

    def set_active_terms(self, terms: Optional[Sequence[int]]) -> None:
        """Restrict the layer to a subset of its terms (ensemble members); None = all."""
        self.active_terms = None if terms is None else [k for k in terms if k < self.order]
        self._refresh_weight()

    def _refresh_weight(self) -> None:
        self.inner.weight = nn.Parameter(self.dequantized_weight(), requires_grad=False)

    def size_bits(self) -> int:
        per_row = math.prod(self._wshape[1:])
        total = 0
        for k in range(self.order):
            q, s, z, m = self.term(k)
            rows = int(m.sum())
            total += rows * per_row * self.wbits + rows * 32
        return total

    # -- integer safety --------------------------------------------------------------------------
    def fan_in(self) -> int:
        return math.prod(self._wshape[1:])

    def accumulator_bound(self) -> int:
        """Largest |sum| an integer accumulator can see: fan_in * max|q_w| * max|q_x|."""
        qw = max(int(self.term(k)[0].abs().max()) if self.term(k)[0].numel() else 0 for k in range(self.order))
        qx = max(abs(self.act.qmin), abs(self.act.qmax)) if self.act is not None else None
        if qx is None:
            return -1
        return self.fan_in() * qw * qx

    def int32_safe(self) -> bool:
        b = self.accumulator_bound()
        return b < 0 or b < 2**31

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int":
            return self.forward_int(x)
        if self.act is not None:
            x = self.act(x)
        return self.inner(x)

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            qx, sx = self.act.to_int(x), float(self.act.scale)
            if self.accumulator_bound() >= 2**53:
                raise OverflowError(f"{self.layer_name}: integer accumulation exceeds 2^53, cannot be simulated exactly")
        else:  # unquantized input: weights integer, input float (first-layer policy 'fp input')
            qx, sx = x.double(), 1.0
        bias = self.inner.bias
        zero_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float64)
        out = None
        for k in self._terms():
            q, s, z, m = self.term(k)
            if not bool(m.any()):
                continue
            qw = q.double()
            if z is not None:
                qw = qw - (z.reshape([-1] + [1] * (q.dim() - 1)).double() if z.dim() > 0 else z.double())
            qw = qw * m.reshape([-1] + [1] * (q.dim() - 1)).double()
            params = {"weight": qw}
            if zero_bias is not None:
                params["bias"] = zero_bias
            acc = functional_call(self.inner, params, (qx,))  # exact integer accumulation in float64
            y = acc * self._channel_view(s.double() * sx, acc.dim())
            out = y if out is None else out + y
        if out is None:
            out = functional_call(self.inner, {"weight": torch.zeros(self._wshape, dtype=torch.float64, device=x.device), **({"bias": zero_bias} if zero_bias is not None else {})}, (qx,))
        if bias is not None:
            out = out + self._channel_view(bias.double(), out.dim())
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"name={self.layer_name}, wbits={self.wbits}, order={self.order}, densities={[round(d, 3) for d in self.densities]}, mode={self.mode}"


class QuantConv2d(QuantLayer):
    """Quantized Conv2d (any subclass, depthwise and grouped included)."""


class QuantLinear(QuantLayer):
    """Quantized Linear."""


def make_quant_layer(inner: nn.Module, *args, **kwargs) -> QuantLayer:
    cls = QuantConv2d if isinstance(inner, nn.Conv2d) else QuantLinear
    return cls(inner, *args, **kwargs)
