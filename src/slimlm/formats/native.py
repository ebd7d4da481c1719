"""slimlm's own folder format: any mix of compressed layers in one model.

A folder with
- model.safetensors: every runtime module's own tensors (a QuantLinear's portable tensors: qweight int32
  (in*bits/32, out), scales fp32 (G, out), qzeros int32 (G, out*bits/32) holding the true zero points, g_idx
  int32 (in,); an NF4Linear's or Int8Linear's bitsandbytes layout), and every other tensor as it is or, where
  that takes fewer bytes, in a sparse encoding of slimlm.pruning.storage (`<name>.<field>` tensors, the
  encoded names listed under `slimlm_sparse` in the header's metadata); tied duplicates written once;
- config.json: the model's config, plus
  `quantization_config` = {"quant_method": "slimlm", "format": "slimlm-packed", "format_version": 2,
  "modules": {qualified_name: {"kind": "quant" | "nf4" | "int8", in_features, out_features, bias, ...}}}
  when the model holds runtime modules (a "quant" entry adds bits, group_size, symmetric, act_order, method
  and input_scale for a ScaledQuantLinear; version 1 folders have no kind: every entry is "quant"),
  `slimlm_sparsity` = {"format": "slimlm-sparse", "version": 1, "bitmask": n, "nm": n} when tensors are
  encoded, and `slimlm_structured` (per-layer sizes) for a non-uniform structured pruning;
- generation_config.json and the tokenizer files when there are any.

Loading builds the skeleton from config.json with its parameters on the meta device (a non-uniform
structured model is built real and resized: its per-layer sizes are found by a forward pass), swaps in the
listed runtime modules, decodes each tensor in turn, and assigns them (load_state_dict(assign=True)), so it
holds about one copy of the weights. Everything comes back bit for bit.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import SlimlmError
from ..modules import set_submodule
from ..pruning import storage
from ..quant.embeddings import reinstall_casts
from ..quant.int8_linear import Int8Linear
from ..quant.linear import QuantLinear
from ..quant.nf4_linear import NF4Linear
from ..quant.scaled import ScaledQuantLinear
from ..registry import Format, register_format
from . import folder as F

FORMAT = "slimlm-packed"
FORMAT_VERSION = 2
RUNTIME = (QuantLinear, NF4Linear, Int8Linear)


# ------------------------------------------------------------------------------------------ module specs
def module_spec(m: nn.Module) -> dict:
    """The entry of quantization_config["modules"] that rebuilds `m` empty."""
    spec = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if isinstance(m, QuantLinear):
        spec.update(kind="quant", bits=m.bits, group_size=m.group_size, symmetric=m.symmetric,
                    act_order=m.act_order, method=m.method)
        if isinstance(m, ScaledQuantLinear):
            spec["input_scale"] = True
    elif isinstance(m, NF4Linear):
        spec.update(kind="nf4", quant_type=m.quant_type, blocksize=m.blocksize)
    elif isinstance(m, Int8Linear):
        spec.update(kind="int8", threshold=m.threshold)
    else:
        raise TypeError(f"{type(m).__name__} is not a slimlm runtime module")
    return spec


def empty_module(spec: dict) -> nn.Module:
    """A runtime module on the meta device from its spec, for load_state_dict(assign=True)."""
    kind = spec.get("kind", "quant")
    i, o, b = spec["in_features"], spec["out_features"], spec["bias"]
    if kind == "quant":
        cls = ScaledQuantLinear if spec.get("input_scale") else QuantLinear
        return cls.empty(i, o, spec["bits"], spec["group_size"], spec["symmetric"], b,
                         spec.get("act_order", False), spec.get("method"))
    if kind == "nf4":
        return NF4Linear(i, o, b, spec.get("quant_type", "nf4"), spec.get("blocksize", 64), device="meta")
    if kind == "int8":
        return Int8Linear(i, o, b, float(spec.get("threshold", 6.0)), device="meta")
    raise SlimlmError(f"unknown module kind {kind!r} in config.json; upgrade slimlm")


def runtime_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every slimlm runtime module (packed, NF4/FP4, int8 layers), in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RUNTIME)}


def _output_is_runtime(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and isinstance(get(), RUNTIME)


# --------------------------------------------------------------------------------------------- writing
def save(model: nn.Module, tokenizer, folder: Path) -> dict:
    """Write the model into an existing, empty folder; returns counts of what was written."""
    specs = {n: module_spec(m) for n, m in runtime_modules(model).items()}
    tensors, encoded, kinds = {}, [], {}
    runtime_keys = {f"{n}." for n in specs}
    for name, t in F.unique_tensors(model.state_dict()).items():
        plain = any(name.startswith(p) for p in runtime_keys) or not (t.is_floating_point() and t.dim() == 2)
        enc = {"dense": t} if plain else storage.compress_sparse(t)
        if "dense" in enc:
            tensors[name] = t
            continue
        encoded.append(name)
        kind = "nm" if "nm" in enc else "bitmask"
        kinds[kind] = kinds.get(kind, 0) + 1
        tensors.update({f"{name}.{f}": v.contiguous() for f, v in enc.items()})
    qcfg = {"quant_method": "slimlm", "format": FORMAT, "format_version": FORMAT_VERSION,
            "modules": specs} if specs else None
    extra = {"slimlm_sparsity": {"format": "slimlm-sparse", "version": 1, **kinds}} if encoded else {}
    config = F.config_copy(model, qcfg, untie=_output_is_runtime(model), **extra)
    F.write_folder(model, tokenizer, folder, tensors, config, {"slimlm_sparse": json.dumps(encoded)})
    return {"runtime_modules": len(specs), "encoded_tensors": len(encoded)}


# --------------------------------------------------------------------------------------------- reading
def recognise(path: Path, config: dict | None) -> bool:
    if config is None:
        return False
    text = config.get("text_config") or {}
    return (F.quantization_config(config).get("quant_method") == "slimlm" or bool(config.get("slimlm_sparsity"))
            or bool(config.get("slimlm_structured")) or bool(text.get("slimlm_structured")))


def load(path: Path, dtype: torch.dtype | None = None, **_) -> nn.Module:
    """Load a folder written by `save` (or by save_pretrained with slimlm's structured sizes)."""
    from transformers import AutoConfig

    from ..pruning.structured import build_model

    config = AutoConfig.from_pretrained(str(path))
    qcfg = getattr(config, "quantization_config", None) or {}
    specs = {}
    if qcfg:
        if qcfg.get("format") != FORMAT or int(qcfg.get("format_version", 0)) > FORMAT_VERSION:
            raise SlimlmError(f"{path}: unsupported slimlm format {qcfg.get('format')!r} "
                              f"version {qcfg.get('format_version')}; upgrade slimlm")
        specs = qcfg["modules"]
        del config.quantization_config
    text = getattr(config, "text_config", None) or config
    # per-layer sizes are found by a forward pass of the full-size model, which cannot run on meta
    skeleton = contextlib.nullcontext() if getattr(text, "slimlm_structured", None) else _meta()
    with skeleton:
        model = build_model(config, dtype)
    for name, spec in specs.items():
        set_submodule(model, name, empty_module(spec))
    model = F.finish_loading(model, _read(path, dtype, tuple(f"{n}." for n in specs)), path)
    reinstall_casts(model)         # an embedding stored in another dtype than the rest computes in theirs
    return model


def _meta():
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=False)


