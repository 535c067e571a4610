"""Data-free activation ranges (method.md §4): rules run over the recorded op graph (``rex.graph``).

Per-tensor intervals are propagated op by op from BatchNorm statistics, ``beta_c +- n |gamma_c|``, through
ReLU/ReLU6/adds/concats/pooling (``RANGE_RULES``: one small function per op). ``trace`` also returns what the
engine needs from the same recording: the execution order of the weight layers (first/last-layer policy),
their shapes, and which Conv2d output feeds only a BatchNorm (BN folding, ``Graph.conv_bn_pairs``).

A weight layer's output has a range only under a range propagation (``QuantSpec.range_propagation``,
``LAYER_RANGE_RULES``): ``none`` (no range: only BN/LN statistics give one), ``moments`` (the per-channel
moments of its input, propagated from the preceding BN/LN by ``RANGE_MOMENT_RULES``, carried through the layer,
then n sigma) or ``interval`` (sound interval arithmetic from its input's range and its weights). Every
range derived through a weight layer is tagged (``TraceResult.input_source``: "propagated (moments)"), so a
result row says where its ranges came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .graph import (CAST_OPS, IDENTITY_OPS, POOLS, WEIGHT_OPS, Graph, is_weight_layer,  # noqa: F401
                    record)  # is_weight_layer: re-exported
from .ranges import (Moments, bn_interval, clip_moments, gelu_interval, layer_interval, layer_moments,  # noqa: F401
                     layer_norm_rule, prelu_moments, softmax_average_interval, sum_moments)

Interval = Optional[tuple[float, float]]

# functions whose output range is the hull of their tensor inputs' ranges
_PASSTHROUGH = frozenset({
    "flatten", "reshape", "view", "permute", "transpose", "interpolate",
    "upsample", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle", "pixel_unshuffle",
    "chunk", "split", "narrow", "__getitem__", "squeeze", "unsqueeze", "mean", "cat", "concat",
    "stack", "pad", "max", "amax", "channel_shuffle", "repeat", "expand",
    "roll", "flip", "t", "unbind", "select", "index_select", "__iter__",
    # a max or mean of the input stays within its range (pools of every rank)
    *POOLS, "dropout", *IDENTITY_OPS, *CAST_OPS,
})
# the recorded names of x + y, x - y and of x * y, x / y (the range and the moment rules read the same calls)
_ADD_SUB = ("add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__")
_MUL_DIV = ("mul", "__mul__", "__rmul__", "__imul__", "div", "__truediv__")
_UNIT = {"sigmoid", "hardsigmoid", "softmax", "sigmoid_"}


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


# ops that pass values through unchanged (eval mode): a softmax read through them is still a softmax
_SAME_VALUES = frozenset({"dropout", *IDENTITY_OPS, *CAST_OPS})
# the recorded calls of a weight layer: the graph's conv / linear ops and the transposed conv
WEIGHT_CALLS = (*sorted(WEIGHT_OPS), "conv_transpose2d")


def _matmul(n, ivs, value, sigma) -> Interval:
    """P @ V with P a softmax over its last axis (rows >= 0 summing to 1): V's hull; any other product: none."""
    if len(n.args) < 2 or not value.is_softmax_rows(n.args[0]):
        return None
    return softmax_average_interval(value(n.args[1]))


