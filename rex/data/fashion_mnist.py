"""Fashion-MNIST from its IDX files (gzipped or not).

Search order for the folder: `root=` argument, env `REX_FMNIST_ROOT`, `rex.paths.data_root()/fashion-mnist`,
then the install location of the Debian package `dataset-fashion-mnist`.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .. import paths
from ..errors import ConfigError, DatasetError
from .cache import TensorImageDataset, cached_tensor, file_list_digest, pil_to_uint8
from .preprocess import Preprocess

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Where `apt-get install dataset-fashion-mnist` puts the files (a Debian package convention, not a
# machine-specific path).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}
PREPROCESS = Preprocess(resize=None, crop=None, mean=FMNIST_MEAN, std=FMNIST_STD, input_size=(28, 28), channels=1)


def candidate_roots(root: Optional[os.PathLike] = None) -> list:
    if root is not None:
        return [Path(root).expanduser()]
    out = []
    env = os.environ.get("REX_FMNIST_ROOT")
    if env:
        out.append(Path(env).expanduser())
    out += [paths.data_root() / "fashion-mnist", DEBIAN_DIR]
    return out


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def find_files(split: str, root: Optional[os.PathLike] = None) -> Tuple[Path, Path, Path]:
    if split not in SPLITS:
        raise ConfigError(f"fashion_mnist split must be one of {sorted(SPLITS)}, got {split!r}")
    img_stem, lab_stem, _ = SPLITS[split]
    tried = candidate_roots(root)
    for folder in tried:
        imgs, labs = _find(folder, img_stem), _find(folder, lab_stem)
        if imgs and labs:
            return folder, imgs, labs
    raise DatasetError(
        f"Fashion-MNIST {split} files ({img_stem}[.gz], {lab_stem}[.gz]) not found in: "
        + ", ".join(str(p) for p in tried)
        + ". Install them with `apt-get install -y dataset-fashion-mnist`, or point REX_FMNIST_ROOT (or root=) "
        "at a folder holding the four IDX files.")


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}. Reinstall dataset-fashion-mnist.") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file (bad magic {data[:4].hex()}); "
                           "reinstall dataset-fashion-mnist")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(data) - offset != count:
        raise DatasetError(f"{path}: header says {dims} ({count} bytes) but the file holds "
                           f"{len(data) - offset} bytes (truncated?); reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_arrays(split: str = "test", root: Optional[os.PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) straight from the IDX files."""
    _, imgs_p, labs_p = find_files(split, root)
    images = read_idx(imgs_p)
    labels = read_idx(labs_p)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    if len(labels) == 0:
        raise DatasetError(f"Fashion-MNIST {split}: {imgs_p} holds no images (an empty dataset); reinstall "
                           "dataset-fashion-mnist or point REX_FMNIST_ROOT (or root=) at the full IDX files")
    if labels.max() > 9:
        raise DatasetError(f"{labs_p}: labels outside 0..9")
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def fashion_mnist(root: Optional[os.PathLike] = None, preprocess: Optional[Preprocess] = None,
                  limit: Optional[int] = None, split: str = "test", cache: bool = True) -> TensorImageDataset:
    preprocess = preprocess or PREPROCESS
    folder, imgs_p, labs_p = find_files(split, root)
    n_total = SPLITS[split][2]
    key = {"dataset": "fashion_mnist", "split": split, "preprocess": preprocess.geometry_key(),
           "files": file_list_digest(folder, [imgs_p, labs_p])}

    def build():
        images, labels = load_arrays(split, folder)
        if preprocess.geometry_key() != PREPROCESS.geometry_key():
            from PIL import Image

            images = torch.stack([pil_to_uint8(Image.fromarray(img[0].numpy()), preprocess)
                                  for img in images])
        return images, labels

    images, labels, cache_file = cached_tensor("fashion_mnist", key, build, n_total, cache=cache)
    if len(images) != n_total:
        raise DatasetError(f"Fashion-MNIST {split}: expected {n_total} images, found {len(images)} in {folder}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorImageDataset(f"fashion_mnist:{split}" if split != "test" else "fashion_mnist", images, labels,
                              preprocess, CLASSES, None, folder, cache_file)
