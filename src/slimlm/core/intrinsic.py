"""Random subspace projections for intrinsic-dimension training (Li et al. 2018, "Measuring the Intrinsic
Dimension of Objective Landscapes"; Aghajanyan et al. 2020, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning").

The model's parameters move only inside a random d-dimensional subspace:

    theta^(D) = theta_0^(D) + P theta^(d)          P: R^d -> R^D, theta^(d) trained, theta_0 frozen

Fastfood (Le et al. 2013) gives P without a D x d matrix, in O(D log D) time and O(D) memory. For a target of
D entries, with L = 2^ceil(log2 max(D, d)):

    P x = (H G Pi H B pad_L(x))[:D] / (||G||_2 sqrt(D))          (the scaling of the SAID implementation)

H: the L x L Walsh-Hadamard transform (unnormalised, fwht), B: random +-1 diagonal, Pi: a random
permutation, G: Gaussian diagonal, pad_L: zeros up to length L. For a basis vector e_j, H B e_j has entries
+-1, and each entry of H G Pi (...) is a +-1 sum of the g_i with variance ||G||^2; after the scaling the
entries of every column of P have variance 1/D (column norm about 1), as for a dense Gaussian P with entries
N(0, 1/D) (dense_projection, the check for small models).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_BLOCK = 32            # the Hadamard factor applied by one matrix product (measured fastest of 32/128/256)


@functools.lru_cache(maxsize=32)
def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The n x n Sylvester-Hadamard matrix H_n (n a power of two), entries +-1 (cached: do not modify)."""
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def fwht(x: Tensor) -> Tensor:
    """The unnormalised Walsh-Hadamard transform of the last dimension (a power of two): H_L x with
    H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]. O(L log L), differentiable (H is symmetric: its own
    transpose).

    Computed through the Kronecker factorisation H_L = H_f0 (x) H_f1 (x) ... (each f = 32, the last one
    smaller): with x read row-major as a tensor of shape (f0, f1, ...), H_L x applies H_fk along every axis
    k, each one matrix product on a view (no copies): log_32 L products instead of log_2 L butterfly passes,
    several times faster on this project's CPUs (bench: a 2^20-long transform)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    p, q = x.numel() // n, n
    y = x.reshape(p, n)
    while q > 1:
        f = min(_BLOCK, q)
        q //= f
        H = hadamard(f, x.dtype, x.device)
        y = (y.reshape(p, f) @ H) if q == 1 else torch.matmul(H, y.reshape(p, f, q))
        p *= f
    return y.reshape(*lead, n)


class _Permute(torch.autograd.Function):
    """y = v[perm] with the backward as a gather through the inverse permutation (not a scatter-add)."""

    @staticmethod
    def forward(ctx, v: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return v[..., perm]

    @staticmethod
    def backward(ctx, g: Tensor):
        (inverse,) = ctx.saved_tensors
        return g[..., inverse], None, None


class Fastfood:
    """The random diagonals and permutation of one Fastfood projection R^d -> R^D (O(L) memory)."""

    def __init__(self, d: int, D: int, generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        self.d, self.D = d, D
        self.L = 1 << max(0, math.ceil(math.log2(max(D, d))))
        g = generator
        self.B = (torch.randint(0, 2, (self.L,), generator=g) * 2 - 1).float().to(device)
        self.Pi = torch.randperm(self.L, generator=g).to(device)
        self.Pi_inv = torch.argsort(self.Pi)
        self.G = torch.randn(self.L, generator=g).to(device)
        self.scale = 1.0 / (float(self.G.norm()) * math.sqrt(D))

    def __call__(self, x: Tensor) -> Tensor:
        """P x for x of shape (d,): a (D,) tensor."""
        v = torch.nn.functional.pad(x.float(), (0, self.L - self.d)) * self.B
        v = _Permute.apply(fwht(v), self.Pi, self.Pi_inv) * self.G
        return fwht(v)[: self.D] * self.scale

    def dense(self) -> Tensor:
        """The D x d matrix of this projection (tests and tiny models only)."""
        eye = torch.eye(self.d, device=self.B.device)
        return torch.stack([self(e) for e in eye], dim=1)


def dense_projection(d: int, D: int, generator: torch.Generator) -> Tensor:
    """A dense Gaussian P (D x d) with entries N(0, 1/D): the check for small models."""
    return torch.randn(D, d, generator=generator) / math.sqrt(D)
