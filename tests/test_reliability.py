"""Reliability: integer safety of mode=int, determinism, parallel MLflow logging, Snakemake's lock, and a job
killed in the middle of the smoke grid (no complete-looking result; the rerun recomputes only what is
missing; no duplicate rows)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import rex
from rex.errors import Int32OverflowWarning
from rex.nn.layers import QuantLayer
from rex.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
MODEL = "resnet20_fmnist"
SMOKE_MODEL = "mobilenet_v2"  # the model of conf/grid/smoke.yaml
SUMMARY_KEY = ("task", "model", "method", "wbits", "abits", "order", "budget", "metric")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Fixed random ResNet-20 weights (no trained checkpoint needed)."""
    from rex.models.small import BUILDERS

    torch.manual_seed(1)
    model = BUILDERS[MODEL]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    p = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(model.state_dict(), p)
    return p


# -------------------------------------------------------------------------------- integer safety

def _linear_model(fan_in: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(fan_in, 1)).eval()


@pytest.mark.parametrize("fan_in, safe", [(66311, True), (66312, False)])
def test_accumulator_bound_at_the_int32_limit(fan_in, safe):
    """W8A8 (|q_w| <= 127, unsigned |q_x| <= 255): fan_in * 127 * 255 < 2^31 holds up to fan_in 66311."""
    spec = rex.QuantSpec(method="rtn", wbits=8, abits=8, first_last="same", mode="int")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = rex.quantize(_linear_model(fan_in), spec, example_input=torch.zeros(1, fan_in), input_range=(0.0, 1.0))
    layer = q[0]
    assert isinstance(layer, QuantLayer)
    assert layer.accumulator_bound() == fan_in * 127 * 255
    assert layer.int32_safe() is safe
    assert rex.report(q)[0]["int32_safe"] is safe
    overflow = [x for x in w if issubclass(x.category, Int32OverflowWarning)]
    assert bool(overflow) is (not safe)
    assert any("int32" in n for n in q.rex_info.notes) is (not safe)
    if overflow:
        assert "0 (W8A8, fan-in 66312" in str(overflow[0].message)


def test_int_mode_warns_naming_the_unsafe_layers_and_fake_mode_does_not():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                            torch.nn.Conv2d(64, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(64 * 12 * 12, 2)).eval()
    x = torch.randn(2, 3, 16, 16)
    # W12A12: |acc| <= fan_in * 2047 * 2047 -> layer 0 (fan-in 27) safe, 3 (576) and 7 (9216) not
    for mode, bits, expect in (("int", 12, ["3", "7"]), ("int", 4, []), ("fake", 16, [])):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            q = rex.quantize(m, rex.QuantSpec(method="rex", wbits=bits, abits=bits, order=2, mode=mode,
                                              first_last="same"), example_input=x[:1], input_range=(-3.0, 3.0))
        msgs = [str(x.message) for x in w if issubclass(x.category, Int32OverflowWarning)]
        unsafe = [r["name"] for r in rex.report(q) if not r["int32_safe"]]
        if mode == "int":
            assert unsafe == expect
        if expect:
            assert len(msgs) == 1 and all(f"{n} (W{bits}A{bits}" in msgs[0] for n in expect), msgs
            assert "0 (W" not in msgs[0]  # the first layer (fan-in 27) is safe and not named
        else:
            assert not msgs
        assert torch.isfinite(q(x)).all()  # the simulation itself stays exact and runs


# ------------------------------------------------------------------------------------ determinism

