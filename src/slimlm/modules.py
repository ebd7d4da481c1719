"""Model surgery shared by the methods and the formats."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def config_dtype(config) -> torch.dtype:
    """The dtype a config.json records for its weights (float32 when it records none)."""
    import torch

    v = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, v) if isinstance(v, str) else v
