"""A plain transformers folder (config.json + safetensors), as `save_pretrained` writes it and every tool
loads. The default for a model without compressed layers."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..calibration import is_linear
from ..registry import Format, register_format


def auto_class(config):
    """The transformers Auto class for a folder's config: a causal LM with its head, an encoder whose
    `architectures` names a ...ForMaskedLM with its masked-LM head, anything else (BertModel, ...) bare."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False):
        if not archs or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            return AutoModelForCausalLM
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and any(a.endswith("ForMaskedLM") for a in archs):
        return AutoModelForMaskedLM
    return AutoModel


def recognise(path: Path, config: dict | None) -> bool:
    return config is not None


def load(where: Path | str, dtype: torch.dtype | None = None, trust_remote_code: bool = False, **_) -> nn.Module:
    """from_pretrained with the class auto_class picks (a local folder or a hub id), in `dtype` (fp32 by
    default), safetensors only."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    return auto_class(config).from_pretrained(str(where), dtype=dtype or torch.float32, use_safetensors=True,
                                              trust_remote_code=trust_remote_code)


def save(model: nn.Module, tokenizer, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def refuses(model: nn.Module) -> str | None:
    from .folder import adapter_refusal
    from .native import runtime_modules

    if adapter_refusal(model):
        return adapter_refusal(model)
    packed = list(runtime_modules(model))
    if packed:
        return (f"{packed[0]} (and {len(packed) - 1} more) is a packed quantized layer, which a plain folder "
                "cannot hold; use the slimlm, gptq, compressed-tensors or bitsandbytes format")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "slimlm_structured", None):
        return "its layers have different sizes (non-uniform structured pruning), which transformers cannot load"
    return None


def suits(model: nn.Module) -> bool:
    """Not for a pruned model: a plain folder stores its zeros (the slimlm format encodes them)."""
    from ..pruning.storage import is_sparse

    return not any(is_linear(m) and is_sparse(m.weight.detach()) for m in model.modules())


register_format(Format(
    "hf", "a plain transformers folder (safetensors); sparse weights are written dense",
    recognise=recognise, load=load, save=save, refuses=refuses, suits=suits, default_rank=0, catch_all=True))
