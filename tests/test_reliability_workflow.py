"""Workflow-level reliability (issue 13): no grid value reaches a shell unquoted; a temporary fault is retried
by the next run and never replaces a good result; a cached checkpoint is reused only for the same full
recipe; `make run` finishes the grid after SIGINT, SIGTERM or SIGKILL of Snakemake."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from rex.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
MODEL = "resnet20_fmnist"


def _snakemake(args: list, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ 1. no grid value reaches a shell unquoted

# A stand-in for `python` (the grid's `python:` key puts its folder first on the jobs' PATH): it records the
# argv every rule's shell command hands it, and creates the rule's outputs so that the whole DAG runs.
FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    argv = sys.argv[1:]
    with open(os.environ["REX_TEST_ARGV_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\\n")
    def opt(name):
        return argv[argv.index(name) + 1] if name in argv else None
    def touch(p):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        open(p, "w").close()
    out = opt("--out")
    entry = argv[1] if argv[:1] == ["-m"] else (argv[0] if argv else "")  # `-m rex.pipeline.X` or a script
    if entry == "rex.pipeline.job":
        touch(os.path.join(out, "done"))
    elif entry.endswith("train_model.py"):
        touch(os.path.join(out, "model.pt")); touch(os.path.join(out, "metrics.json"))
    elif entry == "rex.pipeline.aggregate":
        touch(opt("--summary")); touch(opt("--jobs"))
    elif opt("--out-prefix"):
        for ext in ("md", "csv", "tex"):
            touch(opt("--out-prefix") + "." + ext)
    elif out:
        touch(out)
    """)


def _payloads(tmp: Path) -> dict:
    """One hostile value per shell metacharacter; each would create its own marker file if a shell ran it."""
    m = {k: tmp / f"marker-{k}" for k in ("semicolon", "subst", "backtick", "and", "quote", "newline", "dquote")}
    return {
        "semicolon": f"0.05;touch {m['semicolon']}",
        "subst": f"$(touch {m['subst']})",
        "backtick": f"`touch {m['backtick']}`",
        "and": f"x && touch {m['and']}",
        "quote": f"a' ; touch {m['quote']} ; echo 'b",
        "newline": f"x\ntouch {m['newline']}",
        "dquote": f'a" ; touch {m["dquote"]} ; echo "b c',
    }, m


