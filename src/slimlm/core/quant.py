"""Uniform integer quantization primitives shared by RTN, GPTQ, AWQ and the runtime modules.

Convention (the one GPTQ and compressed-tensors use, written with unsigned codes):
    q = clamp(round(w / s) + z, 0, 2^b - 1),      w_hat = (q - z) * s
Asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto the 2^b codes, s = (max - min) / (2^b - 1),
z = round(-min / s). Symmetric: s = absmax / ((2^b - 1) / 2), z = 2^(b-1) (fixed), i.e. compressed-tensors'
signed grid [-2^(b-1), 2^(b-1) - 1] with zero point 0, shifted by 2^(b-1).

Granularity is expressed by `group_size`: 0 = one scale for the whole tensor, -1 = one per output row
(per-channel), g > 0 = one per row and per block of g consecutive input columns. A column-to-group map
`g_idx` (length in_features) generalises contiguous groups, as GPTQ's act-order needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def max_code(bits: int) -> int:
    """Largest unsigned code for `bits` bits (2^b - 1)."""
    return (1 << bits) - 1


def choose_qparams(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point per row of `w` (R, C), computed over its C columns.

    Returns (scale (R, 1) fp32, zero (R, 1) fp32 holding integers).
    """
    w = w.float()
    return range_qparams(w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0),
                         bits, symmetric)


