"""Training methods registered for `slimlm train` and `slimlm.training`: each prepares the model and hands the
loop a TrainPlan (slimlm.training.plan).

    full   every weight of the model (the baseline the parameter-efficient methods are judged against)
    top    the top N decoder layers (and the final norm) only
    lora   LoRA / DoRA / rsLoRA adapters (slimlm.adapt.lora) on the chosen linear layers of any base slimlm
           loads, quantized bases included (QLoRA); saved as a PEFT adapter folder (slimlm.adapt.peft_io)
    prompt, ptuning, prefix, ptuning-v2
           soft prompts and prefixes (slimlm.adapt.prompts) on a frozen base of any kind; PEFT folders
    adapter
           Houlsby / Pfeiffer bottleneck adapters (slimlm.adapt.bottleneck); a slimlm adapter folder
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..calibration import find_blocks
from ..errors import ConfigError
from ..registry import register
from ..training.plan import TrainPlan
from .lora import LoRAConfig, add_lora, lora_parameters


@dataclass
class TrainContext:
    """What a method may need besides the model and its config."""
    tokenizer: object = None
    model_ref: str | None = None
    seed: int = 0
    seqlen: int | None = None


@dataclass
class FullConfig:
    """Full fine-tuning: no settings of its own."""


@dataclass
class TopConfig:
    layers: int = field(default=2, metadata={"help": "top: decoder layers trained, counted from the last"})

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"--layers must be at least 1 (got {self.layers})")


def _check_float(model: nn.Module, method: str) -> None:
    from ..formats.native import runtime_modules

    packed = list(runtime_modules(model))
    if packed:
        raise ConfigError(f"{method} fine-tuning trains float weights, but {packed[0]} is a packed quantized layer; "
                          "train adapters on a quantized base instead (--method lora)")


def _save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    from ..models import save_model

    save_model(model, tokenizer, folder)


def _plan(model: nn.Module, trainable: list[nn.Module] | None, info: dict) -> TrainPlan:
    for p in model.parameters():
        p.requires_grad_(False)
    mods = [model] if trainable is None else trainable
    for m in mods:
        for p in m.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    names = {id(p): n for n, p in model.named_parameters()}       # tied weights: the first name
    params = {names[id(p)]: p for m in mods for p in m.parameters() if p.requires_grad}
    return TrainPlan(params=params, save=_save_model, info=info)


@register("train", "full", FullConfig, needs_data=True, help="full fine-tuning of every weight")
def prepare_full(model: nn.Module, config: FullConfig, ctx: TrainContext) -> TrainPlan:
    _check_float(model, "full")
    return _plan(model, None, {"method": "full"})


@register("train", "top", TopConfig, needs_data=True, help="fine-tuning of the top N decoder layers only")
def prepare_top(model: nn.Module, config: TopConfig, ctx: TrainContext) -> TrainPlan:
    _check_float(model, "top-layers")
    _, blocks = find_blocks(model)
    if config.layers > len(blocks):
        raise ConfigError(f"--layers {config.layers} is more than the model's {len(blocks)} decoder layers")
    mods = list(blocks[len(blocks) - config.layers:])
    norm = _final_norm(model, blocks)
    if norm is not None:
        mods.append(norm)
    return _plan(model, mods, {"method": "top", **asdict(config)})


@register("train", "lora", LoRAConfig, needs_data=True,
          help="LoRA / DoRA / rsLoRA adapters on a float or quantized base (QLoRA), saved as a PEFT folder")
def prepare_lora(model: nn.Module, config: LoRAConfig, ctx: TrainContext) -> TrainPlan:
    from ..formats.native import runtime_modules
    from .peft_io import save_peft

    for p in model.parameters():
        p.requires_grad_(False)
    layers = add_lora(model, config, "default", seed=ctx.seed)
    packed = runtime_modules(model)

    def save(model: nn.Module, tokenizer, folder: Path) -> None:
        save_peft(model, folder, "default", base_model_ref=ctx.model_ref)

    info = {"method": "lora", **asdict(config), "adapted_layers": len(layers),
            "quantized_base_layers": len(packed)}
    return TrainPlan(params=lora_parameters(model, "default"), save=save, info=info)


def _final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied after the last decoder layer (model.norm, transformer.ln_f, ...), if any."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        m = getattr(base, name, None) or getattr(getattr(base, "decoder", None), name, None)
        if isinstance(m, nn.Module) and m not in blocks.modules():
            return m
    return None


def _prompt_method(name: str, config_cls: type, help: str) -> None:
    from . import prompts as PR

    @register("train", name, config_cls, needs_data=True, help=help)
    def prepare(model: nn.Module, config, ctx: TrainContext) -> TrainPlan:
        if ctx.seqlen is not None:
            PR.check_fits(model, config.num_virtual_tokens, ctx.seqlen)
        for p in model.parameters():
            p.requires_grad_(False)
        prompt = PR.build(model, name, config, tokenizer=ctx.tokenizer, seed=ctx.seed)
        rt = PR.install(model, prompt, name)
        params = {f"prompt.{k}": p for k, p in rt.prompt.named_parameters()}

        def save(model: nn.Module, tokenizer, folder: Path) -> None:
            PR.save_prompt(model, folder, base_model_ref=ctx.model_ref)

        return TrainPlan(params=params, save=save, info={"method": name, **asdict(config)})


def _register_prompts() -> None:
    from . import prompts as PR

    _prompt_method("prompt", PR.PromptConfig, "prompt tuning: trainable soft-prompt embeddings; a PEFT folder")
    _prompt_method("ptuning", PR.PTuningConfig, "P-tuning: a soft prompt from an MLP / LSTM prompt encoder; a PEFT "
                   "folder")
    _prompt_method("prefix", PR.PrefixConfig, "prefix tuning: keys and values at every layer through an MLP, saved "
                   "folded; a PEFT folder")
    _prompt_method("ptuning-v2", PR.PTuningV2Config, "P-tuning v2: deep prompts (keys and values at every layer); "
                   "a PEFT folder")


_register_prompts()


def _register_bottleneck() -> None:
    from . import bottleneck as BN

    @register("train", "adapter", BN.BottleneckConfig, needs_data=True,
              help="Houlsby / Pfeiffer bottleneck adapters; a slimlm adapter folder")
    def prepare_adapter(model: nn.Module, config: BN.BottleneckConfig, ctx: TrainContext) -> TrainPlan:
        for p in model.parameters():
            p.requires_grad_(False)
        rt = BN.add_bottleneck(model, config, seed=ctx.seed)
        params = {f"adapter.{k}": p for k, p in rt.adapters.named_parameters()}

        def save(model: nn.Module, tokenizer, folder: Path) -> None:
            BN.save_bottleneck(model, folder, base_model_ref=ctx.model_ref)

        return TrainPlan(params=params, save=save, info={"method": "adapter", **asdict(config),
                                                         "bottleneck_size": rt.config["bottleneck_size"],
                                                         "adapted_modules": len(rt.handles)})


_register_bottleneck()
