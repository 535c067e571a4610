"""One job: load model -> quantize -> evaluate -> numbers. Used by the CLI and by the pipeline.

The FP32 reference (logits for classification) is computed once per (model, dataset, subset) and cached,
so a grid of quantized configurations pays for the float model once.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Optional

import torch

from .spec import QuantSpec


def input_range_from_preprocess(pre) -> Optional[tuple[float, float]]:
    """Range of a normalised input: pixels in [0, 1] mapped by (x - mean) / std, per channel, hulled."""
    mean = getattr(pre, "mean", None)
    std = getattr(pre, "std", None)
    scale = getattr(pre, "scale", 1.0) or 1.0
    if mean is None or std is None:
        return (0.0, 1.0 * scale)
    lo = min((0.0 - m) / s for m, s in zip(mean, std))
    hi = max((1.0 * scale - m) / s for m, s in zip(mean, std))
    return (float(lo), float(hi))


def _fp_cache_path(model_name: str, dataset_name: str, limit, ds_len: int):
    from .paths import cache_root

    key = hashlib.sha256(f"{model_name}|{dataset_name}|{limit}|{ds_len}".encode()).hexdigest()[:16]
    return cache_root() / "fp32" / f"{model_name}-{dataset_name}-{key}.pt"


def fp32_reference(model, model_name, dataset, dataset_name, limit, batch_size, progress):
    from .evaluate.classification import evaluate

    path = _fp_cache_path(model_name, dataset_name, limit, len(dataset))
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["metrics"], blob["logits"]
        except Exception:
            path.unlink(missing_ok=True)  # a torn cache file is recomputed, never trusted
    metrics = evaluate(model, dataset, batch_size=batch_size, progress=progress, return_logits=True)
    logits = metrics.pop("logits")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"metrics": metrics, "logits": logits}, tmp)
    os.replace(tmp, path)
    return metrics, logits


def classification_job(
    model_name: str,
    spec: Optional[QuantSpec],
    dataset: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 50,
    progress: bool = True,
    keep_model: bool = False,
    dataset_root=None,
) -> dict:
    """Quantize a registered classification model and (when ``dataset`` is given) evaluate FP32 and
    quantized. ``spec=None`` evaluates the float model only."""
    import rex
    from .models import example_input as make_example
    from .models import get_model

    bundle = get_model(model_name)
    model, entry = bundle.model, bundle.entry
    ex = make_example(entry, batch=1)
    in_range = input_range_from_preprocess(entry.preprocess)
    out: dict = dict(model=model_name, task=entry.task)
    out["fp32_bops"] = rex.bops(model, ex)
    qmodel = model
    if spec is not None:
        out["spec"] = spec.label()
        t0 = time.perf_counter()
        qmodel = rex.quantize(model, spec, example_input=ex, input_range=in_range)
        out["quant_seconds"] = round(time.perf_counter() - t0, 4)
        s = rex.summary(qmodel, ex)
        out["bops"] = s["bops"]
        out["size_mbit"] = round(s["size_bits"] / 1e6, 4)
        plain = rex.quantize(model, spec.replace(order=1, budget=None), example_input=ex, input_range=in_range) if spec.order > 1 else None
        out["plain_bops"] = rex.bops(plain, ex) if plain is not None else s["bops"]
        out["bops_ratio_vs_plain"] = round(out["bops"] / out["plain_bops"], 4)
        rep = rex.report(qmodel)
        out["max_err"] = max((r["max_err"] or 0.0) for r in rep)
        out["bound_ok"] = all(r["bound_ok"] is not False for r in rep)
        out["int32_safe"] = all(r["int32_safe"] for r in rep)
        out["notes"] = qmodel.rex_info.notes
    else:
        out["bops"] = out["fp32_bops"]
    if dataset:
        from .data import get_dataset
        from .evaluate.classification import evaluate

        ds = get_dataset(dataset, root=dataset_root, preprocess=entry.preprocess, limit=limit)
        fp_metrics, fp_logits = fp32_reference(model, model_name, ds, dataset, limit, batch_size, progress)
        out["fp32_top1"] = fp_metrics["top1"]
        out["fp32_top5"] = fp_metrics["top5"]
        if spec is None:
            out.update({k: fp_metrics[k] for k in ("top1", "top5", "n")})
            out["agreement"], out["kl"] = 100.0, 0.0
            out["eval_seconds"] = fp_metrics.get("seconds")
        else:
            m = evaluate(qmodel, ds, batch_size=batch_size, progress=progress, fp_logits=fp_logits)
            out.update({k: m[k] for k in ("top1", "top5", "agreement", "kl", "n") if k in m})
            out["eval_seconds"] = m.get("seconds")
    if keep_model:
        out["qmodel"] = qmodel
    return out
