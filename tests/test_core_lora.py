"""LoRA / DoRA math: the merged weight computes the adapter's forward, merge/unmerge round trip, scaling,
init distributions, DoRA against a row-by-row reference, DoRA at init is the base weight exactly."""
from __future__ import annotations

import math

import pytest
import torch

from slimlm.core.lora import (
    dora_magnitude_init,
    dora_weight,
    init_lora,
    init_lora_A,
    lora_delta,
    lora_scale,
    merge,
    residual_init,
    unmerge,
)
from slimlm.errors import ConfigError

OUT, IN, R = 24, 40, 4   # not square: a norm over the wrong axis has the wrong shape or value


@pytest.fixture
def adapter():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(OUT, IN, generator=g)
    A = torch.randn(R, IN, generator=g) / IN ** 0.5
    B = torch.randn(OUT, R, generator=g)        # non-zero, as after some training
    return W, A, B


def test_lora_scale():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 16, rslora=True) == 4.0
    assert lora_scale(8, 16, rslora=True) == pytest.approx(16 / math.sqrt(8))
    with pytest.raises(ConfigError, match="rank r must be a positive integer"):
        lora_scale(0, 16)


def test_merged_weight_computes_the_adapter_forward(adapter):
    """x W^T + scale (x A^T) B^T == x (W + lora_delta)^T: the (out, in) layout of nn.Linear."""
    W, A, B = adapter
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(1))
    scale = lora_scale(R, 8)
    delta = lora_delta(A, B, scale)
    assert delta.shape == (OUT, IN)
    assert torch.allclose(x @ merge(W, delta).T, x @ W.T + scale * (x @ A.T) @ B.T, atol=1e-5)
    with pytest.raises(ValueError, match=r"A must be \(r, in\) and B \(out, r\)"):
        lora_delta(B, A, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(adapter, dtype):
    W, A, B = adapter
    W = W.to(dtype)
    delta = lora_delta(A, B, 2.0)
    back = unmerge(merge(W, delta), delta)
    assert back.dtype == dtype
    eps = torch.finfo(dtype).eps
    # two roundings of values of size |W| + |delta|
    assert torch.allclose(back.float(), W.float(), rtol=0, atol=2 * eps * float((W.float().abs() + delta.abs()).max()))
    assert not torch.equal(merge(W, delta), W)


def test_init_lora_A_kaiming_matches_nn_linear():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    A = init_lora_A((R, IN), "kaiming", generator=g1)
    ref = torch.empty(R, IN)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=g2)
    assert torch.allclose(A, ref, rtol=1e-6, atol=0)
    assert float(A.abs().max()) <= 1 / math.sqrt(IN)


def test_init_lora_A_gaussian_std_is_one_over_r():
    A = init_lora_A((8, 4096), "gaussian", generator=torch.Generator().manual_seed(6))
    assert float(A.std()) == pytest.approx(1 / 8, rel=0.02)
    assert abs(float(A.mean())) < 0.01 / 8 * 5


def test_init_lora_starts_at_zero_delta():
    A, B = init_lora(OUT, IN, R, generator=torch.Generator().manual_seed(7))
    assert A.shape == (R, IN) and B.shape == (OUT, R)
    assert torch.all(lora_delta(A, B, 3.0) == 0) and A.abs().sum() > 0
    with pytest.raises(ConfigError, match="init method must be"):
        init_lora(OUT, IN, R, "orthogonal")


def test_dora_at_init_is_the_base_weight_exactly(adapter):
    W, A, _ = adapter
    B = torch.zeros(OUT, R)
    m = dora_magnitude_init(W)
    assert m.shape == (OUT,)
    assert torch.equal(dora_weight(W, A, B, 2.0, m), W)


def _dora_reference(W, A, B, scale, m):
    """Row by row in fp64: V_i = W_i + scale sum_k B_ik A_k; W'_i = m_i V_i / sqrt(sum_j V_ij^2)."""
    W, A, B, m = (t.double() for t in (W, A, B, m))
    out = torch.empty_like(W)
    for i in range(W.shape[0]):
        v = W[i] + scale * sum(B[i, k] * A[k] for k in range(A.shape[0]))
        out[i] = m[i] * v / math.sqrt(float((v * v).sum()))
    return out


def test_dora_weight_matches_reference(adapter):
    W, A, B = adapter
    m = dora_magnitude_init(W) * torch.linspace(0.5, 1.5, OUT)   # trained magnitudes
    ours = dora_weight(W, A, B, 0.5, m)
    assert torch.allclose(ours.double(), _dora_reference(W, A, B, 0.5, m), rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.linalg.vector_norm(ours, dim=1), m, rtol=1e-5)   # each output row has norm m


