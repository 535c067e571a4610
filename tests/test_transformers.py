"""Text rows (issue 14): STS-B / WikiText-2 loaders, the Spearman and perplexity evaluators, the HQQ method.

Fast tests here need no model weights; tests/test_transformers_models.py runs the two real models.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import rex
from rex.data import get_dataset
from rex.data.text import STSB_PAIRS, TextCorpus, read_stsb
from rex.errors import ConfigError, DatasetError
from rex.evaluate.text import evaluate_perplexity, mean_pool, rankdata, spearman




def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 300).astype(float)  # many ties, like STS-B's gold scores
    b = a + rng.normal(0, 2, 300)
    assert np.allclose(rankdata(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_stsb_dev_bundled():
    ds = get_dataset("stsb_dev")
    assert len(ds) == STSB_PAIRS == 1500
    s1, s2, score = ds[0]
    assert (s1, s2, score) == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert all(0.0 <= p[2] <= 5.0 for p in ds.pairs)
    assert len(get_dataset("stsb_dev", limit=200)) == 200
    assert get_dataset("stsb_dev", limit=200)[199] == ds[199]


def test_stsb_bad_files(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    good = "0\tmain\tf\t2012\t1\tnone\tnone\tA cat.\tA dog.\t1.5\n"
    p = tmp_path / "dev.tsv"
    p.write_text(head + good + "1\tmain\tf\t2012\n")
    with pytest.raises(DatasetError, match="line 3 has 4 tab-separated fields"):
        read_stsb(p)
    p.write_text(head + good.replace("1.5", "7"))
    with pytest.raises(DatasetError, match="outside STS-B"):
        read_stsb(p)
    p.write_text(head + good)
    assert read_stsb(p) == [("A cat.", "A dog.", 1.5)]
    ds = get_dataset("stsb_dev", root=tmp_path)
    assert len(ds) == 1
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("stsb_dev", root=tmp_path / "nowhere")


def test_wikitext_crlf_to_lf_and_budget():
    c = get_dataset("wikitext2_test")
    assert "\r" not in c.text and c.text.startswith(" = Robert Boulter = \n Robert Boulter is an English")
    assert c.text.count("\n") == 2891  # one LF per CRLF of the file
    assert c.tokens == 2048 and c.window == 512 and len(c) == 4
    assert get_dataset("wikitext2_test", limit=1024).tokens == 1024


class _WordTokenizer:
    """Whitespace tokens with a vocabulary built on the fly: a prefix cut at a line end tokenizes like
    the start of the whole text, which is what TextCorpus.token_ids relies on."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_token_windows_equal_whole_text_tokenization():
    text = "".join(f"line {i} has words w{i % 7} and more\n" for i in range(3000))
    tok = _WordTokenizer()
    whole = tok(text)["input_ids"]
    corpus = TextCorpus(text, tokens=1000, window=100)
    ids = corpus.windows(tok)
    assert ids.shape == (10, 100)
    assert ids.flatten().tolist() == whole[:1000]
    with pytest.raises(ConfigError, match="smaller than one window"):
        corpus.windows(tok, window=2000)


