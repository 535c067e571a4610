"""Conv1d and Conv3d are quantized like Conv2d (issue 13, item 8): per output channel, REx terms, BatchNorm1d / 3d
folded and used for the activation ranges, costed in BOPs, integer-exact; layer types still left float (LSTM, ...)
are counted, named, and shown in the tables."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rex
from rex.errors import ConfigError
from rex.expansion import error_bound
from rex.nn.layers import QuantConv1d, QuantConv3d, QuantLayer


def _set_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    """Trained-looking BN statistics (not the identity of a fresh BN), so folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)


class Net1d(nn.Module):
    """Conv1d + BN1d + ReLU (twice, the second grouped) -> global mean -> Linear: a small 1-D signal classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c2, self.b2 = nn.Conv1d(16, 16, 3, stride=2, padding=1, groups=4, bias=False), nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 5)
        _set_bn(self.b1, 1)
        _set_bn(self.b2, 2)

    def forward(self, x):  # (N, 4, 32)
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(-1))


class Net3d(nn.Module):
    """Conv3d + BN3d + ReLU (twice, the second grouped) -> global mean -> Linear: a small video-clip classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.c2, self.b2 = nn.Conv3d(8, 8, 3, stride=(1, 2, 2), padding=1, groups=2), nn.BatchNorm3d(8)
        self.fc = nn.Linear(8, 3)
        _set_bn(self.b1, 3)
        _set_bn(self.b2, 4)

    def forward(self, x):  # (N, 2, 4, 8, 8)
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3, 4)))


