"""QuantLinear: kernel products against x @ dequantize(result).T, exact dequantization, exact state dict."""
from __future__ import annotations

import pytest
import torch

from slimlm.core.quant import QuantResult, choose_qparams, default_g_idx, quantize_grouped, rtn_quantize
from slimlm.errors import ConfigError
from slimlm.quant.linear import PORTABLE_KEYS, QuantLinear

K, N = 256, 64


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp_min(1e-30)))


def rtn_result(bits, gs, sym, out_f=N, in_f=K, seed=0, offset=0.0) -> QuantResult:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) + offset
    q, s, z = rtn_quantize(W, bits, sym, gs)
    return QuantResult(q, s, z, default_g_idx(in_f, gs), bits, gs, sym)


def act_order_result(bits, gs, sym, g_idx=None, seed=0) -> QuantResult:
    """Groups of scattered columns, as GPTQ's act-order produces."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    if g_idx is None:
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[torch.randperm(K, generator=g)] = (torch.arange(K) // gs).to(torch.int32)
    G = int(g_idx.max()) + 1
    s, z = torch.ones(N, G), torch.zeros(N, G)
    for j in range(G):
        sj, zj = choose_qparams(W[:, g_idx == j], bits, sym)
        s[:, j], z[:, j] = sj[:, 0], zj[:, 0]
    return QuantResult(quantize_grouped(W, s, z, bits, g_idx), s, z, g_idx, bits, gs, sym)


def x_in(rows=5, seed=1):
    return torch.randn(3, rows, K, generator=torch.Generator().manual_seed(seed))


def assert_int8_kernel_error(y, x, r, bias=None):
    """The int8 per-channel kernel multiplies x~ = bf16(x) by the int8 codes c = q - 128 in fp32, scales by
    bf16(s) and rounds the result to bf16; an asymmetric zero point adds sum_k(x~_k) * (128 - z) * s in fp32.
    So y - (x~ @ W_hat^T + b) is at most two bf16 roundings (unit 2^-8) of main = x~ @ ((q - 128) s)^T plus
    fp32 summation error (unit 2^-24, K terms; 2^-15 covers K = 256 twice). A zero point one step off adds
    s * sum_k(x~_k), which is several times this bound for most outputs."""
    xb = x.bfloat16().float().reshape(-1, K)                                   # (T, K)
    c, s, z = r.codes.float() - 128, r.scale, r.zero                           # (N, K), (N, 1), (N, 1)
    ref = xb @ r.dequantize().T + (0 if bias is None else bias)              # (T, N)
    main = xb @ (c * s).T
    mag = xb.abs() @ (c.abs() * s).T + xb.abs().sum(-1, keepdim=True) * ((128 - z).abs() * s).T
    err = (y.reshape(-1, N) - ref).abs()
    assert (err <= 2 ** -7 * main.abs() + 2 ** -15 * mag).all(), float(err.max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_forward_matches_dequantized_matmul(bits, gs, sym):
    r = rtn_result(bits, gs, sym)
    bias = torch.randn(N)
    m = QuantLinear.from_result(r, bias)
    assert m.layout == ("int8" if bits == 8 else "int4")
    assert torch.equal(m.dequantize_weight(), r.dequantize())           # codes and qparams kept exactly
    x = x_in()
    ref = x @ r.dequantize().T + bias
    with torch.no_grad():
        y = m(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    if bits == 8 and gs > 0:                                            # no kernel: exact fp32 fallback
        torch.testing.assert_close(y, ref)
    elif bits == 8:                                                     # int8 kernel: bf16 rounding only
        assert_int8_kernel_error(y, x, r, bias)
    else:                                                               # bf16 activations on the kernels
        assert sqnr_db(ref, y) > 30


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_dequant_formula(bits):
    """The kernel's per-group (c - 8) * s' + z' reproduces (q - z) * s: identity input gives W_hat^T."""
    r = rtn_result(bits, 64, sym=False)
    m = QuantLinear.from_result(r)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), m.packed,
                                                    m.kernel_group, m.kernel_scales).float().T
    w_hat = r.dequantize()
    step = r.scale[:, r.g_idx.long()]
    # error is bf16 rounding of s', z' and of the output only: far below one quantization step
    assert ((out - w_hat).abs() <= step * 0.05 + w_hat.abs() * 2 ** -7).all()
    assert sqnr_db(w_hat, out) > 40


