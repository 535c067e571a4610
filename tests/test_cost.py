"""BOPs / MACs arithmetic against hand-computed values."""
import pytest
import torch
from torch import nn

import rex
from rex.cost import (conv2d_macs, conv2d_output_hw, cost_table, layer_bops, linear_macs, model_size_bits,
                      order1_bops)


def test_conv_macs_by_hand():
    # 3 -> 16 channels, 3x3, stride 2, pad 1 on 32x32: out 16x16; 16*16*16 * 3*9 = 110592
    assert conv2d_output_hw((32, 32), 3, 2, 1) == (16, 16)
    assert conv2d_macs(3, 16, (32, 32), 3, 2, 1) == 16 * 16 * 16 * 3 * 9 == 110592


def test_depthwise_and_grouped_macs_by_hand():
    # depthwise 32 ch 3x3 pad 1 on 14x14: 32*14*14*1*9
    assert conv2d_macs(32, 32, (14, 14), 3, 1, 1, groups=32) == 32 * 14 * 14 * 9 == 56448
    # grouped: 64 -> 128, groups 4, 1x1 on 7x7: 128*49*16
    assert conv2d_macs(64, 128, (7, 7), 1, groups=4) == 128 * 49 * 16
    # dilation 2, 3x3, pad 2 keeps 20x20
    assert conv2d_output_hw((20, 20), 3, 1, 2, 2) == (20, 20)
    assert conv2d_output_hw((20, 21), 3, 2, "same") == (10, 11)


def test_linear_macs_and_bops_by_hand():
    assert linear_macs(1280, 1000) == 1_280_000
    assert layer_bops(1_280_000, 4, 8, (1.0, 0.5)) == 1_280_000 * 32 * 1.5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn2(self.dw(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def test_model_bops_float_and_quantized_by_hand():
    m = Tiny().eval()
    x = torch.randn(1, 3, 10, 10)
    macs = [8 * 100 * 27, 8 * 100 * 9, 80]
    assert rex.bops(m, x) == sum(macs) * 32 * 32
    # batch size does not change per-sample BOPs
    assert rex.bops(m, torch.randn(4, 3, 10, 10)) == sum(macs) * 32 * 32
    q = rex.quantize(m, rex.QuantSpec(wbits=4, abits=8, order=2, first_last="same"), example_input=x, input_range=(-3, 3))
    table = {r.name: r for r in cost_table(q, x)}
    assert table["dw"].macs == macs[1] and table["dw"].densities == (1.0, 1.0)
    assert rex.bops(q, x) == sum(macs) * 4 * 8 * 2


class Mean(nn.Module):
    def forward(self, x):
        return x.mean(-1)


def test_model_size_bits():
    m = Tiny().eval()
    x = torch.randn(1, 3, 10, 10)
    n_params = sum(p.numel() for p in m.parameters())
    assert model_size_bits(m) == 32 * n_params
    m = nn.Sequential(m.conv, m.bn, nn.ReLU(), m.dw, m.bn2, nn.Flatten(2), Mean(), m.fc)
    q = rex.quantize(m, rex.QuantSpec(wbits=4, abits=8, order=1, first_last="same"), example_input=x, input_range=(-3, 3))
    w = 8 * 27 + 8 * 9 + 80
    channels = 8 + 8 + 10
    biases = 8 + 8 + 10
    assert model_size_bits(q) == w * 4 + channels * 32 + biases * 32


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)  # SmolLM2's architecture (Llama: RMSNorm, SwiGLU, grouped-query attention), tiny
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("net", ["cnn", "llama"])
def test_order1_bops_of_the_cost_table_equal_quantizing_again_at_order_1(net):
    # the jobs' plain_bops (the base of budget ratios) is read from the order-K model's cost table instead of a
    # second quantization at order 1: the same number, for every order, budget, allocation and end policy
    from rex.runner import _quantize_into

    if net == "cnn":
        model, ex, rng = Tiny().eval(), torch.randn(1, 3, 10, 10), (-3.0, 3.0)
    else:
        g = torch.Generator().manual_seed(1)
        model, ex, rng = _tiny_llama(), {"input_ids": torch.randint(0, 99, (1, 12), generator=g)}, None
    for order, budget, extra in [(2, None, {}), (3, None, {}), (2, 1.5, {}), (3, 2.0, {}),
                                 (3, 1.7, dict(allocation="greedy")), (2, 1.3, dict(first_last="same"))]:
        spec = rex.QuantSpec(method="rex", wbits=4, abits=8, order=order, budget=budget, **extra)
        q = rex.quantize(model, spec, example_input=ex, input_range=rng)
        old = rex.bops(rex.quantize(model, spec.replace(order=1, budget=None), example_input=ex, input_range=rng), ex)
        s = rex.summary(q, ex)
        assert s["plain_bops"] == old, (order, budget, extra)
        assert order1_bops(cost_table(q, ex)) == old
        assert s["bops"] > old  # the expansion is counted on top of it
        if net == "cnn" and order == 2 and budget is None:
            out = {}
            _quantize_into(out, model, spec, ex, rng)
            assert out["plain_bops"] == old and out["bops"] == s["bops"]