def test_no_grid_value_reaches_a_shell_unquoted(tmp_path):
    """Every grid field that ends up in a rule's command carries shell metacharacters (`;`, `$(...)`, backticks,
    `&&`, quotes, a newline, spaces): the whole DAG runs (with a recording stand-in for `python`), no marker
    file appears, and every value arrives in the command's argv verbatim."""
    p, markers = _payloads(tmp_path)
    weird = tmp_path / "w d;$(x)`y`&&'q\""
    bindir = weird / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    argv_log = tmp_path / "argv.jsonl"
    train_args = ["--lr", p["semicolon"], "--seed", p["subst"], p["backtick"], p["and"], p["quote"], p["newline"],
                  "two words", p["dquote"]]
    cfg = yaml.safe_load((ROOT / "conf/grid/smoke.yaml").read_text())
    cfg.update(
        name=f"smoke {p['semicolon']}",
        results_dir=str(weird / "results"),
        tracking_uri=f"sqlite:///{weird}/mlflow.db{p['and']}",
        python=str(fake),
        imagenet_root=str(weird / "imagenet" / p["backtick"]),
        coco_root=p["quote"],
        cityscapes_root=p["dquote"],
    )
    cfg["checks"] = []  # the smoke grid's accuracy floors name jobs this grid does not have
    cfg["models"] = [
        {"model": MODEL, "dataset": "fashion_mnist", "limit": 50, "train_args": train_args},
        {"model": "mobilenet_v2", "dataset": "imagenet_val", "limit": 4, "fp32": False,
         "methods": [{"method": "rtn", "bits": [[8, 8]], "options": {"note": p["newline"]}}]},
        {"model": "fastestdet_coco", "dataset": "coco_val2017", "limit": 2, "fp32": False,
         "methods": [{"method": "rtn", "bits": [[8, 8]]}]},
        {"model": "espnet_cityscapes", "dataset": "cityscapes_val", "limit": 2, "fp32": False,
         "methods": [{"method": "rtn", "bits": [[8, 8]]}]},
    ]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(cfg))
    r = _snakemake(["--cores", "1", "--configfile", str(grid_file)], env={"REX_TEST_ARGV_LOG": str(argv_log)})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert not [k for k, f in markers.items() if f.exists()], "a grid value was run by a shell"
    calls = [json.loads(line) for line in argv_log.read_text().splitlines()]

    from rex.pipeline import grid

    jobs = grid.expand(cfg, ROOT)
    train = [c for c in calls if c[0].endswith("train_model.py")]
    assert len(train) == 1 and train[0][train[0].index("--") + 1:] == train_args, train
    assert train[0][train[0].index("--out") + 1] == grid.relpath(weird / "results" / "models" / MODEL, ROOT)
    job_calls = sorted((c for c in calls if c[:2] == ["-m", "rex.pipeline.job"]), key=lambda c: c[3])
    assert len(job_calls) == len(jobs) == 6
    for c, job in zip(job_calls, sorted(jobs, key=lambda j: j["dir"])):
        assert c == ["-m", "rex.pipeline.job", "--out", job["dir"], "--threads", "1", "--no-mlflow",
                     *job["overrides"]], (c, job["overrides"])
    overrides = [o for c in job_calls for o in c]
    for needle in (f"dataset.root={grid.hydra_value(cfg['imagenet_root'])}",
                   f"dataset.root={grid.hydra_value(p['quote'])}", f"dataset.root={grid.hydra_value(p['dquote'])}",
                   f"++method.options.note={grid.hydra_value(p['newline'])}"):
        assert needle in overrides, needle
    logged = [c for c in calls if c[:3] == ["-m", "rex.pipeline.tracking", "sync"]]  # one call per model
    assert len(logged) == len({(j["task"], j["model"]) for j in jobs}) == 4
    assert all(c[c.index("--grid") + 1] == cfg["name"] and
               c[c.index("--tracking-uri") + 1] == cfg["tracking_uri"] for c in logged)
    assert sorted(a for c in logged for a in c if a.endswith("/done")) == sorted(f"{j['dir']}/done" for j in jobs)
    page = [c for c in calls if c[:3] == ["-m", "rex.pipeline.report", "page"]]
    assert len(page) == 1 and page[0][page[0].index("--grid") + 1] == cfg["name"]


