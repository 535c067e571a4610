"""The data-free baselines of method.md §7, each on the same operator (rex.quant) and protocol (the engine:
BN folding, first/last-layer policy, data-free activation ranges), and REx on top of them.

    dfq         DFQ (Nagel et al. 2019): ReLU6->ReLU, cross-layer equalization, high-bias absorption,
                analytic bias correction
    squant      SQuant (Guo et al. 2022): kernel- and channel-wise flipped rounding (rex.quant.squant)
    ocs         OCS (Zhao et al. 2019): outlier channel splitting, options.expand_ratio (default 0.02)
    zeroq       ZeroQ (Cai et al. 2020): distilled data sets the activation ranges only
    rex_squant  REx (spec.order, spec.budget) with SQuant rounding at every order
    rex_dfq     REx (spec.order, spec.budget) on the DFQ-prepared model, bias correction on W(K)

The baselines themselves are order 1 (like ``rtn``); ask for the REx combination by its name.
Method options (``spec.options``):
    dfq / rex_dfq: relu6 (True), equalize (True), absorb (True), absorb_padded (False), bias_correct (True),
                   cle_iters (100), cle_tol (1e-4)
    squant / rex_squant: squant_stages ("ekc"; "e", "ek", "ec" for the ablations)
    ocs:   expand_ratio (0.02)
    zeroq: zeroq_batch (8), zeroq_steps (200), zeroq_lr (0.2), zeroq_percentile (None = min/max)
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..engine import default_example_input, quantize_model
from ..errors import ConfigError
from ..quant import WeightQuantizer
from ..quant.squant import STAGES, make_squant_rounding
from . import register_method

def _opt(spec, key, default):
    return spec.options.get(key, default)


def _order_one(spec, name: str, combo: str | None) -> None:
    if spec.order != 1 or spec.budget is not None:
        hint = f"; use method={combo} for REx on top of it" if combo else ""
        raise ConfigError(f"{name} is an order-1 baseline (got order={spec.order}, budget={spec.budget}){hint}")


def _factory(spec, rounding=None):
    return lambda bits, name: WeightQuantizer(bits, spec.symmetric, spec.granularity, rounding, group_size=spec.group_size)


def _squant_rounding(spec):
    stages = _opt(spec, "squant_stages", "ekc")
    if stages not in STAGES:
        raise ConfigError(f"options.squant_stages must be one of {STAGES}, got {stages!r}")
    return make_squant_rounding(stages)


# ----------------------------------------------------------------------------------------------------
# DFQ
# ----------------------------------------------------------------------------------------------------


def dfq_quantize(model, spec, example_input=None, input_range=None, rounding=None) -> nn.Module:
    """DFQ preparation + quantization (any order) + analytic bias correction of W(K)."""
    from ..transforms.bias_correction import correct_biases, expected_inputs
    from ..transforms.equalize import cross_layer_equalization

    relu6 = bool(_opt(spec, "relu6", True))
    do_eq = bool(_opt(spec, "equalize", True))
    absorb = bool(_opt(spec, "absorb", True))
    absorb_padded = bool(_opt(spec, "absorb_padded", False))
    bias_correct = bool(_opt(spec, "bias_correct", True))
    iters = int(_opt(spec, "cle_iters", 100))
    tol = float(_opt(spec, "cle_tol", 1e-4))
    state: dict = {}

    def prepare(m, ex, stats):
        t0 = time.perf_counter()
        info = {}
        if do_eq or absorb or relu6:
            info = cross_layer_equalization(m, ex, stats, relu6=relu6, absorb=absorb, absorb_padded=absorb_padded,
                                            max_iter=iters if do_eq else 0, tol=tol)
        if bias_correct:
            state["weights"] = {n: mod.weight.detach().clone() for n, mod in m.named_modules()
                                if isinstance(mod, (nn.Conv2d, nn.Linear))}
            state["expected"] = expected_inputs(m, ex, stats)
        state["info"] = info
        state["seconds"] = time.perf_counter() - t0
        return m, stats

    q = quantize_model(model, spec, example_input, input_range, quantizer_factory=_factory(spec, rounding),
                       prepare=prepare)
    corrected = {}
    if bias_correct:
        corrected = correct_biases(q, state["weights"], state["expected"])
    info = state.get("info", {})
    q.rex_info.extra["dfq"] = dict(
        pairs=len(info.get("pairs", [])), relu6_replaced=len(info.get("relu6_replaced", [])),
        cle_iterations=info.get("iterations"), cle_max_log_scale=info.get("max_log_scale"),
        absorbed=len(info.get("absorbed", {})), bias_corrected=len(corrected), prepare_seconds=state.get("seconds"),
        options=dict(relu6=relu6, equalize=do_eq, absorb=absorb, absorb_padded=absorb_padded, bias_correct=bias_correct),
    )
    if relu6 and info.get("relu6_replaced"):
        q.rex_info.notes.append(f"dfq: {len(info['relu6_replaced'])} ReLU6 replaced by ReLU (equalization paths)")
    return q


@register_method("dfq", "DFQ (Nagel et al. 2019): ReLU6->ReLU, cross-layer equalization, high-bias absorption, analytic bias correction")
def dfq(model, spec, example_input=None, input_range=None):
    _order_one(spec, "dfq", "rex_dfq")
    return dfq_quantize(model, spec, example_input, input_range)


@register_method("rex_dfq", "REx (order K, budget) on the DFQ-prepared model, bias correction of the expanded weights")
def rex_dfq(model, spec, example_input=None, input_range=None):
    return dfq_quantize(model, spec, example_input, input_range)


# ----------------------------------------------------------------------------------------------------
# SQuant
# ----------------------------------------------------------------------------------------------------


@register_method("squant", "SQuant (Guo et al. 2022): data-free rounding flipped per kernel and per output channel")
def squant(model, spec, example_input=None, input_range=None):
    _order_one(spec, "squant", "rex_squant")
    q = quantize_model(model, spec, example_input, input_range, quantizer_factory=_factory(spec, _squant_rounding(spec)))
    q.rex_info.extra["rounding"] = f"squant-{_opt(spec, 'squant_stages', 'ekc')}"
    return q


@register_method("rex_squant", "REx (order K, budget) with SQuant rounding at every expansion order")
def rex_squant(model, spec, example_input=None, input_range=None):
    q = quantize_model(model, spec, example_input, input_range, quantizer_factory=_factory(spec, _squant_rounding(spec)))
    q.rex_info.extra["rounding"] = f"squant-{_opt(spec, 'squant_stages', 'ekc')}"
    return q


# ----------------------------------------------------------------------------------------------------
# OCS
# ----------------------------------------------------------------------------------------------------


@register_method("ocs", "OCS (Zhao et al. 2019): outlier channel splitting (options.expand_ratio, default 0.02), function preserving")
def ocs(model, spec, example_input=None, input_range=None):
    from ..transforms.ocs import ocs_split

    _order_one(spec, "ocs", None)
    ratio = _opt(spec, "expand_ratio", 0.02)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 <= ratio <= 1):
        raise ConfigError(f"options.expand_ratio must be a number in [0, 1] (0.02 = split 2% of the input channels), got {ratio!r}")
    state: dict = {}

    def prepare(m, ex, stats):
        state["added"] = ocs_split(m, float(ratio), stats=stats)
        return m, stats

    q = quantize_model(model, spec, example_input, input_range, prepare=prepare)
    q.rex_info.extra["ocs"] = dict(expand_ratio=float(ratio), layers_split=len(state["added"]),
                                   channels_added=int(sum(state["added"].values())))
    return q


# ----------------------------------------------------------------------------------------------------
# ZeroQ
# ----------------------------------------------------------------------------------------------------


@register_method("zeroq", "ZeroQ (Cai et al. 2020): distilled data (BN statistics matching) sets the activation ranges only")
def zeroq(model, spec, example_input=None, input_range=None):
    from ..transforms import fold_batchnorm
    from ..zeroq import activation_ranges, distill

    _order_one(spec, "zeroq", None)
    batch = int(_opt(spec, "zeroq_batch", 8))
    steps = int(_opt(spec, "zeroq_steps", 200))
    lr = float(_opt(spec, "zeroq_lr", 0.2))
    pct = _opt(spec, "zeroq_percentile", None)
    if batch < 1 or steps < 0:
        raise ConfigError(f"options.zeroq_batch must be >= 1 and zeroq_steps >= 0, got {batch}, {steps}")
    if pct is not None and not (50 < float(pct) <= 100):
        raise ConfigError(f"options.zeroq_percentile must be in (50, 100] or None (min/max), got {pct!r}")
    ex = example_input if example_input is not None else default_example_input(model)
    if not isinstance(ex, torch.Tensor):
        raise ConfigError("zeroq needs a single-tensor example_input (the shape of the distilled batch)")
    data, dinfo = distill(model, tuple(ex.shape), batch=batch, steps=steps, seed=spec.seed, lr=lr)
    folded = fold_batchnorm(model, ex).model if spec.fold_bn else model
    t0 = time.perf_counter()
    ranges = activation_ranges(folded, data, None if pct is None else float(pct))
    if ranges:  # the network input keeps the protocol's range (input_range, or float without one)
        ranges.pop(next(iter(ranges)))
    range_seconds = time.perf_counter() - t0
    q = quantize_model(model, spec, ex, input_range, range_override=ranges)
    q.rex_info.extra["zeroq_seconds"] = round(dinfo["seconds"] + range_seconds, 3)
    q.rex_info.extra["zeroq"] = dict(batch=batch, steps=steps, lr=lr, seed=spec.seed, percentile=pct,
                                     loss_first=dinfo["loss_first"], loss_last=dinfo["loss_last"],
                                     distill_cached=dinfo["cached"], layers=len(ranges))
    return q
