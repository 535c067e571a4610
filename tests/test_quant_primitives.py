import pytest
import torch

from rex.errors import ConfigError, WeightError
from rex.quant import (
    WeightQuantizer,
    asymmetric_qparams,
    dequantize_affine,
    qrange,
    quantize_affine,
    symmetric_scale,
)


@pytest.mark.parametrize("bits,expected", [(2, (-1, 1)), (3, (-3, 3)), (4, (-7, 7)), (8, (-127, 127)), (16, (-32767, 32767))])
def test_signed_restricted_range(bits, expected):
    assert qrange(bits, signed=True) == expected


def test_unsigned_range():
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(4, signed=False) == (0, 15)


@pytest.mark.parametrize("bits", [1, 0, 17, 32, 4.0, True])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match="2, 16"):
        WeightQuantizer(bits)


def test_ternary_grid_and_round_trip():
    w = torch.tensor([[0.9, -0.2, 0.6, -1.0], [0.1, 0.05, -0.3, 0.0]])
    qt = WeightQuantizer(2)(w)
    assert set(qt.q.unique().tolist()) <= {-1, 0, 1}
    assert torch.allclose(qt.scale, torch.tensor([1.0, 0.3]))
    assert torch.equal(qt.q[0], torch.tensor([1, 0, 1, -1], dtype=qt.q.dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_symmetric_error_at_most_half_step(bits, granularity):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    qt = WeightQuantizer(bits, granularity=granularity)(w)
    err = (qt.dequantize() - w).abs()
    step = qt.scale.reshape(-1, 1, 1, 1) if qt.scale.dim() else qt.scale
    assert (err <= step / 2 + 1e-7).all()
    _, qmax = qrange(bits)
    assert int(qt.q.abs().max()) == qmax  # the largest weight lands on the grid's end


def test_all_zero_channel_stays_exactly_zero():
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0
    for sym in (True, False):
        qt = WeightQuantizer(4, symmetric=sym)(w)
        deq = qt.dequantize()
        assert torch.equal(deq[2], torch.zeros_like(deq[2]))
        assert torch.isfinite(deq).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weights_raise(bad):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(WeightError, match="NaN|Inf"):
        WeightQuantizer(8)(w, name="conv.weight")


def test_asymmetric_zero_exact_and_error_bound():
    torch.manual_seed(0)
    w = torch.rand(8, 20) * 3 - 0.5  # skewed
    scale, zp = asymmetric_qparams(w, 4, axis=0)
    q = quantize_affine(w, scale, zp, 0, 15, axis=0)
    deq = dequantize_affine(q, scale, zp, axis=0)
    assert ((deq - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    z = quantize_affine(torch.zeros(8, 1), scale, zp, 0, 15, axis=0)
    assert torch.allclose(dequantize_affine(z, scale, zp, axis=0), torch.zeros(8, 1))


def test_per_tensor_scale_is_global_max():
    w = torch.tensor([[1.0, -3.5], [0.5, 0.25]])
    assert torch.isclose(symmetric_scale(w, 8, None), torch.tensor(3.5 / 127))
