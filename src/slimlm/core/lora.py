"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and DoRA (Liu et al. 2024,
"DoRA: Weight-Decomposed Low-Rank Adaptation") as pure functions over one weight.

Shapes follow nn.Linear: W (out, in), y = x W^T. The adapter is A (r, in) and B (out, r):
    y = x W^T + scale * (x A^T) B^T = x (W + scale * B A)^T,      scale = alpha / r   (alpha / sqrt(r): rsLoRA)
A starts random and B at zero, so the adapted layer starts equal to the base layer.

DoRA splits the adapted weight into a magnitude m (out,) and a direction:
    W' = m * (W + scale B A) / ||W + scale B A||_c
with ||.||_c the L2 norm of each output row (over the input dimension, dim=1 of the (out, in) weight; the
paper writes W as (in, out) = d x k and calls these columns; PEFT takes torch.linalg.norm(weight, dim=1)).
m is initialised to ||W||_c so that W' = W at the start.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """scale = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (Kalajdzievski 2023)."""
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Delta W = scale * B @ A: A (r, in), B (out, r) -> (out, in)."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A must be (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    return scale * (B @ A)


def init_lora_A(shape: tuple[int, int], method: Literal["kaiming", "gaussian"] = "kaiming", *,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A (r, in) for a fresh adapter (B starts at zero: see init_lora).

    "kaiming": nn.Linear's default init, kaiming-uniform with a = sqrt(5): U(-bound, bound) with
    bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)), i.e. bound = 1 / sqrt(in).
    "gaussian": N(0, (1/r)^2).
    """
    r, fan_in = shape
    A = torch.empty(r, fan_in, dtype=dtype)
    if method == "kaiming":
        gain = math.sqrt(2.0 / (1 + 5))
        bound = gain * math.sqrt(3.0 / fan_in)
        return A.uniform_(-bound, bound, generator=generator)
    if method == "gaussian":
        return A.normal_(0.0, 1.0 / r, generator=generator)
    raise ConfigError(f"init method must be 'kaiming' or 'gaussian', got {method!r}")


def init_lora(out_features: int, in_features: int, r: int,
              method: Literal["kaiming", "gaussian"] = "kaiming", *, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(A (r, in) from init_lora_A, B (out, r) zeros): lora_delta is zero at the start."""
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r}")
    A = init_lora_A((r, in_features), method, generator=generator, dtype=dtype)
    return A, torch.zeros(out_features, r, dtype=dtype)


def residual_init(residual: Tensor, r: int, scale: float, gram: Tensor | None = None, *,
                  damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) with scale * B A the rank-r update closest to `residual` E = W_ref - W (out, in):
    an adapter that starts the layer near a reference weight W_ref instead of at its base W (for a quantized
    base W = Q(W_ref): LoftQ's first step, Li et al. 2023; weighted by the layer's inputs: QERA, Zhang et al.
    2025).

    Without `gram`: D = U_r S_r V_r^T from the SVD E = U S V^T, the minimiser of ||E - D||_F over rank-r D
    (Eckart-Young).
    With gram H = X^T X / n (in, in), the inputs' second moment: D minimises the expected output error
        E_x ||x (E - D)^T||^2 = tr((E - D) H (E - D)^T) = ||(E - D) H^{1/2}||_F^2,
    so D = [E H^{1/2}]_r H^{-1/2} with [.]_r the rank-r truncated SVD (QERA's closed form); H is damped to
    H + damp * mean(diag H) * I first, which keeps H^{-1/2} finite for inputs that never vary.
    The two factors share the singular values evenly: with [.]_r = U_r S_r V_r^T (times H^{-1/2}),
        B = U_r S_r^{1/2} / sqrt(scale),   A = S_r^{1/2} V_r^T H^{-1/2} / sqrt(scale),   scale * B A = D.
    Computed in float64, returned in E's dtype."""
    if r <= 0 or r > min(residual.shape):
        raise ConfigError(f"rank r must be in 1..{min(residual.shape)} for a {tuple(residual.shape)} weight, got {r}")
    E = residual.double()
    if gram is None:
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        right = Vh[:r]
    else:
        H = gram.double()
        H = H + damp * H.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny) * torch.eye(
            H.shape[0], dtype=H.dtype, device=H.device)
        lam, Q = torch.linalg.eigh(H)
        lam = lam.clamp_min(lam.max() * torch.finfo(torch.float64).eps)
        U, S, Vh = torch.linalg.svd(E @ (Q * lam.sqrt()) @ Q.T, full_matrices=False)
        right = Vh[:r] @ (Q / lam.sqrt()) @ Q.T
    root = S[:r].sqrt() / math.sqrt(scale)
    return (root[:, None] * right).to(residual.dtype), (U[:, :r] * root).to(residual.dtype)


def merge(W: Tensor, delta: Tensor) -> Tensor:
    """W + delta (both (out, in)): the weight of the adapted layer. Returns a new tensor."""
    return W + delta.to(W.dtype)


def unmerge(W_merged: Tensor, delta: Tensor) -> Tensor:
    """W_merged - delta: the base weight back (to the rounding of W's dtype). Returns a new tensor."""
    return W_merged - delta.to(W_merged.dtype)


def _row_norm(V: Tensor) -> Tensor:
    """||V||_c: L2 norm of each output row of V (out, in) -> (out,)."""
    return torch.linalg.vector_norm(V, dim=1)


def dora_magnitude_init(W: Tensor) -> Tensor:
    """m_0 = ||W||_c (out,): the row norms of W (out, in), so that DoRA starts at W."""
    return _row_norm(W)


def dora_weight(W: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor, *,
                detach_norm: bool = False) -> Tensor:
    """W' = m * V / ||V||_c with V = W + scale B A (DoRA eq. 5).

    W (out, in), A (r, in), B (out, r), magnitude m (out,) -> (out, in); each row of W' has norm m.
    Computed as V * (m / ||V||_c) so that m = ||W||_c and B = 0 give W bit-exactly. A zero row of V stays
    zero. detach_norm: treat ||V||_c as a constant in the backward (the paper's Sec. 4.3 memory saving, which
    PEFT also applies); the forward value is the same.
    """
    if magnitude.shape != (W.shape[0],):
        raise ValueError(f"magnitude must be (out,) = ({W.shape[0]},), got {tuple(magnitude.shape)}")
    V = merge(W, lora_delta(A, B, scale))
    norm = _row_norm(V)
    if detach_norm:
        norm = norm.detach()
    norm = norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return V * (magnitude / norm)[:, None]
