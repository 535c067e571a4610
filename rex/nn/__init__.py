"""Quantized layers swapped in eagerly: activation quantizer + expanded weight, fake or integer-exact."""
from .layers import (  # noqa: F401
    ActQuantizer,
    QuantConv1D,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvNd,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantLayer,
    QuantLinear,
)
