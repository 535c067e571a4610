"""Quantized layers swapped in eagerly: activation quantizer + expanded weight, fake or integer-exact."""
from .layers import ActQuantizer, QuantConv2d, QuantConvTranspose2d, QuantLayer, QuantLinear  # noqa: F401