def range_qparams(wmin: Tensor, wmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point mapping the range [wmin <= 0, wmax >= 0] (any matching shapes) onto the grid."""
    maxq = max_code(bits)
    if symmetric:
        scale = torch.maximum(wmin.abs(), wmax) / (maxq / 2)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int, *, out: Tensor | None = None) -> Tensor:
    """Integer codes (same shape as w, float dtype holding integers in [0, 2^b - 1]); written into `out`
    when given (solvers that round column after column reuse one buffer)."""
    return torch.div(w.float(), scale, out=out).round_().add_(zero).clamp_(0, max_code(bits))


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, *, out: Tensor | None = None) -> Tensor:
    """w_hat = (q - z) * s, in fp32; written into `out` when given (out=q dequantizes in place)."""
    return torch.sub(q.float(), zero, out=out).mul_(scale)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Quantize then dequantize: the value the quantized model will compute with."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def num_groups(in_features: int, group_size: int) -> int:
    """Number of scale columns per row for a layer with `in_features` inputs."""
    if group_size <= 0:
        return 1
    return (in_features + group_size - 1) // group_size


def default_g_idx(in_features: int, group_size: int, device=None) -> Tensor:
    """Column -> group map for contiguous groups (all zeros for per-tensor / per-channel)."""
    cols = torch.arange(in_features, device=device, dtype=torch.int32)
    if group_size <= 0:
        return torch.zeros_like(cols)
    return cols // group_size


def group_qparams(W: Tensor, bits: int, symmetric: bool, group_size: int) -> tuple[Tensor, Tensor]:
    """Scales and zero points for a weight W (out, in) at the given granularity.

    Returns (scale (out, G), zero (out, G)), G = num_groups(in, group_size).
    """
    out_f, in_f = W.shape
    if group_size == 0:
        s, z = choose_qparams(W.reshape(1, -1), bits, symmetric)
        return s.expand(out_f, 1).contiguous(), z.expand(out_f, 1).contiguous()
    if group_size < 0:
        return choose_qparams(W, bits, symmetric)
    if in_f % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {in_f}")
    G = in_f // group_size
    s, z = choose_qparams(W.reshape(out_f * G, group_size), bits, symmetric)
    return s.reshape(out_f, G), z.reshape(out_f, G)


def search_group_qparams(W: Tensor, bits: int, symmetric: bool, group_size: int, col_weight: Tensor | None = None,
                         *, grid: int = 20, max_shrink: float = 0.2) -> tuple[Tensor, Tensor]:
    """Like group_qparams, but each group's range [min, max] is shrunk by the factor (1 - k * max_shrink /
    grid), k = 0..grid, that minimises the group's rounding error sum_j c_j (w_j - w_hat_j)^2, with column
    weights c (in,) (e.g. the Hessian diagonal, the input's mean square; default 1). k = 0 is plain min-max,
    so the error never exceeds min-max's. Clipping a few outliers lets the other weights of the group use a
    finer grid (the "mse" range search of the GPTQ reference code, with a Hessian-diagonal weight here).
    """
    out_f, in_f = W.shape
    W = W.float()
    if group_size == 0:
        return group_qparams(W, bits, symmetric, group_size)
    gs = in_f if group_size < 0 else group_size
    if in_f % gs:
        raise ValueError(f"group size {gs} does not divide in_features {in_f}")
    G = in_f // gs
    Wg = W.reshape(out_f, G, gs)
    c = torch.ones(in_f, device=W.device) if col_weight is None else col_weight.float().to(W.device)
    c = c.reshape(1, G, gs)
    wmin = Wg.amin(dim=2, keepdim=True).clamp(max=0)
    wmax = Wg.amax(dim=2, keepdim=True).clamp(min=0)
    best_err = torch.full((out_f, G, 1), float("inf"), device=W.device)
    best_s = torch.ones_like(best_err)
    best_z = torch.zeros_like(best_err)
    t = torch.empty_like(Wg)
    for k in range(grid + 1):
        p = 1.0 - k * max_shrink / grid
        s, z = range_qparams(wmin * p, wmax * p, bits, symmetric)
        # fake_quantize(Wg, s, z) - Wg, in one buffer (the grid runs 21 times over the whole weight)
        dequantize(quantize(Wg, s, z, bits, out=t), s, z, out=t).sub_(Wg)
        err = t.square_().mul_(c).sum(dim=2, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s.reshape(out_f, G), best_z.reshape(out_f, G)


def quantize_grouped(W: Tensor, scale: Tensor, zero: Tensor, bits: int, g_idx: Tensor | None = None,
                     group_size: int = -1) -> Tensor:
    """Codes (out, in) as uint8 for W (out, in) with per-group qparams (out, G) and column map g_idx (in,)."""
    if g_idx is None:
        g_idx = default_g_idx(W.shape[1], group_size, W.device)
    g = g_idx.long()
    return quantize(W, scale[:, g], zero[:, g], bits).to(torch.uint8)


def dequantize_grouped(Q: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor | None = None,
                       group_size: int = -1) -> Tensor:
    """W_hat (out, in) fp32 from codes Q (out, in), qparams (out, G) and column map g_idx (in,)."""
    if g_idx is None:
        g_idx = default_g_idx(Q.shape[1], group_size, Q.device)
    g = g_idx.long()
    return dequantize(Q, scale[:, g], zero[:, g])


def dequantize_blocks(Q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """W_hat (out, in) fp32 for contiguous groups: Q (out, in) codes, scale and zero (out, G) with G
    dividing in, group j covering columns [j in/G, (j + 1) in/G). The same (q - z) * s as
    dequantize_grouped (bit for bit), by broadcasting over (out, G, in/G) instead of gathering (out, in)
    scale and zero tensors: 0.66 ms against 7.0 ms for 576 x 1536 weights (one thread)."""
    N, K = Q.shape
    G = scale.shape[1]
    W = Q.reshape(N, G, K // G).to(torch.float32, copy=True)
    return W.sub_(zero.float()[:, :, None]).mul_(scale[:, :, None]).reshape(N, K)


def rtn_quantize(W: Tensor, bits: int, symmetric: bool, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: returns (codes (out, in) uint8, scale (out, G), zero (out, G))."""
    scale, zero = group_qparams(W, bits, symmetric, group_size)
    return quantize_grouped(W, scale, zero, bits, group_size=group_size), scale, zero



@dataclass
class QuantResult:
    """A quantized weight in the common form every method returns and every runtime module accepts.

    codes (out, in) uint8 in [0, 2^bits - 1]; scale, zero (out, G) fp32 (zero holds integers);
    g_idx (in,) int32 maps input column -> group; W_hat = (codes - zero[:, g_idx]) * scale[:, g_idx].
    """
    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> Tensor:
        return dequantize_grouped(self.codes, self.scale, self.zero, self.g_idx)


def rtn_result(W: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantResult:
    """Round-to-nearest QuantResult of W (out, in)."""
    codes, scale, zero = rtn_quantize(W, bits, symmetric, group_size)
    return QuantResult(codes, scale, zero, default_g_idx(W.shape[1], group_size, W.device), bits, group_size,
                       symmetric)
