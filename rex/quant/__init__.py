"""Quantization primitives (pure functions) and weight quantization operators."""
from .operators import (  # noqa: F401
    AsymmetricWeightQuantizer,
    QTensor,
    SymmetricWeightQuantizer,
    WeightQuantizer,
)
from .primitives import (  # noqa: F401
    MAX_BITS,
    MIN_BITS,
    absmax,
    asymmetric_qparams,
    check_bits,
    check_finite,
    dequantize_affine,
    fake_quantize,
    int_dtype,
    qrange,
    quantize_affine,
    round_nearest,
    symmetric_scale,
)
