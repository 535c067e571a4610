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
import sys
import threading
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..expansion import ExpansionTerm
from ..quant import expand_groups, qrange

MODES = ("fake", "int")


# The plain convolutions the engine quantizes, of any spatial rank: one code path for all three (the weight is
# [C_out, C_in / groups, *kernel], the output [N, C_out, *spatial]; nothing below depends on the rank).
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(m: nn.Module) -> bool:
    """Convolutions whose output channels are dim 1 of their output (Conv1d/2d/3d and ConvTranspose2d)."""
    return isinstance(m, (*CONVS, nn.ConvTranspose2d))


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and relatives): a linear layer whose weight is stored transposed,
    (in_features x out_features), computing ``x @ W + b``. Detected without importing transformers: if a
    model holds one, transformers is already imported."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls is not None and isinstance(m, cls)


def is_embedding(m: nn.Module) -> bool:
    """A lookup table (token / position embeddings): quantized per row (one scale per embedding vector, the
    row an input id selects), never an activation quantizer (its input is integer ids), zero MACs."""
    return isinstance(m, nn.Embedding)


def is_quantizable(m: nn.Module) -> bool:
    """The layers the engine quantizes: Conv1d / Conv2d / Conv3d (any groups), ConvTranspose2d (groups = 1),
    Linear, Hugging Face Conv1D, Embedding."""
    return (isinstance(m, (*CONVS, nn.Linear)) or (isinstance(m, nn.ConvTranspose2d) and m.groups == 1)
            or is_hf_conv1d(m) or is_embedding(m))


def weight_transposed(m: nn.Module) -> bool:
    """True when the module stores its weight input-first (ConvTranspose2d, HF Conv1D)."""
    return isinstance(m, nn.ConvTranspose2d) or is_hf_conv1d(m)


def canonical_weight(m: nn.Module) -> torch.Tensor:
    """The weight with output channels first, the layout every quantizer here works in. ConvTranspose2d
    stores (C_in, C_out, kh, kw) and HF Conv1D (in, out): their canonical form is the transpose
    (ConvTranspose2d: groups = 1 only). An Embedding's rows (one per id) are its output channels."""
    w = m.weight.detach()
    if isinstance(m, nn.ConvTranspose2d):
        if m.groups != 1:
            raise ValueError("grouped ConvTranspose2d is not supported")
        return w.transpose(0, 1)
    if is_hf_conv1d(m):
        return w.t()
    return w


# Inference on CPU: inside a QuantLayer the quantized activation only lives until the wrapped conv/linear
# has read it, so one scratch buffer per thread serves every layer. A fresh tensor per layer costs page faults that made
# fake-quant MobileNetV2 ~20% slower than float (glibc hands large blocks back to the OS); the scratch
# removes them. Not used under autograd or on GPUs (their caching allocator has no such cost).
# Set SCRATCH = False if forward hooks on the wrapped modules keep their inputs.
SCRATCH = True
_scratch = threading.local()


def _use_scratch(x: torch.Tensor) -> bool:
    return SCRATCH and x.device.type == "cpu" and not torch.is_grad_enabled() and x.is_contiguous()


