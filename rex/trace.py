"""Data-free activation ranges (method.md §4): rules run over the recorded op graph (``rex.graph``).

Per-tensor intervals are propagated op by op from BatchNorm statistics, ``beta_c +- n |gamma_c|``, through
ReLU/ReLU6/adds/concats/pooling (``RANGE_RULES``: one small function per op). ``trace`` also returns what the
engine needs from the same recording: the execution order of the weight layers (first/last-layer policy),
their shapes, and which Conv2d output feeds only a BatchNorm (BN folding, ``Graph.conv_bn_pairs``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .graph import Graph, is_weight_layer, record  # noqa: F401  (is_weight_layer: re-exported)
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
    # the 1-d / 3-d pooling of Conv1d / Conv3d nets (a max or mean of the input stays within its range)
    "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d",
    "adaptive_max_pool3d",
}
_UNIT = {"sigmoid", "hardsigmoid", "softmax", "sigmoid_"}


def bn_interval(mean: torch.Tensor, std: torch.Tensor, sigma: float) -> tuple[float, float]:
    """Per-tensor range of a BN output: [min_c(beta_c - n|gamma_c|), max_c(beta_c + n|gamma_c|)]."""
    std = std.abs()
    return float((mean - sigma * std).min()), float((mean + sigma * std).max())


def _first(ivs) -> Interval:
    return ivs[0] if ivs else None


def _batch_norm(n, ivs, value, sigma) -> Interval:
    args, kwargs = n.args, n.kwargs
    w = args[3] if len(args) > 3 else kwargs.get("weight")
    b = args[4] if len(args) > 4 else kwargs.get("bias")
    c = args[0].shape[1]
    w = torch.ones(c) if w is None else w.detach()
    b = torch.zeros(c) if b is None else b.detach()
    return bn_interval(b, w, sigma)


def _relu(n, ivs, value, sigma) -> Interval:
    first = _first(ivs)
    return None if first is None else (max(first[0], 0.0), max(first[1], 0.0))


def _clip(n, ivs, value, sigma) -> Interval:
    name, args, kwargs, first = n.op, n.args, n.kwargs, _first(ivs)
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", kwargs.get("min", -1.0 if name == "hardtanh" else None))
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", kwargs.get("max", 1.0 if name == "hardtanh" else None))
    if name == "relu6":
        lo, hi = 0.0, 6.0
    if any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in (lo, hi)):
        return None  # element-wise bounds: no per-tensor interval from them
    if first is None:
        return (lo, hi) if lo is not None and hi is not None else None
    return (max(first[0], lo) if lo is not None else first[0], min(first[1], hi) if hi is not None else first[1])


def _prelu(n, ivs, value, sigma) -> Interval:
    first = _first(ivs)
    if first is None:
        return None
    a = n.args[1].detach()
    lo_cands = [first[0] * float(a.max()), first[0] * float(a.min()),
                min(first[0], 0.0) if first[0] >= 0 else first[0] * float(a.max())]
    return (min(min(lo_cands), 0.0) if first[0] < 0 else first[0], max(first[1], 0.0))


def _leaky_relu(n, ivs, value, sigma) -> Interval:
    first = _first(ivs)
    slope = n.args[1] if len(n.args) > 1 else n.kwargs.get("negative_slope", 0.01)
    return None if first is None else (min(first[0] * slope, 0.0), max(first[1], 0.0))


def _swish(n, ivs, value, sigma) -> Interval:
    first = _first(ivs)
    return None if first is None else (-0.375, max(first[1], 0.0))


def _operands(n, value) -> Optional[tuple[tuple[float, float], tuple[float, float]]]:
    """The intervals of a binary op's two operands (tensors or numbers), or None when one is unknown."""
    if len(n.args) < 2:
        return None
    a, b = value(n.args[0]), value(n.args[1])
    return None if a is None or b is None else (a, b)


def _arith(n, ivs, value, sigma) -> Interval:
    name, ops = n.op, _operands(n, value)
    if ops is None:
        return None
    a, b = ops
    if "sub" in name:
        if name == "__rsub__":
            a, b = b, a
        return (a[0] - b[1], a[1] - b[0])
    return (a[0] + b[0], a[1] + b[1])


def _mul(n, ivs, value, sigma) -> Interval:
    name, ops = n.op, _operands(n, value)
    if ops is None:
        return None
    a, b = ops
    if "div" in name:
        if b[0] <= 0 <= b[1]:
            return None
        b = (1.0 / b[1], 1.0 / b[0])
    c = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return (min(c), max(c))


def _hull(n, ivs, value, sigma) -> Interval:
    known = [v for v in ivs if v is not None]
    if not n.ins or len(known) != len([x for x in n.ins if x.is_floating_point()]) or not known:
        return None
    return (min(v[0] for v in known), max(v[1] for v in known))


