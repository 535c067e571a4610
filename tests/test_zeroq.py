"""ZeroQ as its authors wrote it (classification/distill_data.py): per-image statistics, its own loss
normalisation, lr 0.5, 500 iterations, ReduceLROnPlateau, its uniform start."""
import torch
from torch import nn

from rex import zeroq


def test_statistics_are_per_image_not_pooled_over_the_batch():
    # two images whose pooled batch mean is exactly 0 but each image's mean is +-1: ZeroQ's loss sees them
    a = torch.stack([torch.ones(3, 4, 4), -torch.ones(3, 4, 4)])
    mu, sd = zeroq.per_sample_stats(a)
    assert mu.shape == (2, 3) and sd.shape == (2, 3)
    assert torch.allclose(mu[0], torch.ones(3)) and torch.allclose(mu[1], -torch.ones(3))
    # own_loss = ||A - B||^2 / B: (3 * 1 + 3 * 1) / 2
    assert torch.isclose(zeroq.zeroq_loss(torch.zeros(3), mu), torch.tensor(3.0))
    assert torch.allclose(sd, torch.full((2, 3), zeroq.ZEROQ_EPS ** 0.5), atol=1e-6)


def test_defaults_are_zeroqs_own():
    assert (zeroq.ZEROQ_LR, zeroq.ZEROQ_ITERS, zeroq.ZEROQ_BATCH) == (0.5, 500, 32)
    x = zeroq.zeroq_init((4, 3, 8, 8), torch.Generator().manual_seed(0))
    assert float(x.abs().max()) <= 127.5 / 5418.75 + 1e-9   # the narrow uniform start of its data_utils.py


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return net.eval()


def test_distillation_matches_each_images_bn_statistics():
    net = _bn_net()
    data, info = zeroq.distill_zeroq(net, (1, 1, 12, 12), batch=4, iters=300, cache=False)
    start = zeroq.zeroq_init((4, 1, 12, 12), torch.Generator().manual_seed(0))
    assert info["algorithm"] == "zeroq" and info["loss_last"] < 0.5 * info["loss_first"]

    def err(x):  # per image: distance of the first BN's input statistics to its running statistics
        seen = []
        h = net[1].register_forward_pre_hook(lambda m, a: seen.append(zeroq.per_sample_stats(a[0])))
        with torch.no_grad():
            net(x)
        h.remove()
        mu, sd = seen[0]
        return (mu - net[1].running_mean).abs().amax(1) + (sd - net[1].running_var.sqrt()).abs().amax(1)

    assert (err(data) < 0.6 * err(start)).all()  # every image on its own, not only the batch mean
    assert all(p.requires_grad for p in net.parameters())  # restored


def test_zeroq_method_is_zeroqs_own_and_lite_is_the_pooled_variant():
    import rex
    from rex.methods.zeroq import ZeroQConfig, ZeroQLiteConfig

    assert (ZeroQConfig().zeroq_batch, ZeroQConfig().zeroq_steps, ZeroQConfig().zeroq_lr) == (32, 500, 0.5)
    assert (ZeroQLiteConfig().zeroq_batch, ZeroQLiteConfig().zeroq_steps) == (8, 200)
    net = _bn_net()
    ex = torch.zeros(1, 1, 12, 12)
    opts = {"zeroq_batch": 2, "zeroq_steps": 5}
    q = rex.quantize(net, method="zeroq", wbits=8, abits=8, first_last="same", example_input=ex, options=opts)
    lite = rex.quantize(net, method="zeroq_lite", wbits=8, abits=8, first_last="same", example_input=ex,
                        options=opts)
    assert q.rex_info.extra["zeroq"]["algorithm"] == "zeroq"
    assert lite.rex_info.extra["zeroq"]["algorithm"] == "pooled"
    assert [r["act_range"] for r in rex.report(q)] != [r["act_range"] for r in rex.report(lite)]


def test_distilled_batch_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("REX_CACHE", str(tmp_path))
    net = _bn_net()
    zeroq._CACHE.clear()
    a, info = zeroq.distill_zeroq(net, (1, 1, 8, 8), batch=2, iters=4)
    files = list((tmp_path / "zeroq").glob("*.pt"))
    assert not info["cached"] and len(files) == 1
    zeroq._CACHE.clear()  # a new process: memory empty, the file answers, bit for bit
    b, info = zeroq.distill_zeroq(net, (1, 1, 8, 8), batch=2, iters=4)
    assert info["cached"] and torch.equal(a, b)
    zeroq._CACHE.clear()  # another setting is another file, never the cached batch
    c, info = zeroq.distill_zeroq(net, (1, 1, 8, 8), batch=2, iters=5)
    assert not info["cached"] and len(list((tmp_path / "zeroq").glob("*.pt"))) == 2
    files[0].write_bytes(b"garbage")  # a corrupt file is recomputed, not trusted
    zeroq._CACHE.clear()
    d, info = zeroq.distill_zeroq(net, (1, 1, 8, 8), batch=2, iters=4)
    assert not info["cached"] and torch.equal(a, d)


def test_bad_example_input_fails_before_the_relu6_copy(monkeypatch):
    # a non-tensor example input is refused before the model is deep-copied for relu6='relu'
    import copy

    import pytest

    import rex
    from rex.errors import ConfigError

    def no_copy(*a, **k):
        raise AssertionError("model copied before the example input was checked")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    with pytest.raises(ConfigError, match="single-tensor example_input"):
        rex.quantize(_bn_net(), method="zeroq_lite", wbits=8, abits=8, relu6="relu",
                     example_input=(torch.zeros(1, 1, 12, 12),), options={"zeroq_steps": 1})
