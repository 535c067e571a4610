"""One pipeline job: compose its config with Hydra, quantize + evaluate, write the job folder atomically.

    python -m rex.pipeline.job --out results/runs/classification/mobilenet_v2/method=rex,w=4,a=8,K=2,budget=1.5 \\
        model=mobilenet_v2 dataset=imagenet_sample evaluation=classification \\
        method=rex method.wbits=4 method.abits=8 method.order=2 method.budget=1.5

The config is composed from ``conf/`` with Hydra's Compose API (``initialize_config_dir`` + ``compose``, no
``@hydra.main``: no output folders, no working-directory change, no sweeps). The job folder gets

- ``config.yaml``  the composed, resolved config
- ``metrics.json`` metrics, BOPs, wall time, peak memory, library versions, weights / dataset / config hashes,
                   git commit -- or ``FAILED.json`` (error type, message, traceback tail) when anything failed
- ``done``         written last

Everything is written into ``.<name>.tmp-<pid>/`` beside the target and renamed into place in one step, so a
killed job never leaves a complete-looking folder. Failures are of two kinds (``FAILED.json`` ``kind``):

- ``config``: the configuration itself cannot run (unknown name, out-of-range value, contradiction, NaN
  weights): ``FAILED.json`` + ``done``, exit 0 -- the failure is the row's result and the table shows it;
- ``environment`` (missing or corrupt data or checkpoint file, out of memory, OS / disk error) or
  ``unexpected`` (any other exception): no ``done``, exit ``EXIT_RETRY`` (75), so Snakemake reports the job as
  failed and the next run retries it.

Not a failure: a method that does not apply to the model (DFQ or ZeroQ on a model without BatchNorm,
``rex.errors.NotApplicableError``) writes ``metrics.json`` with status ``n/a`` and its ``reason``, and ``done``,
exit 0: a final result that the table shows as "n/a (no BatchNorm)".

A failure never replaces a previous good ``metrics.json``: that folder is kept, ``FAILED.json`` is written beside
it (``previous_result_kept: true``), its ``done`` removed, and the job is retried by the next run. Afterwards the folder is logged to MLflow (best
effort: an MLflow problem is reported on stderr and never fails the job) unless ``--no-mlflow``: the Snakemake
pipeline passes ``--no-mlflow`` and logs the folders in its own rule (``mlflow_log``, one per model).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from .. import protocols, runtime
from ..errors import NotApplicableError as NotApplicable
from . import grid as gridlib

RECORD_OK = "metrics.json"
RECORD_FAILED = "FAILED.json"
DONE = "done"
CONFIG = "config.yaml"
# Exit status of a failure the next run retries (EX_TEMPFAIL); a configuration failure exits 0.
EXIT_RETRY = 75
# The status of a method that does not apply to the model (DFQ / ZeroQ without BatchNorm): final like "ok",
# written to metrics.json with its ``reason``; the tables show "n/a (<reason>)" in its metric cells.
NOT_APPLICABLE = gridlib.NOT_APPLICABLE
CONFIG_FAILURE = "config"
# Not part of the configuration identity (how a job runs, not what it computes).
UNHASHED = ("run",)
VERSIONED = ("torch", "torchvision", "numpy", "rex-quant", "hydra-core", "omegaconf", "mlflow", "snakemake",
             "mmcv", "mmengine", "mmdet", "mmsegmentation", "pycocotools")


def conf_dir() -> Path:
    from ..paths import PROJECT_ROOT

    env = os.environ.get("REX_CONF_DIR")
    return Path(env).resolve() if env else PROJECT_ROOT / "conf"


def compose(overrides: list, config_dir: Optional[Path] = None, config_name: str = "config"):
    """Hydra Compose API: conf/config.yaml + groups + overrides -> DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base=None, job_name="rex_job"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


GROUPS = ("model", "dataset", "method", "evaluation")


