"""The error bound of method.md §2 and the budgeted expansion of §3."""
import pytest
import torch
from torch import nn

import rex
from rex.expansion import (
    LayerCost,
    allocate_greedy,
    allocate_uniform,
    error_bound,
    expand_terms,
    masks_from_norms,
    plain_bops,
    reconstruct,
    residual_norms,
    select_masks,
    sparse_from_dense,
)
from rex.quant import WeightQuantizer


def _weights(model):
    return [(n, m.weight.detach()) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_bound_holds_on_every_layer_of_real_mobilenet_v2(mobilenet_v2, bits):
    layers = _weights(mobilenet_v2)
    assert len(layers) == 53
    q = WeightQuantizer(bits)
    for name, w in layers:
        terms = expand_terms(w, q, 4)
        # float32 arithmetic: allow a few ulps of the row's largest weight on top of the exact bound
        ulps = 4 * torch.finfo(torch.float32).eps * w.flatten(1).abs().amax(1)
        for K in range(1, 5):
            err = (w - reconstruct(terms[:K])).flatten(1).abs().amax(1)
            bound = error_bound(w, bits, K)
            assert (err <= bound + ulps).all(), f"{name} b={bits} K={K}: {float((err - bound).max())}"


def test_error_shrinks_by_about_2b_minus_2_per_order(mobilenet_v2):
    _, w = _weights(mobilenet_v2)[10]
    for bits in (3, 4, 6):
        terms = expand_terms(w, WeightQuantizer(bits), 4)
        errs = [float((w - reconstruct(terms[:k])).abs().max()) for k in range(1, 5)]
        ratios = [errs[k] / errs[k + 1] for k in range(3)]
        # worst-case factor is 2^b - 2; the measured max error follows it within a factor of ~2
        for r in ratios:
            assert (2**bits - 2) / 2.5 <= r <= (2**bits - 2) * 2.5, (bits, ratios)


def test_bare_expand_api_returns_integer_terms():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    terms = rex.expand(w, bits=4, order=3)
    assert len(terms) == 3
    recon = torch.zeros_like(w)
    for q, s in terms:
        assert not q.is_floating_point()
        assert int(q.abs().max()) <= 7
        assert s.shape == (8,)
        recon += q.float() * s.view(-1, 1, 1, 1)
    assert (recon - w).abs().max() <= error_bound(w, 4, 3).max() + 1e-7


def test_sparse_terms_keep_unselected_rows_exactly_zero_and_carry_residual():
    torch.manual_seed(0)
    w = torch.randn(10, 16)
    q = WeightQuantizer(4)
    masks = select_masks(w, q, 3, [3, 3])
    terms = expand_terms(w, q, 3, masks)
    assert int(masks[1].sum()) == 3 and int(masks[2].sum()) == 3
    assert torch.equal(terms[1].dequantize()[~masks[1]], torch.zeros_like(w[~masks[1]]))
    # the order-3 choice is made on the residual actually kept: expanded rows shrink ~14x, so order 3
    # picks neurons that order 2 skipped
    assert not torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("criterion", ["residual", "weight"])
@pytest.mark.parametrize("counts", [[3, 3, 2], [7, 2, 2], [0, 0, 0], [10, 10, 10]])
def test_sparse_expansion_from_dense_equals_requantizing(criterion, counts):
    """The engine's fast path (one dense expansion, then masks and terms gathered from it) must give exactly
    the terms of select_masks + expand_terms(masks), non-nested masks included."""
    torch.manual_seed(1)
    w = torch.randn(10, 4, 3, 3) * torch.rand(10, 1, 1, 1) * 3
    q = WeightQuantizer(4)
    ref_masks = select_masks(w, q, 4, counts, criterion)
    ref = expand_terms(w, q, 4, ref_masks)
    dense = expand_terms(w, q, 4)
    masks = masks_from_norms(residual_norms(dense, w), counts, criterion)
    fast = sparse_from_dense(dense, masks)
    for k in range(1, 4):
        assert torch.equal(masks[k], ref_masks[k])
    for a, b in zip(fast, ref):
        assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.qt.q.to(torch.int32), b.qt.q.to(torch.int32))


def _costs(order=3):
    return [LayerCost("a", macs=1000, wbits=4, abits=8, channels=10, order=order),
            LayerCost("b", macs=3000, wbits=4, abits=8, channels=30, order=order),
            LayerCost("head", macs=500, wbits=8, abits=8, channels=5, order=1)]


@pytest.mark.parametrize("budget", [1.0, 1.1, 1.25, 1.5, 2.0, 3.0])
def test_uniform_budget_met_from_below(budget):
    costs = _costs()
    counts = allocate_uniform(costs, budget, 3)
    base = plain_bops(costs)
    spent = sum(c.term_bops / c.channels * sum(counts.get(c.name, [])) for c in costs)
    assert base + spent <= budget * base + 1e-6
    # and uses it: less than one channel's cost per (layer, order) left over
    slack = budget * base - base - spent
    assert slack <= sum(c.term_bops / c.channels for c in costs if c.order > 1) * 2 + 1e-6 or budget >= 2.5


def test_budget_below_one_or_unreachable_is_an_error():
    with pytest.raises(rex.ConfigError, match=">= 1"):
        allocate_uniform(_costs(), 0.5, 3)
    with pytest.raises(rex.ConfigError, match="unreachable"):
        allocate_uniform(_costs(), 100.0, 3)  # absolute BOPs far below the plain model


def test_greedy_budget_met_from_below_and_prefers_large_gain():
    costs = _costs()
    costs[0].gains = torch.full((2, 10), 1.0)  # layer a: big error reduction
    costs[1].gains = torch.full((2, 30), 0.001)
    counts = allocate_greedy(costs, 1.3, 3)
    base = plain_bops(costs)
    spent = sum(c.term_bops / c.channels * sum(counts.get(c.name, [])) for c in costs)
    assert base + spent <= 1.3 * base + 1e-6
    # extra = 0.3 * 160000 = 48000 BOPs; a channel of layer a costs 3200: 10 at order 2, 5 at order 3
    assert counts == {"a": [10, 5], "b": [0, 0]}
