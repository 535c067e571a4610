"""ZeroQ (Cai et al. 2020): distilled data (BatchNorm statistics matching, rex.zeroq) sets the activation
ranges only; weights are quantized exactly as RTN.

``zeroq`` is ZeroQ's own distillation (``rex.zeroq.distill_zeroq``: per-image statistics, its loss, batch 32,
Adam lr 0.5, 500 iterations, plateau schedule). ``zeroq_lite`` is the cheaper batch-pooled variant
(``rex.zeroq.distill``: batch 8, 200 steps, lr 0.2, cosine schedule), for large inputs where the faithful one
costs hours on a CPU (MobileNetV2 at 224 x 224: about 1 s per image-iteration, so 32 x 500 is 4 h).

Options: zeroq_batch, zeroq_steps (iterations), zeroq_lr, zeroq_percentile (None = min/max).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine import default_example_input, quantize_model
from ..errors import ConfigError
from ..zeroq import ZEROQ_BATCH, ZEROQ_ITERS, ZEROQ_LR
from . import MethodConfig, coerce, register_method, require_batchnorm, require_order_one


@dataclass(frozen=True)
class ZeroQConfig(MethodConfig):
    zeroq_batch: int = ZEROQ_BATCH
    zeroq_steps: int = ZEROQ_ITERS
    zeroq_lr: float = ZEROQ_LR
    zeroq_percentile: Optional[float] = None  # None: [min, max] of the distilled activations

    def validate(self) -> None:
        for key, kind in (("zeroq_batch", int), ("zeroq_steps", int), ("zeroq_lr", float)):
            self._set(key, coerce(kind, key, getattr(self, key)))
        if self.zeroq_batch < 1 or self.zeroq_steps < 0:
            raise ConfigError(f"options.zeroq_batch must be >= 1 and zeroq_steps >= 0, got {self.zeroq_batch}, "
                              f"{self.zeroq_steps}")
        pct = self.zeroq_percentile
        if pct is not None and not (50 < coerce(float, "zeroq_percentile", pct) <= 100):
            raise ConfigError(f"options.zeroq_percentile must be in (50, 100] or None (min/max), got {pct!r}")




@dataclass(frozen=True)
class ZeroQLiteConfig(ZeroQConfig):
    zeroq_batch: int = 8
    zeroq_steps: int = 200
    zeroq_lr: float = 0.2


def _zeroq(model, spec, example_input, input_range, faithful: bool):
    from ..transforms import fold_batchnorm
    from ..zeroq import activation_ranges, distill, distill_zeroq

    name = "zeroq" if faithful else "zeroq_lite"
    require_order_one(spec, name, None)
    require_batchnorm(model, name, "the BatchNorm running statistics are its distillation target")
    if spec.act_range == "noise":  # checked before minutes of distillation
        raise ConfigError(f"{name} sets its own activation ranges (distilled data): act_range='noise' does not "
                          "apply; use act_range='bn' (or preset shared / zeroq) with it")
    cfg = spec.config
    batch, steps, lr, pct = cfg.zeroq_batch, cfg.zeroq_steps, cfg.zeroq_lr, cfg.zeroq_percentile
    ex = example_input if example_input is not None else default_example_input(model)
    if not isinstance(ex, torch.Tensor):  # before the relu6 copy: bad input fails fast
        raise ConfigError(f"{name} needs a single-tensor example_input (the shape of the distilled batch)")
    src = model
    if spec.relu6 == "relu":  # the ranges are those of the protocol's model (the engine replaces them too);
        # the distillation matches BN statistics on the model as given (its cache key is the weights)
        import copy

        from ..engine import relu6_to_relu

        src = copy.deepcopy(model)
        relu6_to_relu(src)
    if faithful:
        data, dinfo = distill_zeroq(model, tuple(ex.shape), batch=batch, iters=steps, seed=spec.seed, lr=lr)
    else:
        data, dinfo = distill(model, tuple(ex.shape), batch=batch, steps=steps, seed=spec.seed, lr=lr)
    folded = fold_batchnorm(src, ex).model if spec.fold_bn else src
    t0 = time.perf_counter()
    ranges = activation_ranges(folded, data, None if pct is None else float(pct))
    if ranges:  # the network input keeps the protocol's range (input_range, or float without one)
        ranges.pop(next(iter(ranges)))
    range_seconds = time.perf_counter() - t0
    q = quantize_model(model, spec, ex, input_range, range_override=ranges)
    q.rex_info.extra["zeroq_seconds"] = round(dinfo["seconds"] + range_seconds, 3)
    q.rex_info.extra["zeroq"] = dict(algorithm="zeroq" if faithful else "pooled", batch=batch, steps=steps, lr=lr,
                                     seed=spec.seed, percentile=pct, loss_first=dinfo["loss_first"],
                                     loss_last=dinfo["loss_last"], distill_cached=dinfo["cached"],
                                     layers=len(ranges))
    return q


@register_method("zeroq", "ZeroQ (Cai et al. 2020), its own distillation (per-image BN statistics, lr 0.5, 500 "
                 "iterations): distilled data sets the activation ranges only", config=ZeroQConfig, display="ZeroQ")
def zeroq(model, spec, example_input=None, input_range=None):
    return _zeroq(model, spec, example_input, input_range, faithful=True)


@register_method("zeroq_lite", "ZeroQ-lite: batch-pooled BN statistics matching (batch 8, 200 steps), a cheaper "
                 "distillation; distilled data sets the activation ranges only", config=ZeroQLiteConfig,
                 display="ZeroQ-lite")
def zeroq_lite(model, spec, example_input=None, input_range=None):
    return _zeroq(model, spec, example_input, input_range, faithful=False)
