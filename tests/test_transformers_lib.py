"""rex.quantize on Hugging Face transformers (issue 14 item 1, library part): dict / tuple example inputs,
weight-only specs without an example input, GPT-2 Conv1D quantized per output feature like nn.Linear,
embeddings and LM head under the first/last policy. Tiny models built from configs (random init, no
download)."""
import pytest
import torch
from torch import nn

import rex
from rex.errors import ConfigError
from rex.nn.layers import QuantConv1D, QuantEmbedding, QuantLayer, QuantLinear

transformers = pytest.importorskip("transformers")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _gpt2(lm_head=False):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=99, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(cfg).eval()


def _ids(batch=2, tokens=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (batch, tokens), generator=g)
    return ids, torch.ones_like(ids)


def test_gpt2_conv1d_is_quantized_per_output_feature_like_linear():
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8
    q = rex.quantize(model, wbits=4, abits=None, order=2, first_last="same")
    for name, conv in convs.items():
        layer = q.get_submodule(name)
        assert isinstance(layer, QuantConv1D), name
        w = conv.weight.detach()  # (in, out): output features are the columns
        lin = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(w.t())
        ql = rex.quantize(nn.Sequential(lin), wbits=4, abits=None, order=2, first_last="same")[0]
        assert isinstance(ql, QuantLinear)
        assert torch.equal(layer.inner.weight, ql.inner.weight.t())  # identical numbers, stored transposed
        # one scale per output feature, from that feature's column
        assert torch.allclose(layer.s0, w.abs().amax(0) / 7)
    ids, _ = _ids()
    assert (q(ids).last_hidden_state - model(ids).last_hidden_state).abs().max() < 0.5


def test_gpt2_conv1d_integer_mode_matches_fake():
    model = _gpt2()
    ids, mask = _ids()
    ex = dict(input_ids=ids, attention_mask=mask)
    fake = rex.quantize(model, wbits=4, abits=None, order=2, first_last="same", example_input=ex)
    exact = rex.quantize(model, wbits=4, abits=None, order=2, first_last="same", example_input=ex, mode="int")
    a, b = fake(**ex).last_hidden_state, exact(**ex).last_hidden_state
    assert (a - b).abs().max() < 1e-3


def test_weight_only_needs_no_example_input_and_plans_module_order():
    model = _bert()
    q = rex.quantize(model, wbits=4, abits=None, order=2)  # BertModel cannot run on a float tensor
    plans = {p.name: p for p in q.rex_info.plans}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert len(linears) == 2 * 6 + 1 and len(embeddings) == 3
    assert set(plans) == set(linears) | set(embeddings)
    assert all(isinstance(q.get_submodule(n), QuantLayer) for n in plans)
    assert q.rex_info.extra["planned_from"].startswith("module order")
    assert plans["encoder.layer.0.attention.self.query"].macs == 32 * 32  # per token
    assert plans["encoder.layer.0.attention.self.query"].role == "body"
    assert plans["pooler.dense"].role == "last" and plans["pooler.dense"].wbits == 8
    ids, mask = _ids()
    out = q(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 12, 32) and torch.isfinite(out).all()


def test_activation_spec_on_a_transformer_without_example_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="example_input"):
        rex.quantize(_bert(), wbits=4, abits=8)


def test_dict_and_tuple_example_inputs_count_tokens():
    model = _bert()
    ids, mask = _ids(batch=1, tokens=10)
    qd = rex.quantize(model, wbits=4, abits=None, example_input=dict(input_ids=ids, attention_mask=mask))
    qt = rex.quantize(model, wbits=4, abits=None, example_input=(ids, mask))
    md = {p.name: p.macs for p in qd.rex_info.plans}
    mt = {p.name: p.macs for p in qt.rex_info.plans}
    assert md == mt
    assert md["encoder.layer.0.intermediate.dense"] == 10 * 32 * 64
    assert md["embeddings.word_embeddings"] == 0
    assert rex.bops(qd, (ids, mask)) == rex.bops(qt, dict(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("policy", ["8bit", "same", "fp"])
def test_embeddings_and_lm_head_follow_the_first_last_policy(policy):
    model = _gpt2(lm_head=True)
    q = rex.quantize(model, wbits=3, abits=None, order=2, first_last=policy)
    wte, head = q.transformer.wte, q.lm_head
    if policy == "fp":
        assert type(wte) is nn.Embedding and type(head) is nn.Linear
        assert torch.equal(wte.weight, model.transformer.wte.weight)
        return
    assert isinstance(wte, QuantEmbedding) and isinstance(head, QuantLinear)
    want_bits, want_order = (8, 1) if policy == "8bit" else (3, 2)
    for layer in (wte, head, q.transformer.wpe):
        assert (layer.wbits, layer.order) == (want_bits, want_order)
    # an embedding is quantized per row (one scale per token vector)
    w = model.transformer.wte.weight.detach()
    assert torch.allclose(wte.s0, w.abs().amax(1) / (2 ** (want_bits - 1) - 1))
    body = q.transformer.h[0].attn.c_attn
    assert (body.wbits, body.order) == (3, 2)
    ids, _ = _ids()
    assert torch.isfinite(q(ids).logits).all()
