"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"), optionally joint with GPTQ quantization, as a pure function over one weight and its Hessian.

Same column sweep as GPTQ (see core/gptq.py): for column j, the pruned (and quantized) value q_j replaces
w_j and the error is spread over the columns not yet processed:
    delta = -(w_j - q_j) / [H^-1]_jj * (H^-1)_{j,:}
The mask is chosen adaptively by the OBS saliency w^2 / [H^-1]_jj^2 (paper eq. 3 with U = chol(H^-1)):
unstructured, once per block of `block_size` columns over the whole (out, block) slab; N:M, every M
columns over each row's M weights.

Joint sparse + quantized: each column is pruned then quantized in the same pass. Pruned weights stay exactly
zero because 0 is always on the grid: the zero point z is an integer in [0, 2^b - 1] (asymmetric ranges
include 0, symmetric z = 2^(b-1)), so quantize(0) = z and dequantize(z) = (z - z) * s = 0 exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .gptq import HessianPrep, aligned_block_size, check_quant_args, prepare_hessian
from .prune import nm_mask, num_pruned, prune_smallest
from .quant import QuantResult, choose_qparams, default_g_idx, dequantize, group_qparams, num_groups, quantize


@dataclass
class SparseGPTResult:
    """weight (out, in) fp32: pruned and reconstructed (equal to quant.dequantize() when quantized);
    mask (out, in) bool, True = kept (a kept weight may still quantize to 0); quant: QuantResult or None."""
    weight: Tensor
    mask: Tensor
    quant: QuantResult | None = None


def _check_sparsity(sparsity: float | None, prune_n: int, prune_m: int, in_f: int) -> None:
    if prune_n or prune_m:
        if sparsity is not None:
            raise ConfigError("give either sparsity or prune_n:prune_m, not both")
        if not 0 < prune_n < prune_m or in_f % prune_m:
            raise ConfigError(f"N:M needs 0 < N < M and M dividing in_features {in_f}, "
                              f"got {prune_n}:{prune_m}; e.g. prune_n=2, prune_m=4")
    elif sparsity is None or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be a fraction in [0, 1) (or use prune_n:prune_m), got {sparsity}")


def sparsegpt_prune(W: Tensor, H: Tensor, *, sparsity: float | None, prune_n: int = 0, prune_m: int = 0,
                    block_size: int = 128, damp: float = 0.01,
                    quant: tuple[int, int, bool] | None = None, prep: HessianPrep | None = None) -> SparseGPTResult:
    """Prune W (out, in) under Hessian H (in, in) = 2/n sum x x^T, reconstructing the surviving weights.

    sparsity: fraction removed (exactly round(sparsity * out * in) weights over the layer). Or N:M with
    prune_n, prune_m: at most prune_n NON-ZERO weights in every prune_m consecutive inputs (2:4 keeps 2).
    quant: (bits, group_size, symmetric) to also GPTQ-quantize the kept weights; group scale/zero are taken
    when the sweep reaches the group, from the current weights with the pruned ones (known so far) zeroed;
    per channel (-1) they are taken once from the unpruned W. Pruned weights dequantize to exactly 0.
    prep: prepare_hessian(H, damp) already computed (layers sharing an input share it); H is then unused.
    """
    out_f, in_f = W.shape
    _check_sparsity(sparsity, prune_n, prune_m, in_f)
    bits, group_size, symmetric = quant if quant is not None else (0, 0, False)
    if quant is not None:
        check_quant_args(bits, group_size, in_f)
    if prep is None:
        prep = prepare_hessian(H.to(W.device), damp)
    W = W.detach().float().clone()
    W[:, prep.dead] = 0
    Hinv = prep.hinv_u
    if group_size > 0:
        scale = W.new_ones(out_f, num_groups(in_f, group_size))
        zero = torch.zeros_like(scale)
    elif quant is not None:  # per channel / per tensor: from the unpruned W (the range includes 0 anyway)
        scale, zero = group_qparams(W, bits, symmetric, group_size)
    # As in GPTQ, the sweep works on W^T: column j of W is the contiguous row j. Masks are chosen on scores
    # laid out as W, so ties among equal scores fall as they would in W's own order.
    WT = W.t().contiguous()
    del W
    MT = torch.ones_like(WT, dtype=torch.bool)
    codes_t = torch.zeros(in_f, out_f, dtype=torch.uint8, device=WT.device)
    block_size = aligned_block_size(block_size, group_size if quant else 0, prune_m)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, M1 = WT[i1:i2], MT[i1:i2]  # views (columns, out): updated in place
        H1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(H1)
        E1 = torch.empty_like(W1)
        if not prune_n:  # spread round(sparsity * numel) exactly over the blocks
            k = num_pruned(out_f * i2, sparsity) - num_pruned(out_f * i1, sparsity)
            M1.copy_(prune_smallest((W1.t() ** 2 / d ** 2).reshape(1, -1), k).reshape(out_f, i2 - i1).t())
        for i in range(i2 - i1):
            if prune_n and i % prune_m == 0:
                cols = slice(i, i + prune_m)
                M1[cols] = nm_mask(W1[cols].t() ** 2 / d[cols] ** 2, prune_n, prune_m).t()
            w = W1[i]
            q = torch.where(M1[i], w, 0.0)
            if quant is not None:
                q = _quantize_column(q, W1, M1, i, i1 + i, bits, group_size, symmetric, scale, zero, codes_t)
            err = torch.sub(w, q, out=E1[i]).div_(H1[i, i])
            W1[i + 1:].addmm_(H1[i, i + 1:, None], err[None], alpha=-1)
            w.copy_(q)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), E1, alpha=-1)
    W, mask = WT.t().contiguous(), MT.t().contiguous()
    del WT, MT
    result = None
    if quant is not None:
        g_idx = default_g_idx(in_f, group_size, W.device)
        result = QuantResult(codes_t.t().contiguous(), scale, zero, g_idx, bits, group_size, symmetric)
    return SparseGPTResult(W, mask, result)


def _quantize_column(q: Tensor, W1: Tensor, M1: Tensor, i: int, col: int, bits: int, group_size: int,
                     symmetric: bool, scale: Tensor, zero: Tensor, codes_t: Tensor) -> Tensor:
    """Quantize the pruned column q (out,) (row i of the block W1 = W^T[i1:i2], column col of the layer)
    and write its codes to codes_t (in, out). With groups, scale/zero of the group are computed at its first
    column from the current weights with the pruned entries known so far (mask M1) set to zero."""
    g = col // group_size if group_size > 0 else 0
    if group_size > 0 and col % group_size == 0:
        src = torch.where(M1[i:i + group_size], W1[i:i + group_size], 0.0).t()
        s, z = choose_qparams(src, bits, symmetric)
        scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
    s, z = scale[:, g], zero[:, g]
    c = quantize(q, s, z, bits)
    codes_t[col] = c.to(torch.uint8)
    return dequantize(c, s, z)