def test_a_hostile_train_arg_is_refused_by_the_real_training(tmp_path):
    """Arrived verbatim, `--lr "0.05;touch x"` is not a number: rex.train refuses it (exit 2, one line)."""
    marker = tmp_path / "marker"
    r = subprocess.run([sys.executable, "workflow/scripts/train_model.py", "--model", MODEL, "--out",
                        str(tmp_path / "m"), "--threads", "1", "--", "--smoke", "--lr", f"0.05;touch {marker}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid float value: '0.05;touch" in r.stderr, r.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "m" / "model.pt").exists()


# -------------------------------------------------- 4. a cached checkpoint is reused only for the same recipe

def _train_model_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_model_script", ROOT / "workflow/scripts/train_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    """A cache (REX_CACHE) holding a smoke checkpoint trained with batch 32 / lr 0.05 on 1 thread."""
    cache = tmp_path_factory.mktemp("cache")
    out = cache / "models" / MODEL
    r = subprocess.run([sys.executable, "-m", "rex.train", "--model", MODEL, "--out", str(out), "--threads", "1",
                        "--smoke", "--batch-size", "32", "--lr", "0.05"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "REX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    return cache


RECIPE = ["--smoke", "--batch-size", "32", "--lr", "0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("args, reused", [
    (RECIPE, True),
    (["--smoke"], False),                                    # default batch 128 / lr 0.1 (the reported case)
    (["--smoke", "--batch-size", "128", "--lr", "0.05"], False),
    (["--smoke", "--batch-size", "32", "--lr", "0.1"], False),
    (RECIPE + ["--optimizer", "adam"], False),
    (RECIPE + ["--weight-decay", "0.001"], False),
    (RECIPE + ["--seed", "1"], False),
    (RECIPE + ["--no-augment"], False),
    (RECIPE + ["--limit", "1024"], False),
    (RECIPE + ["--epochs", "2"], False),
    (RECIPE + ["--threads", "2"], False),                    # another thread count trains another checkpoint
    (RECIPE + ["--bogus"], False),                           # does not parse: training runs and reports it
])
def test_cached_checkpoint_needs_the_full_recipe(smoke_cache, monkeypatch, args, reused):
    monkeypatch.setenv("REX_CACHE", str(smoke_cache))
    tm = _train_model_script()
    got = tm.cached_match(MODEL, tm.requested(MODEL, 1, args))
    assert (got is not None) is reused, args


@pytest.mark.slow
def test_another_recipe_trains_the_same_recipe_copies(smoke_cache, tmp_path):
    env = {**os.environ, "REX_CACHE": str(smoke_cache)}
    cached = json.loads((smoke_cache / "models" / MODEL / "metrics.json").read_text())

    def run(out, args):
        return subprocess.run([sys.executable, "workflow/scripts/train_model.py", "--model", MODEL, "--out", str(out),
                               "--threads", "1", "--reuse-cache", "--", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=900, env=env)

    same = run(tmp_path / "same", RECIPE)
    assert same.returncode == 0 and "reused the cached checkpoint" in same.stdout, same.stdout + same.stderr
    assert json.loads((tmp_path / "same" / "metrics.json").read_text())["sha256"] == cached["sha256"]
    other = run(tmp_path / "other", ["--smoke", "--batch-size", "64", "--lr", "0.05"])
    assert other.returncode == 0, other.stderr[-3000:]
    assert "not reusing the cached checkpoint" in other.stdout and "differs in batch_size, warmup_steps" in other.stdout
    m = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert m["full_recipe"]["batch_size"] == 64 and m["sha256"] != cached["sha256"]
    # a cache written before the full recipe was recorded: rebuilt from the fields its metrics.json holds
    old = tmp_path / "oldcache" / "models" / MODEL
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes((smoke_cache / "models" / MODEL / "model.pt").read_bytes())
    legacy = {k: v for k, v in cached.items() if k not in ("full_recipe", "recipe_hash")}
    (old / "metrics.json").write_text(json.dumps(legacy))
    tm = _train_model_script()
    os.environ["REX_CACHE"], prev = str(tmp_path / "oldcache"), os.environ.get("REX_CACHE")
    try:
        assert tm.cached_match(MODEL, tm.requested(MODEL, 1, RECIPE)) == old
        assert tm.cached_match(MODEL, tm.requested(MODEL, 1, ["--smoke"])) is None
    finally:
        os.environ.pop("REX_CACHE") if prev is None else os.environ.__setitem__("REX_CACHE", prev)


# ------------------------------------------- 3. a temporary fault is retried, never a permanent result

def test_failure_kinds():
    import errno

    from hydra.errors import ConfigCompositionException, MissingConfigException

    from rex.errors import CheckpointError, ConfigError, DatasetError, UnknownNameError, WeightError
    from rex.pipeline.job import failure_kind

    env = [DatasetError("x"), CheckpointError("x"), MemoryError(), OSError(errno.ENOSPC, "No space left on device"),
           PermissionError("x"), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
                                              "memory: you tried to allocate 1 bytes."),
           RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")]
    config = [ConfigError("x"), UnknownNameError("method", "x", ["rtn"]), WeightError("x"),
              MissingConfigException("x"), ConfigCompositionException("x")]
    assert [failure_kind(e) for e in env] == ["environment"] * len(env)
    assert [failure_kind(e) for e in config] == ["config"] * len(config)
    assert failure_kind(RuntimeError("shape mismatch")) == failure_kind(ZeroDivisionError()) == "unexpected"


def _fm_copy(folder: Path) -> Path:
    """A Fashion-MNIST folder of symlinks to the real IDX files (found the way rex.data finds them)."""
    from rex.data.fashion_mnist import SPLITS, find_files

    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _, imgs, labs = find_files(split)
        for p in (imgs, labs):
            (folder / p.name).unlink(missing_ok=True)
            (folder / p.name).symlink_to(p)
    return folder


def _corrupt(folder: Path) -> None:
    for p in folder.glob("t10k-images*"):
        p.unlink()
        p.write_bytes(os.urandom(4321))


JOB_OV = [f"model={MODEL}", "dataset=fashion_mnist", "evaluation=classification", "evaluation.limit=20",
          "method=rtn", "method.wbits=8", "method.abits=8"]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    import torch

    from rex.models.small import BUILDERS

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(BUILDERS[MODEL]().state_dict(), p)
    return p


def _run_job(out: Path, overrides: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rex.pipeline.job", "--out", str(out), "--no-mlflow", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


@pytest.mark.slow
def test_environment_fault_is_retried_and_never_replaces_a_good_result(tmp_path, random_weights):
    fm = _fm_copy(tmp_path / "fm")
    env = {"REX_FMNIST_ROOT": str(fm), "REX_CACHE": str(tmp_path / "cache")}  # no decoded-data cache to hide it
    ov = JOB_OV + [f"model.weights={random_weights}"]
    fresh = tmp_path / "runs" / "classification" / MODEL / "method=rtn,w=8,a=8,K=1"
    _corrupt(fm)
    r = _run_job(fresh, ov, env)
    assert r.returncode == 75, r.stdout + r.stderr
    assert "the next run retries this job" in r.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ["FAILED.json", "config.yaml"]  # no `done`
    rec = json.loads((fresh / "FAILED.json").read_text())
    assert rec["kind"] == "environment" and rec["retry"] and rec["error"]["type"] == "DatasetError"

    _fm_copy(fm)  # fixed: the retry computes it, the failure record is gone
    r = _run_job(fresh, ov, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in fresh.iterdir()) == ["config.yaml", "done", "metrics.json"]
    good = (fresh / "metrics.json").read_bytes()

    for fault in ("data", "checkpoint", "config"):  # a failed rerun keeps the good result
        bad_ov = list(ov)
        if fault == "data":
            _corrupt(fm)
        elif fault == "checkpoint":
            trunc = tmp_path / "trunc.pt"
            trunc.write_bytes(random_weights.read_bytes()[:500])
            bad_ov[-1] = f"model.weights={trunc}"
        else:
            bad_ov.append("method.budget=0.5")
        r = _run_job(fresh, bad_ov, env)
        assert r.returncode == 75, (fault, r.stdout + r.stderr)
        assert "the previous good metrics.json is kept" in r.stderr
        assert (fresh / "metrics.json").read_bytes() == good, fault
        assert not (fresh / "done").exists() and not list(fresh.parent.glob(".*tmp*"))
        rec = json.loads((fresh / "FAILED.json").read_text())
        assert rec["previous_result_kept"] is True and rec["kind"] == ("config" if fault == "config" else "environment")
        _fm_copy(fm)
    from rex.pipeline.aggregate import read_record

    assert read_record(fresh)["status"] == "ok"  # readers take the kept result


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_corrupt_data_run_fix_rerun_computes_the_jobs(tmp_path):
    """Smoke grid: model trained, then the data corrupted -> the run fails (exit != 0), no job is `done`; the
    data fixed -> the plain rerun computes every job (not "Nothing to be done") and the model is not retrained."""
    fm = _fm_copy(tmp_path / "fm")
    results = tmp_path / "results"
    env = {"REX_FMNIST_ROOT": str(fm), "REX_CACHE": str(tmp_path / "cache")}
    cfg = yaml.safe_load((ROOT / "conf/grid/smoke.yaml").read_text())  # its settings, on a net trained here
    cfg["checks"] = []
    cfg["models"] = [{"model": MODEL, "dataset": "fashion_mnist", "limit": 500,
                      "train_args": ["--smoke", "--batch-size", "32", "--lr", "0.05"]}]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(cfg))
    base = ["--cores", "1", "--configfile", str(grid_file), "--config", f"results_dir={results}"]
    ckpt = results / "models" / MODEL / "model.pt"
    r = _snakemake([*base, "--", str(ckpt)], env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    mtime = ckpt.stat().st_mtime_ns
    _corrupt(fm)
    r = _snakemake(base, env=env)
    assert r.returncode != 0, (r.stdout + r.stderr)[-3000:]
    jobs = results / "runs" / "classification" / MODEL
    assert not list(jobs.glob("*/done")) and not (results / "summary.csv").exists()
    recs = [json.loads(p.read_text()) for p in jobs.glob("*/FAILED.json")]
    assert recs and {(x["kind"], x["error"]["type"]) for x in recs} == {("environment", "DatasetError")}
    _fm_copy(fm)
    r = _snakemake(base, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Nothing to be done" not in out, out[-3000:]
    assert "train_model" not in out and ckpt.stat().st_mtime_ns == mtime
    assert len(list(jobs.glob("*/done"))) == 3 and not list(jobs.glob("*/FAILED.json"))
    import csv

    with open(results / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {x["status"] for x in rows} == {"ok"}


# ------------------------------------------- 2. an interrupted run resumes by itself: SIGINT, SIGTERM, SIGKILL

def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie -- dead, not yet reaped -- counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _running_job(jobs: Path, label: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """The pid of the job `label` once it is running (its `.label.tmp-<pid>` folder exists)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        pids = [int(t.name.rsplit("-", 1)[1]) for t in jobs.glob(f".{label}.tmp-*")] if jobs.is_dir() else []
        live = [p for p in pids if _alive(p)]  # not the folder a job killed earlier left behind
        if live:
            return live[0]
        time.sleep(0.05)
    raise AssertionError(f"job {label} never started (Snakemake exit {proc.poll()}):\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_run_resumes_with_the_same_command(tmp_path, random_weights):
    """`make run`'s command (workflow/scripts/run.py, which `make run` / `make smoke` call) on a 2-job grid is cut
    three times while a job runs -- Ctrl-C (SIGINT to the whole process group), `kill` (SIGTERM to Snakemake),
    `kill -9` (SIGKILL to Snakemake alone) -- and then rerun unchanged: it finishes, no job process outlives its
    Snakemake, no complete job is recomputed, summary.csv has no duplicate row and MLflow holds one run per job."""
    import csv
    import shutil

    results = tmp_path / "results"
    models = results / "models" / MODEL
    models.mkdir(parents=True)
    shutil.copy(random_weights, models / "model.pt")  # the trained model is there: no training in this test
    (models / "metrics.json").write_text("{}")
    cfg = yaml.safe_load((ROOT / "conf/grid/smoke.yaml").read_text())
    cfg.update(name="interrupt", results_dir=str(results), checks=[])
    cfg["models"] = [{"model": MODEL, "dataset": "fashion_mnist", "limit": 20}]
    cfg["methods"] = [{"method": "rtn", "bits": [[8, 8]]}]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "workflow/scripts/run.py", "--cores", "2", "--configfile", str(grid_file)]
    jobs = results / "runs" / "classification" / MODEL
    fp32, rtn = "method=fp32,w=32,a=32,K=1", "method=rtn,w=8,a=8,K=1"
    env = {**os.environ, "REX_CACHE": str(tmp_path / "cache")}

    def cut(label: str, sig: int, group: bool, n: int) -> int:
        log = tmp_path / f"run{n}.log"
        with open(log, "w") as lf:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            job = _running_job(jobs, label, p, log)
            time.sleep(0.5)
            os.killpg(p.pid, sig) if group else os.kill(p.pid, sig)
            rc = p.wait(timeout=300)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        assert _wait_gone(job), f"job {label} (pid {job}) outlived Snakemake ({signal.Signals(sig).name})"
        assert rc != 0 or sig == signal.SIGTERM, log.read_text()[-3000:]
        return rc

    cut(fp32, signal.SIGINT, True, 1)  # Ctrl-C: the job dies with it, nothing complete-looking is left
    assert not (jobs / fp32 / "done").exists()
    cut(fp32, signal.SIGKILL, False, 2)  # kill -9 of Snakemake alone: its job must die too; its lock stays
    assert not (jobs / fp32 / "done").exists() and any((ROOT / ".snakemake" / "locks").iterdir())
    cut(rtn, signal.SIGTERM, False, 3)  # kill: Snakemake lets the running job finish, starts nothing new
    done = {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/done")}
    assert fp32 in done, sorted(p.name for p in jobs.iterdir())

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "IncompleteFilesException" not in out and "LockException" not in out
    assert {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/done")}.items() >= done.items(), \
        "a complete job was recomputed"
    assert sorted(p.parent.name for p in jobs.glob("*/done")) == [fp32, rtn] and not list(jobs.glob(".*"))
    with open(results / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [(x["method"], x["wbits"], x["abits"], x["order"], x["budget"], x["metric"]) for x in rows]
    assert rows and len(keys) == len(set(keys)) and {x["status"] for x in rows} == {"ok"}
    from rex.pipeline.tracking import Tracker

    runs = Tracker(f"sqlite:///{results}/mlflow.db", results).runs()
    assert sorted(x.data.tags["label"] for x in runs) == [fp32, rtn]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
