"""bitsandbytes' checkpoint format, for models holding NF4Linear or Int8Linear layers (the default for them).

config.json carries transformers' BitsAndBytesConfig as `quantization_config` (quant_method "bitsandbytes",
load_in_4bit / load_in_8bit, the 4-bit quant type and double quantization, the int8 threshold, and the
layers left in full precision as llm_int8_skip_modules); model.safetensors holds each layer's bitsandbytes
state (see NF4Linear / Int8Linear). transformers with bitsandbytes installed loads such a folder;
`load_bnb` loads it without bitsandbytes into slimlm's modules.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..calibration import LinearInfo, is_linear
from ..errors import SlimlmError
from ..modules import set_submodule
from ..quant.int8_linear import Int8Linear
from ..quant.linear import QuantLinear
from ..quant.nf4_linear import NF4Linear
from ..registry import Format, register_format
from . import folder as F

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


def save(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write the model into an existing, empty folder in bitsandbytes' format."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = F.config_copy(model, bnb_config(model), untie=isinstance(out, (NF4Linear, Int8Linear)))
    F.write_folder(model, tokenizer, folder, F.unique_tensors(model.state_dict()), config)


def refuses(model: nn.Module) -> str | None:
    if F.adapter_refusal(model):
        return F.adapter_refusal(model)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (NF4Linear, Int8Linear, QuantLinear))}
    if kinds not in ({"NF4Linear"}, {"Int8Linear"}):
        return ("bitsandbytes checkpoints hold NF4/FP4 or LLM.int8() layers, one kind per model; this model has "
                + (", ".join(sorted(kinds)) if kinds else "none"))
    return None


def recognise(path: Path, config: dict | None) -> bool:
    return F.quantization_config(config).get("quant_method") == "bitsandbytes"


def load(folder: Path, **_) -> nn.Module:
    """Load a bitsandbytes 4-bit or 8-bit checkpoint into NF4Linear / Int8Linear layers (no bitsandbytes
    needed)."""
    config, qcfg = F.read_config(folder, "bitsandbytes")
    model = F.empty_skeleton(config)
    tensors = F.read_tensors(folder)
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
        set_submodule(model, name, new)
    return F.finish_loading(model, tensors, folder)


register_format(Format(
    "bitsandbytes", "transformers' bitsandbytes checkpoints (NF4/FP4 with double quantization, LLM.int8()); "
    "transformers with bitsandbytes loads them", recognise=recognise, load=load, save=save, refuses=refuses,
    default_rank=10))
