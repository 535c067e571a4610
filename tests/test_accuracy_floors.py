"""Accuracy on real data with floors a broken implementation cannot reach.

200 images of the bundled ImageNet sample (binomial noise about +-2.6 points at n=200); the floors are
set from the method's expected behaviour, not tuned to the set: W8A8 must track FP32, REx K=2 at W4A8
must recover most of what plain W4 loses, and plain W4 must be far below (otherwise the test measures
nothing)."""
import pytest
import torch

import rex
from rex.data import get_dataset
from rex.evaluate.classification import evaluate
from rex.models import get_model
from rex.runner import input_range_from_preprocess

N = 200


@pytest.fixture(scope="module")
def setup():
    b = get_model("mobilenet_v2")
    ds = get_dataset("imagenet_sample", preprocess=b.entry.preprocess, limit=N)
    fp = evaluate(b.model, ds, batch_size=50, progress=False, return_logits=True)
    return b, ds, fp


def _top1(setup, **kw):
    b, ds, fp = setup
    q = rex.quantize(b.model, rex.QuantSpec(**kw), example_input=torch.zeros(1, 3, 224, 224),
                     input_range=input_range_from_preprocess(b.entry.preprocess))
    return evaluate(q, ds, batch_size=50, progress=False, fp_logits=fp["logits"])


@pytest.mark.slow
def test_mobilenet_v2_floors(setup):
    fp = setup[2]["top1"]
    assert fp >= 80.0
    w8 = _top1(setup, wbits=8, abits=8, order=1)
    assert w8["top1"] >= fp - 3.0 and w8["agreement"] >= 90.0
    k1 = _top1(setup, wbits=4, abits=8, order=1)
    k2 = _top1(setup, wbits=4, abits=8, order=2)
    assert k1["top1"] <= fp - 30.0, "plain W4 should collapse on MobileNetV2; if not, the test measures nothing"
    assert k2["top1"] >= fp - 4.0 and k2["top1"] >= k1["top1"] + 40.0
    b15 = _top1(setup, wbits=4, abits=8, order=2, budget=1.5)
    assert k1["top1"] < b15["top1"] <= k2["top1"] + 3.0


@pytest.mark.slow
def test_integer_exact_matches_fake_on_real_images(setup):
    """method.md §6: integer-exact agrees with fake-quant within one output step. Layer by layer (same
    input to both modes) the difference must stay below one step of an 8-bit grid over the layer's
    output; end to end, rare rounding flips cascade through 50 layers, so the check there is top-1."""
    from rex.nn import QuantLayer

    b, ds, _ = setup
    x = torch.stack([ds[i][0] for i in range(8)])
    spec = rex.QuantSpec(wbits=4, abits=8, order=2)
    kw = dict(example_input=torch.zeros(1, 3, 224, 224), input_range=input_range_from_preprocess(b.entry.preprocess))
    fake = rex.quantize(b.model, spec, **kw)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in fake.named_modules() if isinstance(m, QuantLayer)]
    yf = fake(x)
    for h in hooks:
        h.remove()
    assert len(inputs) == 53
    with torch.no_grad():
        for name, inp in inputs.items():
            layer = fake.get_submodule(name)
            a = layer(inp)
            layer.mode = "int"
            c = layer(inp)
            layer.mode = "fake"
            step = a.abs().max() / 255
            assert (a - c).abs().max() <= step, name
    exact = rex.quantize(b.model, spec.replace(mode="int"), **kw)
    assert (yf.argmax(1) == exact(x).argmax(1)).float().mean() >= 0.875
