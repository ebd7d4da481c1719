"""LLM.int8(): vector-wise int8 weights/activations, int32 matmul, outlier decomposition, vs bitsandbytes."""
import math

import pytest
import torch

from slimlm.core import llm_int8 as L
from slimlm.errors import ConfigError


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.float(), approx.float()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


def layer(out_f=48, in_f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.05, torch.randn(out_f, generator=g) * 0.1


def activations(shape=(2, 7, 96), outlier_cols=(), scale=40.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for j in outlier_cols:  # systematic outlier features, as LLM.int8() observes in large models
        x[..., j] = scale * (1 + torch.rand(shape[:-1], generator=g))
    return x


def test_weight_quantization():
    W, _ = layer()
    W[5] = 0
    CB, SCB = L.int8_quantize_weight(W)
    assert CB.dtype == torch.int8 and CB.shape == W.shape and SCB.shape == (48,) and SCB.dtype == torch.float32
    assert torch.equal(SCB, W.abs().amax(dim=1))
    assert torch.all(CB.abs().amax(dim=1)[SCB > 0] == 127) and torch.all(CB[5] == 0)
    err = (L.int8_dequantize_weight(CB, SCB) - W).abs()
    assert torch.all(err <= SCB[:, None] / 254 + 1e-7)  # half a step of absmax / 127
    with pytest.raises(ConfigError, match="2-D floating-point weight"):
        L.int8_quantize_weight(torch.randn(3, 4, 5))


def test_int8_matmul_exact(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (9, 70), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (13, 70), generator=g, dtype=torch.int8)
    ref = (a.long() @ b.long().t()).to(torch.int32)
    assert torch.equal(L.int8_matmul(a, b), ref)

    def unsupported(*args):
        raise RuntimeError("_int_mm not supported here")

    monkeypatch.setattr(torch, "_int_mm", unsupported)  # the exact fallback path
    out = L.int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, ref)


def test_no_threshold_is_plain_vectorwise_int8():
    W, bias = layer()
    x = activations(outlier_cols=(3,))
    CB, SCB = L.int8_quantize_weight(W)
    y_inf = L.int8_linear(x, CB, SCB, bias, threshold=math.inf)
    assert torch.equal(y_inf, L.int8_linear(x, CB, SCB, bias, threshold=0.0))
    # the equation written out: row-wise int8 of x and W, integer product, outer-product rescale
    x2 = x.reshape(-1, 96)
    sx = x2.abs().amax(dim=1)
    Cx = torch.round(x2 * (127 / sx)[:, None])
    acc = Cx.double() @ CB.double().t()
    ref = (acc.float() * (sx[:, None] * SCB[None, :]) / 127**2 + bias).reshape(2, 7, 48)
    assert torch.equal(y_inf, ref)


def test_below_threshold_has_no_outliers():
    W, bias = layer()
    x = activations() * 0.5
    assert x.abs().max() < 6.0
    CB, SCB = L.int8_quantize_weight(W)
    assert L.outlier_columns(x.reshape(-1, 96), 6.0).numel() == 0
    assert torch.equal(L.int8_linear(x, CB, SCB, bias, 6.0), L.int8_linear(x, CB, SCB, bias, math.inf))


def test_activation_quantization_holds_outliers_back():
    x = activations(outlier_cols=(3, 50)).reshape(-1, 96)
    x[4, 10] = -7.0  # a single outlier entry marks its whole column
    C, s, cols = L.int8_quantize_activations(x, 6.0)
    assert cols.tolist() == [3, 10, 50]
    assert torch.all(C[:, cols] == 0)
    kept = torch.where(x.abs() >= 6.0, torch.zeros_like(x), x)
    assert torch.equal(s, kept.abs().amax(dim=1))  # row scales ignore the outliers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlier_decomposition_sqnr(seed):
    W, bias = layer(seed=seed)
    x = activations(outlier_cols=(3, 17, 60), seed=seed)
    CB, SCB = L.int8_quantize_weight(W)
    mixed = L.int8_linear(x, CB, SCB, bias, threshold=6.0)
    plain = L.int8_linear(x, CB, SCB, bias, threshold=math.inf)
    # error of the activation quantization alone (against the int8 weight in full-precision arithmetic):
    # outliers in int8 set a row scale ~60x too coarse for every normal feature
    y_wq = x @ L.int8_dequantize_weight(CB, SCB).t() + bias
    assert sqnr_db(y_wq, mixed) > 55.0
    assert sqnr_db(y_wq, mixed) > sqnr_db(y_wq, plain) + 20.0
    # end to end, the int8 weight error is shared by both
    y = x @ W.t() + bias
    assert sqnr_db(y, mixed) > 40.0
    assert sqnr_db(y, mixed) > sqnr_db(y, plain) + 5.0


def test_shapes_dtype_and_zero_rows():
    W, bias = layer()
    CB, SCB = L.int8_quantize_weight(W)
    x = activations(outlier_cols=(3,)).to(torch.bfloat16)
    x[0, 2] = 0
    y = L.int8_linear(x, CB, SCB, bias, 6.0)
    assert y.shape == (2, 7, 48) and y.dtype == torch.bfloat16
    assert torch.allclose(y[0, 2].float(), bias.to(torch.bfloat16).float())
    y1 = L.int8_linear(x[0, 0], CB, SCB)  # a single token without batch dims
    assert y1.shape == (48,)
    with pytest.raises(ConfigError, match="95 features"):
        L.int8_linear(torch.randn(2, 95), CB, SCB)


# ---------------------------------------------------------------- against bitsandbytes' reference ops


@pytest.fixture
def bnb_F():
    import bitsandbytes  # a dev dependency: missing, the comparisons fail rather than skip

    return bitsandbytes.functional


def test_matches_bitsandbytes(bnb_F):
    W, bias = layer()
    x = activations(outlier_cols=(3, 40)).reshape(-1, 96)
    x[5, 11] = 6.0  # exactly at the threshold: an outlier (>=)
    CB_ref, SCB_ref, _ = bnb_F.int8_vectorwise_quant(W.clone())
    CB, SCB = L.int8_quantize_weight(W)
    assert torch.equal(CB, CB_ref) and torch.equal(SCB, SCB_ref)
    CA_ref, SCA_ref, cols_ref = bnb_F.int8_vectorwise_quant(x.clone(), threshold=6.0)
    CA, SCA, cols = L.int8_quantize_activations(x, 6.0)
    assert torch.equal(CA, CA_ref) and torch.equal(SCA, SCA_ref) and torch.equal(cols, cols_ref)
    assert torch.equal(L.int8_matmul(CA, CB), bnb_F.int8_linear_matmul(CA_ref, CB_ref))
    ref, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, CA_ref, CB_ref, SCA_ref, SCB_ref, cols_ref, bias)
    # bitsandbytes rescales the int32 product with the constant 6.200124e-05 where 1/127^2 = 6.2000124e-05
    # (1.8e-5 relative), so the outputs agree to that order of the int8 term's size, not bit for bit
    y = L.int8_linear(x, CB, SCB, bias, 6.0)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
