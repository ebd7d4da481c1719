"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Scaling (paper sec. 3.2): quantize W diag(s) and fold diag(s)^-1 into the producer of x, so the layer computes
Q(W diag(s)) (diag(s)^-1 x). With s = s_x^alpha, s_x the mean |x| per input channel, the salient channels get
finer relative precision; alpha in [0, 1) is grid-searched on the layer's output error (eq. 5).
Clipping: per group, the range max|w| is shrunk by a ratio that minimises the group's output error.

These functions work on whatever W and X they get: after scaling, pass W * s and X / s to the clip search.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigError
from .quant import (
    QuantResult,
    default_g_idx,
    group_qparams,
    max_code,
    quantize_grouped,
    range_qparams,
)


def awq_scales(act_abs_mean: Tensor, alpha: float, weight_mean: Tensor | None = None) -> Tensor:
    """Per-input-channel scales s (in,) = a^alpha, or with `weight_mean` ("duo" scaling, as llm-compressor's
    AWQ does by default) a^alpha / (m^(1 - alpha) + 1e-4), m = weight_channel_mean of the group's weights:
    channels with small weights relative to their group's range are scaled up more. Floored at 1e-4, divided
    by sqrt(max(s) * min(s)) so the scales are centred on 1 in log scale (as the reference normalises them).
    alpha = 0 without weight_mean gives 1.
    """
    s = act_abs_mean.detach().float().pow(alpha)
    if weight_mean is not None:
        s = s / (weight_mean.float().pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_channel_mean(weights: list[Tensor], group_size: int) -> Tensor:
    """m (in,): mean over every output row of the layers of |w_ij| / max|w| of its quantization group (per
    channel: of its row), i.e. how much of its group's range each input channel's weights use."""
    total = None
    rows = 0
    for W in weights:
        g = _grouped(W.detach().float().abs(), group_size)                     # (out, G, g)
        rel = (g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(W.shape)
        total = rel.sum(0) if total is None else total + rel.sum(0)
        rows += W.shape[0]
    return total / rows


class GridResult(NamedTuple):
    scales: Tensor        # (in,) the best scales
    alpha: float          # their exponent
    duo: bool             # whether they are duo scales (divided by the weight term)
    losses: list[float]   # loss per grid point, family by family in the order awq_grid_search documents
    stat: str = "mean"    # the activation statistic of the best scales: "mean" (mean |x|) or "rms"


def awq_grid_search(act_abs_mean: Tensor, loss_fn: Callable[[Tensor], float], n_grid: int = 20,
                    weight_mean: Tensor | None = None, act_rms: Tensor | None = None) -> GridResult:
    """Search alpha in {0, 1/n, ..., (n-1)/n} minimising loss_fn(awq_scales(act_abs_mean, alpha)); with
    `weight_mean` the duo scales awq_scales(act_abs_mean, alpha, weight_mean) are searched too, after them;
    with `act_rms` (sqrt(E[x^2]) per channel) the same family or two again on that statistic, after those.

    loss_fn(s) should return the output error of the layer(s) quantized with W diag(s), e.g.
    ||X W^T - (X / s) Q(W diag(s))^T||^2. alpha = 0 (s = 1, plain RTN) is always tried, so the best loss is
    never above RTN's, and searching several families is never worse on loss_fn than any one alone.
    """
    if n_grid < 1:
        raise ConfigError(f"n_grid must be >= 1, got {n_grid}")
    stats = [("mean", act_abs_mean)] + ([("rms", act_rms)] if act_rms is not None else [])
    weights = (None, weight_mean) if weight_mean is not None else (None,)
    losses: list[float] = []
    best: GridResult | None = None
    best_loss = math.inf
    for stat, act in stats:
        for wm in weights:
            for k in range(n_grid):
                alpha = k / n_grid
                s = awq_scales(act, alpha, wm)
                loss = float(loss_fn(s))
                losses.append(loss)
                if loss < best_loss:
                    best_loss, best = loss, GridResult(s, alpha, wm is not None, [], stat)
    if best is None:
        raise ValueError("loss_fn returned NaN for every alpha; check the calibration activations")
    return best._replace(losses=losses)


def scaled_fake_quantize(W: Tensor, s: Tensor, bits: int, group_size: int, symmetric: bool) -> Tensor:
    """Q(W diag(s)) diag(s)^-1 (out, in): the effective weight AWQ scaling yields, for use in a loss_fn."""
    Ws = W.float() * s.unsqueeze(0)
    scale, zero = group_qparams(Ws, bits, symmetric, group_size)              # (out, G); per tensor: G = 1
    Wg = Ws.reshape(Ws.shape[0], scale.shape[1], -1)                           # (out, G, g)
    return _fake_quant_grouped(Wg, scale, zero, bits).reshape(W.shape) / s.unsqueeze(0)


def _fake_quant_grouped(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """(q - z) * s for contiguous groups Wg (out, G, g) and qparams (out, G), by broadcasting (the same
    arithmetic as quantize/dequantize without materialising per-column copies of the qparams)."""
    sc, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (torch.clamp(torch.round(Wg / sc) + z, 0, (1 << bits) - 1) - z) * sc


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """(R, in) -> (R, G, g); per channel (group_size -1) is one group of all inputs."""
    g = x.shape[1] if group_size < 0 else group_size
    return x.reshape(x.shape[0], -1, g)


def quantize_clipped(W: Tensor, max_abs: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantResult:
    """RTN-quantize W (out, in) after clamping every group to [-max_abs, max_abs], max_abs (out, G).

    group_size -1 (max_abs (out, 1)) or g > 0 dividing in. Scale/zero are taken from the clamped weights.
    """
    if group_size == 0 or (group_size > 0 and W.shape[1] % group_size):
        raise ConfigError(f"clipping needs group_size -1 or a divisor of in_features {W.shape[1]}, "
                          f"got {group_size}")
    m = max_abs.float().unsqueeze(-1)
    Wc = torch.maximum(torch.minimum(_grouped(W.float(), group_size), m), -m).reshape(W.shape)
    scale, zero = group_qparams(Wc, bits, symmetric, group_size)
    codes = quantize_grouped(Wc, scale, zero, bits, group_size=group_size)
    return QuantResult(codes, scale, zero, default_g_idx(W.shape[1], group_size, W.device), bits, group_size,
                       symmetric)


def _refit_scales(Wg: Tensor, grams: Tensor, scale: Tensor, zero: Tensor, err: Tensor, bits: int,
                  rounds: int, move_zero: bool = False) -> tuple[Tensor, Tensor]:
    """Least-squares step sizes (see awq_range_search's `refit`): Wg (out, G, g), grams (G, g, g), scale,
    zero and their output error err (out, G); returns the refitted (scale, zero) (out, G). With `move_zero`
    each round also tries the zero points one step down and one step up (each with its own least-squares
    step size)."""
    maxq = max_code(bits)
    CW = torch.bmm(Wg.transpose(0, 1), grams)                                  # (G, out, g): C w per row
    for _ in range(rounds):
        improved = False
        for dz in ((0, -1, 1) if move_zero else (0,)):
            z = (zero + dz).clamp(0, maxq)
            D = (torch.clamp(torch.round(Wg / scale.unsqueeze(-1)) + z.unsqueeze(-1), 0, maxq)
                 - z.unsqueeze(-1)).transpose(0, 1)                            # (G, out, g): q - z
            num = (CW * D).sum(-1).transpose(0, 1)                             # w^T C d  (out, G)
            den = (torch.bmm(D, grams) * D).sum(-1).transpose(0, 1)            # d^T C d  (out, G)
            cand = torch.where((den > 0) & (num > 0), num / den.clamp(min=1e-30), scale)
            E = (Wg - _fake_quant_grouped(Wg, cand, z, bits)).transpose(0, 1)
            new_err = (torch.bmm(E, grams) * E).sum(-1).transpose(0, 1)
            better = new_err < err
            if bool(better.any()):
                improved = True
                scale, zero = torch.where(better, cand, scale), torch.where(better, z, zero)
                err = torch.where(better, new_err, err)
        if not improved:
            break
    return scale, zero


def group_output_error(W: Tensor, W_hat: Tensor, gram: Tensor, group_size: int) -> Tensor:
    """Per-group output error (out, G): e_og^T C_g e_og with e = W - W_hat and C_g = X_g^T X_g / n (G, g, g),
    i.e. the mean over samples of (X_g (W_g - W_hat_g)^T)^2, ignoring cross-group terms."""
    E = _grouped(W.float() - W_hat, group_size).transpose(0, 1)  # (G, out, g)
    return (torch.bmm(E, gram) * E).sum(-1).transpose(0, 1)


def group_grams(gram: Tensor, group_size: int) -> Tensor:
    """The diagonal blocks (G, g, g) of a second-moment matrix gram (in, in) for groups of g consecutive
    inputs (group_size -1: one group of all inputs)."""
    n = gram.shape[0]
    g = n if group_size < 0 else group_size
    G = n // g
    return gram.reshape(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def awq_range_search(W: Tensor, gram: Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int = 20,
                     max_shrink: float = 0.5, refine: bool = False, refit: int = 0,
                     refit_zero: bool = False) -> QuantResult:
    """Clipping as a per-group range search; returns the quantized W (out, in) on the chosen grids.

    gram (in, in) = E[x x^T] over the calibration inputs x of W (of the scaled inputs x / s after AWQ
    scaling). Candidates for r in {1, 1 - 1/n_grid, ..., 1 - max_shrink}: the clamp to [-r max|w|, r max|w|]
    of the AWQ reference (it cuts only the side of the group that reaches beyond r max|w|) and, asymmetric,
    the group's [min, max] scaled by r (both sides cut alike). The candidate of least output error
    E[(x_g . (w_g - w_hat_g))^2] wins per group, so the result is never worse on that criterion than
    either family, nor than plain min-max (r = 1), which is only beaten strictly.
    `refine` (asymmetric only) then moves each end on its own: the lower end over min * r with the upper end
    kept, then the upper end over max * r with the lower end kept; again only a strictly better range wins.
    `refit` rounds of a least-squares step size follow: with the zero point z and the codes q of the best grid
    fixed, the scale minimising the group's output error is (w^T C d) / (d^T C d) with d = q - z and C the
    group's block of gram; the codes are rounded again on that scale and the new grid kept only where its
    error (after that rounding) is strictly lower. `refit_zero` (asymmetric only): each round also tries every
    zero point one step down and one step up, each with its own least-squares step size.
    """
    if not 0.0 <= max_shrink < 1.0:
        raise ConfigError(f"max_shrink must be in [0, 1), got {max_shrink}")
    if group_size == 0 or (group_size > 0 and W.shape[1] % group_size):
        raise ConfigError(f"clipping needs group_size -1 or a divisor of in_features {W.shape[1]}, "
                          f"got {group_size}")
    W = W.float()
    grams = group_grams(gram.float(), group_size)                          # (G, g, g)
    Wg = _grouped(W, group_size)                                           # (out, G, g)
    wmin, wmax = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)        # (out, G)
    absmax = torch.maximum(-wmin, wmax)
    best_err = torch.full_like(wmin, math.inf)
    best_lo, best_hi = wmin.clone(), wmax.clone()

    def consider(lo: Tensor, hi: Tensor) -> None:
        nonlocal best_err, best_lo, best_hi
        scale, zero = range_qparams(lo, hi, bits, symmetric)
        W_hat = _fake_quant_grouped(Wg, scale, zero, bits).reshape(W.shape)
        err = group_output_error(W, W_hat, grams, group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)

    ratios = [1 - k / n_grid for k in range(round(max_shrink * n_grid) + 1)]
    for k, r in enumerate(ratios):
        consider(torch.maximum(wmin, -r * absmax), torch.minimum(wmax, r * absmax))
        if not symmetric and k > 0:
            consider(wmin * r, wmax * r)
    if refine and not symmetric:
        hi = best_hi.clone()
        for r in ratios:
            consider(wmin * r, hi)
        lo = best_lo.clone()
        for r in ratios:
            consider(lo, wmax * r)
    best_s, best_z = range_qparams(best_lo, best_hi, bits, symmetric)
    if refit > 0:
        best_s, best_z = _refit_scales(Wg, grams, best_s, best_z, best_err, bits, refit,
                                       move_zero=refit_zero and not symmetric)
    g_idx = default_g_idx(W.shape[1], group_size, W.device)
    codes = quantize_grouped(W, best_s, best_z, bits, g_idx)
    return QuantResult(codes, best_s, best_z, g_idx, bits, group_size, symmetric)
