"""Issue 12 item 7: a result's identity holds everything that changes it. A non-default protocol, method options
or dataset give the job folder a `,p=<hash>` suffix (so an int-mode run writes beside the fake-mode results, and
the default grid keeps its folder names); a failed rerun keeps the good result and is reported beside it; the
baselines table is a rule of the DAG with a cache keyed by everything that changes a row; every row carries
the commit that computed it."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from rex.paths import PROJECT_ROOT as ROOT
from rex.pipeline import aggregate, grid

SMOKE = yaml.safe_load((ROOT / "conf/grid/smoke.yaml").read_text())


def _dirs(cfg: dict) -> dict:
    return {j["label"]: j for j in grid.expand(cfg, ROOT)}


def test_default_protocol_keeps_the_folder_names():
    jobs = _dirs(SMOKE)
    assert sorted(jobs) == ["method=fp32,w=32,a=32,K=1", "method=rex,w=4,a=8,K=2,budget=1.5",
                            "method=rtn,w=8,a=8,K=1"]
    assert {j["variant"] for j in jobs.values()} == {""}


@pytest.mark.parametrize("change", [{"protocol": {"mode": "int"}}, {"protocol": {"granularity": "per_tensor"}},
                                    {"protocol": {"seed": 1}}])
def test_a_non_default_protocol_gets_its_own_folder(change):
    cfg = json.loads(json.dumps(SMOKE))
    for k, v in change.items():
        cfg[k].update(v)
    jobs = _dirs(cfg)
    default = _dirs(SMOKE)
    fp32 = "method=fp32,w=32,a=32,K=1"
    assert fp32 in jobs  # the float model does not depend on the quantization protocol
    quant = [lab for lab in jobs if lab != fp32]
    assert len(quant) == 2 and all(",p=" in lab for lab in quant), quant
    assert not set(quant) & set(default)
    for lab in quant:
        base, tag = grid.split_variant(lab)
        assert base in default and tag == jobs[lab]["variant"] and len(tag) == 8
    other = json.loads(json.dumps(SMOKE))
    other["protocol"]["mode"], other["protocol"]["seed"] = "int", 7
    assert set(_dirs(other)) - {fp32} != set(quant)  # another change, another folder


def test_method_options_and_dataset_are_in_the_identity():
    cfg = json.loads(json.dumps(SMOKE))
    cfg["methods"] = [{"method": "ocs", "bits": [[8, 8]], "options": {"expand_ratio": 0.05}}]
    labs = [lab for lab in _dirs(cfg) if "ocs" in lab]
    assert len(labs) == 1 and ",p=" in labs[0]
    assert grid.variant({}, {}, None, "imagenet_val", "imagenet_sample") != ""
    assert grid.variant({"mode": "fake"}, {"mode": "fake"}, {}, "x", "x") == ""


def test_the_dag_has_rules_for_variant_folders(tmp_path):
    cfg = json.loads(json.dumps(SMOKE))
    cfg["protocol"]["mode"] = "int"
    cfg["results_dir"] = str(tmp_path / "results")
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(g)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "quantize_evaluate_p " in out and "quantize_evaluate_budget_p " in out and ",p=" in out


def test_job_accepts_its_variant_folder_and_checks_the_base_label():
    from rex.pipeline.job import identity

    ident = identity(None, ROOT / "runs" / "classification" / "m" / "method=rtn,w=8,a=8,K=1,p=0123abcd")
    assert ident["wbits"] == 8 and ident["variant"] == "0123abcd"


def test_failed_rerun_is_reported_beside_the_kept_result(tmp_path):
    d = tmp_path / "runs" / "classification" / "m" / "method=rtn,w=8,a=8,K=1"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"status": "ok", "task": "classification", "model": "m",
                                                "label": d.name, "metrics": {"top1": 50.0},
                                                "git": {"commit": "abc123", "dirty": False}}))
    (d / "FAILED.json").write_text(json.dumps({"status": "failed", "previous_result_kept": True,
                                               "error": {"type": "DatasetError", "message": "gone"}}))
    rec = aggregate.read_record(d)
    assert rec["status"] == "ok" and rec["previous_failure"] == "DatasetError: gone"
    row = aggregate.job_row(rec)
    assert row["previous_failure"] == "DatasetError: gone" and row["commit"] == "abc123"


def test_every_row_is_stamped_with_its_commit(tmp_path):
    recs = []
    for i, git in enumerate([{"commit": "abc", "dirty": False}, {"commit": "abc", "dirty": True},
                             {"commit": "unknown", "dirty": None}]):
        d = tmp_path / "runs" / "classification" / "m" / f"method=rtn,w={8 - i},a=8,K=1"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"status": "ok", "task": "classification", "model": "m",
                                                    "label": d.name, "metrics": {"top1": 1.0}, "git": git}))
        recs.append(d)
    aggregate.aggregate(recs, tmp_path / "summary.csv", tmp_path / "jobs.csv")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert list(rows[0])[:11] == aggregate.SUMMARY_COLUMNS[:11]  # the earlier columns keep their order
    assert {r["commit"] for r in rows} == {"abc", "abc+dirty", "unknown"}
    assert {r["commit"] for r in csv.DictReader(open(tmp_path / "jobs.csv"))} == {"abc", "abc+dirty", "unknown"}


def test_git_info_outside_git_says_unknown(monkeypatch):
    from rex.pipeline import job

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(job.subprocess, "run", no_git)
    assert job.git_info()["commit"] == "unknown"


def _baselines_script():
    spec = importlib.util.spec_from_file_location("baselines_table", ROOT / "workflow/scripts/baselines_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baselines_cache_key_holds_dataset_weights_and_code():
    import rex

    bt = _baselines_script()
    spec = rex.QuantSpec(method="rtn", wbits=4, abits=4)
    k = bt._key("mobilenet_v2", spec, "imagenet_sample", 100)
    assert k != bt._key("mobilenet_v2", spec, "imagenet_val", 100)
    assert k != bt._key("mobilenet_v2", spec, "imagenet_sample", 200)
    assert bt.COMMIT in k and str(bt._weights_sha("mobilenet_v2")) in k


def test_baselines_is_a_rule_outside_the_default_target(tmp_path):
    cfg = dict(SMOKE, results_dir=str(tmp_path / "results"))
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump(cfg))
    base = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(g)]
    r = subprocess.run(base[:4] + ["baselines"] + base[4:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "rule baselines" in out, out[-2000:]
    assert "baselines_mobilenet_v2.md" in out
    r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "rule baselines" not in r.stdout + r.stderr