def _read(path: Path, dtype: torch.dtype | None, raw: tuple[str, ...]) -> dict[str, Tensor]:
    """Every tensor of the folder, decoded and as stored, or cast to `dtype` where given (floating tensors
    outside the runtime modules, whose names start with a prefix in `raw`). A compressed tensor's parts are
    freed before the next is read."""
    from safetensors import safe_open

    def cast(name: str, t: Tensor) -> Tensor:
        if dtype is None or not t.is_floating_point() or name.startswith(raw):
            return t
        return t.to(dtype)

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"{path} holds no .safetensors file")
    state: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names = set(h.keys())
            for name in json.loads((h.metadata() or {}).get("slimlm_sparse", "[]")):
                fields = {fld: h.get_tensor(f"{name}.{fld}") for fld in storage.FIELDS if f"{name}.{fld}" in names}
                names -= {f"{name}.{fld}" for fld in fields}
                state[name] = cast(name, storage.decompress_sparse(fields))
            for k in names:
                state[k] = cast(k, h.get_tensor(k))
    return state


def refuses(model: nn.Module) -> str | None:
    return F.adapter_refusal(model)


register_format(Format(
    "slimlm", "slimlm's folder: any mix of packed 2-8 bit, NF4/FP4, LLM.int8() and sparse layers, and "
    "non-uniform structured sizes; loads back bit for bit", recognise=recognise, load=load, save=save,
    refuses=refuses, default_rank=20))
