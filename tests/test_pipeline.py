"""The benchmark pipeline: grid expansion, every shipped grid's DAG (`snakemake -n`, no data needed), failure
records, atomic job folders, and the smoke grid end to end in a temporary results folder (summary, tables and
MLflow agree with the per-job files; a second run has nothing to do)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rex.paths import PROJECT_ROOT
from rex.pipeline import grid as gridlib

ROOT = PROJECT_ROOT
GRIDS = sorted((ROOT / "conf" / "grid").glob("*.yaml"))
# variant (the folder's ,p=<hash>, '' for the default protocol) and commit appended by issue 12 item 7, preset (the
# named protocol) by item 5
SUMMARY_COLUMNS = ["task", "model", "method", "wbits", "abits", "order", "budget", "bops", "metric", "value", "status",
                   "variant", "commit", "float_layers", "preset"]


def snakemake(*args, timeout=900):
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def job_stats(out: str) -> dict:
    """The first 'Job stats' table of a Snakemake run / dry run -> {rule: count}."""
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("Job stats"))
    stats = {}
    for ln in lines[i + 3:]:
        parts = ln.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        stats[parts[0]] = int(parts[1])
    return stats


def merged_config(grid_file: Path, **overrides) -> dict:
    """What Snakemake's config is: default.yaml, updated by the grid file, then by --config."""
    def update(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                update(a[k], v)
            else:
                a[k] = v
        return a

    cfg = yaml.safe_load((ROOT / "conf/grid/default.yaml").read_text())
    update(cfg, yaml.safe_load(grid_file.read_text()))
    return update(cfg, overrides)


# ------------------------------------------------------------------------------------------- grid logic

def test_label_matches_quantspec():
    from rex import QuantSpec

    for method in ("rex", "rtn"):
        for w, a, k, b, alloc in [(4, 8, 1, None, "uniform"), (4, 4, 2, 1.5, "uniform"), (8, 8, 3, 1.25, "greedy"),
                                  (6, 32, 2, None, "uniform"), (4, 4, 2, 2.0, "greedy")]:
            spec = QuantSpec(method=method, wbits=w, abits=a, order=k, budget=b, allocation=alloc)
            assert gridlib.label(method, w, a, k, b, alloc) == spec.label()
            assert gridlib.parse_label(spec.label())["order"] == k


def test_pipeline_core_imports_without_torch():
    """The Snakefile imports rex.pipeline.grid while it builds the DAG (and the aggregate / report / tracking rules
    run their modules): none of that may import torch. A bare `import rex` still offers the library's names."""
    def run(code):
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)

    for mod in ("rex.pipeline.grid", "rex.pipeline.aggregate", "rex.pipeline.report", "rex.pipeline.tracking",
                "rex.labels", "rex.io"):
        r = run(f"import sys, {mod}; assert 'torch' not in sys.modules, 'torch imported'")
        assert r.returncode == 0, f"import {mod}: {r.stderr[-2000:]}"
    r = run("import sys, rex; assert 'torch' not in sys.modules; rex.quantize, rex.QuantSpec, rex.models.get_model; "
            "assert 'torch' in sys.modules; print(rex.QuantSpec(method='rtn').label())")
    assert r.returncode == 0 and r.stdout.strip() == "method=rtn,w=4,a=8,K=1", r.stderr[-2000:]


def test_expansion_only_sensible_combinations():
    cfg = {"models": [{"model": "resnet20_fmnist", "dataset": "fashion_mnist", "limit": 10}],
           "methods": [{"method": "rex", "bits": [[4, 8], [4, None]], "orders": [1, 2], "budgets": [None, 1.5]},
                       {"method": "rtn", "bits": [[4, 8]]}, {"method": "rex", "bits": [[4, 8]], "orders": [1]}]}
    jobs = gridlib.expand(cfg, ROOT)
    labels = [j["label"] for j in jobs]
    assert len(labels) == len(set(labels))
    assert labels[0] == "method=fp32,w=32,a=32,K=1"  # one FP32 row per model
    assert "method=rex,w=4,a=8,K=1,budget=1.5" not in labels  # budget needs order >= 2
    assert {"method=rex,w=4,a=8,K=2,budget=1.5", "method=rex,w=4,a=32,K=2", "method=rtn,w=4,a=8,K=1"} <= set(labels)
    assert len(jobs) == 1 + 2 * 3 + 1
    assert all(j["checkpoint"] and j["checkpoint"].endswith("resnet20_fmnist/model.pt") for j in jobs)
    # method options are part of a job's identity (issue 12 item 7): other options, another folder (,p=<hash>)
    opts = {"models": cfg["models"], "methods": [{"method": "rex", "bits": [[4, 8]], "orders": [2], "budgets": [1.5],
                                                   "options": {"x": 1}},
                                                  {"method": "rex", "bits": [[4, 8]], "orders": [2], "budgets": [1.5]}]}
    labels = [j["label"] for j in gridlib.expand(opts, ROOT)]
    assert len({j["dir"] for j in gridlib.expand(opts, ROOT)}) == 3
    assert any(lab.startswith("method=rex,w=4,a=8,K=2,budget=1.5,p=") for lab in labels)
    bad = {"models": cfg["models"] + [dict(cfg["models"][0], limit=20)], "methods": opts["methods"][1:]}
    with pytest.raises(gridlib.GridError):
        gridlib.expand(bad, ROOT)  # two settings (another evaluation subset), one folder


