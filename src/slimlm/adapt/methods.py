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

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..calibration import find_blocks
from ..errors import ConfigError
from ..registry import register
from ..training.plan import TrainPlan
from .lora import LoRAConfig, add_lora, lora_parameters

log = logging.getLogger(__name__)


@dataclass
class TrainContext:
    """What a method may need besides the model and its config."""
    tokenizer: object = None
    model_ref: str | None = None
    seed: int = 0
    seqlen: int | None = None
    total_steps: int | None = None
    teacher: nn.Module | None = None          # distillation: the frozen teacher
    teacher_cache: dict | None = None         # distillation from a teacher-logit cache: its metadata
    lr: float | None = None                   # the run's peak learning rate
    data: object = None                       # the training data (TrainData), for a method's own start


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
    """Train every float parameter of `trainable` (None: the whole model). Linear layers of a pruned model
    (their weights mostly exact zeros) keep their zeros: after every step the pruned weights are zeroed
    again, so fine-tuning recovers quality without undoing the sparsity."""
    sparse = _sparse_masks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    mods = [model] if trainable is None else trainable
    for m in mods:
        for p in m.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    names = {id(p): n for n, p in model.named_parameters()}       # tied weights: the first name
    params = {names[id(p)]: p for m in mods for p in m.parameters() if p.requires_grad}
    if not sparse:
        return TrainPlan(params=params, save=_save_model, info=info)

    def keep_zeros(step: int) -> None:
        with torch.no_grad():
            for w, keep in sparse:
                w.masked_fill_(~keep, 0)

    return TrainPlan(params=params, save=_save_model, after_step=keep_zeros,
                     info={**info, "sparse_layers_kept": len(sparse)})


