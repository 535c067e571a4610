"""Model and dataset registries: every entry loads, errors name the problem and the fix."""
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rex.data import Preprocess, get_dataset, list_datasets
from rex.errors import CheckpointError, DatasetError, RexError, UnknownNameError
from rex.models import (ModelBundle, checkpoint_ok, example_input, get_entry, get_model, list_models,
                        register_model)

FMNIST = ("resnet20_fmnist", "mobilenetv2_fmnist")


# ------------------------------------------------------------------------------------------- models

def test_list_models_has_every_family():
    names = list_models()
    for n in ("mobilenet_v2", "resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large", *FMNIST,
              "fastestdet_coco", "espnet_camvid", "espnet_cityscapes"):
        assert n in names
    assert list_models(task="detection") == ["fastestdet_coco"]
    assert set(list_models(task="segmentation")) == {"espnet_camvid", "espnet_cityscapes"}


def test_mobilenet_v2_bundled_weights():
    bundle = get_model("mobilenet_v2")
    assert isinstance(bundle, ModelBundle)
    model, entry = bundle
    assert not model.training
    assert entry.sha256.startswith("b0353104")
    assert Path(entry.weights_path).name == "mobilenet_v2-b0353104.pth" and Path(entry.weights_path).is_file()
    p = entry.preprocess
    assert (p.resize, p.crop, p.interpolation, p.input_size, p.channels) == (256, 224, "bilinear", (224, 224), 3)
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert entry.num_classes == 1000 and entry.default_dataset == "imagenet_sample"
    with torch.inference_mode():
        out = model(example_input(entry, batch=2))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_torchvision_preprocess_from_metadata():
    e = get_entry("efficientnet_b0")
    assert (e.preprocess.resize, e.preprocess.crop, e.preprocess.interpolation) == (256, 224, "bicubic")
    assert e.num_classes == 1000


def test_torchvision_missing_weights_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    monkeypatch.setenv("REX_WEIGHTS_ROOT", str(tmp_path / "weights"))
    monkeypatch.delenv("REX_TORCHVISION_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError) as err:
        get_model("resnet18")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "torchhome" / "hub" / "checkpoints") in msg
    assert "REX_TORCHVISION_WEIGHTS" in msg


def test_torchvision_local_file(tmp_path, monkeypatch):
    import torchvision

    state = torchvision.models.squeezenet1_1().state_dict()
    # found through REX_TORCHVISION_WEIGHTS under torchvision's own file name: the sha256 prefix in the
    # name does not match random weights -> refused
    folder = tmp_path / "tv"
    folder.mkdir()
    torch.save(state, folder / "squeezenet1_1-b8a52dc0.pth")
    monkeypatch.setenv("REX_TORCHVISION_WEIGHTS", str(folder))
    with pytest.raises(CheckpointError, match="sha256"):
        get_model("squeezenet1_1")
    # an explicit file under another name is loaded as is
    torch.save(state, tmp_path / "my_squeezenet.pth")
    model, entry = get_model("squeezenet1_1", weights=tmp_path / "my_squeezenet.pth")
    assert entry.weights_file == str(tmp_path / "my_squeezenet.pth") and entry.sha256 is None
    assert torch.equal(model.state_dict()["classifier.1.weight"], state["classifier.1.weight"])


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        get_model("resnet_does_not_exist")
    assert "mobilenet_v2" in str(err.value) and "resnet20_fmnist" in str(err.value)
    assert "fastestdet_coco" in err.value.known


def test_register_model_decorator():
    from torch import nn

    from rex.models import _REGISTRY

    @register_model("_test_tiny", num_classes=3, preprocess=Preprocess(resize=None, crop=None, mean=(0.5,),
                                                                       std=(0.5,), input_size=(8, 8), channels=1))
    def _build(entry, weights=None):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, entry.num_classes))

    try:
        bundle = get_model("_test_tiny")
        assert not bundle.model.training
        assert bundle.model(example_input("_test_tiny", batch=4)).shape == (4, 3)
        assert "_test_tiny" in list_models()
    finally:
        _REGISTRY.pop("_test_tiny", None)