def _weight_args(n):
    """(weight, bias, groups, zero padding fed to the sum) of a recorded conv/linear call."""
    a, kw = n.args, n.kwargs
    w = a[1] if len(a) > 1 else kw.get("weight")
    b = a[2] if len(a) > 2 else kw.get("bias")
    if n.op == "linear":
        return w, b, 1, False
    groups = a[6] if len(a) > 6 else kw.get("groups", 1)
    if n.op == "conv_transpose2d":  # (input, weight [C_in, C_out / g, k], bias, stride, padding, out_pad, groups)
        cin, opg = w.shape[0], w.shape[1]  # output channels first, each row its group's inputs and taps
        w = w.reshape(groups, cin // groups, opg, -1).transpose(1, 2).reshape(groups * opg, cin // groups, -1)
        return w, b, groups, True
    pad = a[4] if len(a) > 4 else kw.get("padding", 0)
    pads = pad if isinstance(pad, (tuple, list)) else (pad,)
    return w, b, groups, pad == "same" or any(p != 0 for p in pads if not isinstance(p, str))


def _no_propagation(n, ivs, value, sigma) -> Interval:
    return None


def _moments_propagation(n, ivs, value, sigma) -> Interval:
    m = value.moments(n.out)  # RANGE_MOMENT_RULES ran first on this call
    return None if m is None else bn_interval(m.mean, m.std, sigma)


def _interval_propagation(n, ivs, value, sigma) -> Interval:
    x = _first(ivs)
    if x is None:
        return None
    w, b, _, zero_in = _weight_args(n)
    return layer_interval(x, w, b, zero_in_input=zero_in)


# QuantSpec.range_propagation -> the range rule of a weight layer's output (conv2d, conv1d, linear, ...)
LAYER_RANGE_RULES: dict[str, Callable] = {
    "none": _no_propagation,
    "moments": _moments_propagation,
    "interval": _interval_propagation,
}


def _weight_layer(n, ivs, value, sigma) -> Interval:
    return LAYER_RANGE_RULES[value.propagation](n, ivs, value, sigma)


# op name -> rule(node, ranges of its tensor arguments, value, sigma) -> Interval, where ``value(arg)`` is the
# range of an argument (a tensor's or a constant's) and ``value`` also answers ``moments(t)``,
# ``is_softmax_rows(t)`` and ``propagation`` (``_State``). An op not listed has no range rule: its output has
# no range (recorded in ``TraceResult.unknown``).
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
    **{k: _arith for k in _ADD_SUB},
    **{k: _mul for k in _MUL_DIV},
    **{k: _hull for k in _PASSTHROUGH},
    # attention's context: a softmax-weighted average of V's rows (fused, or written as softmax then matmul)
    "scaled_dot_product_attention": lambda n, ivs, value, sigma: softmax_average_interval(
        value(n.args[2] if len(n.args) > 2 else n.kwargs.get("value"))),
    **{k: _matmul for k in ("matmul", "__matmul__", "bmm")},
    # a weight layer's output: by the protocol's range propagation (LAYER_RANGE_RULES; default none: only BN
    # statistics, folded or following, give a range)
    **{k: _weight_layer for k in WEIGHT_CALLS},
}


def _m_norm(n, st) -> Optional[Moments]:
    """BatchNorm / LayerNorm output: per channel (beta_c, |gamma_c|), as their range rules take it."""
    x, a, kw = n.args[0], n.args, n.kwargs
    if n.op == "batch_norm":
        w, b, dim = a[3] if len(a) > 3 else kw.get("weight"), a[4] if len(a) > 4 else kw.get("bias"), 1
        c = x.shape[1]
    else:
        shape = a[1] if len(a) > 1 else kw["normalized_shape"]
        if len(tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)) != 1:
            return None  # normalised over several axes: no per-channel axis
        w, b, dim = a[2] if len(a) > 2 else kw.get("weight"), a[3] if len(a) > 3 else kw.get("bias"), x.dim() - 1
        c = x.shape[-1]
    return Moments.of(torch.zeros(c) if b is None else b, torch.ones(c) if w is None else w, dim)


def _m_layer(n, st) -> Optional[Moments]:
    """conv2d / conv1d / linear: mean W mu + b, std sqrt(sum w^2 sigma^2) from its input's moments."""
    x, m = n.args[0], st.moments(n.args[0])
    w, b, groups, _ = _weight_args(n)
    axis = x.dim() - 1 if n.op == "linear" else 1
    if m is None or m.dim != axis or m.mean.numel() != w.shape[1] * groups:
        return None  # no moments, or moments along another axis than the one the layer reads
    return layer_moments(m, w, b, groups, n.out.dim() - 1 if n.op == "linear" else 1)


def _m_clip(n, st) -> Optional[Moments]:
    m, a, kw = st.moments(n.args[0]), n.args, n.kwargs
    if m is None:
        return None
    if n.op in ("relu", "relu6"):
        lo, hi = 0.0, 6.0 if n.op == "relu6" else None
    elif n.op == "hardtanh":
        lo, hi = a[1] if len(a) > 1 else kw.get("min_val", -1.0), a[2] if len(a) > 2 else kw.get("max_val", 1.0)
    else:
        lo, hi = a[1] if len(a) > 1 else kw.get("min"), a[2] if len(a) > 2 else kw.get("max")
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return None
    return clip_moments(m, lo, hi)


def _m_prelu(n, st) -> Optional[Moments]:
    m = st.moments(n.args[0])
    if n.op == "leaky_relu":
        slope = n.args[1] if len(n.args) > 1 else n.kwargs.get("negative_slope", 0.01)
    else:
        slope = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    per_channel = isinstance(slope, torch.Tensor) and slope.numel() > 1  # PReLU(C): one slope per channel of axis 1
    if m is None or (per_channel and (m.dim != 1 or slope.numel() != m.mean.numel())):
        return None
    return prelu_moments(m, slope)


