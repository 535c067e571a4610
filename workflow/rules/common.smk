# Grid expansion and helpers shared by the rules. The grid logic is rex/pipeline/grid.py: `rex` loads its heavy
# parts lazily, so importing it here never imports torch and building the DAG needs no data.
import json
import os
import shlex
import sys
from pathlib import Path


PROJECT = Path(workflow.basedir)

# Snakemake puts the Snakefile's folder (PROJECT) first on sys.path, so this is the checkout's own `rex`.
from rex.pipeline import grid


R = grid.relpath(grid.results_dir(config, PROJECT), PROJECT)  # results folder (relative when inside the project)
JOBS = grid.expand(config, PROJECT)
JOB_BY_DIR = {j["dir"]: j for j in JOBS}
FP32_DIR = {(j["task"], j["model"], j["dataset"]): j["dir"] for j in JOBS if j["method"] == grid.FP32_METHOD}
TRAIN = grid.train_specs(config, PROJECT)
PAIRS = sorted({(j["task"], j["model"]) for j in JOBS})
TRACKING_URI = config.get("tracking_uri") or f"sqlite:///{R}/mlflow.db"
MLFLOW = bool(config.get("mlflow", True))
RES = config.get("resources") or {}
GRID_NAME = str(config.get("name", "custom"))
CHECKS = list(config.get("checks") or [])  # accuracy floors of the grid (rule check)

# Jobs run `python` from the interpreter's folder that runs Snakemake (the project's .venv), or from `python:`.
_PYBIN = os.path.dirname(config.get("python") or sys.executable)


def _lifeline():
    """Every rule's command is one `python ...`, started through this: `exec` makes it Snakemake's direct child
    (no shell in between), and setpriv's parent-death signal (Linux prctl PR_SET_PDEATHSIG) kills it when
    Snakemake dies, even by SIGKILL: no orphaned job keeps running or writing after a crash."""
    import shutil
    import subprocess

    if shutil.which("setpriv"):
        try:
            if subprocess.run(["setpriv", "--pdeathsig", "KILL", "true"], timeout=10).returncode == 0:
                return "exec setpriv --pdeathsig KILL "
        except (OSError, subprocess.SubprocessError):
            pass
    return "exec "  # no setpriv (not Linux): the job still replaces the shell


shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(_PYBIN)}:\"$PATH\"; {_lifeline()}")


# A job folder is <label> = method=..,w=..,a=..,K=..[,budget=..[,alloc=..]] (QuantSpec.label()), plus ,p=<hash>
# when the protocol, method options or dataset are not the defaults (grid.variant). The job rules
# spell the label's parts as separate wildcards, none holding a comma: a cluster job selects its job with
# `--target-jobs rule:k=v,k=v`, which Snakemake 9 splits on every comma (a `label` wildcard would arrive cut).
wildcard_constraints:
    task="|".join(grid.TASKS),
    model=grid.NAME_RE,
    label=grid.JOB_LABEL_RE,
    method=r"[A-Za-z0-9_]+",
    w=r"\d+",
    a=r"\d+",
    K=r"\d+",
    budget=r"[0-9.e+]+",
    alloc=r"[a-z_]+",
    p=grid.VARIANT_RE,


def label_of(wildcards):
    """The job folder name from the job rule's wildcards (or a rule's `label` wildcard)."""
    if "label" in wildcards.keys():
        return wildcards.label
    label = f"method={wildcards.method},w={wildcards.w},a={wildcards.a},K={wildcards.K}"
    if "budget" in wildcards.keys():
        label += f",budget={wildcards.budget}"
    if "alloc" in wildcards.keys():
        label += f",alloc={wildcards.alloc}"
    if "p" in wildcards.keys():
        label += f",p={wildcards.p}"
    return label


def job_of(wildcards):
    key = f"{R}/runs/{wildcards.task}/{wildcards.model}/{label_of(wildcards)}"
    if key not in JOB_BY_DIR:
        raise ValueError(f"{key} is not a job of grid {GRID_NAME!r} (see conf/grid/)")
    return JOB_BY_DIR[key]


# A distilling method's first job of a model runs before its other jobs of that model: the distilled batch is
# cached on disk per (weights, shape, seed, ...), the same for every bit-width, so the others read it instead of
# distilling again side by side (ZeroQ's own distillation: ~80 CPU-s per Fashion-MNIST net).
FIRST_DISTILLING = {}
for _j in JOBS:
    if _j["method"] in grid.DISTILLING_METHODS:
        FIRST_DISTILLING.setdefault((_j["task"], _j["model"], _j["dataset"], _j["method"], _j["variant"]), _j["dir"])


def job_inputs(wildcards):
    """A trained model's checkpoint; the FP32 job of the same model first (it fills the FP32 cache); and for a
    distilling method, its first job of the model (it fills the distillation cache)."""
    job = job_of(wildcards)
    deps = {}
    if job["checkpoint"]:
        deps["checkpoint"] = job["checkpoint"]
    if job["method"] != grid.FP32_METHOD:
        fp = FP32_DIR.get((job["task"], job["model"], job["dataset"]))
        if fp is not None:
            deps["fp32"] = f"{fp}/done"
    first = FIRST_DISTILLING.get((job["task"], job["model"], job["dataset"], job["method"], job["variant"]))
    if first is not None and first != job["dir"]:
        deps["distilled"] = f"{first}/done"
    return deps


def job_resource(name, default):
    def get(wildcards, attempt=1):
        task = wildcards.task
        return int((RES.get(task) or {}).get(name, default) * (attempt if name != "cpus_per_task" else 1))

    return get


def done_markers():
    return [f"{j['dir']}/done" for j in JOBS]


def table_files():
    return [f"{R}/tables/{t}_{m}.{ext}" for t, m in PAIRS for ext in ("md", "csv", "tex")]


def plot_files():
    return [f"{R}/plots/{t}_{m}.png" for t, m in PAIRS]


def model_done_markers(task, model):
    return [f"{j['dir']}/done" for j in JOBS if j["task"] == task and j["model"] == model]


def mlflow_markers():
    return [f"{R}/mlflow/{t}/{m}.json" for t, m in PAIRS]


def all_outputs():
    out = [f"{R}/summary.csv", f"{R}/jobs.csv", f"{R}/report.md"] + table_files() + plot_files()
    if MLFLOW:
        out += mlflow_markers()
    if CHECKS:
        out.append(f"{R}/checks.json")
    return out


# For baselines.smk, from the grid's optional `baselines:` block -> baselines_table.py's arguments
BASELINES_MODEL, BASELINES_ARGS = grid.baselines_args(config)
