"""The op graph (rex.graph): one recording, every rule set (ranges, equalization pairs, BN moments) run over it."""
import torch
import torch.nn.functional as F
from torch import nn

from rex.graph import record
from rex.trace import RANGE_RULES, ranges, trace
from rex.transforms import fold_batchnorm
from rex.transforms.bias_correction import expected_inputs
from rex.transforms.equalize import dataflow_of, find_pairs


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.act(self.bn1(self.c1(x)))
        z = self.bn2(self.c2(y))
        z = F.softplus(z)  # no range rule, no moment rule
        w = F.relu(self.c3(y)) + z
        return self.fc(w.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    return net


X = torch.randn(1, 3, 8, 8)


def test_record_keeps_order_producers_and_consumers():
    g = record(_net(), X)
    assert g.order == ["c1", "c2", "c3", "fc"]
    assert g.conv_bn_pairs() == [("c1", "bn1"), ("c2", "bn2")]
    calls = {n.layer: n for n in g.calls() if n.layer}
    relu6 = g.nodes[calls["c1"].consumers[0]]  # c1 -> batch_norm -> hardtanh (the ReLU6 module)
    relu6 = g.nodes[relu6.consumers[0]]
    assert relu6.op == "hardtanh" and relu6.module == "act"
    assert sorted(g.nodes[c].layer for c in relu6.consumers) == ["c2", "c3"]  # y feeds both branches
    out = [n for n in g.calls() if -1 in n.consumers]
    assert [n.layer for n in out] == ["fc"]


def test_every_rule_set_runs_over_one_recording():
    """Ranges, pairs and moments from one graph equal those of separate passes (the old three tracers)."""
    net = _net()
    g = record(net, X)
    a, b = ranges(g, 4.0, (-1.0, 1.0)), trace(net, X, 4.0, (-1.0, 1.0))
    assert a.order == b.order and a.input_range == b.input_range and a.conv_bn == b.conv_bn
    assert a.input_range["c2"] == (0.0, 6.0)  # ReLU6 of the BN interval
    assert a.input_range["fc"] is None  # softplus has no range rule
    assert [(p.first, p.second) for p in find_pairs(net, graph=g)] == [(p.first, p.second) for p in find_pairs(net, X)]
    fr = fold_batchnorm(net, X)  # the moments are read on the folded model (BN statistics per conv output)
    f, stats = fr.model, fr.output_stats
    ea, eb = expected_inputs(f, graph=record(f, X), output_stats=stats), expected_inputs(f, X, stats)
    assert set(ea) == set(eb) == {"c1", "c2", "c3", "fc"}
    assert all((ea[k] is None and eb[k] is None) or torch.equal(ea[k], eb[k]) for k in ea)
    assert ea["c2"] is not None and ea["fc"] is None  # the softplus branch loses the moments


def test_an_op_without_a_rule_is_an_explicit_unknown():
    g = record(_net(), X)
    tr = ranges(g, 4.0)
    assert "softplus" not in RANGE_RULES
    assert "softplus" in tr.unknown.values()
    assert not {"conv2d", "linear", "batch_norm", "hardtanh", "relu", "add", "mean"} & set(tr.unknown.values())
    df = dataflow_of(g)
    assert {n.op for n in df.nodes} >= {"conv2d", "batch_norm", "softplus", "linear"}


# ------------------------------------------------------------------ no silent catch-alls (issue 12 item 6)


def test_ops_without_a_rule_are_recorded_in_the_notes():
    """The softplus branch: no range for the fc input and no bias correction for fc, both said in the notes."""
    import rex

    q = rex.quantize(_net(), method="dfq", wbits=4, abits=8, example_input=X, input_range=(-3.0, 3.0))
    notes = q.rex_info.notes
    assert "no range: softplus (1)" in notes
    bias = [n for n in notes if n.startswith("no bias correction: ")]
    # c1: the network input; fc: behind the softplus
    assert bias == ["no bias correction: E[x] of the input unknown without data: c1, fc; moments lost at: softplus (1)"]
    assert "fc" in q.rex_info.transforms["bias_correction"]["skipped"]


def test_a_broken_rule_raises(monkeypatch):
    """A rule that fails is a bug: it raises instead of turning into a float input or a skipped correction."""
    import pytest

    import rex
    from rex import trace as trace_mod
    from rex.transforms import bias_correction as bc

    def broken(*a, **k):
        raise ZeroDivisionError("broken rule")

    monkeypatch.setitem(trace_mod.RANGE_RULES, "hardtanh", broken)
    with pytest.raises(ZeroDivisionError):
        rex.quantize(_net(), method="rtn", example_input=X)
    monkeypatch.undo()
    monkeypatch.setitem(bc.MOMENT_RULES, "relu", broken)
    with pytest.raises(ZeroDivisionError):
        rex.quantize(_net(), method="dfq", example_input=X)


def test_moments_with_mismatched_channels_are_an_explicit_unknown():
    from rex.transforms.bias_correction import moment_rules

    class Tokens(nn.Module):  # a Linear over the last dim of a 3-d tensor whose dim 1 carries the moments
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 6, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.c(x)).flatten(2))

    net = Tokens().eval()
    stats = {"c": (torch.zeros(6), torch.ones(6))}
    r = moment_rules(net, torch.randn(1, 3, 2, 2), stats)
    assert r.expected["fc"] is None
    assert "linear fc: input moments for 6 channels, it reads 4" in r.unknown.values()


def test_op_name_sets_derive_from_the_one_rank_generic_table_in_graph():
    # the range (trace), equalization and moment rule sets are built from rex.graph's name table: every
    # rank of a pool / dropout is in each set that takes that kind, and the sets differ only where the maths does
    from rex import graph
    from rex.trace import _PASSTHROUGH
    from rex.transforms.bias_correction import _KEEP_MEAN
    from rex.transforms.equalize import HOMOGENEOUS, SHIFT_COMMUTING

    for d in (1, 2, 3):
        pools = {f"max_pool{d}d", f"avg_pool{d}d", f"adaptive_max_pool{d}d", f"adaptive_avg_pool{d}d"}
        assert pools <= _PASSTHROUGH and pools <= HOMOGENEOUS
        assert {f"max_pool{d}d", f"adaptive_max_pool{d}d", f"adaptive_avg_pool{d}d"} <= SHIFT_COMMUTING
        assert f"avg_pool{d}d" not in SHIFT_COMMUTING  # zero padding does not commute with a shift
        assert {f"avg_pool{d}d", f"adaptive_avg_pool{d}d", f"dropout{d}d"} <= _KEEP_MEAN
        assert f"max_pool{d}d" not in _KEEP_MEAN  # a max moves the mean
        assert f"dropout{d}d" in HOMOGENEOUS and f"dropout{d}d" in SHIFT_COMMUTING
    assert graph.POOLS <= _PASSTHROUGH and graph.IDENTITY_OPS <= _PASSTHROUGH & HOMOGENEOUS & _KEEP_MEAN
    assert SHIFT_COMMUTING <= HOMOGENEOUS
