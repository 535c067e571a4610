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
