"""Data-free activation ranges for transformers (rex.ranges, issue 14 item 1): pure interval rules, checked
against the functions they bound, and the tracer hook that quantizes the inputs of Linear layers that
follow a LayerNorm, with the count of layer inputs left in float recorded."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rex
from rex.ranges import (GELU_ARGMIN, add_interval, gelu_interval, layernorm_interval, silu_interval,
                        softmax_interval)
from rex.trace import bn_interval


def test_layernorm_interval_is_a_batchnorm_interval_of_its_affine_parameters():
    g = torch.Generator().manual_seed(0)
    gamma, beta = torch.randn(64, generator=g), torch.randn(64, generator=g)
    assert layernorm_interval(gamma, beta, 6.0) == pytest.approx(bn_interval(beta, gamma, 6.0))
    assert layernorm_interval(None, None, 3.0, features=64) == pytest.approx((-3.0, 3.0))


def test_layernorm_interval_caps_n_at_sqrt_d_minus_1_and_is_then_a_hard_bound():
    d = 10  # sqrt(9) = 3 < sigma 6: no input can leave the interval
    ln = nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1, 1)
    lo, hi = layernorm_interval(ln.weight, ln.bias, 6.0)
    assert (lo, hi) == pytest.approx(layernorm_interval(ln.weight, ln.bias, 3.0))
    x = torch.randn(5000, d) * torch.rand(5000, 1) * 100
    x[:10] = 0
    x[:10, 0] = 1e3  # the extreme case: one feature apart from the rest (|x_hat| = sqrt(d - 1))
    y = ln(x)
    y = y.detach()
    assert float(y.min()) >= lo - 1e-3 and float(y.max()) <= hi + 1e-3


@pytest.mark.parametrize("iv", [(-3.0, 2.0), (-0.5, 1.0), (-5.0, -1.0), (0.2, 0.9), (-0.7517916, -0.7517916)])
def test_gelu_and_silu_intervals_are_the_exact_images(iv):
    x = torch.linspace(iv[0], iv[1], 20001, dtype=torch.float64)
    for fn, rule in ((F.gelu, gelu_interval), (F.silu, silu_interval)):
        y = fn(x)
        lo, hi = rule(iv)
        assert lo == pytest.approx(float(y.min()), abs=1e-7) and hi == pytest.approx(float(y.max()), abs=1e-7)
    assert gelu_interval(None) is None
    assert gelu_interval((-10.0, 10.0))[0] == pytest.approx(float(F.gelu(torch.tensor(GELU_ARGMIN, dtype=torch.float64))))


def test_add_and_softmax_intervals():
    assert add_interval((-1.0, 2.0), (0.5, 3.0)) == (-0.5, 5.0)
    assert add_interval((-1.0, 2.0), None) is None
    assert softmax_interval((-100.0, 100.0)) == (0.0, 1.0)


class Block(nn.Module):
    """A pre-norm transformer MLP block: LN -> Linear -> GELU -> Linear, residual add, final LN + head."""

    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ln2, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.fc2(F.gelu(self.fc1(self.ln1(x))))
        return self.head(self.ln2(x))


def test_tracer_quantizes_linear_inputs_after_layernorm_and_counts_float_inputs():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 5, 16)
    q = rex.quantize(m, wbits=8, abits=8, first_last="same", example_input=x, range_propagation="none")
    rep = {r["name"]: r for r in rex.report(q)}
    sigma = rex.QuantSpec(abits=8).sigma
    assert rep["fc1"]["abits"] == 8
    assert rep["fc1"]["act_range"] == pytest.approx(layernorm_interval(m.ln1.weight, m.ln1.bias, sigma), abs=1e-4)
    assert rep["head"]["abits"] == 8
    assert rep["fc2"]["abits"] is None  # GELU of an unranged Linear output: no sound range, float
    fi = q.rex_info.extra["float_inputs"]
    assert fi == dict(count=1, of=3, names=["fc2"])
    assert any("fc2" in n for n in q.rex_info.notes)
    assert (q(x) - m(x)).abs().max() < 0.1


def test_default_protocol_propagates_a_range_to_every_linear_input():
    """range_propagation defaults to 'moments': fc2's input (GELU of fc1's output) gets a range, none stays float."""
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 5, 16)
    assert rex.QuantSpec(abits=8).range_propagation == "moments"
    q = rex.quantize(m, wbits=8, abits=8, first_last="same", example_input=x)
    rep = {r["name"]: r for r in rex.report(q)}
    assert rep["fc1"]["abits"] == rep["fc2"]["abits"] == rep["head"]["abits"] == 8
    assert q.rex_info.extra["float_inputs"]["count"] == 0
    assert (q(x) - m(x)).abs().max() < 0.1


def test_weight_only_rows_count_every_input_as_float():
    torch.manual_seed(0)
    q = rex.quantize(Block().eval(), wbits=4, abits=None, first_last="same", example_input=torch.randn(1, 5, 16))
    assert q.rex_info.extra["float_inputs"]["count"] == 3


transformers = pytest.importorskip("transformers")


def test_bert_w4a8_quantizes_qkv_and_intermediate_inputs():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 99, (1, 12))
    example = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    q = rex.quantize(model, wbits=4, abits=8, example_input=example, range_propagation="none")
    rep = {r["name"]: r for r in rex.report(q)}
    for layer in range(2):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
            assert rep[f"encoder.layer.{layer}.{part}"]["abits"] == 8, part
    fi = q.rex_info.extra["float_inputs"]
    # after the attention matmul and after GELU of an unranged Linear: float, and said so
    assert fi["count"] == 4 and fi["of"] == 2 * 6 + 1
    assert all(n.endswith(("attention.output.dense", "output.dense")) for n in fi["names"])
    # the default protocol (range_propagation='moments') reaches those four inputs too
    q = rex.quantize(model, wbits=4, abits=8, example_input=example)
    assert q.rex_info.extra["float_inputs"] == dict(count=0, of=2 * 6 + 1, names=[])


def test_range_maths_loads_without_the_transforms_package():
    # rex.ranges is pure interval / moment maths: importing it must not pull in rex.transforms (it did when
    # clipped_normal_moments lived in rex.transforms.bias_correction)
    import subprocess
    import sys
    code = "import sys, rex.ranges; assert 'rex.transforms' not in sys.modules, sorted(sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
