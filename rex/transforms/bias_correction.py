"""Analytic (data-free) bias correction of DFQ (Nagel et al. 2019, §4.2).

Quantizing W to W_q shifts the expected output of a layer by (W_q - W) E[x]; the correction subtracts it
from the bias: b <- b - (W_q - W) E[x] (summed over the kernel positions: padding is ignored).

E[x], per input channel, is computed without data: the folded BatchNorm statistics say that the output of
a conv is per channel N(beta_c, gamma_c^2). These (mean, variance) pairs are propagated op by op through
the recorded op graph (``rex.graph``; ``expected_inputs``, one rule per op in ``MOMENT_RULES``):

- ReLU / ReLU6 / clamp of N(mu, sigma^2): mean and variance of the clipped normal, e.g. after ReLU
  E = sigma phi(mu/sigma) + mu Phi(mu/sigma);
- residual adds: means add, variances add (independence assumed); concatenation along channels;
- average pooling, flatten, dropout, spatial mean: mean kept; scalar multiply scales;
- a weight layer without BN statistics: E[out] = W E[in] + b (exact for the mean), variance
  sum W^2 var_in (inputs taken as independent);
- anything else: unknown (no correction downstream of it).

The distribution after a clip is treated as Gaussian again by the next clip (the usual approximation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..graph import (ADAPTIVE_AVG_POOLS, AVG_POOLS, CAST_OPS, DROPOUTS, IDENTITY_OPS, WEIGHT_OPS, Graph,
                     record)
from ..nn.layers import CONVS
from ..ranges import clipped_normal_moments
from .base import Context, Transform
from .equalize import apply_to_constant

Stat = Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]  # (mean [C], var [C] or None)

# ops whose output has the per-channel mean (and variance) of their input
_KEEP_MEAN = frozenset({"pad", *DROPOUTS, *AVG_POOLS, *ADAPTIVE_AVG_POOLS, *IDENTITY_OPS, *CAST_OPS})


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


class _MomentRules:
    """The moment rules (mean [C], var [C] or None per tensor), run over the calls of a recorded graph in
    execution order. ``expected``: E[x] of every Conv/Linear layer's input (first call)."""

    def __init__(self, graph: Graph, output_stats: dict):
        self.modules = graph.modules
        self.output_stats = output_stats
        self.st: dict[int, Stat] = {}
        self.expected: dict[str, Optional[torch.Tensor]] = {}
        self.unknown: dict[int, str] = {}  # graph node -> op without a moment rule (its input had moments)

    def get(self, t) -> Stat:
        return self.st.get(id(t)) if isinstance(t, torch.Tensor) else None

    def run(self, graph: Graph) -> "_MomentRules":
        for n in graph.calls():
            res = self.rule(n, n.args, n.kwargs, n.outputs[0])  # a rule that raises is a bug: not swallowed
            for t in n.outputs:
                self.st[id(t)] = res
        return self

    def rule(self, n, args, kwargs, out) -> Stat:
        name = n.op
        x = args[0] if args else None
        sx = self.get(x)
        if name in WEIGHT_OPS and len(args) > 1:
            layer = n.layer
            if layer is not None and sx is not None and sx[0].numel() != _in_channels(self.modules[layer]):
                cin = _in_channels(self.modules[layer])
                self.unknown[n.idx] = f"{name} {layer}: input moments for {sx[0].numel()} channels, it reads {cin}"
                sx = None  # e.g. a Linear over the last dim of a tensor whose moments are along dim 1
            if layer is not None and layer not in self.expected:
                self.expected[layer] = None if sx is None else sx[0]
            if layer is not None and layer in self.output_stats:
                beta, gamma = self.output_stats[layer]
                return beta.float(), gamma.float() ** 2
            if sx is None or layer is None:
                return None
            m = self.modules[layer]
            mean = apply_to_constant(m, sx[0].double()).float()
            if m.bias is not None:
                mean = mean + m.bias.detach().float()
            var = None  # inputs taken as independent: var_out = sum W^2 var_in
            if sx[1] is not None:
                var = apply_to_constant(m, sx[1].double(), weight=m.weight.detach().double() ** 2).float()
            return mean, var
        if sx is None:
            return None
        rule = MOMENT_RULES.get(name)
        if rule is None:
            self.unknown[n.idx] = name  # recorded: the moments are lost downstream of it
            return None
        return rule(self, n, args, kwargs, x, sx, out)

    def unknown_note(self) -> str:
        counts: dict = {}
        for why in self.unknown.values():
            counts[why] = counts.get(why, 0) + 1
        return ", ".join(f"{why} ({k})" for why, k in counts.items())


