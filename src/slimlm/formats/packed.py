"""What the GPTQ and compressed-tensors formats share: one (bits, group size, symmetric) scheme per layer, and
writing or reading a folder whose QuantLinear tensors are converted from or to the layer's portable ones
(QuantLinear.PORTABLE_KEYS: qweight, scales, qzeros, g_idx)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.quant import default_g_idx
from ..errors import ConfigError, SlimlmError
from ..modules import set_submodule
from ..quant.linear import PORTABLE_KEYS, QuantLinear
from . import folder as F


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Qualified name -> QuantLinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def uniform_scheme(qmods: dict[str, QuantLinear], fmt: str) -> tuple[int, int, bool]:
    schemes = {scheme(m) for m in qmods.values()}
    if len(schemes) != 1:
        raise ConfigError(f"{fmt} needs one (bits, group_size, symmetric) for all layers, found "
                          f"{sorted(schemes)}; save in the slimlm or compressed-tensors format instead")
    return schemes.pop()


def scheme(m: QuantLinear) -> tuple[int, int, bool]:
    """(bits, group_size, symmetric); per-tensor (0) is exported as per-channel (-1)."""
    return m.bits, m.group_size if m.group_size > 0 else -1, m.symmetric


def plain_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def write_converted(model: nn.Module, tokenizer, folder: Path, convert, qcfg: dict,
                    extra_files: dict[str, dict] | None = None) -> None:
    """Write into an existing, empty folder the state dict with each QuantLinear's portable tensors replaced
    by convert(name, m, t)."""
    qmods = quantized_modules(model)
    scaled = [n for n, m in qmods.items() if getattr(m, "input_scale", None) is not None]
    if scaled:
        raise ConfigError(f"{scaled[0]} divides its input by a per-channel scale (AWQ scales that could not "
                          f"be folded), which {qcfg['quant_method']} checkpoints cannot hold; "
                          "save in the slimlm format instead")
    state = model.state_dict()
    for name, m in qmods.items():
        t = {k: state.pop(f"{name}.{k}") for k in PORTABLE_KEYS}
        for k, v in convert(name, m, t).items():
            state[f"{name}.{k}"] = v
    tensors = F.unique_tensors(state)
    config = F.config_copy(model, qcfg, untie=isinstance(model.get_output_embeddings(), QuantLinear))
    F.write_folder(model, tokenizer, folder, tensors, config)
    for fname, content in (extra_files or {}).items():
        (folder / fname).write_text(json.dumps(content, indent=2) + "\n")


def read_converted(folder: Path, config, tensors: dict[str, Tensor], prefixes: list[str], to_portable,
                   dtype: torch.dtype | None) -> nn.Module:
    """Skeleton, then a QuantLinear at each prefix from to_portable(name, linear) -> (spec, t)."""
    model = F.empty_skeleton(config)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for name in prefixes:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise SlimlmError(f"{folder}: {name} is a {type(lin).__name__}, only nn.Linear can be imported")
        spec, portable = to_portable(name, lin)
        q = QuantLinear.empty(lin.in_features, lin.out_features, spec["bits"], spec["group_size"],
                              spec["symmetric"], f"{name}.bias" in tensors, spec["act_order"], spec["method"])
        set_submodule(model, name, q)
        tensors.update({f"{name}.{k}": v for k, v in portable.items()})
    return F.finish_loading(model, tensors, folder)


def is_act_order(g_idx: Tensor, group_size: int) -> bool:
    return not torch.equal(g_idx.to(torch.int32), default_g_idx(g_idx.numel(), group_size))
