"""Compact storage of sparse weights, bit-exact.

Encodings of one tensor W (rows = all leading dims, columns = the last dim), a dict of tensors each:
- dense:   {"dense": W}
- bitmask: {"shape": int64 (ndim,), "bitmask": uint8 (R, ceil(C/8)), "values": (nnz,) W.dtype}
           bit j of byte k in a row flags column 8k + j (numpy packbits with bitorder="little", the layout of
           compressed-tensors' sparse-bitmask); values are the flagged elements in row-major order.
- N:M:     {"shape", "nm": uint8 [N, M], "codes": uint8, "values": (R, C/M*N) W.dtype}
           every group of M consecutive columns keeps N positions; the group's code is the rank of its
           position set among the C(M, N) sets in lexicographic order (3 bits for 2:4, 7 for 4:8), the codes
           bit-packed little-endian into bytes. Fewer than N nonzeros in a group are padded with stored zeros.
Zeros are +0.0 and -0.0 (as in compressed-tensors, which keeps W != 0): every other value, NaN included,
comes back bit for bit and zeros come back as +0.0. Prune with torch.where / masked_fill rather than W * mask
(which leaves -0.0) when the zero's sign should survive. `compress_sparse` picks the smallest encoding.

Files are the format registry's business: slimlm's folder format (slimlm.formats.native) stores tensors in
these encodings, and compressed-tensors' `sparse-bitmask` layout (slimlm.formats.compressed_tensors) uses the
bitmask one.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

FIELDS = ("dense", "shape", "bitmask", "nm", "codes", "values")
SPARSE_MIN_ZEROS = 0.25      # is_sparse: a pruned weight; a dense one has few exact zeros (the default model's
                             # fp32 weights, decoded from 4-bit codes, have about 6%)
NM_CHOICES = (4, 8)           # group sizes M tried for N:M encodings
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------------ pure helpers
def nonzero_mask(W: Tensor) -> Tensor:
    """True where W is not +0.0 or -0.0 (NaN counts as a value), read from the bits so any float works."""
    if not W.is_floating_point():
        return W != 0
    bits = W.contiguous().view(_INT_OF_SIZE[W.element_size()])
    if W.element_size() == 1:
        return (bits & 0x7F) != 0
    sign = torch.tensor(1, dtype=bits.dtype) << (8 * W.element_size() - 1)
    return (bits & ~sign) != 0


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool (..., C) along the last dim into uint8 (..., ceil(C/8)), little-endian bit order."""
    C = mask.shape[-1]
    pad = (-C) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(*mask.shape[:-1], -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
    return (m * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of pack_bits: bool (..., cols)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :cols].bool()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer codes (n,) of `bits` bits each as one little-endian bit stream in uint8."""
    shifts = torch.arange(bits, device=codes.device)
    return pack_bits(((codes.long()[:, None] >> shifts) & 1).reshape(-1).bool())


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_codes: int64 (n,)."""
    b = unpack_bits(packed, n * bits).reshape(n, bits).long()
    return (b << torch.arange(bits, device=packed.device)).sum(-1)


def _combos(n: int, m: int, device=None) -> tuple[Tensor, Tensor]:
    """(positions (C, n) of every n-subset of range(m) in lexicographic order, lut (2^m,) pattern -> rank)."""
    pos = torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long, device=device)
    lut = torch.full((1 << m,), -1, dtype=torch.long, device=device)
    lut[(1 << pos).sum(-1)] = torch.arange(pos.shape[0], device=device)
    return pos, lut