@pytest.fixture(scope="module")
def fmnist_weights(tmp_path_factory):
    """{name: checkpoint path}: the cached trained model if present, else a tiny smoke-trained one."""
    from rex.train import checkpoint_dir, train

    out = {}
    for name in FMNIST:
        if checkpoint_ok(name):
            out[name] = checkpoint_dir(name) / "model.pt"
        else:
            d = tmp_path_factory.mktemp(name)
            train(name, epochs=1, limit=256, test_limit=200, out=d, log=lambda s: None)
            out[name] = d / "model.pt"
    return out


@pytest.mark.parametrize("name", FMNIST)
def test_fmnist_models_load(name, fmnist_weights):
    model, entry = get_model(name, weights=fmnist_weights[name])
    assert not model.training
    assert entry.preprocess.channels == 1 and entry.input_size == (28, 28) and entry.num_classes == 10
    assert entry.default_dataset == "fashion_mnist"
    with torch.inference_mode():
        assert model(example_input(entry, batch=3)).shape == (3, 10)


def test_fmnist_missing_checkpoint_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("REX_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"python -m rex\.train --model resnet20_fmnist"):
        get_model("resnet20_fmnist")


def test_resnet20_has_residual_adds_and_mobilenet_depthwise():
    from torch import nn

    from rex.models.small import BasicBlock, InvertedResidual, MobileNetV2Small, ResNet20

    r = ResNet20()
    assert sum(isinstance(m, BasicBlock) for m in r.modules()) == 9
    assert sum(isinstance(m, nn.Conv2d) for m in r.modules()) == 21  # 19 + 2 shortcut convs
    m = MobileNetV2Small()
    assert any(isinstance(b, InvertedResidual) and b.use_res for b in m.modules())
    assert any(isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 for c in m.modules())
    assert any(isinstance(a, nn.ReLU6) for a in m.modules())


def test_corrupted_checkpoints(tmp_path, fmnist_weights):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        get_model("resnet20_fmnist", weights=garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        get_model("resnet20_fmnist", weights=empty)
    # truncated copy of a real file
    data = Path(fmnist_weights["resnet20_fmnist"]).read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        get_model("resnet20_fmnist", weights=trunc)
    # architecture mismatch
    with pytest.raises(CheckpointError, match="does not match"):
        get_model("mobilenetv2_fmnist", weights=fmnist_weights["resnet20_fmnist"])
    # sha256 in metrics.json no longer matches model.pt
    d = tmp_path / "ckpt"
    shutil.copytree(Path(fmnist_weights["resnet20_fmnist"]).parent, d)
    state = torch.load(d / "model.pt", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, d / "model.pt")
    with pytest.raises(CheckpointError, match="sha256"):
        get_model("resnet20_fmnist", weights=d / "model.pt")


def test_truncated_torchvision_file(tmp_path):
    src = get_entry("mobilenet_v2").weights_path
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(Path(src).read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="sha256"):
        get_model("mobilenet_v2", weights=bad)
    bad2 = tmp_path / "mnv2.pth"
    bad2.write_bytes(Path(src).read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="mnv2.pth"):
        get_model("mobilenet_v2", weights=bad2)


@pytest.mark.parametrize("name", ["fastestdet_coco", "espnet_camvid", "espnet_cityscapes"])
def test_detseg_entries(name):
    e = get_entry(name)
    assert e.task in ("detection", "segmentation") and e.input_size is not None
    if not e.weights_path.is_file():
        pytest.skip(f"{e.weights_path} not available")
    model, entry = get_model(name)
    assert not model.training
    if name == "fastestdet_coco":
        with torch.inference_mode():
            model(example_input(entry))


def test_detseg_registry_survives_broken_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "rex.models.fastestdet", None)  # import now raises ImportError
    assert "fastestdet_coco" in list_models()
    assert get_entry("fastestdet_coco").task == "detection"
    with pytest.raises(RexError, match="fastestdet"):
        get_model("fastestdet_coco")


# ----------------------------------------------------------------------------------------- datasets

def test_list_datasets():
    assert {"imagenet_sample", "imagenet_val", "fashion_mnist"} <= set(list_datasets())


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        get_dataset("imagenet_full")
    assert "imagenet_sample" in str(err.value) and "fashion_mnist" in str(err.value)


COLORS = {"n00000002": (0, 200, 0), "n00000001": (200, 0, 0), "n00000003": (0, 0, 200)}


def _make_val(root: Path, gray_in: str = "n00000003") -> Path:
    from PIL import Image

    val = root / "val"
    for wnid, color in COLORS.items():  # created out of order on purpose
        d = val / wnid
        d.mkdir(parents=True)
        for i, size in enumerate([(40, 30), (30, 50)]):
            img = Image.new("RGB", size, color)
            if wnid == gray_in and i == 0:
                img = img.convert("L")
            img.save(d / f"ILSVRC2012_val_{wnid[-1]}{i}.JPEG", quality=95)
    (val / "n00000001" / "notes.txt").write_text("not an image")
    return val


def test_imagenet_val_folder_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("REX_CACHE", str(tmp_path / "cache"))
    _make_val(tmp_path / "imnet")
    pre = Preprocess(resize=32, crop=28)
    ds = get_dataset("imagenet_val", root=tmp_path / "imnet", preprocess=pre)
    assert ds.classes == ["n00000001", "n00000002", "n00000003"]
    assert len(ds) == 6
    assert [int(ds[i][1]) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    for i in range(6):
        x, y = ds[i]
        assert x.shape == (3, 28, 28)
        # the dominant channel is the class colour (red, green, blue; the grayscale one is uniform)
        means = x.mean(dim=(1, 2)) * torch.tensor(pre.std) + torch.tensor(pre.mean)
        if ds.files[i].endswith("30.JPEG"):
            assert torch.allclose(means, means[0].expand(3), atol=0.02)  # grayscale -> RGB copies
        else:
            assert int(means.argmax()) == y
    assert ds.cache_file is not None and ds.cache_file.parent == tmp_path / "cache" / "datasets"
    # cached: the second call reads the one tensor file
    ds2 = get_dataset("imagenet_val", root=tmp_path / "imnet" / "val", preprocess=pre)
    assert ds2.cache_file == ds.cache_file and torch.equal(ds2.images, ds.images)
    # env root, and limit (round-robin over classes)
    monkeypatch.setenv("REX_IMAGENET_ROOT", str(tmp_path / "imnet"))
    ds3 = get_dataset("imagenet_val", preprocess=pre, limit=3)
    assert [int(ds3[i][1]) for i in range(3)] == [0, 1, 2]


def test_imagenet_val_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("REX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("REX_IMAGENET_ROOT", raising=False)
    with pytest.raises(DatasetError, match="REX_IMAGENET_ROOT"):
        get_dataset("imagenet_val")
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("imagenet_val", root=tmp_path / "nowhere")
    (tmp_path / "empty" / "val" / "n00000001").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        get_dataset("imagenet_val", root=tmp_path / "empty")
    val = _make_val(tmp_path / "bad")
    broken = val / "n00000002" / "ILSVRC2012_val_broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match="ILSVRC2012_val_broken.JPEG"):
        get_dataset("imagenet_val", root=tmp_path / "bad", preprocess=Preprocess(resize=32, crop=28))


def test_imagenet_sample_subset():
    ds = get_dataset("imagenet_sample", limit=8)
    assert len(ds) == 8 and ds[0][0].shape == (3, 224, 224)
    assert [int(ds[i][1]) for i in range(8)] == list(range(8))  # labels.txt is in class order
    assert ds.classes is not None and ds.classes[0] == "n01440764"


def test_imagenet_sample_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("imagenet_sample", root=tmp_path / "nope")


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader(tmp_path, gz):
    from rex.data.fashion_mnist import read_idx

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x.idx" + (".gz" if gz else ""))
    _write_idx(p, arr, gz)
    assert np.array_equal(read_idx(p), arr)
    raw = tmp_path / "trunc.idx"
    raw.write_bytes((gzip.decompress(p.read_bytes()) if gz else p.read_bytes())[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(raw)


def test_fashion_mnist_test_split(tmp_path, monkeypatch):
    from rex.data.fashion_mnist import candidate_roots

    if not any((d / "t10k-images-idx3-ubyte.gz").is_file() or (d / "t10k-images-idx3-ubyte").is_file()
               for d in candidate_roots()):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("REX_CACHE", str(tmp_path))
    ds = get_dataset("fashion_mnist")
    assert len(ds) == 10000
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and 0 <= y <= 9
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.cache_file is not None and ds.cache_file.is_file()
    assert len(get_dataset("fashion_mnist", limit=100)) == 100


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        get_dataset("fashion_mnist", root=tmp_path)
