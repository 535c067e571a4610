"""Range propagation through a weight layer (issue 12 item 3, issue 14 item 1): a layer input that no
BatchNorm/LayerNorm precedes gets a data-free range from the preceding layer, as a recorded protocol option
(``QuantSpec.range_propagation``: none | moments | interval; rex.trace.LAYER_RANGE_RULES).

- ``moments``: the preceding BN's per-channel (mean, std) carried through the layer (mean W mu + b, std
  sqrt(sum w^2 sigma^2)): checked against a Monte-Carlo estimate;
- ``interval``: sound interval arithmetic: random inputs inside the input interval never leave it;
- ``none`` (the default) changes nothing; every derived range is named in the row ("propagated (moments)").
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rex
from rex.errors import ConfigError
from rex.graph import record
from rex.ranges import Moments, clip_moments, layer_interval, layer_moments, prelu_moments
from rex.spec import RANGE_PROPAGATIONS, QuantSpec
from rex.trace import LAYER_RANGE_RULES, ranges

pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian_moments(c: int, seed: int) -> Moments:
    g = torch.Generator().manual_seed(seed)
    return Moments.of(torch.randn(c, generator=g), 0.2 + torch.rand(c, generator=g), 1)


def _sample(m: Moments, shape: tuple, seed: int) -> torch.Tensor:
    """Independent Gaussian inputs, channel axis 1, N(mean_c, std_c^2)."""
    g = torch.Generator().manual_seed(seed)
    view = (1, -1) + (1,) * (len(shape) - 2)
    return (m.mean.view(view) + m.std.view(view) * torch.randn(shape, generator=g, dtype=torch.float64)).float()


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.double().transpose(0, 1).reshape(y.shape[1], -1)
    return y.mean(1), y.std(1)


def test_moments_rule_matches_monte_carlo_on_a_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    m = _gaussian_moments(12, 1)
    out = layer_moments(m, lin.weight, lin.bias, dim=1)
    mean, std = _channel_stats(lin(_sample(m, (40000, 12), 2)).detach())
    assert torch.allclose(out.mean, mean, atol=0.02) and torch.allclose(out.std, std, rtol=0.02)


@pytest.mark.parametrize("groups", [1, 2])
def test_moments_rule_matches_monte_carlo_on_a_conv_summing_taps_and_channels(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=groups)  # no padding: every output sees all 3 x 3 taps of its inputs
    m = _gaussian_moments(4, 3)
    out = layer_moments(m, conv.weight, conv.bias, groups=groups)
    mean, std = _channel_stats(conv(_sample(m, (400, 4, 12, 12), 4)).detach())
    assert torch.allclose(out.mean, mean, atol=0.02) and torch.allclose(out.std, std, rtol=0.02)


def test_clip_and_prelu_moments_match_monte_carlo():
    m = _gaussian_moments(6, 5)
    x = _sample(m, (200000, 6), 6).double()
    slope = torch.linspace(-0.3, 0.5, 6)
    for got, y in ((clip_moments(m, 0.0, None), F.relu(x)), (clip_moments(m, 0.0, 0.8), x.clamp(0, 0.8)),
                   (prelu_moments(m, slope), F.prelu(x, slope.double()))):
        mean, std = _channel_stats(y)
        assert torch.allclose(got.mean, mean, atol=0.01) and torch.allclose(got.std, std, atol=0.01)


class _Chain(nn.Module):
    """A BN-free conv chain after one conv -> BN -> ReLU (like ESPNet's reduce conv -> dilated convs): the
    inputs of conv3 (conv2's output) and of the head (ReLU of a sum of two conv outputs) have no BatchNorm
    before them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv1(x)))
        z = self.conv2(y)
        return self.head(F.relu(self.conv3(z) + z))


def _sound(net, lo, hi, shape, seed):
    """Every layer input's 'interval' range holds the inputs of random network inputs in [lo, hi], corners too."""
    g = record(net, torch.zeros(shape))
    tr = ranges(g, input_range=(lo, hi), propagation="interval")
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, k=k: seen.setdefault(k, []).append(a[0]))
             for k, mod in net.named_modules() if k in tr.input_range]
    gen = torch.Generator().manual_seed(seed)
    xs = [lo + (hi - lo) * torch.rand((64,) + shape[1:], generator=gen),
          torch.where(torch.rand((64,) + shape[1:], generator=gen) < 0.5, lo, hi)]  # vertices: the extremes
    with torch.no_grad():
        for x in xs:
            net(x)
    for h in hooks:
        h.remove()
    for k, r in tr.input_range.items():
        assert r is not None, k
        v = torch.cat([t.flatten() for t in seen[k]])
        tol = 1e-5 * max(1.0, abs(r[0]), abs(r[1]))
        assert float(v.min()) >= r[0] - tol and float(v.max()) <= r[1] + tol, (k, r, float(v.min()), float(v.max()))
    return tr


