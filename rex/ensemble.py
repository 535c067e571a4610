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
from torch import nn

from .nn.layers import QuantLayer


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


class EnsembleModel(nn.Module):
    """Runs the members of an expanded model one after the other and combines their outputs.

    ``forward`` shares one set of integer weights: members differ only by which terms each layer applies.
    ``member_models()`` materialises independent copies (for other processes / devices)."""

    def __init__(self, qmodel: nn.Module):
        super().__init__()
        self.qmodel = qmodel
        self.order = max_order(qmodel)
        self.members = members(self.order)

    def forward(self, x):
        out = None
        for terms, coef in self.members:
            with active_terms(self.qmodel, terms):
                y = self.qmodel(x)
            out = coef * y if out is None else out + coef * y
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
