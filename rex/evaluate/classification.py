"""Classification evaluator: top-1 / top-5 accuracy, agreement with and KL divergence from FP32.

    fp = evaluate(fp_model, ds, return_logits=True)            # FP32 once
    q = evaluate(qmodel, ds, fp_logits=fp["logits"])           # reuses the FP32 logits

Deterministic: fixed order, no shuffling, no worker processes, inference mode. Results are percentages
(top1, top5, agreement) and the mean per-image KL(P_fp || P_q) in nats.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["evaluate", "topk_correct", "logits_of"]


@contextmanager
def _num_threads(threads: Optional[int]) -> Iterator[None]:
    if not threads:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor in a model's output (tensor, (named)tuple with .logits, or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        for key in ("logits", "out", "output"):
            if key in output:
                return output[key]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"cannot find logits in a model output of type {type(output).__name__}")


def _batches(dataset: Any, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    n = len(dataset)
    if hasattr(dataset, "batch"):  # rex.data.TensorImageDataset: slice the in-memory tensor
        for start in range(0, n, batch_size):
            yield dataset.batch(start, min(n, start + batch_size))
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for x, y in loader:
        yield x, torch.as_tensor(y)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels.view(-1, 1)).any(dim=1).sum())


def evaluate(model: nn.Module, dataset: Any, batch_size: int = 64, threads: Optional[int] = None,
             fp_model: Optional[nn.Module] = None, fp_logits: Optional[torch.Tensor] = None,
             progress: bool = True, device: str = "cpu", return_logits: bool = False,
             desc: Optional[str] = None) -> dict:
    """Evaluate `model` on `dataset` (items `(image tensor, int label)`, or a registered dataset name).

    Returns dict(top1, top5, agreement, kl, n, seconds[, logits, fp_logits]). `agreement` (percent of
    images whose top-1 class equals the FP32 model's) and `kl` (mean KL(FP || model)) are None unless
    `fp_model` or `fp_logits` (N x classes, same order as the dataset) is given.
    """
    if isinstance(dataset, str):
        from ..data import get_dataset

        dataset = get_dataset(dataset)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    if n == 0:
        raise ConfigError("cannot evaluate on an empty dataset")
    if fp_logits is not None:
        fp_logits = torch.as_tensor(fp_logits).float()
        if fp_logits.dim() != 2 or len(fp_logits) != n:
            raise ConfigError(f"fp_logits must be (N={n}, classes), got {tuple(fp_logits.shape)}")
    dev = torch.device(device)
    show = progress and sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm, show = None, False
    models = [m for m in (model, fp_model) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    all_logits, all_fp, all_labels = [], [], []
    t0 = time.perf_counter()
    try:
        with _num_threads(threads), torch.inference_mode():
            bar = tqdm(total=n, desc=desc or "evaluate", unit="img", leave=False) if show else None
            for x, y in _batches(dataset, batch_size):
                x = x.to(dev)
                all_logits.append(logits_of(model(x)).float().cpu())
                if fp_model is not None and fp_logits is None:
                    all_fp.append(logits_of(fp_model(x)).float().cpu())
                all_labels.append(y.long().cpu())
                if bar is not None:
                    bar.update(len(y))
            if bar is not None:
                bar.close()
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    seconds = time.perf_counter() - t0
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    if fp_logits is None and all_fp:
        fp_logits = torch.cat(all_fp)
    result = {
        "top1": 100.0 * topk_correct(logits, labels, 1) / n,
        "top5": 100.0 * topk_correct(logits, labels, 5) / n,
        "agreement": None,
        "kl": None,
        "n": n,
        "seconds": round(seconds, 3),
    }
    if fp_logits is not None:
        if fp_logits.shape != logits.shape:
            raise ConfigError(f"FP32 logits {tuple(fp_logits.shape)} and model logits {tuple(logits.shape)} differ")
        result["agreement"] = 100.0 * float((fp_logits.argmax(1) == logits.argmax(1)).float().mean())
        log_p = F.log_softmax(fp_logits.double(), dim=1)
        log_q = F.log_softmax(logits.double(), dim=1)
        result["kl"] = float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    if return_logits:
        result["logits"] = logits
        result["labels"] = labels
        if fp_logits is not None:
            result["fp_logits"] = fp_logits
    return result