def test_interval_rule_is_sound_through_padded_grouped_and_transposed_convs_and_linears():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=3),
                        nn.ConvTranspose2d(6, 4, 2, stride=2), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 5), nn.GELU(), nn.Linear(5, 3)).eval()
    tr = _sound(net, 0.25, 1.0, (1, 3, 4, 4), 0)  # an input interval without 0: zero padding must be covered
    assert set(tr.input_source.values()) == {None, "propagated (interval)"}


def test_interval_rule_is_exact_for_a_single_weight():
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(-2.0)
        conv.bias.fill_(0.5)
    net = nn.Sequential(conv, nn.Conv2d(1, 1, 1)).eval()
    tr = ranges(record(net, torch.zeros(1, 1, 2, 2)), input_range=(0.3, 1.2), propagation="interval")
    assert tr.input_range["1"] == pytest.approx((0.5 - 2.4, 0.5 - 0.6))
    assert layer_interval((0.3, 1.2), conv.weight, conv.bias) == pytest.approx((-1.9, -0.1))


def _quantize(net, prop, **kw):
    return rex.quantize(net, method="rtn", wbits=8, abits=8, first_last="same", example_input=torch.zeros(1, 3, 8, 8),
                        input_range=(-1.0, 1.0), range_propagation=prop, **kw)


def test_none_is_todays_behaviour_bit_for_bit_and_keeps_the_spec_identity():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 1)).eval()  # BN-free: no range after the first layer
    x = torch.randn(2, 3, 8, 8)
    spec_today = QuantSpec(method="rtn", wbits=8, abits=8, first_last="same", range_propagation="none")
    q_today = rex.quantize(net, spec_today, example_input=torch.zeros(1, 3, 8, 8), input_range=(-1.0, 1.0))
    q_none = _quantize(net, "none")
    assert torch.equal(q_none(x), q_today(x))
    assert [r["act_range"] for r in rex.report(q_none)] == [(-1.0, 1.0), None, None]
    assert rex.activation_coverage(q_none)["act_float"] == 2
    assert "propagated" not in rex.activation_coverage(q_none)["act_ranges"]
    # 'none' (the default before 2026-12-06) is not written into the spec's identity: earlier results keep
    # their hashes; the default 'moments' is, so no earlier hash names a run of the new default
    assert "range_propagation" not in spec_today.to_dict()
    assert spec_today.replace(range_propagation="moments").hash() != spec_today.hash()
    assert QuantSpec(method="rtn", wbits=8, abits=8, first_last="same").hash() \
        == spec_today.replace(range_propagation="moments").hash()


@pytest.mark.parametrize("prop", ["moments", "interval"])
def test_propagation_quantizes_a_bn_free_conv_chain_and_names_the_source(prop):
    torch.manual_seed(0)
    net = _Chain().eval()
    none = rex.activation_coverage(_quantize(net, "none"))
    assert none["act_float"] == 2 and none["act_float_layers"] == ["conv3", "head"]
    q = _quantize(net, prop)
    c = rex.activation_coverage(q)
    assert c["act_float"] == 0 and c["act_propagated"] == 2
    assert f"propagated ({prop}) through the preceding layer for 2 inputs" in c["act_ranges"]
    sources = {r.name: r.range_source for r in q.rex_info.plans}
    assert sources == {"conv1": None, "conv2": None, "conv3": f"propagated ({prop})", "head": f"propagated ({prop})"}
    assert q.conv3.act.source == f"propagated ({prop})" and q.conv2.act.source == "bn-propagated"


def test_moments_range_of_the_chain_is_n_sigma_of_the_carried_moments():
    torch.manual_seed(0)
    net = _Chain()
    x = 2 * torch.rand(256, 3, 8, 8) - 1
    net.bn.momentum = None  # BN statistics of this data, as a trained net's are of its data
    with torch.no_grad():
        net(x)
    net.eval()
    q = _quantize(net, "moments")
    sigma = q.rex_info.spec.sigma
    bn = net.bn  # conv2 reads ReLU(BN): its moments are the clipped normal's, carried through conv2
    m = layer_moments(clip_moments(Moments.of(bn.bias, bn.weight, 1), 0.0, None), net.conv2.weight, net.conv2.bias)
    lo, hi = float((m.mean - sigma * m.std).min()), float((m.mean + sigma * m.std).max())
    assert q.conv3.act.lo == pytest.approx(lo, rel=1e-5) and q.conv3.act.hi == pytest.approx(hi, rel=1e-5)
    # ranges that fit the data: the W8A8 model stays close (float inputs of conv3/head are now 8-bit)
    with torch.no_grad():
        y = net(x)
        assert float((q(x) - y).abs().max()) < 0.05 * float(y.abs().max())