@pytest.mark.parametrize("grid_file", GRIDS, ids=lambda p: p.stem)
def test_grid_file_sets_every_key(grid_file):
    """Snakemake merges --configfile onto default.yaml: a key a grid leaves out would leak in from default."""
    default = yaml.safe_load((ROOT / "conf/grid/default.yaml").read_text())
    mine = yaml.safe_load(grid_file.read_text())
    missing = {k for k in set(default) - set(mine) - {"compact_methods"} if not k.startswith("x_")}  # anchors
    assert not missing, f"{grid_file.name} must set {sorted(missing)}"
    assert set(mine["protocol"]) == set(default["protocol"])


@pytest.mark.parametrize("grid_file", GRIDS, ids=lambda p: p.stem)
def test_dry_run_every_grid(grid_file, tmp_path):
    """`snakemake -n` lists every job of every shipped grid, without any dataset present."""
    extra = ["imagenet_root=/nonexistent/imagenet", "coco_root=/nonexistent/coco"] if "paper" in grid_file.stem else []
    r = snakemake("-n", "--cores", "2", "--configfile", str(grid_file),
                  "--config", f"results_dir={tmp_path / 'results'}", *extra, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = merged_config(grid_file, results_dir=str(tmp_path / "results"))
    n_jobs = len(gridlib.expand(cfg, ROOT))
    out = r.stdout + r.stderr
    stats = job_stats(out)
    # quantize_evaluate, _budget, _alloc: one rule per label shape
    assert sum(v for k, v in stats.items() if k.startswith("quantize_evaluate")) == n_jobs, stats
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


@pytest.mark.parametrize("label", ["method=rtn,w=8,a=8,K=1", "method=rex,w=4,a=8,K=2,budget=1.5",
                                   "method=rex,w=4,a=4,K=2,budget=1.5,alloc=greedy"])
def test_cluster_job_spec_selects_its_job(label, tmp_path):
    """A cluster job (SLURM executor) re-selects its job with `--target-jobs rule:k=v,...`, which Snakemake 9 splits
    on every comma: the job rules' wildcards must hold no comma, and the spec must select exactly that job."""
    from snakemake_interface_executor_plugins.utils import TargetSpec, encode_target_jobs_cli_args

    p = gridlib.parse_label(label)
    wc = {"task": "classification", "model": "resnet20_fmnist", "method": p["method"], "w": str(p["wbits"]),
          "a": str(p["abits"]), "K": str(p["order"])}
    rule = "quantize_evaluate"
    if p["budget"] is not None:
        wc["budget"], rule = f"{p['budget']:g}", "quantize_evaluate_budget"
    if p["allocation"] != "uniform":
        wc["alloc"], rule = p["allocation"], "quantize_evaluate_alloc"
    assert not any("," in v for v in wc.values())
    results = tmp_path / "results"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "name": "cluster", "models": [{"model": "resnet20_fmnist", "dataset": "fashion_mnist", "limit": 10}],
        "methods": [{"method": "rtn", "bits": [[8, 8]]},
                    {"method": "rex", "bits": [[4, 8], [4, 4]], "orders": [2], "budgets": [1.5]},
                    {"method": "rex", "bits": [[4, 4]], "orders": [2], "budgets": [1.5], "allocation": "greedy"}]}))
    for f in ("models/resnet20_fmnist/model.pt", "runs/classification/resnet20_fmnist/method=fp32,w=32,a=32,K=1/done"):
        (results / f).parent.mkdir(parents=True, exist_ok=True)  # the job's inputs, present on the cluster
        (results / f).write_text("x")
    spec = encode_target_jobs_cli_args([TargetSpec(rule, wc)])
    r = snakemake("-n", "--cores", "1", "--nolock", "--configfile", str(grid_file), "--config",
                  f"results_dir={results}", "--target-jobs", *spec, "--allowed-rules", rule, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"runs/classification/resnet20_fmnist/{label}/done" in out
    assert job_stats(out) == {rule: 1}


# ------------------------------------------------------------------------------------ job folder contract

def test_failed_job_writes_failed_record(tmp_path):
    out = tmp_path / "runs" / "classification" / "resnet20_fmnist" / "method=rex,w=99,a=8,K=1"
    out.mkdir(parents=True)  # Snakemake creates the output's folder before the job runs
    r = subprocess.run([sys.executable, "-m", "rex.pipeline.job", "--out", str(out), "--no-mlflow",
                        "model=resnet20_fmnist", "dataset=fashion_mnist", "evaluation=classification", "method=rex",
                        "method.wbits=99", "method.order=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["FAILED.json", "config.yaml", "done"]
    rec = json.loads((out / "FAILED.json").read_text())
    assert rec["status"] == "failed" and rec["error"]["type"] and rec["error"]["traceback_tail"]
    assert rec["method"] == "rex" and rec["wbits"] == 99 and rec["config_hash"]
    assert not list(out.parent.glob(".*tmp*"))


def test_unknown_method_is_a_failed_record_not_a_crash(tmp_path):
    out = tmp_path / "runs" / "classification" / "resnet20_fmnist" / "method=nosuch,w=4,a=8,K=1"
    r = subprocess.run([sys.executable, "-m", "rex.pipeline.job", "--out", str(out), "--no-mlflow",
                        "model=resnet20_fmnist", "dataset=fashion_mnist", "method=rtn", "method.name=nosuch"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "FAILED.json").read_text())
    assert rec["error"]["type"] == "UnknownNameError"
    from rex.pipeline.aggregate import summary_rows

    rows = summary_rows({**rec, "dir": str(out)})
    assert [r["metric"] for r in rows] == ["top1", "top5", "agreement", "kl"]
    assert {r["status"] for r in rows} == {"failed"} and {r["value"] for r in rows} == {""}


def test_publish_replaces_folder_atomically(tmp_path):
    from rex.pipeline.job import publish

    out = tmp_path / "job"
    (out / "old").mkdir(parents=True)
    tmp = tmp_path / ".job.tmp-1"
    tmp.mkdir()
    (tmp / "done").write_text("ok\n")
    publish(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


# ----------------------------------------------------------------------------------------- end to end

def _close(a, b, tol=1e-6):
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_smoke_grid_end_to_end(tmp_path):
    results = tmp_path / "results"
    smoke = ROOT / "conf/grid/smoke.yaml"
    r = snakemake("--cores", "2", "--configfile", str(smoke), "--config", f"results_dir={results}", timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    cfg = merged_config(smoke, results_dir=str(results))
    jobs = gridlib.expand(cfg, ROOT)
    assert len(jobs) == 3

    # job folders: complete, no temporary leftovers
    records = {}
    for j in jobs:
        d = Path(j["dir"])
        d = d if d.is_absolute() else ROOT / d
        assert (d / "done").is_file() and (d / "config.yaml").is_file()
        rec = json.loads((d / "metrics.json").read_text())
        assert rec["status"] == "ok", rec
        for key in ("bops", "wall_seconds", "peak_rss_mb", "versions", "hashes", "config_hash", "git"):
            assert rec.get(key) is not None, key
        assert rec["hashes"]["weights_sha256"] and rec["hashes"]["dataset"] and rec["versions"]["torch"]
        assert rec["n"] == 64
        records[(j["method"], j["wbits"], j["abits"], j["order"])] = rec
    assert not list(results.glob("runs/*/*/.*"))

    # summary.csv == job files
    with open(results / "summary.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SUMMARY_COLUMNS
        rows = list(reader)
    assert len(rows) == 3 * 4
    for row in rows:
        rec = records[(row["method"], int(row["wbits"]), int(row["abits"]), int(row["order"]))]
        assert row["status"] == "ok"
        assert _close(row["value"], rec["metrics"][row["metric"]])
        assert int(row["bops"]) == rec["bops"]
        assert row["variant"] == "" and row["commit"].split("+")[0] == rec["git"]["commit"]  # stamped (item 7)
    fp = [r for r in rows if r["method"] == "fp32"]
    assert {(r["wbits"], r["abits"], r["budget"]) for r in fp} == {("32", "32", "")}

    # tables == summary
    stem = results / "tables" / "classification_mobilenet_v2"
    for ext in ("md", "csv", "tex"):
        assert stem.with_suffix(f".{ext}").is_file()
    with open(stem.with_suffix(".csv")) as f:
        trows = list(csv.DictReader(f))
    assert len(trows) == 3
    for t in trows:
        rec = records[(t["method"], int(t["wbits"]), int(t["abits"]), int(t["order"]))]
        assert _close(t["top1"], rec["metrics"]["top1"]) and int(t["bops"]) == rec["bops"]
    md = stem.with_suffix(".md").read_text()
    assert "n = 64" in md and "binomial" in md and "G-BOPs" in md and "W8A8" in md and "| Float in |" in md
    assert (results / "plots" / "classification_mobilenet_v2.png").stat().st_size > 1000
    assert "classification_mobilenet_v2.png" in (results / "report.md").read_text()

    # the grid's accuracy floors held (rule check), and they are real: raised above what was measured, the
    # same results fail the check
    checks = json.loads((results / "checks.json").read_text())["checks"]
    assert len(checks) == 3 and all(c["ok"] for c in checks), checks
    from rex.pipeline import check

    with open(results / "summary.csv") as f:
        srows = list(csv.DictReader(f))
    too_high = [{**c, "min": c["value"] + 0.1} for c in checks]
    assert not any(r["ok"] for r in check.evaluate(srows, too_high))
    collapsed = [{**r, "value": "10.0"} if r["method"] == "rex" else r for r in srows]  # a broken REx
    assert [r["ok"] for r in check.evaluate(collapsed, checks)] == [True, True, False]

    # MLflow == job files: one run per job, same numbers
    from rex.pipeline.tracking import Tracker

    tracker = Tracker(None, results)
    assert tracker.uri == f"sqlite:///{results.resolve().as_posix()}/mlflow.db"
    runs = tracker.runs()
    assert len(runs) == len(jobs)
    by_hash = {rec["config_hash"]: rec for rec in records.values()}
    for run in runs:
        rec = by_hash[run.data.tags["config_hash"]]
        for metric, value in rec["metrics"].items():
            assert _close(run.data.metrics[metric], value)
        assert run.data.params["method.name"] == rec["method"]
        assert run.data.tags["grid"] == "smoke" and run.info.status == "FINISHED"
    # idempotent: logging again updates nothing and duplicates nothing
    counts = tracker.sync(Path(j["dir"]) for j in jobs)
    assert counts["unchanged"] == len(jobs) and len(tracker.runs()) == len(jobs)

    # a second run has nothing to do
    r2 = snakemake("-n", "--cores", "2", "--configfile", str(smoke), "--config", f"results_dir={results}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "Nothing to be done" in (r2.stdout + r2.stderr), r2.stdout[-3000:]
    # and the MLflow store never decides what re-runs
    os.remove(results / "mlflow.db")
    r3 = snakemake("-n", "--cores", "2", "--configfile", str(smoke), "--config", f"results_dir={results}")
    assert "Nothing to be done" in (r3.stdout + r3.stderr)


def test_a_distilling_methods_first_job_runs_before_its_others(tmp_path):
    """ZeroQ at two bit-widths on one net: the second job waits for the first, which fills the distillation
    cache, instead of distilling again beside it; other methods do not wait for each other."""
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "name": "distill", "models": [{"model": "resnet20_fmnist", "dataset": "fashion_mnist", "limit": 10}],
        "methods": [{"method": "zeroq", "bits": [[4, 8], [4, 4]]}, {"method": "rtn", "bits": [[8, 8], [4, 4]]}]}))
    r = snakemake("-n", "--cores", "1", "--configfile", str(grid_file), "--config",
                  f"results_dir={tmp_path / 'results'}", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    runs = "runs/classification/resnet20_fmnist"
    inputs = {}  # job folder -> its input line, from the dry run's rule blocks
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.strip().startswith("output:") and f"{runs}/method=" in ln:
            label = ln.split(f"{runs}/")[1].split("/done")[0]
            inputs[label] = next((x for x in lines[max(0, i - 2):i] if x.strip().startswith("input:")), "")
    first, second = "method=zeroq,w=4,a=8,K=1", "method=zeroq,w=4,a=4,K=1"
    assert f"{runs}/{first}/done" in inputs[second]
    assert "method=zeroq" not in inputs[first]
    assert "method=rtn,w=8,a=8" not in inputs["method=rtn,w=4,a=4,K=1"]
