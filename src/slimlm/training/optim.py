"""Optimizers for the training recipes: torch's AdamW and SGD, and bitsandbytes' 8-bit AdamW.

"adamw8bit" is bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"): the first and second moments of each parameter with at least `min_8bit_size` = 4096
elements are stored as uint8 codes of the dynamic (tree) quantization map (signed for m, unsigned for v)
with one fp32 absmax per block of 256 values, i.e. 2 x (1 byte per value + 4 bytes per block) instead of
2 x 4 bytes per value; smaller tensors (biases, norms) keep fp32 moments. bitsandbytes 0.50.2 runs it on
CPU too (checked: uint8 states, blocks of 256); its paged variant falls back to this on CPU.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError, SlimlmError

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def is_vector(p: Tensor) -> bool:
    """The usual no_decay predicate: biases and norm gains (ndim < 2) get no weight decay."""
    return p.ndim < 2


def param_groups(params: Iterable[Tensor], weight_decay: float,
                 no_decay: Callable[[Tensor], bool] | None = None,
                 lr_scale: Callable[[Tensor], float] | None = None) -> list[dict]:
    """Trainable params split into a group with `weight_decay` and one with none (where no_decay(p) is
    true); params that do not require grad (a frozen base model) are left out; empty groups are dropped.
    With lr_scale, each group is split further by lr_scale(p) (recorded as the group's "lr_scale": the
    schedule's learning rate is multiplied by it)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ConfigError("no parameter requires grad: unfreeze the parameters to train (e.g. the LoRA "
                          "adapters) before building the optimizer")
    plain = [p for p in trainable if no_decay is not None and no_decay(p)]
    plain_ids = {id(p) for p in plain}
    decay = [p for p in trainable if id(p) not in plain_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if lr_scale is None:
        return groups
    out = []
    for g in groups:
        scales = sorted({lr_scale(p) for p in g["params"]})
        out += [{**g, "params": [p for p in g["params"] if lr_scale(p) == k], "lr_scale": k} for k in scales]
    return out


def _fusable(params: list[Tensor]) -> bool | None:
    """True where torch's fused AdamW takes every tensor (one device type, CPU or CUDA; float dtypes): one
    kernel over each tensor instead of a dozen elementwise passes, where on CPU torch would otherwise run
    its per-tensor loop (several times slower: bench/RESULTS.md). None leaves torch's default."""
    kinds = {p.device.type for p in params}
    ok = len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return True if ok else None


def make_optimizer(params: Iterable[Tensor], name: Literal["adamw", "adamw8bit", "sgd"] = "adamw", *,
                   lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, momentum: float = 0.9,
                   no_decay: Callable[[Tensor], bool] | None = None,
                   lr_scale: Callable[[Tensor], float] | None = None) -> torch.optim.Optimizer:
    """An optimizer over the trainable tensors of `params` (those with requires_grad).

    name: "adamw" (torch.optim.AdamW), "adamw8bit" (bitsandbytes' AdamW8bit, see the module docstring) or
    "sgd" (torch.optim.SGD with `momentum`). AdamW's weight decay is decoupled (p -= lr * wd * p); SGD's is
    L2 (wd * p added to the gradient), as torch implements them. betas/eps apply to the Adam variants only.
    no_decay: params for which it returns true get weight_decay 0 (pass `is_vector` for nanoGPT's rule:
    decay only tensors of dim >= 2). The lr set here is the base; a schedule (core.optim.lr_at) overwrites
    each group's "lr" before each step.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr < 0 or weight_decay < 0:
        raise ConfigError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
    groups = param_groups(params, weight_decay, no_decay, lr_scale)
    if name == "sgd":
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"betas must be in [0, 1), got {betas}")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=_fusable([p for g in groups for p in g["params"]]))
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SlimlmError("the adamw8bit optimizer needs bitsandbytes: pip install 'bitsandbytes>=0.50'") from None
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
