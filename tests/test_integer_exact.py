"""Integer-exact mode is exact at every supported bit-width (method.md §6): the accumulators the simulation
computes equal an int64 reference, on every path (float32 direct, float32 base-16 digits, float64), with
weights and inputs at the top of their ranges so that partial sums reach the largest magnitudes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rex
from rex.nn.layers import QuantLayer, int_path


def _int64_conv(qx: torch.Tensor, qw: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
    """conv2d in int64 arithmetic (unfold + integer matmul): the reference an int32/int64 kernel computes."""
    b, cin, h, w = qx.shape
    cout, cin_g, kh, kw = qw.shape
    cols = F.unfold(qx.double(), (kh, kw), padding=padding).round().to(torch.int64)  # [b, cin*kh*kw, L]
    cols = cols.reshape(b, groups, cin_g * kh * kw, -1)
    wg = qw.to(torch.int64).reshape(groups, cout // groups, cin_g * kh * kw)
    out = torch.stack([torch.matmul(wg[g], cols[:, g]) for g in range(groups)], 1)
    return out.reshape(b, cout, h, w)


def _worst_case_conv(cin: int, groups: int = 1, cout: int = 16) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout if groups == 1 else cin, 3, padding=1, groups=groups)
    with torch.no_grad():  # same sign, near the row maximum: every |q_w| is close to qmax
        conv.weight.copy_(torch.empty_like(conv.weight).uniform_(0.85, 1.0))
        conv.weight[::2] *= -1
    return nn.Sequential(nn.ReLU(), conv)


BITS = [(w, a) for w in (2, 4, 6, 8, 10, 12, 14, 16) for a in (4, 8, 16)]


@pytest.mark.parametrize("wbits,abits", BITS)
def test_conv_accumulators_equal_int64_reference_at_every_bit_width(wbits, abits):
    cin = 256 if wbits + abits <= 28 else 16  # fan-in 2304, or small enough to stay below 2^53 at W16A16
    model = _worst_case_conv(cin)
    x = torch.full((1, cin, 5, 5), 2.0)  # the top of the input range: |q_x| = qx_max everywhere
    x[:, ::3] *= 0.61
    spec = rex.QuantSpec(method="rex", wbits=wbits, abits=abits, order=2, first_last="same", mode="int")
    q = rex.quantize(model, spec, example_input=x, input_range=(0, 2))
    layer: QuantLayer = q[1]
    qx = layer.act.to_int(x)
    accs = layer.int_accumulators(x)
    assert len(accs) == 2
    for k, acc in enumerate(accs):
        qk, _, _, m = layer.term(k)
        ref = _int64_conv(qx, qk.to(torch.int64) * m.view(-1, 1, 1, 1).to(torch.int64), 1, 1)
        assert torch.equal(acc, ref), (
            f"W{wbits}A{abits} term {k}: path {layer._int_plan(layer.act.qmax)['path']}, "
            f"max accumulator error {int((acc - ref).abs().max())}")


def test_w12a8_fan_in_2304_is_exact_where_the_digit_split_was_not():
    """The case found in review: base-16 digits bounded only the low digit; the high digit (|h| up to 128 at
    W12) overflowed float32's exact range by ~100 accumulator steps."""
    model = _worst_case_conv(256)
    x = torch.full((2, 256, 6, 6), 2.0)
    q = rex.quantize(model, rex.QuantSpec(method="rtn", wbits=12, abits=8, first_last="same", mode="int"),
                     example_input=x, input_range=(0, 2))
    layer = q[1]
    assert int_path(layer.fan_in(), 2047, 255) == "f64"
    qk, s, _, _ = layer.term(0)
    ref = _int64_conv(layer.act.to_int(x), qk.to(torch.int64), 1, 1)
    assert torch.equal(layer.int_accumulators(x)[0], ref)
    # the output (rescaled in float64 on this path, returned in the input's float32) is the reference rounded
    # to float32
    out_ref = ref.double() * s.double().view(1, -1, 1, 1) * float(layer.act.scale) + \
        layer.inner.bias.double().view(1, -1, 1, 1)
    assert torch.equal(q(x), out_ref.float())


@pytest.mark.parametrize("groups", [4, 64])
@pytest.mark.parametrize("wbits", [4, 8, 12])
def test_grouped_and_depthwise_accumulators_are_exact(groups, wbits):
    model = _worst_case_conv(64, groups=groups, cout=64)
    x = torch.full((1, 64, 4, 4), 2.0)
    q = rex.quantize(model, rex.QuantSpec(method="rex", wbits=wbits, abits=8, order=3, first_last="same", mode="int"),
                     example_input=x, input_range=(0, 2))
    layer = q[1]
    for k, acc in enumerate(layer.int_accumulators(x)):
        qk, _, _, m = layer.term(k)
        ref = _int64_conv(layer.act.to_int(x), qk.to(torch.int64) * m.view(-1, 1, 1, 1).to(torch.int64), 1, groups)
        assert torch.equal(acc, ref)


@pytest.mark.parametrize("wbits,abits", [(4, 8), (8, 8), (12, 8), (16, 8), (16, 16)])
def test_linear_accumulators_equal_int64_reference(wbits, abits):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.empty_like(lin.weight).uniform_(0.85, 1.0))
    model = nn.Sequential(nn.ReLU(), lin)
    x = torch.full((3, 1024), 2.0)
    q = rex.quantize(model, rex.QuantSpec(method="rex", wbits=wbits, abits=abits, order=2, first_last="same",
                                          mode="int"), example_input=x, input_range=(0, 2))
    layer = q[1]
    qx = layer.act.to_int(x).round().to(torch.int64)
    for k, acc in enumerate(layer.int_accumulators(x)):
        qk, _, _, m = layer.term(k)
        ref = qx @ (qk.to(torch.int64) * m.view(-1, 1).to(torch.int64)).T
        assert torch.equal(acc, ref)


def test_int_path_bounds():
    assert int_path(2304, 7, 255) == "f32"            # W4A8
    assert int_path(2304, 127, 255) == "f32-digits"   # W8A8: high digit <= 8, low <= 15
    assert int_path(2304, 2047, 255) == "f64"         # W12A8: high digit up to 128
    assert int_path(9, 2047, 255) == "f32"
    assert int_path(100, 127, None) == "float-input"
