"""Loading any adapter folder slimlm reads onto a base: PEFT's LoRA / DoRA, prompt tuning, P-tuning and prefix
tuning folders, and slimlm's own bottleneck adapters, told apart by their adapter_config.json."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ConfigError
from .peft_io import read_adapter_config

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def adapter_kind(folder: Path | str) -> str:
    """lora | prompt | bottleneck, or a one-line error naming what the folder holds."""
    cfg = read_adapter_config(folder)
    if cfg.get("slimlm_adapter_type") == "bottleneck":
        return "bottleneck"
    kind = cfg.get("peft_type")
    if kind == "LORA":
        return "lora"
    if kind in PROMPT_TYPES:
        return "prompt"
    raise ConfigError(f"{folder} holds a {kind or 'unknown'} adapter; slimlm reads PEFT's LORA, "
                      f"{', '.join(PROMPT_TYPES)} folders and its own bottleneck adapters")


def load_adapter(model: nn.Module, folder: Path | str) -> str:
    """Load the adapter in `folder` onto `model`, everything frozen, for evaluation; returns its kind."""
    kind = adapter_kind(folder)
    if kind == "lora":
        from .peft_io import load_peft
        load_peft(model, folder)
    elif kind == "prompt":
        from .prompts import load_prompt
        load_prompt(model, folder, read_adapter_config(folder))
    else:
        from .bottleneck import load_bottleneck
        load_bottleneck(model, folder, read_adapter_config(folder))
    for p in model.parameters():                  # the base and the loaded adapter: frozen (evaluation)
        p.requires_grad_(False)
    return kind
