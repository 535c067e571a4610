"""A real int8 CPU backend: PyTorch's quantized kernels (x86/fbgemm, or qnnpack on ARM).

Each b-bit term (b <= 8) of an expanded layer runs as one int8 convolution (1-d, 2-d or 3-d) / linear: the input is
quantized to uint8 with the layer's data-free activation scale (signed grids are shifted by a zero point
of 128, which is exact for the restricted range [-127, 127]), the weights are the term's integers with
its per-channel scales, int32 accumulation happens inside the kernel, and the output is requantized to
uint8 on a grid covering the layer's data-free output range (known from the folded BN). The terms'
outputs are dequantized and summed.

This is a speed path, not a reference: the output requantization adds up to half an output step per
term, so it agrees with the integer-exact simulation to about one output step (measured by
``compare_with_simulation``). Layers it cannot serve (float input, b > 8, no known output range such as
the logits layer) keep their simulated forward; ``Int8Backend.coverage`` says how many layers run on
int8 kernels.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..nn.layers import CONVS, QuantLayer


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for e in ("x86", "fbgemm", "qnnpack"):
        if e in engines:
            return e
    raise RuntimeError(f"no quantized CPU engine available (have {engines})")


class _Int8Term(nn.Module):
    def __init__(self, layer: QuantLayer, k: int, out_lo: float, out_hi: float, with_bias: bool):
        super().__init__()
        import torch.ao.nn.quantized as nnq

        q, s, z, m = layer.term(k)
        inner = layer.inner
        scale = torch.where(s > 0, s, torch.ones_like(s)).double()
        qw = (q.to(torch.int32) * m.view([-1] + [1] * (q.dim() - 1)).to(torch.int32)).to(torch.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wq = torch._make_per_channel_quantized_tensor(qw, scale, torch.zeros_like(scale, dtype=torch.long), 0)
        bias = inner.bias.detach().float() if (with_bias and inner.bias is not None) else None
        if isinstance(inner, CONVS):
            qconv = {1: nnq.Conv1d, 2: nnq.Conv2d, 3: nnq.Conv3d}[len(inner.kernel_size)]
            mod = qconv(inner.in_channels, inner.out_channels, inner.kernel_size, inner.stride,
                             inner.padding if isinstance(inner.padding, (tuple, int)) else 0, inner.dilation,
                             inner.groups, bias is not None)
        else:
            mod = nnq.Linear(inner.in_features, inner.out_features, bias_=bias is not None)
        mod.set_weight_bias(wq, bias)
        lo, hi = min(out_lo, 0.0), max(out_hi, 0.0)
        mod.scale = max((hi - lo) / 255.0, 1e-12)
        mod.zero_point = int(round(-lo / mod.scale))
        self.mod = mod

    def forward(self, xq):
        return self.mod(xq).dequantize()


class Int8Backend(nn.Module):
    """Replaces a QuantLayer's forward with int8 kernels (one per active term)."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        act = layer.act
        lo, hi = layer.out_range
        width = hi - lo
        s1 = float(layer.term(0)[1].abs().max()) or 1.0
        terms = []
        for k in layer._terms():
            if not bool(layer.term(k)[3].any()):
                continue
            if k == 0:
                terms.append(_Int8Term(layer, k, lo, hi, with_bias=True))
            else:  # a residual term's output is about s_k / s_1 of the full output; 2x headroom
                r = width * float(layer.term(k)[1].abs().max()) / s1
                terms.append(_Int8Term(layer, k, -r, r, with_bias=False))
        self.terms = nn.ModuleList(terms)
        self.in_scale = float(act.scale)
        self.in_zero = 128 if act.signed else 0
        self.in_shape_hint = None

    def forward(self, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xq = torch.quantize_per_tensor(x.contiguous(), self.in_scale, self.in_zero, torch.quint8)
        out = None
        for t in self.terms:
            y = t(xq)
            out = y if out is None else out + y
        return out


def _supported(layer: QuantLayer) -> bool:
    if layer.act is None or layer.wbits > 8 or layer.act.bits > 8 or getattr(layer, "out_range", None) is None:
        return False
    base = next((c for c in CONVS if isinstance(layer.inner, c)), None)
    if base is not None:  # Conv1d / 2d / 3d: the quantized kernels take the same arguments
        return (type(layer.inner).forward is base.forward and layer.inner.padding_mode == "zeros"
                and not isinstance(layer.inner.padding, str))
    return isinstance(layer.inner, nn.Linear) and type(layer.inner).forward is nn.Linear.forward


class _Int8Layer(nn.Module):
    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.sim = layer
        self.kernel = Int8Backend(layer)

    def forward(self, x):
        return self.kernel(x)


def to_int8_backend(qmodel: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``qmodel`` whose supported layers run on int8 kernels; returns (model, coverage)."""
    import copy

    from ..transforms import set_module

    torch.backends.quantized.engine = _engine()
    m = copy.deepcopy(qmodel)
    names = [(n, l) for n, l in m.named_modules() if isinstance(l, QuantLayer)]
    done = 0
    for n, l in names:
        if _supported(l):
            set_module(m, n, _Int8Layer(l))
            done += 1
    return m, dict(engine=torch.backends.quantized.engine, int8_layers=done, simulated_layers=len(names) - done)


@torch.no_grad()
def compare_with_simulation(qmodel: nn.Module, x: torch.Tensor) -> dict:
    """Int8 kernels vs integer-exact simulation on the same inputs."""
    int8, cov = to_int8_backend(qmodel)
    sim = copy_with_mode(qmodel, "int")
    a, b = int8(x), sim(x)
    d = (a - b).abs()
    out = dict(cov, max_abs=float(d.max()), mean_abs=float(d.mean()), rel_max=float(d.max() / b.abs().max().clamp(min=1e-12)))
    if b.dim() == 2:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).float().mean() * 100)
    return out


def copy_with_mode(qmodel: nn.Module, mode: str) -> nn.Module:
    import copy

    m = copy.deepcopy(qmodel)
    for l in m.modules():
        if isinstance(l, QuantLayer):
            l.mode = mode
    return m
