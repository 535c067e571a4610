"""Dataset registry.

    ds = rex.data.get_dataset("imagenet_sample", preprocess=bundle.entry.preprocess)
    x, y = ds[0]            # normalised float C x H x W tensor, int label
    rex.data.list_datasets()

Entries: `imagenet_sample` (bundled 1000 images), `imagenet_val` (ImageNet val folder, root from
`root=` or env REX_IMAGENET_ROOT), `fashion_mnist` (test split: 10,000 images; `split="train"`: 60,000),
`stsb_dev` and `wikitext2_test` (text, rex.data.text).
Decoded tensors are cached under `rex.paths.cache_root()/datasets/` (see rex.data.cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from ..errors import ConfigError, UnknownNameError
from .cache import LazyImageDataset, TensorImageDataset
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, as_preprocess

__all__ = ["DatasetEntry", "IMAGENET_MEAN", "IMAGENET_STD", "LazyImageDataset", "Preprocess",
           "TensorImageDataset", "get_dataset", "list_datasets", "register_dataset", "dataset_entry"]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    task: str
    loader: Callable[..., Any]
    num_classes: Optional[int] = None
    default_split: str = "test"
    description: str = ""


_DATASETS: Dict[str, DatasetEntry] = {}


def register_dataset(name: str, loader: Optional[Callable[..., Any]] = None, *, task: str = "classification",
                     num_classes: Optional[int] = None, default_split: str = "test", description: str = "",
                     overwrite: bool = False):
    """Register `loader(root=None, preprocess=None, limit=None, split=..., cache=True) -> Dataset`.

    Usable as a decorator (`@register_dataset("name", task=...)`) or a plain call with `loader`.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _DATASETS and not overwrite:
            raise ConfigError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, task, fn, num_classes, default_split, description)
        return fn

    return deco(loader) if loader is not None else deco


def list_datasets(task: Optional[str] = None) -> List[str]:
    return sorted(n for n, e in _DATASETS.items() if task is None or e.task == task)


def dataset_entry(name: str) -> DatasetEntry:
    try:
        return _DATASETS[name]
    except KeyError:
        raise UnknownNameError("dataset", name, _DATASETS) from None


def get_dataset(name: str, root=None, preprocess: Any = None, limit: Optional[int] = None,
                split: Optional[str] = None, cache: bool = True):
    """Build a registered dataset. `preprocess` is a Preprocess, a ModelEntry/ModelBundle, or None
    (the dataset's default: ImageNet Resize 256 / CenterCrop 224 / mean-std, or Fashion-MNIST's)."""
    entry = dataset_entry(name)
    if limit is not None and int(limit) <= 0:
        raise ConfigError(f"limit must be a positive number of images, got {limit}")
    return entry.loader(root=root, preprocess=as_preprocess(preprocess),
                        limit=None if limit is None else int(limit),
                        split=split or entry.default_split, cache=cache)


def _register_builtin() -> None:
    from . import fashion_mnist, imagenet

    register_dataset("imagenet_sample", imagenet.imagenet_sample, num_classes=1000,
                     description="bundled 1000-image ImageNet-1k sample (one per class), data_root()/imagenet-sample")
    register_dataset("imagenet_val", imagenet.imagenet_val, num_classes=1000, default_split="val",
                     description="ImageNet-1k val folder val/<wnid>/*.JPEG (root= or env REX_IMAGENET_ROOT)")
    register_dataset("fashion_mnist", fashion_mnist.fashion_mnist, num_classes=10,
                     description="Fashion-MNIST IDX files (test: 10,000 images; split='train': 60,000)")
    from . import text

    register_dataset("stsb_dev", text.stsb_dev, task="text_similarity", default_split="dev",
                     description="GLUE STS-B dev, 1,500 sentence pairs (limit = first N), data_root()/glue-stsb-dev")
    register_dataset("wikitext2_test", text.wikitext2_test, task="language_modeling",
                     description="WikiText-2 raw test (limit = token budget, default 2,048), data_root()/wikitext-2-raw")


_register_builtin()
