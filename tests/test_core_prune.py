"""Pruning masks (magnitude, Wanda, N:M, global) and SparseGPT (alone and joint with quantization)."""
from __future__ import annotations

import pytest
import torch

from slimlm.core.prune import (
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    num_pruned,
    parse_sparsity,
    prune_smallest,
    wanda_mask,
    wanda_score,
)
from slimlm.core.quant import max_code
from slimlm.core.sparsegpt import sparsegpt_prune
from slimlm.errors import ConfigError


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d ** 0.5)
    X = X + 0.05 * torch.randn(n, d, generator=g)
    X[:, :3] *= 8
    return X


def h_error(W, W_hat, H) -> float:
    E = (W - W_hat).double()
    return float(torch.trace(E @ H.double() @ E.T))


# ---------------------------------------------------------------- masks

def test_parse_sparsity():
    assert parse_sparsity("2:4") == (2, 4)
    assert parse_sparsity((4, 8)) == (4, 8)
    assert parse_sparsity("0.5") == 0.5
    for bad, why in (("4:4", "0 < N < M"), ("0:4", "0 < N < M"), (1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"),
                     ("half", "bad sparsity")):
        with pytest.raises(ConfigError, match=why):
            parse_sparsity(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_exact_with_ties(n, m):
    torch.manual_seed(0)
    score = torch.randn(8, 32).abs()
    score[:4] = 1.0  # all tied rows
    keep = nm_mask(score, n, m)
    assert torch.all(keep.reshape(8, -1, m).sum(-1) == n)
    # ties go to the lower index: the first n of each group are kept in tied rows
    assert torch.all(keep[:4].reshape(4, -1, m)[..., :n])
    # the kept are the largest of their group
    kept_min = torch.where(keep, score, torch.inf).reshape(8, -1, m).amin(-1)
    pruned_max = torch.where(keep, -torch.inf, score).reshape(8, -1, m).amax(-1)
    assert torch.all(kept_min >= pruned_max)


def test_nm_mask_rejects_bad_shape():
    with pytest.raises(ConfigError):
        nm_mask(torch.rand(4, 10), 2, 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.9])
def test_magnitude_mask_exact_count(sparsity):
    torch.manual_seed(0)
    W = torch.randn(10, 30)
    W[0] = 0.5  # ties
    W[1] = -0.5
    keep = magnitude_mask(W, sparsity)
    assert int((~keep).sum()) == round(300 * sparsity)
    if 0 < sparsity:
        assert W[keep].abs().min() >= W[~keep].abs().max()


def test_magnitude_mask_nm_wiring():
    """Wiring: magnitude_mask("2:4") hands |W| to nm_mask (checked on its own above); proves the dispatch,
    not the N:M selection."""
    W = torch.randn(6, 16)
    keep = magnitude_mask(W, "2:4")
    assert torch.equal(keep, nm_mask(W.abs(), 2, 4))


def test_global_magnitude_masks():
    torch.manual_seed(0)
    big, small = torch.randn(20, 40) * 3, torch.randn(10, 8) * 0.1
    keep_big, keep_small = global_magnitude_masks([big, small], 0.5)
    assert int((~keep_big).sum() + (~keep_small).sum()) == round(0.5 * (800 + 80))
    # one threshold: the small-valued tensor is pruned more
    assert (~keep_small).float().mean() > (~keep_big).float().mean()
    ties = [torch.ones(4, 4), torch.ones(3, 3)]
    kept = global_magnitude_masks(ties, 0.4)
    assert int(sum((~k).sum() for k in kept)) == round(0.4 * 25)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_wanda_mask(sparsity):
    torch.manual_seed(0)
    W = torch.randn(12, 64)
    act_sq = torch.rand(64) * 10
    keep = wanda_mask(W, act_sq, sparsity)
    if sparsity == "2:4":
        assert torch.all(keep.reshape(12, -1, 4).sum(-1) == 2)
    else:  # per output row comparison group
        assert torch.all(keep.sum(1) == 32)
        score = W.abs() * act_sq.sqrt()                                 # |W_ij| * ||X_j||_2, the paper's
        torch.testing.assert_close(wanda_score(W, act_sq), score)
        kept_min = torch.where(keep, score, torch.inf).amin(1)
        assert torch.all(kept_min >= torch.where(keep, -torch.inf, score).amax(1))


def test_wanda_uses_activations():
    """A weight on a loud input survives even when its magnitude is small."""
    W = torch.ones(4, 8)
    W[:, 0] = 0.1
    act_sq = torch.ones(8)
    act_sq[0] = 1e4
    assert torch.all(wanda_mask(W, act_sq, 0.5)[:, 0])
    assert not torch.any(magnitude_mask(W, 0.5)[:, 0])


# ---------------------------------------------------------------- SparseGPT

@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    X = correlated_inputs(512, 128)
    return torch.randn(40, 128), 2 / 512 * X.T @ X, (X ** 2).sum(0)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.33])
