"""The quantization math runs under a scoped single-thread setting (issue 14: thread contention made a
2-thread MiniLM quantization ~10x slower than a 1-thread one on a loaded machine); the caller's torch
thread count is restored, also when quantization fails."""
import pytest
import torch
from torch import nn

import rex
from rex.engine import quantize_model
from rex.errors import ConfigError, WeightError
from rex.quant import WeightQuantizer, check_finite
from rex.quant.threads import quant_thread_count, quant_threads


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_quantize_math_runs_single_threaded_and_restores_the_callers_threads(monkeypatch):
    monkeypatch.delenv("REX_QUANT_THREADS", raising=False)
    seen = []

    def factory(bits, name):
        seen.append(torch.get_num_threads())
        return WeightQuantizer(bits)

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = quantize_model(_mlp(), rex.QuantSpec(wbits=4, abits=None, order=2), torch.zeros(1, 16),
                           quantizer_factory=factory)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        assert q.rex_info.extra["quant_threads"] == 1
    finally:
        torch.set_num_threads(prev)


def test_threads_restored_when_quantization_fails():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = _mlp()
        with torch.no_grad():
            m[0].weight[0, 0] = float("nan")
        with pytest.raises(WeightError):
            rex.quantize(m, wbits=4, abits=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_env_override_and_bad_value(monkeypatch):
    monkeypatch.setenv("REX_QUANT_THREADS", "2")
    assert quant_thread_count() == 2
    with quant_threads():
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("REX_QUANT_THREADS", "zero")
    with pytest.raises(ConfigError, match="REX_QUANT_THREADS"):
        quant_thread_count()


def test_check_finite_fast_path_keeps_exact_answers():
    big = torch.full((4, 8), 3e38)  # finite entries whose sum overflows to inf: must not raise
    check_finite(big, "big")
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 8)
        w[2, 3] = bad
        with pytest.raises(WeightError, match="w contains"):
            check_finite(w, "w")


def test_dequantize_never_writes_into_the_callers_tensor():
    from rex.quant import dequantize_affine

    q = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    before = q.clone()
    out = dequantize_affine(q, torch.tensor([0.5, 2.0]), torch.tensor([1, 0]), 0)
    assert torch.equal(q, before)
    assert torch.equal(out, torch.tensor([[0.0, -1.5], [6.0, 0.0]]))
    qi = torch.tensor([[1, -2]], dtype=torch.int8)
    assert torch.equal(dequantize_affine(qi, torch.tensor(0.25), None, None), torch.tensor([[0.25, -0.5]]))
