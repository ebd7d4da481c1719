"""slimlm's native format for quantized models.

A folder with
- model.safetensors: every QuantLinear's portable tensors (qweight int32 (in*bits/32, out), scales fp32
  (G, out), qzeros int32 (G, out*bits/32) holding the true zero points, g_idx int32 (in,), bias) and all
  other weights as they are (tied duplicates written once);
- config.json: the model's config plus `quantization_config` =
  {"quant_method": "slimlm", "format": "slimlm-packed", "format_version": 1,
   "modules": {qualified_name: {bits, group_size, symmetric, act_order, method, in_features,
               out_features, bias[, input_scale: true for a ScaledQuantLinear]}}};
- generation_config.json and the tokenizer files when there are any.

Loading builds the skeleton with `AutoModelForCausalLM.from_config` with parameters on the meta device
(buffers such as rotary tables stay real), swaps the listed linears for meta QuantLinear, then
`load_state_dict(..., assign=True)` and re-ties tied weights. Reading uses safetensors only.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.linear import QuantLinear

log = logging.getLogger(__name__)

FORMAT = "slimlm-packed"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Qualified name -> QuantLinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def module_spec(m: QuantLinear) -> dict:
    """The per-module entry of quantization_config["modules"]."""
    spec = {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric, "act_order": m.act_order,
            "method": m.method, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None}
    if getattr(m, "input_scale", None) is not None:          # ScaledQuantLinear (AWQ's unfolded scales)
        spec["input_scale"] = True
    return spec


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors sharing storage (tied weights), make the rest contiguous."""
    seen: set[tuple] = set()
    out = {}
    for k, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous()
    return out


def _output_is_quantized(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and isinstance(get(), QuantLinear)


def export_config(model: nn.Module, quantization_config: dict):
    """A copy of model.config carrying `quantization_config`; untied when the output layer is quantized."""
    config = copy.deepcopy(model.config)
    if _output_is_quantized(model) and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    config.quantization_config = quantization_config
    return config


def write_folder(model: nn.Module, tokenizer, folder: Path, tensors: dict[str, torch.Tensor],
                 config) -> None:
    """Write weights, config, generation config and tokenizer into an existing folder."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except ValueError as e:          # an invalid generation config is not worth failing the save
            log.warning("generation_config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def write_quantized(model: nn.Module, tokenizer, folder: str | os.PathLike) -> None:
    """Write the native format into an existing (fresh) folder; no atomicity (see save_quantized)."""
    qmods = quantized_modules(model)
    if not qmods:
        raise SlimlmError("the model has no QuantLinear layers: quantize it before saving it as quantized")
    qcfg = {"quant_method": "slimlm", "format": FORMAT, "format_version": FORMAT_VERSION,
            "modules": {n: module_spec(m) for n, m in qmods.items()}}
    write_folder(model, tokenizer, Path(folder), unique_tensors(model.state_dict()),
                 export_config(model, qcfg))


def save_quantized(model: nn.Module, tokenizer, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a model holding QuantLinear layers in the native format; the folder appears only complete."""
    from slimlm.io import atomic_dir

    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_quantized(model, tokenizer, tmp)
    return Path(folder)


def read_config(folder: Path, quant_method: str):
    """AutoConfig of `folder` and its quantization_config dict (checked to be `quant_method`)."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise SlimlmError(f"{folder} has no config.json; give a folder written by slimlm")
    config = AutoConfig.from_pretrained(str(folder))
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict() if qcfg is not None else {}
    if qcfg.get("quant_method") != quant_method:
        raise SlimlmError(f"{folder} is not a {quant_method} checkpoint "
                          f"(quant_method={qcfg.get('quant_method')!r})")
    return config, qcfg


def empty_skeleton(config) -> nn.Module:
    """The model built from config with parameters on the meta device (buffers real, e.g. rotary)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


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
    """load_state_dict(assign=True), re-tie, and check that nothing is left on the meta device."""
    try:
        res = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:                     # shape mismatches, reported by QuantLinear or torch
        msg = " ".join(str(e).split())
        raise SlimlmError(f"{folder}: the weights do not fit the model built from config.json ({msg[:300]})") \
            from None
    if res.unexpected_keys:
        raise SlimlmError(f"{folder}: unexpected tensors {res.unexpected_keys[:5]} "
                          "(does config.json match the weights?)")
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SlimlmError(f"{folder}: no weights for {left[:5]}; the checkpoint is incomplete")
    return model.eval()


def load_quantized(folder: str | os.PathLike) -> nn.Module:
    """Load a model saved by save_quantized, with QuantLinear layers on their CPU kernel layouts."""
    folder = Path(folder)
    config, qcfg = read_config(folder, "slimlm")
    if qcfg.get("format") != FORMAT or int(qcfg.get("format_version", 0)) > FORMAT_VERSION:
        raise SlimlmError(f"{folder}: unsupported slimlm format {qcfg.get('format')!r} "
                          f"version {qcfg.get('format_version')}; upgrade slimlm")
    from slimlm.quant.scaled import ScaledQuantLinear

    model = empty_skeleton(config)
    for name, spec in qcfg["modules"].items():
        cls = ScaledQuantLinear if spec.get("input_scale") else QuantLinear
        set_submodule(model, name, cls.empty(
            spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
            spec["symmetric"], spec["bias"], spec.get("act_order", False), spec.get("method")))
    return finish_loading(model, read_tensors(folder), folder)

