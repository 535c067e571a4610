"""Ensemble approximation of an expanded network (method.md §5), form E2: independent members.

Member m >= 2 is the network whose layers use the two terms R(1) + R(m); the base member uses R(1) alone.

    f  ~  sum_{m=2..K} f_{R(1)+R(m)}  -  (K - 2) f_{R(1)}

Each member runs b-bit kernels only and needs nothing from the others until the output, so members can
run on different devices or processes. Exact for K = 2 and for a single layer; first-order exact in the
residuals for any K (the dropped terms are cross products of different orders across layers). It needs
a base member that is already a fair approximation: at W4 and above it tracks the exact expansion; at
ternary/W3 the base member collapses and the ensemble with it (see ``deviation``), where the exact
expansion should be used instead.

Why E2 rather than E1 (tangent members): E1 members read the base member's activations at every layer,
so they run in lock step and buy no independence; E2 is the form that actually parallelises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .nn.layers import CONVS, QuantLayer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by spatial rank


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def max_order(model: nn.Module) -> int:
    return max((l.order for l in quant_layers(model)), default=1)


def members(order: int) -> list[tuple[list[int], float]]:
    """(terms, coefficient) of each member for an expansion of order K."""
    if order <= 1:
        return [([0], 1.0)]
    out = [([0, m], 1.0) for m in range(1, order)]
    if order > 2:
        out.append(([0], -(order - 2.0)))
    return out


@contextmanager
def active_terms(model: nn.Module, terms: list[int]) -> Iterator[None]:
    layers = quant_layers(model)
    for l in layers:
        l.set_active_terms(terms)
    try:
        yield
    finally:
        for l in layers:
            l.set_active_terms(None)


def _member_weights(layer: QuantLayer, member_terms: list[list[int]]) -> list[torch.Tensor]:
    """Each member's weight for ``layer``, in the wrapped module's own layout."""
    return [layer.inner_layout(layer.dequantized_weight([k for k in t if k < layer.order])) for t in member_terms]


class EnsembleModel(nn.Module):
    """Runs the members of an expanded model one after the other and combines their outputs.

    ``forward`` shares the model: each member's weights are built once (a layer of order 1 shares one tensor)
    and swapped in by reference. ``member_models()`` materialises independent copies (for other processes /
    devices); ``BatchedEnsemble`` runs all members in one forward pass."""

    def __init__(self, qmodel: nn.Module):
        super().__init__()
        self.qmodel = qmodel
        self.order = max_order(qmodel)
        self.members = members(self.order)
        self._weights = None

    def _member_weight_sets(self) -> list[list[tuple[QuantLayer, torch.Tensor]]]:
        if self._weights is None:
            layers = quant_layers(self.qmodel)
            per_layer = [_member_weights(l, [t for t, _ in self.members]) for l in layers]
            self._weights = [[(l, nn.Parameter(ws[i], requires_grad=False)) for l, ws in zip(layers, per_layer)]
                             for i in range(len(self.members))]
        return self._weights

    def forward(self, x):
        out = None
        sets = self._member_weight_sets()
        saved = [(l, l.inner.weight) for l, _ in sets[0]]
        try:
            for (terms, coef), ws in zip(self.members, sets):
                for l, w in ws:
                    l.inner.weight = w
                y = self.qmodel(x)
                out = coef * y if out is None else out + coef * y
        finally:
            for l, w in saved:
                l.inner.weight = w
        return out

    def member_models(self) -> list[tuple[nn.Module, float]]:
        import copy

        res = []
        for terms, coef in self.members:
            m = copy.deepcopy(self.qmodel)
            for l in quant_layers(m):
                l.set_active_terms(terms)
            res.append((m, coef))
        return res

    def bops(self, example_input) -> int:
        """Sum of the members' BOPs (each member pays for its own R(1))."""
        from .cost import bops

        total = 0
        for terms, coef in self.members:
            with active_terms(self.qmodel, terms):
                total += bops(self.qmodel, example_input)
        return total


@torch.no_grad()
def deviation(qmodel: nn.Module, x: torch.Tensor) -> dict:
    """How far the ensemble is from the exact expansion on inputs ``x``."""
    exact = qmodel(x)
    ens = EnsembleModel(qmodel)(x)
    base_only = None
    with active_terms(qmodel, [0]):
        base_only = qmodel(x)
    diff = (ens - exact).abs()
    scale = exact.abs().max().clamp(min=1e-12)
    out = dict(
        order=max_order(qmodel),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        rel_max=float(diff.max() / scale),
        base_rel_max=float((base_only - exact).abs().max() / scale),
    )
    if exact.dim() == 2:
        out["agreement"] = float((ens.argmax(1) == exact.argmax(1)).float().mean() * 100)
        out["base_agreement"] = float((base_only.argmax(1) == exact.argmax(1)).float().mean() * 100)
    return out