@pytest.mark.parametrize("sym,offset", [(True, 0.0), (False, 0.0), (False, 1.5)])   # 1.5: zero points far from 128
def test_int8_per_channel_kernel_error_is_bf16_rounding_only(sym, offset):
    r = rtn_result(8, -1, sym=sym, offset=offset)
    m = QuantLinear.from_result(r)
    assert m.layout == "int8" and m.kernel_scales is not None and (m.kernel_corr is None) == sym
    x = x_in(rows=16)
    with torch.no_grad():
        assert_int8_kernel_error(m(x), x, r)


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_runs_on_kernel_with_permutation(bits):
    r = act_order_result(bits, 32, sym=False)
    m = QuantLinear.from_result(r, method="gptq")
    assert m.act_order and m.layout == "int4" and m.perm is not None
    assert torch.equal(m.codes(), r.codes)
    assert torch.equal(m.dequantize_weight(), r.dequantize())
    x = x_in()
    with torch.no_grad():
        assert sqnr_db(x @ r.dequantize().T, m(x)) > 30


def test_irregular_groups_fall_back_to_exact_dequant():
    g_idx = torch.cat([torch.zeros(100), torch.ones(156)]).to(torch.int32)[torch.randperm(K)]
    r = act_order_result(4, 128, sym=True, g_idx=g_idx)
    m = QuantLinear.from_result(r)
    assert m.layout == "packed"
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ r.dequantize().T)


def test_unsupported_kernel_group_falls_back():
    r = rtn_result(4, 16, sym=False)                                   # 16 < smallest kernel group
    m = QuantLinear.from_result(r)
    assert m.layout == "packed"
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ r.dequantize().T)


@pytest.mark.parametrize("bits,gs,act_order", [(4, 64, False), (3, 32, False), (2, -1, False), (8, -1, False),
                                               (8, 32, False), (4, 64, True), (3, 32, True), (8, 32, True)])
