"""Learning-rate schedules as a pure function of the step (warmup then cosine / linear decay, as in
nanoGPT's train.py and transformers' get_cosine_with_min_lr_schedule_with_warmup)."""
from __future__ import annotations

import math
from typing import Literal

from ..errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, total: int, warmup: int, base_lr: float,
          schedule: Literal["cosine", "linear", "constant"] = "cosine", min_lr_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based: the number of steps already taken).

    Warmup, step < warmup:   lr = base_lr * step / warmup            (0 at step 0, base_lr at step = warmup)
    Then, with p = (step - warmup) / (total - warmup) clipped to [0, 1] and min_lr = min_lr_ratio * base_lr:
        cosine:   lr = min_lr + (base_lr - min_lr) * (1 + cos(pi p)) / 2
        linear:   lr = min_lr + (base_lr - min_lr) * (1 - p)
        constant: lr = base_lr
    so lr = min_lr at step >= total for the decaying schedules. `total` counts warmup steps too.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if total <= 0:
        raise ConfigError(f"total must be a positive number of optimizer steps, got {total}")
    if not 0 <= warmup <= total:
        raise ConfigError(f"warmup must be in 0..total ({total}), got {warmup}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if base_lr < 0:
        raise ConfigError(f"base_lr must be >= 0, got {base_lr}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return base_lr * step / warmup
    if schedule == "constant":
        return base_lr
    min_lr = min_lr_ratio * base_lr
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return min_lr + (base_lr - min_lr) * decay
