"""What the mmdet (``rex.mm.det``) and mmseg (``rex.mm.seg``) wrappers share. Torch only: no mm* import here."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch.nn as nn

from rex.errors import DatasetError
from rex.paths import data_root as _data_root


def wrapped_net(net: Union[nn.Module, dict, None], weights_path: Optional[str],
                build: Callable[..., nn.Module]) -> nn.Module:
    """The network a wrapper holds: ``net`` itself, or ``build(**net)`` (``weights_path`` overriding the bundled
    checkpoint) when ``net`` is a dict of builder arguments or None (the bundled model)."""
    if isinstance(net, nn.Module):
        return net
    kw = dict(net or {})
    if weights_path is not None:
        kw["weights_path"] = weights_path
    return build(**kw)


class InferenceOnly:
    """Mixin for the mm model wrappers: the wrapped network is pretrained or quantized, and the pipeline is
    data-free, so weights are never re-initialised and there is no training loss. ``REGISTRY_NAME``: the name
    the class is registered under (used in the error)."""

    REGISTRY_NAME = "this model"

    def init_weights(self):  # never re-initialise the wrapped (pretrained or quantized) network
        pass

    def loss(self, *args, **kwargs):
        raise NotImplementedError(f"{self.REGISTRY_NAME} is inference-only (the rex pipeline is data-free: no training)")


def subset_dir(data_root: Union[str, Path, None], name: str, complete: Callable[[Path], bool], what: str,
               expected: str) -> Path:
    """The folder of a bundled subset: ``data_root`` itself or ``data_root/<name>``, whichever is ``complete``."""
    root = Path(data_root) if data_root is not None else _data_root()
    for cand in (root, root / name):
        if complete(cand):
            return cand
    raise DatasetError(
        f"{what} subset not found under {root}: expected {expected} there or in "
        f"{root / name}. Set REX_DATA_ROOT to the shared data folder or pass data_root=.")
