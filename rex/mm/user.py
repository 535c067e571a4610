"""Load a user's own mmdet / mmseg model from its config file (and checkpoint), without any download."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from rex.errors import CheckpointError, ConfigError, RexError, describe_load_error

__all__ = ["load_user_model", "strip_pretrained"]

_TASKS = {"detection": "mmdet", "det": "mmdet", "mmdet": "mmdet",
          "segmentation": "mmseg", "seg": "mmseg", "mmseg": "mmseg"}


def strip_pretrained(node: Any) -> Any:
    """Recursively drop every download trigger from a model config: ``init_cfg`` -> None, ``pretrained`` -> None."""
    if isinstance(node, dict):
        for k in list(node.keys()):
            if k in ("init_cfg", "pretrained"):
                node[k] = None
            else:
                strip_pretrained(node[k])
    elif isinstance(node, (list, tuple)):
        for v in node:
            strip_pretrained(v)
    return node


def _sync_bn_to_bn(node: Any) -> Any:
    """``norm_cfg=dict(type='SyncBN')`` -> ``'BN'`` (same parameters; SyncBN needs a process group / GPU)."""
    if isinstance(node, dict):
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            node["type"] = "BN"
        for v in node.values():
            _sync_bn_to_bn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _sync_bn_to_bn(v)
    return node


def _scope_of(cfg, task: Optional[str]) -> str:
    if task is not None:
        if task not in _TASKS:
            raise ConfigError(f"task must be one of {sorted(set(_TASKS))}, got {task!r}")
        return _TASKS[task]
    scope = cfg.get("default_scope")
    if scope in ("mmdet", "mmseg"):
        return scope
    mtype = str(cfg.model.get("type", ""))
    if mtype in ("EncoderDecoder", "CascadeEncoderDecoder", "SegTTAModel") or "Seg" in mtype:
        return "mmseg"
    raise ConfigError(f"cannot tell whether {mtype or 'the model'} is an mmdet or an mmseg model (the config sets "
                      f"no default_scope): pass task='detection' or task='segmentation'")


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the path of a .pth file saved by mmdet / mmseg "
                              f"(or checkpoint=None for random weights)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot load checkpoint {path} with torch.load(weights_only=True): {describe_load_error(e)}. "
            f"If the file is a full mmengine training checkpoint (optimizer state, message hub), "
            f"re-save only the weights from a trusted environment: "
            f"torch.save({{'state_dict': ckpt['state_dict'], 'meta': {{'dataset_meta': ...}}}}, path); "
            f"a truncated or corrupted file must be downloaded again.") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict (a state dict, or a "
                              f"checkpoint with a 'state_dict' entry)")
    meta = ckpt.get("meta", {}) if isinstance(ckpt.get("meta", {}), dict) else {}
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no tensor state dict found (looked at the top level and at 'state_dict')")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd, meta


def load_user_model(config_path: Union[str, Path], checkpoint: Union[str, Path, None] = None,
                    task: Optional[str] = None, device: str = "cpu", strict: bool = True) -> nn.Module:
    """Build the mmdet / mmseg model described by ``config_path`` (eval mode, on ``device``).

    - Every ``init_cfg`` and ``pretrained`` entry is set to None, so nothing is downloaded; SyncBN becomes BN.
    - ``checkpoint``: loaded with ``torch.load(weights_only=True)`` (``state_dict`` entry or a bare state dict),
      ``strict`` key matching; failures raise :class:`rex.errors.CheckpointError`. ``None`` keeps PyTorch's default
      random initialisation.
    - ``task``: ``"detection"`` / ``"segmentation"`` (or ``"mmdet"`` / ``"mmseg"``); default: the config's
      ``default_scope``.

    The returned model has ``.cfg`` (the modified config) and ``.dataset_meta`` (from the checkpoint's meta when
    present, else the config's test dataset classes when it declares them).
    """
    try:
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
    except Exception as e:
        raise RexError(f"loading mmdet / mmseg configs needs mmengine ({e}); run bash workflow/scripts/setup.sh") from e
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:
        raise ConfigError(f"cannot parse config {path}: {type(e).__name__}: {e}") from e
    if "model" not in cfg:
        raise ConfigError(f"config {path} has no 'model' entry")
    scope = _scope_of(cfg, task)
    try:
        if scope == "mmdet":
            import mmdet.models  # noqa: F401
            from mmdet.registry import MODELS
            from mmdet.utils import register_all_modules
            import rex.mm.det  # noqa: F401  (rex models usable in user configs)
        else:
            import mmseg.models  # noqa: F401
            from mmseg.registry import MODELS
            from mmseg.utils import register_all_modules
            import rex.mm.seg  # noqa: F401
    except Exception as e:
        raise RexError(f"{scope} is not importable ({type(e).__name__}: {e}); it needs mmcv with compiled ops: "
                       f"run bash workflow/scripts/setup.sh") from e
    register_all_modules(init_default_scope=False)
    init_default_scope(scope)
    cfg.default_scope = scope
    model_cfg = cfg.model
    strip_pretrained(model_cfg)
    _sync_bn_to_bn(model_cfg)
    try:
        model = MODELS.build(model_cfg)
    except Exception as e:
        raise ConfigError(f"cannot build the model of {path} in {scope}: {type(e).__name__}: {e}") from e
    from mmengine.model import revert_sync_batchnorm

    model = revert_sync_batchnorm(model)
    meta: dict = {}
    if checkpoint is not None:
        sd, meta = _read_checkpoint(Path(checkpoint))
        try:
            result = model.load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint} does not match the model of {path} (strict={strict}): "
                                  f"{str(e)[:1500]}. Use the checkpoint trained with this config, or strict=False "
                                  f"to load the matching part.") from e
        model.load_report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    dataset_meta = meta.get("dataset_meta")
    if isinstance(dataset_meta, dict):
        model.dataset_meta = {k.lower(): v for k, v in dataset_meta.items()}
    else:
        try:
            classes = cfg.test_dataloader.dataset.metainfo.classes
            model.dataset_meta = {"classes": tuple(classes)}
        except Exception:
            pass
    model.cfg = cfg
    return model.to(device).eval()
