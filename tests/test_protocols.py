"""Native protocols (issue 12 item 5): each baseline paper's protocol as a named preset beside the shared one
(rex.protocols), resolved into QuantSpec, run by the engine, carried into the job's identity and every table row."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

import rex
from rex.errors import ConfigError
from rex.nn.layers import QuantLayer
from rex.noise_ranges import NOISE_BATCH, squant_range
from rex.paths import PROJECT_ROOT
from rex.protocols import GOVERNED, PRESETS, get_preset
from rex.spec import QuantSpec

EX = torch.zeros(1, 3, 32, 32)  # tracing shape only
IN_RANGE = (-2.2, 2.7)  # an ImageNet-normalised input's range


@pytest.fixture(scope="module")
def net():
    """MobileNetV2 (10 classes) with random weights and BatchNorm statistics that are not the defaults (a
    trained net's are not 0 / 1: the folded biases are then not zero)."""
    torch.manual_seed(0)
    m = mobilenet_v2(num_classes=10).eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
    return m


def _q(net, **kw):
    kw.setdefault("wbits", 4)
    kw.setdefault("abits", 8)
    return rex.quantize(net, example_input=EX, input_range=IN_RANGE, **kw)


def _layers(q) -> list[QuantLayer]:
    return [m for m in q.modules() if isinstance(m, QuantLayer)]


# ------------------------------------------------------------------------------------------ the registry


def test_each_preset_resolves_to_its_documented_fields():
    for name, preset in PRESETS.items():
        s = QuantSpec(preset=name)
        assert s.preset == name and {k: getattr(s, k) for k in GOVERNED} == preset.values(), name
        assert preset.description and "\n" not in preset.description
    sq, dfq, zq, ocs = (QuantSpec(preset=n) for n in ("squant", "dfq", "zeroq", "ocs"))
    assert (sq.granularity, sq.symmetric, sq.first_last, sq.first_input, sq.last_input, sq.act_range, sq.fold_bn) == \
        ("per_channel", False, "same", "float", "8bit", "noise", False)
    assert sq.act_sigma_table == {4: 12.0, 6: 14.0, 8: 25.0}
    assert (dfq.granularity, dfq.relu6, dfq.bias_bits) == ("per_tensor", "relu", 16)
    assert (zq.granularity, zq.symmetric, zq.first_input) == ("per_channel", False, "float")
    assert (ocs.granularity, ocs.first_layer, ocs.last_layer) == ("per_tensor", "fp", None)


def test_shared_is_todays_spec_bit_for_bit():
    s = QuantSpec()
    assert (s.preset, s.granularity, s.symmetric, s.first_last, s.fold_bn, s.act_range, s.relu6, s.bias_bits) == \
        ("shared", "per_channel", True, "8bit", True, "bn", "keep", None)
    # the hashes recorded before presets existed (computed on main at d40ea4f) are unchanged under the
    # range propagation of that time ('none'; the default became 'moments' later and is in the hash)
    old = dict(range_propagation="none")
    assert s.replace(**old).hash() == "a3441083112f"
    assert QuantSpec(method="dfq", wbits=4, abits=4, granularity="per_tensor", **old).hash() == "da0aa7415ebc"
    assert QuantSpec(method="rex", order=2, budget=1.5, mode="int", **old).hash() == "65ced293aacc"
    assert "preset" not in s.to_dict() and QuantSpec(preset="shared") == s


def test_sigma_table_by_bits():
    s = QuantSpec(method="squant", preset="squant", abits=4)
    assert [s.sigma_for(b) for b in (4, 6, 8)] == [12.0, 14.0, 25.0]
    assert [s.sigma_for(b) for b in (3, 5, 7, 16, None)] == [12.0, 12.0, 14.0, 25.0, 25.0]  # nearest lower
    assert s.sigma == 12.0 and s.replace(abits=8).sigma == 25.0 and s.to_dict()["act_sigma_effective"] == 12.0
    assert s.replace(act_sigma=3.0).sigma == 3.0  # an explicit n wins over the table


def test_explicit_keys_override_the_preset_and_are_recorded():
    s = QuantSpec(method="dfq", preset="dfq", granularity="per_channel")
    assert s.granularity == "per_channel" and s.relu6 == "relu" and s.bias_bits == 16
    assert s.hash() != QuantSpec(method="dfq", preset="dfq").hash()
    assert QuantSpec.from_dict(s.to_dict()) == s  # the record reads back as the same spec
    # replace: a new preset fills what the old one filled; explicit keys stay
    t = s.replace(preset="shared")
    assert t.granularity == "per_channel" and t.relu6 == "keep" and t.bias_bits is None and t.symmetric is True
    assert QuantSpec(preset="squant").replace(order=1).act_range == "noise"


def test_unknown_preset_is_one_line_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as e:
        QuantSpec(preset="squat")
    msg = str(e.value)
    assert "\n" not in msg and "'squat'" in msg and all(n in msg for n in PRESETS)
    with pytest.raises(ConfigError, match="unknown protocol preset"):
        get_preset(None)
    with pytest.raises(ConfigError, match="unknown protocol preset"):
        QuantSpec.from_config({"name": "rtn"}, {"preset": "bogus"})
    r = subprocess.run([sys.executable, "-m", "rex", "quantize", "--preset", "bogus"], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--preset" in r.stderr and "squant" in r.stderr


def test_bad_protocol_values_are_named():
    for kw, text in ((dict(first_input="fp"), "first_input must be one of"),
                     (dict(act_range="data"), "act_range must be one of"),
                     (dict(relu6=True), "relu6 must be one of"),
                     (dict(bias_bits=32), "bias_bits must be an integer in 2..16"),
                     (dict(act_sigma_table={4: -1}), "act_sigma_table[4] must be a finite number > 0"),
                     (dict(act_sigma_table={"x": 1}), "act_sigma_table keys must be")):
        with pytest.raises(ConfigError) as e:
            QuantSpec(**kw)
        assert text in str(e.value), (kw, str(e.value))


# ------------------------------------------------------------------------------------------ the engine


def test_shared_preset_outputs_equal_a_spec_without_preset(net, one_thread):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = _q(net, method="rtn")
    b = _q(net, method="rtn", preset="shared", granularity="per_channel", symmetric=True, first_last="8bit",
           fold_bn=True, act_range="bn", relu6="keep")
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert rex.report(a) == rex.report(b)


def test_squant_preset_asymmetric_weights_noise_ranges_first_float_last_8bit(net, one_thread):
    q = _q(net, method="squant", preset="squant", abits=4)
    layers = _layers(q)
    assert all(layer.term(0)[2] is not None for layer in layers)  # a zero point: asymmetric grid
    assert all(layer.wbits == 4 for layer in layers)  # every layer at the run's bits, first and last too
    assert layers[0].abits is None and layers[-1].abits == 8 and {x.abits for x in layers[1:-1]} == {4}
    assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules()) and q.rex_info.folded == []  # BN kept
    # each body input's range under one batch of uniform noise (SQuant's): 12 x std of the positive entries of a
    # non-negative input (after ReLU6), 12 x std / 1.25 either side of 0 for a signed one (a linear bottleneck's
    # output); clipped at the batch maximum below 6 bits, not at the last layer's 8
    names = ("features.2.conv.1.0", "features.2.conv.0.0", "classifier.1")
    seen = {}
    mods = dict(net.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone()))
             for n in names]
    with torch.no_grad():
        net(torch.rand((NOISE_BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    by_name = {x.layer_name: x for x in layers}
    for name, bits in zip(names, (4, 4, 8)):
        x = seen[name]
        signed = float(x.min()) < 0
        alpha = 12.0 * float(x.std()) / 1.25 if signed else 12.0 * float(x[x > 0].std())
        if bits < 6:
            alpha = min(alpha, float(x.max()))
        act = by_name[name].act
        assert act.bits == bits and act.hi == pytest.approx(alpha, rel=1e-4), name
        assert act.lo == (pytest.approx(-alpha, rel=1e-4) if signed else 0.0), name
    assert float(seen[names[1]].min()) < 0 <= float(seen[names[0]].min())  # both kinds covered
    assert "uniform-noise" in rex.activation_coverage(q)["act_ranges"]


def test_squant_range_signed_and_clip():
    from rex.noise_ranges import _accumulate, _empty

    st = _empty()
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 5.0])
    _accumulate(st, x)
    assert squant_range(st, 10.0, 8) == pytest.approx((-10 * float(x.std()) / 1.25, 10 * float(x.std()) / 1.25))
    assert squant_range(st, 10.0, 4) == pytest.approx((-5.0, 5.0))  # below 6 bits: clipped at the max


def test_dfq_preset_per_tensor_relu_and_16bit_biases(net, one_thread):
    q = _q(net, method="dfq", preset="dfq")
    assert not any(isinstance(m, nn.ReLU6) for m in q.modules())
    assert len(q.rex_info.extra["relu6_replaced"]) == 35  # every ReLU6 of MobileNetV2
    layers = _layers(q)
    for layer in layers:
        s = layer.term(0)[1]
        assert torch.all(s == s[0]) and layer.term(0)[2] is not None  # one scale per tensor, zero point
    biased = [x for x in layers if x.inner.bias is not None]
    assert len(biased) == q.rex_info.extra["bias_bits"]["layers"] > 40
    for layer in biased:
        b = layer.inner.bias.detach().double()
        step = float(b.abs().max()) / (2**15 - 1)
        k = b / step
        assert torch.allclose(k, k.round(), atol=1e-3), layer.layer_name  # on the 16-bit grid
    # the shared protocol keeps float biases: they are not on that grid
    b = [x for x in _layers(_q(net, method="dfq")) if x.inner.bias is not None][5].inner.bias.detach().double()
    k = b / (float(b.abs().max()) / (2**15 - 1))
    assert not torch.allclose(k, k.round(), atol=1e-3)


def test_first_input_float_is_counted_in_activation_coverage(net, one_thread):
    shared = rex.activation_coverage(_q(net, method="rtn"))
    assert shared["act_float"] == 0
    q = _q(net, method="rtn", preset="zeroq")
    c = rex.activation_coverage(q)
    assert c["act_float"] == 1 and c["act_float_layers"] == ["features.0.0"] and c["act_layers"] == 53
    assert any("by the protocol" in n and "features.0.0" in n for n in q.rex_info.notes)
    assert all("no data-free range" not in n for n in q.rex_info.notes)


def test_ocs_preset_leaves_the_first_layer_float(net, one_thread):
    q = _q(net, method="ocs", preset="ocs")
    assert [p.name for p in q.rex_info.plans if not p.quantize] == ["features.0.0.layer"]  # float by the plan
    names = [x.layer_name for x in _layers(q)]  # OCS wraps its layers: <name>.layer
    assert not any(n.startswith("features.0.0") for n in names) and names[-1].startswith("classifier.1")
    assert _layers(q)[-1].wbits == 4  # the last layer like the body
    assert [x.layer_name for x in _layers(_q(net, method="ocs"))][0].startswith("features.0.0")  # shared: W8


def test_noise_ranges_refuse_a_method_with_its_own_ranges(net):
    with pytest.raises(ConfigError, match="act_range='noise' does not apply"):
        _q(net, method="zeroq", preset="squant")


# ------------------------------------------------------------------------------------------ the pipeline


def _grid(methods, protocol=None):
    import yaml

    from rex.pipeline import grid

    cfg = yaml.safe_load((PROJECT_ROOT / "conf/grid/default.yaml").read_text())
    if protocol:
        cfg["protocol"] = {**cfg["protocol"], **protocol}
    cfg["models"] = [{"model": "mobilenet_v2", "dataset": "imagenet_sample", "limit": 10, "methods": methods}]
    return grid.expand(cfg, PROJECT_ROOT)


def test_preset_reaches_the_job_label_variant():
    jobs = {(j["method"], j["preset"]): j for j in _grid([
        {"method": "squant", "bits": [[4, 8]]}, {"method": "squant", "bits": [[4, 8]], "protocol": {"preset": "squant"}},
        {"method": "dfq", "bits": [[4, 8]], "protocol": {"preset": "dfq"}}])}
    shared, native, dfq = jobs[("squant", "shared")], jobs[("squant", "squant")], jobs[("dfq", "dfq")]
    assert shared["label"] == "method=squant,w=4,a=8,K=1" and shared["variant"] == ""
    assert native["label"].startswith("method=squant,w=4,a=8,K=1,p=") and native["variant"] != dfq["variant"]
    # the grid-level keys at the shared values defer to the preset: only protocol.preset reaches the job
    assert "protocol.preset=squant" in native["overrides"] and "protocol.granularity=per_channel" not in native["overrides"]
    assert "protocol.granularity=per_channel" in shared["overrides"]
    # the same preset set for the whole grid (snakemake --config 'protocol={preset: squant}') lands in the same folder
    whole = _grid([{"method": "squant", "bits": [[4, 8]]}], protocol={"preset": "squant"})
    assert [j["label"] for j in whole if j["method"] == "squant"] == [native["label"]]
    # a block key is explicit: an override of the preset is its own variant
    over = _grid([{"method": "squant", "bits": [[4, 8]], "protocol": {"preset": "squant", "symmetric": True}}])
    assert [j["variant"] for j in over if j["method"] == "squant"][0] not in ("", native["variant"])
    from rex.pipeline.grid import GridError

    with pytest.raises(GridError, match="unknown protocol preset 'nope'.*squant"):
        _grid([{"method": "rtn", "bits": [[4, 8]], "protocol": {"preset": "nope"}}])


def test_composed_config_resolves_the_preset():
    from rex.pipeline.job import compose, spec_from_config, to_container, validate_config

    cfg = to_container(compose(["model=mobilenet_v2", "method=squant", "protocol.preset=squant"]))
    validate_config(cfg)
    s = spec_from_config(cfg)
    assert (s.preset, s.symmetric, s.act_range, s.first_input, s.fold_bn) == ("squant", False, "noise", "float", False)
    cfg = to_container(compose(["model=mobilenet_v2", "method=rtn"]))
    assert spec_from_config(cfg) == QuantSpec(method="rtn")  # null keys: the shared preset, today's spec
    cfg = to_container(compose(["model=mobilenet_v2", "method=rtn", "protocol.act_sigma_table={4:12,8:25}"]))
    assert spec_from_config(cfg).sigma == 25.0


def _record(tmp: Path, label: str, method: str, preset, top1: float) -> Path:
    d = tmp / "runs" / "classification" / "toy" / label
    d.mkdir(parents=True)
    rec = {"status": "ok", "task": "classification", "model": "toy", "label": label, "method": method,
           "wbits": 32 if method == "fp32" else 4, "abits": 32 if method == "fp32" else 8, "order": 1,
           "budget": None, "n": 100, "bops": 10**9, "metrics": {"top1": top1, "top5": 90.0, "agreement": 90.0, "kl": 0.1},
           "fp32": {"top1": 80.0}, "protocol": {} if preset is None else {"preset": preset}, "git": {"commit": "abc"},
           "details": {}}
    if preset is not None:
        rec["preset"] = preset
    (d / "metrics.json").write_text(json.dumps(rec))
    return d


def test_preset_column_in_csv_and_tables(tmp_path):
    import csv

    from rex.pipeline.aggregate import aggregate
    from rex.pipeline.report import write_tables

    dirs = [_record(tmp_path, "method=fp32,w=32,a=32,K=1", "fp32", "", 80.0),
            _record(tmp_path, "method=squant,w=4,a=8,K=1", "squant", None, 61.0),  # a record from before presets
            _record(tmp_path, "method=squant,w=4,a=8,K=1,p=562a292b", "squant", "squant", 55.0)]
    summary, jobs = tmp_path / "summary.csv", tmp_path / "jobs.csv"
    aggregate(dirs, summary, jobs)
    assert [r["preset"] for r in csv.DictReader(open(jobs))] == ["", "shared", "squant"]
    assert {(r["preset"], r["value"]) for r in csv.DictReader(open(summary)) if r["metric"] == "top1"} == \
        {("", "80.0"), ("shared", "61.0"), ("squant", "55.0")}
    write_tables(summary, jobs, "classification", "toy", tmp_path / "t")
    md = (tmp_path / "t.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    col = [c.strip() for c in header.strip("|").split("|")].index("Preset")
    table = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in md.splitlines()  # ** = best
             if line.startswith("| ") and line.count("|") == header.count("|")]  # the main table, not the pivot
    rows = {r[col]: r for r in table if r[0] == "SQuant"}
    assert "61.00" in rows["shared"] and "55.00" in rows["squant"]  # each row its own number (matched by variant)
    assert [r[col] for r in table if r[0] == "FP32"] == ["-"]
    assert "| SQuant [squant] |  | 55.00 |" in md  # the pivot names a non-shared preset too
    assert "squant = SQuant's" in md and "shared = the project's" in md  # the caption names each protocol
    t = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["preset"] for r in t] == ["", "shared", "squant"]
    assert "Preset" in (tmp_path / "t.tex").read_text()