def _const(lo, hi):
    return lambda n, ivs, value, sigma: (lo, hi)


# op name -> rule(node, ranges of its tensor arguments, value of an argument, sigma) -> Interval. An op not
# listed has no range rule: its output has no range (recorded in ``TraceResult.unknown``).
RANGE_RULES: dict[str, Callable] = {
    "batch_norm": _batch_norm,
    "relu": _relu,
    **{k: _clip for k in ("hardtanh", "relu6", "clamp", "clip")},
    **{k: _const(0.0, 1.0) for k in _UNIT},
    "tanh": _const(-1.0, 1.0),
    "prelu": _prelu,
    "leaky_relu": _leaky_relu,
    **{k: _swish for k in ("hardswish", "silu")},
    # transformer ranges (rex.ranges): a LayerNorm's affine parameters as a BatchNorm's; GELU's exact image
    "layer_norm": lambda n, ivs, value, sigma: layer_norm_rule(n.args, n.kwargs, sigma),
    "gelu": lambda n, ivs, value, sigma: gelu_interval(_first(ivs)),
    **{k: _arith for k in ("add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__")},
    **{k: _mul for k in ("mul", "__mul__", "__rmul__", "__imul__", "div", "__truediv__")},
    **{k: _hull for k in _PASSTHROUGH},
    # a weight layer's output has no range of its own: only BN statistics (folded or following) give one
    **{k: (lambda n, ivs, value, sigma: None) for k in ("conv1d", "conv2d", "conv3d", "linear", "conv_transpose2d")},
}


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
    unknown: dict[int, str] = field(default_factory=dict)  # graph node -> op without a range rule

    def unknown_note(self) -> Optional[str]:
        """'no range: softplus (2), erf (1)': the ops without a range rule (their outputs have no range)."""
        if not self.unknown:
            return None
        counts: dict = {}
        for op in self.unknown.values():
            counts[op] = counts.get(op, 0) + 1
        return "no range: " + ", ".join(f"{op} ({k})" for op, k in counts.items())


def trace(
    model: nn.Module,
    example_input,
    sigma: float = 6.0,
    input_range: Interval = None,
    output_stats: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
    layer_filter: Callable[[str, nn.Module], bool] = lambda n, m: is_weight_layer(m),
) -> TraceResult:
    """Record ``model(example_input)`` once (``rex.graph.record``) and run the range rules over it."""
    return ranges(record(model, example_input, layer_filter), sigma, input_range, output_stats)


def ranges(graph: Graph, sigma: float = 6.0, input_range: Interval = None,
           output_stats: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None) -> TraceResult:
    """Order, shapes, conv->BN pairs and data-free ranges of a recorded graph: the network inputs get
    ``input_range``, every call the interval its rule (``RANGE_RULES``) derives from its arguments' ranges.

    ``output_stats[name] = (mean, std)`` declares the per-channel distribution of a layer's output (a conv
    whose BN was folded into it), which becomes the range of that output."""
    res = TraceResult()
    output_stats = output_stats or {}
    iv: dict[int, Interval] = {}  # id(tensor) -> its range (an in-place op's result replaces the old one)

    def value(a) -> Interval:  # the range of an argument: a tensor's, or a constant's
        if isinstance(a, torch.Tensor):
            if a.numel() == 1 and id(a) not in iv:
                v = float(a)
                return (v, v)
            return iv.get(id(a))
        if isinstance(a, (int, float)):
            return (float(a), float(a))
        return None

    for n in graph.nodes:
        if n.kind == "input":
            iv[id(n.out)] = input_range
        elif n.kind == "call":
            if n.meta or not n.outputs:
                continue
            rule = RANGE_RULES.get(n.op)
            r = None
            if rule is None:
                res.unknown[n.idx] = n.op  # recorded, shown as "no range: <op>" (rex_info.notes)
            else:  # a rule that raises is a bug in the rule: it is not swallowed
                r = rule(n, [iv.get(id(x)) for x in n.ins], value, sigma)
            for t in n.outputs:
                iv[id(t)] = r
        elif n.kind == "layer_in":
            name, x = n.op, n.arg0
            if name not in res.input_range:
                res.order.append(name)
                res.input_range[name] = iv.get(id(x)) if isinstance(x, torch.Tensor) else None
                res.input_shape[name] = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
            res.calls[name] = res.calls.get(name, 0) + 1
        elif n.kind == "layer_out" and n.out is not None:
            name, out = n.op, n.out
            res.output_shape.setdefault(name, tuple(out.shape))
            if name in output_stats:
                mean, std = output_stats[name]
                iv[id(out)] = bn_interval(mean, std, sigma)
            res.output_range.setdefault(name, iv.get(id(out)))
        elif n.kind == "bn_out":
            res.bn_output_range.setdefault(n.op, iv.get(id(n.out)) if n.out is not None else None)
    res.conv_bn = graph.conv_bn_pairs()
    return res
