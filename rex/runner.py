"""One job: load model -> quantize -> evaluate -> numbers. Used by the CLI and by the pipeline.

- ``classification_job``: top-1 / top-5 / agreement with FP32 / KL on a registered classification dataset.
- ``detection_job``: COCO AP / AP50 / AP75 through ``rex.evaluate.detection`` (mmdet).
- ``segmentation_job``: mIoU / aAcc through ``rex.evaluate.segmentation`` (mmseg).

Every job returns a flat dict: model, task, bops, fp32_bops, plain_bops (BOPs of the same spec at order 1),
quantization time, the metrics, the FP32 metrics (``fp32_<name>``), and where the weights and data came from
(``weights_path``, ``weights_sha256``, ``dataset_path``, ``n``). ``spec=None`` evaluates the float model.

The FP32 reference (logits for classification, metrics for detection / segmentation) is computed once per
(model, weights, dataset, subset) and cached under ``rex.paths.cache_root()/fp32``, so a grid of quantized
configurations pays for the float model once. The key includes the weights' sha256: a retrained model never
reuses the logits of its predecessor.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import rex

from .io import atomic_torch_save, atomic_write_json
from .models import example_input as make_example
from .models import get_model, sha256_file
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


def _file_sha256(path) -> Optional[str]:
    if path is None or not Path(path).is_file():
        return None
    return sha256_file(Path(path))  # cached by (path, size, mtime)


def _weights_info(entry, weights) -> dict:
    path = Path(weights) if weights is not None else getattr(entry, "weights_path", None)
    sha = _file_sha256(path) or getattr(entry, "weights_sha256", None)
    return {"weights_path": str(path) if path is not None else None, "weights_sha256": sha}


def _fp_cache_path(model_name: str, dataset_name: str, limit, ds_len: int, weights_sha: Optional[str] = None,
                   suffix: str = ".pt"):
    from .paths import cache_root

    key = hashlib.sha256(f"{model_name}|{weights_sha}|{dataset_name}|{limit}|{ds_len}".encode()).hexdigest()[:16]
    return cache_root() / "fp32" / f"{model_name}-{dataset_name}-{key}{suffix}"


def fp32_reference(model, model_name, dataset, dataset_name, limit, batch_size, progress, weights_sha=None,
                   threads=None):
    from .evaluate.classification import evaluate

    path = _fp_cache_path(model_name, dataset_name, limit, len(dataset), weights_sha)
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["metrics"], blob["logits"]
        except Exception:
            path.unlink(missing_ok=True)  # a torn cache file is recomputed, never trusted
    metrics = evaluate(model, dataset, batch_size=batch_size, progress=progress, return_logits=True,
                       threads=threads)
    logits = metrics.pop("logits")
    metrics.pop("fp_logits", None)
    atomic_torch_save({"metrics": metrics, "logits": logits}, path)
    return metrics, logits


def _load(model_name: str, weights):
    """(model, entry) of a registered model; ``weights`` (a path) overrides its checkpoint."""
    bundle = get_model(model_name, weights=weights) if weights is not None else get_model(model_name)
    return bundle.model, bundle.entry


def _quantize_or_keep(out: dict, model, entry, weights, spec: Optional[QuantSpec], ex, in_range,
                      quantizer: Optional[Callable] = None) -> torch.nn.Module:
    """Record where the weights came from and the FP32 BOPs in ``out``; the quantized model (``_quantize_into``),
    or ``model`` itself when ``spec`` is None (then its BOPs are the FP32 ones, and 32 bits per weight)."""
    out.update(_weights_info(entry, weights))
    out["fp32_bops"] = rex.bops(model, ex)
    if spec is None:
        out["bops"] = out["plain_bops"] = out["fp32_bops"]
        out["bits_per_weight"] = 32.0
        return model
    return _quantize_into(out, model, spec, ex, in_range, quantizer)


def memory_info(qmodel) -> dict:
    """Bits per weight of the quantized layers, scales, zero points and sparse masks included: the cost of a
    weight-only row (``rex_info.extra['memory']``, from the engine and from HQQ); {} without it."""
    extra = getattr(getattr(qmodel, "rex_info", None), "extra", None) or {}
    mem = extra.get("memory")
    if mem:
        return dict(bits_per_weight=mem.get("bits_per_weight"), bits_per_weight_all=mem.get("bits_per_weight_all"))
    return {}


def _quantize_into(out: dict, model, spec: QuantSpec, ex, in_range, quantizer: Optional[Callable] = None
                   ) -> torch.nn.Module:
    """Quantize (``quantizer(spec)``, default ``rex.quantize`` of ``model``), and record BOPs, bits per weight,
    size, plain-order BOPs, the float layer inputs and the per-layer checks in ``out``. A model without
    QuantLayers has an empty per-layer report: its max_err / bound_ok / int32_safe are None (nothing to check);
    bound_ok is None too where no layer has an error bound (asymmetric grids, HQQ)."""
    if quantizer is None:
        def quantizer(s):
            return rex.quantize(model, s, example_input=ex, input_range=in_range)
    out["spec"] = spec.label()
    out["preset"] = spec.preset
    t0 = time.perf_counter()
    qmodel = quantizer(spec)
    out["quant_seconds"] = round(time.perf_counter() - t0, 4)
    s = rex.summary(qmodel, ex)
    out["bops"] = s["bops"]
    out["size_mbit"] = round(s["size_bits"] / 1e6, 4)
    # the order-1 BOPs from this model's cost table: equal to quantizing again at order 1 (rex.cost.order1_bops)
    out["plain_bops"] = s["plain_bops"]
    out["bops_ratio_vs_plain"] = round(out["bops"] / out["plain_bops"], 4)
    out.update(memory_info(qmodel))
    rep = rex.report(qmodel)
    extra = qmodel.rex_info.extra
    out["layers_quantized"] = len(rep)
    out["max_err"] = max((r["max_err"] or 0.0) for r in rep) if rep else None
    checked = [r["bound_ok"] for r in rep if r["bound_ok"] is not None]
    out["bound_ok"] = all(checked) if checked else None
    out["int32_safe"] = all(r["int32_safe"] for r in rep) if rep else None
    out["notes"] = qmodel.rex_info.notes
    out.update(rex.activation_coverage(qmodel))
    floats = extra.get("float_layers") or {}
    out["float_layers"] = sum(len(v) for v in floats.values())  # layers left float: counted and named
    out["float_layer_names"] = {k: list(v) for k, v in sorted(floats.items())}
    return qmodel


def check_classes(model_name: str, entry, dataset: str) -> None:
    """A classifier is evaluated only on a dataset of as many classes (else its top-1 means nothing)."""
    from .data import dataset_entry
    from .errors import ConfigError

    d = dataset_entry(dataset)
    if entry.task != "classification":
        raise ConfigError(f"model {model_name!r} is a {entry.task} model: dataset {dataset!r} is for "
                          "classification; use the model's own evaluation")
    if d.task != "classification":
        raise ConfigError(f"dataset {dataset!r} is a {d.task} dataset; model {model_name!r} is a classifier")
    if entry.num_classes and d.num_classes and entry.num_classes != d.num_classes:
        hint = f" (its own dataset is {entry.default_dataset!r})" if entry.default_dataset else ""
        raise ConfigError(f"model {model_name!r} predicts {entry.num_classes} classes but dataset {dataset!r} has "
                          f"{d.num_classes}: its accuracy would mean nothing; use a {entry.num_classes}-class "
                          f"dataset{hint}")


def check_channels(model_name: str, ex: torch.Tensor, dataset: str, ds) -> None:
    """The dataset's images (after the model's preprocessing) have the channels the model takes."""
    from .errors import ConfigError

    try:
        sample = ds[0][0] if len(ds) else None
    except (IndexError, KeyError, TypeError):
        return
    if isinstance(sample, torch.Tensor) and sample.dim() >= 3 and ex.dim() >= 4 \
            and sample.shape[-3] != ex.shape[1]:
        raise ConfigError(f"dataset {dataset!r} gives {sample.shape[-3]}-channel images of shape "
                          f"{tuple(sample.shape)} but model {model_name!r} takes {ex.shape[1]} channels "
                          f"{tuple(ex.shape[1:])}; use a dataset the model was built for")


def classification_job(
    model_name: str,
    spec: Optional[QuantSpec],
    dataset: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 50,
    progress: bool = True,
    keep_model: bool = False,
    dataset_root=None,
    weights=None,
    threads: Optional[int] = None,
) -> dict:
    """Quantize a registered classification model and (when ``dataset`` is given) evaluate FP32 and
    quantized. ``spec=None`` evaluates the float model only. ``weights`` overrides the registry's checkpoint
    (a path); ``threads`` sets torch's intra-op threads for the evaluation. A dataset whose classes or image
    channels do not match the model is refused before anything is computed."""
    if dataset:  # names and classes checked before anything loads (a model can take half a minute)
        from .models import get_entry

        check_classes(model_name, get_entry(model_name), dataset)
    model, entry = _load(model_name, weights)
    ex = make_example(entry, batch=1)
    in_range = input_range_from_preprocess(entry.preprocess)
    ds = None
    if dataset:
        from .data import get_dataset

        ds = get_dataset(dataset, root=dataset_root, preprocess=entry.preprocess, limit=limit)
        check_channels(model_name, ex, dataset, ds)
    out: dict = dict(model=model_name, task=entry.task)
    qmodel = _quantize_or_keep(out, model, entry, weights, spec, ex, in_range)
    if ds is not None:
        from .evaluate.classification import evaluate

        root = getattr(ds, "root", None) or dataset_root
        out["dataset"] = dataset
        out["dataset_path"] = str(root) if root is not None else None
        fp_metrics, fp_logits = fp32_reference(model, model_name, ds, dataset, limit, batch_size, progress,
                                               weights_sha=out.get("weights_sha256"), threads=threads)
        out["fp32_top1"] = fp_metrics["top1"]
        out["fp32_top5"] = fp_metrics["top5"]
        if spec is None:
            out.update({k: fp_metrics[k] for k in ("top1", "top5", "n")})
            out["agreement"], out["kl"] = 100.0, 0.0
            out["eval_seconds"] = fp_metrics.get("seconds")
        else:
            m = evaluate(qmodel, ds, batch_size=batch_size, progress=progress, fp_logits=fp_logits, threads=threads)
            out.update({k: m[k] for k in ("top1", "top5", "agreement", "kl", "n") if k in m})
            out["eval_seconds"] = m.get("seconds")
    if keep_model:
        out["qmodel"] = qmodel
    return out


# ------------------------------------------------------------------------- detection / segmentation

def _dense_input_range(model_name: str, entry) -> tuple[float, float]:
    """Range of the network input of the bundled detection / segmentation models.

    FastestDet: BGR / 255 -> [0, 1]. ESPNet: (img_bgr - mean) / std / 255 with its per-dataset mean/std."""
    extra = getattr(entry, "extra", {}) or {}
    mean, std, scale = extra.get("mean"), extra.get("std"), None
    if mean is None and model_name.startswith("espnet"):
        from .models import espnet

        city = "cityscapes" in model_name
        mean = espnet.CITYSCAPES_MEAN_BGR if city else espnet.CAMVID_MEAN_BGR
        std = espnet.CITYSCAPES_STD_BGR if city else espnet.CAMVID_STD_BGR
        scale = 255.0
    if mean is None or std is None:
        return (0.0, 1.0)
    scale = scale or 1.0
    lo = min((0.0 - m) / s / scale for m, s in zip(mean, std))
    hi = max((255.0 - m) / s / scale for m, s in zip(mean, std))
    return (float(lo), float(hi))


def _fp32_metrics(stem: str, key_parts: list, compute: Callable[[], dict], fresh: bool) -> dict:
    """The float model's metrics, cached as JSON in ``<cache>/fp32/<stem>-<key>.json`` (key: sha256 of
    ``key_parts``): an FP32 row (``fresh``) always recomputes and rewrites it; a corrupt file is recomputed."""
    from .paths import cache_root

    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:16]
    cpath = cache_root() / "fp32" / f"{stem}-{key}.json"
    if not fresh and cpath.exists():
        try:
            return json.loads(cpath.read_text())
        except ValueError:
            cpath.unlink(missing_ok=True)
    fp = compute()
    atomic_write_json(cpath, fp, end="")
    return fp


def _dense_job(task: str, evaluate: Callable, metric_keys: tuple, model_name: str, spec: Optional[QuantSpec],
               limit=None, progress=True, dataset_root=None, weights=None, threads=None, keep_model=False,
               evaluate_kw: Optional[dict] = None) -> dict:
    model, entry = _load(model_name, weights)
    if entry.task != task:
        from .errors import ConfigError

        raise ConfigError(f"model {model_name!r} is a {entry.task} model, not {task}")
    h, w = entry.input_size
    ex = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    in_range = _dense_input_range(model_name, entry)
    out: dict = dict(model=model_name, task=task)
    qmodel = _quantize_or_keep(out, model, entry, weights, spec, ex, in_range)
    kw = dict(data_root=dataset_root, max_images=limit, progress=progress, threads=threads, **(evaluate_kw or {}))
    # FP32 metrics: cached per (model, weights, data root, limit)
    fp = _fp32_metrics(f"{model_name}-{task}", [model_name, out.get("weights_sha256"), str(dataset_root), limit,
                                                 sorted((evaluate_kw or {}).items())],
                       lambda: {k: v for k, v in evaluate(model, **kw).items()
                                if isinstance(v, (int, float, str)) or v is None}, fresh=spec is None)
    for k in metric_keys:
        if k in fp:
            out[f"fp32_{k}"] = fp[k]
    m = fp if spec is None else evaluate(qmodel, **kw)
    out.update({k: m[k] for k in metric_keys if k in m})
    out["n"] = m.get("n")
    out["eval_seconds"] = m.get("seconds")
    if dataset_root is None:
        from .paths import data_root

        sub = {"detection": "coco-val2017-first128", "segmentation": "camvid-test-sub4"}[task]
        out["dataset_path"] = str(data_root() / sub)
    else:
        out["dataset_path"] = str(dataset_root)
    if keep_model:
        out["qmodel"] = qmodel
    return out


def detection_job(model_name: str, spec: Optional[QuantSpec], limit: Optional[int] = None, progress: bool = True,
                  dataset_root=None, weights=None, threads: Optional[int] = None, keep_model: bool = False,
                  **evaluate_kw) -> dict:
    """Quantize a registered detection model (``fastestdet_coco``) and score it with mmdet's CocoMetric
    (``rex.evaluate.detection.evaluate``): AP, AP50, AP75 (percent), plus the FP32 figures."""
    from .evaluate.detection import evaluate

    return _dense_job("detection", evaluate, ("AP", "AP50", "AP75", "APs", "APm", "APl"), model_name, spec,
                      limit, progress, dataset_root, weights, threads, keep_model, evaluate_kw)


def segmentation_job(model_name: str, spec: Optional[QuantSpec], limit: Optional[int] = None, progress: bool = True,
                     dataset_root=None, weights=None, threads: Optional[int] = None, keep_model: bool = False,
                     **evaluate_kw) -> dict:
    """Quantize a registered segmentation model (``espnet_camvid``) and score it with mmseg's IoUMetric
    (``rex.evaluate.segmentation.evaluate``): mIoU, aAcc, mAcc (percent), plus the FP32 figures."""
    from .evaluate.segmentation import evaluate

    return _dense_job("segmentation", evaluate, ("mIoU", "aAcc", "mAcc"), model_name, spec,
                      limit, progress, dataset_root, weights, threads, keep_model, evaluate_kw)


# ------------------------------------------------------------------------------------------------- text

TEXT_TASKS = ("text_similarity", "language_modeling")


def text_job(model_name: str, spec: Optional[QuantSpec], limit: Optional[int] = None, progress: bool = True,
             dataset_root=None, weights=None, threads: Optional[int] = None, keep_model: bool = False,
             tied_head: str = "float", dataset: Optional[str] = None) -> dict:
    """Quantize a registered text model (``minilm_l6``: STS-B Spearman x100; ``smollm2_135m``: WikiText-2
    perplexity, lower is better) and evaluate it on its default dataset (``dataset``, if given, must be that
    one); ``limit`` is the number of sentence pairs or of tokens scored (windows of 512). The same record as the
    other jobs (``_quantize_into``): BOPs per example input (``rex.models.transformers.example_inputs``: 16
    tokens), bits per weight, the layer inputs left float (``act_float`` of ``act_layers``) and ``notes``
    naming them. The FP32 figure is cached per (model, weights, data root, limit)."""
    from .data import get_dataset
    from .errors import ConfigError
    from .evaluate.text import evaluate_text
    from .models.transformers import example_inputs, load_tokenizer, quantize_text_model

    bundle = get_model(model_name, weights=weights) if weights is not None else get_model(model_name)
    entry = bundle.entry
    if entry.task not in TEXT_TASKS:
        raise ConfigError(f"model {model_name!r} is a {entry.task} model, not a text model ({', '.join(TEXT_TASKS)})")
    if dataset is not None and dataset != entry.default_dataset:
        raise ConfigError(f"model {model_name!r} is evaluated on {entry.default_dataset!r} only, got dataset "
                          f"{dataset!r}; use dataset={entry.default_dataset} (dataset.root= for your own copy)")
    tok = load_tokenizer(bundle)
    ex = example_inputs(tok, entry.task)
    out: dict = dict(model=model_name, task=entry.task)
    qmodel = _quantize_or_keep(out, bundle.model, entry, weights, spec, ex, None,
                               quantizer=lambda s: quantize_text_model(bundle, s, tied_head=tied_head))
    ds = get_dataset(entry.default_dataset, root=dataset_root, limit=limit)
    out["dataset"], out["dataset_path"] = entry.default_dataset, str(getattr(ds, "path", None) or dataset_root)
    fp = _fp32_metrics(f"{model_name}-{entry.task}", [model_name, out.get("weights_sha256"), str(dataset_root), limit],
                       lambda: evaluate_text(bundle.model, ds, tok, entry.task, threads=threads), fresh=spec is None)
    m = fp if spec is None else evaluate_text(qmodel, ds, tok, entry.task, threads=threads)
    metric = m["metric"]
    out[metric], out[f"fp32_{metric}"] = m["value"], fp["value"]
    out.update({k: m[k] for k in ("n", "window", "tokens", "n_tokens", "max_length") if k in m})
    out["eval_seconds"] = m.get("seconds")
    if keep_model:
        out["qmodel"] = qmodel
    return out


JOBS = {"classification": classification_job, "detection": detection_job, "segmentation": segmentation_job,
        "text_similarity": text_job, "language_modeling": text_job}
