"""ImageNet-1k classification sets: the bundled 1000-image sample and a standard val folder."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from .. import paths
from ..errors import DatasetError
from .cache import build_image_dataset, load_cached_image_dataset
from .preprocess import Preprocess

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
WNID_RE = re.compile(r"^n\d{8}$")
DEFAULT_PREPROCESS = Preprocess.imagenet()


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def imagenet_sample(root: Optional[os.PathLike] = None, preprocess: Optional[Preprocess] = None,
                    limit: Optional[int] = None, split: str = "test", cache: bool = True):
    """The bundled sample: one image per class, `labels.txt` lines `<file> <class index>`."""
    root = Path(root).expanduser() if root is not None else paths.data_root() / "imagenet-sample"
    preprocess = preprocess or DEFAULT_PREPROCESS
    if not root.is_dir():
        raise DatasetError(f"imagenet_sample: folder {root} does not exist. It should hold labels.txt and the "
                           "sample JPEGs (see ../shared/data/README.md); set REX_DATA_ROOT to the folder that "
                           "contains imagenet-sample/, or pass root=.")
    labels_file = root / "labels.txt"
    if not labels_file.is_file():
        raise DatasetError(f"imagenet_sample: {labels_file} is missing; expected lines '<file> <class index>'")
    files: List[Path] = []
    labels: List[int] = []
    for lineno, line in enumerate(labels_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{labels_file}:{lineno}: expected '<file> <class index>', got {line!r}")
        path = root / parts[0]
        if not path.is_file():
            raise DatasetError(f"{labels_file}:{lineno}: image {path} is listed but missing; restore it or "
                               "remove its line")
        files.append(path)
        labels.append(int(parts[1]))
    if not files:
        raise DatasetError(f"imagenet_sample: {labels_file} lists no images")
    synsets = root / "synsets.txt"
    classes = synsets.read_text().split() if synsets.is_file() else None
    if limit is not None and limit < len(files):
        if cache:  # a subset of an already decoded full set: slice it instead of decoding again
            full = load_cached_image_dataset("imagenet_sample", root, files, labels, preprocess, classes)
            if full is not None:
                return full.subset(limit)
        files, labels = files[:limit], labels[:limit]
    return build_image_dataset("imagenet_sample", root, files, labels, preprocess, classes, cache=cache)


def _resolve_val_root(root: Optional[os.PathLike]) -> Path:
    if root is None:
        env = os.environ.get("REX_IMAGENET_ROOT")
        if not env:
            raise DatasetError("imagenet_val needs the ImageNet validation folder: set REX_IMAGENET_ROOT (or the "
                               "dataset root in the config / root=) to a folder holding val/<wnid>/*.JPEG "
                               "(the standard ImageFolder layout, e.g. made by torchvision's valprep).")
        root = env
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"imagenet_val: folder {root} does not exist; expected val/<wnid>/*.JPEG under it")
    if (root / "val").is_dir():
        return root / "val"
    return root


def imagenet_val(root: Optional[os.PathLike] = None, preprocess: Optional[Preprocess] = None,
                 limit: Optional[int] = None, split: str = "val", cache: bool = True):
    """Standard layout `val/<wnid>/*.JPEG`; classes are the sorted wnids (torchvision ImageFolder order)."""
    val = _resolve_val_root(root)
    preprocess = preprocess or DEFAULT_PREPROCESS
    class_dirs = sorted(d for d in val.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"imagenet_val: no class folders in {val}; expected val/<wnid>/*.JPEG "
                           "(flat val folders must first be sorted into one folder per wnid)")
    odd = [d.name for d in class_dirs if not WNID_RE.match(d.name)]
    if odd:
        print(f"rex.data: imagenet_val: {len(odd)} folder(s) in {val} are not WordNet ids "
              f"(e.g. {odd[0]!r}); they are used as classes anyway", file=sys.stderr)
    if len(class_dirs) != 1000:
        print(f"rex.data: imagenet_val: {len(class_dirs)} class folders in {val} (ImageNet-1k has 1000); "
              "labels follow the sorted folder order, so they only match an ImageNet model's output "
              "indices with all 1000 folders present", file=sys.stderr)
    files: List[Path] = []
    labels: List[int] = []
    classes = [d.name for d in class_dirs]
    for idx, d in enumerate(class_dirs):
        for p in sorted(d.iterdir()):
            if _is_image(p):
                files.append(p)
                labels.append(idx)
    if not files:
        raise DatasetError(f"imagenet_val: the {len(class_dirs)} class folders in {val} hold no images "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        # round-robin over classes (1st image of every class, then the 2nd, ...) so that a small limit
        # still covers many classes; deterministic
        seen: dict = {}
        rank = []
        for lab in labels:
            rank.append(seen.get(lab, 0))
            seen[lab] = rank[-1] + 1
        order = sorted(range(len(files)), key=lambda i: (rank[i], labels[i]))[:limit]
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    return build_image_dataset("imagenet_val", val, files, labels, preprocess, classes, cache=cache)
