"""HQQ (rex.methods.hqq): the library's own codes on any output count, and a cost like every weight-only row.

- HQQLinear packs its codes in pairs of rows at 4 bits (fours at 2 bits): it fails on an odd output count per
  channel (a 7-, 33-output Linear, a 1-output regression head) and on 10 rows at W2 (the Fashion-MNIST ViT's head).
  rex calls the library's Quantizer unpacked: the same codes, scales and zero points, for every shape.
- HQQ's layers are QuantLayers carrying their bits and groups: BOPs b_w x 32 per MAC like RTN's weight-only
  rows (not 32 x 32), bits per weight with HQQ's 16-bit scale and 16-bit (float) zero point per group.
"""
import contextlib
import io
import math

import pytest
import torch
from torch import nn

import rex
from rex.errors import ConfigError
from rex.nn.layers import QuantLayer

pytest.importorskip("hqq")


def _library_dequantized(w: torch.Tensor, bits: int, group_size) -> torch.Tensor:
    """HQQLinear's own quantize -> dequantize of w [out, in] (bit packing on: the shape must suit it)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with contextlib.redirect_stdout(io.StringIO()):
        h = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=torch.float32,
                      device="cpu", del_orig=False)
        return h.dequantize().float()


@pytest.mark.parametrize("out_f,bits,gs,pad", [(8, 4, None, 0), (8, 3, 64, 0), (7, 4, None, 1), (33, 4, None, 1),
                                               (7, 4, 64, 1), (6, 2, None, 2), (10, 2, None, 2), (1, 4, None, 1)])
def test_codes_are_the_librarys_for_every_output_count(out_f, bits, gs, pad, one_thread):
    """Exactly HQQLinear's weights: directly where its packing takes the shape, else those of the matrix padded
    with zero rows to a shape it packs, cropped (rows are quantized independently; a zero row adds 0 to the
    solver's error sum)."""
    from rex.methods.hqq import hqq_qtensor

    torch.manual_seed(out_f)
    w = torch.randn(out_f, 128)
    qt, dq = hqq_qtensor(w, bits, gs)
    ref = _library_dequantized(torch.cat([w, torch.zeros(pad, 128)]), bits, gs)[:out_f]
    assert torch.equal(dq, ref)
    assert torch.equal(qt.dequantize(), dq)  # (q - zero) * scale of the QTensor the QuantLayer holds
    assert qt.q.shape == (out_f, 128) and int(qt.q.min()) >= 0 and int(qt.q.max()) <= 2**bits - 1
    assert qt.scale.shape == ((out_f,) if gs is None else (out_f, 128 // gs)) and qt.zero_bits == 16
    # the solver's zero points are floats off the integer grid (at W4 too, where HQQ rounds only its start):
    # stored as fp16, 16 bits each, not b bits like a min/max grid's integer zero point
    assert bool((qt.zero_point != qt.zero_point.round()).any())


@pytest.mark.parametrize("out_f,bits,gs", [(7, 4, None), (33, 4, None), (7, 4, 64), (6, 2, None)])
def test_odd_output_counts_quantize(out_f, bits, gs, one_thread):
    """Failed on main inside hqq (RuntimeError: size of tensor a (3) must match ... (4)) at W4 per channel."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, out_f)).eval()
    x = torch.randn(4, 64)
    kw = {} if gs is None else dict(granularity="per_group", group_size=gs)
    q = rex.quantize(m, method="hqq", wbits=bits, abits=None, first_last="same", example_input=x, **kw)
    assert isinstance(q[2], QuantLayer) and q[2].wbits == bits
    w = m[2].weight.detach()
    pad = (-out_f) % (2 if bits == 4 else 4)
    assert torch.equal(q[2].inner.weight, _library_dequantized(torch.cat([w, torch.zeros(pad, 64)]), bits, gs)[:out_f])
    with torch.no_grad():
        assert torch.allclose(q(x), q[2](q[1](q[0](x))))


def test_real_models_with_odd_heads(one_thread):
    """The Fashion-MNIST ViT (its 10-class head at W2: 10 rows do not pack by 4) and a BERT regression head
    (1 output, STS-B style, at W4): both failed on main inside hqq with first_last='same'."""
    from rex.models.vit import vit_fmnist

    torch.manual_seed(0)
    vit = vit_fmnist().eval()
    x = torch.zeros(1, 1, 28, 28)
    q = rex.quantize(vit, method="hqq", wbits=2, abits=None, first_last="same", example_input=x)
    assert isinstance(q.head, QuantLayer) and q.head.wbits == 2 and q.head.inner.weight.shape == (10, 64)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=1)
    bert = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(1))
    q = rex.quantize(bert, method="hqq", wbits=4, abits=None, first_last="same",
                     example_input={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert isinstance(q.classifier, QuantLayer) and q.classifier.inner.weight.shape == (1, 32)


def test_unsupported_bits_is_one_line_naming_the_layer(one_thread):
    """HQQ has no 7-bit (or > 8-bit) grid: refused before the solver runs, naming the layer (main: hqq's
    AssertionError 'nbits=7 not supported.')."""
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.zeros(1, 16)
    with pytest.raises(ConfigError, match=r"layer 0 \(first\).*2, 3, 4, 5, 6, 8 bits") as e:
        rex.quantize(m, method="hqq", wbits=7, abits=None, first_last="same", example_input=x)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"layer 0 \(first\) would get 12 bits"):
        rex.quantize(m, method="hqq", wbits=12, abits=None, example_input=x)  # 8bit policy: max(8, 12)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64)).eval()


def test_costed_like_rtn_weight_only(one_thread):
    """HQQ W3 per group 64 costs the BOPs of RTN W3 weight-only per group 64 (b_w x 32 per MAC; main: 32 x 32,
    the float model's), and its bits per weight are counted by hand: per group of 64 weights one 16-bit scale
    and one 16-bit zero point (HQQ keeps both as fp16; its zero point is a float off the grid). RTN's
    asymmetric grid counts its integer zero point at b bits, its symmetric one has none."""
    from rex.runner import _quantize_into

    m, x = _mlp(), torch.zeros(1, 128)
    macs = [128 * 256, 256 * 128, 128 * 64]
    for fl, bits in (("same", (3, 3, 3)), ("8bit", (8, 3, 8))):
        kw = dict(wbits=3, abits=None, granularity="per_group", group_size=64, first_last=fl)
        h = rex.quantize(m, method="hqq", example_input=x, **kw)
        r = rex.quantize(m, method="rtn", example_input=x, **kw)
        assert rex.bops(h, x) == rex.bops(r, x) == sum(n * b * 32 for n, b in zip(macs, bits))
        assert rex.bops(h, x) < rex.bops(m, x) == sum(macs) * 32 * 32
        bpw = sum(n * (b + (16 + 16) / 64) for n, b in zip(macs, bits)) / sum(macs)
        assert h.rex_info.extra["memory"]["bits_per_weight"] == pytest.approx(bpw)
        if fl == "same":
            assert bpw == 3.5
            assert r.rex_info.extra["memory"]["bits_per_weight"] == 3 + 16 / 64  # symmetric: a scale per group
            ra = rex.quantize(m, method="rtn", example_input=x, symmetric=False, **kw)
            assert ra.rex_info.extra["memory"]["bits_per_weight"] == 3 + (16 + 3) / 64
    # per channel: one scale and one zero point per row of C_in weights
    h = rex.quantize(m, method="hqq", wbits=3, abits=None, first_last="same", example_input=x)
    fan = [128, 256, 128]
    assert h.rex_info.extra["memory"]["bits_per_weight"] == pytest.approx(
        sum(n * (3 + 32 / f) for n, f in zip(macs, fan)) / sum(macs))
    # the pipeline's record (rex.runner, what python -m rex.pipeline.job writes)
    out: dict = {}
    spec = rex.QuantSpec(method="hqq", wbits=3, abits=None, granularity="per_group", group_size=64)
    _quantize_into(out, m, spec, x, None)
    assert out["bops"] == sum(n * b * 32 for n, b in zip(macs, (8, 3, 8)))
    assert out["bits_per_weight"] == pytest.approx(sum(n * (b + 0.5) for n, b in zip(macs, (8, 3, 8))) / sum(macs))
    assert out["layers_quantized"] == 3 and out["max_err"] > 0 and out["int32_safe"] is True
    assert out["float_layers"] == 0 and out["act_float"] == 3
    assert math.isclose(out["bops_ratio_vs_plain"], 1.0)


def test_int_mode_matches_fake(one_thread):
    """The QuantLayers run in mode='int' too (float input, integer codes minus float zero points)."""
    m, x = _mlp(), torch.randn(3, 128)
    f = rex.quantize(m, method="hqq", wbits=4, abits=None, first_last="same", example_input=x)
    i = rex.quantize(m, method="hqq", wbits=4, abits=None, first_last="same", mode="int", example_input=x)
    with torch.no_grad():
        assert torch.allclose(f(x), i(x), atol=1e-5)