def _m_add(n, st) -> Optional[Moments]:
    """x + y, x - y: moments of both (independent) or a number shifting one."""
    if len(n.args) < 2:
        return None
    a, b = n.args[0], n.args[1]
    sign = -1.0 if "sub" in n.op else 1.0
    if n.op == "__rsub__":
        a, b = b, a
    ma, mb = st.moments(a), st.moments(b)
    if ma is not None and mb is not None:
        return sum_moments(ma, mb, sign)
    if ma is not None and isinstance(b, (int, float)):
        return Moments(ma.mean + sign * b, ma.std, ma.dim)
    return None


def _m_scale(n, st) -> Optional[Moments]:
    m = st.moments(n.args[0])
    k = n.args[1] if len(n.args) > 1 else None
    if m is None or not isinstance(k, (int, float)) or isinstance(k, bool) or ("div" in n.op and k == 0):
        return None
    k = 1.0 / k if "div" in n.op else float(k)
    return Moments(m.mean * k, m.std * abs(k), m.dim)


def _m_cat(n, st) -> Optional[Moments]:
    ts = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    ms = [st.moments(t) for t in ts]
    if not isinstance(dim, int) or any(m is None or m.dim != dim % t.dim() for m, t in zip(ms, ts)):
        return None
    return Moments(torch.cat([m.mean for m in ms]), torch.cat([m.std for m in ms]), ms[0].dim)


def _m_keep(n, st) -> Optional[Moments]:
    """Values unchanged (eval-mode dropout, copies) or averaged over space (the mean kept; the standard
    deviation kept too: neighbouring activations are correlated, so averaging shrinks it less than 1/sqrt(k))."""
    m = st.moments(n.args[0]) if n.args else None
    return m if m is not None and n.out.dim() == n.args[0].dim() else None


def _m_flatten(n, st) -> Optional[Moments]:
    """N x C x ... -> N x (C ...): channel c's moments repeated over its spatial positions."""
    x, out, m = n.args[0], n.out, st.moments(n.args[0])
    if m is None or m.dim != 1 or out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] != x[0].numel():
        return None
    per = out.shape[1] // m.mean.numel()
    return Moments(m.mean.repeat_interleave(per), m.std.repeat_interleave(per), 1)


# op name -> rule(node, state) -> Moments of its output, for range_propagation='moments' only (the interval
# rules above do not read them). Sources: BatchNorm and LayerNorm; an op not listed loses the moments. Kept
# apart from bias correction's MOMENT_RULES (rex.transforms.bias_correction: E[x] of folded nets, along axis 1)
# so that DFQ's numbers do not move with it: these track the channel axis (tokens: the last) and the BN/LN calls.
RANGE_MOMENT_RULES: dict[str, Callable] = {
    **{k: _m_norm for k in ("batch_norm", "layer_norm")},
    **{k: _m_layer for k in WEIGHT_OPS},
    **{k: _m_clip for k in ("relu", "relu6", "hardtanh", "clamp", "clip")},
    **{k: _m_prelu for k in ("prelu", "leaky_relu")},
    **{k: _m_add for k in _ADD_SUB},
    **{k: _m_scale for k in _MUL_DIV},
    **{k: _m_cat for k in ("cat", "concat")},
    **{k: _m_keep for k in (*_SAME_VALUES, "avg_pool2d", "adaptive_avg_pool2d", "avg_pool1d")},
    **{k: _m_flatten for k in ("flatten", "reshape", "view")},
}

# ops whose output range does not come from their inputs' (statistics, or a fixed image such as softmax's)
_RANGE_SOURCES = frozenset({"batch_norm", "layer_norm", "tanh", *_UNIT})


class _State:
    """What the rules read during one pass: ``state(arg)`` is the range of an argument (a tensor's, or a
    constant's); ``moments(t)`` a tensor's per-channel moments (range_propagation='moments');
    ``is_softmax_rows(t)`` whether t is a softmax over its last axis (read through value-preserving ops)."""

    def __init__(self, propagation: str):
        self.propagation = propagation
        self.made: dict = {}  # id(tensor) -> the call that last output it, so far in the pass
        self.iv: dict[int, Interval] = {}  # id(tensor) -> its range (an in-place op's result replaces the old one)
        self.mo: dict[int, Optional[Moments]] = {}
        self.tag: dict[int, Optional[str]] = {}  # id(tensor) -> "propagated (<rule>)" when derived through a layer

    def __call__(self, a) -> Interval:
        if isinstance(a, torch.Tensor):
            if a.numel() == 1 and id(a) not in self.iv:
                v = float(a)
                return (v, v)
            return self.iv.get(id(a))
        if isinstance(a, (int, float)):
            return (float(a), float(a))
        return None

    def moments(self, t) -> Optional[Moments]:
        return self.mo.get(id(t)) if isinstance(t, torch.Tensor) else None

    def is_softmax_rows(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        node = self.producer(t)
        while node is not None and node.op in _SAME_VALUES:
            node = self.producer(node.ins[0]) if node.ins else None
        if node is None or node.op != "softmax":
            return False
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dim, int) and dim % node.out.dim() == node.out.dim() - 1

    def producer(self, t):
        return self.made.get(id(t))


