"""MLflow: one run per job folder, a view of the result files (never the source of truth).

- Store: ``sqlite:///<results_dir>/mlflow.db`` (``sqlite:///results/mlflow.db`` for the default grid, relative to
  the project root), artifacts under ``<results_dir>/mlartifacts/<task>/`` (set explicitly per experiment), or
  any tracking URI given in the config (``tracking_uri``) / ``--tracking-uri``.
- One experiment per task (``rex-classification``, ``rex-detection``, ``rex-segmentation``).
- Idempotent: a job's run is found by its tags ``config_hash`` + ``task`` + ``model`` and updated in place;
  re-logging an unchanged folder (same ``record_sha256`` tag) does nothing.
- Safe with many parallel jobs: every MLflow write happens under a file lock (``<db>.lock``, or
  ``<results_dir>/.mlflow.lock`` for non-SQLite stores) and is retried with back-off.
- MLflow state never decides what re-runs: Snakemake looks at the job folders only.

    python -m rex.pipeline.tracking sync results/runs/*/*/*     # (re)log folders, e.g. after deleting mlflow.db
    mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from ..io import atomic_write_json
from .grid import FINAL_STATUSES, NOT_APPLICABLE

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

RECORD_FILES = ("metrics.json", "FAILED.json")
PARAM_MAX = 6000
EXPERIMENT_PREFIX = "rex-"


def results_dir_of(job_dir: Path) -> Path:
    """<results>/runs/<task>/<model>/<label> -> <results>"""
    return Path(job_dir).resolve().parents[3]


def default_tracking_uri(results_dir: Path) -> str:
    p = Path(results_dir)
    return f"sqlite:///{p.as_posix()}/mlflow.db"


def _sqlite_path(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def lock_path(uri: str, results_dir: Path) -> Path:
    db = _sqlite_path(uri)
    return Path(str(db) + ".lock") if db is not None else Path(results_dir) / ".mlflow.lock"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_job(job_dir: Path) -> tuple[dict, dict, Path]:
    """(record, config, record path) of a finished job folder."""
    job_dir = Path(job_dir)
    for name in RECORD_FILES:
        p = job_dir / name
        if p.is_file():
            record = json.loads(p.read_text())
            break
    else:
        raise FileNotFoundError(f"{job_dir} holds neither metrics.json nor FAILED.json")
    cfg = {}
    cpath = job_dir / "config.yaml"
    if cpath.is_file():
        import yaml

        cfg = yaml.safe_load(cpath.read_text()) or {}
    return record, cfg, p


def run_metrics(record: dict) -> dict:
    """The numbers of a job as MLflow metrics (finite numbers only)."""
    vals = dict(record.get("metrics") or {})
    vals.update({f"fp32_{k}": v for k, v in (record.get("fp32") or {}).items()})
    for k in ("bops", "fp32_bops", "plain_bops", "bits_per_weight", "n", "wall_seconds", "cpu_seconds", "peak_rss_mb"):
        vals[k] = record.get(k)
    det = record.get("details") or {}
    for k in ("quant_seconds", "eval_seconds", "size_mbit", "bops_ratio_vs_plain", "max_err"):
        vals[k] = det.get(k)
    out = {}
    for k, v in vals.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
            out[k] = float(v)
    return out


def run_tags(record: dict, job_dir: Path, sha: str) -> dict:
    tags = {
        "config_hash": record.get("config_hash") or f"path:{Path(job_dir).name}",
        "task": record.get("task"), "model": record.get("model"), "label": record.get("label"),
        "method": record.get("method"), "status": record.get("status"), "dataset": record.get("dataset"),
        "grid": record.get("grid"), "job_dir": str(job_dir), "record_sha256": sha,
        "git_commit": (record.get("git") or {}).get("commit"),
        "preset": record.get("preset") or None,  # the protocol preset (rex.protocols); none for FP32 rows
        "mlflow.runName": f"{record.get('model')}/{record.get('label')}",
    }
    if record.get("status") == "failed":
        err = record.get("error") or {}
        tags["error"] = f"{err.get('type')}: {err.get('message', '')}"[:4000]
    if record.get("status") == NOT_APPLICABLE:  # the method does not apply to the model (e.g. DFQ without BatchNorm)
        tags["reason"] = record.get("reason")
    return {k: str(v) for k, v in tags.items() if v is not None}


def _retry(fn, retries: int = 6, base: float = 0.5):
    for i in range(retries):
        try:
            return fn()
        except Exception:  # noqa: BLE001 -- sqlite 'database is locked', transient I/O
            if i == retries - 1:
                raise
            time.sleep(base * 2 ** i + random.random() * base)


class Tracker:
    """An MLflow client bound to one store, with the lock and the experiment cache."""

    def __init__(self, tracking_uri: Optional[str] = None, results_dir: Optional[Path] = None):
        self.results_dir = Path(results_dir or "results").resolve()
        self.uri = tracking_uri or default_tracking_uri(self.results_dir)
        db = _sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.lock_file = lock_path(self.uri, self.results_dir)
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        self._client = None
        self._exp: dict = {}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def lock(self, timeout: float = 600):
        from filelock import FileLock

        return FileLock(str(self.lock_file), timeout=timeout)

    def experiment_id(self, task: str) -> str:
        name = f"{EXPERIMENT_PREFIX}{task}"
        if name not in self._exp:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                art = (self.results_dir / "mlartifacts" / task).resolve()
                art.mkdir(parents=True, exist_ok=True)
                exp_id = self.client.create_experiment(name, artifact_location=art.as_uri(),
                                                       tags={"project": "rex"})
            else:
                exp_id = exp.experiment_id
            self._exp[name] = exp_id
        return self._exp[name]

    def find_run(self, exp_id: str, tags: dict):
        filt = " and ".join(f"tags.{k} = '{tags[k]}'" for k in ("config_hash", "task", "model") if k in tags)
        runs = self.client.search_runs([exp_id], filter_string=filt, max_results=50,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def _log_unlocked(self, job_dir: Path, extra_tags: Optional[dict] = None) -> tuple:
        from mlflow.entities import Metric, Param, RunTag

        record, cfg, rpath = read_job(job_dir)
        sha = hashlib.sha256(rpath.read_bytes()).hexdigest()
        tags = run_tags(record, job_dir, sha)
        tags.update({k: str(v) for k, v in (extra_tags or {}).items() if v is not None})
        exp_id = self.experiment_id(record.get("task") or "unknown")
        run = self.find_run(exp_id, tags)
        if run is not None and run.data.tags.get("record_sha256") == sha:
            stale = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
            if stale:
                self.client.log_batch(run.info.run_id, tags=stale)
            return "unchanged", run.info.run_id
        created = run is None
        if created:
            run = self.client.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags)
        run_id = run.info.run_id
        have = run.data.params if not created else {}
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                  for k, v in flatten({k: v for k, v in cfg.items() if k != "run"}).items()}
        new_params = [Param(k, v[:PARAM_MAX]) for k, v in sorted(params.items()) if k not in have]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in sorted(run_metrics(record).items())]
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(new_params), 1), 100):  # log_batch: at most 100 params per call
            self.client.log_batch(run_id, metrics=metrics if i == 0 else [], params=new_params[i:i + 100],
                                  tags=tag_list if i == 0 else [])
        if not created:  # drop a stale FAILED.json / metrics.json from an earlier attempt
            try:
                from mlflow.artifacts import list_artifacts  # noqa: F401
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                repo = get_artifact_repository(run.info.artifact_uri)
                for f in self.client.list_artifacts(run_id):
                    if not f.is_dir:
                        repo.delete_artifacts(f.path)
            except Exception:  # noqa: BLE001 -- not every artifact store deletes
                pass
        files = [p for p in sorted(Path(job_dir).iterdir()) if p.is_file()]
        for p in files:
            self.client.log_artifact(run_id, str(p))
        self.client.set_terminated(run_id, "FINISHED" if record.get("status") in FINAL_STATUSES else "FAILED")
        return ("created" if created else "updated"), run_id

    def log_job(self, job_dir: Path, extra_tags: Optional[dict] = None) -> tuple:
        """Create or update the run of one finished job folder -> (action, run_id), action one of
        'created' | 'updated' | 'unchanged'."""
        def attempt():
            with self.lock():
                return self._log_unlocked(Path(job_dir), extra_tags)

        return _retry(attempt)

    def sync(self, job_dirs: Iterable[Path], extra_tags: Optional[dict] = None) -> dict:
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        for d in job_dirs:
            counts[self.log_job(Path(d), extra_tags)[0]] += 1
        return counts

    def runs(self, task: Optional[str] = None) -> list:
        """All runs of the rex experiments (for tests / reports)."""
        out = []
        for exp in self.client.search_experiments():
            if not exp.name.startswith(EXPERIMENT_PREFIX):
                continue
            if task and exp.name != f"{EXPERIMENT_PREFIX}{task}":
                continue
            out += self.client.search_runs([exp.experiment_id], max_results=50000)
        return out


def log_job(job_dir, tracking_uri: Optional[str] = None, results_dir=None, extra_tags: Optional[dict] = None):
    """Log one job folder -> (action, run_id)."""
    job_dir = Path(job_dir)
    return Tracker(tracking_uri, results_dir or results_dir_of(job_dir)).log_job(job_dir, extra_tags)


def _dirs_from(paths: Iterable[str]) -> list:
    """Job folders from folder paths or their `done` markers."""
    out = []
    for p in paths:
        p = Path(p)
        out.append(p.parent if p.name == "done" else p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rex.pipeline.tracking", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (("sync", "log job folders (or their done markers) to MLflow, idempotently; the pipeline's "
                                "mlflow_log rule, once per (task, model)"),
                       ("log", "log ONE job folder (or its done marker)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--tracking-uri", default=None, help="default sqlite:///<results>/mlflow.db")
        s.add_argument("--results-dir", default=None, help="default: derived from the (first) job folder")
        s.add_argument("--grid", default=None, help="set the run tag `grid`")
        s.add_argument("--out", default=None, help="write the outcome here (a JSON file, written atomically)")
        s.add_argument("jobs", nargs="+" if name == "log" else "*")
    a = ap.parse_args(argv)
    dirs = _dirs_from(a.jobs)
    if a.cmd == "log" and len(dirs) != 1:
        ap.error("log takes exactly one job folder")
    rdir = Path(a.results_dir) if a.results_dir else (results_dir_of(dirs[0]) if dirs else Path("results"))
    tr = Tracker(a.tracking_uri, rdir)
    tags = {"grid": a.grid} if a.grid else None
    if a.cmd == "log":
        action, run_id = tr.log_job(dirs[0], tags)
        result = {"action": action, "run_id": run_id, "job_dir": str(dirs[0])}
    else:
        result = tr.sync(dirs, tags)
        result["jobs"] = len(dirs)
    result["tracking_uri"] = tr.uri
    print(json.dumps(result))
    if a.out:
        atomic_write_json(Path(a.out), result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
