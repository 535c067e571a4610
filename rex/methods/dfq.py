"""DFQ (Nagel et al. 2019): ReLU6->ReLU, cross-layer equalization, high-bias absorption, analytic bias
correction, on the BN-folded model; alone (order 1) or under a REx expansion (``rex_dfq``: the expansion of
the prepared model, bias correction of W(K)).

Options: relu6 (True), equalize (True), absorb (True), absorb_padded (False), bias_correct (True),
cle_iters (100), cle_tol (1e-4).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..engine import quantize_model
from . import MethodConfig, coerce, register_method, require_batchnorm, require_order_one

NEEDS_BN = "its bias correction and high-bias absorption read the BatchNorm statistics"


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


def dfq_transforms(cfg: DFQConfig) -> list:
    """DFQ's preparation as transforms (after BN folding): equalization (with ReLU6 -> ReLU; 0 sweeps when
    ``equalize`` is off), high-bias absorption, analytic bias correction of the quantized weights."""
    from ..transforms import AbsorbHighBias, BiasCorrection, Equalize

    ts = []
    if cfg.equalize or cfg.absorb or cfg.relu6:
        ts.append(Equalize(relu6=cfg.relu6, max_iter=cfg.cle_iters if cfg.equalize else 0, tol=cfg.cle_tol))
    if cfg.absorb:
        ts.append(AbsorbHighBias(absorb_padded=cfg.absorb_padded))
    if cfg.bias_correct:
        ts.append(BiasCorrection())
    return ts


def dfq_quantize(model, spec, example_input=None, input_range=None) -> nn.Module:
    """DFQ preparation + quantization (any order) + analytic bias correction of W(K)."""
    cfg = spec.config
    q = quantize_model(model, spec, example_input, input_range, transforms=dfq_transforms(cfg))
    done = q.rex_info.transforms
    eq, ab, bc = done.get("equalize", {}), done.get("absorb_high_bias", {}), done.get("bias_correction", {})
    seconds = sum(done[k]["seconds"] for k in ("equalize", "absorb_high_bias", "bias_correction") if k in done)
    q.rex_info.extra["dfq"] = dict(
        pairs=len(eq.get("pairs", [])), relu6_replaced=len(eq.get("relu6_replaced", [])),
        cle_iterations=eq.get("iterations"), cle_max_log_scale=eq.get("max_log_scale"),
        absorbed=len(ab.get("absorbed", {})), bias_corrected=len(bc.get("corrected", {})), prepare_seconds=seconds,
        options=dict(relu6=cfg.relu6, equalize=cfg.equalize, absorb=cfg.absorb, absorb_padded=cfg.absorb_padded,
                     bias_correct=cfg.bias_correct),
    )
    if cfg.relu6 and eq.get("relu6_replaced"):
        q.rex_info.notes.append(f"dfq: {len(eq['relu6_replaced'])} ReLU6 replaced by ReLU (equalization paths)")
    return q


@register_method("dfq", "DFQ (Nagel et al. 2019): ReLU6->ReLU, cross-layer equalization, high-bias absorption, analytic bias correction",
                 config=DFQConfig, display="DFQ")
def dfq(model, spec, example_input=None, input_range=None):
    require_order_one(spec, "dfq", "rex_dfq")
    require_batchnorm(model, "dfq", NEEDS_BN)
    return dfq_quantize(model, spec, example_input, input_range)


@register_method("rex_dfq", "REx (order K, budget) on the DFQ-prepared model, bias correction of the expanded weights",
                 config=DFQConfig, display="REx+DFQ")
def rex_dfq(model, spec, example_input=None, input_range=None):
    require_batchnorm(model, "rex_dfq", NEEDS_BN)
    return dfq_quantize(model, spec, example_input, input_range)
