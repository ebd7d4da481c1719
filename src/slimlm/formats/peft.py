"""An adapter folder (adapter_config.json + adapter_model.safetensors: PEFT LoRA/DoRA, prompt tuning,
P-tuning, prefix tuning, or slimlm's bottleneck adapters) as a model reference, and PEFT's LoRA folder as the
way a model holding LoRA adapters is written.

Loading recognises a folder with adapter_config.json and no config.json: the base it names
(base_model_name_or_path, any reference slimlm loads) is loaded, then the adapter onto it
(slimlm.adapt.peft_io). Saving writes the model's one adapter, not the base: the default for a model that
holds LoRA layers, since a base folder cannot hold them (the other formats refuse such a model).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import SlimlmError
from ..registry import Format, register_format


def recognise(path: Path, config: dict | None) -> bool:
    return config is None and path.is_dir() and (path / "adapter_config.json").is_file()


def load(path: Path, **options) -> nn.Module:
    from ..adapt.loading import load_adapter
    from ..adapt.peft_io import read_adapter_config
    from ..models import load_model

    base = read_adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise SlimlmError(f"{path} names no base model (base_model_name_or_path); load the base with --model and "
                          f"the adapter with --adapter {path}")
    model = load_model(str(base), **{k: v for k, v in options.items() if k in ("dtype", "trust_remote_code")})
    load_adapter(model, path)
    return model.eval()


def _names(model: nn.Module) -> list[str]:
    from ..adapt.lora import adapter_names

    return adapter_names(model)


def save(model: nn.Module, tokenizer, folder: Path, name: str | None = None) -> None:
    from ..adapt.peft_io import save_peft

    names = _names(model)
    save_peft(model, folder, name or names[0], base_model_ref=getattr(model, "slimlm_ref", None))


def refuses(model: nn.Module) -> str | None:
    names = _names(model)
    if not names:
        return "the model holds no LoRA adapter"
    if len(names) > 1:
        return f"the model holds adapters {names}; save one at a time (name=...)"
    return None


register_format(Format(
    "peft", "a PEFT LoRA/DoRA adapter folder (the adapter only; peft.PeftModel.from_pretrained loads it on "
    "its base)", recognise=recognise, load=load, save=save, refuses=refuses, default_rank=-1))
