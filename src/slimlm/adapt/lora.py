"""LoRA / DoRA runtime: `LoRALinear` wraps a linear-like layer of a model and adds named low-rank adapters.

For a base layer y = x W^T + b (W (out, in)) and one adapter A (r, in), B (out, r):

    LoRA (Hu et al. 2021):      y = base(x) + s * (dropout(x) A^T) B^T,   s = alpha / r
    rsLoRA (Kalajdzievski 2023): s = alpha / sqrt(r)
    DoRA (Liu et al. 2024, eq. 5): W' = m * (W + s B A) / ||W + s B A||_c, computed without W' as
        g = m / ||W + s B A||_c  (out,),  the norm a constant in the backward (the paper's Sec. 4.3, as PEFT)
        y = base(x) + (g - 1) * (base(x) - b) + g * s * (x A^T) B^T              (= x W'^T + b)
      with dropout active (training, p > 0), PEFT's form, which this follows so that logits agree:
        y = base(x) + (g - 1) * (x_d W^T) + g * s * (x_d A^T) B^T,   x_d = dropout(x)

The base term is always the base layer's own forward (QuantLinear, NF4Linear, Int8Linear compute from their
packed storage and pass the gradient to x). DoRA's norm needs W: a quantized base dequantizes it at each
call (base.dequantize_weight()); no float copy is kept. A starts random (seeded), B at zero, and m at
||W||_c, so a fresh adapter computes exactly the base layer. The math is slimlm.core.lora.

The base of a wrapped layer sits at `<layer>.base`, its adapters at `<layer>.adapters.<name>` in the model's
state_dict; lora_parameters() and slimlm.adapt.peft_io give the adapter tensors under stable names.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.adapt.layer import (
    LINEAR_KINDS,
    LoRAAdapter,
    LoRALinear,
    base_weight,
    device_of,
    is_linear_like,
    linear_dims,
)
from slimlm.calibration.common import find_blocks
from slimlm.core.lora import dora_magnitude_init, init_lora
from slimlm.errors import ConfigError
from slimlm.quant.targets import check_matches, set_submodule
from slimlm.selection import PATTERN_HELP, name_matches, split_list

__all__ = ["LoRAConfig", "LoRALinear", "LoRAAdapter", "add_lora", "lora_parameters", "set_adapter",
           "disable_adapters", "enable_adapters", "delete_adapter", "adapter_names", "merge_lora",
           "unmerge_lora", "remove_lora", "lora_layers", "adapter_layers", "linear_like_layers", "select_targets",
           "attach", "check_new_name", "init_from_reference"]

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian")


@dataclass
class LoRAConfig:
    """One LoRA / DoRA adapter: rank, scaling, dropout, which layers, initialisation."""
    r: int = field(default=8, metadata={"help": "rank of the update B A; each target layer gets r * (in + out) "
                                                "trainable weights"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: the update is scaled by "
                                                         "alpha / r (alpha / sqrt(r) with rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability on the adapter's input while "
                                                          "training, in [0, 1)"})
    targets: str = field(default="q_proj,v_proj", metadata={
        "help": f"comma-separated layer-name patterns ({PATTERN_HELP}), or 'all-linear': every linear layer "
                "of the transformer blocks (not lm_head nor embeddings)"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised LoRA: scale by alpha / sqrt(r)"})
    dora: bool = field(default=False, metadata={"help": "DoRA: also learn a magnitude per output row"})
    init: str = field(default="kaiming", metadata={"help": "initialisation of A: 'kaiming' (uniform, "
                                                           "nn.Linear's) or 'gaussian' (N(0, 1/r^2)); B "
                                                           "always starts at zero"})
    init_from: str | None = field(default=None, metadata={
        "help": "a float model (folder or name) with the same layers, for instance the one a quantized base was "
                "made from: A and B start as the rank-r update that brings each layer closest to that model's "
                "weights, weighted by the layer's inputs on the first training windows (LoftQ / QERA); without "
                "it the adapter starts at zero. Keep such an adapter beside its base: merging it into a quantized "
                "grid rounds the start away again"})
    init_samples: int = field(default=16, metadata={"help": "with init_from: training windows whose layer "
                                                            "inputs weight the fit"})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (typical: 8, 16, 64), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number (typical: 2 * r), got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be a probability in [0, 1) (typical: 0 or 0.05), got {self.dropout!r}")
        pats = split_list(self.targets)
        if not pats:
            raise ConfigError(f"targets is empty: give layer-name patterns such as 'q_proj,v_proj' "
                              f"({PATTERN_HELP}) or '{ALL_LINEAR}'")
        if ALL_LINEAR in pats and len(pats) > 1:
            raise ConfigError(f"targets '{ALL_LINEAR}' selects every linear layer of the blocks already; give "
                              f"it alone or list patterns instead, got {self.targets!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_from is not None and self.dora:
            raise ConfigError("init_from starts B A at the residual of plain LoRA; DoRA's magnitude has no such "
                              "start: drop --dora or --init-from")
        if isinstance(self.init_samples, bool) or not isinstance(self.init_samples, int) or self.init_samples < 1:
            raise ConfigError(f"init_samples must be a positive number of windows, got {self.init_samples!r}")

    def target_patterns(self) -> list[str] | None:
        """The name patterns, or None for 'all-linear'."""
        pats = split_list(self.targets)
        return None if pats == [ALL_LINEAR] else pats



# ------------------------------------------------------------------------------------------ model level
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> every LoRALinear of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_like_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every layer an adapter can go on: linear-like layers and LoRALinear wrappers (not
    the base inside a wrapper), in module order."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for n, m in model.named_modules():
        if inside and n.startswith(inside[-1]):
            continue
        if isinstance(m, LoRALinear):
            inside.append(n + ".")
        if isinstance(m, LoRALinear) or is_linear_like(m):
            out[n] = m
    return out


def _unwrapped(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, LoRALinear) else m


def _all_linear(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """'all-linear': the layers inside the transformer blocks; where no blocks are found (find_blocks sees
    nn.Linear / Conv1D only, so a fully quantized model), every layer but the output layer and any layer
    sharing an embedding's weight (PEFT's definition)."""
    try:
        prefix: str | None = find_blocks(model)[0] + "."
    except ValueError:
        prefix = None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, m in layers.items()
            if (prefix is None or n.startswith(prefix)) and _unwrapped(m) is not out
            and id(getattr(_unwrapped(m), "weight", None)) not in emb]


def _check_pattern(model: nn.Module, pattern: str, names: list[str]) -> None:
    if any(name_matches(n, pattern) for n in names):
        return
    other = next((n for n, _ in model.named_modules() if n and name_matches(n, pattern)), None)
    if other is not None:
        kind = type(model.get_submodule(other)).__name__
        raise ConfigError(f"targets pattern {pattern!r} names {other} ({kind}), which is not a linear layer: "
                          f"LoRA wraps {LINEAR_KINDS} (linear layers look like {names[0]})")
    check_matches(pattern, names, "targets")


def select_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """The layers `config.targets` selects (name -> linear-like layer or existing wrapper); raises
    ConfigError for a pattern that selects no linear layer."""
    layers = linear_like_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no linear layer to put an adapter on")
    patterns = config.target_patterns()
    if patterns is None:
        chosen = _all_linear(model, layers)
    else:
        for p in patterns:
            _check_pattern(model, p, list(layers))
        chosen = [n for n in layers if any(name_matches(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"targets {config.targets!r} selects no linear layer of {type(model).__name__}")
    return {n: layers[n] for n in chosen}


def check_new_name(model: nn.Module, name: str) -> None:
    """ConfigError unless `name` can name a new adapter of `model`."""
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"an adapter name must be a non-empty string without dots, got {name!r}")
    if name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named {name!r}; pick another name or "
                          f"delete_adapter(model, {name!r}) first")


def attach(model: nn.Module, name: str, adapters: dict[str, LoRAAdapter]) -> None:
    """Put adapter `name` on each named layer (wrapping it in a LoRALinear unless it is one), freeze every
    parameter of the model, and make `name` the active and only trainable adapter."""
    for n, a in adapters.items():
        m = model.get_submodule(n)
        w = m if isinstance(m, LoRALinear) else LoRALinear(m)
        w.adapters[name] = a.to(device_of(w.base))
        if w is not m:
            set_submodule(model, n, w)
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, name)


def add_lora(model: nn.Module, config: LoRAConfig, name: str = "default", *, seed: int = 0) -> list[str]:
    """Add adapter `name` to every layer `config.targets` selects; returns the names of those layers.

    Every check runs before the model changes. The base parameters are frozen and only this adapter's
    parameters train; it becomes the active adapter. A (r, in) is drawn from one torch.Generator seeded with
    `seed`, layer by layer in module order (the same seed gives the same A); B (out, r) is zero; DoRA's
    m (out,) = ||W||_c. Adapter parameters are fp32 on the base layer's device.
    """
    check_new_name(model, name)
    chosen = select_targets(model, config)
    for n, m in chosen.items():
        i, o = linear_dims(_unwrapped(m))
        if config.r > min(i, o):
            raise ConfigError(f"r={config.r} exceeds min(in, out) = {min(i, o)} of {n} ({o} x {i}); pick "
                              f"r <= {min(i, o)} or leave that layer out of targets")
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for n, m in chosen.items():
        base = _unwrapped(m)
        i, o = linear_dims(base)
        A, B = init_lora(o, i, config.r, config.init, generator=gen)
        mag = dora_magnitude_init(base_weight(base).cpu()) if config.dora else None
        adapters[n] = LoRAAdapter(A, B, config.alpha, rslora=config.rslora, dropout=config.dropout,
                                  magnitude=mag, init=config.init)
    attach(model, name, adapters)
    log.info("adapter %r on %d layers (r=%d, %s)", name, len(adapters), config.r, "DoRA" if config.dora else "LoRA")
    return list(chosen)


def init_from_reference(model: nn.Module, reference: nn.Module, name: str, windows: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Start adapter `name` near `reference`: on every layer it adapts, A and B become
    slimlm.core.lora.residual_init of E = W_ref - W_base (W_base dequantized for a packed layer), weighted by
    that layer's inputs on `windows` (N, L) in this model (the base alone: the adapter's start is not yet
    in). A layer whose weight equals the reference's keeps its fresh start. Returns, per layer, the share of
    the input-weighted residual the rank-r update leaves: tr((E - D) H (E - D)^T) / tr(E H E^T)."""
    from slimlm.calibration.common import input_grams
    from slimlm.core.lora import residual_init

    held = adapter_layers(model, name)
    ref_layers = dict(reference.named_modules())
    for n, w in held.items():
        a = w.adapters[name]
        if a.dora:
            raise ConfigError(f"{n}: a DoRA adapter cannot start from a reference model's residual")
        r = ref_layers.get(n)
        if r is None or not is_linear_like(r) or linear_dims(r) != linear_dims(w.base):
            got = "no such layer" if r is None else f"{tuple(reversed(linear_dims(r)))}" if is_linear_like(r) \
                else type(r).__name__
            raise ConfigError(f"--init-from: the reference model's {n} is {got}, the base's "
                              f"{tuple(reversed(linear_dims(w.base)))}; give the model this base was made from")
    grams = input_grams(model, {n: w.base for n, w in held.items()}, windows, attention_mask=attention_mask)
    left = {}
    with torch.no_grad():
        for n, w in held.items():
            a = w.adapters[name]
            E = base_weight(ref_layers[n]) - base_weight(w.base)
            if not bool(E.any()):         # the reference's layer is the base's: keep the fresh start (A random,
                left[n] = 0.0             # B zero), which trains; A = B = 0 would get no gradient at all
                continue
            H = grams[n].to(E.device)
            A, B = residual_init(E, a.r, a.scale, H)
            a.lora_A.copy_(A.to(a.lora_A))
            a.lora_B.copy_(B.to(a.lora_B))
            R = E - a.scale * B @ A
            left[n] = float(((R @ H) * R).sum() / ((E @ H) * E).sum().clamp_min(1e-30))
    return left


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    names: dict[str, None] = {}
    for w in lora_layers(model).values():
        names.update(dict.fromkeys(w.adapters))
    return list(names)


