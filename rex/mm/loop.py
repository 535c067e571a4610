"""A minimal test loop over an mmengine dataset, an mm model's ``test_step`` and an mmengine ``Evaluator``.

Equivalent to mmengine's ``Runner.test()`` with batch size 1 (same ``test_step``, same metric ``process`` /
``evaluate`` calls) without its work_dir, logger and hook machinery.
"""
from __future__ import annotations

import contextlib
import io
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from rex.errors import ConfigError


def as_mm_model(model, mm_base: type, wrap: Callable[[nn.Module], nn.Module], max_images: Optional[int]):
    """The mm model to test: ``model`` itself when it already is one (an ``mm_base``), else the bare network
    wrapped by ``wrap``. Checks ``max_images`` first (>= 1 or None)."""
    if max_images is not None and int(max_images) < 1:
        raise ConfigError(f"max_images must be >= 1 or None, got {max_images}")
    if isinstance(model, mm_base):
        return model
    if isinstance(model, nn.Module):
        return wrap(model)
    raise ConfigError(f"evaluate() needs an nn.Module, got {type(model).__name__}")


def quiet_unless(progress: bool):
    """A context that swallows stdout (pycocotools and mm* print tables) unless ``progress``."""
    return contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())


def run_test_loop(mm_model, dataset, metrics, progress: bool = True, desc: str = "eval",
                  threads: Optional[int] = None) -> tuple[dict, int, float]:
    """Run ``mm_model.test_step`` on every dataset item (batch 1) and return ``(metrics, n, seconds)``.

    ``seconds`` covers data loading, the forward pass and post-processing (not the final metric computation).
    """
    from mmengine.dataset import pseudo_collate
    from mmengine.evaluator import Evaluator

    if threads:
        torch.set_num_threads(int(threads))
    evaluator = Evaluator(metrics if isinstance(metrics, (list, tuple)) else [metrics])
    evaluator.dataset_meta = dataset.metainfo
    mm_model.eval()
    n = len(dataset)
    it = range(n)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=desc, leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in it:
            data = pseudo_collate([dataset[i]])
            outputs = mm_model.test_step(data)
            evaluator.process(data_samples=outputs, data_batch=data)
            if bar is not None:
                bar.update(1)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return evaluator.evaluate(n), n, seconds
