"""What the folder formats share: the model's config with a quantization config, its tensors without tied
duplicates, the skeleton weights are loaded into, and the final load-and-check."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import SlimlmError
from ..modules import config_dtype

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimlmError(f"{path} is not valid JSON ({e}); fix or re-create it") from None


def quantization_config(config: dict | None) -> dict:
    """The `quantization_config` of a parsed config.json (empty if none)."""
    return (config or {}).get("quantization_config") or {}


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors sharing storage (tied weights); the rest detached, contiguous, on CPU."""
    seen: set[tuple] = set()
    out = {}
    for k, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().cpu().contiguous()
    return out


def param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def config_copy(model: nn.Module, quantization: dict | None = None, untie: bool = False, **extra):
    """A copy of model.config for writing: its dtype the model's, `quantization` as quantization_config,
    untied when the output layer is stored apart from the embeddings, `extra` attributes set."""
    config = copy.deepcopy(model.config)
    config.dtype = param_dtype(model)
    if untie and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    if quantization is not None:
        config.quantization_config = quantization
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
    for k, v in extra.items():
        setattr(config, k, v)
    return config


def write_folder(model: nn.Module, tokenizer, folder: Path, tensors: dict[str, torch.Tensor], config,
                 metadata: dict[str, str] | None = None) -> None:
    """Write weights, config, generation config and tokenizer into an existing folder."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    config.save_pretrained(str(folder))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except ValueError as e:          # an invalid generation config is not worth failing the save
            log.warning("generation_config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def read_config(folder: Path, quant_method: str):
    """AutoConfig of `folder` without its quantization_config, and that quantization_config as a dict
    (checked to be `quant_method`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict() if qcfg is not None else {}
    if qcfg.get("quant_method") != quant_method:
        raise SlimlmError(f"{folder} is not a {quant_method} checkpoint "
                          f"(quant_method={qcfg.get('quant_method')!r})")
    if hasattr(config, "quantization_config"):
        del config.quantization_config           # the layers become slimlm's; no loader-side quantizer
    return config, qcfg


def empty_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model built from config with parameters on the meta device (buffers real, e.g. rotary)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or config_dtype(config))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files (single file or shards)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"{folder} holds no .safetensors file")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def finish_loading(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> nn.Module:
    """load_state_dict(assign=True), re-tie, and check that every tensor was used and nothing is left on the
    meta device (tied weights may be absent from `state`)."""
    try:
        res = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:                     # shape mismatches, reported by a module or by torch
        msg = " ".join(str(e).split())
        raise SlimlmError(f"{folder}: the weights do not fit the model built from config.json ({msg[:300]})") \
            from None
    if res.unexpected_keys:
        raise SlimlmError(f"{folder}: unexpected tensors {res.unexpected_keys[:5]} "
                          "(does config.json match the weights?)")
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in res.missing_keys if k not in params or id(params[k]) not in loaded]
    left = missing + [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SlimlmError(f"{folder}: no weights for {left[:5]}; the checkpoint is incomplete")
    gen = folder / "generation_config.json"
    if gen.is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def adapter_refusal(model: nn.Module) -> str | None:
    """Why a folder of the base's weights cannot hold this model: it holds LoRA adapter layers."""
    from ..adapt.lora import lora_layers

    names = list(lora_layers(model))
    if names:
        return (f"{names[0]} (and {len(names) - 1} more) carries a LoRA adapter; save the adapter (format peft) "
                "or merge it into the base first (slimlm merge, slimlm.merge)")
    return None