def adapter_layers(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    """The wrappers that hold adapter `name`; ConfigError naming the adapters there are if none does."""
    held = {n: w for n, w in lora_layers(model).items() if name in w.adapters}
    if not held:
        have = ", ".join(adapter_names(model)) or "none"
        raise ConfigError(f"the model has no adapter named {name!r} (adapters: {have})")
    return held


def _refuse_merged(model: nn.Module, action: str) -> None:
    merged = next((k for w in lora_layers(model).values() for k in w.merged), None)
    if merged is not None:
        raise ConfigError(f"adapter {merged!r} is merged into the base weights, so it cannot {action}; "
                          f"unmerge_lora(model, {merged!r}) first")


def lora_parameters(model: nn.Module, name: str = "default") -> dict[str, nn.Parameter]:
    """The parameters of adapter `name`: '<layer>.lora_A' (r, in), '<layer>.lora_B' (out, r) and, for DoRA,
    '<layer>.lora_magnitude' (out,), e.g. 'model.layers.0.self_attn.q_proj.lora_A'."""
    out: dict[str, nn.Parameter] = {}
    for n, w in adapter_layers(model, name).items():
        a = w.adapters[name]
        out[f"{n}.lora_A"], out[f"{n}.lora_B"] = a.lora_A, a.lora_B
        if a.lora_magnitude is not None:
            out[f"{n}.lora_magnitude"] = a.lora_magnitude
    return out


def set_adapter(model: nn.Module, name: str | list[str]) -> None:
    """Make `name` (or several names, whose terms add up) the active adapters; their parameters train,
    the other adapters' are frozen. A merged adapter stays in the weights whatever the active set, until
    unmerge_lora."""
    names = [name] if isinstance(name, str) else list(name)
    for n in names:
        adapter_layers(model, n)
    for w in lora_layers(model).values():
        w.active = [n for n in names if n in w.adapters]
        for k, a in w.adapters.items():
            a.requires_grad_(k in names)


class _Disabled:
    """Adapters off until exit (as a context manager) or until enable_adapters()."""

    def __init__(self, wrappers: list[LoRALinear]) -> None:
        self._saved = [(w, w.disabled) for w in wrappers]
        for w in wrappers:
            w.disabled = True

    def __enter__(self) -> _Disabled:
        return self

    def __exit__(self, *exc: object) -> None:
        for w, was in self._saved:
            w.disabled = was


def disable_adapters(model: nn.Module) -> _Disabled:
    """Compute with the base layers only. `with disable_adapters(model): ...` restores on exit; called
    alone it lasts until enable_adapters(model)."""
    _refuse_merged(model, "be disabled")
    return _Disabled(list(lora_layers(model).values()))


def enable_adapters(model: nn.Module) -> None:
    """Undo disable_adapters: the active adapters compute again."""
    for w in lora_layers(model).values():
        w.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a layer left with no adapter is unwrapped back to its base layer."""
    held = adapter_layers(model, name)
    if any(name in w.merged for w in held.values()):
        _refuse_merged(model, "be deleted")
    for n, w in held.items():
        del w.adapters[name]
        w.active = [k for k in w.active if k != name]
        if not len(w.adapters):
            set_submodule(model, n, w.base)


def merge_lora(model: nn.Module, name: str = "default") -> None:
    """Fold adapter `name` into the float base weights (LoRA: W + s B A; DoRA: W'); the forward then skips
    its term. Quantized bases are refused: merging into them needs re-quantization (`slimlm merge`)."""
    held = adapter_layers(model, name)
    for n, w in held.items():
        if w.quantized:
            raise ConfigError(f"{n} has a quantized base ({type(w.base).__name__}); merging into packed weights "
                              "needs a re-quantization: use `slimlm merge`, which dequantizes, merges and "
                              "quantizes again")
        if name in w.merged:
            raise ConfigError(f"adapter {name!r} is already merged into {n}")
    for w in held.values():
        w.merge(name)


def unmerge_lora(model: nn.Module, name: str = "default") -> None:
    """Take adapter `name` back out of the base weights (to fp32 rounding)."""
    held = adapter_layers(model, name)
    if not all(name in w.merged for w in held.values()):
        raise ConfigError(f"adapter {name!r} is not merged; merge_lora(model, {name!r}) merges it")
    for w in held.values():
        w.unmerge(name)


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base layer (holding merged weights where an adapter was merged);
    parameters keep their requires_grad. Returns the model."""
    for n, w in lora_layers(model).items():
        set_submodule(model, n, w.base)
    return model
