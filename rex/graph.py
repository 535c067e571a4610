"""The model's op graph, recorded in one eager forward pass (a ``TorchFunctionMode`` plus module hooks; no FX:
mmdet/mmseg models do not trace symbolically).

``record(model, example_input)`` runs the model once (no grad) and keeps, in execution order, one ``Node`` per
event of the pass:

- ``input``: a network input tensor (before the forward);
- ``call``: a torch function call: its op name (``op_name``), arguments, tensor arguments and outputs, the
  producer call of every tensor argument at call time, and its readers (``consumers``);
- ``layer_in`` / ``layer_out``: a weight layer's forward pre-hook (its input) and forward hook (its output);
- ``bn_in`` / ``bn_out``: the same for a BatchNorm module.

Everything else is a rule run over that graph, without running the model again: the weight layers in execution
order and the foldable conv -> BatchNorm pairs (here), data-free activation ranges (``rex.trace``), the
equalization pairs (``rex.transforms.equalize``) and the BatchNorm moments behind bias correction
(``rex.transforms.bias_correction``). A rule set reports, next to its values, ``unknown``: the ops it has no
rule for, so a gap is recorded, not hidden.

Rules read parameters through the recorded arguments and modules when they run, so they are run right after
recording: a transform that changes the model makes a new recording necessary
(``rex.transforms.base.Context.graph``).

Tensors are identified by ``id()``; every tensor seen is kept alive by the graph so ids are not reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .cost import _call
from .nn.layers import CONVS

# calls that only read metadata (sizes, flags): not data flow, no range, no use counted
META_OPS = frozenset({"size", "dim", "numel", "__get__", "__len__", "__format__", "__bool__", "item", "tolist",
                      "__hash__", "__eq__", "__ne__"})
# ops that apply a Conv/Linear module's weight (args[1]); their node names the module (``Node.layer``)
WEIGHT_OPS = frozenset({"conv1d", "conv2d", "conv3d", "linear"})
WEIGHT_MODULES = (*CONVS, nn.Linear)
ACT_MODULES = (nn.ReLU6, nn.Hardtanh, nn.ReLU)  # their calls are named (a ReLU6 module can become a ReLU)

# Rank-generic names of the shape / value-preserving calls that the range (rex.trace), moment
# (transforms.bias_correction) and equalization (transforms.equalize) rules share; each rule set is built
# from these, so a new layer kind (another rank, another dropout) is one edit here.


def _ranks(op: str) -> frozenset:
    """``op`` for 1-d, 2-d and 3-d inputs: ``max_pool`` -> max_pool1d, max_pool2d, max_pool3d."""
    return frozenset(f"{op}{d}d" for d in (1, 2, 3))


MAX_POOLS = _ranks("max_pool") | _ranks("adaptive_max_pool")
AVG_POOLS = _ranks("avg_pool")  # padded windows average in zeros: not shift-commuting (equalize)
ADAPTIVE_AVG_POOLS = _ranks("adaptive_avg_pool")
POOLS = MAX_POOLS | AVG_POOLS | ADAPTIVE_AVG_POOLS
DROPOUTS = frozenset({"dropout"}) | _ranks("dropout")  # identity in eval mode
ALPHA_DROPOUTS = frozenset({"alpha_dropout", "feature_alpha_dropout"})
IDENTITY_OPS = frozenset({"identity", "contiguous", "clone", "detach"})  # output == input
CAST_OPS = frozenset({"to", "float", "type_as"})  # same values, another dtype / device


def op_name(func) -> str:
    """One naming rule for every op: ``relu_`` -> ``relu`` (in-place variants share the out-of-place rule)."""
    n = getattr(func, "__name__", None) or str(func)
    return n.rstrip("_") if n.endswith("_") and not n.startswith("__") else n


def tensors(obj):
    """The tensors in a nest of lists, tuples and dicts, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors(o)


def is_weight_layer(m: nn.Module) -> bool:
    """The layers REx quantizes: Conv1d / Conv2d / Conv3d (any groups), ConvTranspose2d (groups = 1), Linear."""
    return isinstance(m, (*CONVS, nn.Linear)) or (isinstance(m, nn.ConvTranspose2d) and m.groups == 1)


@dataclass(eq=False)
class Node:
    idx: int
    kind: str  # input | call | layer_in | layer_out | bn_in | bn_out
    op: str  # the op name of a call; the module name of a hook event; "input"
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    ins: list = field(default_factory=list)  # tensor arguments, in order (args then kwargs); hook: its input
    src: list = field(default_factory=list)  # producer call of each of ``ins`` at call time (None: none)
    outputs: list = field(default_factory=list)  # tensor outputs; hook: the module's output
    meta: bool = False  # a metadata call (META_OPS)
    layer: Optional[str] = None  # a WEIGHT_OPS call: the Conv/Linear module whose weight it applies
    module: Optional[str] = None  # a call produced by the forward of an ACT_MODULES module: its name
    consumers: list = field(default_factory=list)  # calls reading an output (-1: the model's output)
    arg0: Any = None  # hook event: the module's first positional argument (tensor or not)

    @property
    def out(self) -> Optional[torch.Tensor]:
        return self.outputs[0] if self.outputs else None


