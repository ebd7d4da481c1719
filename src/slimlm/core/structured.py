"""Structured pruning math (LLM-Pruner, Ma et al. 2023): importance of whole units and how many to remove.

A *unit* is what structured pruning removes as a whole:
- a KV group of an attention layer: one key/value head together with the g = n_heads / n_kv query heads
  that attend through it (rows of q, k, v and the matching columns of o);
- an MLP channel: row j of gate and up, column j of down;
- a whole decoder layer.

Importance of a unit is the sum of an element-wise importance over the unit's weights (LLM-Pruner's
"sum" aggregation over a dependency group):
- magnitude:  I(w) = |w|
- Taylor:     I(w) = |w * dL/dw|               (first-order term of L(W) - L(W with w = 0), eq. 3)
- activation: I(W_ij) = |W_ij| * ||X_j||_2     (Wanda-sp: Wanda's metric over the columns of the output
                                                projection o / down, whose inputs are the units' outputs)
For whole layers the activation score is the Block Influence of ShortGPT (Men et al. 2024),
BI = 1 - E_t cos(x_t, y_t) between a layer's input and output hidden states.
Everything here is pure: tensors in, tensors (or integers) out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def magnitude_importance(W: Tensor) -> Tensor:
    """|W| in fp32, same shape as W."""
    return W.detach().float().abs()


def taylor_importance(W: Tensor, G: Tensor) -> Tensor:
    """First-order Taylor importance |W * G| (fp32) for weights W and the gradient G = dL/dW, same shape."""
    return (W.detach().float() * G.detach().float()).abs()


def wanda_sp_importance(W: Tensor, sq_sum: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 for an output projection W (out, in) and sq_sum (in,) = sum_t x_tj^2."""
    return W.detach().float().abs() * sq_sum.float().clamp(min=0).sqrt()[None, :]


def unit_sum(imp: Tensor, n_units: int, dim: int) -> Tensor:
    """Sum an element importance over `n_units` equal contiguous slices of dimension `dim`: (n_units,).

    Rows of q for KV group k are heads k*g .. k*g+g-1 (transformers' repeat_kv order), i.e. a contiguous
    slice of g * head_dim rows, so every unit of every projection is a contiguous slice.
    """
    size = imp.shape[dim]
    if size % n_units:
        raise ValueError(f"dimension {dim} of size {size} does not split into {n_units} units")
    imp = imp.movedim(dim, 0).reshape(n_units, -1)
    return imp.sum(dim=1)


def block_influence(x_in: Tensor, x_out: Tensor) -> Tensor:
    """Sum over tokens of 1 - cos(x_in_t, x_out_t) for hidden states (..., H): a 0-d fp32 tensor.

    Divide by the token count for ShortGPT's BI; a layer that barely changes its input scores near 0.
    """
    a = x_in.detach().float().reshape(-1, x_in.shape[-1])
    b = x_out.detach().float().reshape(-1, x_out.shape[-1])
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).sum()


def group_rows(keep: Tensor, rows_per_unit: int) -> Tensor:
    """Row (or column) indices (len(keep) * rows_per_unit,) of the kept units, in order.

    For KV groups kept `keep`: q rows use rows_per_unit = g * head_dim, k and v rows head_dim.
    """
    offs = torch.arange(rows_per_unit, device=keep.device)
    return (keep.long()[:, None] * rows_per_unit + offs[None, :]).reshape(-1)


def keep_top(scores: Tensor, n_remove: int) -> Tensor:
    """Sorted indices of the len(scores) - n_remove highest-scoring units (ties: lower index kept)."""
    n = scores.numel()
    if not 0 <= n_remove < n:
        raise ValueError(f"cannot remove {n_remove} of {n} units")
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[: n - n_remove]).values


def layer_relative(scores: list[Tensor]) -> list[Tensor]:
    """Each layer's unit scores divided by that layer's mean, for ranking across layers a metric whose scale
    varies with depth (magnitude, Wanda-sp). Taylor scores estimate a change of the same loss everywhere and
    are ranked as they are."""
    return [s.float() / s.float().mean().clamp(min=torch.finfo(torch.float32).tiny) for s in scores]


def remove_global(scores: list[Tensor], n_remove: int, min_keep: int, multiple: int = 1) -> list[int]:
    """Non-uniform allocation: how many units to remove from each layer when the `n_remove` units with the
    lowest scores are taken across all layers, keeping at least `min_keep` per layer and removing a
    multiple of `multiple` from each layer (rounded to nearest). Returns per-layer counts."""
    flat = torch.cat([s.float() for s in scores])
    layer_of = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)]).tolist()
    counts = [0] * len(scores)
    caps = [max(s.numel() - min_keep, 0) for s in scores]
    removed = 0
    for j in torch.argsort(flat, stable=True).tolist():
        if removed >= n_remove:
            break
        li = layer_of[j]
        if counts[li] < caps[li]:
            counts[li] += 1
            removed += 1
    if multiple > 1:
        counts = [min(round(c / multiple) * multiple, cap - cap % multiple) for c, cap in zip(counts, caps)]
    return counts