@dataclass
class TraceResult:
    order: list[str] = field(default_factory=list)  # weight layers in execution order (first call)
    input_range: dict[str, Interval] = field(default_factory=dict)  # per weight layer, range of its input
    # per weight layer with an input range: None (from BN/LN statistics, the network input or a fixed image)
    # or "propagated (moments)" / "propagated (interval)" when it was derived through a preceding weight layer
    input_source: dict[str, Optional[str]] = field(default_factory=dict)
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
    propagation: str = "none",
) -> TraceResult:
    """Record ``model(example_input)`` once (``rex.graph.record``) and run the range rules over it."""
    return ranges(record(model, example_input, layer_filter), sigma, input_range, output_stats, propagation)


def ranges(graph: Graph, sigma: float = 6.0, input_range: Interval = None,
           output_stats: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
           propagation: str = "none") -> TraceResult:
    """Order, shapes, conv->BN pairs and data-free ranges of a recorded graph: the network inputs get
    ``input_range``, every call the interval its rule (``RANGE_RULES``) derives from its arguments' ranges.

    ``output_stats[name] = (mean, std)`` declares the per-channel distribution of a layer's output (a conv
    whose BN was folded into it), which becomes the range of that output. ``propagation`` (none | moments |
    interval, ``LAYER_RANGE_RULES``) decides whether a weight layer's output gets a range of its own."""
    if propagation not in LAYER_RANGE_RULES:
        raise ValueError(f"range propagation must be one of {tuple(LAYER_RANGE_RULES)}, got {propagation!r}")
    res = TraceResult()
    output_stats = output_stats or {}
    st = _State(propagation)
    iv, tag = st.iv, st.tag
    tagged = f"propagated ({propagation})"

    for n in graph.nodes:
        if n.kind == "input":
            iv[id(n.out)] = input_range
        elif n.kind == "call":
            if n.meta or not n.outputs:
                continue
            if propagation == "moments":  # first: the weight layers' range rule reads their output's moments
                mrule = RANGE_MOMENT_RULES.get(n.op)
                mo = mrule(n, st) if mrule is not None else None
                for t in n.outputs:
                    st.mo[id(t)] = mo
            rule = RANGE_RULES.get(n.op)
            r = None
            if rule is None:
                res.unknown[n.idx] = n.op  # recorded, shown as "no range: <op>" (rex_info.notes)
            else:  # a rule that raises is a bug in the rule: it is not swallowed
                r = rule(n, [iv.get(id(x)) for x in n.ins], st, sigma)
            how = None
            if r is not None and n.op in WEIGHT_CALLS:
                how = tagged
            elif r is not None and n.op not in _RANGE_SOURCES:
                how = next((tag[id(x)] for x in n.ins if tag.get(id(x))), None)
            for t in n.outputs:
                iv[id(t)] = r
                tag[id(t)] = how
                st.made[id(t)] = n
        elif n.kind == "layer_in":
            name, x = n.op, n.arg0
            if name not in res.input_range:
                res.order.append(name)
                res.input_range[name] = iv.get(id(x)) if isinstance(x, torch.Tensor) else None
                res.input_shape[name] = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
                if res.input_range[name] is not None:
                    res.input_source[name] = tag.get(id(x))
            res.calls[name] = res.calls.get(name, 0) + 1
        elif n.kind == "layer_out" and n.out is not None:
            name, out = n.op, n.out
            res.output_shape.setdefault(name, tuple(out.shape))
            if name in output_stats:
                mean, std = output_stats[name]
                iv[id(out)] = bn_interval(mean, std, sigma)
                tag[id(out)] = None  # the folded BatchNorm's statistics
                st.mo[id(out)] = Moments.of(mean, std, 1) if propagation == "moments" else None
            res.output_range.setdefault(name, iv.get(id(out)))
        elif n.kind == "bn_out":
            res.bn_output_range.setdefault(n.op, iv.get(id(n.out)) if n.out is not None else None)
    res.conv_bn = graph.conv_bn_pairs()
    return res
