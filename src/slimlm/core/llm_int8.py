"""LLM.int8(): vector-wise int8 matrix multiplication with mixed-precision outlier decomposition
(Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale").

For a linear layer y = x W^T + b with x (T, in) and W (out, in):

    O = { j : |x_tj| >= threshold for some token t }                  (outlier feature columns)
    s_x[t] = max_{j : |x_tj| < threshold} |x_tj|,   s_w[o] = max_j |W_oj|        (vector-wise absmax)
    C_x = round(127 x / s_x[:, None]) with the columns in O set to 0,   C_w = round(127 W / s_w[:, None])

    y = (C_x C_w^T)_int32 * (s_x[:, None] s_w[None, :]) / 127^2  +  x[:, O] (C_w[:, O] s_w[:, None] / 127)^T + b

The first term is the int8 x int8 -> int32 product, rescaled by the outer product of the row (token) and
output-row scales; the second keeps the outlier features in floating point against the dequantized
weight columns. Conventions follow bitsandbytes: `>=` for the threshold, s_x over all sub-threshold entries
of a row (also those in outlier columns), round half to even, and threshold <= 0 (or inf) meaning no
decomposition, which is plain vector-wise int8.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError


def int8_quantize_weight(W: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8: W (out, in) -> (CB (out, in) int8, SCB (out,) fp32) with
    CB = round(127 W / SCB[:, None]), SCB = max_j |W_oj| (bitsandbytes' Int8Params CB / SCB)."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ConfigError(f"int8 weight quantization needs a 2-D floating-point weight (out, in), got "
                          f"{W.dtype} with shape {tuple(W.shape)}")
    CB, SCB = _rowwise_int8(W.detach().float())
    return CB, SCB


def int8_dequantize_weight(CB: Tensor, SCB: Tensor) -> Tensor:
    """W_hat (out, in) fp32 = CB * SCB[:, None] / 127."""
    return CB.float().mul_(SCB.float()[:, None] / 127.0)


def _rowwise_int8(A: Tensor, absA: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A (R, C) fp32 -> (round(127 A / s) int8 (R, C), s (R,) fp32), s = row absmax (zero rows: codes 0).
    absA: |A| where the caller has it already."""
    s = (A.abs() if absA is None else absA).amax(dim=1)
    mult = 127.0 / torch.where(s == 0, torch.ones_like(s), s)
    scaled = A * mult[:, None]
    return torch.round(scaled, out=scaled).to(torch.int8), s


def outlier_columns(x: Tensor, threshold: float) -> Tensor:
    """Indices (k,) int64 of the feature columns j of x (T, in) with |x_tj| >= threshold for some t.
    Empty when threshold <= 0 or infinite (no decomposition)."""
    if threshold <= 0 or math.isinf(threshold):
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero(x.abs().amax(dim=0) >= threshold).reshape(-1)


def int8_quantize_activations(x: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Vector-wise (per token) int8 of x (T, in) with outliers held back.

    Returns (C_x (T, in) int8 with the outlier columns zeroed, s_x (T,) fp32, outlier columns (k,) int64),
    as in the module docstring (bitsandbytes' int8_vectorwise_quant).
    """
    x = x.float()
    ax = x.abs()                                                      # (T, in), read twice
    if threshold <= 0 or math.isinf(threshold):
        return (*_rowwise_int8(x, ax), outlier_columns(x, threshold))
    cols = torch.nonzero(ax.amax(dim=0) >= threshold).reshape(-1)      # outlier_columns(x, threshold)
    if not cols.numel():
        return (*_rowwise_int8(x, ax), cols)
    out = ax >= threshold
    C, s = _rowwise_int8(x.masked_fill(out, 0.0), ax.masked_fill_(out, 0.0))
    C[:, cols] = 0
    return C, s, cols


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b^T for a (M, K) int8 and b (N, K) int8 -> (M, N) int32.

    Uses torch._int_mm (int8 x int8 -> int32) where the backend supports the shapes; otherwise an fp64
    matmul, exact because every partial sum is an integer below K * 127^2 < 2^53.
    """
    try:
        return torch._int_mm(a, b.t())
    except (RuntimeError, NotImplementedError):
        return (a.double() @ b.double().t()).to(torch.int32)


def int8_linear(x: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None = None,
                threshold: float = 6.0) -> Tensor:
    """LLM.int8() linear layer: x (..., in) against CB (out, in) int8, SCB (out,) fp32 -> y (..., out).

    The equation is in the module docstring; computed in fp32 and returned in x's dtype.
    threshold <= 0 or inf gives pure vector-wise int8 (no outlier decomposition).
    """
    if x.shape[-1] != CB.shape[1]:
        raise ConfigError(f"input has {x.shape[-1]} features but the int8 weight expects {CB.shape[1]}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()  # (T, in)
    Cx, sx, cols = int8_quantize_activations(x2, threshold)  # (T, in) int8, (T,), (k,)
    acc = int8_matmul(Cx, CB)  # (T, out) int32
    y = (sx[:, None] * SCB.float()[None, :]).mul_(acc).div_(127.0 * 127.0)   # acc * (s_x s_w^T) / 127^2
    if cols.numel():  # outlier features in floating point against the dequantized weight columns
        y += x2[:, cols] @ int8_dequantize_weight(CB[:, cols], SCB).t()
    if bias is not None:
        y += bias.float()
    return y.reshape(*lead, CB.shape[0]).to(x.dtype)