@pytest.mark.parametrize("block_size", [32, 128])
def test_sparsegpt_unstructured(layer, sparsity, block_size):
    W, H, act_sq = layer
    res = sparsegpt_prune(W, H, sparsity=sparsity, block_size=block_size)
    assert res.mask.dtype == torch.bool and res.quant is None
    assert int((~res.mask).sum()) == round(sparsity * W.numel())
    assert torch.all(res.weight[~res.mask] == 0)
    err = h_error(W, res.weight, H)
    # smaller blocks adapt the mask to the updated weights more often (128 = one mask for this whole layer)
    margin = 0.8 if block_size == 32 else 1.0
    assert err < margin * h_error(W, W * wanda_mask(W, act_sq, sparsity), H)
    assert err < 0.5 * h_error(W, W * magnitude_mask(W, sparsity), H)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsegpt_nm(layer, n, m):
    W, H, act_sq = layer
    res = sparsegpt_prune(W, H, sparsity=None, prune_n=n, prune_m=m)
    assert torch.all(res.mask.reshape(40, -1, m).sum(-1) == n)
    assert torch.all(res.weight[~res.mask] == 0)
    err = h_error(W, res.weight, H)
    assert err < h_error(W, W * magnitude_mask(W, (n, m)), H)
    assert err < h_error(W, W * wanda_mask(W, act_sq, (n, m)), H)


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"sparsity": None, "prune_n": 2, "prune_m": 4}])
def test_sparsegpt_joint_quant(layer, group_size, symmetric, pattern):
    W, H, _ = layer
    res = sparsegpt_prune(W, H, quant=(4, group_size, symmetric), **pattern)
    q = res.quant
    assert q is not None and q.codes.dtype == torch.uint8 and int(q.codes.max()) <= max_code(4)
    W_hat = q.dequantize()
    assert torch.equal(W_hat, res.weight)
    assert torch.all(W_hat[~res.mask] == 0)  # exact zeros at pruned positions
    assert torch.equal(q.codes[~res.mask], q.zero[:, q.g_idx.long()][~res.mask].to(torch.uint8))
    assert int((~res.mask).sum()) == W.numel() // 2
    # pruning + 4-bit costs more than pruning alone, but not much more
    pruned_only = h_error(W, sparsegpt_prune(W, H, **pattern).weight, H)
    assert pruned_only < h_error(W, W_hat, H) < 1.5 * pruned_only


def _textbook_sparsegpt(W: torch.Tensor, H: torch.Tensor, *, sparsity: float | None = None, n: int = 0,
                        m: int = 0, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as Algorithm 1 of the paper writes it, in fp64, without lazy batch updates: U the upper
    Cholesky factor of (H + 0.01 mean(diag H) I)^-1; per block of `block` columns (unstructured) or every m
    columns (N:M) the mask drops the smallest w^2 / U_jj^2; column j is replaced by its masked value and
    every later column moves by -err_j * U[j, j+1:] / U[j, j]. (weight, mask)."""
    W = W.double().clone()
    Hd = H.double() + 0.01 * torch.diagonal(H.double()).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    d = torch.diagonal(U)
    out_f, in_f = W.shape
    M = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        if not n:
            k = num_pruned(out_f * i2, sparsity) - num_pruned(out_f * i1, sparsity)
            scores = (W[:, i1:i2] ** 2 / d[i1:i2] ** 2).reshape(1, -1)
            M[:, i1:i2] = prune_smallest(scores, k).reshape(out_f, i2 - i1)
        for j in range(i1, i2):
            if n and (j - i1) % m == 0:
                M[:, j:j + m] = nm_mask(W[:, j:j + m] ** 2 / d[j:j + m] ** 2, n, m)
            q = torch.where(M[:, j], W[:, j], 0.0)
            err = (W[:, j] - q) / U[j, j]
            W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
            W[:, j] = q
    return W, M


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"n": 2, "m": 4}, {"n": 4, "m": 8}])
def test_sparsegpt_agrees_with_the_textbook_algorithm(layer, pattern):
    """The in-place sweep on W^T with lazy batch updates chooses the masks of the plain column-by-column
    algorithm in fp64 and reconstructs the same weights (up to the few near-ties that fp32 and fp64 order
    differently)."""
    W, H, _ = layer
    if "n" in pattern:
        ours = sparsegpt_prune(W, H, sparsity=None, prune_n=pattern["n"], prune_m=pattern["m"], block_size=64)
        ref_w, ref_m = _textbook_sparsegpt(W, H, n=pattern["n"], m=pattern["m"], block=64)
    else:
        ours = sparsegpt_prune(W, H, sparsity=pattern["sparsity"], block_size=64)
        ref_w, ref_m = _textbook_sparsegpt(W, H, sparsity=pattern["sparsity"], block=64)
    assert (ours.mask == ref_m).float().mean() > 0.995
    rel = float((ours.weight.double() - ref_w).norm() / ref_w.norm())
    assert rel < 1e-4, rel   # (a sweep without the reconstruction is 0.2-0.4 away)


def test_sparsegpt_dead_inputs(layer):
    W, H, _ = layer
    H = H.clone()
    H[7, :] = 0
    H[:, 7] = 0
    res = sparsegpt_prune(W, H, sparsity=0.5)
    assert torch.isfinite(res.weight).all() and torch.all(res.weight[:, 7] == 0)


def test_sparsegpt_bad_args(layer):
    W, H, _ = layer
    with pytest.raises(ConfigError, match="not both"):
        sparsegpt_prune(W, H, sparsity=0.5, prune_n=2, prune_m=4)
    with pytest.raises(ConfigError, match="sparsity must be a fraction"):
        sparsegpt_prune(W, H, sparsity=None)
    with pytest.raises(ConfigError, match="got 2:3"):
        sparsegpt_prune(W, H, sparsity=None, prune_n=2, prune_m=3)


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_prune_smallest_removes_exactly_k_per_row_with_ties_by_lower_index(values):
    """The selection-based prune_smallest equals a stable sort: the k smallest of each row go, and among equal
    scores the lower-indexed ones go first."""
    g = torch.Generator().manual_seed(0)
    score = (torch.rand(5, 40, generator=g) if values == "distinct"
             else torch.randint(0, 4, (5, 40), generator=g).float())
    for k in (0, 1, 7, 20, 39, 40):
        expect = torch.ones_like(score, dtype=torch.bool)
        if k:
            expect.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], False)
        got = prune_smallest(score, k)
        assert torch.equal(got, expect), k
        assert ((~got).sum(1) == k).all()
