"""Folders in bitsandbytes' checkpoint format, for models holding NF4Linear or Int8Linear layers.

config.json carries transformers' BitsAndBytesConfig as `quantization_config` (quant_method "bitsandbytes",
load_in_4bit / load_in_8bit, the 4-bit quant type and double quantization, the int8 threshold, and the
layers left in full precision as llm_int8_skip_modules); model.safetensors holds each layer's bitsandbytes
state (see NF4Linear / Int8Linear). transformers with bitsandbytes installed loads such a folder;
`load_bnb` loads it without bitsandbytes into slimlm's modules.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from slimlm.calibration import LinearInfo, is_linear
from slimlm.errors import SlimlmError
from slimlm.quant import serialize as S
from slimlm.quant.int8_linear import Int8Linear
from slimlm.quant.nf4_linear import NF4Linear

_NF4_KEY = ".weight.quant_state.bitsandbytes__"


def bnb_config(model: nn.Module) -> dict:
    """transformers' BitsAndBytesConfig (as a dict) describing the model's NF4Linear / Int8Linear layers."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if bool(nf4) == bool(int8):
        raise SlimlmError("a bitsandbytes checkpoint holds either 4-bit or 8-bit layers, not "
                          + ("both" if nf4 else "neither"))
    skip = [n for n, m in model.named_modules() if is_linear(m)]
    cfg = {"quant_method": "bitsandbytes", "load_in_4bit": bool(nf4), "load_in_8bit": bool(int8),
           "llm_int8_threshold": int8[0].threshold if int8 else 6.0, "llm_int8_has_fp16_weight": False,
           "llm_int8_skip_modules": skip or None, "llm_int8_enable_fp32_cpu_offload": False,
           "bnb_4bit_quant_type": nf4[0].quant_type if nf4 else "fp4",
           "bnb_4bit_use_double_quant": bool(nf4) and nf4[0].absmax2 is not None,
           "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}
    return cfg


def save_bnb(model: nn.Module, tokenizer, folder: str | os.PathLike) -> None:
    """Write the model into an existing (fresh) folder in bitsandbytes' format."""
    config = copy.deepcopy(model.config)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out, (NF4Linear, Int8Linear)) and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    config.quantization_config = bnb_config(model)
    S.write_folder(model, tokenizer, Path(folder), S.unique_tensors(model.state_dict()), config)


def load_bnb(folder: str | os.PathLike) -> nn.Module:
    """Load a bitsandbytes 4-bit or 8-bit checkpoint into NF4Linear / Int8Linear layers (no bitsandbytes
    needed)."""
    folder = Path(folder)
    config, qcfg = S.read_config(folder, "bitsandbytes")
    del config.quantization_config
    model = S.empty_skeleton(config)
    tensors = S.read_tensors(folder)
    four_bit = bool(qcfg.get("load_in_4bit"))
    prefixes = [k.split(_NF4_KEY)[0] for k in tensors if _NF4_KEY in k] if four_bit else \
        [k[:-len(".SCB")] for k in tensors if k.endswith(".SCB")]
    if not prefixes:
        raise SlimlmError(f"{folder}: no bitsandbytes {'4' if four_bit else '8'}-bit layers in the weights")
    for name in prefixes:
        lin = model.get_submodule(name)
        if not is_linear(lin):
            raise SlimlmError(f"{folder}: {name} is a {type(lin).__name__}, not a linear layer")
        info = LinearInfo(name, lin)
        has_bias = f"{name}.bias" in tensors
        if four_bit:
            new = NF4Linear(info.in_features, info.out_features, has_bias, device="meta")
        else:
            new = Int8Linear(info.in_features, info.out_features, has_bias,
                             float(qcfg.get("llm_int8_threshold", 6.0)), device="meta")
        S.set_submodule(model, name, new)
    return S.finish_loading(model, tensors, folder)
