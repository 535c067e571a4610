"""Residual expansion of order K (method.md §2) and its group-sparse version under a BOPs budget (§3).

    R(1) = Q_b(W),   R(k) = Q_b(W - sum_{j<k} R(j)),   W ~ sum_k R(k)

Each order has its own per-channel (or per-group) scale. With masks, order k is kept only for the selected output
channels (neurons); the residual of a neuron is always computed from what was actually kept, so a neuron
skipped at order k is a candidate again at order k+1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import math
import torch

from .errors import ConfigError
from .quant import QTensor, WeightQuantizer, check_finite


@dataclass
class ExpansionTerm:
    """One b-bit term of an expansion: integers q (C_out x ...), per-channel scale, channel mask."""

    qt: QTensor
    mask: torch.Tensor  # bool [C_out]; False rows are exactly zero

    @property
    def q(self) -> torch.Tensor:
        return self.qt.q

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    def dequantize(self) -> torch.Tensor:
        w = self.qt.dequantize()
        if bool(self.mask.all()):  # x * 1 == x: skip the pass
            return w
        return w * _rows(self.mask, w).to(w.dtype)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape([-1] + [1] * (like.dim() - 1))


def check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ConfigError(f"expansion order K must be an integer >= 1 (K=1 is plain quantization), got {order!r}")
    return order


def expand_terms(
    weight: torch.Tensor,
    quantizer: WeightQuantizer,
    order: int,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    name: str = "weight",
) -> list[ExpansionTerm]:
    """Expand ``weight`` into ``order`` terms. ``masks[k]`` (bool per output channel) restricts order k+1;
    order 1 is always dense. Rows outside the mask are set to exactly zero in that term."""
    check_order(order)
    check_finite(weight, name)
    w = weight.detach().to(torch.float32)
    c_out = w.shape[0]
    residual = w  # rebound below, never written in place
    terms: list[ExpansionTerm] = []
    for k in range(order):
        mask = None if masks is None or k == 0 else masks[k]
        mask = torch.ones(c_out, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        full = bool(mask.all())
        if k > 0 and not full and not mask.any():
            terms.append(ExpansionTerm(_zero_qtensor(w, quantizer.bits, getattr(quantizer, "group_size", None)), mask))
            continue
        # the scale of a sparse order is computed from the rows it keeps (per channel this changes nothing);
        # a full mask multiplies by one, skipped
        target = residual if full else residual * _rows(mask, residual).to(residual.dtype)
        qt = quantizer(target, name=f"{name} (order {k + 1})", check=False)  # checked once above
        if qt.zero_point is None and not full:
            qt.q = qt.q * _rows(mask, qt.q).to(qt.q.dtype)
        term = ExpansionTerm(qt, mask)
        if k + 1 < order:  # the last residual is never read
            residual = residual - term.dequantize()
        terms.append(term)
    return terms


def _zero_qtensor(w: torch.Tensor, bits: int, group_size: Optional[int] = None) -> QTensor:
    from .quant import int_dtype, n_groups

    scale = torch.zeros(w.shape[0]) if not group_size else torch.zeros(w.shape[0], n_groups(w[0].numel(), group_size))
    return QTensor(torch.zeros_like(w, dtype=int_dtype(bits)), scale, None, bits, group_size)


def expand(weight: torch.Tensor, bits: int, order: int, granularity: str = "per_channel",
           group_size: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The bare expansion of one tensor: ``[(q_k int tensor, s_k scale), ...]`` with
    ``weight ~ sum_k s_k[:, None, ...] * q_k`` (per channel; per group, s_k is [C_out, G] and applies to
    ``group_size`` consecutive inputs of a row). Symmetric round-to-nearest operator."""
    quantizer = WeightQuantizer(bits, symmetric=True, granularity=granularity, group_size=group_size)
    return [(t.qt.q, t.qt.channel_scale(weight.shape[0])) for t in expand_terms(weight, quantizer, order)]


def reconstruct(terms: Sequence[ExpansionTerm]) -> torch.Tensor:
    """W(K) = sum of the dequantized terms."""
    out = terms[0].dequantize()
    for t in terms[1:]:
        out = out + t.dequantize()
    return out


def error_bound(weight: torch.Tensor, bits: int, order: int, group_size: Optional[int] = None) -> torch.Tensor:
    """Per-channel bound of method.md §2: ||W_i - W(K)_i||_inf <= (s_i/2) (2^b - 2)^-(K-1), s_i the order-1
    symmetric scale. Holds for the symmetric round-to-nearest operator with dense expansion. With
    ``group_size`` the same argument holds group by group (every order re-quantizes each group with its own
    scale, so |E_g(k)| <= s_g(k)/2 and s_g(k+1) <= s_g(k) / (2 qmax)): a [C_out, G] bound per group."""
    from .quant import group_symmetric_scale, symmetric_scale

    w = weight.detach().float()
    s1 = group_symmetric_scale(w, bits, group_size) if group_size else symmetric_scale(w, bits, 0)
    return (s1 / 2) * float(2**bits - 2) ** (-(order - 1))


