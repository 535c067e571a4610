"""Job folders -> ``summary.csv`` (long: one row per job and metric) and ``jobs.csv`` (one row per job).

``summary.csv`` columns, exactly: ``task, model, method, wbits, abits, order, budget, bops, metric, value, status,
variant, commit, float_layers, preset``

- ``float_layers``: how many weight layers of the job's model were left float because rex does not quantize
  their type (LSTM, GRU, an attention's packed in-projection, ...); jobs.csv also names them
  (``float_layer_names``). Empty for FP32 rows and records from before the column existed.
- ``preset``: the job's named protocol (``rex.protocols``); empty for FP32 rows, ``shared`` for records from
  before presets existed.

- FP32 rows: method ``fp32``, wbits = abits = 32, order 1, empty budget.
- Metrics: classification ``top1, top5, agreement, kl``; detection ``AP, AP50, AP75``; segmentation ``mIoU``;
  text_similarity ``spearman`` (x100); language_modeling ``perplexity`` (lower is better).
- A failed job gives one row per metric of its task with an empty value and status ``failed``; a method that does
  not apply to the model (DFQ / ZeroQ without BatchNorm) the same with status ``n/a``.
- The allocation is not a column: a non-uniform allocation is part of the method name (``rex-greedy``), so every
  (task, model, method, wbits, abits, order, budget, metric) names one number.

    python -m rex.pipeline.aggregate --summary results/summary.csv --jobs results/jobs.csv results/runs/*/*/*/done
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Iterable

from .. import protocols
from ..io import atomic_write_text
from . import grid as gridlib

# `variant` (the folder's p= hash: '' for the default protocol) and `commit` (the checkout that computed the row)
# come last, so that the columns before them keep their meaning and order.
# `preset` (the named protocol, rex.protocols; '' for FP32 rows) is appended after them for the same reason.
SUMMARY_COLUMNS = ["task", "model", "method", "wbits", "abits", "order", "budget", "bops", "metric", "value", "status",
                   "variant", "commit", "float_layers", "preset"]
JOB_COLUMNS = ["task", "model", "model_display", "dataset", "dataset_display", "label", "method", "base_method",
               "allocation", "wbits", "abits", "order", "budget", "status", "bops", "plain_bops", "fp32_bops", "n",
               "primary_metric", "primary_value", "fp32_primary", "first_last", "granularity", "symmetric", "mode",
               "act_sigma", "act_layers", "act_float", "act_ranges", "act_points", "config_hash", "wall_seconds",
               "cpu_seconds", "peak_rss_mb", "error", "dir", "variant", "commit", "float_layers", "previous_failure",
               "float_layer_names", "preset", "bits_per_weight", "group_size", "reason", "window", "tokens"]
# A job's status: ok, failed, or n/a (the method does not apply to the model, e.g. DFQ without BatchNorm: a final
# result with its ``reason``, shown as "n/a (<reason>)" in the tables).


class RecordError(ValueError):
    """A job folder's metrics.json / FAILED.json cannot be read."""


def method_name(method: str, allocation: str = "uniform") -> str:
    return method if allocation in (None, "", "uniform") else f"{method}-{allocation}"


def read_record(job_dir: Path) -> dict:
    """The job's record; a folder without one (should not happen after `done`) reads as failed."""
    job_dir = Path(job_dir)
    for name in ("metrics.json", "FAILED.json"):
        p = job_dir / name
        if p.is_file():
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                raise RecordError(f"{p} is unreadable ({type(exc).__name__}: {exc}); the job folder is damaged: "
                                  f"delete {job_dir} and run the pipeline again to recompute it") from None
            if not isinstance(rec, dict):
                raise RecordError(f"{p} holds a {type(rec).__name__}, not a job record; delete {job_dir} and "
                                  "run the pipeline again to recompute it")
            rec["dir"] = str(job_dir)
            if name == "metrics.json" and (job_dir / "FAILED.json").is_file():
                # a later run of this job failed and kept this result: say so beside it
                try:
                    err = json.loads((job_dir / "FAILED.json").read_text()).get("error") or {}
                    rec["previous_failure"] = f"{err.get('type')}: {err.get('message', '')}"[:300]
                except (OSError, ValueError, AttributeError):
                    rec["previous_failure"] = "unreadable FAILED.json"
            return rec
    parsed = gridlib.parse_label(gridlib.split_variant(job_dir.name)[0])
    return {"status": "failed", "task": job_dir.parent.parent.name, "model": job_dir.parent.name,
            "label": job_dir.name, **parsed, "dir": str(job_dir),
            "error": {"type": "MissingRecord", "message": "no metrics.json / FAILED.json in the job folder"}}


def _num(v):
    return "" if v is None else v


