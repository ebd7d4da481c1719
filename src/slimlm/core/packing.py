"""Bit packing of unsigned integer codes into int32 words (pure tensor functions).

Layout (the one GPTQ and compressed-tensors share): along the packed dimension the codes form one
little-endian bit stream, code i occupying bits [b*i, b*i + b) of the stream, and the stream is cut into
32-bit words. So for b = 4 the code i sits at bits 4*(i % 8) .. 4*(i % 8) + 3 of word i // 8 (eight per
word, low nibble first), b = 2 gives sixteen per word, b = 8 four per word, and b = 3 puts 32 codes in
3 words with codes 10 and 21 straddling a word boundary (GPTQ's 3-bit layout).

Words are returned as int32 (bit 31 is the sign bit; the bit pattern is what matters).
"""
from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def words_needed(n: int, bits: int) -> int:
    """Number of int32 words holding n codes of `bits` bits: ceil(n * bits / 32)."""
    return -(-n * bits // 32)


def check_packable(n: int, bits: int, what: str = "the packed dimension") -> None:
    """Raise ValueError unless n codes of `bits` bits fill a whole number of int32 words."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: bits must be one of {SUPPORTED_BITS}")
    if (n * bits) % 32:
        per = 32 // math.gcd(bits, 32)
        raise ValueError(
            f"{what} has length {n}, which does not fill whole int32 words at {bits} bits: "
            f"it must be a multiple of {per} (or pack with pad=True)")


def _layout(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 codes of a block: (word, shift, bits spilling into the next word)."""
    out = []
    for j in range(32):
        off = bits * j
        word, shift = divmod(off, 32)
        out.append((word, shift, max(0, shift + bits - 32)))
    return out


def pack_int32(codes: Tensor, bits: int, dim: int = -1, pad: bool = False) -> Tensor:
    """Pack unsigned codes along `dim` into int32 words.

    codes: integer tensor with values in [0, 2^bits - 1], length n along `dim`.
    Returns int32 with length ceil(n * bits / 32) along `dim` (other dims unchanged).
    Without `pad`, n * bits must be a multiple of 32 (ValueError otherwise); with `pad` the tail of the
    last word is filled with zero bits (compressed-tensors' convention for ragged lengths).
    """
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"pack_int32 expects integer codes, got {codes.dtype}")
    x = codes.movedim(dim, -1).to(torch.int64)
    n = x.shape[-1]
    if pad:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"cannot pack {bits}-bit codes: bits must be one of {SUPPORTED_BITS}")
    else:
        check_packable(n, bits)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    nblk = -(-n // 32)
    if nblk * 32 != n:
        x = torch.nn.functional.pad(x, (0, nblk * 32 - n))
    x = x.reshape(*x.shape[:-1], nblk, 32)                      # (..., blocks, 32 codes)
    words = torch.zeros(*x.shape[:-1], bits + 1, dtype=torch.int64, device=x.device)
    for j, (w, shift, spill) in enumerate(_layout(bits)):
        v = x[..., j]
        words[..., w] |= (v << shift) & 0xFFFFFFFF
        if spill:
            words[..., w + 1] |= v >> (bits - spill)
    words = words[..., :bits].reshape(*x.shape[:-2], nblk * bits)[..., :words_needed(n, bits)]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(packed: Tensor, bits: int, n: int | None = None, dim: int = -1) -> Tensor:
    """Inverse of pack_int32: unsigned codes as uint8 with length n along `dim`.

    packed: int32 words, length m along `dim`; n defaults to the full m * 32 / bits codes and must
    satisfy words_needed(n, bits) == m.
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32 expects int32 words, got {packed.dtype}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes: bits must be one of {SUPPORTED_BITS}")
    m = packed.shape[dim]
    if n is None:
        if (m * 32) % bits:
            raise ValueError(f"{m} words of {bits}-bit codes do not hold a whole number of codes: pass n")
        n = m * 32 // bits
    if words_needed(n, bits) != m:
        raise ValueError(f"{m} int32 words cannot hold exactly {n} codes of {bits} bits "
                         f"(that takes {words_needed(n, bits)} words)")
    if 8 % bits == 0 and sys.byteorder == "little":
        return _unpack_bytes(packed.movedim(dim, -1), bits, n).movedim(-1, dim).contiguous()
    w = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    nblk = -(-m // bits)
    if nblk * bits != m:
        w = torch.nn.functional.pad(w, (0, nblk * bits - m))
    w = w.reshape(*w.shape[:-1], nblk, bits)                     # (..., blocks, bits words)
    mask = (1 << bits) - 1
    cols = []
    for wi, shift, spill in _layout(bits):
        v = w[..., wi] >> shift
        if spill:
            v = v | (w[..., wi + 1] << (bits - spill))
        cols.append(v & mask)
    codes = torch.stack(cols, dim=-1).reshape(*w.shape[:-2], nblk * 32)[..., :n]
    return codes.to(torch.uint8).movedim(-1, dim).contiguous()


def _unpack_bytes(words: Tensor, bits: int, n: int) -> Tensor:
    """unpack_int32 along the last dim for widths that divide 8, on a little-endian host: the words' bytes
    are the bit stream in order, so each byte holds 8 / bits whole codes, the lowest bits first."""
    b = words.contiguous().view(torch.uint8)                              # (..., 4 m) bytes
    if bits == 8:
        return b[..., :n]
    mask = (1 << bits) - 1
    codes = torch.stack([(b >> (bits * i)) & mask for i in range(8 // bits)], dim=-1)
    return codes.reshape(*b.shape[:-1], -1)[..., :n]


def int4pack_cpu_codes(packed: Tensor, n: int, k: int, block_n: int = 64) -> Tensor:
    """The 4-bit codes (n, k) uint8 held by `aten._convert_weight_to_int4pack_for_cpu(codes (n, k) int32)`,
    read with bit operations instead of through the kernel.

    The layout (PyTorch 2.x, read off the converter's output for AVX-512, where block_n = 64): the output
    rows are cut into blocks of block_n, each stored as (k, block_n / 2) bytes whose byte [c, j] holds row j
    in its low nibble and row j + block_n / 2 in its high nibble; a last, shorter block of r rows is stored
    as (k, r / 2) bytes holding rows 2j (low) and 2j + 1 (high). The layout is private to the kernel and
    may differ by CPU capability: callers check the result against the codes they packed.
    """
    flat = packed.reshape(-1)
    full, r = divmod(n, block_n)
    head, half = full * k * block_n // 2, block_n // 2
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    if full:      # transpose the bytes (half as many as codes), then split the nibbles into whole rows
        b = flat[:head].view(full, k, half).transpose(1, 2).contiguous()       # (full, half, k)
        blocks = out[: full * block_n].view(full, block_n, k)
        torch.bitwise_and(b, 15, out=blocks[:, :half])                          # rows j
        torch.bitwise_right_shift(b, 4, out=blocks[:, half:])                   # rows j + half
    if r:
        t = flat[head:].view(k, r // 2).T.contiguous()                          # (r / 2, k)
        tail = out[full * block_n:].view(r // 2, 2, k)
        torch.bitwise_and(t, 15, out=tail[:, 0])                                # rows 2j
        torch.bitwise_right_shift(t, 4, out=tail[:, 1])                         # rows 2j + 1
    return out
