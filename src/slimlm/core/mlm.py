"""Tensor math for scoring encoders: masked copies for pseudo-log-likelihood (Salazar et al. 2020, "Masked
Language Model Scoring") and mean-pooled sentence embeddings. No models, hooks or I/O."""
from __future__ import annotations

import torch
from torch import Tensor


def sample_positions(scorable: Tensor, n: int | None, generator: torch.Generator) -> Tensor:
    """(P,) sorted positions to score in one window: every True of `scorable` (L,) bool when n is None or
    n >= its count, else n of them drawn uniformly without replacement (randperm with `generator`)."""
    allowed = scorable.nonzero().flatten()                              # (A,)
    if n is None or n >= allowed.numel():
        return allowed
    pick = torch.randperm(allowed.numel(), generator=generator)[:n]
    return allowed[pick].sort().values


def masked_copies(ids: Tensor, positions: Tensor, mask_id: int) -> Tensor:
    """(P, L) copies of one window `ids` (L,), copy i with token positions[i] replaced by `mask_id`:
    the inputs W_\\t of the pseudo-log-likelihood, one per scored position t."""
    x = ids.expand(positions.numel(), -1).clone()                      # (P, L)
    x[torch.arange(positions.numel()), positions] = mask_id
    return x


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, H) sentence embeddings from token states `hidden` (B, T, H) and the attention mask (B, T):
    e_b = sum_t m_bt h_bt / sum_t m_bt, the mean over the tokens the model attended to (padding excluded)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)                             # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