class _Bigram(nn.Module):
    """A 'language model' whose logits are a fixed table per input token."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return {"logits": self.table[input_ids]}


def test_perplexity_is_exp_mean_nll():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    ids = torch.randint(0, 5, (3, 8))
    r = evaluate_perplexity(_Bigram(table), ids)
    logp = torch.log_softmax(table, -1)
    nll = -torch.stack([logp[ids[:, t], ids[:, t + 1]] for t in range(7)]).mean()
    assert r["n"] == 3 and r["window"] == 8 and r["n_tokens"] == 21 and r["tokens"] == 24
    assert r["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    uniform = evaluate_perplexity(_Bigram(torch.zeros(5, 5)), ids)
    assert uniform["perplexity"] == pytest.approx(5.0, rel=1e-6)  # uniform over 5 tokens


# ---------------------------------------------------------------------------------------------- HQQ

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64)).eval()


def test_hqq_weight_only_beats_rtn_at_3_bits(one_thread):
    pytest.importorskip("hqq")
    from rex.nn import QuantLayer

    m, ex = _mlp(), torch.zeros(1, 256)
    x = torch.randn(64, 256)
    with torch.no_grad():
        ref = m(x)
    errs = {}
    for gs in (None, 64):
        q = rex.quantize(m, method="hqq", wbits=3, abits=None, first_last="same", options={"group_size": gs},
                         example_input=ex)
        # QuantLayers like every method's, holding HQQ's weights (their bits and groups feed the cost model)
        assert all(isinstance(q[i], QuantLayer) and q[i].wbits == 3 and q[i].group_size == gs for i in (0, 2, 4))
        h = q.rex_info.extra["hqq"]
        assert [r["name"] for r in h["layers"]] == ["0", "2", "4"] and all(r["wbits"] == 3 for r in h["layers"])
        for i in (0, 2, 4):
            dw = (q[i].inner.weight - m[i].weight).detach()
            assert 0 < float(dw.abs().mean()) < 0.25 * float(m[i].weight.detach().abs().mean())
            assert torch.equal(q[i].inner.bias, m[i].bias)
        with torch.no_grad():
            errs[gs] = float((q(x) - ref).pow(2).mean())
        expected_bpw = 3 + 32 / 64 if gs == 64 else (3 + 32 / 256) * (256 * 512 + 256 * 64) / (256 * 512 * 2 + 256 * 64) \
            + (3 + 32 / 512) * (512 * 256) / (256 * 512 * 2 + 256 * 64)
        assert q.rex_info.extra["memory"]["bits_per_weight"] == pytest.approx(expected_bpw)
    rtn = rex.quantize(m, method="rtn", wbits=3, abits=None, first_last="same", example_input=ex)
    with torch.no_grad():
        err_rtn = float((rtn(x) - ref).pow(2).mean())
    assert errs[64] < errs[None] < err_rtn  # HQQ's optimised zero point; groups help further
    assert m[0].weight.grad is None and torch.equal(_mlp()[0].weight, m[0].weight)  # input untouched


def test_hqq_policy_and_errors(one_thread):
    pytest.importorskip("hqq")
    m, ex = _mlp(), torch.zeros(1, 256)
    q = rex.quantize(m, method="hqq", wbits=4, abits=None, example_input=ex)  # first_last="8bit" default
    assert [r["wbits"] for r in q.rex_info.extra["hqq"]["layers"]] == [8, 4, 8]
    q = rex.quantize(m, method="hqq", wbits=4, abits=None, first_last="fp", example_input=ex)
    assert [r["name"] for r in q.rex_info.extra["hqq"]["layers"]] == ["2"] and torch.equal(q[0].weight, m[0].weight)
    assert q.rex_info.extra["float_by_policy"] == ["0", "4"] and rex.activation_coverage(q)["act_layers"] == 1
    with pytest.raises(ConfigError, match="weight-only"):
        rex.quantize(m, method="hqq", wbits=4, abits=8, example_input=ex)
    with pytest.raises(ConfigError, match="order-1"):
        rex.quantize(m, method="hqq", wbits=4, abits=None, order=2, example_input=ex)
    with pytest.raises(ConfigError, match="did you mean 'group_size'"):
        rex.QuantSpec(method="hqq", abits=None, options={"groupsize": 64})
    with pytest.raises(ConfigError, match="multiple of 8"):
        rex.quantize(m, method="hqq", wbits=4, abits=None, options={"group_size": 12}, example_input=ex)


def test_hqq_unties_a_shared_weight(one_thread):
    """An LM head tied to the embedding: the head gets the quantized copy, the embedding stays float."""
    pytest.importorskip("hqq")

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(128, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 128, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    torch.manual_seed(0)
    m = Tied().eval()
    q = rex.quantize(m, method="hqq", wbits=3, abits=None, first_last="same",
                     example_input=torch.zeros(1, 4, dtype=torch.long))
    assert torch.equal(q.emb.weight, m.emb.weight)
    assert not torch.equal(q.head.inner.weight, m.emb.weight)