def _scratch_like(x: torch.Tensor) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    n = x.numel()
    if buf is None or buf.numel() < n or buf.dtype != x.dtype:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(n, dtype=x.dtype)
        _scratch.buf = buf
    return buf[:n].view(x.shape)


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

    def _scales(self) -> tuple[float, float]:
        """(s, float32(1/s)) as Python floats, cached until the scale buffer changes (load_state_dict, .to):
        reading a tensor per call costs more than the arithmetic on the small inputs of 28x28 nets."""
        key = (self.scale.data_ptr(), self.scale._version)
        cached = self.__dict__.get("_scale_cache")
        if cached is None or cached[0] != key:
            s = float(self.scale)
            inv = float(torch.tensor(1.0 / s, dtype=torch.float32)) if s != 0 else 0.0
            cached = (key, s, inv)
            self.__dict__["_scale_cache"] = cached
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'signed' if self.signed else 'unsigned'}, range=[{self.lo:.3g}, {self.hi:.3g}], source={self.source}"

    def to_int(self, x: torch.Tensor, dtype: torch.dtype = torch.float64, scratch: bool = False) -> torch.Tensor:
        """Integers (exact, as float values of ``dtype``: |q| <= 2^15 fits float32 and float64) of the quantized
        input; same arithmetic as ``forward`` (multiply by the float32 inverse scale, round half to even, clamp)."""
        s, inv = self._scales()
        if s == 0:
            return torch.zeros_like(x, dtype=dtype)
        q = self._rounded(x.float(), inv, scratch)
        return q if dtype == torch.float32 else q.to(dtype)

    def _rounded(self, x: torch.Tensor, inv: float, scratch: bool) -> torch.Tensor:
        """clamp(round(x * inv)): the arithmetic of torch.fake_quantize_per_tensor_affine (float32 inverse
        scale, ties to even) on ONE new tensor -- or the thread's scratch buffer -- updated in place."""
        y = torch.mul(x, inv, out=_scratch_like(x)) if scratch and _use_scratch(x) else torch.mul(x, inv)
        return y.round_().clamp_(self.qmin, self.qmax)

    def forward(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Fake-quantized ``x``. ``scratch=True`` (only for a caller that consumes the result before the next
        quantizer runs, as ``QuantLayer`` does) writes it into the thread's scratch buffer."""
        s, inv = self._scales()
        if s == 0:
            return torch.zeros_like(x)
        # not the fused torch op: it also writes a gradient mask and measured 2-6x slower on the large
        # activations of MobileNetV2; same integers as ``to_int``
        return self._rounded(x, inv, scratch).mul_(s)


F32_EXACT = 2**24  # every integer of magnitude <= 2^24 is a float32; below it a float32 sum of integers is exact
F64_EXACT = 2**53


def split_base16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights as two base-16 digits, w = 16 h + l with l in [0, 15] and h = floor(w / 16)."""
    h = torch.floor(w / 16)
    return h, w - 16 * h


def int_path(fan_in: int, qw_max: int, qx_max: Optional[int]) -> str:
    """The exact path of the integer simulation for a layer whose accumulators sum ``fan_in`` products of
    |q_w| <= qw_max and |q_x| <= qx_max. Every partial sum of an accumulation is bounded by
    fan_in * max|digit| * qx_max, and a float32 sum of integers is exact while every partial sum stays
    below 2^24 (whatever the summation order of the kernel):

    - ``f32``: fan_in * qw_max * qx_max < 2^24, the weights' integers directly;
    - ``f32-digits``: the weights split into base-16 digits (``split_base16``); BOTH digits must pass the
      bound: the low digit is at most 15, the high one at most ceil(qw_max / 16) (at W12 that is 128, so
      the split alone does not make W10+ exact: those fall through to float64);
    - ``f64``: float64 sums are exact within 2^53 (checked by the caller);
    - ``float-input``: the input is not quantized, there is no integer accumulator (float64 arithmetic)."""
    if qx_max is None:
        return "float-input"
    if fan_in * qw_max * qx_max < F32_EXACT:
        return "f32"
    high = -(-qw_max // 16)  # |floor(w / 16)| <= ceil(|w| / 16)
    if fan_in * max(15, high) * qx_max < F32_EXACT:
        return "f32-digits"
    return "f64"


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
        dequantized: Optional[torch.Tensor] = None,
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
        self.transposed = weight_transposed(inner)
        self.embedding = is_embedding(inner)
        if self.embedding and act is not None:
            raise ValueError(f"layer {name}: an Embedding reads integer ids, its input cannot be quantized")
        self._wshape = tuple(canonical_weight(inner).shape)  # output channels first
        self.group_size = terms[0].qt.group_size if terms else None  # None: one scale per output channel
        self.zero_bits = terms[0].qt.zero_bits if terms else None  # None: zero points on the b-bit grid
        for k, t in enumerate(terms):
            self.register_buffer(f"q{k}", t.qt.q)
            self.register_buffer(f"s{k}", t.qt.channel_scale(t.qt.q.shape[0]).float())
            self.register_buffer(f"z{k}", t.qt.zero_point if t.qt.zero_point is not None else None)
            self.register_buffer(f"m{k}", t.mask)
        self.register_buffer("bound", bound)
        self.active_terms: Optional[list[int]] = None
        if dequantized is not None:  # the caller's sum of the terms (rex.expansion.reconstruct): not recomputed
            if tuple(dequantized.shape) != self._wshape:
                raise ValueError(f"dequantized weight of shape {tuple(dequantized.shape)} does not match {self._wshape}")
            self.inner.weight = nn.Parameter(self.inner_layout(dequantized.float()), requires_grad=False)
        else:
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

    def inner_layout(self, w: torch.Tensor) -> torch.Tensor:
        """A weight in the canonical layout (output channels first) -> the wrapped module's own layout."""
        return w.transpose(0, 1) if self.transposed else w

    def _channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        if is_conv(self.inner):
            return v.reshape([1, -1] + [1] * (ndim - 2))
        return v.reshape([1] * (ndim - 1) + [-1])

    def _per_weight(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """A per-channel ([C]) or per-group ([C, G]) scale / zero point, broadcastable against q."""
        if self.group_size:
            return expand_groups(v, tuple(q.shape), self.group_size)
        return v.reshape([-1] + [1] * (q.dim() - 1)) if v.dim() > 0 else v

    def term_weight(self, k: int) -> torch.Tensor:
        q, s, z, m = self.term(k)
        qf = q.float() - (self._per_weight(z, q).float() if z is not None else 0.0)
        w = qf * self._per_weight(s, q)
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
        self._int_cache = None
        self._refresh_weight()

    def _refresh_weight(self) -> None:
        self.inner.weight = nn.Parameter(self.inner_layout(self.dequantized_weight()), requires_grad=False)

    def size_bits(self) -> int:
        per_row = math.prod(self._wshape[1:])
        total = 0
        for k in range(self.order):
            q, s, z, m = self.term(k)
            rows = int(m.sum())
            scales = s.shape[1] if self.group_size else 1  # per row
            total += rows * per_row * self.wbits + rows * scales * 32
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
        """True when no int32 accumulator of this layer can overflow (|sum| <= 2^31 - 1) for any input; a
        layer whose input stays float has no integer accumulator and is safe."""
        b = self.accumulator_bound()
        return b < 0 or b < 2**31

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:  # a lookup of s_row * q_row: the same float in both modes
            return self.inner(x)
        if self.mode == "int":
            return self.forward_int(x)
        if self.act is not None:
            x = self.act(x, scratch=True)  # read once, by inner, right below
        return self.inner(x)

    def _int_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Integer weights (zero point removed, mask applied) of the active terms, as float64 values, with
        their per-channel scales. Per group, every (term, group) is its own integer weight (the term's
        integers on that group's inputs, zero elsewhere) with the group's scale per channel: one integer
        accumulator per group, rescaled and summed in float, as a group-wise int kernel does."""
        ws = []
        for k in self._terms():
            q, s, z, m = self.term(k)
            if not bool(m.any()):
                continue
            qw = q.double()
            if z is not None:
                qw = qw - self._per_weight(z, q).double()
            qw = qw * m.reshape([-1] + [1] * (q.dim() - 1)).double()
            if not self.group_size:
                ws.append((qw, s.double()))
                continue
            flat = qw.reshape(qw.shape[0], -1)
            for g in range(s.shape[1]):
                part = torch.zeros_like(flat)
                cols = slice(g * self.group_size, (g + 1) * self.group_size)
                part[:, cols] = flat[:, cols]
                ws.append((part.reshape(qw.shape), s[:, g].double()))
        return ws

    def _stack(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Several weight tensors as ONE conv/linear weight: outputs stacked along channels, interleaved per
        group so that grouped and depthwise convs stay correct. Output channel order: [group, tensor, c]."""
        if len(weights) == 1:
            return weights[0]
        if is_conv(self.inner):
            g, c_out = self.inner.groups, weights[0].shape[0]
            w = torch.stack([wk.reshape(g, c_out // g, *wk.shape[1:]) for wk in weights], 1)
            return w.reshape(len(weights) * c_out, *weights[0].shape[1:])
        return torch.cat(weights, 0)

    def _combine(self, y: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """sum_j scales[j, c] * y_j[..., c, ...] for the stacked output y of ``_stack`` (n = scales.shape[0])."""
        n, c_out = scales.shape
        if n == 1:
            return y * self._channel_view(scales[0], y.dim())
        if is_conv(self.inner):
            g = self.inner.groups
            b, hw = y.shape[0], y.shape[2:]
            y = y.reshape(b, g, n, c_out // g, -1)
            sv = scales.reshape(n, g, c_out // g).transpose(0, 1).reshape(1, g, n, c_out // g, 1)
            return (y * sv).sum(2).reshape(b, c_out, *hw)
        y = y.reshape(*y.shape[:-1], n, c_out)
        return (y * scales).sum(-2)

    def _int_plan(self, qx_max: Optional[int]) -> dict:
        """What ``forward_int`` runs, built once per (active terms, input bits, device) and cached: the stacked
        integer weight of all terms (or of their base-16 digits) and the scales that recombine the outputs."""
        key = (tuple(self._terms()), qx_max, self.q0.device)
        cache = getattr(self, "_int_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        terms = self._int_weights()
        plan: dict = {"path": "none"}
        if terms:
            fan = self.fan_in()
            qw_max = max(int(w.abs().max()) for w, _ in terms)
            if qx_max is not None and fan * qw_max * qx_max >= 2**53:
                from ..errors import AccumulatorOverflowError

                raise AccumulatorOverflowError(
                    f"layer {self.layer_name}: the integer accumulation can reach fan_in {fan} x |q_w| {qw_max} x "
                    f"|q_x| {qx_max} >= 2^53 and cannot be simulated exactly; use fewer weight / activation bits for "
                    "this layer or mode='fake'")
            path = int_path(fan, qw_max, qx_max)
            if path == "f32-digits":
                ws, sc, digits = [], [], 2
                for w, s in terms:
                    h, lo = split_base16(w)
                    ws += [h, lo]
                    sc += [16 * s, s]
            else:
                ws, sc, digits = [w for w, _ in terms], [s for _, s in terms], 1
            dt = torch.float32 if path in ("f32", "f32-digits") else torch.float64
            plan = {"path": path, "weight": self._stack(ws).to(dt), "scales": torch.stack(sc).to(dt),
                    "digits": digits, "n_terms": len(terms)}
        self._int_cache = (key, plan)
        return plan

    def _call_inner(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if is_hf_conv1d(self.inner):  # its forward views the output as (..., nf): stacked terms need F.linear
            return F.linear(x, w.to(x.dtype))
        params = {"weight": self.inner_layout(w).to(x.dtype)}
        if self.inner.bias is not None:
            params["bias"] = torch.zeros(w.shape[0], dtype=x.dtype, device=x.device)
        return functional_call(self.inner, params, (x,))

    def int_accumulators(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The integer accumulators q_x (*) q_k of every active term (int64, zero-bias, before any rescale), as
        the integer-exact path computes them (digits recombined in int64): what an int32 kernel would hold.
        For tests and for checking a kernel against the simulation."""
        if self.act is None:
            raise ValueError(f"layer {self.layer_name}: its input is not quantized, there is no integer accumulator")
        if self._unbatched(x):
            return [a.squeeze(0) for a in self.int_accumulators(x.unsqueeze(0))]
        plan = self._int_plan(max(abs(self.act.qmin), abs(self.act.qmax)))
        if plan["path"] == "none":
            return []
        y = self._call_inner(self.act.to_int(x, plan["weight"].dtype), plan["weight"])
        n = plan["n_terms"] * plan["digits"]
        c_out = self._wshape[0]
        if is_conv(self.inner):  # [group, tensor, c] channel order of _stack
            g = self.inner.groups
            parts = y.reshape(y.shape[0], g, n, c_out // g, *y.shape[2:]).transpose(1, 2)
            parts = parts.reshape(y.shape[0], n, c_out, *y.shape[2:]).unbind(1)
        else:
            parts = y.reshape(*y.shape[:-1], n, c_out).unbind(-2)
        parts = [p.to(torch.int64) for p in parts]
        if plan["digits"] == 2:
            return [16 * parts[2 * k] + parts[2 * k + 1] for k in range(plan["n_terms"])]
        return parts

    def _unbatched(self, x: torch.Tensor) -> bool:
        """A convolution's unbatched input ((C, L), (C, H, W), (C, D, H, W), as torch accepts): the integer
        path's channel reshapes need the batch dimension, so it runs as a batch of one."""
        return is_conv(self.inner) and x.dim() == len(self._wshape) - 1

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer-exact: sum_k s_k * s_x * (q_x (*) q_k) + bias, every integer accumulation exact.

        Exactness without int kernels: float32 holds every integer below 2^24 exactly, so when
        fan_in * max|q_w| * max|q_x| < 2^24 the float32 conv of integer values IS the int32 result (all
        terms in one conv call, stacked along output channels). Above that, each weight is split into base-16
        digits (q = 16 h + l) when both digits' accumulations stay below 2^24 (``int_path``); float64 (exact
        below 2^53) otherwise. The exact accumulators are then rescaled per channel in float32, as an int8 kernel's
        requantization does (float64 on the float64 path)."""
        if self._unbatched(x):
            return self.forward_int(x.unsqueeze(0)).squeeze(0)
        if self.act is not None:
            qx_max = max(abs(self.act.qmin), abs(self.act.qmax))
            sx = self.act._scales()[0]
        else:  # unquantized input (no data-free range): integer weights, float input, float64 arithmetic
            qx_max, sx = None, 1.0
        plan = self._int_plan(qx_max)
        if plan["path"] == "none":
            out = self._call_inner(x, torch.zeros(self._wshape, dtype=x.dtype, device=x.device))
        else:
            dt = plan["weight"].dtype
            qx = self.act.to_int(x, dt, scratch=True) if self.act is not None else x.to(dt)  # read once, below
            y = self._call_inner(qx, plan["weight"])
            out = self._combine(y, plan["scales"] * sx)
        bias = self.inner.bias
        if bias is not None:
            out = out + self._channel_view(bias.to(out.dtype), out.dim())
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"name={self.layer_name}, wbits={self.wbits}, order={self.order}, densities={[round(d, 3) for d in self.densities]}, mode={self.mode}"


class QuantConvNd(QuantLayer):
    """Quantized Conv1d / Conv2d / Conv3d (any subclass, depthwise and grouped included): one implementation,
    the spatial rank only changes the shapes (per output channel scales, REx terms, integer-exact path)."""


class QuantConv1d(QuantConvNd):
    """Quantized Conv1d."""


class QuantConv2d(QuantConvNd):
    """Quantized Conv2d."""


class QuantConv3d(QuantConvNd):
    """Quantized Conv3d."""


class QuantConvTranspose2d(QuantLayer):
    """Quantized ConvTranspose2d (groups = 1); terms are stored output-channels-first like every other layer."""


class QuantLinear(QuantLayer):
    """Quantized Linear."""


class QuantConv1D(QuantLinear):
    """Quantized Hugging Face Conv1D (a Linear stored transposed): per output feature like nn.Linear."""


class QuantEmbedding(QuantLayer):
    """Quantized Embedding: one scale per row (embedding vector), input ids never quantized."""


_CONV_CLASSES = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}


def make_quant_layer(inner: nn.Module, *args, **kwargs) -> QuantLayer:
    conv = next((c for t, c in _CONV_CLASSES.items() if isinstance(inner, t)), None)
    cls = conv if conv is not None else QuantConvTranspose2d \
        if isinstance(inner, nn.ConvTranspose2d) else QuantEmbedding if is_embedding(inner) \
        else QuantConv1D if is_hf_conv1d(inner) else QuantLinear
    return cls(inner, *args, **kwargs)
