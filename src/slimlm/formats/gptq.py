"""GPTQ checkpoints (transformers via optimum + gptqmodel, vLLM, GPTQModel, AutoGPTQ), per quantized linear:
  qweight int32 (in*bits/32, out)   codes packed along `in` (slimlm.core.packing layout; 3-bit straddles)
  qzeros  int32 (G, out*bits/32)    zero points packed along `out`; checkpoint_format "gptq" (v1, the
                                    default every loader reads) stores z - 1, "gptq_v2" stores z
  scales  fp16  (G, out)            W_hat[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]
  g_idx   int32 (in,)               input column -> group (act-order: not sorted; desc_act=true)
with quantization_config {quant_method: gptq, bits, group_size, desc_act, sym, checkpoint_format, ...}.
v1 cannot hold a zero point of 0 (z - 1 = -1 does not fit the field), so such layers need "gptq_v2".
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.packing import pack_int32, unpack_int32
from ..core.quant import default_g_idx
from ..errors import ConfigError, SlimlmError
from ..quant.linear import QuantLinear
from ..registry import Format, register_format
from . import folder as F
from .packed import (
    is_act_order,
    plain_linears,
    quantized_modules,
    read_converted,
    uniform_scheme,
    write_converted,
)

GPTQ_FORMATS = ("gptq", "gptq_v2")


def to_gptq(m: QuantLinear, t: dict[str, Tensor], checkpoint_format: str = "gptq",
            scale_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """GPTQ tensors of one layer from its portable tensors (see module docstring)."""
    zero = unpack_int32(t["qzeros"], m.bits, m.out_features)                    # (G, N) true zero points
    if checkpoint_format == "gptq":
        if int(zero.min()) == 0:
            raise ConfigError("a zero point of 0 cannot be stored in GPTQ v1 (it stores z - 1); "
                              "export in the gptq_v2 format")
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


def _check(model: nn.Module, checkpoint_format: str) -> tuple[int, int, bool]:
    """The model's one (bits, group_size, symmetric), or ConfigError saying why GPTQ cannot hold it (a zero
    point of 0, which v1 cannot store, is found only while writing)."""
    del checkpoint_format
    if F.adapter_refusal(model):
        raise ConfigError(F.adapter_refusal(model))
    qmods = quantized_modules(model)
    if not qmods:
        raise ConfigError("the model has no packed quantized layers (quantize it with rtn, gptq or awq first)")
    scaled = [n for n, m in qmods.items() if getattr(m, "input_scale", None) is not None]
    if scaled:
        raise ConfigError(f"{scaled[0]} divides its input by a per-channel scale (AWQ scales that could not be "
                          "folded), which GPTQ checkpoints cannot hold; save in the slimlm format instead")
    bits, group_size, sym = uniform_scheme(qmods, "GPTQ")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain = [n for n in plain_linears(model) if model.get_submodule(n) is not out]
    if plain:
        raise ConfigError(f"GPTQ loaders quantize every linear of the decoder blocks, but {plain[:3]} are "
                          "not quantized; quantize them or use the slimlm / compressed-tensors format")
    return bits, group_size, sym


def save(model: nn.Module, tokenizer, folder: Path, checkpoint_format: str = "gptq") -> None:
    """Write a GPTQ checkpoint (config.json + quantize_config.json + model.safetensors + tokenizer) into an
    existing, empty folder."""
    bits, group_size, sym = _check(model, checkpoint_format)
    qmods = quantized_modules(model)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": any(m.act_order for m in qmods.values()), "sym": sym,
            "checkpoint_format": checkpoint_format, "static_groups": False, "true_sequential": True,
            "damp_percent": 0.01, "lm_head": isinstance(out, QuantLinear), "pack_dtype": "int32",
            "meta": {"quantizer": ["slimlm"]}}
    write_converted(model, tokenizer, folder, lambda name, m, t: to_gptq(m, t, checkpoint_format), qcfg,
                    extra_files={"quantize_config.json": qcfg})


def refuses(model: nn.Module, checkpoint_format: str = "gptq") -> str | None:
    try:
        _check(model, checkpoint_format)
    except ConfigError as e:
        return str(e)
    return None


def recognise(path: Path, config: dict | None) -> bool:
    return F.quantization_config(config).get("quant_method") == "gptq"


def load(folder: Path, dtype: torch.dtype | None = None, **_) -> nn.Module:
    """Load a GPTQ checkpoint (v1 or v2, from any tool) into slimlm QuantLinear layers (other weights cast to
    `dtype` if given)."""
    config, qcfg = F.read_config(folder, "gptq")
    fmt = qcfg.get("checkpoint_format") or "gptq"
    if fmt not in GPTQ_FORMATS:
        raise SlimlmError(f"{folder}: GPTQ checkpoint_format {fmt!r} is not supported (only {GPTQ_FORMATS})")
    bits, group_size, sym = int(qcfg["bits"]), int(qcfg.get("group_size", -1)), bool(qcfg.get("sym", True))
    tensors = F.read_tensors(folder)
    prefixes = [k[:-len(".qweight")] for k in tensors if k.endswith(".qweight")]

    def to_portable(name: str, lin: nn.Linear):
        t = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales")}
        g_idx = tensors.pop(f"{name}.g_idx", None)           # some writers omit it without act-order
        t["g_idx"] = default_g_idx(lin.in_features, group_size) if g_idx is None else g_idx
        p = from_gptq(t, bits, lin.in_features, lin.out_features, fmt)
        spec = {"bits": bits, "group_size": group_size, "symmetric": sym,
                "act_order": group_size > 0 and is_act_order(p["g_idx"], group_size), "method": "gptq"}
        return spec, p

    return read_converted(folder, config, tensors, prefixes, to_portable, dtype)


register_format(Format(
    "gptq", "GPTQ checkpoint, v1 layout (zero points stored minus one): transformers (optimum + gptqmodel) "
    "loads it (tested)", recognise=recognise, load=load, save=save, refuses=refuses))
register_format(Format(
    "gptq_v2", "GPTQ checkpoint, v2 layout (true zero points, any zero point allowed)",
    save=partial(save, checkpoint_format="gptq_v2"), refuses=partial(refuses, checkpoint_format="gptq_v2")))