def job_row(rec: dict) -> dict:
    task = rec.get("task")
    parsed = {}
    try:
        parsed = gridlib.parse_label(gridlib.split_variant(rec.get("label") or Path(rec["dir"]).name)[0])
    except (KeyError, ValueError):
        pass
    get = lambda k: rec.get(k) if rec.get(k) is not None else parsed.get(k)  # noqa: E731
    method = get("method")
    alloc = get("allocation") or "uniform"
    abits = get("abits")
    abits = gridlib.FLOAT_BITS if abits in (None, gridlib.FLOAT_BITS) else abits
    primary = gridlib.PRIMARY_METRIC.get(task)
    proto = rec.get("protocol") or {}
    err = rec.get("error") or {}
    det = rec.get("details") or {}
    return {
        "task": task, "model": rec.get("model"), "model_display": rec.get("model_display") or rec.get("model"),
        "dataset": rec.get("dataset"), "dataset_display": rec.get("dataset_display") or rec.get("dataset"),
        "label": rec.get("label"), "method": method_name(method, alloc), "base_method": method, "allocation": alloc,
        "wbits": get("wbits"), "abits": abits, "order": get("order") or 1, "budget": _num(get("budget")),
        "status": rec.get("status") if rec.get("status") in gridlib.FINAL_STATUSES else "failed",
        "bops": _num(rec.get("bops")), "plain_bops": _num(rec.get("plain_bops")),
        "fp32_bops": _num(rec.get("fp32_bops")), "n": _num(rec.get("n")),
        "primary_metric": primary, "primary_value": _num((rec.get("metrics") or {}).get(primary)),
        "fp32_primary": _num((rec.get("fp32") or {}).get(primary)),
        "first_last": proto.get("first_last", ""), "granularity": proto.get("granularity", ""),
        "symmetric": proto.get("symmetric", ""), "mode": proto.get("mode", ""),
        "act_sigma": _num(proto.get("act_sigma")),
        # how many layer inputs really were quantized (a W4A4 row with float inputs says so) and from what
        "act_layers": _num(det.get("act_layers")), "act_float": _num(det.get("act_float")),
        "act_ranges": det.get("act_ranges") or "", "act_points": det.get("act_points") or "",
        "config_hash": rec.get("config_hash") or "",
        "wall_seconds": _num(rec.get("wall_seconds")), "cpu_seconds": _num(rec.get("cpu_seconds")),
        "peak_rss_mb": _num(rec.get("peak_rss_mb")),
        "error": f"{err.get('type')}: {err.get('message', '')}".replace("\n", " ")[:300] if err else "",
        "dir": rec.get("dir"),
        "variant": gridlib.split_variant(rec.get("label") or Path(rec.get("dir") or "").name)[1],
        "commit": commit_of(rec),
        # weight layers of a type rex does not quantize (LSTM, GRU, an attention's packed projection, ...): left
        # float and out of the BOPs; counted and named so that a row never claims more than was quantized
        "float_layers": _num(det.get("float_layers")),
        "float_layer_names": float_layer_names(det.get("float_layer_names")),
        "previous_failure": rec.get("previous_failure") or "",
        "preset": preset_of(rec, method, proto),
        # the cost of a weight-only row: bits per weight with scales, zero points and masks (32 for FP32)
        "bits_per_weight": _num(rec.get("bits_per_weight")),
        "group_size": _num(proto.get("group_size")) if proto.get("granularity") == "per_group" else "",
        "reason": rec.get("reason") or "",
        "window": _num(det.get("window")), "tokens": _num(det.get("tokens")),
    }


def preset_of(rec: dict, method, proto: dict) -> str:
    """The row's protocol preset: '' for FP32 (no quantization protocol); a record written before presets
    existed ran the shared protocol."""
    if method == gridlib.FP32_METHOD:
        return ""
    return rec.get("preset") or proto.get("preset") or protocols.DEFAULT_PRESET


def float_layer_names(names) -> str:
    """{'LSTM': ['lstm'], 'GRU': ['a', 'b']} -> 'GRU: a, b; LSTM: lstm' ('' when none)."""
    if not isinstance(names, dict):
        return ""
    return "; ".join(f"{kind}: {', '.join(map(str, v))}" for kind, v in sorted(names.items()) if v)


def commit_of(rec: dict) -> str:
    """The commit that computed the record ('+dirty' when the checkout had uncommitted changes)."""
    g = rec.get("git") or {}
    c = g.get("commit") or "unknown"
    return f"{c}+dirty" if g.get("dirty") and c != "unknown" else c


def summary_rows(rec: dict) -> list:
    j = job_row(rec)
    rows = []
    for metric in gridlib.METRICS.get(j["task"], ()):
        value = (rec.get("metrics") or {}).get(metric) if j["status"] == "ok" else None
        rows.append({"task": j["task"], "model": j["model"], "method": j["method"], "wbits": j["wbits"],
                     "abits": j["abits"], "order": j["order"], "budget": j["budget"], "bops": j["bops"],
                     "metric": metric, "value": _num(value), "status": j["status"], "variant": j["variant"],
                     "commit": j["commit"], "float_layers": j["float_layers"], "preset": j["preset"]})
    return rows


def _write_csv(path: Path, columns: list, rows: Iterable[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def aggregate(job_dirs: Iterable[Path], summary: Path, jobs: Path) -> tuple[int, int]:
    recs = [read_record(Path(d)) for d in job_dirs]
    recs.sort(key=lambda r: (r.get("task") or "", r.get("model") or "", r.get("label") or ""))
    srows = [row for r in recs for row in summary_rows(r)]
    _write_csv(Path(summary), SUMMARY_COLUMNS, srows)
    _write_csv(Path(jobs), JOB_COLUMNS, (job_row(r) for r in recs))
    return len(recs), sum(1 for r in recs if r.get("status") not in gridlib.FINAL_STATUSES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rex.pipeline.aggregate", description=__doc__.splitlines()[0])
    ap.add_argument("--summary", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("dirs", nargs="*", help="job folders or their `done` markers")
    a = ap.parse_args(argv)
    dirs = [Path(p).parent if Path(p).name == "done" else Path(p) for p in a.dirs]
    try:
        n, failed = aggregate(dirs, Path(a.summary), Path(a.jobs))
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"aggregated {n} jobs ({failed} failed) -> {a.summary}, {a.jobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
