"""BatchNorm folding: W' = W * gamma/sqrt(var+eps), b' = (b - mu) * gamma/sqrt(var+eps) + beta.

Pairs are found over the recorded op graph (``rex.graph``: a BN whose input is the output of a conv that nothing else
reads), so it works on any eager model (torchvision, mmdet ConvModule, hand-written nets). The BN becomes
``nn.Identity``. The BN's affine parameters (beta, gamma) are returned per folded conv: they are the
per-channel mean and std of that conv's output, which data-free activation ranges are built from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..graph import record
from ..nn.layers import CONVS
from .base import Context, Transform
from .modules import get_module, set_module


@dataclass
class FoldResult:
    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    output_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def fold_conv_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``conv`` in place (float64 arithmetic, then back to the conv's dtype)."""
    w = conv.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    inv = gamma / torch.sqrt(var + bn.eps)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    shape = [-1] + [1] * (w.dim() - 1)
    conv.weight = nn.Parameter((w * inv.reshape(shape)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(((b - mean) * inv + beta).to(conv.weight.dtype), requires_grad=False)


def fold_batchnorm(model: nn.Module, example_input, inplace: bool = False, trace_result=None,
                   graph=None) -> FoldResult:
    """Fold every BN that directly follows a Conv1d / Conv2d / Conv3d (BatchNorm1d / 2d / 3d: the same
    per-output-channel arithmetic whatever the rank). Returns the new model and the folded pairs.
    ``trace_result`` (a ``rex.trace.trace``) or ``graph`` (a ``rex.graph.record``) of this very model saves
    the recording pass."""
    import copy

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if trace_result is not None:
        pairs = trace_result.conv_bn
    else:
        pairs = (graph if graph is not None else record(model, example_input)).conv_bn_pairs()
    out = FoldResult(model)
    for conv_name, bn_name in pairs:
        conv, bn = get_module(model, conv_name), get_module(model, bn_name)
        if not isinstance(conv, CONVS) or bn.running_mean is None or bn.num_features != conv.out_channels:
            continue
        gamma = bn.weight.detach().clone() if bn.weight is not None else torch.ones(bn.num_features)
        beta = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(bn.num_features)
        fold_conv_bn(conv, bn)
        set_module(model, bn_name, nn.Identity())
        out.folded.append((conv_name, bn_name))
        out.output_stats[conv_name] = (beta.float(), gamma.float())
    return out


class FoldBatchNorm(Transform):
    """Fold every BN that directly follows a Conv1d / 2d / 3d (in place); ``ctx.stats`` gets each folded conv's output
    statistics (the BN's beta, gamma), ``ctx.folded`` the pairs. The engine runs it first when ``spec.fold_bn``."""

    name = "fold_bn"

    def apply(self, model: nn.Module, ctx: Context) -> dict:
        fr = fold_batchnorm(model, ctx.example_input, inplace=True, graph=ctx.graph(model))
        ctx.stats.update(fr.output_stats)
        ctx.folded.extend(fr.folded)
        return dict(folded=list(fr.folded))