def test_moments_change_nothing_on_a_net_with_batchnorm_everywhere():
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    net = mobilenet_v2(num_classes=10).eval()
    ex, x = torch.zeros(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    qs = {p: rex.quantize(net, method="rtn", wbits=4, abits=4, example_input=ex, input_range=(-2.2, 2.7),
                          range_propagation=p) for p in ("none", "moments")}
    assert [r["act_range"] for r in rex.report(qs["none"])] == [r["act_range"] for r in rex.report(qs["moments"])]
    assert torch.equal(qs["none"](x), qs["moments"](x))
    assert rex.activation_coverage(qs["moments"])["act_propagated"] == 0


def test_attention_context_takes_the_hull_of_v():
    """softmax(Q K^T) V is a convex combination of V's rows: V's range bounds it (the ViT's proj input)."""
    from rex.models.vit import ViT

    torch.manual_seed(0)
    vit = ViT(dim=16, depth=1, heads=2, mlp_ratio=2.0).eval()
    ex = torch.zeros(1, 1, 28, 28)
    g = record(vit, ex)
    none, mom = ranges(g, input_range=(-1.0, 1.0)), ranges(g, input_range=(-1.0, 1.0), propagation="moments")
    assert none.input_range["blocks.0.attn.proj"] is None and none.input_range["blocks.0.mlp.fc2"] is None
    proj, fc2 = mom.input_range["blocks.0.attn.proj"], mom.input_range["blocks.0.mlp.fc2"]
    assert proj is not None and fc2 is not None and fc2[0] >= -0.17  # GELU's image
    # the hull of V: qkv's output range, propagated from the LayerNorm through qkv
    assert mom.input_source["blocks.0.attn.proj"] == "propagated (moments)"
    x = torch.randn(8, 1, 28, 28)
    seen = {}
    h = vit.blocks[0].attn.proj.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
    ivt = ranges(g, input_range=(-1.0, 1.0), propagation="interval").input_range["blocks.0.attn.proj"]
    with torch.no_grad():
        vit(x.clamp(-1, 1))
    h.remove()
    assert ivt[0] - 1e-5 <= float(seen["x"].min()) and float(seen["x"].max()) <= ivt[1] + 1e-5


def test_unknown_value_is_a_one_line_error_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        QuantSpec(range_propagation="moment")
    msg = str(e.value)
    assert "\n" not in msg and "range_propagation" in msg and "'moments'" in msg and "'moment'" in msg
    with pytest.raises(ConfigError):
        QuantSpec.from_config({"name": "rtn"}, {"range_propagation": "bogus"})
    assert QuantSpec.from_config({"name": "rtn"}, {"range_propagation": "interval"}).range_propagation == "interval"
    with pytest.raises(ValueError, match="range propagation must be one of"):
        ranges(record(nn.Linear(2, 2), torch.zeros(1, 2)), propagation="sideways")
    assert set(RANGE_PROPAGATIONS) == set(LAYER_RANGE_RULES)  # the spec's choices are the rules' keys


def test_pipeline_protocol_block_records_it_and_a_non_default_value_gets_its_own_folder():
    from rex.paths import PROJECT_ROOT
    from rex.pipeline import grid as gridlib

    defaults = gridlib.protocol_defaults(PROJECT_ROOT / "conf")
    assert defaults["range_propagation"] == "moments"
    assert gridlib.variant(dict(defaults), defaults) == ""  # the default grid's folders keep their names
    tags = {p: gridlib.variant({**defaults, "range_propagation": p}, defaults) for p in ("none", "interval")}
    assert all(tags.values()) and tags["none"] != tags["interval"]
    spec = QuantSpec.from_config({"name": "rex", "wbits": 4, "abits": 8}, {**defaults, "range_propagation": "moments"})
    assert spec.range_propagation == "moments" and spec.to_dict()["range_propagation"] == "moments"


def test_espnet_dilated_conv_inputs_get_ranges():
    """ESPNet's ESP blocks: a BN-free 1x1/3x3 reduction feeds five dilated convs (65 of 85 layer inputs)."""
    from rex.models.espnet import ESPNet

    torch.manual_seed(0)
    net = ESPNet(12).eval()
    cov = {p: rex.activation_coverage(rex.quantize(net, method="rtn", wbits=4, abits=8,
                                                   example_input=torch.zeros(1, 3, 64, 64), input_range=(-0.01, 0.01),
                                                   range_propagation=p)) for p in RANGE_PROPAGATIONS}
    assert cov["none"]["act_float"] == 65 and cov["none"]["act_layers"] == 85
    dilated = ("d1.conv", "d2.conv", "d4.conv", "d8.conv", "d16.conv")
    assert all(n.endswith(dilated) for n in cov["none"]["act_float_layers"])
    for p in ("moments", "interval"):
        assert cov[p]["act_float"] == 0 and cov[p]["act_propagated"] == 65, p


def test_bert_attention_output_and_ffn_output_inputs_get_ranges():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 99, (1, 12))
    ex = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    q = rex.quantize(model, wbits=8, abits=8, example_input=ex, range_propagation="moments")
    c = rex.activation_coverage(q)
    assert c["act_float"] == 0 and c["act_propagated"] == 4  # after the attention average and after GELU
    assert "LayerNorm statistics" in c["act_ranges"] and "propagated (moments)" in c["act_ranges"]
    propagated = sorted(p.name for p in q.rex_info.plans if p.range_source)
    assert all(n.endswith(("attention.output.dense", "output.dense")) for n in propagated)
    with torch.no_grad():
        ref, out = model(**ex).last_hidden_state, q(**ex).last_hidden_state
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
