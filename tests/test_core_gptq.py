"""GPTQ solver: grid invariants, error no worse than RTN under the same Hessian, act-order, dead inputs,
damping retry."""
from __future__ import annotations

import logging

import pytest
import torch

from slimlm.core.gptq import gptq_quantize, prepare_hessian
from slimlm.core.quant import (
    dequantize_grouped,
    group_qparams,
    max_code,
    quantize_grouped,
    rtn_quantize,
    search_group_qparams,
)
from slimlm.errors import ConfigError, SlimlmError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread avoids thread-sync overhead on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated_hessian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """H = 2/n X^T X for correlated inputs with a few large channels, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    X = torch.randn(n, d, generator=g) @ mix + 0.05 * torch.randn(n, d, generator=g)
    X[:, :3] *= 8
    return 2 / n * X.T @ X


def h_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    E = (W - W_hat).double()
    return float(torch.trace(E @ H.double() @ E.T))


def rtn_error(W, H, bits, group_size, symmetric):
    codes, scale, zero = rtn_quantize(W, bits, symmetric, group_size)
    return h_error(W, dequantize_grouped(codes, scale, zero, group_size=group_size), H)


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return torch.randn(48, 128), correlated_hessian(512, 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_codes_on_grid(layer, bits, group_size, act_order):
    W, H = layer
    res = gptq_quantize(W, H, bits, group_size, False, act_order=act_order)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == W.shape
    assert int(res.codes.max()) <= max_code(bits)
    assert torch.equal(res.zero, res.zero.round())
    assert res.scale.shape == (48, 1 if group_size < 0 else 128 // group_size)
    assert h_error(W, res.dequantize(), H) < 0.8 * rtn_error(W, H, bits, group_size, False)


@pytest.mark.parametrize("group_size", [-1, 32])
def test_symmetric(layer, group_size):
    W, H = layer
    res = gptq_quantize(W, H, 4, group_size, True)
    assert torch.all(res.zero == 8)
    assert h_error(W, res.dequantize(), H) < rtn_error(W, H, 4, group_size, True)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_diagonal_hessian_equals_rtn(group_size):
    """With no input correlation nothing propagates between columns: GPTQ is exactly RTN."""
    torch.manual_seed(1)
    W = torch.randn(16, 64)
    H = torch.diag(torch.rand(64) + 0.5)
    res = gptq_quantize(W, H, 3, group_size, False)
    codes, scale, zero = rtn_quantize(W, 3, False, group_size)
    assert torch.equal(res.codes, codes)
    assert torch.equal(res.scale, scale) and torch.equal(res.zero, zero)


def test_block_size_does_not_change_result(layer):
    """Lazy batch updates are exact: any block size gives the same quantization (up to fp rounding)."""
    W, H = layer
    a = gptq_quantize(W, H, 4, 32, False, block_size=128)
    b = gptq_quantize(W, H, 4, 32, False, block_size=20)  # rounded up to 32 so groups stay inside blocks
    assert (a.codes == b.codes).float().mean() > 0.99
    assert h_error(W, b.dequantize(), H) == pytest.approx(h_error(W, a.dequantize(), H), rel=1e-2)


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_g_idx(layer, static_groups):
    W, H = layer
    res = gptq_quantize(W, H, 4, 32, False, act_order=True, static_groups=static_groups)
    g_idx = res.g_idx.long()
    assert res.g_idx.dtype == torch.int32 and g_idx.shape == (128,)
    assert torch.equal(torch.bincount(g_idx), torch.full((4,), 32))
    if static_groups:
        assert torch.equal(g_idx, torch.arange(128) // 32)
    else:  # group k holds the columns of ranks 32k..32k+31 by descending diag(H)
        order = torch.argsort(torch.diagonal(H), descending=True)
        rank = torch.empty(128, dtype=torch.long).scatter_(0, order, torch.arange(128))
        assert torch.equal(g_idx, rank // 32)
    assert h_error(W, res.dequantize(), H) < 0.8 * rtn_error(W, H, 4, 32, False)


def test_dead_inputs(layer):
    W, H = layer
    H = H.clone()
    dead = torch.tensor([5, 77])
    H[dead, :] = 0
    H[:, dead] = 0
    res = gptq_quantize(W, H, 4, 32, False, act_order=True)
    W_hat = res.dequantize()
    assert torch.isfinite(W_hat).all()
    assert torch.all(W_hat[:, dead] == 0)
    prep = prepare_hessian(H)
    assert prep.dead.nonzero().flatten().tolist() == dead.tolist()


def test_damping_retry_on_indefinite_hessian(caplog):
    """An H with a negative eigenvalue fails Cholesky at damp=0.01 and 0.1; the retry succeeds at 1.0."""
    torch.manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(16, 16))
    eig = torch.ones(16)
    eig[0] = -0.5
    H = Q @ torch.diag(eig) @ Q.T  # mean diag = 0.906
    with caplog.at_level(logging.WARNING, logger="slimlm.core.gptq"):
        res = gptq_quantize(torch.randn(8, 16), H, 4, -1, False)
    assert prepare_hessian(H).damp == pytest.approx(1.0)
    assert "damp" in caplog.text
    assert torch.isfinite(res.dequantize()).all()


def test_singular_hessian_without_damping():
    """Rank-deficient H (fewer samples than inputs) with damp=0 still factorises after retries."""
    torch.manual_seed(3)
    X = torch.randn(4, 32)
    H = 2 / 4 * X.T @ X
    res = gptq_quantize(torch.randn(8, 32), H, 4, -1, False, damp=0.0)
    assert torch.isfinite(res.dequantize()).all()
    assert prepare_hessian(H, 0.0).damp > 0


def test_bad_inputs(layer):
    W, H = layer
    with pytest.raises(ConfigError, match="bits must be in 2..8"):
        gptq_quantize(W, H, 1, -1, False)
    with pytest.raises(ConfigError, match="group_size 48 must divide"):
        gptq_quantize(W, H, 4, 48, False)
    with pytest.raises(SlimlmError, match="Hessian contains NaN"):
        gptq_quantize(W, torch.full_like(H, float("nan")), 4, -1, False)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1), (2, 64)])
def test_range_search_never_worse_than_min_max(layer, bits, group_size, symmetric):
    W, H = layer
    W = W.clone()
    W[::7, 5] *= 6  # outliers: clipping them should pay off somewhere
    c = torch.diagonal(H)
    plain_s, plain_z = group_qparams(W, bits, symmetric, group_size)
    s, z = search_group_qparams(W, bits, symmetric, group_size, c)
    assert s.shape == plain_s.shape and z.shape == plain_z.shape

    def weighted_err(s, z):  # per (row, group), the searched objective
        w_hat = dequantize_grouped(quantize_grouped(W, s, z, bits, group_size=group_size), s, z,
                                   group_size=group_size)
        e = (W - w_hat).pow(2) * c
        gs = W.shape[1] if group_size < 0 else group_size
        return e.reshape(W.shape[0], -1, gs).sum(-1)

    searched, plain = weighted_err(s, z), weighted_err(plain_s, plain_z)
    assert (searched <= plain * (1 + 1e-6) + 1e-12).all()
    assert searched.sum() < plain.sum()                       # and it finds a better range somewhere
    assert (z == z.round()).all() and z.min() >= 0 and z.max() <= max_code(bits)


def test_gptq_range_search_lowers_the_layer_error(layer):
    W, H = layer
    plain = gptq_quantize(W, H, 3, 32, False, act_order=True, static_groups=True)
    searched = gptq_quantize(W, H, 3, 32, False, act_order=True, static_groups=True, range_search=True)
    assert h_error(W, searched.dequantize(), H) < h_error(W, plain.dequantize(), H)
    assert torch.equal(searched.g_idx, plain.g_idx)                 # static groups: contiguous, unpermuted


@pytest.mark.parametrize("act_order", [False, True])
def test_prepared_factor_is_the_damped_inverse(layer, act_order):
    """U^T U equals (H + damp * mean(diag H) * I)^-1 (in act-order's permutation), U upper triangular."""
    _, H = layer
    prep = prepare_hessian(H, 0.01, act_order=act_order)
    Hd = H.double()
    if act_order:
        Hd = Hd[prep.perm][:, prep.perm]
    Hd = Hd + 0.01 * torch.diagonal(Hd).mean() * torch.eye(Hd.shape[0], dtype=torch.float64)
    U = prep.hinv_u.double()
    assert torch.equal(U, torch.triu(U))
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-4, atol=1e-6 * float(torch.linalg.inv(Hd).abs().max()))


