"""REx: data-free residual quantization error expansion (Yvinec et al., arXiv 2203.14645), with the
data-free baselines it is compared with, on one operator and one protocol.

    import rex
    qmodel = rex.quantize(model, rex.QuantSpec(method="rex", wbits=4, abits=8, order=2, budget=1.5))
    rex.bops(qmodel, torch.randn(1, 3, 224, 224)); rex.report(qmodel)
"""
from .api import bops, expand, quantize, report, summary  # noqa: F401
from .errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DatasetError,
    RexError,
    UnknownNameError,
    WeightError,
)
from .spec import QuantSpec  # noqa: F401

__version__ = "0.1.0"
