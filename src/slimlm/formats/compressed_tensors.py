"""compressed-tensors checkpoints.

"pack-quantized" (transformers via compressed-tensors, vLLM, llm-compressor):
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

"sparse-bitmask" (a pruned model; transformers read it through compressed-tensors < 0.15), per linear layer
of the decoder blocks:
  <module>.shape        int64 [out, in]
  <module>.compressed   the nonzeros, row-major
  <module>.bitmask      uint8 (out, ceil(in/8)), bit j of byte k flags column 8k + j (little-endian packbits)
  <module>.row_offsets  int64 (out,), the start of each row in `compressed`
everything else dense, and quantization_config.sparsity_config {format: sparse-bitmask, targets, ignore,
global_sparsity, sparsity_structure}.

Saving writes pack-quantized for a model with packed layers and sparse-bitmask for a pruned float model;
both load back.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..calibration import find_blocks
from ..core.packing import pack_int32, unpack_int32
from ..core.quant import default_g_idx
from ..errors import ConfigError, SlimlmError
from ..pruning.storage import is_sparse, pack_bits, unpack_bits
from ..quant.linear import QuantLinear
from ..registry import Format, register_format
from . import folder as F
from .packed import is_act_order, plain_linears, quantized_modules, read_converted, scheme, write_converted

CT_LAYOUT_VERSION = "0.14.0"  # compressed-tensors release whose sparse-bitmask layout is written



# ------------------------------------------------------------------------------------------ pack-quantized
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


def save_packed(model: nn.Module, tokenizer, folder: Path, scale_dtype: torch.dtype | None = None) -> None:
    """Write a pack-quantized checkpoint into an existing, empty folder. Scales default to the dtype of the
    model's unquantized weights (fp32 scales keep an fp32 model's dequantized weights exact)."""
    qmods = quantized_modules(model)
    if scale_dtype is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        scale_dtype = floats[0] if floats else torch.float32
    schemes: dict[tuple, list[str]] = {}
    for name, m in qmods.items():
        schemes.setdefault(scheme(m), []).append(name)
    if len(schemes) == 1:
        (only,) = schemes
        groups = {"group_0": _ct_group(*only, ["Linear"])}
        ignore = plain_linears(model)
    else:
        groups = {f"group_{i}": _ct_group(*s, names) for i, (s, names) in enumerate(schemes.items())}
        ignore = []
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}
    write_converted(model, tokenizer, folder, lambda name, m, t: to_compressed_tensors(m, t, scale_dtype), qcfg)


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    for tg in targets:
        if tg.startswith("re:"):
            if re.match(tg[3:], name):
                return True
        elif tg == name or tg == type(module).__name__:
            return True
    return False


def load_packed(folder: Path, config, qcfg: dict, dtype: torch.dtype | None) -> nn.Module:
    """Load a pack-quantized checkpoint into slimlm QuantLinear layers."""
    tensors = F.read_tensors(folder)
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
                "act_order": gs > 0 and is_act_order(p["g_idx"], gs), "method": None}
        return spec, p

    return read_converted(folder, config, tensors, prefixes, to_portable, dtype)


# ------------------------------------------------------------------------------------------ sparse-bitmask
def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (lm_head and embeddings stay dense); none when every layer
    of the blocks is quantized."""
    try:
        inside = {id(m) for m in find_blocks(model)[1].modules()}
    except ValueError:                   # no block holds a plain linear layer
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