class _MembersLayer(nn.Module):
    """A ``QuantLayer`` applied to all M members at once. The activations of the members are stacked along
    the batch dimension ([M*B, ...], member-major); a convolution runs as ONE grouped convolution (M x groups
    groups, the members' weights stacked along output channels), a linear layer as one batched matmul."""

    def __init__(self, layer: QuantLayer, member_terms: list[list[int]]):
        super().__init__()
        self.layer = layer
        self.m = len(member_terms)
        self.register_buffer("w", torch.stack(_member_weights(layer, member_terms)))  # [M, C_out, ...]
        inner = layer.inner
        # a conv subclass with its own forward (same-padding convs of other zoos) or a non-zero padding
        # mode cannot be expressed as one grouped conv: run it member by member (still one model pass)
        base = next((c for c in CONVS if isinstance(inner, c)), None)
        self.grouped = base is not None and type(inner).forward is base.forward and inner.padding_mode == "zeros"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.act is not None:
            x = self.layer.act(x, scratch=True)  # read only by this layer's convolutions below
        m, inner = self.m, self.layer.inner
        b = x.shape[0] // m
        bias = inner.bias
        if isinstance(inner, nn.Linear):
            xs = x.reshape(m, -1, x.shape[-1])  # [M, B*..., F]
            y = torch.bmm(xs, self.w.transpose(1, 2))
            if bias is not None:
                y = y + bias
            return y.reshape(x.shape[0], *x.shape[1:-1], -1)
        if not self.grouped:
            from torch.func import functional_call

            ys = [functional_call(inner, {"weight": self.w[i], **({"bias": bias} if bias is not None else {})},
                                  (x[i * b:(i + 1) * b],)) for i in range(m)]
            return torch.cat(ys, 0)
        c_in, hw = x.shape[1], x.shape[2:]
        xs = x.reshape(m, b, c_in, *hw).transpose(0, 1).reshape(b, m * c_in, *hw)
        w = self.w.reshape(m * self.w.shape[1], *self.w.shape[2:])
        conv = _CONV_FN[len(hw)]  # F.conv1d / conv2d / conv3d
        y = conv(xs, w, None if bias is None else bias.repeat(m), inner.stride, inner.padding, inner.dilation,
                 inner.groups * m)
        c_out = self.w.shape[1]
        return y.reshape(b, m, c_out, *y.shape[2:]).transpose(0, 1).reshape(m * b, c_out, *y.shape[2:])


class BatchedEnsemble(nn.Module):
    """All members of the ensemble in ONE forward pass on one device: the input is repeated once per member
    along the batch dimension and every quantized layer runs the M members as one grouped convolution (or
    batched matmul). Same result as ``EnsembleModel``; what it buys is fewer, larger kernels (a GPU's case).
    Works for models whose non-quantized ops treat the batch dimension independently (pooling, flatten(x, 1),
    adds, activations): torchvision classifiers and the small nets here."""

    def __init__(self, qmodel: nn.Module):
        super().__init__()
        import copy

        from .transforms import set_module

        self.order = max_order(qmodel)
        self.members = members(self.order)
        self.model = copy.deepcopy(qmodel)
        terms = [t for t, _ in self.members]
        for name, layer in [(n, l) for n, l in self.model.named_modules() if isinstance(l, QuantLayer)]:
            set_module(self.model, name, _MembersLayer(layer, terms))
        self.register_buffer("coefs", torch.tensor([c for _, c in self.members]))

    def forward(self, x):
        m, b = len(self.members), x.shape[0]
        y = self.model(x.repeat(m, *([1] * (x.dim() - 1))))
        y = y.reshape(m, b, *y.shape[1:])
        return (self.coefs.to(y.dtype).reshape(m, *([1] * (y.dim() - 1))) * y).sum(0)


_POOL_STATE: dict = {}


def _member_worker(i: int) -> torch.Tensor:
    st = _POOL_STATE
    torch.set_num_threads(st["threads"])
    model, x, bs = st["models"][i], st["x"], st["batch_size"]
    with torch.no_grad():
        return torch.cat([model(x[j:j + bs]) for j in range(0, len(x), bs)])


def run_members_in_processes(qmodel: nn.Module, x: torch.Tensor, batch_size: int = 50, threads: int = 1,
                             member_models: list | None = None) -> torch.Tensor:
    """The ensemble with each member in its own process (fork: the members' weights and ``x`` are inherited,
    not copied), every process evaluating all of ``x`` with ``threads`` torch threads; the parent combines the
    outputs. Process start-up is part of the cost (the caller times this call)."""
    import multiprocessing as mp

    models = member_models if member_models is not None else EnsembleModel(qmodel).member_models()
    _POOL_STATE.update(models=[m for m, _ in models], x=x, batch_size=batch_size, threads=threads)
    try:
        with mp.get_context("fork").Pool(len(models)) as pool:
            outs = pool.map(_member_worker, range(len(models)))
    finally:
        _POOL_STATE.clear()
    out = None
    for (_, coef), y in zip(models, outs):
        out = coef * y if out is None else out + coef * y
    return out
