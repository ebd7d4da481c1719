"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") as a pure function over one weight and the Hessian of its layer-wise loss.

The layer-wise objective is argmin_Q ||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) with H = 2/n sum_t x_t x_t^T.
Columns are quantized one at a time (OBQ with a fixed order) and the error of column q is spread over the
columns not yet quantized (paper eq. 2 / Alg. 1):
    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{q,:}
With U = upper Cholesky factor of H^-1 (H^-1 = U^T U), the rows of U are exactly the needed rows of the
successive H_F^-1 up to the scale [U]_qq, so one factorisation serves all columns. Updates inside a block of
`block_size` columns are applied eagerly, and to the rest of the matrix once per block (lazy batch updates).
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigError, SlimlmError
from .quant import (
    QuantResult,
    choose_qparams,
    dequantize,
    group_qparams,
    num_groups,
    quantize,
    search_group_qparams,
)

log = logging.getLogger(__name__)

_MAX_DAMP_RETRIES = 6


class HessianPrep(NamedTuple):
    """A Hessian ready for OBS-style solvers.

    hinv_u (in, in) fp32: upper Cholesky factor U of (H + lambda I)^-1, in `perm` order when perm is set.
    dead (in,) bool: inputs with H_ii == 0 (their weights must be zeroed by the caller).
    perm (in,) long or None: column order (descending diag(H)) when act_order was asked.
    damp: the relative damping finally used (larger than asked if the factorisation needed retries).
    """
    hinv_u: Tensor
    dead: Tensor
    perm: Tensor | None
    damp: float