def save_sparse(model: nn.Module, tokenizer, folder: Path) -> dict:
    """Write the sparse-bitmask layout (module docstring) into an existing, empty folder."""
    from ..pruning.storage import nm_of

    state = F.unique_tensors(model.state_dict())
    linears = _block_linears(model)
    zeros = total = 0
    structure = "2:4"
    for name in linears:
        W = state.pop(f"{name}.weight")
        mask = W != 0
        zeros, total = zeros + int((~mask).sum()), total + W.numel()
        structure = structure if nm_of(W.masked_fill(~mask, 0), 4) in (0, 1, 2) else "unstructured"
        counts = mask.sum(-1)
        state.update({f"{name}.shape": torch.tensor(list(W.shape), dtype=torch.long),
                      f"{name}.compressed": W[mask], f"{name}.bitmask": pack_bits(mask),
                      f"{name}.row_offsets": torch.cumsum(counts, 0) - counts})
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    sparsity = {"format": "sparse-bitmask", "targets": ["Linear"], "ignore": ignore,
                "global_sparsity": round(zeros / max(total, 1), 4), "sparsity_structure": structure}
    qcfg = {"quant_method": "compressed-tensors", "version": CT_LAYOUT_VERSION, "sparsity_config": sparsity}
    F.write_folder(model, tokenizer, folder, {k: v.contiguous() for k, v in state.items()},
                   F.config_copy(model, qcfg))
    return {"layers": len(linears), "global_sparsity": sparsity["global_sparsity"], "structure": structure}


def load_sparse(folder: Path, config, dtype: torch.dtype | None) -> nn.Module:
    """Load a sparse-bitmask checkpoint into a plain model with the zeros in place."""
    tensors = F.read_tensors(folder)
    for name in [k[:-len(".bitmask")] for k in tensors if k.endswith(".bitmask")]:
        shape = [int(s) for s in tensors.pop(f"{name}.shape")]
        mask = unpack_bits(tensors.pop(f"{name}.bitmask"), shape[1])
        values = tensors.pop(f"{name}.compressed")
        tensors.pop(f"{name}.row_offsets", None)
        if int(mask.sum()) != values.numel():
            raise SlimlmError(f"{folder}: {name} has {values.numel()} values for {int(mask.sum())} set bits")
        W = torch.zeros(shape, dtype=values.dtype)
        W[mask] = values
        tensors[f"{name}.weight"] = W
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return F.finish_loading(F.empty_skeleton(config, dtype), tensors, folder)


# ------------------------------------------------------------------------------------------ the format
def save(model: nn.Module, tokenizer, folder: Path, scale_dtype: torch.dtype | None = None) -> None:
    why = refuses(model)
    if why:
        raise ConfigError(why)
    if quantized_modules(model):
        save_packed(model, tokenizer, folder, scale_dtype)
    else:
        save_sparse(model, tokenizer, folder)


def refuses(model: nn.Module) -> str | None:
    from .native import runtime_modules

    if F.adapter_refusal(model):
        return F.adapter_refusal(model)
    qmods = quantized_modules(model)
    other = [n for n, m in runtime_modules(model).items() if n not in qmods]
    if other:
        return f"{other[0]} is an NF4/FP4 or LLM.int8() layer, which compressed-tensors does not hold"
    scaled = [n for n, m in qmods.items() if getattr(m, "input_scale", None) is not None]
    if scaled:
        return (f"{scaled[0]} divides its input by a per-channel scale (AWQ scales that could not be folded), "
                "which compressed-tensors checkpoints cannot hold; save in the slimlm format instead")
    if qmods and any(is_sparse(m.weight.detach()) for m in _block_linears(model).values()):
        return "the model has both packed and sparse float layers; save it in the slimlm format"
    if not qmods and not any(is_sparse(m.weight.detach()) for m in _block_linears(model).values()):
        return "the model has neither packed quantized layers nor sparse layers (quantize or prune it first)"
    return None


def recognise(path: Path, config: dict | None) -> bool:
    q = F.quantization_config(config)
    return q.get("quant_method") == "compressed-tensors" and (
        q.get("format") == "pack-quantized" or (q.get("sparsity_config") or {}).get("format") == "sparse-bitmask")


def load(folder: Path, dtype: torch.dtype | None = None, **_) -> nn.Module:
    config, qcfg = F.read_config(folder, "compressed-tensors")
    if qcfg.get("format") == "pack-quantized":
        return load_packed(folder, config, qcfg, dtype)
    return load_sparse(folder, config, dtype)


register_format(Format(
    "compressed-tensors", "compressed-tensors checkpoint: pack-quantized for a quantized model, sparse-bitmask "
    "for a pruned one; transformers with compressed-tensors loads it (tested)",
    recognise=recognise, load=load, save=save, refuses=refuses))
