"""Module swapping, BN folding, activation ranges, fake vs integer-exact."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rex
from rex.nn import QuantLayer
from rex.transforms import fold_batchnorm


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass that pads inside forward (TF 'same' style, as in other model zoos)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 16, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.grp = nn.Conv2d(16, 32, 1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)
        for bn in (self.bn0, self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.dw(x)))
        x = x + y  # residual add
        x = self.bn2(self.grp(x))
        return self.fc(F.relu(x).mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_bn_folding_preserves_function(net):
    x = torch.randn(4, 3, 17, 17)
    res = fold_batchnorm(net, x)
    assert len(res.folded) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    assert torch.allclose(net(x), res.model(x), atol=1e-5)


def test_quantize_leaves_input_untouched_and_swaps_every_weight_layer(net):
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 17, 17)
    q = rex.quantize(net, rex.QuantSpec(wbits=4, abits=8, order=2), example_input=x, input_range=(-3, 3))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    assert set(kinds) == {"stem", "dw", "grp", "fc"}
    assert kinds["fc"] == "QuantLinear" and kinds["dw"] == "QuantConv2d"


def test_swapping_with_large_order_preserves_outputs(net):
    x = torch.randn(4, 3, 17, 17)
    q = rex.quantize(net, rex.QuantSpec(wbits=8, abits=None, order=4, first_last="same"), example_input=x)
    assert torch.allclose(net(x), q(x), atol=1e-5, rtol=1e-4)


def test_activation_ranges_follow_bn_and_relu(net):
    x = torch.randn(1, 3, 17, 17)
    q = rex.quantize(net, rex.QuantSpec(wbits=4, abits=8, order=1, first_last="same"), example_input=x, input_range=(-2.5, 2.5))
    rep = {r["name"]: r for r in rex.report(q)}
    assert rep["stem"]["act_range"] == (-2.5, 2.5)
    lo, hi = rep["dw"]["act_range"]  # after ReLU6: unsigned, <= 6
    assert lo == 0 and 0 < hi <= 6 and rep["dw"]["act_signed"] is False
    # grp's input is relu6(.) + relu(.): the sum of both ranges
    assert rep["grp"]["act_range"][1] == pytest.approx(hi + (net.bn1.bias + 6 * net.bn1.weight.abs()).max().item(), rel=1e-4)


def test_first_last_policy(net):
    x = torch.randn(1, 3, 17, 17)
    q = rex.quantize(net, rex.QuantSpec(wbits=3, abits=4, order=2), example_input=x, input_range=(-3, 3))
    rep = {r["name"]: r for r in rex.report(q)}
    assert (rep["stem"]["wbits"], rep["stem"]["abits"], rep["stem"]["order"]) == (8, 8, 1)
    assert (rep["fc"]["wbits"], rep["fc"]["order"]) == (8, 1)
    assert (rep["dw"]["wbits"], rep["dw"]["abits"], rep["dw"]["order"]) == (3, 4, 2)
    qfp = rex.quantize(net, rex.QuantSpec(wbits=3, abits=4, order=2, first_last="fp"), example_input=x, input_range=(-3, 3))
    names = {r["name"] for r in rex.report(qfp)}
    assert "stem" not in names and "fc" not in names


@pytest.mark.parametrize("wbits,abits,order", [(8, 8, 1), (4, 8, 2), (4, 4, 3), (2, 8, 4)])
def test_integer_exact_matches_fake_quant_within_one_step(net, wbits, abits, order):
    x = torch.randn(8, 3, 17, 17)
    spec = rex.QuantSpec(wbits=wbits, abits=abits, order=order, first_last="same")
    fake = rex.quantize(net, spec, example_input=x, input_range=(-4, 4))
    exact = rex.quantize(net, spec.replace(mode="int"), example_input=x, input_range=(-4, 4))
    # layer by layer, on the same input, the outputs agree far below one output step
    for (name, lf), (_, li) in zip(
        [(n, m) for n, m in fake.named_modules() if isinstance(m, QuantLayer)],
        [(n, m) for n, m in exact.named_modules() if isinstance(m, QuantLayer)],
    ):
        assert li.mode == "int"
    yf, yi = fake(x), exact(x)
    # end to end: the logits agree within one step of an 8-bit grid over the output range
    step = yf.abs().max() / 127
    assert (yf - yi).abs().max() <= step, float((yf - yi).abs().max() / step)


def test_integer_exact_single_layer_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    model = nn.Sequential(nn.ReLU(), conv)
    x = torch.rand(2, 8, 9, 9) * 3
    spec = rex.QuantSpec(wbits=4, abits=8, order=3, first_last="same")
    f = rex.quantize(model, spec, example_input=x, input_range=(0, 3))
    i = rex.quantize(model, spec.replace(mode="int"), example_input=x, input_range=(0, 3))
    yf, yi = f(x), i(x)
    layer = i[1]
    # integer accumulation in float64 is exact; fake-quant differs only by float32 rounding
    assert (yf - yi).abs().max() < 1e-4
    assert layer.int32_safe() and layer.accumulator_bound() == 8 * 9 * 7 * 255


def test_int32_overflow_is_detected():
    conv = nn.Conv2d(4096, 4, 3)
    model = nn.Sequential(nn.ReLU(), conv)
    spec = rex.QuantSpec(wbits=16, abits=16, order=1, first_last="same")
    q = rex.quantize(model, spec, example_input=torch.rand(1, 4096, 3, 3), input_range=(0, 1))
    rep = rex.report(q)
    assert rep[0]["int32_safe"] is False


def test_nan_weights_raise_clear_error(net):
    bad = copy.deepcopy(net)
    bad.dw.weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(rex.WeightError, match="dw.weight"):
        rex.quantize(bad, rex.QuantSpec(wbits=4), example_input=torch.randn(1, 3, 17, 17))


def test_all_zero_layer_quantizes_to_zero(net):
    z = copy.deepcopy(net)
    z.grp.weight.data.zero_()
    x = torch.randn(2, 3, 17, 17)
    q = rex.quantize(z, rex.QuantSpec(wbits=4, abits=8, order=3, first_last="same"), example_input=x, input_range=(-3, 3))
    assert torch.equal(q.grp.inner.weight, torch.zeros_like(q.grp.inner.weight))
    assert torch.isfinite(q(x)).all()


@pytest.mark.parametrize("kw,match", [
    (dict(wbits=1), "2, 16"), (dict(abits=17), "2, 16"), (dict(order=0), ">= 1"),
    (dict(order=2, budget=0.5), ">= 1"), (dict(order=1, budget=1.5), "order >= 2"),
    (dict(allocation="best"), "allocation"), (dict(method="nope"), "known methods"),
    (dict(mode="int8"), "mode"), (dict(first_last="maybe"), "first_last"),
])
def test_spec_validation(kw, match):
    with pytest.raises(rex.RexError, match=match):
        rex.QuantSpec(**kw)


def test_rtn_equals_rex_order_one(net):
    x = torch.randn(3, 3, 17, 17)
    a = rex.quantize(net, rex.QuantSpec(method="rtn", wbits=4, abits=4), example_input=x, input_range=(-3, 3))
    b = rex.quantize(net, rex.QuantSpec(method="rex", wbits=4, abits=4, order=1), example_input=x, input_range=(-3, 3))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("wbits,abits,cin,groups,order", [
    (4, 8, 64, 1, 3),     # float32-exact regime, three terms stacked in one conv
    (8, 8, 128, 1, 2),    # 128*9*127*255 > 2^24: base-16 digit split
    (8, 8, 32, 32, 2),    # depthwise, stacked terms interleaved per group
    (6, 6, 64, 4, 3),     # grouped
    (16, 16, 64, 1, 1),   # float64 fallback
])
def test_integer_paths_equal_float64_reference(wbits, abits, cin, groups, order):
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, 32 if groups == 1 else cin, 3, padding=1, groups=groups)
    model = nn.Sequential(nn.ReLU(), conv)
    x = torch.rand(2, cin, 6, 6) * 2
    spec = rex.QuantSpec(wbits=wbits, abits=abits, order=order, first_last="same", mode="int")
    q = rex.quantize(model, spec, example_input=x, input_range=(0, 2))
    layer = q[1]
    qx = layer.act.to_int(x)
    ref = torch.zeros(2, conv.out_channels, 6, 6, dtype=torch.float64)
    for k in range(layer.order):
        qk, s, _, m = layer.term(k)
        acc = F.conv2d(qx, qk.double() * m.view(-1, 1, 1, 1).double(), None, 1, 1, 1, groups)
        ref += acc * s.double().view(1, -1, 1, 1) * float(layer.act.scale)
    ref += layer.inner.bias.double().view(1, -1, 1, 1)
    assert torch.allclose(q(x).double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits, lo, hi", [(8, 0.0, 6.0), (4, -3.0, 2.5), (2, 0.0, 1.3), (16, -1.0, 1.0)])
def test_activation_quantizer_is_bit_identical_to_torch_fake_quantize(bits, lo, hi):
    """ActQuantizer's faster in-place arithmetic must be exactly torch's fused fake-quantize op, and agree with
    the integers the integer-exact path uses."""
    from rex.nn.layers import ActQuantizer

    torch.manual_seed(0)
    a = ActQuantizer(bits, lo, hi)
    x = torch.randn(1000, 64) * 3
    ref = torch.fake_quantize_per_tensor_affine(x, float(a.scale), 0, a.qmin, a.qmax)
    assert torch.equal(a(x), ref)
    assert torch.equal(a.to_int(x, torch.float32) * float(a.scale), ref)


def test_scratch_buffer_changes_nothing_and_survives_inference_mode():
    """QuantLayer writes its quantized input into a per-thread scratch buffer (CPU inference): results must be
    those without it, across no_grad / inference_mode and changing shapes, in both modes."""
    import rex.nn.layers as L

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 64, 5))
    x = torch.rand(2, 3, 8, 8)
    for mode in ("fake", "int"):
        q = rex.quantize(m, rex.QuantSpec(wbits=4, abits=8, order=2, first_last="same", mode=mode),
                         example_input=x, input_range=(0, 1))
        L.SCRATCH = False
        try:
            with torch.no_grad():
                ref = q(x)
        finally:
            L.SCRATCH = True
        with torch.inference_mode():
            a = q(x)
            q(torch.rand(4, 3, 8, 8))  # a larger batch grows the buffer
        with torch.no_grad():
            b = q(x)
        assert torch.equal(a, ref) and torch.equal(b, ref)


def test_conv_transpose_is_quantized_costed_and_exact():
    """ConvTranspose2d (segmentation decoders) is swapped like a conv: terms output-channels-first, the
    function preserved at 16 bits, integer-exact = fake-quant, the expansion bound held, MACs by hand."""
    from rex.nn.layers import QuantConvTranspose2d

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(),
                      nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, bias=False)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    # MACs per sample: 8*64*3*9 + 8*64*6*4 (each input pixel times a 2x2x6 patch) + 6*256*4*9
    assert rex.bops(m, x[:1]) == (13824 + 12288 + 55296) * 32 * 32
    q16 = rex.quantize(m, rex.QuantSpec(wbits=16, abits=None, first_last="same"), example_input=x)
    assert isinstance(q16[2], QuantConvTranspose2d) and isinstance(q16[4], QuantConvTranspose2d)
    with torch.no_grad():
        assert torch.allclose(q16(x), ref, atol=1e-4)
    spec = dict(wbits=4, abits=8, order=3, budget=1.5, first_last="same")
    q = rex.quantize(m, rex.QuantSpec(**spec), example_input=x, input_range=(0, 1))
    qi = rex.quantize(m, rex.QuantSpec(mode="int", **spec), example_input=x, input_range=(0, 1))
    with torch.no_grad():
        assert torch.allclose(q(x), qi(x), atol=1e-5)
    plain = rex.quantize(m, rex.QuantSpec(wbits=4, abits=8, first_last="same"), example_input=x, input_range=(0, 1))
    assert rex.bops(plain, x[:1]) < rex.bops(q, x[:1]) <= 1.5 * rex.bops(plain, x[:1])
    assert all(r["bound_ok"] for r in rex.report(q))
