"""DFQ (Nagel et al. 2019): ReLU6->ReLU, cross-layer equalization, high-bias absorption, analytic bias
correction, on the BN-folded model; alone (order 1) or under a REx expansion (``rex_dfq``: the expansion of
the prepared model, bias correction of W(K)).

Options: relu6 (True), equalize (True), absorb (True), absorb_padded (False), bias_correct (True),
cle_iters (100), cle_tol (1e-4).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from ..engine import quantize_model
from . import MethodConfig, coerce, register_method, require_order_one


@dataclass(frozen=True)
class DFQConfig(MethodConfig):
    relu6: bool = True  # ReLU6 -> ReLU on the equalization paths (ReLU6 is not scale-equivariant)
    equalize: bool = True
    absorb: bool = True
    absorb_padded: bool = False  # also absorb into a zero-padded L2 (its border sees -c)
    bias_correct: bool = True
    cle_iters: int = 100
    cle_tol: float = 1e-4

    def validate(self) -> None:
        for key in ("relu6", "equalize", "absorb", "absorb_padded", "bias_correct"):
            self._set(key, bool(getattr(self, key)))
        self._set("cle_iters", coerce(int, "cle_iters", self.cle_iters))
        self._set("cle_tol", coerce(float, "cle_tol", self.cle_tol))


def dfq_quantize(model, spec, example_input=None, input_range=None) -> nn.Module:
    """DFQ preparation + quantization (any order) + analytic bias correction of W(K)."""
    from ..transforms.bias_correction import correct_biases, expected_inputs
    from ..transforms.equalize import cross_layer_equalization

    cfg = spec.config
    state: dict = {}

    def prepare(m, ex, stats):
        t0 = time.perf_counter()
        info = {}
        if cfg.equalize or cfg.absorb or cfg.relu6:
            info = cross_layer_equalization(m, ex, stats, relu6=cfg.relu6, absorb=cfg.absorb,
                                            absorb_padded=cfg.absorb_padded,
                                            max_iter=cfg.cle_iters if cfg.equalize else 0, tol=cfg.cle_tol)
        if cfg.bias_correct:
            state["weights"] = {n: mod.weight.detach().clone() for n, mod in m.named_modules()
                                if isinstance(mod, (nn.Conv2d, nn.Linear))}
            state["expected"] = expected_inputs(m, ex, stats)
        state["info"] = info
        state["seconds"] = time.perf_counter() - t0
        return m, stats

    q = quantize_model(model, spec, example_input, input_range, prepare=prepare)
    corrected = {}
    if cfg.bias_correct:
        corrected = correct_biases(q, state["weights"], state["expected"])
    info = state.get("info", {})
    q.rex_info.extra["dfq"] = dict(
        pairs=len(info.get("pairs", [])), relu6_replaced=len(info.get("relu6_replaced", [])),
        cle_iterations=info.get("iterations"), cle_max_log_scale=info.get("max_log_scale"),
        absorbed=len(info.get("absorbed", {})), bias_corrected=len(corrected), prepare_seconds=state.get("seconds"),
        options=dict(relu6=cfg.relu6, equalize=cfg.equalize, absorb=cfg.absorb, absorb_padded=cfg.absorb_padded,
                     bias_correct=cfg.bias_correct),
    )
    if cfg.relu6 and info.get("relu6_replaced"):
        q.rex_info.notes.append(f"dfq: {len(info['relu6_replaced'])} ReLU6 replaced by ReLU (equalization paths)")
    return q


@register_method("dfq", "DFQ (Nagel et al. 2019): ReLU6->ReLU, cross-layer equalization, high-bias absorption, analytic bias correction",
                 config=DFQConfig, display="DFQ")
def dfq(model, spec, example_input=None, input_range=None):
    require_order_one(spec, "dfq", "rex_dfq")
    return dfq_quantize(model, spec, example_input, input_range)


@register_method("rex_dfq", "REx (order K, budget) on the DFQ-prepared model, bias correction of the expanded weights",
                 config=DFQConfig, display="REx+DFQ")
def rex_dfq(model, spec, example_input=None, input_range=None):
    return dfq_quantize(model, spec, example_input, input_range)
