"""Cost for transformers and weight-only rows (issue 14 item 3): bits per weight including scales, zero
points and group-sparse masks; Linear MACs on 3-D inputs count tokens; attention matmuls
(activation x activation) counted 32 x 32 while float."""
import pytest
import torch
from torch import nn

import rex
from rex.cost import SCALE_BITS, cost_table, layer_weight_memory, weight_memory


def _mlp(fan=64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(fan, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))


def test_w4_k2_dense_is_8_bits_plus_two_scales_per_row():
    q = rex.quantize(_mlp(), wbits=4, abits=None, order=2, first_last="same", example_input=torch.zeros(1, 64))
    mem = q.rex_info.extra["memory"]
    assert SCALE_BITS == 16 and mem["scale_bits"] == 16
    assert mem["per_layer"]["0"] == pytest.approx(8 + 2 * 16 / 64)
    assert mem["per_layer"]["2"] == pytest.approx(8 + 2 * 16 / 32)
    total = sum(w * (8 + 32 / f) for w, f in ((64 * 32, 64), (32 * 48, 32), (48 * 8, 48)))
    assert mem["bits_per_weight"] == pytest.approx(total / (64 * 32 + 32 * 48 + 48 * 8))
    assert mem == weight_memory(q)
    assert mem["bits_per_weight_no_embeddings"] == mem["bits_per_weight"]  # no embedding here


def test_budget_gives_fractional_bits_with_masks():
    q = rex.quantize(_mlp(), wbits=4, abits=None, order=2, budget=1.5, first_last="same",
                     example_input=torch.zeros(1, 64))
    layer = q[2]
    d = layer.densities[1]
    assert 0 < d < 1
    rows = round(d * 48)
    want = (48 * 32 * 4 + rows * 32 * 4 + (48 + rows) * 16 + 48) / (48 * 32)  # + one mask bit per row
    assert layer_weight_memory(layer).bits_per_weight == pytest.approx(want)
    assert 4 < layer_weight_memory(layer).bits_per_weight < 8


def test_group_scales_and_zero_points_are_counted():
    pg = rex.quantize(_mlp(), wbits=4, abits=None, granularity="per_group", group_size=16, first_last="same",
                      example_input=torch.zeros(1, 64))
    assert pg.rex_info.extra["memory"]["per_layer"]["0"] == pytest.approx(4 + 16 / 16)
    asym = rex.quantize(_mlp(), wbits=4, abits=None, symmetric=False, first_last="same", example_input=torch.zeros(1, 64))
    assert asym.rex_info.extra["memory"]["per_layer"]["0"] == pytest.approx(4 + (16 + 4) / 64)


def test_float_layers_count_32_bits_in_the_all_weights_figure():
    q = rex.quantize(_mlp(), wbits=4, abits=None, first_last="fp", example_input=torch.zeros(1, 64))
    mem = q.rex_info.extra["memory"]
    assert mem["float_weights"] == 64 * 32 + 48 * 8 and mem["quantized_weights"] == 32 * 48
    assert mem["bits_per_weight_all"] == pytest.approx(
        (32 * 48 * (4 + 16 / 32) + 32 * mem["float_weights"]) / (mem["float_weights"] + 32 * 48))


def test_linear_on_tokens_counts_every_token():
    m = _mlp(fan=16)
    t = cost_table(m, torch.zeros(3, 10, 16))  # batch x tokens x features
    assert t[0].macs == 10 * 16 * 32 and t[1].macs == 10 * 32 * 48


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_matmuls_are_counted_32x32(impl):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 99, (2, 12))
    t = cost_table(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)))
    mm = [r for r in t if r.kind == "matmul"]
    per_layer = 4 * 12 * 12 * 8 * 2  # heads x L x L x head_dim, for Q K^T and for P V, per sample
    assert sum(r.macs for r in mm) == 2 * per_layer
    assert all(r.wbits == r.abits == 32 and r.bops == r.macs * 32 * 32 for r in mm)
    linear = [r for r in t if r.kind == "Linear"]
    assert len(linear) == 2 * 6 + 1 and linear[0].macs == 12 * 32 * 32
    # weight-only W4 K=2: the embedding tables (8-bit, first layers) are apart in the no-embeddings figure
    mem = rex.quantize(model, wbits=4, abits=None, order=2).rex_info.extra["memory"]
    assert mem["per_layer"]["embeddings.word_embeddings"] == pytest.approx(8 + 16 / 32)
    # per encoder layer: q, k, v, o (32x32, fan-in 32), intermediate (64x32, fan-in 32), output (32x64, fan-in
    # 64) at W4 K=2 = 8 + 2 x 16 / fan_in bits; the pooler (last, 32x32) at W8 = 8 + 16 / 32
    layer_bits = 4 * 1024 * (8 + 1) + 2048 * (8 + 1) + 2048 * (8 + 0.5)
    want = (2 * layer_bits + 1024 * 8.5) / (2 * 8192 + 1024)
    assert mem["bits_per_weight_no_embeddings"] == pytest.approx(want)
    assert mem["bits_per_weight_no_embeddings"] != pytest.approx(mem["bits_per_weight"])
