"""Quantized layers swapped in eagerly: activation quantizer + expanded weight, fake or integer-exact."""
from .layers import (  # noqa: F401
    ActQuantizer,
    QuantConv1D,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantLayer,
    QuantLinear,
)
