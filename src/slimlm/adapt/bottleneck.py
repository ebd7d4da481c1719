"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al.
2021, "AdapterFusion").

    a(h) = h + W_up f(W_down h + b_down) + b_up        W_down (m, H), W_up (H, m), m = the bottleneck size

placed on a sublayer's output before its residual addition: after the attention's output projection and after
the MLP's down projection (Houlsby), or after the MLP only (Pfeiffer). W_up and b_up start at zero, so at
step 0 the model is exactly the base. The adapters are attached with forward hooks on the output projections,
so any base works (float, packed quantized, GPT-2's Conv1D) and the model's own modules stay untouched.

Saved as a slimlm adapter folder: `adapter_config.json` ({"slimlm_adapter_type": "bottleneck", style,
bottleneck_size, nonlinearity, positions, base_model_name_or_path}) and `adapter_model.safetensors` with
`<position>.down.weight`, `.down.bias`, `.up.weight`, `.up.bias` per adapted module. PEFT has no bottleneck
adapters, so these folders are slimlm's own (`slimlm eval --adapter DIR` loads them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TYPE = "bottleneck"
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_ATTN_OUT = ("o_proj", "out_proj", "c_proj", "dense")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "mlp.w2", "feed_forward.w2", "fc2")
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckConfig:
    style: str = field(default="houlsby", metadata={
        "help": "adapter: houlsby (after attention and after the MLP) or pfeiffer (after the MLP only)"})
    bottleneck_size: int = field(default=0, metadata={
        "help": "adapter: bottleneck width m (0: hidden size / --reduction-factor)"})
    reduction_factor: int = field(default=16, metadata={"help": "adapter: m = hidden size / this, without "
                                                                "--bottleneck-size"})
    nonlinearity: str = field(default="relu", metadata={"help": "adapter: relu, gelu, silu or tanh"})

    def __post_init__(self) -> None:
        if self.style not in ("houlsby", "pfeiffer"):
            raise ConfigError(f"--style takes houlsby or pfeiffer, not {self.style!r}")
        if self.bottleneck_size < 0 or (self.bottleneck_size == 0 and self.reduction_factor < 1):
            raise ConfigError("the bottleneck size must be at least 1: give --bottleneck-size >= 1 or "
                              f"--reduction-factor >= 1 (got {self.bottleneck_size}, {self.reduction_factor})")
        if self.nonlinearity not in _ACTS:
            raise ConfigError(f"--nonlinearity takes {', '.join(_ACTS)}, not {self.nonlinearity!r}")

    def size(self, hidden: int) -> int:
        m = self.bottleneck_size or hidden // self.reduction_factor
        if m < 1:
            raise ConfigError(f"--reduction-factor {self.reduction_factor} leaves no bottleneck for hidden size "
                              f"{hidden}; use a smaller factor or --bottleneck-size")
        return m


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, nonlinearity: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = _ACTS[nonlinearity]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def positions(model: nn.Module, style: str) -> list[str]:
    """The modules whose outputs get an adapter: per block, the attention's output projection (houlsby) and
    the MLP's output projection."""
    from .prefix_cache import layer_list

    name, blocks = layer_list(model)
    out = []
    for i, block in enumerate(blocks):
        found = []
        if style == "houlsby":
            attn = next((f"{a}.{o}" for a in _ATTN for o in _ATTN_OUT if _has(block, f"{a}.{o}")), None)
            if attn is None:
                raise ConfigError(f"bottleneck adapters cannot find the attention output projection in "
                                  f"{type(block).__name__} (looked for {_ATTN[0]}.{_ATTN_OUT[0]} and the like)")
            found.append(attn)
        mlp = next((p for p in _MLP_OUT if _has(block, p)), None)
        if mlp is None:
            raise ConfigError(f"bottleneck adapters cannot find the MLP output projection in {type(block).__name__}"
                              f" (looked for {', '.join(_MLP_OUT[:3])}, ...)")
        found.append(mlp)
        out += [f"{name}.{i}.{p}" for p in found]
    return out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


class BottleneckRuntime:
    """Adapters attached to a model with forward hooks (model.slimlm_bottleneck)."""

    def __init__(self, model: nn.Module, adapters: dict[str, Bottleneck], config: dict) -> None:
        self.model, self.config = model, config
        self.adapters = nn.ModuleDict({k.replace(".", "__"): a for k, a in adapters.items()})
        dev = next(model.parameters()).device
        self.adapters.to(dev)
        self.handles = []
        for name, a in adapters.items():
            self.handles.append(model.get_submodule(name).register_forward_hook(
                lambda mod, args, out, a=a: a(out)))

    def named(self) -> dict[str, Bottleneck]:
        return {k.replace("__", "."): a for k, a in self.adapters.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.model.__dict__.pop("slimlm_bottleneck", None)


def runtime(model: nn.Module) -> BottleneckRuntime | None:
    return model.__dict__.get("slimlm_bottleneck")


def add_bottleneck(model: nn.Module, config: BottleneckConfig, *, seed: int = 0) -> BottleneckRuntime:
    if runtime(model) is not None:
        raise ConfigError("this model already has bottleneck adapters")
    hidden = model.get_input_embeddings().weight.shape[1]
    m = config.size(hidden)
    torch.manual_seed(seed)
    adapters = {p: Bottleneck(hidden, m, config.nonlinearity) for p in positions(model, config.style)}
    cfg = {"slimlm_adapter_type": TYPE, "style": config.style, "bottleneck_size": m,
           "nonlinearity": config.nonlinearity, "positions": list(adapters)}
    rt = BottleneckRuntime(model, adapters, cfg)
    model.__dict__["slimlm_bottleneck"] = rt
    return rt


def save_bottleneck(model: nn.Module, folder: Path | str, *, base_model_ref: str | None = None) -> None:
    rt = runtime(model)
    if rt is None:
        raise ConfigError("the model has no bottleneck adapters to save")
    folder = Path(folder)
    tensors = {f"{pos}.{k}": v.detach().float().cpu().contiguous()
               for pos, a in rt.named().items() for k, v in a.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = {**rt.config, "base_model_name_or_path": base_model_ref}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_bottleneck(model: nn.Module, folder: Path | str, cfg: dict) -> BottleneckRuntime:
    folder = Path(folder)
    try:
        config = BottleneckConfig(style=cfg["style"], bottleneck_size=int(cfg["bottleneck_size"]),
                                  nonlinearity=cfg["nonlinearity"])
        want = list(cfg["positions"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder}/{CONFIG_FILE} is not a complete bottleneck adapter config ({e})") from None
    here = positions(model, config.style)
    if want != here:
        missing = next((p for p in want if p not in here), want[0] if want else "?")
        raise ConfigError(f"the adapter in {folder} was made for another base: it adapts {missing}, which this "
                          f"model does not have in the same place ({len(here)} positions here, {len(want)} there)")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}")
    tensors = load_file(str(path))
    rt = add_bottleneck(model, config)
    try:
        for pos, a in rt.named().items():
            a.load_state_dict({k: tensors[f"{pos}.{k}"] for k in a.state_dict()})
    except (KeyError, RuntimeError) as e:
        rt.remove()
        raise ConfigError(f"the adapter in {folder} does not fit this model ({str(e).splitlines()[0][:200]})") from None
    for p in rt.adapters.parameters():
        p.requires_grad_(False)
    return rt