def test_dora_magnitude_is_the_row_norm(adapter):
    W, _, _ = adapter
    assert torch.allclose(dora_magnitude_init(W), torch.tensor([math.sqrt(float((row * row).sum())) for row in W]))


def test_dora_detach_norm_same_value_norm_constant_in_backward(adapter):
    W, A, B = adapter
    m = dora_magnitude_init(W)
    G = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(8))

    def grad_B(detach):
        Bp = B.clone().requires_grad_()
        out = dora_weight(W, A, Bp, 0.5, m, detach_norm=detach)
        (out * G).sum().backward()
        return out.detach(), Bp.grad

    (v_full, g_full), (v_det, g_det) = grad_B(False), grad_B(True)
    assert torch.equal(v_full, v_det)
    # with the norm a constant c, W' = (m/c) V is linear in B: dL/dB = scale * ((m/c) * G) A^T
    c = torch.linalg.vector_norm(W + 0.5 * B @ A, dim=1)
    assert torch.allclose(g_det, 0.5 * ((m / c)[:, None] * G) @ A.T, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(g_full, g_det, rtol=1e-3)


def test_dora_zero_row_stays_zero(adapter):
    W, A, _ = adapter
    W = W.clone()
    W[3] = 0
    out = dora_weight(W, A, torch.zeros(OUT, R), 1.0, dora_magnitude_init(W))
    assert torch.isfinite(out).all() and torch.all(out[3] == 0)
    with pytest.raises(ValueError, match="magnitude must be"):
        dora_weight(W, A, torch.zeros(OUT, R), 1.0, torch.ones(IN))


def _output_error(E, D, X):
    return ((X @ (E - D).T) ** 2).sum().item()


def test_residual_init_without_inputs_is_the_truncated_svd():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    scale = 2.0
    A, B = residual_init(E, R, scale)
    assert A.shape == (R, IN) and B.shape == (OUT, R) and A.dtype == E.dtype
    U, S, Vh = torch.linalg.svd(E)
    ref = sum(S[k] * torch.outer(U[:, k], Vh[k]) for k in range(R))     # the top R rank-one terms
    torch.testing.assert_close(scale * B @ A, ref, rtol=1e-10, atol=1e-10)
    A, B = residual_init(E, min(OUT, IN), scale)                         # full rank: the residual itself
    torch.testing.assert_close(scale * B @ A, E, rtol=1e-10, atol=1e-10)


def test_residual_init_with_inputs_is_the_reduced_rank_regression():
    """With H = X^T X / n the update minimises ||X (E - D)^T||: written out as reduced-rank regression, the
    best fitted outputs of rank r are X E^T projected on the top r right singular vectors V_r of X E^T, so
    D = V_r V_r^T E. Inputs with very unequal scales make the weighted and the plain answers differ."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, IN, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, IN, dtype=torch.float64)
    E = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    A, B = residual_init(E, R, 0.5, X.T @ X / X.shape[0], damp=0.0)
    _, _, Vh = torch.linalg.svd(X @ E.T)
    ref = Vh[:R].T @ Vh[:R] @ E
    torch.testing.assert_close(0.5 * B @ A, ref, rtol=1e-8, atol=1e-8)
    Ap, Bp = residual_init(E, R, 0.5)
    assert _output_error(E, 0.5 * B @ A, X) < 0.9 * _output_error(E, 0.5 * Bp @ Ap, X)


def test_residual_init_damps_inputs_that_never_vary():
    """An input column that is always zero makes H singular: the damped H still gives a finite update, one
    that fits the outputs at least as well as the unweighted one."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(100, IN, generator=g)
    X[:, 7] = 0
    E = torch.randn(OUT, IN, generator=g)
    A, B = residual_init(E, R, 1.0, X.T @ X / 100)
    assert A.dtype == torch.float32 and torch.isfinite(A).all() and torch.isfinite(B).all()
    Ap, Bp = residual_init(E, R, 1.0)
    assert _output_error(E, B @ A, X) < _output_error(E, Bp @ Ap, X)


def test_residual_init_refuses_a_rank_beyond_the_weight():
    with pytest.raises(ConfigError, match="rank r must be in 1..24"):
        residual_init(torch.zeros(OUT, IN), OUT + 1, 1.0)
