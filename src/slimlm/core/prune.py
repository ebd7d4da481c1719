"""Pruning masks: magnitude, Wanda (Sun et al. 2023) and N:M patterns.

Every mask is boolean with True = KEPT, shaped like the weight W (out, in).

Sparsity is given either as a fraction of weights to remove (`0.5`) or as an N:M pattern. N:M follows the
standard meaning: at most N non-zero weights in every M consecutive input weights of a row, so "2:4" keeps
2 of every 4 and "4:8" keeps 4 of every 8 (both 50 % sparse), "1:4" keeps 1 of 4 (75 % sparse).

Counts are exact: a fraction s prunes round(s * numel) weights of the comparison group (exactly, whatever
the ties), ties being broken towards the lower flat index so results are deterministic.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

Sparsity = float | tuple[int, int] | str


def parse_sparsity(spec: Sparsity) -> float | tuple[int, int]:
    """Normalise a sparsity spec: a fraction in [0, 1), or "N:M" / (N, M) with 0 < N < M."""
    if isinstance(spec, str):
        if ":" in spec:
            n_str, m_str = spec.split(":", 1)
            try:
                spec = (int(n_str), int(m_str))
            except ValueError:
                raise ConfigError(f"bad N:M sparsity {spec!r}; write it like '2:4'") from None
        else:
            try:
                spec = float(spec)
            except ValueError:
                raise ConfigError(f"bad sparsity {spec!r}; give a fraction like 0.5 or a pattern "
                                  "like '2:4'") from None
    if isinstance(spec, tuple):
        n, m = spec
        if not 0 < n < m:
            raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}; e.g. '2:4' keeps 2 of every 4")
        return (int(n), int(m))
    spec = float(spec)
    if not 0.0 <= spec < 1.0:
        raise ConfigError(f"sparsity must be a fraction in [0, 1), got {spec}; e.g. 0.5 removes half")
    return spec


def num_pruned(numel: int, sparsity: float) -> int:
    """Number of weights a fraction `sparsity` removes from `numel` (rounded, so 0.29 * 100 = 29)."""
    return round(numel * sparsity)


def prune_smallest(score: Tensor, k: int) -> Tensor:
    """Keep-mask (R, C) removing the k smallest scores of EACH row of `score` (R, C), ties by lower index."""
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    # the k-th smallest value by selection, not a sort (5-6x faster on 74k-197k scores, 2 AVX2 cores): all
    # scores below it go, and of those equal to it the lowest-indexed ones until k are gone
    v = score.kthvalue(k, dim=1, keepdim=True).values
    less = score < v
    tie = score == v
    need = k - less.sum(1, keepdim=True)
    return ~(less | (tie & (tie.cumsum(1) <= need)))


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask (out, in): the n largest scores of every m consecutive inputs of each row are kept.

    `score` (out, in) with in % m == 0. Exactly n of every m are True, ties broken towards the lower index.
    """
    out_f, in_f = score.shape
    if not 0 < n < m:
        raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    if in_f % m:
        raise ConfigError(f"N:M sparsity with M={m} needs in_features divisible by M, got {in_f}")
    groups = score.reshape(out_f, in_f // m, m)
    idx = torch.sort(groups, dim=2, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(out_f, in_f)


def global_magnitude_masks(weights: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Keep-masks for several tensors under ONE magnitude threshold (global magnitude pruning).

    Exactly round(sparsity * total numel) weights are removed over all tensors together: every |w| below
    the k-th smallest magnitude t, then ties |w| == t in order (tensor order, then flat index).
    """
    sparsity = parse_sparsity(sparsity)
    if isinstance(sparsity, tuple):
        raise ConfigError("global magnitude pruning takes a fraction; use magnitude_mask for N:M")
    scores = torch.cat([w.detach().abs().float().flatten() for w in weights])
    k = num_pruned(scores.numel(), sparsity)
    if k == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    thr = scores.kthvalue(k).values
    below = scores < thr
    ties = scores == thr
    need = k - int(below.sum())
    keep = ~(below | (ties & (ties.cumsum(0) <= need)))
    parts = keep.split([w.numel() for w in weights])
    return [part.reshape(w.shape) for part, w in zip(parts, weights, strict=True)]


def magnitude_mask(W: Tensor, sparsity: Sparsity) -> Tensor:
    """Keep-mask (out, in) by |W|: a fraction is pruned over the whole tensor, N:M within each M inputs."""
    sparsity = parse_sparsity(sparsity)
    if isinstance(sparsity, tuple):
        return nm_mask(W.detach().abs().float(), *sparsity)
    return global_magnitude_masks([W], sparsity)[0]


def wanda_score(W: Tensor, act_sq_sum: Tensor) -> Tensor:
    """Wanda importance S_ij = |W_ij| * ||X_j||_2, with act_sq_sum (in,) = sum_t x_tj^2. Returns (out, in)."""
    return W.detach().abs().float() * act_sq_sum.float().sqrt().unsqueeze(0)


def wanda_mask(W: Tensor, act_sq_sum: Tensor, sparsity: Sparsity) -> Tensor:
    """Wanda keep-mask (out, in): a fraction is pruned per output row (the paper's comparison group);
    N:M keeps the N best scores of every M inputs."""
    sparsity = parse_sparsity(sparsity)
    score = wanda_score(W, act_sq_sum)
    if isinstance(sparsity, tuple):
        return nm_mask(score, *sparsity)
    return prune_smallest(score, num_pruned(W.shape[1], sparsity))


def cubic_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """The cubic sparsity schedule of Zhu & Gupta (2017) that movement pruning (Sanh et al. 2020, eq. in
    section 5) follows:

        s_t = initial                                                     t <  start
        s_t = final + (initial - final) * (1 - (t - start) / (end - start))^3    start <= t < end
        s_t = final                                                       t >= end

    so the sparsity rises fast at first and slowly near the target; `end` > `start` >= 0 are optimizer
    steps."""
    if step < start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


def score_masks(scores: Sequence[Tensor], sparsity: Sparsity, scope: str = "layer") -> list[Tensor]:
    """Keep-masks that keep the HIGHEST scores (movement pruning's top-k, Sanh et al. 2020: M = Top_v(S)).

    scores: tensors (out, in) of any sign. scope "layer": each tensor loses round(sparsity * numel) of its
    lowest scores (hard movement), or for an N:M spec keeps the N highest of every M inputs; scope "global":
    one threshold across all tensors (the thresholded, soft variant: layers end up with different
    sparsities). Ties go towards the lower index, as in magnitude pruning."""
    spec = parse_sparsity(sparsity)
    if isinstance(spec, tuple):
        return [nm_mask(s.float(), *spec) for s in scores]
    shifted = [s.float() for s in scores]
    low = min(float(s.min()) for s in shifted) if shifted else 0.0
    shifted = [s - low for s in shifted]                       # >= 0: the magnitude rule is then "by score"
    if scope == "global":
        return global_magnitude_masks(shifted, spec)
    return [global_magnitude_masks([s], spec)[0] for s in shifted]