@dataclass(frozen=True)
class UnitSizes:
    """Parameter counts of one decoder layer and of its units (all layers are alike before pruning)."""
    n_groups: int       # KV groups per layer
    n_channels: int     # MLP intermediate channels per layer
    per_group: int      # parameters removed with one KV group
    per_channel: int    # parameters removed with one MLP channel
    per_layer: int      # parameters of one whole decoder layer


@dataclass(frozen=True)
class Plan:
    layers: int         # decoder layers removed
    groups: int         # KV groups removed per layer (on average when non-uniform)
    channels: int       # MLP channels removed per layer (on average when non-uniform)


def plan_counts(total: int, ratio: float, n_layers: int, sizes: UnitSizes, remove_layers: int = 0,
                head_fraction: float | None = None, channel_multiple: int = 1) -> Plan:
    """How many layers, KV groups and MLP channels to remove for `ratio` of `total` parameters.

    Allocation: `remove_layers` whole layers first; then in every remaining layer round(head_fraction * n_kv)
    KV groups, or by default floor(f * n_kv) with f the fraction of the layer's prunable parameters still to
    remove (whole KV groups are coarse: SmolLM2 has 3, and dropping 1 of 3 at a 20% target costs far more
    than the same parameters in MLP channels); MLP channels absorb the rest, rounded to `channel_multiple`.
    Raises ValueError (message for the user) when the ratio would remove every head, channel or layer.
    """
    if remove_layers >= n_layers:
        raise ValueError(f"removing {remove_layers} of {n_layers} layers would leave none")
    layers_left = n_layers - remove_layers
    budget = ratio * total - remove_layers * sizes.per_layer
    prunable = layers_left * (sizes.n_groups * sizes.per_group + sizes.n_channels * sizes.per_channel)
    if head_fraction is not None:
        groups = round(head_fraction * sizes.n_groups)
    else:  # never a larger share of the heads than of the layer: floor, so a coarse GQA grid spares heads
        groups = math.floor(max(budget, 0.0) / prunable * sizes.n_groups + 1e-9)
    if groups >= sizes.n_groups:
        raise ValueError(f"ratio {ratio} would remove every attention head of each layer "
                         f"({groups} of {sizes.n_groups} KV groups)")
    rest = budget - layers_left * groups * sizes.per_group
    channels = max(round(rest / (layers_left * sizes.per_channel) / channel_multiple) * channel_multiple, 0)
    if channels >= sizes.n_channels:
        raise ValueError(f"ratio {ratio} would remove every MLP channel of each layer "
                         f"({channels} of {sizes.n_channels})")
    return Plan(remove_layers, groups, channels)


def neuron_redundancy(h: Tensor, keep: Tensor, eps: float = 1e-8) -> Tensor:
    """GUM's redundancy of each MLP neuron (Santacroce et al. 2023, "What Matters In The Structured Pruning of
    Generative Language Models?"): the cosine similarity between a neuron's activations and the sum of the
    other kept neurons' activations over the same tokens,

        A     = sum_k m_k h_k                       (N,)   the layer's kept activations summed per token
        r_j   = cos(h_j, A - m_j h_j)               (I,)

    h: (N, I) activations of the I neurons (the input of the down projection) over N tokens; keep: (I,)
    mask m (0/1, or a straight-through mask carrying gradient). A neuron whose output the others already
    produce has r_j near 1; a unique one near 0 (or below). Differentiable in h and keep; fp32 inside.
    """
    h = h.float()
    m = keep.to(h.dtype)
    A = h @ m                                               # (N,)
    hA = h.t() @ A                                          # (I,) <h_j, A>
    hh = h.pow(2).sum(0)                                    # (I,) ||h_j||^2
    dot = hA - m * hh                                       # <h_j, A - m_j h_j>
    rest = (A.pow(2).sum() - 2 * m * hA + m.pow(2) * hh).clamp(min=0)   # ||A - m_j h_j||^2
    return dot / (hh.sqrt() * rest.sqrt()).clamp(min=eps)


def uniqueness_penalty(h: Tensor, keep: Tensor) -> Tensor:
    """GUM's regularizer for one layer: the kept neurons' mean redundancy, sum_j m_j r_j / sum_j m_j (0-d).
    Added to the loss (times a weight), it pushes the kept neurons apart and, through a straight-through
    mask, lowers the scores of the redundant ones so they are pruned first."""
    m = keep.float()
    return (m * neuron_redundancy(h, keep)).sum() / m.sum().clamp(min=1)
