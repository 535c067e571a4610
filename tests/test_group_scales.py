"""Group-wise weight scales (granularity='per_group', group_size along a row's inputs; issue 14 item 2):
the quantizer, REx's residual orders re-quantized per group, sparse orders per output neuron, integer
mode, validation, and the per-group error bound of method.md §2."""
import pytest
import torch
from torch import nn

import rex
from rex.errors import ConfigError
from rex.expansion import error_bound, expand_terms, group_max_error, reconstruct
from rex.quant import WeightQuantizer, to_groups


def _w(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[1, :5] *= 20  # outliers in one group of one row: the case group scales exist for
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(8, 48), (6, 4, 3, 3)])
def test_group_size_equal_to_fan_in_is_per_channel_exactly(symmetric, shape):
    w = _w(*shape)
    w[3] = 0  # an all-zero row stays exactly zero in both
    fan = w[0].numel()
    for order in (1, 3):
        a = expand_terms(w, WeightQuantizer(4, symmetric, "per_channel"), order)
        b = expand_terms(w, WeightQuantizer(4, symmetric, "per_group", group_size=fan), order)
        for ta, tb in zip(a, b):
            assert torch.equal(ta.q, tb.q)
            assert torch.equal(ta.qt.scale, tb.qt.scale[:, 0])
        assert torch.equal(reconstruct(a), reconstruct(b))


@pytest.mark.parametrize("group_size", [16, 10])  # 10 leaves a ragged last group of 8 (48 = 4 x 10 + 8)
def test_each_group_has_its_own_scale_and_ragged_last_group(group_size):
    w = _w(8, 48)
    qt = WeightQuantizer(4, True, "per_group", group_size=group_size)(w)
    groups = -(-48 // group_size)
    assert qt.scale.shape == (8, groups)
    assert torch.allclose(qt.scale, to_groups(w, group_size).abs().amax(-1) / 7)
    if 48 % group_size:  # the last group's scale comes from its own 8 inputs only
        assert torch.allclose(qt.scale[:, -1], w[:, -(48 % group_size):].abs().amax(1) / 7)
    e = (qt.dequantize() - w).abs()
    assert (e <= qt.full_scale() / 2 + 1e-6).all()  # half a step of the element's own group


@pytest.mark.parametrize("bits,group_size", [(4, 16), (3, 10), (2, 12)])
def test_expansion_error_bound_holds_per_group(bits, group_size):
    w = _w(16, 48, seed=bits)
    for order in (1, 2, 3):
        terms = expand_terms(w, WeightQuantizer(bits, True, "per_group", group_size=group_size), order)
        err = group_max_error(w, reconstruct(terms), group_size)
        bound = error_bound(w, bits, order, group_size)
        assert err.shape == bound.shape == (16, -(-48 // group_size))
        assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    # the bound per group is much tighter than per channel where a group holds the outliers
    assert float(error_bound(w, bits, 1, group_size)[1, 1:].max()) < float(error_bound(w, bits, 1)[1]) / 5


def test_group_scales_beat_channel_scales_with_outliers():
    w = _w(16, 64)
    pc = (WeightQuantizer(4)(w).dequantize() - w).pow(2).sum()
    pg = (WeightQuantizer(4, True, "per_group", group_size=16)(w).dequantize() - w).pow(2).sum()
    assert pg < pc


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_quantize_per_group_dense_sparse_and_bounds():
    m = _mlp()
    x = torch.randn(4, 40)
    q = rex.quantize(m, wbits=4, abits=None, order=3, granularity="per_group", group_size=16, first_last="same",
                     example_input=x)
    rep = rex.report(q)
    assert all(r["bound_ok"] for r in rep)
    assert q[2].s0.shape == (64, 4) and q[0].s0.shape == (64, 3)  # 40 = 16 + 16 + 8 (ragged)
    # budget: sparse orders are selected per output neuron, every group of a neuron together
    qs = rex.quantize(m, wbits=4, abits=None, order=3, budget=1.5, granularity="per_group", group_size=16,
                      first_last="same", example_input=x)
    layer = qs[2]
    assert 0 < layer.densities[1] < 1
    for k in range(1, 3):
        q_k, s_k, _, m_k = layer.term(k)
        assert (s_k[~m_k] == 0).all() and (q_k[~m_k] == 0).all()
    assert all(r["bound_ok"] for r in rex.report(qs))
    qg = rex.quantize(m, wbits=4, abits=None, order=3, budget=1.5, allocation="greedy", granularity="per_group",
                      group_size=16, first_last="same", example_input=x)
    assert all(r["bound_ok"] for r in rex.report(qg))
    # the path that re-quantizes masked residuals (select_masks: a rounding rule other than nearest)
    qr = rex.quantize(m, method="rex_squant", wbits=4, abits=None, order=3, budget=1.5, granularity="per_group",
                      group_size=16, first_last="same", example_input=x)
    assert qr[2].s1.shape == (64, 4) and 0 < qr[2].densities[1] < 1
    q1 = rex.quantize(m, wbits=4, abits=None, granularity="per_group", group_size=16, first_last="same", example_input=x)
    assert (qr(x) - m(x)).abs().max() < (q1(x) - m(x)).abs().max()


def test_per_group_integer_mode_matches_fake():
    m = _mlp()
    x = torch.randn(8, 40)
    kw = dict(wbits=4, abits=8, order=2, granularity="per_group", group_size=16, first_last="same",
              example_input=x, input_range=(-4.0, 4.0))
    fake, exact = rex.quantize(m, **kw), rex.quantize(m, mode="int", **kw)
    yf, yi = fake(x), exact(x)
    assert (yf - yi).abs().max() <= 1e-3 * yf.abs().max()


def test_per_group_on_conv_and_squant():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(2, 3, 8, 8)
    q = rex.quantize(m, method="squant", wbits=4, abits=None, granularity="per_group", group_size=24,
                     first_last="same", example_input=x)
    assert q[2].s0.shape == (8, 3)  # 8 x 3 x 3 = 72 inputs per row, 3 groups
    assert (q(x) - m(x)).abs().max() < 1.0


@pytest.mark.parametrize("kw,msg", [
    (dict(granularity="per_group"), "needs group_size"),
    (dict(granularity="per_group", group_size=0), "positive integer"),
    (dict(granularity="per_group", group_size=2.5), "positive integer"),
    (dict(group_size=64), "needs granularity='per_group'"),
])
def test_group_size_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        rex.QuantSpec(**kw)
    with pytest.raises(ConfigError):
        WeightQuantizer(4, True, kw.get("granularity", "per_channel"), group_size=kw.get("group_size"))


def test_spec_hash_unchanged_without_group_size():
    d = rex.QuantSpec(wbits=4).to_dict()
    assert "group_size" not in d
    assert rex.QuantSpec(granularity="per_group", group_size=128).to_dict()["group_size"] == 128
