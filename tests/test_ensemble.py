import torch
from torch import nn

import rex
from rex.ensemble import EnsembleModel, deviation, members


def test_members_formula():
    assert members(1) == [([0], 1.0)]
    assert members(2) == [([0, 1], 1.0)]
    assert members(4) == [([0, 1], 1.0), ([0, 2], 1.0), ([0, 3], 1.0), ([0], -2.0)]


def test_ensemble_equals_exact_expansion_on_a_single_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(4, 8, 10, 10)
    for order in (2, 3, 4):
        q = rex.quantize(model, rex.QuantSpec(wbits=4, abits=None, order=order, first_last="same"), example_input=x)
        ens = EnsembleModel(q)
        assert torch.allclose(ens(x), q(x), atol=1e-5)


def test_ensemble_deviation_on_real_model_shrinks_with_bit_width(mobilenet_v2, imagenet_batch):
    x = imagenet_batch[:8]
    devs = {}
    for bits in (3, 4, 6):
        q = rex.quantize(mobilenet_v2, rex.QuantSpec(wbits=bits, abits=None, order=3, first_last="same"))
        devs[bits] = deviation(q, x)
    assert devs[3]["rel_max"] > devs[4]["rel_max"] > devs[6]["rel_max"]
    assert devs[6]["agreement"] == 100.0


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_batched_and_process_members_equal_sequential_members():
    """Members run as one grouped-conv pass (BatchedEnsemble) or one process each give the sequential
    ensemble's output (weights-only quantization: float summation order is the only difference)."""
    from rex.ensemble import BatchedEnsemble, run_members_in_processes

    model, x = _small_net(), torch.randn(6, 3, 12, 12)
    q = rex.quantize(model, rex.QuantSpec(wbits=3, abits=None, order=3, first_last="same"), example_input=x)
    with torch.no_grad():
        seq = EnsembleModel(q)(x)
        batched = BatchedEnsemble(q)(x)
        exact = q(x)
    assert torch.allclose(batched, seq, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seq, exact, atol=1e-4)  # K=3 over several layers: the ensemble is an approximation
    procs = run_members_in_processes(q, x, batch_size=6)
    assert torch.allclose(procs, seq, rtol=1e-5, atol=1e-5)
    # and the sequential ensemble leaves the model as it was
    with torch.no_grad():
        assert torch.equal(q(x), exact)
