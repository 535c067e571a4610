"""SQuant (Guo et al. 2022): data-free rounding flipped per kernel and per output channel (rex.quant.squant),
alone (order 1) or at every order of a REx expansion (``rex_squant``).

Options: squant_stages ("ekc"; "e", "ek", "ec" for the ablations).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import quantize_model
from ..errors import ConfigError
from ..quant import WeightQuantizer
from ..quant.squant import STAGES, make_squant_rounding
from . import MethodConfig, register_method, require_order_one


@dataclass(frozen=True)
class SQuantConfig(MethodConfig):
    squant_stages: str = "ekc"  # e: element, k: kernel, c: channel flips

    def validate(self) -> None:
        if self.squant_stages not in STAGES:
            raise ConfigError(f"options.squant_stages must be one of {STAGES}, got {self.squant_stages!r}")


def squant_factory(spec, cfg: SQuantConfig):
    """(bits, layer name) -> the weight operator with SQuant rounding."""
    rounding = make_squant_rounding(cfg.squant_stages)
    return lambda bits, name: WeightQuantizer(bits, spec.symmetric, spec.granularity, rounding,
                                              group_size=spec.group_size)


def _quantize(model, spec, example_input, input_range):
    cfg = spec.config
    q = quantize_model(model, spec, example_input, input_range, quantizer_factory=squant_factory(spec, cfg))
    q.rex_info.extra["rounding"] = f"squant-{cfg.squant_stages}"
    return q


@register_method("squant", "SQuant (Guo et al. 2022): data-free rounding flipped per kernel and per output channel",
                 config=SQuantConfig, display="SQuant")
def squant(model, spec, example_input=None, input_range=None):
    require_order_one(spec, "squant", "rex_squant")
    return _quantize(model, spec, example_input, input_range)


@register_method("rex_squant", "REx (order K, budget) with SQuant rounding at every expansion order",
                 config=SQuantConfig, display="REx+SQuant")
def rex_squant(model, spec, example_input=None, input_range=None):
    return _quantize(model, spec, example_input, input_range)
