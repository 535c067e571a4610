"""No row claims activations it did not quantize (issue 12 item 3): ``rex.activation_coverage`` counts the
layer inputs left float, the job record carries the count, and every table row shows it ('Float in')."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2

import rex
from rex.pipeline.aggregate import aggregate
from rex.pipeline.report import write_tables


def _mnv2():
    torch.manual_seed(0)
    return mobilenet_v2(num_classes=10).eval()


def test_bn_net_quantizes_every_body_input():
    q = rex.quantize(_mnv2(), method="rtn", wbits=4, abits=4, input_range=(-2.2, 2.7))
    c = rex.activation_coverage(q)
    assert c["act_layers"] == 53 and c["act_float"] == 0 and c["act_float_layers"] == []
    assert "BatchNorm" in c["act_ranges"] and "normalisation" in c["act_ranges"]
    # without the network input's range, exactly the first layer's input stays float, and is named
    c = rex.activation_coverage(rex.quantize(_mnv2(), method="rtn", wbits=4, abits=4))
    assert c["act_float"] == 1 and c["act_float_layers"] == ["features.0.0"]


def test_bn_free_layers_are_counted_float():
    # Linear -> ReLU -> Linear -> ReLU -> Linear: no BatchNorm anywhere, so no data-free range for layers 2, 3
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    q = rex.quantize(mlp, method="rtn", wbits=8, abits=8, first_last="same", example_input=torch.zeros(1, 16),
                     input_range=(-1.0, 1.0))
    c = rex.activation_coverage(q)
    assert c["act_layers"] == 3 and c["act_float"] == 2 and c["act_float_layers"] == ["2", "4"]
    # and the layers report no activation quantizer for those inputs
    assert [r["abits"] for r in rex.report(q)] == [8, None, None]


def test_weight_only_and_zeroq_sources():
    c = rex.activation_coverage(rex.quantize(_mnv2(), method="rtn", wbits=4, abits=None))
    assert c["act_ranges"].startswith("none") and c["act_float"] == c["act_layers"] == 53
    q = rex.quantize(_mnv2(), method="zeroq", wbits=8, abits=8, example_input=torch.zeros(1, 3, 32, 32),
                     options={"zeroq_batch": 2, "zeroq_steps": 2})
    assert "distilled" in rex.activation_coverage(q)["act_ranges"]


def _record(tmp: Path, label: str, method: str, abits: int, act_float, act_layers, top1: float) -> Path:
    d = tmp / "runs" / "classification" / "toy" / label
    d.mkdir(parents=True)
    rec = {"status": "ok", "task": "classification", "model": "toy", "label": label, "method": method,
           "wbits": 32 if method == "fp32" else 4, "abits": abits, "order": 1, "budget": None, "n": 100,
           "bops": 10**9, "metrics": {"top1": top1, "top5": 90.0, "agreement": 90.0, "kl": 0.1},
           "fp32": {"top1": 80.0}, "protocol": {}, "git": {"commit": "abc123"},
           "details": {} if act_float is None else {"act_float": act_float, "act_layers": act_layers,
                                                     "act_ranges": "BatchNorm statistics (beta + n|gamma|)"}}
    (d / "metrics.json").write_text(json.dumps(rec))
    return d


def test_table_rows_show_float_inputs(tmp_path):
    dirs = [_record(tmp_path, "method=fp32,w=32,a=32,K=1", "fp32", 32, None, None, 80.0),
            _record(tmp_path, "method=rtn,w=4,a=4,K=1", "rtn", 4, 66, 85, 40.0)]
    summary, jobs = tmp_path / "summary.csv", tmp_path / "jobs.csv"
    aggregate(dirs, summary, jobs)
    assert "abc123" in jobs.read_text()  # every row stamped with the commit that computed it
    assert "act_points" in jobs.read_text().splitlines()[0]  # where activations are (not) quantized, per row
    write_tables(summary, jobs, "classification", "toy", tmp_path / "t")
    md = (tmp_path / "t.md").read_text()
    assert "| Float in |" in md and "| 66/85 |" in md and "layer inputs left float" in md
    csv_text = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_text[0].split(",")[-6:] == ["float_inputs", "layers", "float_layers", "status", "label", "error"]
    assert ",66,85,,ok," in csv_text[2]  # no float_layers in this (older) record: empty, not 0