def prepare_hessian(H: Tensor, damp: float = 0.01, *, act_order: bool = False) -> HessianPrep:
    """Dead inputs, optional act-order permutation, damping and Cholesky of the inverse (shared by GPTQ and
    SparseGPT).

    H (in, in): 2/n sum x x^T. Dead inputs (H_ii == 0) get H_ii = 1. lambda = damp * mean(diag(H)) is added
    to the diagonal; when a Cholesky factorisation fails, damp is multiplied by 10 and the factorisation
    retried (a warning is logged). The factorisations run in fp64 (fp32 on devices without fp64).
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (in, in), got {tuple(H.shape)}")
    dtype = torch.float64 if H.device.type in ("cpu", "cuda") else torch.float32
    H = H.detach().to(dtype, copy=True)
    if not torch.isfinite(H).all():
        raise SlimlmError("the Hessian contains NaN or inf; check the calibration data and the model's "
                          "activations")
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    mean_diag = float(torch.diagonal(H).mean())
    del diag   # a view: it would keep the unflipped copy alive
    # U (upper) with H^-1 = U^T U from ONE factorisation: with J the reversal permutation and J H J = L L^T,
    # H^-1 = J L^-T L^-1 J = U^T U for U = J L^-1 J, which is upper triangular. At most four (in, in) fp64
    # matrices are alive at once (the caller's Hessian not counted): 75 MB for a 1536-wide down_proj, where
    # building H + damp * I from an identity and flipping the sum held up to six.
    H = H.flip(0, 1)
    requested = damp
    for _ in range(_MAX_DAMP_RETRIES + 1):
        A = H.clone()
        A.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            eye = torch.eye(L.shape[0], dtype=dtype, device=L.device)
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            del L, eye
            U = Linv.float().flip(0, 1)
            del Linv
            if bool(torch.isfinite(U).all()):
                if damp != requested:
                    log.warning("Hessian not positive definite with damp=%g; used damp=%g", requested, damp)
                return HessianPrep(U, dead, perm, damp)
        log.info("Cholesky failed with damp=%g, retrying with more damping", damp)
        damp = damp * 10 if damp > 0 else 0.01
    raise SlimlmError(f"the Hessian is not positive definite even with damp={damp / 10:g}; "
                      "use more (or more varied) calibration samples")


def check_quant_args(bits: int, group_size: int, in_f: int) -> None:
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits must be in 2..8, got {bits}")
    if group_size > 0 and in_f % group_size:
        raise ConfigError(f"group_size {group_size} must divide in_features {in_f}; try 32, 64 or 128, or -1")


def aligned_block_size(block_size: int, *multiples: int) -> int:
    """block_size rounded up to a multiple of every positive entry of `multiples` (group size, M of N:M), so
    a group never straddles two blocks. Lazy batching is exact, so this does not change the maths."""
    step = math.lcm(*(m for m in multiples if m > 0), 1)
    return max(-(-block_size // step) * step, step)


def _group_layout(perm: Tensor, group_size: int, dynamic: bool) -> tuple[list[int], Tensor]:
    """(group of each column in processing order, g_idx (in,) = group of each ORIGINAL column)."""
    cols = torch.arange(perm.numel(), device=perm.device)
    if group_size <= 0:
        zeros = torch.zeros_like(cols)
        return zeros.tolist(), zeros
    if not dynamic:  # static groups: contiguous in the original order
        return (perm // group_size).tolist(), cols // group_size
    # dynamic: consecutive in processing order, original column perm[j] is in group j // group_size
    return (cols // group_size).tolist(), torch.empty_like(cols).scatter_(0, perm, cols // group_size)


def gptq_quantize(W: Tensor, H: Tensor, bits: int, group_size: int, symmetric: bool, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  range_search: bool = False, grid: tuple[Tensor, Tensor] | None = None) -> QuantResult:
    """GPTQ-quantize W (out, in) under Hessian H (in, in). Returns a QuantResult in the ORIGINAL column order.

    group_size: -1 per output channel, 0 per tensor, g > 0 groups of g columns. Per-group scale/zero are
    computed when the solver reaches the group's first column, from the current (error-updated) weights;
    with static_groups they are computed beforehand from the original W on contiguous original groups.
    act_order quantizes columns by descending diag(H); g_idx then maps each original column to its group
    (groups are consecutive in the processing order, or contiguous original groups with static_groups).
    range_search: scales computed up front (static groups, per channel) shrink each group's range by the
    factor that minimises the diag(H)-weighted rounding error (core.quant.search_group_qparams).
    grid: a given (scale, zero), each (out, G), of contiguous original groups: the codes are chosen on it
    with GPTQ's error feedback and the grid is returned unchanged (re-quantizing a merged weight onto the
    grid its layer already has).
    """
    out_f, in_f = W.shape
    check_quant_args(bits, group_size, in_f)
    prep = prepare_hessian(H.to(W.device), damp, act_order=act_order)
    W = W.detach().float().clone()
    W[:, prep.dead] = 0
    perm = prep.perm if prep.perm is not None else torch.arange(in_f, device=W.device)
    dynamic = group_size > 0 and not static_groups and grid is None
    col_group, g_idx = _group_layout(perm, group_size, dynamic)
    if grid is not None:
        scale, zero = (t.to(W.device, torch.float32).clone() for t in grid)
        if scale.shape != (out_f, num_groups(in_f, group_size)) or zero.shape != scale.shape:
            raise ConfigError(f"grid scale/zero of shape {tuple(scale.shape)}/{tuple(zero.shape)} do not fit "
                              f"{out_f} rows of {num_groups(in_f, group_size)} groups")
    elif dynamic:
        scale = W.new_zeros(out_f, num_groups(in_f, group_size))
        zero = torch.zeros_like(scale)
    elif range_search:  # original order: static groups
        scale, zero = search_group_qparams(W, bits, symmetric, group_size, torch.diagonal(H).to(W.device))
    else:
        scale, zero = group_qparams(W, bits, symmetric, group_size)
    # The solver works on W^T in processing order: column j of W is the contiguous row j, so each column's
    # rounding and the rank-one update of the columns after it are a handful of vector operations (the loop
    # below runs once per input column: 3264 times per SmolLM2 block). A column is final once the solver
    # has passed it, so a block's codes are rounded in one operation after the block.
    WT = W[:, perm].t().contiguous()
    del W
    gcol = torch.as_tensor(col_group, device=WT.device)
    codes_t = torch.empty(in_f, out_f, dtype=torch.uint8, device=WT.device)
    Hinv = prep.hinv_u
    block_size = aligned_block_size(block_size, group_size)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = WT[i1:i2]  # view: updated in place
        H1 = Hinv[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        if dynamic:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
        else:
            S1, Z1 = scale.t()[gcol[i1:i2]], zero.t()[gcol[i1:i2]]   # (cols, out): each column's scale, zero
        for i in range(i2 - i1):
            if dynamic and (i1 + i) % group_size == 0:
                s, z = choose_qparams(W1[i:i + group_size].t(), bits, symmetric)
                g = col_group[i1 + i]
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                S1[i:i + group_size], Z1[i:i + group_size] = s.t(), z.t()
            w, s, z = W1[i], S1[i], Z1[i]
            q = quantize(w, s, z, bits)
            e = torch.sub(w, dequantize(q, s, z, out=q), out=E1[i]).div_(H1[i, i])   # error / [H^-1]_ii
            W1[i + 1:].addmm_(H1[i, i + 1:, None], e[None], alpha=-1)
        codes_t[i1:i2] = quantize(W1, S1, Z1, bits)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), E1, alpha=-1)
    codes = codes_t[torch.argsort(perm)].t().contiguous()
    return QuantResult(codes, scale, zero, g_idx.to(torch.int32), bits, group_size, symmetric)
