"""Frozen quantized base layers under autograd (QLoRA): forward and dL/dx on every path each layer can choose,
against the dequantized weight as an nn.Linear; no gradient on the base, nothing float saved for backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.core import nf4
from slimlm.core.llm_int8 import int8_linear
from slimlm.core.packing import int4pack_cpu_codes
from slimlm.core.quant import QuantResult, default_g_idx, dequantize_grouped, rtn_quantize
from slimlm.quant import int8_linear as I8
from slimlm.quant import linear as QL
from slimlm.quant.int8_linear import Int8Linear
from slimlm.quant.linear import QuantLinear
from slimlm.quant.nf4_linear import NF4Linear

K, N = 64, 128          # a small layer; 300 rows stand for a training batch, 1 for decoding
ROWS = (1, 300)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp_min(1e-30)))


def weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g) * 0.1


def quant_layer(act_order=False, bits=4, gs=32):
    """(QuantLinear, W_hat (N, K) from the QuantResult it was built from)."""
    W, b = weight()
    q, s, z = rtn_quantize(W, bits, False, gs)
    g_idx = default_g_idx(K, gs)
    if act_order:                       # scattered groups: the int4 kernel runs on permuted columns
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
        q, g_idx = q[:, perm], g_idx[perm]
    r = QuantResult(q, s, z, g_idx, bits, gs, False)
    return QuantLinear.from_result(r, b), r.dequantize()


def nf4_hat(m: NF4Linear) -> torch.Tensor:
    """NF4 W_hat written out: T[code_i] * c_b, c_b = D[k_b] * c2_(b // 256) + m with double quant."""
    q = m.nf4_weight()
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1)[: q.numel].long()
    c = q.absmax.float()
    if q.double_quant:
        nb = torch.arange(c.numel())
        c = q.absmax_code[q.absmax.long()] * q.absmax2[nb // q.dq_blocksize] + q.absmax_offset
    return (nf4.code_table(q.quant_type)[codes] * c[torch.arange(q.numel) // q.blocksize]).reshape(N, K)


def reference(m, W_hat):
    """W_hat as a plain frozen nn.Linear with m's bias."""
    ref = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    ref.weight.data.copy_(W_hat)
    if m.bias is not None:
        ref.bias.data.copy_(m.bias.detach())
    return ref.requires_grad_(False)


def run(m, rows, seed=1):
    """(y, dL/dx) of L = sum(y * gy) through m, and the saved-for-backward bytes that are not m's own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).requires_grad_(True)
    gy = torch.randn(rows, N, generator=g)
    own = {t.data_ptr() for t in [*m.parameters(), *m.buffers()] if t is not None}
    saved = []

    def keep(t):
        if t.data_ptr() not in own and t.data_ptr() != x.data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = m(x)
    (gx,) = torch.autograd.grad(y, x, gy)
    return x.detach(), y.detach(), gx, gy, sum(saved)


def check_frozen(m, saved):
    assert saved == 0, f"{saved} bytes saved for backward (a float weight held until the backward?)"
    assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    assert all(not t.requires_grad for t in m.buffers() if t is not None)


def ref_grad(ref, x, gy):
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(ref(xr), xr, gy)
    return gx


# ---------------------------------------------------------------- QuantLinear


@pytest.fixture(params=["kernel", "dense"])
def int4_path(request, monkeypatch):
    """Force the int4 layout's forward path: the kernel at every size, or dense from the first row."""
    limit = None if request.param == "kernel" else 1
    monkeypatch.setattr(QL, "INT4_DENSE_ROWS", {True: limit, False: limit})
    return request.param


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("act_order,bits", [(False, 4), (True, 4), (False, 3)])
def test_quant_linear_int4_paths(int4_path, rows, act_order, bits):
    m, W_hat = quant_layer(act_order, bits)
    assert m.layout == "int4" and m.kernel_block > 0 and (m.perm is not None) == act_order
    ref = reference(m, W_hat)
    x, y, gx, gy, saved = run(m, rows)
    want = ref(x)
    if int4_path == "dense":                    # fp32 dequantize + matmul: exact up to fp32 summation
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    else:                                       # the kernel: bf16 activations, scales and output
        assert sqnr_db(want, y) > 35
    torch.testing.assert_close(gx, ref_grad(ref, x, gy), rtol=1e-6, atol=1e-6)   # always fp32 dequantize
    check_frozen(m, saved)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bits,gs", [(3, 32), (4, 32), (8, 32), (8, -1)])
def test_quant_linear_packed_and_int8_layouts(rows, bits, gs):
    m, W_hat = quant_layer(bits=bits, gs=gs)
    if bits < 8:                                  # the portable layout: unpack + dequantize at each call
        m._build(m.codes(), m.scale, m.zero, m.g_idx, kernels=False)
    assert m.layout == ("int8" if bits == 8 else "packed")
    ref = reference(m, W_hat)
    x, y, gx, gy, saved = run(m, rows)
    if m.kernel_scales is None:                   # fp32 dequantize + matmul
        torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
    else:                                         # 8-bit per channel: the int8 kernel on bf16 activations
        assert sqnr_db(ref(x), y) > 35
    torch.testing.assert_close(gx, ref_grad(ref, x, gy), rtol=1e-6, atol=1e-6)
    check_frozen(m, saved)


@pytest.mark.parametrize("n", [16, 32, 48, 64, 80, 112, 192])
def test_int4_codes_read_without_the_kernel(n):
    """The bit-operation reader of the CPU int4 layout gives the codes the kernel itself reads back."""
    g = torch.Generator().manual_seed(n)
    c = torch.randint(0, 16, (n, 96), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, QL.INNER_K_TILES)
    assert torch.equal(int4pack_cpu_codes(packed, n, 96).int(), c)
    m, _ = quant_layer(act_order=True)
    fast = m.codes()
    m.kernel_block = 0                                   # the slow reader: through the kernel
    assert torch.equal(m.codes(), fast)


def test_a_layout_the_reader_gets_wrong_falls_back_to_the_kernel(monkeypatch):
    """Blocks of 32 rows are not this CPU's layout (64 with AVX-512) for 128 rows: the check at build
    must refuse the bit reader, and the codes come back through the kernel, still exact."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the layout of blocks of 64 rows is AVX-512's")
    monkeypatch.setattr(QL, "CPU_INT4_BLOCKS", (32,))
    m, W_hat = quant_layer()
    assert m.layout == "int4" and m.kernel_block == 0
    assert torch.equal(m.dequantize_weight(), W_hat)


def test_int4_threshold_follows_rows_and_cpu(monkeypatch):
    m, _ = quant_layer()
    monkeypatch.setattr(QL, "INT4_DENSE_ROWS", {True: None, False: 16})
    monkeypatch.setattr(QL, "_cpu_native_bf16", lambda: False)
    assert m._kernel_rows(15, torch.device("cpu")) and not m._kernel_rows(16, torch.device("cpu"))
    monkeypatch.setattr(QL, "_cpu_native_bf16", lambda: True)
    assert m._kernel_rows(4096, torch.device("cpu"))


def test_cpu_path_per_rows_and_hardware(monkeypatch):
    """The shipped table: with native bf16 the kernel at every size (the behaviour measured there is kept);
    without it the kernel below INT4_DENSE_ROWS[False] rows, dense from there (a 512-token prompt)."""
    assert QL.INT4_DENSE_ROWS[True] is None
    limit = QL.INT4_DENSE_ROWS[False]
    assert limit is not None and 1 < limit <= 512
    m, _ = quant_layer()
    monkeypatch.setattr(QL, "_cpu_native_bf16", lambda: True)
    assert [m.cpu_path(r) for r in (1, limit - 1, limit, 512, 4096)] == ["kernel"] * 5
    monkeypatch.setattr(QL, "_cpu_native_bf16", lambda: False)
    assert [m.cpu_path(r) for r in (1, limit - 1, limit, 512)] == ["kernel", "kernel", "dense", "dense"]
    assert quant_layer(bits=8, gs=-1)[0].cpu_path(512) == "int8"
    packed, _ = quant_layer(bits=3)
    packed._build(packed.codes(), packed.scale, packed.zero, packed.g_idx, kernels=False)
    assert packed.cpu_path(1) == "packed"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("act_order,bits,gs", [(False, 4, 32), (True, 4, 32), (True, 3, 32), (False, 4, -1)])
def test_int4_forward_runs_the_path_it_reports(monkeypatch, native, act_order, bits, gs):
    """At 512 rows the forward calls the int4 kernel only where cpu_path says "kernel"; the dense path equals
    x @ W_hat^T up to fp32 summation, the kernel's bf16 activations stay within its usual error."""
    monkeypatch.setattr(QL, "_cpu_native_bf16", lambda: native)
    m, W_hat = quant_layer(act_order, bits, gs)
    assert m.layout == "int4" and (m.perm is not None) == act_order
    calls = []
    real = QL._int4_mm

    def spy(device):
        calls.append(device)
        return real(device)

    monkeypatch.setattr(QL, "_int4_mm", spy)
    x = torch.randn(512, K, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = m(x)
        y1 = m(x[:1])
    want = reference(m, W_hat)(x)
    path = m.cpu_path(512)
    assert path == ("kernel" if native else "dense")
    assert len(calls) == (2 if path == "kernel" else 1)        # the single row always runs on the kernel
    if path == "dense":
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    else:
        assert sqnr_db(want, y) > 35
    assert sqnr_db(want[:1], y1) > 35


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_act_order_dequantization_in_kernel_order_is_exact(bits):
    """The dense path's weight (kernel column order, group scales broadcast) and dequantize_weight() built
    from it are bit for bit the per-column gather of dequantize_grouped."""
    m, W_hat = quant_layer(act_order=True, bits=bits)
    assert m.layout == "int4" and m.perm is not None
    slow = dequantize_grouped(m.codes(), m.scale, m.zero.float(), m.g_idx)
    assert torch.equal(slow, W_hat)
    assert torch.equal(m._kernel_order_weight(), slow[:, m.perm])
    assert torch.equal(m.dequantize_weight(), slow)


# ---------------------------------------------------------------- NF4Linear


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear(rows, double_quant):
    W, b = weight()
    m = NF4Linear.from_weight(W, b, "nf4", 64, double_quant)
    ref = reference(m, nf4_hat(m))
    x, y, gx, gy, saved = run(m, rows)
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)        # fp32 dequantize + matmul
    torch.testing.assert_close(gx, ref_grad(ref, x, gy), rtol=1e-6, atol=1e-6)
    check_frozen(m, saved)


# ---------------------------------------------------------------- Int8Linear


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dense", [False, True])
def test_int8_linear(rows, dense, monkeypatch):
    """LLM.int8() below INT8_DENSE_ROWS (and in inference), weight-only int8 from there in training."""
    monkeypatch.setattr(I8, "INT8_DENSE_ROWS", 1 if dense else 10**9)
    W, b = weight()
    m = Int8Linear.from_weight(W, b)
    ref = reference(m, m.weight.float() * m.SCB[:, None] / 127)
    x, y, gx, gy, saved = run(m, rows)
    if dense:                                   # weight-only int8: fp32 dequantize + matmul
        torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
        with torch.no_grad():                   # inference stays LLM.int8() at every size
            assert torch.equal(m(x), int8_linear(x, m.weight, m.SCB, m.bias, m.threshold))
    else:      # LLM.int8(): x rounded per row to int8 (half a step, s_x / 254, per entry) against W_hat
        assert torch.equal(y, int8_linear(x, m.weight, m.SCB, m.bias, m.threshold))
        bound = (x.abs().amax(1, keepdim=True) / 254) * ref.weight.abs().sum(1)
        assert ((y - ref(x)).abs() <= bound + 1e-5).all()
    torch.testing.assert_close(gx, ref_grad(ref, x, gy), rtol=1e-6, atol=1e-6)   # dL/dx = gy @ W_hat
    check_frozen(m, saved)