def _sparse_masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, keep-mask) of each float linear of the decoder blocks that looks pruned."""
    from ..calibration.common import is_linear
    from ..pruning.storage import is_sparse, nonzero_mask

    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return []
    return [(m.weight, nonzero_mask(m.weight.detach())) for m in blocks.modules()
            if is_linear(m) and m.weight.is_floating_point() and is_sparse(m.weight.detach())]


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
    residual = None
    if config.init_from is not None:
        residual = _lora_from_reference(model, config, ctx)

    def save(model: nn.Module, tokenizer, folder: Path) -> None:
        save_peft(model, folder, "default", base_model_ref=ctx.model_ref)

    info = {"method": "lora", **asdict(config), "adapted_layers": len(layers),
            "quantized_base_layers": len(packed)}
    if residual:
        info["init_residual_left_mean"] = sum(residual.values()) / len(residual)
    return TrainPlan(params=lora_parameters(model, "default"), save=save, info=info)


def _lora_from_reference(model: nn.Module, config: LoRAConfig, ctx: TrainContext) -> dict[str, float]:
    """LoRAConfig.init_from: the reference model loaded, the first init_samples windows of the training data
    (the same on every process), adapter A, B set from the residual (adapt.lora.init_from_reference)."""
    from ..models import load_model
    from .lora import init_from_reference

    if ctx.data is None or len(ctx.data) == 0:
        raise ConfigError("--init-from needs training data to weight the fit by the layers' inputs")
    ids, masks, i = [], [], 0
    while sum(x.shape[0] for x in ids) < config.init_samples and i < len(ctx.data):
        b = ctx.data.batch(i)
        ids.append(b["input_ids"])
        masks.append(b.get("attention_mask", torch.ones_like(b["input_ids"])))
        i += 1
    width = max(x.shape[1] for x in ids)                  # instruction batches: each padded to its own width
    windows = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in ids])[:config.init_samples]
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])[:config.init_samples]
    reference = load_model(config.init_from, device=next(model.parameters()).device)
    left = init_from_reference(model, reference, "default", windows, None if bool(mask.all()) else mask)
    del reference
    log.info("adapter started from %s: %.1f%% of the input-weighted residual left on average", config.init_from,
             100 * sum(left.values()) / max(len(left), 1))
    return left


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

        loss = None if rt.prompt.makes_kv else rt.lm_loss()
        if getattr(config, "prompt_teacher", None):
            from ..models import load_model
            teacher = load_model(config.prompt_teacher, device=next(model.parameters()).device)
            teacher.requires_grad_(False)
            loss = PR.teacher_kl_loss(teacher)
        return TrainPlan(params=params, save=save, loss=loss, info={"method": name, **asdict(config)})


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


# ------------------------------------------------------------------------------------------ QAT, LayerDrop
@dataclass
class QATConfig:
    bits: int = field(default=4, metadata={"help": "qat: bits per weight, 2..8"})
    group_size: int = field(default=64, metadata={"help": "qat: input columns sharing one scale (-1: per "
                                                          "output channel)"})
    symmetric: bool = field(default=False, metadata={"help": "qat: symmetric grid (zero point fixed)"})
    lora_r: int = field(default=0, metadata={
        "help": "qat: 0 trains the full weights; r > 0 freezes them and trains a rank-r update B A inside the "
                "rounding (LoRA on the fake-quantized base), saved merged and packed"})
    lora_alpha: float = field(default=16.0, metadata={"help": "qat: the update is scaled by lora_alpha / lora_r"})

    def rtn(self):
        from ..quant.configs import RTNConfig
        return RTNConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def __post_init__(self) -> None:
        self.rtn()                                        # the quantization config's own checks
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r is a rank >= 1, or 0 to train the full weights (got {self.lora_r})")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive (got {self.lora_alpha})")


@register("train", "qat", QATConfig, needs_data=True,
          help="quantization-aware training (straight-through) of the full weights or of a LoRA update inside the "
               "rounding, from the float model (RTN grid) or from a packed RTN/GPTQ/AWQ model (its grid, its codes "
               "at step 0); saved as packed layers")
def prepare_qat_method(model: nn.Module, config: QATConfig, ctx: TrainContext) -> TrainPlan:
    """Every target linear becomes a FakeQuantLinear (quant.qat) computing with Q(W) and passing the gradient
    straight through the rounding; the float weights (and the rest of the model) train; saving converts the
    fake-quantized layers into slimlm's packed layers, whose weights are exactly those the fake layers used.
    On a float model Q is round-to-nearest on each group's current min/max (--bits, --group-size); on a model
    slimlm quantized with RTN or GPTQ the grid stays the stored one and training starts from its codes (the
    quantized model's own perplexity at step 0), and --bits / --group-size are the base's (AWQ's input
    scales stay). With --lora-r only the rank-r updates inside the rounding train (quant.qat add_lora)."""
    from ..formats.native import runtime_modules
    from ..quant.qat import FakeQuantLinear, convert_qat, prepare_qat, qat_from_packed

    info = {"method": "qat", **asdict(config)}
    if runtime_modules(model):
        info["from_packed_layers"] = qat_from_packed(model)
        _check_float(model, "quantization-aware")        # nothing packed may be left (NF4, int8)
    else:
        prepare_qat(model, config.rtn())

    def save(model: nn.Module, tokenizer, folder: Path) -> None:
        convert_qat(model)
        _save_model(model, tokenizer, folder)

    if not config.lora_r:
        plan = _plan(model, None, info)
        plan.save = save
        return plan
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(ctx.seed)
    params = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            A, B = m.add_lora(config.lora_r, config.lora_alpha, generator=g)
            params[f"{name}.lora_A"], params[f"{name}.lora_B"] = A, B
    return TrainPlan(params=params, save=save, info={**info, "adapted_layers": len(params) // 2})


@dataclass
class LayerDropConfig:
    layerdrop: float = field(default=0.2, metadata={
        "help": "layerdrop: probability that a decoder layer is skipped in a training forward pass"})

    def __post_init__(self) -> None:
        if not 0 < self.layerdrop < 1:
            raise ConfigError(f"--layerdrop must be in (0, 1) (got {self.layerdrop})")


@register("train", "layerdrop", LayerDropConfig, needs_data=True,
          help="full fine-tuning with LayerDrop: any subset of layers can be cut out afterwards")
def prepare_layerdrop(model: nn.Module, config: LayerDropConfig, ctx: TrainContext) -> TrainPlan:
    """Fan et al. 2019 ("Reducing Transformer Depth on Demand with Structured Dropout"): in training mode each
    decoder layer is skipped (its input passed on) with probability p, drawn from torch's generator, so a
    checkpoint and --resume draw the same layers; in eval mode every layer runs. The model trained this way
    keeps its quality when layers are removed afterwards (slimlm.adapt.methods.cut_layers)."""
    _check_float(model, "LayerDrop")
    _, blocks = find_blocks(model)
    shapes = _output_shapes(model, blocks)
    for block, shape in zip(blocks, shapes):
        block.forward = _droppable(block, config.layerdrop, shape)

    def save(model: nn.Module, tokenizer, folder: Path) -> None:
        for block in blocks:
            block.__dict__.pop("forward", None)           # the class's plain forward again
        _save_model(model, tokenizer, folder)

    plan = _plan(model, None, {"method": "layerdrop", **asdict(config)})
    plan.save = save
    return plan


def _output_shapes(model: nn.Module, blocks: nn.ModuleList) -> list[int]:
    """What each decoder layer returns, seen on a one-token forward pass: 0 for the hidden states alone
    (transformers 5), n for a tuple of n (older layers, GPT-2's)."""
    seen: dict[int, int] = {}

    def record(i: int):
        def hook(module: nn.Module, args: tuple, out) -> None:
            seen.setdefault(i, len(out) if isinstance(out, tuple) else 0)
        return hook

    hooks = [b.register_forward_hook(record(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [seen.get(i, 0) for i in range(len(blocks))]


def _droppable(block: nn.Module, p: float, shape: int):
    plain = block.forward

    def forward(*args, **kwargs):
        if block.training and float(torch.rand(())) < p:      # skipped: the input goes on unchanged
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) + (None,) * (shape - 1) if shape else hidden
        return plain(*args, **kwargs)
    return forward


def cut_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only decoder layers `keep` (0-based, in order), in place: the depth cut LayerDrop prepares for."""
    from ..pruning.structured import keep_layers

    _, blocks = find_blocks(model)
    if not keep or any(not 0 <= i < len(blocks) for i in keep):
        raise ConfigError(f"layers to keep must be in 0..{len(blocks) - 1}")
    keep_layers(model, blocks, sorted(set(keep)))
    return model


def _register_intrinsic() -> None:
    from . import intrinsic as ID

    register("train", "intrinsic", ID.IntrinsicConfig, needs_data=True,
             help="intrinsic-dimension training: theta_0 + P theta_d, P Fastfood (SAID scalars)")(ID.prepare)


_register_intrinsic()
