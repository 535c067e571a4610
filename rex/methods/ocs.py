"""OCS (Zhao et al. 2019): outlier channel splitting (rex.transforms.ocs), function preserving, then RTN.

Options: expand_ratio (0.02: split 2% of the input channels of every dense layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import quantize_model
from ..errors import ConfigError
from . import MethodConfig, register_method, require_order_one


@dataclass(frozen=True)
class OCSConfig(MethodConfig):
    expand_ratio: float = 0.02

    def validate(self) -> None:
        r = self.expand_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 <= r <= 1):
            raise ConfigError(f"options.expand_ratio must be a number in [0, 1] (0.02 = split 2% of the input channels), got {r!r}")
        self._set("expand_ratio", float(r))

    def describe(self) -> str:
        return f"expand {self.expand_ratio * 100:g}%"


@register_method("ocs", "OCS (Zhao et al. 2019): outlier channel splitting (options.expand_ratio, default 0.02), function preserving",
                 config=OCSConfig, display="OCS")
def ocs(model, spec, example_input=None, input_range=None):
    from ..transforms import SplitOutlierChannels

    require_order_one(spec, "ocs", None)
    ratio = spec.config.expand_ratio
    q = quantize_model(model, spec, example_input, input_range, transforms=[SplitOutlierChannels(ratio)])
    added = q.rex_info.transforms["ocs_split"]["added"]
    q.rex_info.extra["ocs"] = dict(expand_ratio=ratio, layers_split=len(added), channels_added=int(sum(added.values())))
    return q
