"""Decoded-image datasets and their on-disk cache.

Images are decoded and geometrically preprocessed (resize, crop, channel conversion) once per
(dataset, preprocessing geometry, file list) and stored as ONE uint8 tensor file under
`rex.paths.cache_root()/datasets/`, written atomically (`rex.io.atomic_torch_save`) and read back with
`torch.load(weights_only=True)`. Normalisation (mean/std) is applied on access, so the cache is shared by
every model with the same geometry and stays 4x smaller than float32.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .. import paths
from ..errors import DatasetError
from ..io import atomic_torch_save
from .preprocess import Preprocess

CACHE_VERSION = 1
# Datasets whose decoded tensor would exceed this many bytes are decoded lazily instead of cached.
DEFAULT_MAX_CACHE_BYTES = int(float(os.environ.get("REX_DATASET_CACHE_MAX_GB", "8")) * 2**30)


class TensorImageDataset(Dataset):
    """All images in memory as uint8 (N, C, H, W); items are normalised float tensors and int labels."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess,
                 classes: Optional[Sequence[str]] = None, files: Optional[Sequence[str]] = None,
                 root: Optional[Path] = None, cache_file: Optional[Path] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(f"{name}: expected a uint8 (N, C, H, W) image tensor, got "
                               f"{images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DatasetError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.name = name
        self.images = images
        self.labels = labels.long()
        self.preprocess = preprocess
        self.classes = list(classes) if classes is not None else None
        self.files = list(files) if files is not None else None
        self.root = root
        self.cache_file = cache_file
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # same arithmetic as torchvision: (x / 255 - mean) / std
        return (x.float().div_(255.0) - self._mean).div_(self._std)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self._normalize(self.images[index : index + 1])[0], int(self.labels[index])

    def batch(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels [start, stop) without a DataLoader."""
        return self._normalize(self.images[start:stop]), self.labels[start:stop]

    def subset(self, n: int) -> "TensorImageDataset":
        return TensorImageDataset(self.name, self.images[:n], self.labels[:n], self.preprocess, self.classes,
                                  None if self.files is None else self.files[:n], self.root, self.cache_file)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"root={str(self.root) if self.root else None!r})")


class LazyImageDataset(Dataset):
    """Decodes each image on access (used when the decoded set is too large to cache in one file)."""

    def __init__(self, name: str, files: Sequence[Path], labels: Sequence[int], preprocess: Preprocess,
                 classes: Optional[Sequence[str]] = None, root: Optional[Path] = None):
        self.name, self.paths, self.preprocess, self.root = name, list(files), preprocess, root
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.classes = list(classes) if classes is not None else None
        self.files = [str(p) for p in self.paths]
        self._mean = torch.tensor(preprocess.mean).view(-1, 1, 1)
        self._std = torch.tensor(preprocess.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = decode_image(self.paths[index], self.preprocess)
        return (x.float().div_(255.0) - self._mean).div_(self._std), int(self.labels[index])


def _pil_interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def pil_to_uint8(img, preprocess: Preprocess, source: str = "<image>") -> torch.Tensor:
    """Resize / crop / convert a PIL image exactly like torchvision's ImageClassification preset."""
    import torchvision.transforms.functional as F

    img = img.convert("RGB" if preprocess.channels == 3 else "L")
    interp = _pil_interpolation(preprocess.interpolation)
    if preprocess.resize is not None:
        size = [preprocess.resize] if isinstance(preprocess.resize, int) else list(preprocess.resize)
        img = F.resize(img, size, interpolation=interp, antialias=True)
    if preprocess.crop is not None:
        crop = [preprocess.crop] if isinstance(preprocess.crop, int) else list(preprocess.crop)
        img = F.center_crop(img, crop)
    h, w = preprocess.input_size
    if (img.height, img.width) != (h, w):
        if preprocess.resize is None and preprocess.crop is None:
            img = F.resize(img, [h, w], interpolation=interp, antialias=True)
        else:
            raise DatasetError(f"{source}: preprocessing gives {img.height}x{img.width}, expected {h}x{w} "
                               f"(check the Preprocess resize/crop/input_size: {preprocess})")
    return F.pil_to_tensor(img)


def decode_image(path: Path, preprocess: Preprocess) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_uint8(img, preprocess, str(path))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}. The file is missing, truncated or not an "
                           "image; replace it with a valid copy (or delete it and its entry in the labels).") from exc


def file_list_digest(root: Path, files: Sequence[Path], extra: str = "") -> str:
    """Hash of relative names, sizes and modification times (cheap; content changes change mtime)."""
    h = hashlib.sha256(extra.encode())
    for p in files:
        try:
            st = p.stat()
        except OSError as exc:
            raise DatasetError(f"cannot read {p}: {exc}") from exc
        rel = os.path.relpath(p, root)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_dir() -> Path:
    return paths.cache_root() / "datasets"


