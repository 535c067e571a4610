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
    check_group_size,
    expand_groups,
    group_asymmetric_qparams,
    group_symmetric_scale,
    check_finite,
    dequantize_affine,
    int_dtype,
    qrange,
    quantize_affine,
    round_nearest,
    symmetric_scale,
)

GRANULARITIES = ("per_channel", "per_tensor", "per_group")


@dataclass
class QTensor:
    """b-bit integers with a scale per output channel (a 0-d scale is per tensor; a [C_out, G] scale with
    ``group_size`` set is per group of consecutive inputs of a row) and an optional zero point (same shape).
    ``zero_bits``: the storage of one zero point; None = an integer on the b-bit grid (b bits, the min/max
    grids here), else a float of that width (HQQ's solver moves its zero points off the grid: 16, fp16)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int
    group_size: Optional[int] = None
    zero_bits: Optional[int] = None

    def full_scale(self) -> torch.Tensor:
        """Per group: the scale broadcast to every weight (q's shape). Otherwise the scale itself."""
        return expand_groups(self.scale, tuple(self.q.shape), self.group_size) if self.group_size else self.scale

    def dequantize(self) -> torch.Tensor:
        if self.group_size:
            z = None if self.zero_point is None else expand_groups(self.zero_point, tuple(self.q.shape), self.group_size)
            return dequantize_affine(self.q, self.full_scale(), z, None)
        axis = 0 if self.scale.dim() > 0 else None
        return dequantize_affine(self.q, self.scale, self.zero_point, axis)

    def channel_scale(self, channels: int) -> torch.Tensor:
        """The scale as a length-C_out vector (per tensor: repeated); per group: the [C_out, G] scales."""
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
        group_size: int | None = None,
    ):
        check_bits(bits, "weight bit-width")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "per_group":
            if group_size is None:
                raise ConfigError("granularity='per_group' needs group_size (inputs per scale along a row, e.g. 128)")
            check_group_size(group_size)
        elif group_size is not None:
            raise ConfigError(f"group_size={group_size!r} is only meaningful with granularity='per_group' "
                              f"(got {granularity!r}); drop group_size or set granularity='per_group'")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.group_size = group_size
        self.rounding = rounding or round_nearest
        gran = {"per_channel": "PerChannel", "per_tensor": "PerTensor", "per_group": f"PerGroup{group_size}"}[granularity]
        self.name = name or f"Int{bits}Weight{'Sym' if symmetric else 'Asym'}{gran}"

    @property
    def axis(self) -> int | None:
        return 0 if self.granularity == "per_channel" else None

    def __repr__(self) -> str:
        return self.name

    def __call__(self, w: torch.Tensor, name: str = "weight", check: bool = True) -> QTensor:
        if check:
            check_finite(w, name)
        w = w.detach().to(torch.float32)
        if self.group_size:
            return self._per_group(w)
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


    def _per_group(self, w: torch.Tensor) -> QTensor:
        """One scale (and zero point) per group of ``group_size`` inputs of a row; the rounding rule sees the
        whole scaled weight in its own shape, as per channel."""
        gs = self.group_size
        shape = tuple(w.shape)
        if self.symmetric:
            qmin, qmax = qrange(self.bits, signed=True)
            scale = group_symmetric_scale(w, self.bits, gs)
            q = quantize_affine(w, expand_groups(scale, shape, gs), None, qmin, qmax, None, self.rounding,
                                int_dtype(self.bits))
            return QTensor(q, scale, None, self.bits, gs)
        qmin, qmax = qrange(self.bits, signed=False)
        scale, zp = group_asymmetric_qparams(w, self.bits, gs)
        q = quantize_affine(w, expand_groups(scale, shape, gs), expand_groups(zp, shape, gs), qmin, qmax, None,
                            self.rounding, torch.int32)
        return QTensor(q, scale, zp, self.bits, gs)


def SymmetricWeightQuantizer(bits: int, granularity: str = "per_channel", rounding: RoundingFn | None = None) -> WeightQuantizer:
    return WeightQuantizer(bits, True, granularity, rounding)


def AsymmetricWeightQuantizer(bits: int, granularity: str = "per_channel", rounding: RoundingFn | None = None) -> WeightQuantizer:
    return WeightQuantizer(bits, False, granularity, rounding)


OperatorFactory = Callable[[int], WeightQuantizer]
