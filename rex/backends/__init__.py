"""Real integer kernels for quantized models (beyond simulation)."""
from .int8 import Int8Backend, to_int8_backend  # noqa: F401