def _job(out: Path, overrides: list, subprocess_: bool = False) -> dict:
    argv = ["--out", str(out), "--no-mlflow", *overrides]
    if subprocess_:
        r = subprocess.run([sys.executable, "-m", "rex.pipeline.job", *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        from rex.pipeline.job import main

        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["status"] == "ok", rec.get("error")
    return rec


def test_same_config_twice_gives_identical_metrics(weights, tmp_path):
    """Same config, two runs (one in this process, one in a fresh process): every metric and BOPs identical."""
    ov = [f"model={MODEL}", "dataset=fashion_mnist", "evaluation=classification", "evaluation.limit=200",
          f"model.weights={weights}", "method=rex", "method.wbits=4", "method.abits=4", "method.order=2",
          "method.budget=1.5", "method.allocation=greedy"]
    base = tmp_path / "runs" / "classification" / MODEL
    a = _job(base / "a", ov)
    b = _job(base / "b", ov, subprocess_=True)
    assert a["metrics"] == b["metrics"] and a["fp32"] == b["fp32"]
    for k in ("bops", "plain_bops", "n", "config_hash", "spec_hash"):
        assert a[k] == b[k], k
    for k in ("max_err", "bops_ratio_vs_plain", "size_mbit", "int32_safe", "bound_ok"):
        assert a["details"][k] == b["details"][k], k
    assert a["hashes"]["weights_sha256"] == b["hashes"]["weights_sha256"]


def test_seed_is_config_and_drives_zeroq(weights, tmp_path, monkeypatch):
    """ZeroQ draws random numbers: its seed is protocol.seed (hashed into the config), the same seed gives the
    same quantized model, another seed another one."""
    import rex.zeroq
    from rex.models import get_model
    from rex.pipeline.job import compose, config_hash, spec_from_config, to_container

    cfgs = {s: to_container(compose([f"model={MODEL}", "method=zeroq", f"protocol.seed={s}",
                                     "+method.options.zeroq_steps=3", "+method.options.zeroq_batch=2"]))
            for s in (0, 1)}
    assert cfgs[0]["protocol"]["seed"] == 0 and config_hash(cfgs[0]) != config_hash(cfgs[1])
    specs = {s: spec_from_config(c) for s, c in cfgs.items()}
    assert specs[1].seed == 1 and specs[0].hash() != specs[1].hash()
    model = get_model(MODEL, weights=weights).model
    ex = torch.zeros(1, 1, 28, 28)

    monkeypatch.setattr(rex.zeroq, "_disk_path", lambda key: tmp_path / "zq" / f"{abs(hash(key))}.pt")

    def ranges(spec):
        rex.zeroq._CACHE.clear()  # really distill again (memory and disk)
        shutil.rmtree(tmp_path / "zq", ignore_errors=True)
        q = rex.quantize(model, spec, example_input=ex, input_range=(-0.9, 2.0))
        return [r["act_range"] for r in rex.report(q)]

    r0, r0b, r1 = ranges(specs[0]), ranges(specs[0]), ranges(specs[1])
    assert r0 == r0b
    assert r0 != r1


# --------------------------------------------------------------------------- MLflow, many writers

def _fake_jobs(results: Path, n_models: int, per_model: int) -> dict:
    dirs = {}
    for i in range(n_models):
        for j in range(per_model):
            d = results / "runs" / "classification" / f"model{i}" / f"method=rex,w=4,a=8,K={j + 1}"
            d.mkdir(parents=True)
            rec = {"status": "ok", "task": "classification", "model": f"model{i}", "label": d.name, "method": "rex",
                   "wbits": 4, "abits": 8, "order": j + 1, "config_hash": f"cfg{i:02d}{j:03d}",
                   "metrics": {"top1": float(i * 100 + j), "top5": 99.0, "agreement": 98.0, "kl": 0.01},
                   "bops": 1000 + j, "wall_seconds": 1.0}
            (d / "metrics.json").write_text(json.dumps(rec))
            (d / "config.yaml").write_text(yaml.safe_dump({"model": {"name": f"model{i}"},
                                                           "method": {"name": "rex", "order": j + 1}}))
            (d / "done").write_text("ok\n")
            dirs.setdefault(i, []).append(d)
    return dirs


def _sync_procs(results: Path, groups: list) -> list:
    procs = [subprocess.Popen([sys.executable, "-m", "rex.pipeline.tracking", "sync", "--results-dir", str(results),
                               *map(str, g)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in groups]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_parallel_mlflow_logging_loses_and_duplicates_nothing(tmp_path):
    from rex.pipeline.tracking import Tracker

    results = tmp_path / "results"
    dirs = _fake_jobs(results, 8, 50)
    outs = _sync_procs(results, [dirs[i] for i in range(8)])  # 8 writers, 50 runs each, one sqlite store
    assert [o["created"] for o in outs] == [50] * 8, outs
    tracker = Tracker(None, results)
    runs = tracker.runs()
    assert len(runs) == 400
    hashes = [r.data.tags["config_hash"] for r in runs]
    assert len(set(hashes)) == 400
    by_hash = {r.data.tags["config_hash"]: r for r in runs}
    for i in range(8):
        for j in range(50):
            assert by_hash[f"cfg{i:02d}{j:03d}"].data.metrics["top1"] == float(i * 100 + j)

    # re-logging the same configs (changed numbers) from two writers at once updates, never duplicates
    for d in dirs[3]:
        rec = json.loads((d / "metrics.json").read_text())
        rec["metrics"]["top1"] += 0.5
        (d / "metrics.json").write_text(json.dumps(rec))
    outs = _sync_procs(results, [dirs[3], dirs[3]])
    assert sum(o["updated"] for o in outs) == 50 and sum(o["unchanged"] for o in outs) == 50, outs
    assert sum(o["created"] for o in outs) == 0
    runs = tracker.runs()
    assert len(runs) == 400 and len({r.data.tags["config_hash"] for r in runs}) == 400
    by_hash = {r.data.tags["config_hash"]: r for r in runs}
    assert by_hash["cfg03007"].data.metrics["top1"] == 307.5
    assert tracker.log_job(dirs[3][7])[0] == "unchanged"


# ------------------------------------------------------- Snakemake: lock, kill in the middle, resume

def _job_stats(log: str) -> dict:
    """The 'Job stats' table of a Snakemake log -> {rule: count} (last table in the log)."""
    stats, inside = {}, False
    for line in log.splitlines():
        if line.startswith("Job stats:"):
            stats, inside = {}, True
            continue
        if inside:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                if parts[0] != "total":
                    stats[parts[0]] = int(parts[1])
                else:
                    inside = False
    return stats


def _summary_rows(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_a_job_then_resume_smoke_grid(tmp_path):
    """Smoke grid into a temporary results folder (`--config results_dir=...`). While a quantize job runs:
    a second Snakemake on the same folder is refused by Snakemake's lock; then the job is SIGKILLed. Nothing
    that looks complete is left for it; the rerun computes only that job (and what depends on it), and the
    final tables have no duplicate rows."""
    results = tmp_path / "results"
    smoke = ROOT / "conf/grid/smoke.yaml"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", str(smoke),
           "--config", f"results_dir={results}"]
    jobs_dir = results / "runs" / "classification" / SMOKE_MODEL
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as lf:
        p1 = subprocess.Popen(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        tmp = None
        deadline = time.time() + 900
        while time.time() < deadline and p1.poll() is None:
            found = sorted(jobs_dir.glob(".method=rex,*.tmp-*")) if jobs_dir.is_dir() else []
            if found:
                tmp = found[0]
                break
            time.sleep(0.2)
        assert tmp is not None, "the rex job never started:\n" + log1.read_text()[-3000:]
        pid = int(tmp.name.rsplit("-", 1)[1])
        label = tmp.name[1:].rsplit(".tmp-", 1)[0]
        os.kill(pid, signal.SIGSTOP)  # hold the job (and so the first Snakemake) in the middle
        try:
            r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
            out2 = r2.stdout + r2.stderr
            assert r2.returncode != 0, out2[-3000:]
            assert "LockException" in out2 or "cannot be locked" in out2, out2[-3000:]
        finally:
            os.kill(pid, signal.SIGKILL)  # the fault: killed in the middle
        rc1 = p1.wait(timeout=900)
    finally:
        if p1.poll() is None:
            os.killpg(p1.pid, signal.SIGKILL)
    assert rc1 != 0, "the first run should report the killed job"
    killed = jobs_dir / label
    assert not (killed / "done").exists() and not (killed / "metrics.json").exists() \
        and not (killed / "FAILED.json").exists(), "a killed job must not leave a complete-looking folder"
    assert not (results / "summary.csv").exists()
    survivors = {d.name: (d / "done").stat().st_mtime_ns for d in jobs_dir.iterdir()
                 if not d.name.startswith(".") and (d / "done").exists()}
    # the FP32 job is a dependency of the others, so it finished; the RTN job may or may not have run before the
    # REx job (Snakemake's order with --cores 1), and after the failure Snakemake schedules nothing new
    all_labels = {"method=fp32,w=32,a=32,K=1", "method=rtn,w=8,a=8,K=1", label}
    assert "method=fp32,w=32,a=32,K=1" in survivors and set(survivors) < all_labels, sorted(p.name for p in jobs_dir.iterdir())
    missing = all_labels - set(survivors)
    # MLflow logs a model's folders in one rule once all its jobs are done: not after the failed first run
    model_marker = results / "mlflow" / "classification" / f"{SMOKE_MODEL}.json"
    assert not model_marker.exists(), "the model's MLflow rule ran before all its jobs were done"
    if os.environ.get("REX_KEEP_LOG"):  # debugging aid: keep the first run's log
        shutil.copy(log1, os.environ["REX_KEEP_LOG"])

    # resume: only the missing jobs (+ what depends on them) run; nothing complete is recomputed
    r3 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    out3 = r3.stdout + r3.stderr
    assert r3.returncode == 0, out3[-4000:]
    stats = _job_stats(out3)
    # one job rule per label shape (quantize_evaluate, _budget, _alloc): exactly the missing jobs run
    assert sum(v for k, v in stats.items() if k.startswith("quantize_evaluate")) == len(missing), (stats, missing)
    assert "train_model" not in stats, stats
    assert stats.get("mlflow_log") == 1, (stats, log1.read_text()[-3000:])
    assert json.loads(model_marker.read_text())["jobs"] == 3
    for name, mtime in survivors.items():
        assert (jobs_dir / name / "done").stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert json.loads((killed / "metrics.json").read_text())["status"] == "ok"
    assert not list(jobs_dir.glob(".*")), "temporary folders left behind"

    rows = _summary_rows(results / "summary.csv")
    keys = [tuple(r[k] for k in SUMMARY_KEY) for r in rows]
    assert len(rows) == 12 and len(set(keys)) == 12 and {r["status"] for r in rows} == {"ok"}
    jobs = _summary_rows(results / "jobs.csv")
    assert len(jobs) == 3 and len({j["label"] for j in jobs}) == 3
    table = _summary_rows(results / "tables" / f"classification_{SMOKE_MODEL}.csv")
    assert len(table) == 3
    from rex.pipeline.tracking import Tracker

    runs = Tracker(None, results).runs()
    assert len(runs) == 3 and len({r.data.tags["config_hash"] for r in runs}) == 3
    # and a third run has nothing to do
    r4 = subprocess.run(cmd + ["-n"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "Nothing to be done" in r4.stdout + r4.stderr
