"""mmdet / mmsegmentation integration: the bundled FastestDet and ESPNet models, the bundled COCO and CamVid
subsets as mmdet / mmseg datasets, and loading of users' own mmdet / mmseg configs + checkpoints.

Importing ``rex.mm`` does not import mmdet / mmseg / mmcv; the submodules do (``rex.mm.det``, ``rex.mm.seg``,
``rex.mm.user``). ``register_all()`` registers every rex class in the mmdet and mmseg registries (names
``RexFastestDet``, ``RexCocoDataset``, ``RexESPNetSegmentor``, ``RexCamVidDataset``) so that configs can use them.
"""
from __future__ import annotations

import importlib

from rex.errors import RexError

__all__ = ["available", "require", "register_all", "load_user_model"]

# task -> (the mm package's module that must import, what to install)
_MM_PACKAGE = {"detection": ("mmdet.models", "mmdet 3.x"), "segmentation": ("mmseg.models", "mmsegmentation 1.x")}


def available(task: str = "both") -> bool:
    """True when mmcv (with compiled ops), mmdet and/or mmseg import."""
    try:
        import mmcv.ops  # noqa: F401
        if task in ("both", "detection", "det", "mmdet"):
            import mmdet.models  # noqa: F401
        if task in ("both", "segmentation", "seg", "mmseg"):
            import mmseg.models  # noqa: F401
    except Exception:  # ImportError, or mmcv's version asserts
        return False
    return True


def require(task: str) -> None:
    """Raise a RexError saying what to install unless mmcv (compiled ops) and the task's mm package import."""
    module, package = _MM_PACKAGE[task]
    try:
        import mmcv.ops  # noqa: F401
        importlib.import_module(module)
    except Exception as e:  # ImportError, or mmcv's version asserts
        raise RexError(
            f"{task} evaluation needs mmcv (with compiled ops), mmengine and {package} ({type(e).__name__}: {e}). "
            f"Run `bash workflow/scripts/setup.sh` to install them into .venv.") from e


def register_all() -> None:
    """Register the rex models / datasets in the mmdet and mmseg registries (idempotent)."""
    from rex.mm import det, seg  # noqa: F401  (registration happens at import)


def load_user_model(config_path, checkpoint=None, task=None, device="cpu", strict=True):
    """Build an mmdet / mmseg model from a user's config file (and optionally load a checkpoint).

    See :func:`rex.mm.user.load_user_model`.
    """
    from rex.mm.user import load_user_model as _load

    return _load(config_path, checkpoint=checkpoint, task=task, device=device, strict=strict)