def _relu(r, n, args, kwargs, x, sx, out) -> Stat:
    mean, var = sx
    return clipped_normal_moments(mean, var, 0.0, None) if var is not None else None


def _clip(r, n, args, kwargs, x, sx, out) -> Stat:
    mean, var = sx
    name = n.op
    if name == "relu6":
        lo, hi = 0.0, 6.0
    elif name == "hardtanh":
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    else:
        lo = args[1] if len(args) > 1 else kwargs.get("min")
        hi = args[2] if len(args) > 2 else kwargs.get("max")
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return None
    return clipped_normal_moments(mean, var, lo, hi) if var is not None else None


def _add(r, n, args, kwargs, x, sx, out) -> Stat:
    mean, var = sx
    b = args[1] if len(args) > 1 else None
    sb = r.get(b)
    if sb is None:
        if isinstance(b, (int, float)):
            return mean + b, var
        return None
    if not _broadcastable(mean, sb[0]):
        r.unknown[n.idx] = f"{n.op}: moments for {mean.numel()} and {sb[0].numel()} channels"
        return None
    v = None if var is None or sb[1] is None else var + sb[1]
    return mean + sb[0], v


def _broadcastable(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return False
    return True


def _mul(r, n, args, kwargs, x, sx, out) -> Stat:
    mean, var = sx
    if len(args) > 1 and isinstance(args[1], (int, float)):
        return mean * args[1], None if var is None else var * args[1] ** 2
    return None


def _keep(r, n, args, kwargs, x, sx, out) -> Stat:
    return sx


def _mean(r, n, args, kwargs, x, sx, out) -> Stat:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    nd = x.dim()
    if not all(isinstance(d, int) for d in ([dim] if isinstance(dim, int) else list(dim or []))):
        r.unknown[n.idx] = f"mean over named dims {dim!r}"
        return None
    dims = {d % nd for d in ([dim] if isinstance(dim, int) else list(dim or []))}
    if dims and 0 not in dims and 1 not in dims:
        return sx
    return None


def _flatten(r, n, args, kwargs, x, sx, out) -> Stat:
    mean, var = sx
    if out.dim() >= 2 and x.dim() >= 2 and out.shape[0] == x.shape[0]:
        c = mean.numel()
        per = out.shape[1] // c if out.shape[1] % c == 0 else None
        if per and out.shape[1] * math.prod(out.shape[2:]) == x[0].numel():
            rep = lambda v: None if v is None else v.repeat_interleave(per)  # noqa: E731
            return rep(mean), rep(var)
    return None


def _cat(r, n, args, kwargs, x, sx, out) -> Stat:
    ts = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(dim, int):
        r.unknown[n.idx] = f"{n.op} along named dim {dim!r}"
        return None
    if dim % ts[0].dim() != 1:
        return None
    ss = [r.get(t) for t in ts]
    if any(s is None for s in ss):
        return None
    v = None if any(s[1] is None for s in ss) else torch.cat([s[1] for s in ss])
    return torch.cat([s[0] for s in ss]), v


# op name -> rule(rules, node, args, kwargs, x, moments of x, output) -> moments of the output (None: unknown
# downstream). Conv/Linear calls are handled first (``_MomentRules.rule``); an op not listed has no rule.
MOMENT_RULES = {
    "relu": _relu,
    **{k: _clip for k in ("hardtanh", "relu6", "clamp", "clip")},
    **{k: _add for k in ("add", "__add__", "__radd__", "__iadd__")},
    **{k: _mul for k in ("mul", "__mul__", "__rmul__")},
    **{k: _keep for k in _KEEP_MEAN},
    "mean": _mean,
    **{k: _flatten for k in ("flatten", "reshape", "view")},
    **{k: _cat for k in ("cat", "concat")},
}


def expected_inputs(model: nn.Module, example_input=None, output_stats: Optional[dict] = None,
                    graph: Optional[Graph] = None) -> dict[str, Optional[torch.Tensor]]:
    """E[x] per input channel of every Conv1d/2d/3d / Linear (None where it cannot be derived without data), by the
    moment rules over ``graph`` (a recording of ``model``) or a new recording on ``example_input``."""
    return moment_rules(model, example_input, output_stats, graph).expected


def moment_rules(model: nn.Module, example_input=None, output_stats: Optional[dict] = None,
                 graph: Optional[Graph] = None) -> _MomentRules:
    """The moment rules run over the graph: ``.expected`` (E[x] per layer) and ``.unknown`` (where they stop)."""
    g = graph if graph is not None else record(model, example_input)
    return _MomentRules(g, output_stats or {}).run(g)


def bias_shift(layer: nn.Module, delta_w: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    """(W_q - W) E[x] per output channel, summed over the kernel (``delta_w`` = W_q - W)."""
    return apply_to_constant(layer, ex.double(), weight=delta_w.double()).float()


def correct_biases(qmodel: nn.Module, float_weights: dict[str, torch.Tensor], expected: dict) -> dict[str, float]:
    """In place on a quantized model: b <- b - (W_q - W) E[x] for every QuantLayer with a known E[x].
    ``float_weights[name]`` is the float weight the layer was quantized from. Returns {name: max |shift|}."""
    from ..nn.layers import QuantLayer

    done = {}
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantLayer) or name not in float_weights:
            continue
        ex = expected.get(name)
        if ex is None:
            continue
        inner = m.inner
        delta = m.dequantized_weight() - float_weights[name].to(m.dequantized_weight().dtype)
        shift = bias_shift(inner, delta, ex)
        if inner.bias is None:
            inner.bias = nn.Parameter(torch.zeros(inner.weight.shape[0], dtype=inner.weight.dtype), requires_grad=False)
        inner.bias.data = inner.bias.detach() - shift.to(inner.bias.dtype)
        done[name] = float(shift.abs().max())
    return done


class BiasCorrection(Transform):
    """Before quantization: keep each Conv/Linear layer's float weight and its input's E[x] (the moment rules
    over ``ctx.graph``, from ``ctx.stats``); after: ``correct_biases`` on the quantized model."""

    name = "bias_correction"
    reads_only = True

    def apply(self, model: nn.Module, ctx: Context) -> dict:
        self.weights = {n: mod.weight.detach().clone() for n, mod in model.named_modules()
                        if isinstance(mod, (*CONVS, nn.Linear))}
        self.moments = moment_rules(model, output_stats=ctx.stats, graph=ctx.graph(model))
        self.expected = self.moments.expected
        return {}

    def after_quantize(self, qmodel: nn.Module, ctx: Context) -> dict:
        done = correct_biases(qmodel, self.weights, self.expected)
        skipped = not_corrected(qmodel, self.weights, self.expected)
        if skipped:  # shown in the job's details: which layers kept their bias, and why
            by_why: dict = {}
            for k, why in skipped.items():
                by_why.setdefault(why, []).append(k)
            lost = self.moments.unknown_note()
            qmodel.rex_info.notes.append(
                "no bias correction: " + "; ".join(f"{why}: {', '.join(ks)}" for why, ks in by_why.items())
                + (f"; moments lost at: {lost}" if lost else ""))
        return dict(corrected=done, skipped=skipped)


def not_corrected(qmodel: nn.Module, float_weights: dict, expected: dict) -> dict[str, str]:
    """The quantized layers ``correct_biases`` leaves alone, with the reason."""
    from ..nn.layers import QuantLayer

    out = {}
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantLayer):
            continue
        if name not in float_weights:
            out[name] = f"{type(m.inner).__name__}, not a Conv1d/2d/3d or Linear"
        elif name not in expected:
            out[name] = "not reached by the recorded pass"
        elif expected[name] is None:
            out[name] = "E[x] of the input unknown without data"
    return out