def test_state_dict_round_trip_exact(bits, gs, act_order):
    r = act_order_result(bits, gs, sym=False) if act_order else rtn_result(bits, gs, sym=False)
    m = QuantLinear.from_result(r, torch.randn(N), method="rtn")
    sd = m.state_dict()
    assert set(sd) == set(PORTABLE_KEYS) | {"bias"}
    G = r.scale.shape[1]
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (K * bits // 32, N)
    assert sd["qzeros"].dtype == torch.int32 and sd["qzeros"].shape == (G, N * bits // 32)
    assert sd["scales"].dtype == torch.float32 and torch.equal(sd["scales"], r.scale.T)
    assert torch.equal(sd["g_idx"], r.g_idx)
    m2 = QuantLinear.empty(K, N, bits, gs, symmetric=False, has_bias=True, act_order=act_order)
    assert m2.packed.is_meta
    m2.load_state_dict(sd, assign=True)
    assert m2.layout == m.layout
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = x_in()
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def test_load_reports_missing_and_wrong_shapes():
    m = QuantLinear.from_result(rtn_result(4, 64, sym=True))
    sd = m.state_dict()
    res = QuantLinear.empty(K, N, 4, 64, True, False).load_state_dict(
        {k: v for k, v in sd.items() if k != "qzeros"}, strict=False, assign=True)
    assert res.missing_keys == ["qzeros"]
    with pytest.raises(RuntimeError, match="qweight has shape"):
        QuantLinear.empty(K, N * 2, 4, 64, True, False).load_state_dict(sd, assign=True)


def test_no_float_weight_and_bytes_per_weight():
    m = QuantLinear.from_result(rtn_result(4, 64, sym=False, out_f=512, in_f=512), torch.randn(512))
    big_float = [n for n, t in list(m.named_buffers()) + list(m.named_parameters())
                 if t.is_floating_point() and t.numel() >= 512 * 512 // 8]
    assert big_float == []
    # int4 codes (0.5) + bf16 kernel scales/zeros (4/64) + fp32 scales (4/64) + uint8 zeros (1/64) + small
    assert m.storage_bytes() / (512 * 512) < 0.70                        # < 0.175x of fp32


def test_dtype_moves_keep_storage_exact():
    r = rtn_result(4, 64, sym=False)
    m = QuantLinear.from_result(r, torch.randn(N))
    sd = m.state_dict()
    m.to(torch.bfloat16)
    assert m.scale.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    assert torch.equal(m.state_dict()["scales"], sd["scales"])
    with torch.no_grad():
        y = m(x_in().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_backward_gives_input_gradient():
    r = rtn_result(4, 64, sym=False)
    m = QuantLinear.from_result(r)
    x = x_in().requires_grad_(True)
    m(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (xr @ r.dequantize().T).pow(2).sum().backward()
    assert sqnr_db(xr.grad, x.grad) > 30


def test_rejects_shapes_that_cannot_be_packed():
    with pytest.raises(ConfigError, match="multiple of 32"):
        QuantLinear(48, 64, 3, -1, True)
    with pytest.raises(ConfigError, match="does not divide"):
        QuantLinear(256, 64, 4, 96, True)
    with pytest.raises(ConfigError, match="bits"):
        QuantLinear(256, 64, 5, -1, True)


def test_cuda_int4_pack_puts_the_even_column_in_the_high_nibble():
    from slimlm.quant.linear import cuda_int4_pack

    c = torch.tensor([[1, 2, 15, 0], [7, 8, 0, 15]])
    assert torch.equal(cuda_int4_pack(c), torch.tensor([[0x12, 0xF0], [0x78, 0x0F]], dtype=torch.uint8))


def test_a_move_off_the_cpu_goes_through_portable_codes():
    """The CPU int4 layout means nothing elsewhere: moving the module (here to meta, as a model does before
    load_state_dict(assign=True)) first rebuilds a device-neutral layout, and moving back rebuilds the kernel's."""
    r = act_order_result(4, 64, sym=False)
    m = QuantLinear.from_result(r, torch.randn(N))
    assert m.layout == "int4" and m.perm is not None
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    m.to("meta")
    assert m.layout == "packed" and m.packed.is_meta and m.kernel_scales is None and m.perm is None
    assert m.packed.shape == (N, K * 4 // 32)
    assert {k: v.shape for k, v in m.state_dict().items()} == shapes


needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8),
                               reason="the int4 GPU kernel needs a CUDA GPU of compute capability >= 8.0")


@needs_gpu
@pytest.mark.parametrize("bits,gs,act_order", [(4, 64, False), (3, 64, False), (2, 32, False), (4, -1, False),
                                               (4, 64, True)])
def test_gpu_int4_kernel_matches_the_dequantized_product(bits, gs, act_order):
    r = act_order_result(bits, gs, sym=False) if act_order else rtn_result(bits, gs, sym=False)
    bias = torch.randn(N)
    m = QuantLinear.from_result(r, bias)
    sd = m.state_dict()
    m.to("cuda")
    assert m.layout == "int4" and m.packed.is_cuda, "the GPU int4 layout was refused (see the warning)"
    assert torch.equal(m.codes().cpu(), r.codes.to(torch.uint8))
    x = x_in().cuda()
    ref = x @ r.dequantize().cuda().T + bias.cuda()
    with torch.no_grad():
        y = m(x)
        y16 = m(x.half())
    assert y.dtype == torch.float32 and y16.dtype == torch.float16
    assert sqnr_db(ref, y) > 30 and sqnr_db(ref, y16.float()) > 30
    for k, v in m.state_dict().items():
        assert torch.equal(v.cpu(), sd[k]), k
    m.to("cpu")
    assert m.layout == "int4" and torch.equal(m.codes(), r.codes.to(torch.uint8))


@pytest.mark.parametrize("act_order", [False, True])
def test_layout_self_check_passes_a_right_layout_and_catches_wrong_scales(act_order):
    """The once-per-process check of the GPU layout, run here on the CPU layout (same operator contract):
    silent on a correct layer, a reason when the kernel's scales do not match the weight."""
    r = act_order_result(4, 64, sym=False) if act_order else rtn_result(4, 64, sym=False)
    m = QuantLinear.from_result(r)
    assert m.layout == "int4" and m._cuda_mismatch(r.codes) is None
    m.kernel_scales = m.kernel_scales.transpose(0, 1).reshape(m.kernel_scales.shape).contiguous()
    assert "off by" in m._cuda_mismatch(r.codes)
    m2 = QuantLinear.from_result(r)
    wrong = r.codes.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 16
    assert "codes read back" in m2._cuda_mismatch(wrong)
