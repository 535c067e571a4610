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
    check_group_size,
    dequantize_affine,
    expand_groups,
    fake_quantize,
    group_asymmetric_qparams,
    group_symmetric_scale,
    int_dtype,
    n_groups,
    qrange,
    quantize_affine,
    quantize_bias,
    round_nearest,
    symmetric_scale,
    to_groups,
)