def test_job_record_names_its_preset_and_the_resolved_protocol(tmp_path):
    from rex.pipeline import aggregate, job

    common = ["model=mobilenet_v2", "dataset=imagenet_sample", "evaluation=classification", "evaluation.limit=2",
              "method=rtn", "method.wbits=8", "method.abits=8", "protocol.preset=zeroq"]
    rec = job.run(tmp_path / "ok", common)
    assert rec["status"] == "ok" and rec["preset"] == "zeroq"
    p = rec["protocol"]
    assert (p["preset"], p["symmetric"], p["granularity"], p["first_input"], p["fold_bn"]) == \
        ("zeroq", False, "per_channel", "float", False)
    assert rec["details"]["act_float"] == 1  # the first layer's input, by the protocol
    # a job that fails on its configuration still names its preset (its row in the table does)
    bad = job.run(tmp_path / "bad", common[:4] + ["method=zeroq", "method.wbits=8", "method.abits=8",
                                                  "protocol.preset=squant"])
    assert bad["status"] == "failed" and bad["kind"] == "config" and bad["preset"] == "squant"
    assert "act_range='noise' does not apply" in bad["error"]["message"]
    rows = [aggregate.job_row(aggregate.read_record(tmp_path / d)) for d in ("ok", "bad")]
    assert [(r["preset"], r["status"], r["symmetric"]) for r in rows] == [("zeroq", "ok", False),
                                                                           ("squant", "failed", "")]


def test_accuracy_checks_name_the_shared_row_unless_told():
    from rex.pipeline.check import find_row

    rows = [{"model": "m", "method": "squant", "wbits": "4", "abits": "8", "order": "1", "budget": "", "metric": "top1",
             "value": v, "status": "ok", "preset": p} for p, v in (("squant", "55.0"), ("shared", "61.0"))]
    check = {"model": "m", "method": "squant", "wbits": 4, "abits": 8, "metric": "top1", "min": 1, "why": "t"}
    assert find_row(rows, check)["value"] == "61.0"
    assert find_row(rows, {**check, "preset": "squant"})["value"] == "55.0"
