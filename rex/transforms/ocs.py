"""Outlier channel splitting (Zhao et al., ICML 2019), weight splitting, function preserving.

For a layer y = W x, the input channel j holding the largest |w| is duplicated: column j is halved and a copy
of the halved column is appended, and the layer reads x_j twice: W' [x; x_j] = W x exactly (halving is exact
in binary floating point). Repeated ``ceil(expand_ratio * C_in)`` times (a channel may be split again),
the layer's weight range shrinks towards half of its outliers, at the cost of the extra input channels,
which appear in the MACs and BOPs of the layer.

Implementation: the layer is replaced by :class:`OCSSplit`, a module holding the index of the input
channels it reads (``index_select`` on dim 1, the duplicated channels appended) and the widened layer as
``.layer`` (a plain Conv1d/2d/3d / Linear, quantized by the engine like any other; its name gains ``.layer``).
Only dense layers are split (convolutions with groups == 1, Linear): splitting a depthwise channel would need a
new output channel and a sum behind the layer.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from ..nn.layers import CONVS
from .base import Context, Transform
from .modules import get_module, set_module


class OCSSplit(nn.Module):
    """Reads input channels ``index`` (originals then duplicates) and applies the widened ``layer``."""

    def __init__(self, layer: nn.Module, index: torch.Tensor, dim: int = 1):
        super().__init__()
        self.layer = layer
        self.dim = dim
        # decided here, not in forward: quantization replaces .layer by a QuantLayer, and a Linear's inputs
        # (a transformer's [batch, tokens, features]) are split along their last dimension whatever it wraps
        self.linear = isinstance(layer, nn.Linear)
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.__dict__.get("linear", isinstance(self.layer, nn.Linear))
        dim = x.dim() - 1 if linear else (self.dim if x.dim() > 1 else 0)
        return self.layer(torch.index_select(x, dim, self.index))

    def extra_repr(self) -> str:
        n = int(self.index.numel())
        return f"split={n - int(self.index.max()) - 1 if n else 0} of {int(self.index.max()) + 1 if n else 0} input channels"


def split_weight(w: torch.Tensor, n_split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``n_split`` times the input channel (dim 1) holding the largest |w|. Returns the widened weight
    and the input index (original channels 0..C_in-1 followed by the duplicated ones)."""
    w = w.detach().clone()
    cin = w.shape[1]
    colmax = w.abs().transpose(0, 1).reshape(cin, -1).amax(1)  # largest |w| per input channel
    src = list(range(cin))  # which original input channel every column reads
    extra = []  # the appended halves, in order
    for _ in range(n_split):
        j = int(torch.argmax(colmax))  # ties: the first channel
        col = (w[:, j] if j < cin else extra[j - cin]) * 0.5
        if j < cin:
            w[:, j] = col
        else:
            extra[j - cin] = col
        extra.append(col.clone())
        src.append(src[j])
        colmax[j] = colmax[j] * 0.5
        colmax = torch.cat([colmax, colmax[j:j + 1]])
    wide = torch.cat([w] + [c.unsqueeze(1) for c in extra], dim=1) if extra else w
    return wide, torch.tensor(src, dtype=torch.long)


def n_splits(cin: int, expand_ratio: float) -> int:
    return int(math.ceil(expand_ratio * cin - 1e-9)) if expand_ratio > 0 else 0


def ocs_split(model: nn.Module, expand_ratio: float = 0.02, names: Optional[list[str]] = None,
              stats: Optional[dict] = None, inplace: bool = True) -> dict[str, int]:
    """Split the input channels of every dense Conv1d/2d/3d / Linear (or of ``names``), in place unless
    ``inplace=False``. ``stats`` (folded BN output statistics keyed by layer name) is re-keyed to the new
    ``<name>.layer``. Returns {new layer name: number of channels added}."""
    if expand_ratio < 0:
        raise ValueError(f"expand_ratio must be >= 0, got {expand_ratio}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = []
    for name, m in model.named_modules():
        if names is not None and name not in names:
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, CONVS) and m.groups == 1):
            targets.append(name)
    done = {}
    for name in targets:
        m = get_module(model, name)
        cin = m.weight.shape[1]
        k = n_splits(cin, expand_ratio)
        if k == 0:
            continue
        w2, idx = split_weight(m.weight, k)
        new = copy.copy(m)  # same hyper-parameters and forward; new parameters below
        new._parameters = dict(m._parameters)
        new.weight = nn.Parameter(w2.to(m.weight.dtype), requires_grad=False)
        if isinstance(new, nn.Linear):
            new.in_features = w2.shape[1]
        else:
            new.in_channels = w2.shape[1]
        set_module(model, name, OCSSplit(new, idx))
        done[f"{name}.layer"] = k
        if stats is not None and name in stats:
            stats[f"{name}.layer"] = stats.pop(name)
    return done


class SplitOutlierChannels(Transform):
    """``ocs_split`` of every dense layer at ``expand_ratio``, ``ctx.stats`` re-keyed to the split layers."""

    name = "ocs_split"

    def __init__(self, expand_ratio: float = 0.02):
        self.expand_ratio = expand_ratio

    def apply(self, model: nn.Module, ctx: Context) -> dict:
        return dict(added=ocs_split(model, self.expand_ratio, stats=ctx.stats))