def _code_bits(n: int, m: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def _as_bits(W: Tensor) -> Tensor:
    """The same memory as integers: indexing them moves values bit for bit (floats may canonicalise NaNs)."""
    return W.contiguous().view(_INT_OF_SIZE[W.element_size()]) if W.is_floating_point() else W


def encode_bitmask(W: Tensor) -> dict[str, Tensor]:
    W2 = W.reshape(-1, W.shape[-1]) if W.dim() else W.reshape(1, 1)
    mask = nonzero_mask(W2)
    return {"shape": torch.tensor(list(W.shape), dtype=torch.long), "bitmask": pack_bits(mask),
            "values": _as_bits(W2)[mask].view(W.dtype)}


def nm_of(W: Tensor, m: int) -> int | None:
    """Smallest N such that W is N:M sparse along its last dim (None if C is not a multiple of M)."""
    if W.dim() == 0 or W.shape[-1] % m:
        return None
    return int(nonzero_mask(W).reshape(-1, m).sum(-1).max()) if W.numel() else 0


def encode_nm(W: Tensor, n: int, m: int) -> dict[str, Tensor]:
    """N:M encoding; W must hold at most n nonzeros in every group of m consecutive columns."""
    groups = W.reshape(-1, m)                                          # (R * C/m, m)
    mask = nonzero_mask(groups)
    if int(mask.sum(-1).max()) > n:
        raise ValueError(f"tensor is not {n}:{m} sparse")
    key = (~mask).long() * m + torch.arange(m, device=W.device)      # nonzeros first, then by position
    pos = torch.sort(torch.argsort(key, dim=-1)[:, :n], dim=-1).values  # (G, n)
    _, lut = _combos(n, m, W.device)
    codes = lut[(1 << pos).sum(-1)]
    values = torch.gather(_as_bits(groups), 1, pos).view(W.dtype).reshape(*W.shape[:-1], W.shape[-1] // m * n)
    return {"shape": torch.tensor(list(W.shape), dtype=torch.long), "nm": torch.tensor([n, m], dtype=torch.uint8),
            "codes": pack_codes(codes, _code_bits(n, m)), "values": values}


def is_sparse(W: Tensor) -> bool:
    """Whether W looks pruned: at least SPARSE_MIN_ZEROS of its elements are exact zeros."""
    return W.numel() > 0 and 1 - int(nonzero_mask(W).sum()) / W.numel() >= SPARSE_MIN_ZEROS


def nbytes(enc: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in enc.values())


def compress_sparse(W: Tensor, encoding: str = "auto") -> dict[str, Tensor]:
    """Encode W as dense, bitmask or N:M (see module docstring); "auto" picks the fewest bytes."""
    W = W.detach().contiguous()
    if encoding == "dense":
        return {"dense": W}
    if encoding == "bitmask":
        return encode_bitmask(W)
    if encoding == "nm":
        cands = [(n, m) for m in NM_CHOICES if (n := nm_of(W, m)) is not None and 0 < n < m]
        if not cands:
            raise ValueError(f"tensor of shape {tuple(W.shape)} has no N:M pattern with M in {NM_CHOICES}")
        return min((encode_nm(W, n, m) for n, m in cands), key=nbytes)
    if encoding != "auto":
        raise ValueError(f"encoding must be auto, dense, bitmask or nm, not {encoding!r}")
    best = {"dense": W}
    nnz, size = int(nonzero_mask(W).sum()), W.element_size()
    worth_bitmask = nnz * size + W.numel() / 8 < W.numel() * size  # else skip copying out nearly every value
    for enc in ("bitmask", "nm") if worth_bitmask else ("nm",):
        try:
            cand = compress_sparse(W, enc)
        except ValueError:
            continue
        if nbytes(cand) < nbytes(best):
            best = cand
    return best


def decompress_sparse(enc: dict[str, Tensor]) -> Tensor:
    """Rebuild the exact tensor from any encoding produced by compress_sparse."""
    if "dense" in enc:
        return enc["dense"]
    shape, values = [int(s) for s in enc["shape"]], enc["values"]
    if "bitmask" in enc:
        cols = shape[-1] if shape else 1
        mask = unpack_bits(enc["bitmask"], cols)
        out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
        _as_bits(out)[mask] = _as_bits(values)
        return out.reshape(shape)
    n, m = (int(x) for x in enc["nm"])
    G = math.prod(shape) // m
    pos, _ = _combos(n, m, values.device)
    where = pos[unpack_codes(enc["codes"], _code_bits(n, m), G)]     # (G, n)
    out = torch.zeros(G, m, dtype=values.dtype, device=values.device)
    _as_bits(out).scatter_(1, where, _as_bits(values).reshape(G, n))
    return out.reshape(shape)
