"""Getting and replacing submodules by dotted name (eager module swapping)."""
from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
