"""Export to and import from the quantized checkpoint layouts other tools load.

GPTQ (transformers via optimum + gptqmodel, vLLM, GPTQModel, AutoGPTQ), per quantized linear:
  qweight int32 (in*bits/32, out)   codes packed along `in` (slimlm.core.packing layout; 3-bit straddles)
  qzeros  int32 (G, out*bits/32)    zero points packed along `out`; checkpoint_format "gptq" (v1, the
                                    default every loader reads) stores z - 1, "gptq_v2" stores z
  scales  fp16  (G, out)            W_hat[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]
  g_idx   int32 (in,)               input column -> group (act-order: not sorted; desc_act=true)
with quantization_config {quant_method: gptq, bits, group_size, desc_act, sym, checkpoint_format, ...}.
v1 cannot hold a zero point of 0 (z - 1 = -1 does not fit the field), so such layers need "gptq_v2".

compressed-tensors "pack-quantized" (transformers via compressed-tensors, vLLM, llm-compressor):
  weight_packed     int32 (out, ceil(in*bits/32))  signed codes q - 2^(b-1) stored + 2^(b-1), i.e. our
                                                   unsigned codes, packed densely along `in`
  weight_scale      (out, G)                       G = 1 for strategy "channel"
  weight_zero_point int32 (ceil(out*bits/32), G)   asymmetric only, packed along `out` (dim 0) the same
                                                   way; symmetric schemes store none (zero = 2^(b-1))
  weight_shape      int64 [out, in]
Current compressed-tensors (>= 0.20) rejects actorder="group", so act-order layers cannot be exported
there (use GPTQ); an older checkpoint's `weight_g_idx` is still read on import. 2-, 4- and 8-bit layouts
are the same in every release; 3-bit is the dense layout of compressed-tensors >= 0.20 (a short-lived
earlier release packed ten 3-bit codes per word, and before it pack-quantized took only 4 and 8 bits).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from slimlm.core.packing import pack_int32, unpack_int32
from slimlm.core.quant import default_g_idx
from slimlm.errors import ConfigError, SlimlmError
from slimlm.quant.linear import PORTABLE_KEYS, QuantLinear
from slimlm.quant.serialize import (
    empty_skeleton,
    export_config,
    finish_loading,
    quantized_modules,
    read_config,
    read_tensors,
    set_submodule,
    unique_tensors,
    write_folder,
)

log = logging.getLogger(__name__)

GPTQ_FORMATS = ("gptq", "gptq_v2")


# ---------------------------------------------------------------------------------- shared helpers
def _uniform_scheme(qmods: dict[str, QuantLinear], fmt: str) -> tuple[int, int, bool]:
    schemes = {_scheme(m) for m in qmods.values()}
    if len(schemes) != 1:
        raise ConfigError(f"{fmt} needs one (bits, group_size, symmetric) for all layers, found "
                          f"{sorted(schemes)}; save in the slimlm or compressed-tensors format instead")
    return schemes.pop()


def _scheme(m: QuantLinear) -> tuple[int, int, bool]:
    """(bits, group_size, symmetric); per-tensor (0) is exported as per-channel (-1)."""
    return m.bits, m.group_size if m.group_size > 0 else -1, m.symmetric


def _plain_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _export(model: nn.Module, tokenizer, folder, overwrite: bool, convert, qcfg: dict,
            extra_files: dict[str, dict] | None = None) -> Path:
    """Shared writer: state dict with each QuantLinear's portable tensors replaced by convert(name, m, t)."""
    from slimlm.io import atomic_dir

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
    tensors = unique_tensors(state)
    config = export_config(model, qcfg)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_folder(model, tokenizer, tmp, tensors, config)
        for fname, content in (extra_files or {}).items():
            (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
    return Path(folder)


def _import(folder: Path, config, tensors: dict[str, Tensor], prefixes: list[str], to_portable,
            dtype: torch.dtype | None) -> nn.Module:
    """Shared reader: skeleton, QuantLinear at each prefix from to_portable(name, linear) -> (spec, t)."""
    del config.quantization_config              # the layers become slimlm's; no loader-side quantizer
    model = empty_skeleton(config)
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
    return finish_loading(model, tensors, folder)


def _is_act_order(g_idx: Tensor, group_size: int) -> bool:
    return not torch.equal(g_idx.to(torch.int32), default_g_idx(g_idx.numel(), group_size))


# ---------------------------------------------------------------------------------- GPTQ
def to_gptq(m: QuantLinear, t: dict[str, Tensor], checkpoint_format: str = "gptq",
            scale_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """GPTQ tensors of one layer from its portable tensors (see module docstring)."""
    zero = unpack_int32(t["qzeros"], m.bits, m.out_features)                    # (G, N) true zero points
    if checkpoint_format == "gptq":
        if int(zero.min()) == 0:
            raise ConfigError("a zero point of 0 cannot be stored in GPTQ v1 (it stores z - 1); "
                              "export with checkpoint_format='gptq_v2'")
        zero = zero - 1
    g_idx = t["g_idx"] if m.group_size > 0 else torch.zeros_like(t["g_idx"])
    return {"qweight": t["qweight"], "qzeros": pack_int32(zero, m.bits), "scales": t["scales"].to(scale_dtype),
            "g_idx": g_idx.to(torch.int32)}


def from_gptq(t: dict[str, Tensor], bits: int, in_features: int, out_features: int,
              checkpoint_format: str = "gptq") -> dict[str, Tensor]:
    """Portable tensors of one layer from its GPTQ tensors (inverse of to_gptq)."""
    zero = unpack_int32(t["qzeros"].to(torch.int32), bits, out_features).to(torch.int16)
    if checkpoint_format == "gptq":
        zero = zero + 1
        if int(zero.max()) > (1 << bits) - 1:
            raise SlimlmError("GPTQ v1 qzeros hold z - 1 = -1 (a zero point of 0), which v1 cannot "
                              "represent; this checkpoint is corrupt or really gptq_v2")
    if t["qweight"].shape != (in_features * bits // 32, out_features):
        raise SlimlmError(f"qweight has shape {tuple(t['qweight'].shape)}, expected "
                          f"{(in_features * bits // 32, out_features)}")
    return {"qweight": t["qweight"].to(torch.int32), "scales": t["scales"].float(),
            "qzeros": pack_int32(zero, bits), "g_idx": t["g_idx"].to(torch.int32)}


def export_gptq(model: nn.Module, tokenizer, folder: str | os.PathLike, checkpoint_format: str = "gptq",
                overwrite: bool = False) -> Path:
    """Write a GPTQ checkpoint (config.json + quantize_config.json + model.safetensors + tokenizer)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ConfigError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")
    qmods = quantized_modules(model)
    if not qmods:
        raise ConfigError("the model has no QuantLinear layers to export")
    bits, group_size, sym = _uniform_scheme(qmods, "GPTQ")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain = [n for n in _plain_linears(model) if model.get_submodule(n) is not out]
    if plain:
        raise ConfigError(f"GPTQ loaders quantize every linear of the decoder blocks, but {plain[:3]} are "
                          "not quantized; quantize them or use the slimlm / compressed-tensors format")
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": any(m.act_order for m in qmods.values()), "sym": sym,
            "checkpoint_format": checkpoint_format, "static_groups": False, "true_sequential": True,
            "damp_percent": 0.01, "lm_head": isinstance(out, QuantLinear), "pack_dtype": "int32",
            "meta": {"quantizer": ["slimlm"]}}
    return _export(model, tokenizer, folder, overwrite,
                   lambda name, m, t: to_gptq(m, t, checkpoint_format), qcfg,
                   extra_files={"quantize_config.json": qcfg})


def import_gptq(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a GPTQ checkpoint into slimlm QuantLinear layers (other weights cast to `dtype` if given)."""
    folder = Path(folder)
    config, qcfg = read_config(folder, "gptq")
    fmt = qcfg.get("checkpoint_format") or "gptq"
    if fmt not in GPTQ_FORMATS:
        raise SlimlmError(f"{folder}: GPTQ checkpoint_format {fmt!r} is not supported (only {GPTQ_FORMATS})")
    bits, group_size, sym = int(qcfg["bits"]), int(qcfg.get("group_size", -1)), bool(qcfg.get("sym", True))
    tensors = read_tensors(folder)
    prefixes = [k[:-len(".qweight")] for k in tensors if k.endswith(".qweight")]

    def to_portable(name: str, lin: nn.Linear):
        t = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales")}
        g_idx = tensors.pop(f"{name}.g_idx", None)           # some writers omit it without act-order
        t["g_idx"] = default_g_idx(lin.in_features, group_size) if g_idx is None else g_idx
        p = from_gptq(t, bits, lin.in_features, lin.out_features, fmt)
        spec = {"bits": bits, "group_size": group_size, "symmetric": sym,
                "act_order": group_size > 0 and _is_act_order(p["g_idx"], group_size), "method": "gptq"}
        return spec, p

    return _import(folder, config, tensors, prefixes, to_portable, dtype)


# ---------------------------------------------------------------------------------- compressed-tensors
def to_compressed_tensors(m: QuantLinear, t: dict[str, Tensor], scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """pack-quantized tensors of one layer from its portable tensors (see module docstring)."""
    if m.act_order:
        raise ConfigError("compressed-tensors no longer supports act-order groups (actorder='group'); "
                          "export this model as GPTQ or quantize it without act_order")
    b, N, K = m.bits, m.out_features, m.in_features
    codes = unpack_int32(t["qweight"], b, K, dim=0).T                          # (N, K)
    out = {"weight_packed": pack_int32(codes, b, dim=-1, pad=True),
           "weight_scale": t["scales"].T.contiguous().to(scale_dtype),         # (N, G)
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    zero = unpack_int32(t["qzeros"], b, N).T                                    # (N, G)
    if m.symmetric:
        if not bool((zero == 1 << (b - 1)).all()):
            raise ConfigError("a symmetric layer must have every zero point at 2^(bits-1)")
    else:
        out["weight_zero_point"] = pack_int32(zero, b, dim=0, pad=True)
    return out


def from_compressed_tensors(t: dict[str, Tensor], bits: int, symmetric: bool,
                            group_size: int) -> dict[str, Tensor]:
    """Portable tensors of one layer from its pack-quantized tensors (inverse of to_compressed_tensors)."""
    N, K = (int(v) for v in t["weight_shape"])
    codes = unpack_int32(t["weight_packed"].to(torch.int32), bits, K)          # (N, K)
    scale = t["weight_scale"].float().reshape(N, -1)                           # (N, G)
    zp = t.get("weight_zero_point")
    if symmetric or zp is None:
        zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.uint8)
    elif zp.dtype == torch.int32:                                              # packed along out
        zero = unpack_int32(zp, bits, N, dim=0).reshape(N, -1)
    else:                                                                      # older: signed, unpacked
        zero = (zp.to(torch.int16).reshape(N, -1) + (1 << (bits - 1))).to(torch.uint8)
    g_idx = t.get("weight_g_idx")
    g_idx = default_g_idx(K, group_size) if g_idx is None else g_idx.to(torch.int32)
    return {"qweight": pack_int32(codes.T, bits, dim=0), "scales": scale.T.contiguous(),
            "qzeros": pack_int32(zero.T, bits), "g_idx": g_idx}


def _ct_group(bits: int, group_size: int, symmetric: bool, targets: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "group" if group_size > 0 else "channel",
               "group_size": group_size if group_size > 0 else None, "observer": "minmax"}
    return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}


def export_compressed_tensors(model: nn.Module, tokenizer, folder: str | os.PathLike,
                              scale_dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a compressed-tensors pack-quantized checkpoint. Scales default to the dtype of the model's
    unquantized weights (fp32 scales keep an fp32 model's dequantized weights exact)."""
    qmods = quantized_modules(model)
    if not qmods:
        raise ConfigError("the model has no QuantLinear layers to export")
    if scale_dtype is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        scale_dtype = floats[0] if floats else torch.float32
    schemes: dict[tuple, list[str]] = {}
    for name, m in qmods.items():
        schemes.setdefault(_scheme(m), []).append(name)
    if len(schemes) == 1:
        (scheme,) = schemes
        groups = {"group_0": _ct_group(*scheme, ["Linear"])}
        ignore = _plain_linears(model)
    else:
        groups = {f"group_{i}": _ct_group(*s, names) for i, (s, names) in enumerate(schemes.items())}
        ignore = []
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}
    return _export(model, tokenizer, folder, overwrite,
                   lambda name, m, t: to_compressed_tensors(m, t, scale_dtype), qcfg)


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    for tg in targets:
        if tg.startswith("re:"):
            if re.match(tg[3:], name):
                return True
        elif tg == name or tg == type(module).__name__:
            return True
    return False


def import_compressed_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a compressed-tensors pack-quantized checkpoint into slimlm QuantLinear layers."""
    folder = Path(folder)
    config, qcfg = read_config(folder, "compressed-tensors")
    tensors = read_tensors(folder)
    prefixes = [k[:-len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]
    groups = list((qcfg.get("config_groups") or {}).values())

    def to_portable(name: str, lin: nn.Linear):
        group = next((g for g in groups if _matches(name, lin, g.get("targets", []))), None)
        if group is None or group.get("format", qcfg.get("format")) != "pack-quantized":
            raise SlimlmError(f"{folder}: {name} has packed weights but no pack-quantized config group")
        w = group["weights"]
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise SlimlmError(f"{folder}: {name}: only int group/channel weights can be imported, got {w}")
        bits, sym = int(w["num_bits"]), bool(w.get("symmetric", True))
        gs = int(w["group_size"]) if w.get("strategy") == "group" else -1
        keys = [k for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
                if f"{name}.{k}" in tensors]
        p = from_compressed_tensors({k: tensors.pop(f"{name}.{k}") for k in keys}, bits, sym, gs)
        spec = {"bits": bits, "group_size": gs, "symmetric": sym,
                "act_order": gs > 0 and _is_act_order(p["g_idx"], gs), "method": None}
        return spec, p

    return _import(folder, config, tensors, prefixes, to_portable, dtype)
