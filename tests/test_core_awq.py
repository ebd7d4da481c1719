"""AWQ math: scales, alpha grid search and clipping search on synthetic data with salient input channels."""
from __future__ import annotations

import pytest
import torch

from slimlm.core.awq import (
    awq_grid_search,
    awq_range_search,
    awq_scales,
    group_grams,
    group_output_error,
    quantize_clipped,
    scaled_fake_quantize,
    weight_channel_mean,
)
from slimlm.core.quant import default_g_idx, dequantize_grouped, max_code, rtn_quantize


@pytest.fixture(scope="module")
def salient():
    """Inputs where 4 of 128 channels are ~30x louder than the rest, as in LLM activations."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 128, generator=g)
    X[:, [3, 40, 77, 100]] *= 30
    return torch.randn(64, 128, generator=g), X


def output_error(W, W_hat, X) -> float:
    return float(((X @ (W - W_hat).T) ** 2).sum())


def rtn(W, bits, group_size, symmetric=False):
    return dequantize_grouped(*rtn_quantize(W, bits, symmetric, group_size), group_size=group_size)


def test_awq_scales():
    a = torch.tensor([0.0, 0.5, 2.0, 8.0])
    assert torch.equal(awq_scales(a, 0.0), torch.ones(4))
    s = awq_scales(a, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0)  # centred on 1 in log scale
    assert torch.all(s[1:] > s[:-1])  # louder channel, larger scale
    assert torch.isfinite(s).all() and s.min() > 0


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, -1), (3, 32), (4, 64)])
def test_awq_scaling_beats_rtn(salient, bits, group_size):
    W, X = salient
    act_abs_mean = X.abs().mean(0)
    losses_seen = []

    def loss_fn(s):
        loss = output_error(W, scaled_fake_quantize(W, s, bits, group_size, False), X)
        losses_seen.append(loss)
        return loss

    best_s, best_alpha, duo, losses, stat = awq_grid_search(act_abs_mean, loss_fn, n_grid=10)
    assert stat == "mean"
    assert not duo
    assert losses == losses_seen and len(losses) == 10
    rtn_loss = output_error(W, rtn(W, bits, group_size), X)
    assert losses[0] == pytest.approx(rtn_loss, rel=1e-5)  # alpha = 0 is plain RTN
    assert best_alpha > 0 and min(losses) == losses[round(best_alpha * 10)]
    assert torch.equal(best_s, awq_scales(act_abs_mean, best_alpha))
    assert min(losses) < 0.8 * rtn_loss


def test_grid_search_picks_minimum():
    a = torch.rand(16) + 0.1
    target = awq_scales(a, 0.3)
    _s, alpha, _duo, losses, _stat = awq_grid_search(a, lambda s: float(((s - target) ** 2).sum()), n_grid=20)
    assert alpha == pytest.approx(0.3) and len(losses) == 20


def test_weight_channel_mean():
    W = torch.tensor([[1.0, -2.0, 4.0, 0.0], [3.0, 3.0, -1.0, 1.0]])
    # groups of 2: row 0 -> [1/2, 2/2, 4/4, 0/4], row 1 -> [3/3, 3/3, 1/1, 1/1]
    m = weight_channel_mean([W], 2)
    assert torch.allclose(m, torch.tensor([0.75, 1.0, 1.0, 0.5]))
    # two layers sharing the input: the mean runs over all their rows
    m2 = weight_channel_mean([W, W[:1]], 2)
    assert torch.allclose(m2, (2 * torch.tensor([0.5, 1.0, 1.0, 0.0]) + torch.tensor([1.0, 1.0, 1.0, 1.0])) / 3)
    assert torch.allclose(weight_channel_mean([W], -1), torch.tensor([1 / 4 + 1, 2 / 4 + 1, 1 + 1 / 3, 1 / 3]) / 2)


def test_duo_scales_divide_by_the_weight_term():
    a, m = torch.rand(8) + 0.1, torch.rand(8) + 0.1
    for alpha in (0.0, 0.4, 0.9):
        raw = a.pow(alpha) / (m.pow(1 - alpha) + 1e-4)
        s = awq_scales(a, alpha, m)
        assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt())


@pytest.mark.parametrize("bits,group_size", [(3, 32), (2, 64)])
def test_searching_duo_scales_is_never_worse(salient, bits, group_size):
    W, X = salient
    a = X.abs().mean(0)

    def loss_fn(s):
        return output_error(W, scaled_fake_quantize(W, s, bits, group_size, False), X)

    plain = awq_grid_search(a, loss_fn, n_grid=10)
    both = awq_grid_search(a, loss_fn, n_grid=10, weight_mean=weight_channel_mean([W], group_size))
    assert len(both.losses) == 20 and both.losses[:10] == plain.losses
    assert min(both.losses) <= min(plain.losses)
    assert loss_fn(both.scales) == pytest.approx(min(both.losses), rel=1e-6)
    expect = awq_scales(a, both.alpha, weight_channel_mean([W], group_size) if both.duo else None)
    assert torch.equal(both.scales, expect)


def test_clip_at_absmax_is_rtn(salient):
    W, _ = salient
    absmax = W.abs().reshape(64, 4, 32).amax(-1)
    res = quantize_clipped(W, absmax, 4, 32, False)
    codes, scale, _zero = rtn_quantize(W, 4, False, 32)
    assert torch.equal(res.codes, codes) and torch.equal(res.scale, scale)


@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_group_grams_are_the_diagonal_blocks(salient, group_size):
    _, X = salient
    G = 1 if group_size < 0 else 128 // group_size
    Xg = X.reshape(256, G, -1).transpose(0, 1)
    assert torch.allclose(group_grams(X.T @ X / 256, group_size), Xg.transpose(1, 2) @ Xg / 256, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, -1, False), (3, 32, False), (4, 32, True)])
def test_range_search_never_worse_than_min_max(salient, bits, group_size, symmetric):
    W, X = salient
    gram = group_grams(X.T @ X / 256, group_size)                 # checked against X_g^T X_g above
    res = awq_range_search(W, X.T @ X / 256, bits, group_size, symmetric)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= max_code(bits)
    searched = group_output_error(W, res.dequantize(), gram, group_size)
    plain = group_output_error(W, rtn(W, bits, group_size, symmetric), gram, group_size)
    assert torch.all(searched <= plain) and searched.sum() < plain.sum()
    no_shrink = awq_range_search(W, X.T @ X / 256, bits, group_size, symmetric, max_shrink=0.0)
    codes, scale, _zero = rtn_quantize(W, bits, symmetric, group_size)
    assert torch.equal(no_shrink.codes, codes) and torch.allclose(no_shrink.scale, scale)


@pytest.mark.parametrize("bits,group_size", [(3, 32), (2, 32), (3, -1)])
def test_range_search_never_worse_than_the_symmetric_clamp(salient, bits, group_size):
    W, X = salient
    W = W + 0.8 * W.abs()                    # lopsided groups: more room above zero than below
    gram = group_grams(X.T @ X / 256, group_size)                 # checked against X_g^T X_g above
    ranged = group_output_error(W, awq_range_search(W, X.T @ X / 256, bits, group_size, False).dequantize(), gram, group_size)
    # the AWQ reference's clipping, by brute force: clamp to +-r max|w| for r = 1, 0.95, ..., 0.5, best per group
    absmax = W.abs().reshape(64, gram.shape[0], -1).amax(-1)
    clamped = torch.stack([group_output_error(W, quantize_clipped(W, absmax * (1 - k / 20), bits, group_size,
                                                                  False).dequantize(), gram, group_size)
                           for k in range(11)]).amin(0)
    assert torch.all(ranged <= clamped * (1 + 1e-5)) and ranged.sum() < clamped.sum()


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, -1)])
def test_scaled_fake_quantize_matches_the_grouped_codes(salient, bits, group_size):
    """The broadcasting fake quantizer gives exactly the codes-then-dequantize result."""
    W, X = salient
    s = awq_scales(X.abs().mean(0), 0.5)
    Ws = W * s
    ref = dequantize_grouped(*rtn_quantize(Ws, bits, False, group_size), group_size=group_size) / s
    assert torch.equal(scaled_fake_quantize(W, s, bits, group_size, False), ref)


@pytest.mark.parametrize("bits,group_size", [(3, 32), (2, 32), (3, -1)])
def test_range_refinement_never_worse_and_helps_lopsided_groups(salient, bits, group_size):
    W, X = salient
    W = W + 0.8 * W.abs()                    # lopsided groups: each end wants its own cut
    gram = group_grams(X.T @ X / 256, group_size)                 # checked against X_g^T X_g above
    base = awq_range_search(W, X.T @ X / 256, bits, group_size, False)
    refined = awq_range_search(W, X.T @ X / 256, bits, group_size, False, refine=True)
    e_base = group_output_error(W, base.dequantize(), gram, group_size)
    e_ref = group_output_error(W, refined.dequantize(), gram, group_size)
    assert torch.all(e_ref <= e_base * (1 + 1e-6)) and e_ref.sum() < e_base.sum()
    assert refined.codes.dtype == torch.uint8 and int(refined.codes.max()) <= max_code(bits)
    # symmetric grids have one end only: refinement changes nothing there
    sym = awq_range_search(W, X.T @ X / 256, bits, group_size, True, refine=True)
    assert torch.equal(sym.codes, awq_range_search(W, X.T @ X / 256, bits, group_size, True).codes)


def test_rms_family_is_searched_after_the_others_and_never_worse(salient):
    W, X = salient
    a, rms = X.abs().mean(0), X.pow(2).mean(0).sqrt()
    wm = weight_channel_mean([W], 32)

    def loss_fn(s):
        return output_error(W, scaled_fake_quantize(W, s, 3, 32, False), X)

    two = awq_grid_search(a, loss_fn, n_grid=10, weight_mean=wm)
    four = awq_grid_search(a, loss_fn, n_grid=10, weight_mean=wm, act_rms=rms)
    assert len(four.losses) == 40 and four.losses[:20] == two.losses
    assert min(four.losses) <= min(two.losses)
    assert four.losses[20] == pytest.approx(four.losses[0])          # alpha = 0 of the rms family is s = 1 too
    expect = awq_scales(rms if four.stat == "rms" else a, four.alpha, wm if four.duo else None)
    assert torch.equal(four.scales, expect)


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, 32, False), (2, 32, False), (4, -1, True)])
def test_step_size_refit_never_worse_and_keeps_the_zero_points(salient, bits, group_size, symmetric):
    W, X = salient
    gram_full = X.T @ X / 256
    gram = group_grams(gram_full, group_size)
    base = awq_range_search(W, gram_full, bits, group_size, symmetric, refine=True)
    refit = awq_range_search(W, gram_full, bits, group_size, symmetric, refine=True, refit=3)
    e_base = group_output_error(W, base.dequantize(), gram, group_size)
    e_fit = group_output_error(W, refit.dequantize(), gram, group_size)
    assert torch.all(e_fit <= e_base * (1 + 1e-6)) and e_fit.sum() < e_base.sum()
    assert torch.equal(refit.zero, base.zero)                      # only the step sizes move
    assert torch.all(refit.scale > 0) and not torch.equal(refit.scale, base.scale)
    # the stored codes are the rounding of W on the refitted grid
    g = default_g_idx(W.shape[1], group_size).long()
    expect = torch.clamp(torch.round(W / refit.scale[:, g]) + refit.zero[:, g], 0, max_code(bits))
    assert torch.equal(refit.codes.float(), expect)
    # more rounds only ever lower the error further
    one = awq_range_search(W, gram_full, bits, group_size, symmetric, refine=True, refit=1)
    e_one = group_output_error(W, one.dequantize(), gram, group_size)
    assert torch.all(e_fit <= e_one * (1 + 1e-6)) and torch.all(e_one <= e_base * (1 + 1e-6))


def test_step_size_refit_with_zero_moves(salient):
    """refit_zero also tries each zero point one step down and up: a lower total error than the step sizes
    alone here, each zero point moves at most one step per round and stays on the grid; symmetric grids keep
    their zero."""
    W, X = salient
    W = W + 0.5 * W.abs()
    gram_full = X.T @ X / 256
    gram = group_grams(gram_full, 32)
    scale_only = awq_range_search(W, gram_full, 3, 32, False, refine=True, refit=2)
    moved = awq_range_search(W, gram_full, 3, 32, False, refine=True, refit=2, refit_zero=True)
    e_scale = group_output_error(W, scale_only.dequantize(), gram, 32)
    e_moved = group_output_error(W, moved.dequantize(), gram, 32)
    assert e_moved.sum() < e_scale.sum()
    base = awq_range_search(W, gram_full, 3, 32, False, refine=True)
    step = (moved.zero - base.zero).abs()
    assert float(step.max()) <= 2 and bool((step > 0).any())
    assert float(moved.zero.min()) >= 0 and float(moved.zero.max()) <= max_code(3)
    sym = awq_range_search(W, gram_full, 3, 32, True, refit=2, refit_zero=True)
    assert torch.equal(sym.zero, awq_range_search(W, gram_full, 3, 32, True, refit=2).zero)
