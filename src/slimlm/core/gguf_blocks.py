"""GGUF (ggml) weight blocks from integer codes and their scales, as llama.cpp stores them.

A GGUF weight of shape (out, in) is stored row by row; each row is cut into blocks of QK = 32 consecutive
input columns, and each block is a fixed-size record (ggml-common.h, little-endian, fp16 = IEEE half):

    Q4_0  18 bytes  d: fp16 | qs: uint8[16]          x[j] = (q[j] - 8) * d
    Q4_1  20 bytes  d: fp16 | m: fp16 | qs: uint8[16] x[j] = q[j] * d + m
    Q8_0  34 bytes  d: fp16 | qs: int8[32]            x[j] = qs[j] * d

with the 4-bit codes q[0..31] of a block packed two per byte: byte j (0 <= j < 16) holds q[j] in its low
nibble and q[j + 16] in its high nibble. The float types are plain arrays: F32, F16, and BF16 (the upper
16 bits of the fp32 value, rounded to nearest even).

slimlm's codes follow W_hat = (q - z) * s per group (core.quant). With groups that are whole numbers of
blocks (32, 64, 128 columns, or a whole row), the group's (s, z) repeats in each of its blocks and:
- asymmetric b-bit codes, b <= 4:       Q4_1 with d = s, m = -s * z (q stored as is)
- symmetric b-bit codes, b <= 4:        Q4_0 with d = s, q stored as q - z + 8 (z = 2^(b-1))
- symmetric 8-bit codes (z = 128):      Q8_0 with d = s, qs = q - 128
each exact up to the fp16 rounding of d (and m). Functions here are pure: tensors in, byte arrays out.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QK = 32                                       # weights per block of the legacy types
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
FLOAT_TYPES = ("f32", "f16", "bf16", "q8_0")


def _half_bytes(x: Tensor) -> Tensor:
    """(..., 1) float -> (..., 2) uint8: the little-endian bytes of its fp16 rounding."""
    h = x.to(torch.float16).contiguous().numpy().astype("<f2")
    return torch.from_numpy(h.view(np.uint8).copy())


def _nibbles(q: Tensor) -> Tensor:
    """Codes (N, B, 32) in [0, 15] -> (N, B, 16) bytes: q[j] low nibble, q[j + 16] high nibble."""
    q = q.to(torch.uint8)
    return q[..., :QK // 2] | (q[..., QK // 2:] << 4)


def _blocks(codes: Tensor) -> tuple[int, int, Tensor]:
    N, K = codes.shape
    if K % QK:
        raise ValueError(f"rows of {K} weights are not whole blocks of {QK}")
    return N, K // QK, codes.reshape(N, K // QK, QK)


def pack_q4_0(codes: Tensor, d: Tensor) -> np.ndarray:
    """Q4_0 rows (N, K/32 * 18) uint8 from codes (N, K) in [0, 15] (stored value, weight = (q - 8) * d) and
    d (N, K/32), one per block."""
    N, B, q = _blocks(codes)
    out = torch.cat([_half_bytes(d.reshape(N, B, 1)), _nibbles(q)], dim=-1)
    return out.reshape(N, B * BLOCK_BYTES["Q4_0"]).numpy()


def pack_q4_1(codes: Tensor, d: Tensor, m: Tensor) -> np.ndarray:
    """Q4_1 rows (N, K/32 * 20) uint8 from codes (N, K) in [0, 15] (weight = q * d + m), d and m (N, K/32)."""
    N, B, q = _blocks(codes)
    out = torch.cat([_half_bytes(d.reshape(N, B, 1)), _half_bytes(m.reshape(N, B, 1)), _nibbles(q)], dim=-1)
    return out.reshape(N, B * BLOCK_BYTES["Q4_1"]).numpy()


def pack_q8_0(qs: Tensor, d: Tensor) -> np.ndarray:
    """Q8_0 rows (N, K/32 * 34) uint8 from signed codes qs (N, K) in [-128, 127] (weight = qs * d) and d
    (N, K/32)."""
    N, B, q = _blocks(qs)
    q8 = q.to(torch.int8).contiguous().view(torch.uint8)
    out = torch.cat([_half_bytes(d.reshape(N, B, 1)), q8], dim=-1)
    return out.reshape(N, B * BLOCK_BYTES["Q8_0"]).numpy()


def block_params(p: Tensor, in_features: int, group_size: int) -> Tensor:
    """Per-group parameters (N, G) repeated for each block of 32 columns -> (N, in/32); the groups must be
    contiguous and whole numbers of blocks (group_size a multiple of 32, or <= 0: one group per row)."""
    span = in_features if group_size <= 0 else group_size
    if span % QK or in_features % span:
        raise ValueError(f"groups of {span} columns are not whole blocks of {QK}")
    return p.repeat_interleave(span // QK, dim=1)


def gguf_type(bits: int, symmetric: bool) -> str | None:
    """The block type that holds b-bit codes of this kind exactly (None: none does)."""
    if bits <= 4:
        return "Q4_0" if symmetric else "Q4_1"
    if bits == 8 and symmetric:
        return "Q8_0"
    return None


def pack_codes(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
               symmetric: bool) -> tuple[str, np.ndarray]:
    """(type name, rows (N, bytes per row) uint8) for codes (N, K) uint8 with contiguous groups and their
    scale, zero (N, G): W_hat = (q - z) * s, exactly up to the fp16 rounding of d (and m) per block (see the
    module docstring). Symmetric means z = 2^(bits-1) in every group (checked)."""
    qtype = gguf_type(bits, symmetric)
    if qtype is None:
        raise ValueError(f"no GGUF block type holds {'symmetric' if symmetric else 'asymmetric'} {bits}-bit codes "
                         "exactly")
    K = codes.shape[1]
    s = block_params(scale.float(), K, group_size)                     # (N, K/32)
    z = block_params(zero.float(), K, group_size)
    mid = 1 << (bits - 1)
    if symmetric and not bool((z == mid).all()):
        raise ValueError(f"symmetric codes need a zero point of {mid} in every group")
    q = codes.to(torch.int16)
    if qtype == "Q4_1":
        return qtype, pack_q4_1(q, s, -s * z)
    if qtype == "Q4_0":
        return qtype, pack_q4_0(q - mid + 8, s)
    return qtype, pack_q8_0(q - mid, s)


def pack_float(w: Tensor, kind: str) -> tuple[str, np.ndarray]:
    """(type name, array) of a float tensor in one of FLOAT_TYPES: F32/F16 as float arrays, BF16 as its
    rounded upper halves (uint16 viewed as bytes, shape (..., 2 * n)), Q8_0 by the gguf package's reference
    quantizer (d = absmax / 127 per block, qs = round(x / d)), rows (N, K/32 * 34)."""
    import gguf

    a = w.detach().float().cpu().contiguous().numpy()
    if kind == "f32":
        return "F32", a
    if kind == "f16":
        return "F16", a.astype(np.float16)
    if kind == "bf16":
        return "BF16", gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16)
    if kind == "q8_0":
        if a.shape[-1] % QK:
            raise ValueError(f"rows of {a.shape[-1]} weights are not whole blocks of {QK}")
        return "Q8_0", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    raise ValueError(f"float type {kind!r} is not one of {', '.join(FLOAT_TYPES)}")


def permute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a query/key projection (n_heads * head_dim, ...) from the rotary layout of Hugging Face
    checkpoints to the one of llama.cpp's "normal" rope (Llama, Mistral in GGUF).

    transformers rotates dimension i of a head with dimension i + head_dim/2 (rotate_half); llama.cpp's
    normal rope rotates the adjacent pair (2i, 2i + 1). Row 2i of a head in GGUF is therefore row i of the
    Hugging Face head and row 2i + 1 is row i + head_dim/2: out[h, 2i + c] = w[h, c * head_dim/2 + i].
    Works on any tensor whose first dimension holds the rows (weights, codes, scales, zero points, biases).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