@dataclass
class Graph:
    nodes: list = field(default_factory=list)  # every event, in execution order
    param_ids: set = field(default_factory=set)  # id of every parameter and buffer (not data flow)
    weight_layers: dict = field(default_factory=dict)  # id(weight) -> name of its Conv1d/2d/3d / Linear module
    modules: dict = field(default_factory=dict)  # name -> that module
    keep: list = field(default_factory=list)

    def calls(self, with_outputs: bool = True) -> list[Node]:
        return [n for n in self.nodes if n.kind == "call" and (n.outputs or not with_outputs)]

    def hooks(self, kind: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == kind]

    @property
    def order(self) -> list[str]:
        """The weight layers (hooked modules) in execution order of their first call."""
        seen: dict = {}
        for n in self.hooks("layer_in"):
            seen.setdefault(n.op, None)
        return list(seen)

    def layer_calls(self) -> dict[str, int]:
        out: dict = {}
        for n in self.hooks("layer_in"):
            out[n.op] = out.get(n.op, 0) + 1
        return out

    def uses(self) -> dict[int, int]:
        """id(tensor) -> number of non-metadata calls reading it."""
        u: dict = {}
        for n in self.calls(with_outputs=False):
            if not n.meta:
                for x in n.ins:
                    u[id(x)] = u.get(id(x), 0) + 1
        return u

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv, bn): the BN reads a weight layer's output that nothing else reads, and the layer runs once."""
        conv_out = {id(n.out): n.op for n in self.hooks("layer_out") if n.out is not None}  # last writer
        uses, calls = self.uses(), self.layer_calls()
        pairs = []
        for n in self.hooks("bn_in"):
            tid = id(n.arg0)
            conv = conv_out.get(tid)
            if conv is not None and uses.get(tid, 0) == 1 and calls.get(conv, 0) == 1:
                pairs.append((conv, n.op))
        return pairs


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph):
        super().__init__()
        self.g = graph
        self.producer: dict[int, int] = {}  # id(tensor) -> the last call that output it

    def add(self, node: Node) -> Node:
        self.g.nodes.append(node)
        self.g.keep.extend(node.ins)
        self.g.keep.extend(node.outputs)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = list(tensors(args)) + list(tensors(kwargs))
        outs = list(tensors(out))
        if not ins and not outs:
            return out
        g = self.g
        op = op_name(func)
        node = self.add(Node(len(g.nodes), "call", op, args, kwargs, ins, [self.producer.get(id(x)) for x in ins],
                             outs, op in META_OPS))
        if op in WEIGHT_OPS and len(args) > 1 and isinstance(args[1], torch.Tensor):
            node.layer = g.weight_layers.get(id(args[1]))
        if outs:
            for p, x in zip(node.src, ins):
                if p is not None and id(x) not in g.param_ids:
                    g.nodes[p].consumers.append(node.idx)
            for t in outs:
                self.producer[id(t)] = node.idx
        return out


def record(model: nn.Module, example_input,
           layer_filter: Callable[[str, nn.Module], bool] = lambda n, m: is_weight_layer(m)) -> Graph:
    """Run ``model(example_input)`` once (no grad) and return its op graph. ``layer_filter`` picks the
    modules whose calls are recorded as ``layer_in`` / ``layer_out`` (default: the weight layers)."""
    g = Graph(param_ids={id(p) for p in model.parameters()} | {id(b) for b in model.buffers()})
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_MODULES):
            g.weight_layers[id(m.weight)] = name
            g.modules[name] = m
    rec = _Recorder(g)
    handles = []

    def hook_event(kind, name, x, out=None):
        ins = [x] if isinstance(x, torch.Tensor) else []
        outs = [out] if isinstance(out, torch.Tensor) else []
        rec.add(Node(len(g.nodes), kind, name, ins=ins, src=[rec.producer.get(id(t)) for t in ins], outputs=outs,
                     arg0=x))

    def pre(kind, name):
        def fn(module, args):
            hook_event(kind, name, args[0] if args else None)
        return fn

    def post(kind, name):
        def fn(module, args, out):
            hook_event(kind, name, args[0] if args else None, out)
        return fn

    def act_post(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor) and id(out) in rec.producer:
                g.nodes[rec.producer[id(out)]].module = name
        return fn

    for name, m in model.named_modules():
        if layer_filter(name, m):
            handles.append(m.register_forward_pre_hook(pre("layer_in", name)))
            handles.append(m.register_forward_hook(post("layer_out", name)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(pre("bn_in", name)))
            handles.append(m.register_forward_hook(post("bn_out", name)))
        if isinstance(m, ACT_MODULES):
            handles.append(m.register_forward_hook(act_post(name)))
    try:
        with torch.no_grad():
            for t in tensors(example_input):
                rec.add(Node(len(g.nodes), "input", "input", outputs=[t]))
            with rec:
                out = _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    for t in tensors(out):  # the model's output counts as one more reader
        if id(t) in rec.producer:
            g.nodes[rec.producer[id(t)]].consumers.append(-1)
    g.keep.append(out)
    return g
