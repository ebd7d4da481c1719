"""GGUF: the single file llama.cpp (and the tools built on it) runs, written with the gguf package's writer.

What goes in (llama.cpp's names, `gguf.get_tensor_name_map`; shapes as (out, in) rows of blocks):
    token_embd.weight, output_norm.weight, output.weight (absent when tied to the embeddings),
    blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}.weight
    (+ attn_q/k/v.bias for Qwen2)
- packed layers (QuantLinear) as blocks of 32 input columns (slimlm.core.gguf_blocks): asymmetric 2/3/4-bit
  codes as Q4_1 (d = s, m = -s z), symmetric 2/3/4-bit as Q4_0, symmetric 8-bit as Q8_0, exact up to the
  fp16 rounding of d and m, when every run of 32 input columns lies in one group (group sizes 32, 64, 128,
  per channel; act-order only where its g_idx happens to keep that). Anything else (asymmetric 8-bit,
  groups of 16, scattered act-order groups) is refused unless accept_requantize=true, which rounds W_hat
  onto Q8_0 / Q4_1 with the gguf package's reference quantizer and logs the added error;
- float weights: 2-D ones as `float_type` (f16 by default; f32, bf16 or q8_0), norms and biases as f32;
- Llama/Mistral query and key rows permuted to llama.cpp's rope layout (core.gguf_blocks.permute_rope_rows);
- AWQ's explicit input scales on attn_output (a model with fewer key/value heads than heads, where AWQ
  cannot fold 1/s into v_proj): the key/value heads are repeated once per query head (as attention does)
  and each repeated v row divided by its scale, which is exact (a packed v_proj's scales are divided);
  the file then has as many key/value heads as heads (larger k/v weights and cache, same outputs);
- hyperparameters under the architecture's keys, and the tokenizer (gguf_vocab).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core import gguf_blocks as B
from ..errors import ConfigError
from ..quant.linear import QuantLinear
from ..registry import Format, register_format
from . import gguf_vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    gguf_name: str          # general.architecture and the prefix of its keys
    permute_qk: bool        # llama.cpp's "normal" rope: pairs (2i, 2i+1), not (i, i + d/2) as transformers


# transformers model_type -> how llama.cpp runs it
ARCHS = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "qwen2": Arch("qwen2", False)}
ROPE_TYPES = ("default", "linear")


@dataclass
class GGUFOptions:
    """Options of the gguf writer (`slimlm export --format gguf --option KEY=VALUE`)."""
    float_type: str = "f16"           # 2-D float weights (embeddings, unquantized linears): f32, f16, bf16, q8_0
    accept_requantize: bool = False   # round layouts no GGUF type holds exactly onto Q8_0 / Q4_1 (error logged)
    tokenizer_pre: str | None = None  # llama.cpp pre-tokenizer name, when it cannot be recognised

    def __post_init__(self) -> None:
        if self.float_type not in B.FLOAT_TYPES:
            raise ConfigError(f"float_type must be one of {', '.join(B.FLOAT_TYPES)} (got {self.float_type!r})")
        if isinstance(self.accept_requantize, str):
            v = self.accept_requantize.lower()
            if v not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"accept_requantize takes true or false, not {self.accept_requantize!r}")
            self.accept_requantize = v in ("true", "1", "yes")


@dataclass
class Packed:
    """A packed weight as rows: codes (N, K) uint8, scale and zero (N, G), g_idx (K,); W_hat = (q - z) * s."""
    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    bits: int
    symmetric: bool

    def rows(self, idx: Tensor) -> Packed:
        return dataclasses.replace(self, codes=self.codes[idx], scale=self.scale[idx], zero=self.zero[idx])

    def divide_rows(self, v: Tensor) -> Packed:
        return dataclasses.replace(self, scale=self.scale / v[:, None])

    def dequantize(self) -> Tensor:
        g = self.g_idx.long()
        return (self.codes.float() - self.zero.float()[:, g]) * self.scale[:, g]


def _rows(t: Tensor | Packed, idx: Tensor) -> Tensor | Packed:
    return t.rows(idx) if isinstance(t, Packed) else t[idx]


def _divide_rows(t: Tensor | Packed, v: Tensor) -> Tensor | Packed:
    if isinstance(t, Packed):
        return t.divide_rows(v)
    return t / (v if t.dim() == 1 else v[:, None])


# ------------------------------------------------------------------------------------------- checks
def _config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _arch(model: nn.Module) -> Arch:
    cfg = _config(model)
    arch = ARCHS.get(getattr(cfg, "model_type", None))
    if arch is None:
        raise ConfigError(f"the GGUF writer does not cover {type(model).__name__} (model_type "
                          f"{getattr(cfg, 'model_type', None)!r}); it covers: {', '.join(ARCHS)}")
    return arch


def refuses(model: nn.Module) -> str | None:
    """Why no GGUF file can hold the model (None: it can; layouts are checked while writing, where
    accept_requantize is known)."""
    from .folder import adapter_refusal
    from .native import runtime_modules

    try:
        _arch(model)
    except ConfigError as e:
        return str(e)
    if adapter_refusal(model):
        return adapter_refusal(model)
    other = [n for n, m in runtime_modules(model).items() if not isinstance(m, QuantLinear)]
    if other:
        return (f"{other[0]} is an NF4/int8 layer, which no GGUF type holds; quantize with rtn, gptq or awq "
                "(integer codes) to export to GGUF")
    cfg = _config(model)
    if getattr(cfg, "slimlm_structured", None):
        return "its layers have different sizes (non-uniform structured pruning), which the GGUF writer does not cover"
    rope = _rope(cfg)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return (f"rope type {rope.get('rope_type')!r} is not covered by the GGUF writer (covered: "
                f"{', '.join(ROPE_TYPES)})")
    return None


def _rope(cfg) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope = dict(rope)
    rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


# ------------------------------------------------------------------------------------------ tensors
def _collect(model: nn.Module, arch: Arch) -> tuple[dict[str, Tensor | Packed], dict[str, Tensor]]:
    """GGUF name -> float tensor or Packed weight, and GGUF name -> AWQ input scale of that layer."""
    import gguf

    cfg = _config(model)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    out: dict[str, Tensor | Packed] = {}
    scales: dict[str, Tensor] = {}
    seen: set[int] = set()

    def add(hf_name: str, value: Tensor | Packed) -> None:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"{hf_name} has no llama.cpp tensor name for {arch.gguf_name}; the GGUF writer "
                              f"does not cover this model's layout")
        out[name] = value

    for mname, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            add(f"{mname}.weight", Packed(mod.codes(), mod.scale.float(), mod.zero, mod.g_idx, mod.bits,
                                          mod.symmetric))
            if getattr(mod, "input_scale", None) is not None:
                scales[names.get_name(f"{mname}.weight", try_suffixes=(".weight",))] = mod.input_scale.float()
            if mod.bias is not None:
                add(f"{mname}.bias", mod.bias.detach().float())
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:                   # tied: llama.cpp reuses token_embd for the output
                continue
            seen.add(id(p))
            add(f"{mname}.{pname}", p.detach().float())
    return out, scales


def _expand_kv(t: dict[str, Tensor | Packed], scales: dict[str, Tensor], n_layers: int, n_head: int,
               n_kv: int, head_dim: int) -> None:
    """Fold each attn_output input scale into v by repeating the key/value heads per query head (query head
    h reads key/value head h // (n_head / n_kv), as transformers' repeat_kv) and dividing v's rows."""
    rep = n_head // n_kv
    idx = torch.tensor([(h // rep) * head_dim + d for h in range(n_head) for d in range(head_dim)])
    for i in range(n_layers):
        s = scales.pop(f"blk.{i}.attn_output.weight", torch.ones(n_head * head_dim))
        for kind in ("k", "v"):
            for suffix in ("weight", "bias"):
                key = f"blk.{i}.attn_{kind}.{suffix}"
                if key in t:
                    t[key] = _rows(t[key], idx)
                    if kind == "v":
                        t[key] = _divide_rows(t[key], s)


def _permute_qk(t: dict[str, Tensor | Packed], n_layers: int, n_head: int, n_kv: int) -> None:
    for i in range(n_layers):
        for kind, heads in (("q", n_head), ("k", n_kv)):
            for suffix in ("weight", "bias"):
                key = f"blk.{i}.attn_{kind}.{suffix}"
                if key in t:
                    rows = t[key].codes.shape[0] if isinstance(t[key], Packed) else t[key].shape[0]
                    t[key] = _rows(t[key], B.permute_rope_rows(torch.arange(rows), heads))


def _encode_packed(name: str, p: Packed, accept_requantize: bool) -> tuple[str, object, float | None]:
    """(type, bytes, added relative RMS error or None when exact)."""
    import gguf
    import numpy as np

    K = p.codes.shape[1]
    blocks = p.g_idx.reshape(K // B.QK, B.QK) if K % B.QK == 0 else None
    aligned = blocks is not None and bool((blocks == blocks[:, :1]).all())
    exact_type = B.gguf_type(p.bits, p.symmetric)
    if aligned and exact_type is not None:
        bg = blocks[:, 0].long()                                            # group of each block
        qtype, data = B.pack_codes(p.codes, p.scale[:, bg], p.zero[:, bg], p.bits, B.QK, p.symmetric)
        return qtype, data, None
    why = ("its groups do not cover whole blocks of 32 input columns (group size below 32 or act-order)"
           if not aligned else f"{'symmetric' if p.symmetric else 'asymmetric'} {p.bits}-bit codes fit no GGUF "
           "type exactly (asymmetric 8-bit has a zero point Q8_0 lacks)")
    if not accept_requantize:
        raise ConfigError(f"{name}: {why}; export with --option accept_requantize=true to round it onto "
                          "Q8_0/Q4_1 (the added error is reported), or quantize with a layout GGUF holds "
                          "(symmetric 8-bit, or 2-4 bits with groups of 32, 64, 128 or per channel)")
    if K % B.QK:
        raise ConfigError(f"{name}: rows of {K} weights are not whole blocks of 32; GGUF cannot hold it")
    w = p.dequantize()
    qtype = gguf.GGMLQuantizationType.Q8_0 if p.bits > 4 else gguf.GGMLQuantizationType.Q4_1
    data = gguf.quants.quantize(w.numpy(), qtype)
    back = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype))).reshape(w.shape)
    err = float((back - w).norm() / w.norm().clamp_min(1e-30))
    return qtype.name, data, err


def _encode(t: dict[str, Tensor | Packed], opts: GGUFOptions) -> tuple[list[tuple[str, object, str]], dict]:
    """[(name, array, type name)] and a report of what was re-quantized."""
    out, requant = [], {}
    for name, v in t.items():
        if isinstance(v, Packed):
            qtype, data, err = _encode_packed(name, v, opts.accept_requantize)
            if err is not None:
                requant[name] = err
        elif v.dim() >= 2:
            kind = opts.float_type if v.shape[-1] % B.QK == 0 or opts.float_type != "q8_0" else "f16"
            qtype, data = B.pack_float(v, kind)
        else:
            qtype, data = B.pack_float(v, "f32")
        out.append((name, data, qtype))
    return out, requant


# ------------------------------------------------------------------------------------------- writing
def save(model: nn.Module, tokenizer, path: Path, float_type: str = "f16", accept_requantize: bool | str = False,
         tokenizer_pre: str | None = None) -> dict:
    """Write the model as one GGUF file at `path` (see the module docstring); returns a report (tensor
    types, re-quantized layers with their added relative RMS error)."""
    import gguf

    opts = GGUFOptions(float_type, accept_requantize, tokenizer_pre)
    why = refuses(model)
    if why:
        raise ConfigError(why)
    arch, cfg = _arch(model), _config(model)
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tensors, scales = _collect(model, arch)
    if any(not k.endswith("attn_output.weight") for k in scales):
        bad = next(k for k in scales if not k.endswith("attn_output.weight"))
        raise ConfigError(f"{bad} divides its input by a per-channel scale (AWQ scales that could not be folded), "
                          "which GGUF cannot hold there; save in the slimlm format instead")
    if scales:
        _expand_kv(tensors, scales, n_layers, n_head, n_kv, head_dim)
        n_kv = n_head
    if arch.permute_qk:
        _permute_qk(tensors, n_layers, n_head, n_kv)
    encoded, requant = _encode(tensors, opts)          # every refusal happens before the file is opened
    vocab = gguf_vocab.tokenizer_keys(tokenizer, cfg.vocab_size, opts.tokenizer_pre,
                                      getattr(model, "slimlm_ref", None))
    types = Counter(q for _, _, q in encoded)
    w = gguf.GGUFWriter(str(path), arch.gguf_name)
    _write_hparams(w, cfg, n_kv, head_dim)
    w.add_file_type(_file_type(encoded, opts.float_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocab.write_keys(w, vocab)
    for name, data, qtype in encoded:
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    report = {"architecture": arch.gguf_name, "tensor_types": dict(types), "kv_heads": n_kv,
              "kv_heads_repeated_for_input_scales": bool(scales) or None}
    if requant:
        worst = max(requant, key=requant.get)
        log.warning("re-quantized %d layers (accept_requantize): added relative RMS error %.2e on average, %.2e "
                    "at most (%s)", len(requant), sum(requant.values()) / len(requant), requant[worst], worst)
        report["requantized"] = requant
    return {k: v for k, v in report.items() if v is not None}


def _file_type(encoded: list, float_type: str) -> int:
    import gguf

    T = gguf.LlamaFileType
    quant = Counter(q for name, _, q in encoded if q in ("Q4_0", "Q4_1", "Q8_0") and "blk." in name)
    if quant:
        return {"Q4_0": T.MOSTLY_Q4_0, "Q4_1": T.MOSTLY_Q4_1, "Q8_0": T.MOSTLY_Q8_0}[quant.most_common(1)[0][0]]
    return {"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16, "q8_0": T.MOSTLY_Q8_0}[float_type]


def _write_hparams(w, cfg, n_kv: int, head_dim: int) -> None:
    import gguf

    name = Path(str(getattr(cfg, "_name_or_path", "") or "")).name or (getattr(cfg, "architectures", None) or
                                                                       [type(cfg).__name__])[0]
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    window = getattr(cfg, "sliding_window", None)
    if window and (cfg.model_type != "qwen2" or getattr(cfg, "use_sliding_window", False)) \
            and window < cfg.max_position_embeddings:
        log.warning("the model attends within a sliding window of %d tokens; llama.cpp attends to the whole "
                    "context, so outputs differ beyond %d tokens", window, window)


register_format(Format(
    "gguf", "one GGUF file for llama.cpp (Llama, Mistral, Qwen2): packed 2-4-bit layers as Q4_0/Q4_1, 8-bit as "
    "Q8_0, exact up to fp16 block scales; options: float_type=f16|f32|bf16|q8_0, accept_requantize=true",
    save=save, refuses=refuses, suffix=".gguf"))