def _textbook_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """GPTQ as the paper writes it, in fp64, without lazy blocks: quantize column j (asymmetric, the group's
    scale and zero taken from the current weights at its first column), then move every later column by
    -err_j * U[j, j+1:] / U[j, j], U the upper Cholesky factor of (H + 0.01 mean(diag H) I)^-1. Codes."""
    W = W.double().clone()
    Hd = H.double() + 0.01 * torch.diagonal(H.double()).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    maxq = max_code(bits)
    codes = torch.zeros(W.shape, dtype=torch.long)
    for j in range(W.shape[1]):
        if j % group_size == 0:
            g = W[:, j:j + group_size]
            lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
            s = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
            z = torch.round(-lo / s).clamp(0, maxq)
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        codes[:, j] = q.long()
        err = (W[:, j] - (q - z) * s) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_solver_agrees_with_the_textbook_algorithm(layer, act_order):
    """The lazy-block, in-place solver on W^T gives the codes of the plain column-by-column algorithm in fp64
    (a few may round the other way where fp32 and fp64 land on either side of a rounding boundary). With
    act-order the textbook runs on the columns sorted by descending diag(H), groups consecutive in that
    order, and its codes are put back in the original order."""
    W, H = layer
    ours = gptq_quantize(W, H, 3, 32, False, act_order=act_order, block_size=64)
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(W.shape[1])
    ref = _textbook_gptq(W[:, perm], H[perm][:, perm], 3, 32)[:, torch.argsort(perm)]
    assert (ours.codes.long() == ref).float().mean() > 0.995
