"""Eager op-level tracing (no FX): one forward pass under a ``TorchFunctionMode`` plus module hooks.

Used for three things that need the data flow of a model that FX cannot trace (mmdet/mmseg models):
- which Conv2d output feeds only a BatchNorm (BN folding, ``conv_bn_pairs``);
- the execution order of the weight layers (first/last-layer policy);
- data-free activation ranges (method.md §4): per-tensor intervals propagated op by op from BatchNorm
  statistics, ``beta_c +- n |gamma_c|``, through ReLU/ReLU6/adds/concats/pooling.

Tensors are identified by ``id()``; every tensor seen is kept alive until the trace ends so ids are not
reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .cost import _call
from .ranges import gelu_interval, layer_norm_rule

Interval = Optional[tuple[float, float]]

# functions whose output range is the hull of their tensor inputs' ranges
_PASSTHROUGH = {
    "max_pool2d", "max_pool1d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool1d",
    "flatten", "reshape", "view", "permute", "transpose", "contiguous", "dropout", "interpolate",
    "upsample", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle", "pixel_unshuffle",
    "chunk", "split", "narrow", "__getitem__", "squeeze", "unsqueeze", "clone", "mean", "cat", "concat",
    "stack", "pad", "max", "amax", "to", "float", "detach", "channel_shuffle", "repeat", "expand",
    "roll", "flip", "t", "unbind", "select", "index_select", "identity", "type_as", "__iter__",
}
_UNIT = {"sigmoid", "hardsigmoid", "softmax", "sigmoid_"}


def _name(func) -> str:
    n = getattr(func, "__name__", None) or str(func)
    return n.rstrip("_") if n.endswith("_") and not n.startswith("__") else n


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def bn_interval(mean: torch.Tensor, std: torch.Tensor, sigma: float) -> tuple[float, float]:
    """Per-tensor range of a BN output: [min_c(beta_c - n|gamma_c|), max_c(beta_c + n|gamma_c|)]."""
    std = std.abs()
    return float((mean - sigma * std).min()), float((mean + sigma * std).max())


class _Tracer(TorchFunctionMode):
    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma
        self.iv: dict[int, Interval] = {}
        self.keep: list[torch.Tensor] = []
        self.uses: dict[int, int] = {}

    def set(self, t, iv: Interval):
        for x in _tensors(t):
            self.keep.append(x)
            self.iv[id(x)] = iv

    def get(self, t) -> Interval:
        return self.iv.get(id(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name in ("size", "dim", "numel", "__get__", "__len__", "__format__", "__bool__", "item", "tolist", "__hash__", "__eq__", "__ne__"):
            return out
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        for x in ins:
            self.uses[id(x)] = self.uses.get(id(x), 0) + 1
            self.keep.append(x)
        if any(isinstance(o, torch.Tensor) for o in _tensors(out)):
            try:
                iv = self.rule(name, func, args, kwargs, ins)
            except Exception:  # a range rule must never break a forward pass
                iv = None
            # in-place ops return their input: the rule's result replaces the old range
            self.set(out, iv)
        return out

    # -- interval rules --------------------------------------------------------------------------
    def rule(self, name, func, args, kwargs, ins) -> Interval:
        ivs = [self.get(x) for x in ins]
        first = ivs[0] if ivs else None
        if name == "batch_norm":
            w = args[3] if len(args) > 3 else kwargs.get("weight")
            b = args[4] if len(args) > 4 else kwargs.get("bias")
            c = args[0].shape[1]
            w = torch.ones(c) if w is None else w.detach()
            b = torch.zeros(c) if b is None else b.detach()
            return bn_interval(b, w, self.sigma)
        if name in ("relu", "relu_"):
            return None if first is None else (max(first[0], 0.0), max(first[1], 0.0))
        if name in ("hardtanh", "relu6", "clamp", "clip", "hardtanh_"):
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", kwargs.get("min", -1.0 if name == "hardtanh" else None))
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", kwargs.get("max", 1.0 if name == "hardtanh" else None))
            if name == "relu6":
                lo, hi = 0.0, 6.0
            if first is None:
                return (lo, hi) if lo is not None and hi is not None else None
            return (max(first[0], lo) if lo is not None else first[0], min(first[1], hi) if hi is not None else first[1])
        if name in _UNIT:
            return (0.0, 1.0)
        if name == "tanh":
            return (-1.0, 1.0)
        if name == "prelu":
            if first is None:
                return None
            a = args[1].detach()
            lo_cands = [first[0] * float(a.max()), first[0] * float(a.min()), min(first[0], 0.0) if first[0] >= 0 else first[0] * float(a.max())]
            return (min(min(lo_cands), 0.0) if first[0] < 0 else first[0], max(first[1], 0.0))
        if name in ("leaky_relu",):
            slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
            return None if first is None else (min(first[0] * slope, 0.0), max(first[1], 0.0))
        if name == "layer_norm":  # transformer ranges (rex.ranges): a LayerNorm as a BatchNorm's interval
            return layer_norm_rule(args, kwargs, self.sigma)
        if name == "gelu":
            return gelu_interval(first)
        if name in ("hardswish", "silu", "gelu"):
            return None if first is None else (-0.375, max(first[1], 0.0))
        if name in ("add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__"):
            return self._arith(name, args, ivs)
        if name in ("mul", "__mul__", "__rmul__", "__imul__", "div", "__truediv__"):
            return self._mul(name, args)
        if name in _PASSTHROUGH:
            known = [v for v in ivs if v is not None]
            if not ins or len(known) != len([x for x in ins if x.is_floating_point()]) or not known:
                return None
            return (min(v[0] for v in known), max(v[1] for v in known))
        return None

    def _value(self, a) -> Interval:
        if isinstance(a, torch.Tensor):
            if a.numel() == 1 and id(a) not in self.iv:
                v = float(a)
                return (v, v)
            return self.get(a)
        if isinstance(a, (int, float)):
            return (float(a), float(a))
        return None

    def _arith(self, name, args, ivs) -> Interval:
        if len(args) < 2:
            return None
        a, b = self._value(args[0]), self._value(args[1])
        if a is None or b is None:
            return None
        if "sub" in name:
            if name == "__rsub__":
                a, b = b, a
            return (a[0] - b[1], a[1] - b[0])
        return (a[0] + b[0], a[1] + b[1])

    def _mul(self, name, args) -> Interval:
        if len(args) < 2:
            return None
        a, b = self._value(args[0]), self._value(args[1])
        if a is None or b is None:
            return None
        if "div" in name:
            if b[0] <= 0 <= b[1]:
                return None
            b = (1.0 / b[1], 1.0 / b[0])
        c = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
        return (min(c), max(c))


@dataclass
class TraceResult:
    order: list[str] = field(default_factory=list)  # weight layers in execution order (first call)
    input_range: dict[str, Interval] = field(default_factory=dict)  # per weight layer, range of its input
    input_shape: dict[str, tuple] = field(default_factory=dict)
    output_shape: dict[str, tuple] = field(default_factory=dict)
    output_range: dict[str, Interval] = field(default_factory=dict)  # per weight layer, range of its output
    conv_bn: list[tuple[str, str]] = field(default_factory=list)  # (conv, bn) foldable pairs
    bn_output_range: dict[str, Interval] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


def is_weight_layer(m: nn.Module) -> bool:
    """The layers REx quantizes: Conv2d (any groups), ConvTranspose2d (groups = 1), Linear."""
    return isinstance(m, (nn.Conv2d, nn.Linear)) or (isinstance(m, nn.ConvTranspose2d) and m.groups == 1)


def trace(
    model: nn.Module,
    example_input,
    sigma: float = 6.0,
    input_range: Interval = None,
    output_stats: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
    layer_filter: Callable[[str, nn.Module], bool] = lambda n, m: is_weight_layer(m),
) -> TraceResult:
    """Run ``model(example_input)`` once and record order, input ranges and conv->BN pairs.

    ``output_stats[name] = (mean, std)`` declares the per-channel distribution of a layer's output (a conv
    whose BN was folded into it), which becomes the range of that output."""
    res = TraceResult()
    tracer = _Tracer(sigma)
    output_stats = output_stats or {}
    handles = []
    conv_out: dict[int, str] = {}
    bn_in: list[tuple[str, int]] = []

    def pre(name):
        def fn(module, args):
            x = args[0] if args else None
            if name not in res.input_range:
                res.order.append(name)
                res.input_range[name] = tracer.get(x) if isinstance(x, torch.Tensor) else None
                res.input_shape[name] = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
            res.calls[name] = res.calls.get(name, 0) + 1
        return fn

    def post(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor):
                res.output_shape.setdefault(name, tuple(out.shape))
                conv_out[id(out)] = name
                if name in output_stats:
                    mean, std = output_stats[name]
                    tracer.set(out, bn_interval(mean, std, sigma))
                res.output_range.setdefault(name, tracer.get(out))
        return fn

    def bn_pre(name):
        def fn(module, args):
            bn_in.append((name, id(args[0])))
        return fn

    def bn_post(name):
        def fn(module, args, out):
            res.bn_output_range.setdefault(name, tracer.get(out))
        return fn

    for name, m in model.named_modules():
        if layer_filter(name, m):
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(bn_pre(name)))
            handles.append(m.register_forward_hook(bn_post(name)))

    def seed(x):
        for t in _tensors(x):
            tracer.set(t, input_range)

    try:
        with torch.no_grad():
            seed(example_input)
            with tracer:
                _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    for bn_name, tid in bn_in:
        conv = conv_out.get(tid)
        # foldable only if the conv output is read by the BN alone and the conv runs once
        if conv is not None and tracer.uses.get(tid, 0) == 1 and res.calls.get(conv, 0) == 1:
            res.conv_bn.append((conv, bn_name))
    return res
