"""Weight quantization operators Q_b: the pluggable part of REx ("agnostic to the quantization operator").

An operator maps a float weight (C_out x ...) to a :class:`QTensor` (integers, per-channel scale, optional
zero point). Names state the contract, Brevitas style: ``SymmetricWeightQuantizer(bits=4,
granularity="per_channel")`` is Int4 symmetric per output channel with round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import ConfigError
from .primitives import (
    RoundingFn,
    asymmetric_qparams,
    check_bits,
    check_finite,
    dequantize_affine,
    int_dtype,
    qrange,
    quantize_affine,
    round_nearest,
    symmetric_scale,
)

GRANULARITIES = ("per_channel", "per_tensor")


@dataclass
class QTensor:
    """b-bit integers with a scale per output channel (a 0-d scale is per tensor) and an optional zero point."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int

    def dequantize(self) -> torch.Tensor:
        axis = 0 if self.scale.dim() > 0 else None
        return dequantize_affine(self.q, self.scale, self.zero_point, axis)

    def channel_scale(self, channels: int) -> torch.Tensor:
        """The scale as a length-C_out vector whatever the granularity."""
        return self.scale.expand(channels).clone() if self.scale.dim() == 0 else self.scale


class WeightQuantizer:
    """Uniform weight quantizer. ``rounding`` is the rounding rule (nearest by default; SQuant plugs in here)."""

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        granularity: str = "per_channel",
        rounding: RoundingFn | None = None,
        name: str | None = None,
    ):
        check_bits(bits, "weight bit-width")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.rounding = rounding or round_nearest
        self.name = name or f"Int{bits}Weight{'Sym' if symmetric else 'Asym'}{'PerChannel' if granularity == 'per_channel' else 'PerTensor'}"

    @property
    def axis(self) -> int | None:
        return 0 if self.granularity == "per_channel" else None

    def __repr__(self) -> str:
        return self.name

    def __call__(self, w: torch.Tensor, name: str = "weight", check: bool = True) -> QTensor:
        if check:
            check_finite(w, name)
        w = w.detach().to(torch.float32)
        if self.symmetric:
            qmin, qmax = qrange(self.bits, signed=True)
            scale = symmetric_scale(w, self.bits, self.axis)
            q = quantize_affine(w, scale, None, qmin, qmax, self.axis, self.rounding, int_dtype(self.bits))
            return QTensor(q, scale, None, self.bits)
        qmin, qmax = qrange(self.bits, signed=False)
        scale, zp = asymmetric_qparams(w, self.bits, self.axis)
        # unsigned grid up to 2^16-1 needs int32 storage
        q = quantize_affine(w, scale, zp, qmin, qmax, self.axis, self.rounding, torch.int32)
        return QTensor(q, scale, zp, self.bits)


def SymmetricWeightQuantizer(bits: int, granularity: str = "per_channel", rounding: RoundingFn | None = None) -> WeightQuantizer:
    return WeightQuantizer(bits, True, granularity, rounding)


def AsymmetricWeightQuantizer(bits: int, granularity: str = "per_channel", rounding: RoundingFn | None = None) -> WeightQuantizer:
    return WeightQuantizer(bits, False, granularity, rounding)


OperatorFactory = Callable[[int], WeightQuantizer]
