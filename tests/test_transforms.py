"""Transforms as objects (rex.transforms.base): one signature, composed by a method, sharing a Context."""
import torch
from torch import nn

import rex
from rex import graph as graph_mod
from rex.engine import quantize_model
from rex.spec import QuantSpec
from rex.transforms import AbsorbHighBias, BiasCorrection, Context, Equalize, FoldBatchNorm, SplitOutlierChannels, Transform
from rex.transforms import base as base_mod


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(8, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(8, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(8, generator=g) * 2)
    return net


X = torch.randn(2, 3, 8, 8)


def test_dfq_is_its_transforms_composed():
    """The dfq method is the engine run with Equalize, AbsorbHighBias and BiasCorrection: same weights, same outputs."""
    net = _net()
    spec = QuantSpec(method="dfq", wbits=4, abits=8)
    a = rex.quantize(net, spec, example_input=X[:1])
    b = quantize_model(net, spec, X[:1], transforms=[Equalize(), AbsorbHighBias(), BiasCorrection()])
    with torch.no_grad():
        assert torch.equal(a(X), b(X))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    done = b.rex_info.transforms
    assert list(done) == ["fold_bn", "equalize", "absorb_high_bias", "bias_correction"]
    assert done["fold_bn"]["folded"] == [("0", "1"), ("3", "4")]
    assert ("0", "3") in done["equalize"]["pairs"] and done["equalize"]["relu6_replaced"] == ["2"]
    assert set(done["bias_correction"]["corrected"]) >= {"3", "8"}
    assert a.rex_info.extra["dfq"]["bias_corrected"] == len(done["bias_correction"]["corrected"])


def test_a_custom_transform_sees_the_shared_context_and_the_quantized_model():
    calls = []

    class Probe(Transform):
        name = "probe"
        reads_only = True

        def apply(self, model, ctx):
            calls.append(("apply", sorted(ctx.stats), [n for n in ctx.graph(model).order]))
            return {"seen": len(ctx.stats)}

        def after_quantize(self, qmodel, ctx):
            calls.append(("after", type(qmodel.rex_info).__name__))
            return {"after": True}

    q = quantize_model(_net(), QuantSpec(method="rtn"), X[:1], transforms=[SplitOutlierChannels(0.25), Probe()])
    assert calls[0] == ("apply", ["0.layer", "3.layer"], ["0.layer", "3.layer", "8.layer"])  # stats re-keyed by OCS
    assert calls[1] == ("after", "QuantInfo")
    assert q.rex_info.transforms["probe"]["seen"] == 2 and q.rex_info.transforms["probe"]["after"]


def test_the_graph_is_recorded_once_per_state_of_the_model(monkeypatch):
    """fold -> (new graph) equalize -> absorb -> (new graph) bias correction + ranges: three recordings, where
    the three tracers of before made four passes."""
    n = []
    real = graph_mod.record
    monkeypatch.setattr(base_mod, "record", lambda *a, **k: n.append(1) or real(*a, **k))
    quantize_model(_net(), QuantSpec(method="dfq"), X[:1], transforms=[Equalize(), AbsorbHighBias(), BiasCorrection()])
    assert len(n) == 3
    n.clear()
    quantize_model(_net(), QuantSpec(method="rtn"), X[:1])
    assert len(n) == 1  # folding and ranges from one recording


def test_context_invalidates_after_a_changing_transform():
    net = _net()
    ctx = Context(X[:1])
    g = ctx.graph(net)
    assert ctx.graph(net) is g
    base_mod.run_transforms(net, [FoldBatchNorm()], ctx)
    assert ctx.graph(net) is not g and not ctx.graph(net).conv_bn_pairs()  # the BNs are gone