X1 = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(5)).clamp(-3, 3)
X3 = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(6)).clamp(-3, 3)
# MACs per sample, by hand: C_out x output length (or D x H x W) x C_in / groups x kernel size
MACS1 = {"c1": 16 * 32 * 4 * 5, "c2": 16 * 16 * (16 // 4) * 3, "fc": 16 * 5}
MACS3 = {"c1": 8 * (4 * 8 * 8) * 2 * 27, "c2": 8 * (4 * 4 * 4) * (8 // 2) * 27, "fc": 8 * 3}
CASES = [(Net1d, X1, MACS1, QuantConv1d), (Net3d, X3, MACS3, QuantConv3d)]
IDS = ["conv1d", "conv3d"]


def _q(net, x, **kw):
    kw = {"method": "rex", "first_last": "same", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("error", rex.api.FloatLayersWarning)  # nothing may be left float here
        return rex.quantize(net.eval(), example_input=x, input_range=(-3, 3), **kw)


@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_every_conv_is_quantized_bn_folded_and_ranged(net, x, macs, cls):
    q = _q(net(), x, wbits=4, abits=8)
    assert isinstance(q.c1, cls) and isinstance(q.c2, cls) and isinstance(q.fc, QuantLayer)
    assert q.rex_info.folded == [("c1", "b1"), ("c2", "b2")]
    assert isinstance(q.b1, nn.Identity) and isinstance(q.b2, nn.Identity)
    assert q.rex_info.extra["float_layers"] == {}
    # every input quantized: the network input from input_range, the others from the folded BN (beta +- 6|gamma|)
    assert q.rex_info.extra["float_inputs"]["count"] == 0
    beta, gamma = net().b1.bias.detach(), net().b1.weight.detach()
    hi = float((beta + 6 * gamma).max())
    assert q.c2.act.lo == 0.0 and q.c2.act.hi == pytest.approx(hi) and not q.c2.act.signed
    assert [r["kind"] for r in rex.report(q)] == [net().c1.__class__.__name__] * 2 + ["Linear"]


@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_bops_are_macs_times_bits_by_hand(net, x, macs, cls):
    from rex.cost import cost_table

    table = {r.name: r for r in cost_table(_q(net(), x, wbits=4, abits=8), x)}
    assert {k: r.macs for k, r in table.items()} == macs
    assert rex.bops(_q(net(), x, wbits=4, abits=8), x) == sum(macs.values()) * 4 * 8
    assert rex.bops(_q(net(), x, wbits=4, abits=8, order=2), x) == sum(macs.values()) * 4 * 8 * 2
    assert rex.bops(net().eval(), x) == sum(macs.values()) * 32 * 32  # the float model, 32 x 32
    # a budget of 1.5x the plain BOPs is met from below
    b = rex.bops(_q(net(), x, wbits=4, abits=8, order=2, budget=1.5), x)
    assert sum(macs.values()) * 32 < b <= sum(macs.values()) * 32 * 1.5
    # size: 4 bits per weight + one 32-bit scale per output channel, float biases
    q = _q(net(), x, wbits=4, abits=None)
    c2 = q.c2.inner
    assert q.c2.size_bits() == c2.weight.numel() * 4 + c2.out_channels * 32


@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_rex_order_two_beats_order_one_within_the_bound(net, x, macs, cls):
    ref = net().eval()
    folded = _q(net(), x, wbits=16, abits=None, method="rtn")  # the BN-folded float weights, ~exactly
    with torch.no_grad():
        y = ref(x)
        errs = []
        for k in (1, 2):
            q = _q(net(), x, wbits=3, abits=None, order=k)
            errs.append(float((q(x) - y).abs().max()))
            for name in ("c1", "c2", "fc"):
                layer = getattr(q, name)
                w = getattr(folded, name).dequantized_weight()
                err = (layer.dequantized_weight() - w).flatten(1).abs().amax(1)
                assert (err <= error_bound(w, 3, k) * (1 + 1e-4) + 1e-6).all(), (name, k)
                assert layer.bound_ok
    assert errs[1] < errs[0] / 2, errs


def _int64_conv_nd(qx: torch.Tensor, qw: torch.Tensor, stride, padding, groups: int) -> torch.Tensor:
    """An N-d convolution in int64 arithmetic: for every kernel offset, the shifted (strided) input slice
    times that offset's weights, summed; the reference an integer kernel computes."""
    nd = qw.dim() - 2
    qx = qx.round().to(torch.int64)
    qw = qw.to(torch.int64)
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    xp = F.pad(qx, pad)
    b, cin = qx.shape[:2]
    cout, cin_g, *k = qw.shape
    out_size = [(xp.shape[2 + i] - k[i]) // stride[i] + 1 for i in range(nd)]
    out = torch.zeros(b, cout, *out_size, dtype=torch.int64)
    opg = cout // groups
    for off in torch.cartesian_prod(*[torch.arange(n) for n in k]).reshape(-1, nd).tolist():
        sl = [slice(off[i], off[i] + stride[i] * (out_size[i] - 1) + 1, stride[i]) for i in range(nd)]
        patch = xp[(slice(None), slice(None), *sl)]  # [b, cin, *out]
        for g in range(groups):
            wg = qw[(slice(g * opg, (g + 1) * opg), slice(None), *off)]  # [opg, cin_g]
            xg = patch[:, g * cin_g:(g + 1) * cin_g]
            out[:, g * opg:(g + 1) * opg] += torch.einsum("oc,bc...->bo...", wg, xg)
    return out


@pytest.mark.parametrize("wbits,abits", [(4, 8), (8, 8), (12, 8)])  # the f32, f32-digits and f64 paths
@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_integer_mode_equals_an_int64_reference(net, x, macs, cls, wbits, abits):
    q = _q(net(), x, wbits=wbits, abits=abits, order=2, mode="int")
    feats = {}
    hooks = [getattr(q, n).register_forward_pre_hook(lambda m, a, n=n: feats.__setitem__(n, a[0])) for n in ("c1", "c2")]
    with torch.no_grad():
        y_int = q(x)
    for h in hooks:
        h.remove()
    for name in ("c1", "c2"):
        layer = getattr(q, name)
        inp = feats[name]
        qx = layer.act.to_int(inp)
        accs = layer.int_accumulators(inp)
        assert len(accs) == 2
        for k, acc in enumerate(accs):
            qk, _, _, m = layer.term(k)
            ref = _int64_conv_nd(qx, qk.to(torch.int64) * m.view([-1] + [1] * (qk.dim() - 1)).to(torch.int64),
                                 layer.inner.stride, layer.inner.padding, layer.inner.groups)
            assert torch.equal(acc, ref), (name, k)
    # the integer model agrees with the fake-quant one to float rounding
    with torch.no_grad():
        for layer in q.modules():
            if isinstance(layer, QuantLayer):
                layer.mode = "fake"
        y_fake = q(x)
    assert (y_int - y_fake).abs().max() <= 1e-4 * y_fake.abs().max()


@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_w16_is_float(net, x, macs, cls):
    with torch.no_grad():
        y = net().eval()(x)
        yq = _q(net(), x, wbits=16, abits=16)(x)
    assert (yq - y).abs().max() <= 1e-3 * y.abs().max()


@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_ensembles_run_conv_members(net, x, macs, cls):
    from rex.ensemble import BatchedEnsemble, EnsembleModel

    q = _q(net(), x, wbits=4, abits=8, order=3)
    with torch.no_grad():
        a, b = EnsembleModel(q)(x), BatchedEnsemble(q)(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert (a - q(x)).abs().max() < 0.1 * q(x).abs().max()  # a fair approximation of the expansion at W4


def test_a_pure_conv1d_model_is_quantized():
    m = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 20)
    q = rex.quantize(m, method="rtn", wbits=8, abits=8, example_input=x)
    assert isinstance(q[0], QuantConv1d) and isinstance(q[2], QuantConv1d)
    # W8 weights; both inputs float: no input_range for the first, no BatchNorm (no data-free range) before the second
    assert rex.bops(q, x) == (8 * 18 * 3 * 3 + 4 * 16 * 8 * 3) * 8 * 32
    assert q.rex_info.extra["float_inputs"]["count"] == 2
    # without an example input the sequence length is unknown: the error names the shape to pass
    with pytest.raises(ConfigError, match=r"Conv1d: pass example_input of shape \(N, 3, L\)"):
        rex.quantize(m, method="rtn", wbits=8, abits=8)


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(6, 12, batch_first=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):  # (N, T, 6)
        h, _ = self.lstm(x)
        return self.fc(h[:, -1])


def test_an_lstm_is_counted_and_shown_in_the_table_row(tmp_path):
    from rex import runner
    from rex.pipeline.aggregate import aggregate
    from rex.pipeline.report import write_tables

    x = torch.randn(2, 7, 6)
    with pytest.warns(rex.api.FloatLayersWarning, match=r"LSTM x1 \(lstm\)"):
        q = rex.quantize(_LSTMNet().eval(), method="rtn", wbits=8, abits=8, example_input=x)
    assert q.rex_info.extra["float_layers"] == {"LSTM": ["lstm"]}
    details: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rex.api.FloatLayersWarning)
        runner._quantize_into(details, _LSTMNet().eval(), rex.QuantSpec(method="rtn", wbits=8, abits=8), x, None)
    assert details["float_layers"] == 1 and details["float_layer_names"] == {"LSTM": ["lstm"]}
    dirs = []
    for label, method, w, a, det in [("method=fp32,w=32,a=32,K=1", "fp32", 32, 32, {}),
                                     ("method=rtn,w=8,a=8,K=1", "rtn", 8, 8, details)]:
        d = tmp_path / "runs" / "classification" / "toy" / label
        d.mkdir(parents=True)
        rec = {"status": "ok", "task": "classification", "model": "toy", "label": label, "method": method,
               "wbits": w, "abits": a, "order": 1, "budget": None, "n": 100, "bops": 10**6,
               "metrics": {"top1": 50.0, "top5": 90.0, "agreement": 90.0, "kl": 0.1}, "fp32": {"top1": 50.0},
               "protocol": {}, "git": {"commit": "abc"},
               "details": json.loads(json.dumps({k: v for k, v in det.items() if k != "notes"}, default=str))}
        (d / "metrics.json").write_text(json.dumps(rec))
        dirs.append(d)
    summary, jobs = tmp_path / "summary.csv", tmp_path / "jobs.csv"
    aggregate(dirs, summary, jobs)
    import csv

    srows = list(csv.DictReader(open(summary)))
    assert {r["method"]: r["float_layers"] for r in srows} == {"fp32": "", "rtn": "1"}
    jrows = {r["method"]: r for r in csv.DictReader(open(jobs))}
    assert jrows["rtn"]["float_layers"] == "1" and jrows["rtn"]["float_layer_names"] == "LSTM: lstm"
    write_tables(summary, jobs, "classification", "toy", tmp_path / "t")
    md = (tmp_path / "t.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| Method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[5:7] == ["Float in", "Float layers"]
    row = next(line for line in md if line.startswith("| RTN"))
    assert [c.strip() for c in row.strip("|").split("|")][6] == "1"
    fp = next(line for line in md if line.startswith("| FP32"))
    assert [c.strip() for c in fp.strip("|").split("|")][6] == "-"
    assert "Layers left float (not quantized, not in G-BOPs): LSTM: lstm" in md
    tcsv = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["float_layers"] for r in tcsv] == ["", "1"]


def test_every_type_left_float_is_counted():
    """The count comes from the quantized model, not from a list of known types: a GRU and an attention's
    packed in-projection are counted as well, and a Conv1d no longer is."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(6, 6, 1)
            self.gru = nn.GRU(6, 6, batch_first=True)
            self.att = nn.MultiheadAttention(6, 2, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):  # (N, T, 6)
            h = self.conv(x.transpose(1, 2)).transpose(1, 2)
            h, _ = self.gru(h)
            h, _ = self.att(h, h, h)
            return self.fc(h[:, -1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rex.api.FloatLayersWarning)
        q = rex.quantize(M().eval(), method="rtn", wbits=8, abits=None, example_input=torch.randn(1, 5, 6))
    # nn.MultiheadAttention reads its out_proj's weight directly (never calls the Linear): both stay float, and
    # both are named
    assert q.rex_info.extra["float_layers"] == {"GRU": ["gru"], "MultiheadAttention": ["att"],
                                                "NonDynamicallyQuantizableLinear": ["att.out_proj"]}
    assert isinstance(q.conv, QuantConv1d) and isinstance(q.fc, QuantLayer)
    assert math.isfinite(float(q(torch.randn(1, 5, 6)).abs().sum()))


@pytest.mark.parametrize("net,x,macs,cls", CASES, ids=IDS)
def test_int8_kernels_run_conv1d_and_conv3d(net, x, macs, cls):
    """PyTorch's quantized Conv1d / Conv3d kernels serve the layers as they serve Conv2d: each term's int32
    accumulation is the simulation's; only the output requantization (half an output step per term, and the clamp
    to the data-free output range) differs. Checked on c2, whose input is unsigned (after ReLU): a signed input
    (c1's, shifted by a zero point of 128) loses accuracy on the x86 kernels for Conv2d as much (their int16
    pairwise sums saturate), a limit of the backend, not of the rank."""
    from rex.backends.int8 import Int8Backend, copy_with_mode, to_int8_backend

    q = copy_with_mode(_q(net(), x, wbits=8, abits=8, order=2), "int")
    assert to_int8_backend(q)[1]["int8_layers"] == 2  # c1, c2; the logits layer has no output range
    feats = {}
    hook = q.c2.register_forward_pre_hook(lambda m, a: feats.__setitem__("c2", a[0]))
    with torch.no_grad():
        q(x)
        hook.remove()
        for name in ("c2",):
            layer = getattr(q, name)
            kernel = Int8Backend(layer)
            a, b = kernel(feats[name]), layer(feats[name])
            lo, hi = layer.out_range
            inside = (b >= min(lo, 0.0)) & (b <= max(hi, 0.0))
            half_steps = sum(t.mod.scale for t in kernel.terms) / 2
            assert inside.float().mean() > 0.5
            assert float((a - b)[inside].abs().max()) <= half_steps * 1.01 + 1e-6, name


def test_layers_float_by_policy_are_not_counted_as_left_float():
    """'Float layers' counts what rex could not quantize: not the first/last layers a policy keeps float on
    purpose (planned, costed 32 x 32 in the BOPs, stated in the protocol), with RTN or HQQ."""
    pytest.importorskip("hqq")
    m = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    x = torch.randn(1, 3, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rex.api.FloatLayersWarning)
        q = rex.quantize(m.eval(), method="rtn", wbits=4, abits=None, first_last="fp", example_input=x)
        assert q.rex_info.extra["float_layers"] == {} and isinstance(q[2], QuantConv1d)
        for fl in ("fp", "same"):
            q = rex.quantize(m.eval(), method="hqq", wbits=4, abits=None, first_last=fl, example_input=x)
            assert q.rex_info.extra["float_layers"] == {}, fl
    assert isinstance(q[2], QuantConv1d) and [r["name"] for r in q.rex_info.extra["hqq"]["layers"]] == ["0", "2", "5"]
    assert (q[2].inner.weight - m[2].weight).abs().max() > 0  # the Conv1d weight really was quantized by HQQ


@pytest.mark.parametrize("pools,x", [((nn.MaxPool1d(2), nn.AdaptiveAvgPool1d(1)), torch.randn(1, 4, 32)),
                                     ((nn.MaxPool3d(2), nn.AdaptiveAvgPool3d(1)), torch.randn(1, 4, 4, 8, 8))],
                         ids=["1d", "3d"])
def test_ranges_and_equalization_pass_through_1d_and_3d_pooling(pools, x):
    conv = nn.Conv1d if x.dim() == 3 else nn.Conv3d
    bn = nn.BatchNorm1d if x.dim() == 3 else nn.BatchNorm3d
    m = nn.Sequential(conv(4, 8, 3, padding=1), bn(8), nn.ReLU(), pools[0], conv(8, 8, 3, padding=1), bn(8),
                      nn.ReLU(), pools[1], nn.Flatten(), nn.Linear(8, 3)).eval()
    _set_bn(m[1], 7)
    _set_bn(m[5], 8)
    q = rex.quantize(m, method="dfq", wbits=8, abits=8, first_last="same", example_input=x, input_range=(-3, 3))
    assert q.rex_info.extra["float_inputs"]["count"] == 0, q.rex_info.notes  # the pooled inputs have ranges
    assert q.rex_info.transforms["equalize"]["pairs"] == [("0", "4"), ("4", "9")]
    with torch.no_grad():
        y, yq = m(x), q(x)
    assert (yq - y).abs().max() < 0.05 * y.abs().max()


def test_weight_only_without_example_input_leaves_attention_out_proj_float():
    """Planned without a forward pass, nn.MultiheadAttention's out_proj was swapped for a QuantLayer, and the
    model's forward then failed ('QuantLinear' object has no attribute 'weight'): the attention reads that weight
    itself. It stays float now, counted and named like the traced plan does."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h, _ = self.att(x, x, x)
            return self.fc(h[:, -1])

    m = M().eval()
    with pytest.warns(rex.api.FloatLayersWarning, match="att.out_proj"):
        q = rex.quantize(m, method="rtn", wbits=8, abits=None)
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        assert (q(x) - m(x)).abs().max() < 0.05 * m(x).abs().max()
    assert isinstance(q.fc, QuantLayer)


def test_a_bare_recurrent_layer_is_named():
    with pytest.raises(ConfigError, match=r"nothing to quantize; .*GRU x1 \(<model>\)"):
        rex.quantize(nn.GRU(3, 3), method="rtn", example_input=torch.zeros(2, 3))


@pytest.mark.parametrize("conv,x", [(nn.Conv1d(3, 4, 3, padding=1), torch.randn(3, 10)),
                                    (nn.Conv2d(3, 4, 3, padding=1), torch.randn(3, 6, 6)),
                                    (nn.Conv3d(3, 4, 3, padding=1), torch.randn(3, 4, 4, 4))], ids=["1d", "2d", "3d"])
def test_unbatched_conv_input_runs_in_integer_mode(conv, x):
    """torch convolutions accept an unbatched input (C, *spatial); the integer path failed on it."""
    m = nn.Sequential(nn.ReLU(), conv).eval()
    q = rex.quantize(m, method="rex", wbits=8, abits=8, order=2, first_last="same", mode="int", example_input=x,
                     input_range=(-3, 3))
    with torch.no_grad():
        y, yq = m(x), q(x)
        fake = rex.quantize(m, method="rex", wbits=8, abits=8, order=2, first_last="same", example_input=x,
                            input_range=(-3, 3))(x)
    assert yq.shape == y.shape and (yq - fake).abs().max() <= 1e-4 * fake.abs().max()
    accs = q[1].int_accumulators(q[0](x))
    assert len(accs) == 2 and accs[0].shape == y.shape
