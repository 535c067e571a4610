"""Transforms as objects with one signature: ``apply(model, ctx) -> summary``, composable by a method.

A method passes a list of transforms to the engine (``quantize_model(..., transforms=[...])``); the engine runs
BatchNorm folding first (``FoldBatchNorm``, when ``spec.fold_bn``), then each transform in order on the same
copy of the model, then quantizes, then gives every transform its ``after_quantize`` turn (bias correction
corrects the quantized layers there). What transforms share lives in the ``Context``, not in closures:

- ``stats``: per layer, the per-channel (mean, std) of its output (the folded BatchNorm's beta, gamma). Every
  transform that rescales, shifts or renames a layer keeps it in step; the data-free ranges and the bias
  correction moments are built from it.
- ``graph(model)``: the recorded op graph (``rex.graph``) of the model as it is now; recorded on first use
  and dropped after every transform that changes the model (``reads_only = False``), so a rule never reads a
  stale graph and an unchanged model is not recorded twice.
- ``pairs``: the equalization pairs (found by ``Equalize``, used by ``AbsorbHighBias``).
- ``info[name]``: each transform's summary (plus ``seconds``), attached to the result as ``rex_info.transforms``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..graph import Graph, record


@dataclass
class Context:
    example_input: Any
    stats: dict = field(default_factory=dict)  # layer -> (beta [C], gamma [C]): its output's mean and std
    folded: list = field(default_factory=list)  # (conv, bn) pairs folded
    pairs: Optional[list] = None  # equalization pairs (rex.transforms.equalize.Pair)
    info: dict = field(default_factory=dict)  # transform name -> summary
    layer_filter: Optional[Callable[[str, nn.Module], bool]] = None  # the weight layers to record (default: graph's)
    _graph: Optional[Graph] = None

    def graph(self, model: nn.Module) -> Graph:
        """The op graph of ``model`` as it is now (recorded once until the model changes)."""
        if self._graph is None:
            kw = {} if self.layer_filter is None else {"layer_filter": self.layer_filter}
            self._graph = record(model, self.example_input, **kw)
        return self._graph

    def invalidate(self) -> None:
        self._graph = None


class Transform:
    """A model rewrite before quantization (in place, on the engine's copy). ``apply`` returns a summary dict;
    ``after_quantize`` may act on the quantized model and returns more of it."""

    name: str = "transform"
    reads_only: bool = False  # True: ``apply`` leaves the model unchanged (its recorded graph stays valid)

    def apply(self, model: nn.Module, ctx: Context) -> dict:
        raise NotImplementedError

    def after_quantize(self, qmodel: nn.Module, ctx: Context) -> dict:
        return {}


def run_transforms(model: nn.Module, transforms: Sequence[Transform], ctx: Context) -> None:
    """Apply ``transforms`` in order, recording each summary (and its wall time) in ``ctx.info``."""
    for t in transforms:
        t0 = time.perf_counter()
        summary = dict(t.apply(model, ctx) or {})
        summary["seconds"] = time.perf_counter() - t0
        ctx.info[t.name] = summary
        if not t.reads_only:
            ctx.invalidate()


def finish_transforms(qmodel: nn.Module, transforms: Sequence[Transform], ctx: Context) -> None:
    for t in transforms:
        more = t.after_quantize(qmodel, ctx)
        if more:
            ctx.info.setdefault(t.name, {}).update(more)