def group_max_error(weight: torch.Tensor, approx: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """max |W - W(K)| per row ([C_out]) or, with ``group_size``, per (row, group) ([C_out, G])."""
    from .quant import to_groups

    e = (weight.detach().float() - approx).abs_()
    return to_groups(e, group_size).amax(-1) if group_size else e.flatten(1).amax(1)


def residual_norms(terms: Sequence[ExpansionTerm], weight: torch.Tensor) -> torch.Tensor:
    """[K+1, C_out] squared L2 norms of the residual after 0..K terms (row 0 is ||W_i||^2)."""
    w = weight.detach().float()
    rows = [w.flatten(1).pow(2).sum(1)]
    residual = w.clone()
    for t in terms:
        residual = residual - t.dequantize()
        rows.append(residual.flatten(1).pow(2).sum(1))
    return torch.stack(rows)


def masks_from_norms(norms: torch.Tensor, counts: Sequence[int], criterion: str = "residual") -> list[Optional[torch.Tensor]]:
    """The masks ``select_masks`` chooses, from the [K+1, C] residual norms of the DENSE expansion
    (``residual_norms``). Valid for an operator that quantizes each output channel on its own (per-channel
    scales): a channel's residual after its j kept terms is then its dense residual after j terms."""
    if criterion not in ("residual", "weight"):
        raise ConfigError(f"expansion criterion must be 'residual' or 'weight', got {criterion!r}")
    order, c_out = norms.shape[0] - 1, norms.shape[1]
    kept = torch.ones(c_out, dtype=torch.long)  # order 1 is dense
    masks: list[Optional[torch.Tensor]] = [None]
    for k in range(2, order + 1):
        n = int(counts[k - 2]) if k - 2 < len(counts) else 0
        score = norms.gather(0, kept[None])[0] if criterion == "residual" else norms[0]
        mask = torch.zeros(c_out, dtype=torch.bool)
        if n > 0:
            mask[torch.topk(score, min(n, c_out)).indices] = True
        masks.append(mask)
        kept = kept + mask.long()
    return masks


def sparse_from_dense(dense: Sequence[ExpansionTerm], masks: Sequence[Optional[torch.Tensor]]) -> list[ExpansionTerm]:
    """The group-sparse expansion (``expand_terms(w, q, K, masks)``) assembled from the dense one without
    quantizing again: with per-channel symmetric scales, the term order k adds to channel c is c's (n_c+1)-th
    dense term, n_c the number of terms c kept before order k. Rows outside a mask are exactly zero (q = 0,
    s = 0), as in ``expand_terms``."""
    if any(t.qt.zero_point is not None or t.qt.scale.dim() == 0 for t in dense):
        raise ValueError("sparse_from_dense needs a per-channel (or per-group) symmetric expansion")
    c_out = dense[0].qt.q.shape[0]
    qs = torch.stack([t.qt.q for t in dense])          # [K, C, ...]
    ss = torch.stack([t.qt.scale for t in dense])      # [K, C]
    rows = torch.arange(c_out)
    kept = torch.zeros(c_out, dtype=torch.long)
    out = []
    for k in range(len(dense)):
        mask = torch.ones(c_out, dtype=torch.bool) if k == 0 or masks[k] is None else masks[k].to(torch.bool)
        idx = kept.clamp(max=len(dense) - 1)
        q = qs[idx, rows] * _rows(mask, qs[0]).to(qs.dtype)
        s = ss[idx, rows] * _rows(mask, ss[0]).to(ss.dtype)
        out.append(ExpansionTerm(QTensor(q, s, None, dense[k].qt.bits, dense[k].qt.group_size), mask))
        kept = kept + mask.long()
    return out


# --------------------------------------------------------------------------------------------------
# budget allocation
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerCost:
    """What the allocator needs to know about one expandable layer."""

    name: str
    macs: int  # per sample
    wbits: int
    abits: int  # 32 when the layer's input is not quantized
    channels: int
    order: int  # maximum order allowed for this layer (1 = never expanded)
    gains: Optional[torch.Tensor] = None  # [order-1, C] error reduction of extra terms 2..order (greedy)

    @property
    def term_bops(self) -> int:
        """BOPs of one dense term."""
        return self.macs * self.wbits * self.abits

    def channel_bops(self) -> float:
        return self.term_bops / self.channels


def plain_bops(layers: Sequence[LayerCost]) -> int:
    return sum(l.term_bops for l in layers)


def budget_to_extra_bops(layers: Sequence[LayerCost], budget: float | int) -> float:
    """Budget as a ratio (<= 64, relative to the plain model: 1.5 = half an extra order) or absolute BOPs."""
    base = plain_bops(layers)
    if budget is None:
        return math.inf
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 (a ratio of the plain W_b/A_a BOPs, 1 = plain quantization) or an absolute BOPs number, got {budget!r}")
    total = budget * base if budget <= 64 else float(budget)
    if total < base:
        raise ConfigError(
            f"budget of {budget:.4g} BOPs is below the plain quantized model's {base:.4g} BOPs: unreachable; "
            "give a ratio >= 1 or a larger absolute number"
        )
    return total - base


def allocate_uniform(layers: Sequence[LayerCost], budget: float | None, order: int) -> dict[str, list[int]]:
    """The paper's allocation: the same density gamma at every order k >= 2 in every expandable layer,
    gamma = (B - 1) / (K - 1) for a ratio budget B (capped at 1). Channel counts are floored, so the budget
    is met from below. Returns {layer: [n_channels at order 2, ..., order K]}."""
    expandable = [l for l in layers if l.order > 1]
    if budget is None:
        return {l.name: [l.channels] * (l.order - 1) for l in expandable}
    extra = budget_to_extra_bops(layers, budget)
    extra_dense = sum(l.term_bops * (l.order - 1) for l in expandable)
    if not expandable or extra_dense == 0:
        return {}
    gamma = min(1.0, extra / extra_dense)
    counts = {l.name: [int(math.floor(gamma * l.channels + 1e-9))] * (l.order - 1) for l in expandable}
    # floor can only undershoot; the float guard above never overshoots the ratio
    return counts


def allocate_greedy(layers: Sequence[LayerCost], budget: float | None, order: int) -> dict[str, list[int]]:
    """Beyond the paper: pick (layer, neuron, next term) units by largest error reduction per BOP until the
    budget is spent. A neuron's j-th extra term is only taken after its (j-1)-th (gains are made
    non-increasing along a neuron's terms). Returns per-layer channel counts per order; which channels
    is decided afterwards by the residual-norm criterion, which keeps the chosen neurons."""
    expandable = [l for l in layers if l.order > 1]
    if budget is None:
        return {l.name: [l.channels] * (l.order - 1) for l in expandable}
    extra = budget_to_extra_bops(layers, budget)
    ratios, costs, owners, terms = [], [], [], []
    for li, l in enumerate(expandable):
        g = l.gains  # [order-1, C]
        if g is None:
            raise ValueError(f"greedy allocation needs gains for layer {l.name}")
        g = torch.cummin(g.clamp(min=0), dim=0).values  # a later term never looks better than an earlier one
        c = l.channel_bops()
        ratios.append((g / c).flatten())
        costs.append(torch.full((g.numel(),), c, dtype=torch.float64))
        owners.append(torch.full((g.numel(),), li, dtype=torch.long))
        terms.append(torch.arange(g.shape[0]).repeat_interleave(g.shape[1]))
    if not ratios:
        return {}
    ratio = torch.cat(ratios).double()
    cost = torch.cat(costs)
    owner = torch.cat(owners)
    term = torch.cat(terms)
    # stable sort: ties go to the earlier term, so chains stay consistent
    order_idx = torch.argsort(-ratio, stable=True)
    cum = torch.cumsum(cost[order_idx], 0)
    take = order_idx[cum <= extra * (1 + 1e-12)]
    counts = {l.name: [0] * (l.order - 1) for l in expandable}
    if take.numel():
        pairs = torch.stack([owner[take], term[take]], 1)
        uniq, n = torch.unique(pairs, dim=0, return_counts=True)
        for (li, k), c in zip(uniq.tolist(), n.tolist()):
            counts[expandable[li].name][k] = c
    # enforce monotone counts across orders (a term j+1 implies term j for that neuron)
    for name, cs in counts.items():
        for k in range(1, len(cs)):
            cs[k] = min(cs[k], cs[k - 1])
    return counts


def select_masks(
    weight: torch.Tensor, quantizer: WeightQuantizer, order: int, counts: Sequence[int], criterion: str = "residual"
) -> list[Optional[torch.Tensor]]:
    """Masks for orders 2..K: at each order, the ``counts[k-2]`` neurons with the largest current residual
    norm (``criterion='residual'``, method.md §3) or weight norm (``'weight'``), residuals computed from
    what was actually kept so far."""
    if criterion not in ("residual", "weight"):
        raise ConfigError(f"expansion criterion must be 'residual' or 'weight', got {criterion!r}")
    w = weight.detach().float()
    c_out = w.shape[0]
    masks: list[Optional[torch.Tensor]] = [None]
    residual = w - quantizer(w, check=False).dequantize()
    wnorm = w.flatten(1).norm(dim=1)
    for k in range(2, order + 1):
        n = int(counts[k - 2]) if k - 2 < len(counts) else 0
        score = residual.flatten(1).norm(dim=1) if criterion == "residual" else wnorm
        mask = torch.zeros(c_out, dtype=torch.bool)
        if n > 0:
            mask[torch.topk(score, min(n, c_out)).indices] = True
        masks.append(mask)
        if mask.any():
            target = residual * _rows(mask, residual)
            residual = residual - quantizer(target, check=False).dequantize() * _rows(mask, residual)
    return masks
