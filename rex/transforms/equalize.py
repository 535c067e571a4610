"""DFQ weight transforms (Nagel et al., ICCV 2019), on a BN-folded eager model:

- ``find_pairs``: consecutive weight-layer pairs L1 -> L2 whose connecting path is positively homogeneous
  per channel (ReLU, ReLU6 to be replaced by ReLU, zero padding, max/avg pooling, flatten, dropout, spatial
  mean) and read by nobody else, found over the recorded op graph (``rex.graph``; ``dataflow_of``), so residual adds,
  concatenations and shared layers are excluded automatically.
- ``relu6_to_relu``: the ReLU6 modules on those paths become ReLU (ReLU6 is not scale-equivariant).
- ``equalize``: cross-layer equalization. For a pair, r1_i = range of output channel i of L1, r2_i = range
  of input channel i of L2, s_i = sqrt(r1_i r2_i) / r1_i; L1's row i and bias are multiplied by s_i, L2's
  input channel i divided by s_i, so both ranges become sqrt(r1_i r2_i) and relu(s z) = s relu(z) keeps the
  function. Depthwise / grouped L2: input channel i lives in group i // (C_in/groups), column i % (C_in/groups);
  a depthwise layer in the middle of a chain is both an L2 (its rows scaled) and an L1 (its rows rescaled):
  the pairs are swept in order until every scale is 1 within ``tol``.
- ``absorb_high_bias``: c_i = max(0, beta_i - 3 gamma_i) from the (scaled) folded-BN statistics of L1's
  output is removed from L1's bias and added to L2's bias through L2's weights (exact when the
  pre-activation stays above c, i.e. for ~99.9% of a Gaussian; exact for a linear path). L2 with zero
  padding is skipped unless ``absorb_padded`` (the padded border would see -c).

The BN statistics ``stats[name] = (beta, gamma)`` (data-free activation ranges) are updated with every
scaling and shift, so the ranges of the quantized model follow the transformed layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..graph import ALPHA_DROPOUTS, AVG_POOLS, DROPOUTS, IDENTITY_OPS, POOLS, Graph, record
from ..nn.layers import CONVS
from .base import Context, Transform
from .modules import get_module, set_module

# ops through which a per-channel positive scale passes unchanged (relu(s x) = s relu(x), ...)
HOMOGENEOUS = frozenset({"relu", "flatten", "pad", "mean", *POOLS, *DROPOUTS, *ALPHA_DROPOUTS, *IDENTITY_OPS})
# of those, the ops that also commute with a per-channel shift (needed for high-bias absorption): not the
# zero padding of pad / avg_pool
SHIFT_COMMUTING = HOMOGENEOUS - AVG_POOLS - ALPHA_DROPOUTS - {"pad"}

@dataclass
class Node:
    """A call of the recorded graph as the pair search sees it (parameters and buffers are not inputs)."""
    idx: int
    op: str
    args: tuple
    kwargs: dict
    inputs: list  # producer call of each tensor input (None: graph input)
    layer: Optional[str] = None  # weight-layer name for conv/linear ops
    module: Optional[str] = None  # name of the activation module whose forward produced this call
    consumers: list = field(default_factory=list)
    out_shape: tuple = ()


@dataclass
class Pair:
    first: str  # L1
    second: str  # L2
    path: list  # op names between them
    relu6_modules: list  # ReLU6/Hardtanh modules on the path (to become ReLU)
    shift_ok: bool  # every op on the path commutes with a per-channel shift
    has_relu: bool


@dataclass
class Dataflow:
    nodes: list
    layer_nodes: dict  # name -> [node ids]


def dataflow_of(graph: Graph) -> Dataflow:
    """The calls of a recorded graph that output tensors, as producer -> consumers (``rex.graph``)."""
    calls = graph.calls()
    index = {n.idx: i for i, n in enumerate(calls)}
    nodes = []
    for i, n in enumerate(calls):
        inputs = [None if p is None else index[p] for p, x in zip(n.src, n.ins) if id(x) not in graph.param_ids]
        nodes.append(Node(i, n.op, n.args, n.kwargs, inputs, n.layer, n.module,
                          [c if c < 0 else index[c] for c in n.consumers], tuple(n.out.shape)))
    layer_nodes: dict = {}
    for n in nodes:
        if n.layer is not None:
            layer_nodes.setdefault(n.layer, []).append(n.idx)
    return Dataflow(nodes, layer_nodes)


def dataflow(model: nn.Module, example_input) -> Dataflow:
    """One eager forward pass recording the op graph (tensor producer -> consumers)."""
    return dataflow_of(record(model, example_input))


def _hardtanh_bounds(node: Node):
    if node.op in ("relu6",):
        return 0.0, 6.0
    a = node.args
    lo = a[1] if len(a) > 1 else node.kwargs.get("min_val", -1.0)
    hi = a[2] if len(a) > 2 else node.kwargs.get("max_val", 1.0)
    return lo, hi


def _channel_dims_ok(node: Node) -> bool:
    """Ops that keep dim 1 as the channel dim (flatten from 1, spatial mean, ...)."""
    if node.op == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    if node.op == "mean":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None or not node.args or not isinstance(node.args[0], torch.Tensor):
            return False
        nd = node.args[0].dim()
        dims = {d % nd for d in ([dim] if isinstance(dim, int) else list(dim))}
        return 0 not in dims and 1 not in dims
    if node.op == "pad":
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        return mode == "constant" and not value and len(pad) <= 4  # spatial zero padding only
    return True


def find_pairs(model: nn.Module, example_input=None, allow_relu6: bool = True, graph: Optional[Graph] = None) -> list[Pair]:
    """Equalizable pairs (L1, L2): L1's output reaches only L2's input through homogeneous ops (over ``graph``,
    a recording of ``model``, or a new recording on ``example_input``)."""
    df = dataflow_of(graph if graph is not None else record(model, example_input))
    pairs = []
    for name, ids in df.layer_nodes.items():
        if len(ids) != 1:
            continue  # a layer run twice cannot be rescaled for one use
        cur = df.nodes[ids[0]]
        path, relu6, shift_ok, has_relu = [], [], True, False
        while True:
            if len(cur.consumers) != 1 or cur.consumers[0] < 0:
                break
            nxt = df.nodes[cur.consumers[0]]
            if nxt.layer is not None:
                if nxt.inputs and nxt.inputs[0] == cur.idx and len(df.layer_nodes.get(nxt.layer, [])) == 1 \
                        and len([i for i in nxt.inputs if i == cur.idx]) == 1:
                    pairs.append(Pair(name, nxt.layer, path, relu6, shift_ok, has_relu))
                break
            if len([i for i in nxt.inputs if i is not None]) != 1:
                break  # an add, a concat, a multiply: several tensors meet
            if nxt.op in ("hardtanh", "relu6"):
                lo, hi = _hardtanh_bounds(nxt)
                if lo != 0 or not allow_relu6 or nxt.module is None:
                    break  # functional clamp: cannot be swapped for a ReLU
                relu6.append(nxt.module)
                has_relu = True
            elif nxt.op == "relu" or (nxt.op in ("clamp", "clip") and _is_relu_clamp(nxt)):
                has_relu = True
            elif nxt.op in HOMOGENEOUS and _channel_dims_ok(nxt):
                if nxt.op not in SHIFT_COMMUTING:
                    shift_ok = False  # e.g. zero padding, avg_pool2d counting the padded border
            else:
                break
            path.append(nxt.op)
            cur = nxt
    return [p for p in pairs if _shapes_match(model, p)]


def _is_relu_clamp(node: Node) -> bool:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return lo == 0 and hi is None


def _shapes_match(model, p: Pair) -> bool:
    l1, l2 = get_module(model, p.first), get_module(model, p.second)
    c1 = l1.weight.shape[0]
    cin2 = l2.in_features if isinstance(l2, nn.Linear) else l2.in_channels
    return c1 == cin2


def relu6_to_relu(model: nn.Module, pairs: list[Pair]) -> list[str]:
    """Replace the ReLU6 / Hardtanh(0, x) modules on equalization paths by ReLU (in place)."""
    done = []
    for p in pairs:
        for name in p.relu6_modules:
            m = get_module(model, name)
            if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
                set_module(model, name, nn.ReLU(inplace=getattr(m, "inplace", False)))
                done.append(name)
    return done


# --------------------------------------------------------------------------------------------------
# per-channel ranges and scaling
# --------------------------------------------------------------------------------------------------


def out_channel_range(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().flatten(1).abs().amax(1)


def _in_view(layer: nn.Module) -> tuple[torch.Tensor, tuple]:
    """L2's weight as [groups, out_per_group, in_per_group, rest] and the shape to broadcast a per-input vector."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.reshape(1, w.shape[0], w.shape[1], 1), (1, 1, w.shape[1], 1)
    g = layer.groups
    cpg = w.shape[1]
    return w.reshape(g, w.shape[0] // g, cpg, -1), (g, 1, cpg, 1)


def in_channel_range(layer: nn.Module) -> torch.Tensor:
    wv, _ = _in_view(layer)
    return wv.abs().amax(dim=(1, 3)).reshape(-1)  # [groups * in_per_group] = C_in


def scale_out_channels(layer: nn.Module, s: torch.Tensor) -> None:
    w = layer.weight.detach()
    layer.weight.data = w * s.to(w.dtype).reshape([-1] + [1] * (w.dim() - 1))
    if layer.bias is not None:
        layer.bias.data = layer.bias.detach() * s.to(w.dtype)


def scale_in_channels(layer: nn.Module, s: torch.Tensor) -> None:
    """Multiply input channel i of ``layer`` by s_i (every weight reading it)."""
    wv, shp = _in_view(layer)
    layer.weight.data = (wv * s.to(wv.dtype).reshape(shp)).reshape(layer.weight.shape)


def apply_to_constant(layer: nn.Module, v: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum over (input channel, kernel) of W[o, i, ...] * v_i for every output o (ignores padding):
    the output of ``layer`` (without bias) on an input that is v_i everywhere in channel i."""
    w = layer.weight.detach() if weight is None else weight
    v = v.to(w.dtype)
    if isinstance(layer, nn.Linear):
        return w @ v
    wv = w.reshape(layer.groups, w.shape[0] // layer.groups, w.shape[1], -1)  # [g, opg, cpg, k]
    vv = v.reshape(layer.groups, 1, w.shape[1], 1)
    return (wv * vv).sum(dim=(2, 3)).reshape(-1)


def _shift_exact(layer: nn.Module) -> bool:
    """A constant input shift maps to a constant output shift: no zero padding at the borders."""
    if isinstance(layer, nn.Linear):
        return True
    base = next((c for c in CONVS if isinstance(layer, c)), None)
    if base is None or type(layer).forward is not base.forward:
        return False  # a subclass may pad inside its forward
    pad = layer.padding
    return pad == "valid" or (not isinstance(pad, str) and not any(pad))


def _ensure_bias(layer: nn.Module) -> None:
    if layer.bias is None:
        c = layer.weight.shape[0]
        layer.bias = nn.Parameter(torch.zeros(c, dtype=layer.weight.dtype), requires_grad=False)


@dataclass
class EqualizeResult:
    iterations: int
    max_log_scale: float  # |log s| of the last sweep
    pairs: list


def equalize(model: nn.Module, pairs: list[Pair], stats: Optional[dict] = None, max_iter: int = 100,
             tol: float = 1e-4, eps: float = 1e-12) -> EqualizeResult:
    """Cross-layer equalization in place (float64 arithmetic), sweeping the pairs until every s_i ~ 1."""
    stats = stats if stats is not None else {}
    dtypes = {}
    for p in pairs:
        for n in (p.first, p.second):
            m = get_module(model, n)
            if n not in dtypes:
                dtypes[n] = m.weight.dtype
                m.weight.data = m.weight.detach().double()
                if m.bias is not None:
                    m.bias.data = m.bias.detach().double()
    it, worst = 0, 0.0
    try:
        for it in range(1, max_iter + 1):
            worst = 0.0
            for p in pairs:
                l1, l2 = get_module(model, p.first), get_module(model, p.second)
                r1, r2 = out_channel_range(l1), in_channel_range(l2)
                ok = (r1 > eps) & (r2 > eps)
                s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r1, torch.ones_like(r1)), torch.ones_like(r1))
                scale_out_channels(l1, s)
                scale_in_channels(l2, 1.0 / s)
                if p.first in stats:
                    beta, gamma = stats[p.first]
                    stats[p.first] = (beta * s.to(beta.dtype), gamma * s.to(gamma.dtype))
                worst = max(worst, float(s.log().abs().max()))
            if worst < tol:
                break
    finally:
        for n, dt in dtypes.items():
            m = get_module(model, n)
            m.weight.data = m.weight.detach().to(dt)
            if m.bias is not None:
                m.bias.data = m.bias.detach().to(dt)
    return EqualizeResult(it, worst, pairs)


def absorb_high_bias(model: nn.Module, pairs: list[Pair], stats: dict, n_sigma: float = 3.0,
                     absorb_padded: bool = False) -> dict[str, float]:
    """High-bias absorption in place; returns {L1 name: max c} for the pairs treated."""
    done = {}
    for p in pairs:
        if p.first not in stats or not p.shift_ok:
            continue
        l2 = get_module(model, p.second)
        if not absorb_padded and not _shift_exact(l2):
            continue
        l1 = get_module(model, p.first)
        beta, gamma = stats[p.first]
        c = torch.clamp(beta - n_sigma * gamma.abs(), min=0.0)
        if not bool((c > 0).any()):
            continue
        _ensure_bias(l1)
        _ensure_bias(l2)
        l2.bias.data = l2.bias.detach() + apply_to_constant(l2, c.double()).to(l2.bias.dtype)
        l1.bias.data = l1.bias.detach() - c.to(l1.bias.dtype)
        stats[p.first] = (beta - c, gamma)
        done[p.first] = float(c.max())
    return done


class Equalize(Transform):
    """Find the equalization pairs (``ctx.pairs``), turn the ReLU6 on their paths into ReLU (``relu6``), and
    equalize them (``max_iter`` sweeps; 0 = pairs only), keeping ``ctx.stats`` in step."""

    name = "equalize"

    def __init__(self, relu6: bool = True, max_iter: int = 100, tol: float = 1e-4):
        self.relu6, self.max_iter, self.tol = relu6, max_iter, tol

    def apply(self, model: nn.Module, ctx: Context) -> dict:
        pairs = find_pairs(model, allow_relu6=self.relu6, graph=ctx.graph(model))
        ctx.pairs = pairs
        replaced = relu6_to_relu(model, pairs) if self.relu6 else []
        eq = equalize(model, pairs, ctx.stats, max_iter=self.max_iter, tol=self.tol)
        return dict(pairs=[(p.first, p.second) for p in pairs], relu6_replaced=replaced, iterations=eq.iterations,
                    max_log_scale=eq.max_log_scale)


class AbsorbHighBias(Transform):
    """High-bias absorption over ``ctx.pairs`` (found here if no ``Equalize`` ran before), from ``ctx.stats``."""

    name = "absorb_high_bias"

    def __init__(self, absorb_padded: bool = False, n_sigma: float = 3.0):
        self.absorb_padded, self.n_sigma = absorb_padded, n_sigma

    def apply(self, model: nn.Module, ctx: Context) -> dict:
        if ctx.pairs is None:
            ctx.pairs = find_pairs(model, graph=ctx.graph(model))
        return dict(absorbed=absorb_high_bias(model, ctx.pairs, ctx.stats, n_sigma=self.n_sigma,
                                              absorb_padded=self.absorb_padded))


def cross_layer_equalization(model: nn.Module, example_input, stats: Optional[dict] = None, *, relu6: bool = True,
                             absorb: bool = True, absorb_padded: bool = False, max_iter: int = 100,
                             tol: float = 1e-4) -> dict:
    """ReLU6 -> ReLU on the pair paths, equalize, absorb high biases (in place). Returns a summary."""
    ctx = Context(example_input, stats if stats is not None else {})
    out = Equalize(relu6, max_iter, tol).apply(model, ctx)
    out["absorbed"] = AbsorbHighBias(absorb_padded).apply(model, ctx)["absorbed"] if absorb else {}
    return out