def cache_path(name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{name}-{digest[:20]}.pt"


def _load_cache(path: Path, n_expected: int):
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
        images, labels = payload["images"], payload["labels"]
        if images.dtype != torch.uint8 or len(images) != n_expected or len(labels) != n_expected:
            raise ValueError("unexpected content")
        return images, labels
    except Exception as exc:  # corrupted / stale cache: rebuild it
        print(f"rex.data: ignoring unreadable cache {path} ({exc}); rebuilding", file=sys.stderr)
        return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> Optional[Path]:
    """Store decoded images + labels at ``path``; None when it cannot be written (the data is still usable)."""
    try:
        atomic_torch_save({"images": images, "labels": labels, "version": CACHE_VERSION}, path)
    except OSError as exc:
        print(f"rex.data: could not write cache {path}: {exc}", file=sys.stderr)
        return None
    return path


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)


def image_cache_path(name: str, root: Path, files: Sequence[Path], labels: Sequence[int],
                     preprocess: Preprocess, extra_key: str = "") -> Path:
    key = {"dataset": name, "preprocess": preprocess.geometry_key(),
           "files": file_list_digest(root, files, extra_key + "|" + ",".join(map(str, labels)))}
    return cache_path(name, key)


def load_cached_image_dataset(name: str, root: Path, files: Sequence[Path], labels: Sequence[int],
                              preprocess: Preprocess, classes: Optional[Sequence[str]] = None,
                              extra_key: str = "") -> Optional[TensorImageDataset]:
    """The cached TensorImageDataset for exactly these files and geometry, or None when not cached."""
    path = image_cache_path(name, root, files, labels, preprocess, extra_key)
    if not path.is_file():
        return None
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    loaded = _load_cache(path, len(files))
    if loaded is None or not torch.equal(loaded[1], labels_t):
        return None
    return TensorImageDataset(name, loaded[0], labels_t, preprocess, classes,
                              [os.path.relpath(p, root) for p in files], root, path)


def build_image_dataset(name: str, root: Path, files: Sequence[Path], labels: Sequence[int],
                        preprocess: Preprocess, classes: Optional[Sequence[str]] = None, *,
                        cache: bool = True, extra_key: str = "",
                        max_cache_bytes: Optional[int] = None) -> Dataset:
    """Decode image files into a cached TensorImageDataset (or a LazyImageDataset when too large)."""
    if not files:
        raise DatasetError(f"{name}: no images found under {root}")
    n = len(files)
    c, h, w = preprocess.shape
    limit_bytes = DEFAULT_MAX_CACHE_BYTES if max_cache_bytes is None else max_cache_bytes
    if n * c * h * w > limit_bytes:
        print(f"rex.data: {name}: {n} images would take {n * c * h * w / 2**30:.1f} GiB decoded "
              f"(> REX_DATASET_CACHE_MAX_GB); decoding on the fly instead of caching", file=sys.stderr)
        return LazyImageDataset(name, files, labels, preprocess, classes, root)
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    path = None
    if cache:
        path = image_cache_path(name, root, files, labels, preprocess, extra_key)
        found = load_cached_image_dataset(name, root, files, labels, preprocess, classes, extra_key)
        if found is not None:
            return found
    images = torch.empty((n, c, h, w), dtype=torch.uint8)
    for i, p in enumerate(_progress(files, n, f"decoding {name}")):
        images[i] = decode_image(p, preprocess)
    if path is not None:
        path = _write_cache(path, images, labels_t)
    return TensorImageDataset(name, images, labels_t, preprocess, classes,
                              [os.path.relpath(p, root) for p in files], root, path)


def cached_tensor(name: str, key: dict, build: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
                  n_expected: Optional[int] = None, cache: bool = True) -> Tuple[torch.Tensor, torch.Tensor, Optional[Path]]:
    """Generic cache for datasets decoded in bulk (e.g. IDX files): returns (images, labels, cache file)."""
    path = cache_path(name, key) if cache else None
    if path is not None and path.is_file():
        try:
            payload = torch.load(path, weights_only=True, map_location="cpu")
            images, labels = payload["images"], payload["labels"]
            if n_expected is None or len(images) == n_expected:
                return images, labels, path
        except Exception as exc:
            print(f"rex.data: ignoring unreadable cache {path} ({exc}); rebuilding", file=sys.stderr)
    images, labels = build()
    if path is not None:
        path = _write_cache(path, images, labels)
    return images, labels, path
