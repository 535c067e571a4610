"""Training command and classification evaluator."""
import json

import pytest
import torch
from torch import nn

from rex.data import Preprocess, TensorImageDataset
from rex.evaluate.classification import evaluate
from rex.models import checkpoint_ok, get_model
from rex.train import main as train_main
from rex.train import ensure_trained, sha256_file, train

PRE = Preprocess(resize=None, crop=None, mean=(0.5,), std=(0.5,), input_size=(2, 2), channels=1)


class FixedLogits(nn.Module):
    """Returns the logits stored for each image (images carry their index in pixel [0, 0])."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        idx = torch.round((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).long()
        return self.table[idx]


def _dataset(n=10, labels=None):
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.as_tensor(labels if labels is not None else [i % 7 for i in range(n)])
    return TensorImageDataset("toy", images, labels, PRE)


def test_evaluate_topk_agreement_kl():
    n, k = 10, 7
    ds = _dataset(n)
    table = torch.full((n, k), -5.0)
    for i in range(n):
        y = i % 7
        if i < 6:
            table[i, y] = 5.0  # correct top-1
        elif i < 8:
            table[i, (y + 1) % k], table[i, y] = 5.0, 4.0  # top-5 only
        else:
            table[i, (y + 1) % k] = 5.0  # wrong
    model = FixedLogits(table)
    r = evaluate(model, ds, batch_size=3, progress=False)
    assert r["n"] == n and r["top1"] == pytest.approx(60.0) and r["top5"] == pytest.approx(80.0)
    assert r["agreement"] is None and r["kl"] is None and r["seconds"] >= 0

    same = evaluate(model, ds, batch_size=4, fp_model=model, progress=False, return_logits=True)
    assert same["agreement"] == pytest.approx(100.0) and same["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["logits"].shape == (n, k) and torch.equal(same["logits"], same["fp_logits"])

    other = table.clone()
    other[0] = other[0].flip(0)  # changes image 0's top-1
    q = FixedLogits(other)
    a = evaluate(q, ds, fp_model=model, progress=False)
    b = evaluate(q, ds, fp_logits=same["logits"], progress=False)  # FP32 logits reused
    assert a["agreement"] == pytest.approx(90.0) and a["agreement"] == b["agreement"]
    assert a["kl"] > 0 and a["kl"] == pytest.approx(b["kl"])
    p = torch.log_softmax(table.double(), 1)
    qq = torch.log_softmax(other.double(), 1)
    assert a["kl"] == pytest.approx(float((p.exp() * (p - qq)).sum(1).mean()))


def test_evaluate_generic_dataset_restores_mode_and_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 7))
    model.train()
    ds = _dataset(10)
    plain = [(ds[i][0], int(ds[i][1])) for i in range(len(ds))]  # a list: goes through a DataLoader
    r1 = evaluate(model, plain, batch_size=4, progress=False, return_logits=True)
    r2 = evaluate(model, ds, batch_size=3, progress=False, return_logits=True, threads=1)
    assert model.training  # restored
    assert torch.allclose(r1["logits"], r2["logits"], atol=1e-6)
    assert r1["top1"] == r2["top1"]
    with pytest.raises(Exception, match="fp_logits"):
        evaluate(model, ds, fp_logits=torch.zeros(3, 7), progress=False)


def _have_fmnist():
    from rex.data.fashion_mnist import candidate_roots

    return any((d / "train-images-idx3-ubyte.gz").is_file() or (d / "train-images-idx3-ubyte").is_file()
               for d in candidate_roots())


needs_fmnist = pytest.mark.skipif(not _have_fmnist(), reason="Fashion-MNIST not installed")


@needs_fmnist
def test_train_smoke_deterministic_and_atomic(tmp_path):
    kw = dict(epochs=1, limit=256, test_limit=200, seed=3, threads=1, log=lambda s: None)
    m1 = train("resnet20_fmnist", out=tmp_path / "a", **kw)
    m2 = train("resnet20_fmnist", out=tmp_path / "b", **kw)
    for d, m in ((tmp_path / "a", m1), (tmp_path / "b", m2)):
        meta = json.loads((d / "metrics.json").read_text())
        assert meta["sha256"] == sha256_file(d / "model.pt") == m["sha256"]
        assert meta["seed"] == 3 and meta["epochs"] == 1 and meta["smoke"] is True
        assert 0 <= meta["test_accuracy"] <= 100
        assert sorted(p.name for p in d.iterdir()) == ["metrics.json", "model.pt"]  # no temp files left
    s1 = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    s2 = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    model, entry = get_model("resnet20_fmnist", weights=tmp_path / "a" / "model.pt")
    assert entry.name == "resnet20_fmnist" and not model.training


@needs_fmnist
def test_train_cli_and_ensure_trained(tmp_path, capsys):
    out = tmp_path / "m"
    assert train_main(["--model", "mobilenetv2_fmnist", "--smoke", "--limit", "128", "--test-limit", "100",
                       "--out", str(out), "--threads", "1"]) == 0
    assert checkpoint_ok("mobilenetv2_fmnist", out)
    before = (out / "model.pt").stat().st_mtime_ns
    assert ensure_trained("mobilenetv2_fmnist", out=out) == out  # valid: not retrained
    assert (out / "model.pt").stat().st_mtime_ns == before
    assert train_main(["--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "known trainable models" in capsys.readouterr().err


@pytest.mark.slow
def test_mobilenet_v2_fp32_imagenet_sample():
    from rex.data import get_dataset

    model, entry = get_model("mobilenet_v2")
    ds = get_dataset("imagenet_sample", preprocess=entry.preprocess)
    assert len(ds) == 1000
    r = evaluate(model, ds, batch_size=50, threads=2, progress=False)
    assert r["top1"] == pytest.approx(83.5, abs=0.3)
    assert r["top5"] == pytest.approx(96.2, abs=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20_fmnist", "mobilenetv2_fmnist"])
def test_trained_fmnist_accuracy(name):
    from rex.data import get_dataset

    if not checkpoint_ok(name):
        pytest.skip(f"no trained {name} in the cache (python -m rex.train --model {name})")
    model, entry = get_model(name)
    r = evaluate(model, get_dataset("fashion_mnist", preprocess=entry.preprocess), batch_size=500,
                 threads=2, progress=False)
    assert r["n"] == 10000 and r["top1"] >= (90.0 if name == "resnet20_fmnist" else 89.0)