def _group_keys(conf: Path, group: str) -> set:
    keys: set = set()
    for p in sorted((conf / group).glob("*.yaml")):
        keys |= set(gridlib.load_yaml(p))
    return keys


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate_config(cfg_dict: dict, config_dir: Optional[Path] = None) -> None:
    """Reject what Hydra lets through: keys appended with ``+`` that nothing reads (a typo such as
    ``+protocol.mdoe=int`` would otherwise be silently ignored and hashed into the config) and bad run /
    evaluation values. The accepted keys are those the shipped config files define."""
    import difflib

    from ..errors import ConfigError

    conf = Path(config_dir or conf_dir())
    base = gridlib.load_yaml(conf / "config.yaml")
    accepted = {g: _group_keys(conf, g) for g in GROUPS}
    accepted.update(protocol=set(base.get("protocol") or {}), run=set(base.get("run") or {}))
    for key in cfg_dict:
        if key not in accepted:
            raise ConfigError(f"unknown config key {key!r}; accepted: {', '.join(sorted(accepted))}")
    for group, keys in accepted.items():
        for key in cfg_dict.get(group) or {}:
            if key not in keys:
                close = difflib.get_close_matches(key, sorted(keys), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown config key {group}.{key}{hint} (accepted {group}.* keys: "
                                  f"{', '.join(sorted(keys))}; method-specific settings go in method.options)")
    ev, run = cfg_dict.get("evaluation") or {}, cfg_dict.get("run") or {}
    if ev.get("batch_size") is not None and not _positive_int(ev["batch_size"]):
        raise ConfigError(f"evaluation.batch_size must be an integer >= 1, got {ev['batch_size']!r}")
    if run.get("threads") is not None and not _positive_int(run["threads"]):
        raise ConfigError(f"run.threads must be an integer >= 1 (torch threads of the job), got {run['threads']!r}")
    if not isinstance(run.get("progress", False), bool):
        raise ConfigError(f"run.progress must be true or false, got {run['progress']!r}")


def config_hash(cfg_dict: dict) -> str:
    ident = {k: v for k, v in cfg_dict.items() if k not in UNHASHED}
    proto = ident.get("protocol")
    if isinstance(proto, dict) and proto.get("group_size") is None and "group_size" in proto:
        # absent unless per_group, so the hashes of the configs from before the key existed are unchanged
        ident["protocol"] = {k: v for k, v in proto.items() if k != "group_size"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_from_config(cfg_dict: dict):
    """QuantSpec from the composed config (None for the FP32 row). Raises for unregistered methods."""
    m, p = cfg_dict["method"], cfg_dict.get("protocol", {})
    if m["name"] == gridlib.FP32_METHOD:
        return None
    from ..spec import QuantSpec

    return QuantSpec.from_config(m, p)  # the one validated path: defaults in QuantSpec and the method's config


def identity(cfg_dict: Optional[dict], out: Path) -> dict:
    """task / model / method / bits ... of the job, from the config or (if it failed to compose) the path."""
    base, tag = gridlib.split_variant(out.name)
    try:
        parsed = gridlib.parse_label(base)
    except (KeyError, ValueError):
        parsed = {}
    ident = {"task": out.parent.parent.name, "model": out.parent.name, "label": out.name, "variant": tag, **parsed}
    if cfg_dict:
        m = cfg_dict.get("method", {})
        ident.update(
            task=cfg_dict.get("evaluation", {}).get("task") or cfg_dict.get("model", {}).get("task") or ident["task"],
            model=cfg_dict.get("model", {}).get("name", ident["model"]),
            dataset=cfg_dict.get("dataset", {}).get("name"),
            method=m.get("name"), wbits=m.get("wbits"),
            abits=gridlib.FLOAT_BITS if m.get("abits") in (None, gridlib.FLOAT_BITS) else m.get("abits"),
            order=m.get("order"), budget=m.get("budget"), allocation=m.get("allocation", "uniform"),
            # the protocol preset (a failed job's row names it too); FP32 rows have none
            preset="" if m.get("name") == gridlib.FP32_METHOD else
            ((cfg_dict.get("protocol") or {}).get("preset") or protocols.DEFAULT_PRESET),
        )
    return ident


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_info() -> dict:
    from ..paths import PROJECT_ROOT

    def git(*args):
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}  # not a git checkout (or no git): said so, never empty
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def dataset_hash(path: Optional[str]) -> Optional[str]:
    """Cheap content identity of a dataset: sha256 of its sorted (relative path, size) list."""
    if not path:
        return None
    root = Path(path)
    if root.is_file():
        entries = [(root.name, root.stat().st_size)]
    elif root.is_dir():
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in filenames:
                p = Path(dirpath) / f
                try:
                    entries.append((str(p.relative_to(root)), p.stat().st_size))
                except OSError:
                    continue
        entries.sort()
    else:
        return None
    h = hashlib.sha256()
    for name, size in entries:
        h.update(f"{name}\t{size}\n".encode())
    return h.hexdigest()


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (the job's cost on a busy machine)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 3)


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its (waited-for) children, MB (ru_maxrss is KiB on Linux)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return round(max(own, kids), 1)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    return str(v)


def _resolve(p: Optional[str]) -> Optional[str]:
    return None if p in (None, "") else str(Path(str(p)).expanduser())


def evaluate_job(cfg_dict: dict, spec) -> dict:
    """Run the task's job function (rex.runner) for the composed config."""
    from .. import runner

    task = cfg_dict["evaluation"]["task"]
    model, data, ev, run = cfg_dict["model"], cfg_dict["dataset"], cfg_dict["evaluation"], cfg_dict.get("run", {})
    if model.get("task") and model["task"] != task:
        from ..errors import ConfigError

        raise ConfigError(f"model {model['name']} is a {model['task']} model but evaluation={task}")
    common = dict(limit=ev.get("limit"), progress=bool(run.get("progress", False)),
                  dataset_root=_resolve(data.get("root")), weights=_resolve(model.get("weights")),
                  threads=run.get("threads"))
    if task == "classification":
        return runner.classification_job(model["name"], spec, dataset=data["name"],
                                          batch_size=int(ev.get("batch_size") or 50), **common)
    if task == "detection":
        return runner.detection_job(model["name"], spec, **common)
    if task == "segmentation":
        return runner.segmentation_job(model["name"], spec, **common)
    if task in runner.TEXT_TASKS:  # limit: sentence pairs (STS-B) or tokens scored (WikiText-2, windows of 512)
        return runner.text_job(model["name"], spec, dataset=data["name"], **common)
    from ..errors import ConfigError

    raise ConfigError(f"unknown task {task!r}")


def failure_kind(exc: BaseException) -> str:
    """'config' (the configuration cannot run: recorded as the row's result), 'environment' (missing / corrupt
    data or checkpoint file, out of memory, OS or disk error: retried) or 'unexpected' (retried too: a crash that
    is not known to be the configuration's fault must not become a permanent result)."""
    from ..errors import CheckpointError, DatasetError, RexError

    if any(c.__module__.split(".")[0] in ("hydra", "omegaconf") for c in type(exc).__mro__):
        # Hydra could not compose the overrides (unknown group option, key, bad value); checked first because
        # hydra's MissingConfigException is an OSError
        return CONFIG_FAILURE
    if isinstance(exc, (DatasetError, CheckpointError, MemoryError, OSError)):
        return "environment"
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                          or "not enough memory" in text):
        return "environment"  # torch's allocator failures
    if isinstance(exc, RexError):
        return CONFIG_FAILURE
    return "unexpected"


def _good_result(out: Path) -> bool:
    try:
        return json.loads((out / RECORD_OK).read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder onto ``out`` (whatever was there is removed afterwards)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(out: Path, overrides: list, threads: Optional[int] = None, grid_name: Optional[str] = None) -> dict:
    """Run one job into ``out``; returns the record written (metrics.json or FAILED.json content)."""
    t_start = time.time()
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run of this job
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    extra = []
    if threads:
        extra.append(f"run.threads={int(threads)}")
    if grid_name:
        extra.append(f"run.grid={gridlib.hydra_value(grid_name)}")
    cfg_dict = None
    record: dict = {}
    try:
        cfg = compose(list(overrides) + extra)
        cfg_dict = to_container(cfg)
        validate_config(cfg_dict)
        from omegaconf import OmegaConf

        (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg_dict)))
        chash = config_hash(cfg_dict)
        record = {"status": "ok", **identity(cfg_dict, out), "config_hash": chash,
                  "overrides": list(overrides), "grid": (cfg_dict.get("run") or {}).get("grid")}
        record["protocol"] = cfg_dict.get("protocol", {})
        record["dataset_display"] = cfg_dict["dataset"].get("display")
        record["model_display"] = cfg_dict["model"].get("display")
        import torch

        n_threads = int((cfg_dict.get("run") or {}).get("threads") or 1)
        torch.set_num_threads(n_threads)
        spec = spec_from_config(cfg_dict)
        # the protocol as run: the preset's values filled in (left null in conf/config.yaml)
        from ..protocols import resolve

        record["protocol"] = {**resolve(record["protocol"]), **(spec.protocol() if spec is not None else {})}
        expected = gridlib.fp32_label() if spec is None else spec.label()
        record["spec_hash"] = spec.hash() if spec is not None else None
        # a folder named like a label must be the label of what runs (any other name is the caller's choice)
        labelled = re.fullmatch(gridlib.JOB_LABEL_RE, out.name) is not None
        if labelled and expected != gridlib.split_variant(out.name)[0]:
            from ..errors import ConfigError

            raise ConfigError(f"the job folder {out.name!r} does not match what its config runs ({expected!r}): "
                              "a result must be stored under its own label; fix the overrides or the folder name")
        res = evaluate_job(cfg_dict, spec)
        task = record["task"]
        metrics = {k: res.get(k) for k in gridlib.METRICS[task]}
        record["metrics"] = metrics
        record["fp32"] = {k: res.get(f"fp32_{k}") for k in gridlib.METRICS[task] if f"fp32_{k}" in res}
        skip = {"qmodel", "model", "task", "spec", *metrics, *(f"fp32_{k}" for k in metrics)}
        record["details"] = {k: v for k, v in res.items() if k not in skip}
        for k in ("bops", "fp32_bops", "plain_bops", "bits_per_weight", "n"):
            record[k] = res.get(k)
        record["hashes"] = {"config": chash, "spec": record["spec_hash"],
                            "weights_sha256": res.get("weights_sha256"),
                            "dataset": dataset_hash(res.get("dataset_path"))}
        record["threads"] = n_threads
        name = RECORD_OK
    except NotApplicable as exc:  # the method does not apply to this model: the row's result, shown as n/a
        record = {**record, **identity(cfg_dict, out), "status": NOT_APPLICABLE, "reason": exc.reason,
                  "message": str(exc)[:2000]}
        record["metrics"] = {k: None for k in gridlib.METRICS.get(record["task"], ())}
        name = RECORD_OK
    except Exception as exc:  # noqa: BLE001 -- every failure becomes a record the table shows
        tb = traceback.format_exc().rstrip().splitlines()
        record = {"status": "failed", **identity(cfg_dict, out),
                  "config_hash": config_hash(cfg_dict) if cfg_dict else None, "overrides": list(overrides),
                  "kind": failure_kind(exc),
                  "error": {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback_tail": tb[-25:]}}
        name = RECORD_FAILED
    record["wall_seconds"] = round(time.perf_counter() - t0, 3)
    record["cpu_seconds"] = cpu_seconds()
    record["peak_rss_mb"] = peak_rss_mb()
    record["versions"] = versions()
    record["git"] = git_info()
    record["host"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "malloc_keeps_freed_memory": runtime.freed_memory_kept()}
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start))
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    failed = record["status"] not in gridlib.FINAL_STATUSES
    keep = failed and _good_result(out)
    if failed:
        record["previous_result_kept"] = keep
        record["retry"] = keep or record["kind"] != CONFIG_FAILURE
    _write_json(tmp / name, record)
    if keep:  # never replace a good result: record the failure beside it, and let the next run retry
        os.replace(tmp / name, out / name)
        (out / DONE).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return record
    if not record.get("retry"):
        (tmp / DONE).write_text(f"{record['status']}\n")
    publish(tmp, out)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rex.pipeline.job", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the job folder (results/runs/<task>/<model>/<label>)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (run.threads)")
    ap.add_argument("--grid", default=None, help="name of the grid (recorded, not hashed)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: sqlite:///<results>/mlflow.db, <results> = the folder "
                         "holding runs/)")
    ap.add_argument("--no-mlflow", action="store_true",
                    help="do not log to MLflow (the pipeline logs in its own rule, mlflow_log)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet20_fmnist method=rex method.order=2")
    a = ap.parse_args(argv)
    runtime.keep_freed_memory()  # before anything large is allocated: 2-4x faster CPU inference (rex.runtime)
    out = Path(a.out)
    record = run(out, a.overrides, threads=a.threads, grid_name=a.grid)
    status = record["status"]
    msg = f"{out}: {status}"
    if status == "failed":
        msg += f" ({record['kind']}, {record['error']['type']}: {record['error']['message'][:300]})"
        if record["retry"]:
            msg += ("; not final: no `done`, the next run retries this job"
                    + ("; the previous good metrics.json is kept" if record["previous_result_kept"] else ""))
    elif status == NOT_APPLICABLE:
        msg += f" ({record['reason']}: {record['message'][:300]})"
    else:
        msg += " " + ", ".join(f"{k}={v}" for k, v in record.get("metrics", {}).items())
    print(msg, flush=True)
    if record.get("retry"):
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_RETRY
    if not a.no_mlflow:
        try:
            from . import tracking

            tracking.log_job(out, tracking_uri=a.tracking_uri)
        except Exception as exc:  # noqa: BLE001 -- MLflow is a view; the files are the result
            print(f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); "
                  "the aggregate step will sync it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
