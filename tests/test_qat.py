"""Quantization-aware training: fake-quantized forward, straight-through gradients, training, conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.calibration import find_blocks, is_linear
from slimlm.errors import ConfigError
from slimlm.quant.configs import NF4Config, RTNConfig
from slimlm.quant.linear import QuantLinear
from slimlm.quant.qat import FakeQuantLinear, convert_qat, prepare_qat

from conftest import random_windows, tiny_model


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def plain_rtn(W: torch.Tensor, bits: int, gs: int, symmetric: bool):
    """Round-to-nearest written out: per row and group of gs columns, the range [min(w, 0), max(w, 0)] on
    2^bits codes (symmetric: absmax on a grid centred at 2^(bits-1)); codes q = clamp(round(w / s) + z).
    Returns codes (out, in) and scale, zero (out, in / gs)."""
    maxq = 2 ** bits - 1
    Wg = W.float().reshape(W.shape[0], -1, gs)                                  # (out, G, gs)
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)                  # (out, G)
    if symmetric:
        s = torch.maximum(-lo, hi) / (maxq / 2)
        s[s == 0] = 1
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        s = (hi - lo) / maxq
        s[s == 0] = 1
        z = torch.round(-lo / s).clamp(0, maxq)
    q = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, maxq)
    return q.reshape(W.shape), s, z


def plain_dequantize(q, s, z, gs):
    return (q - z.repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)


def test_forward_is_round_to_nearest_and_gradient_goes_straight_through():
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(16, 64, generator=g), torch.randn(16, generator=g), torch.randn(5, 64, generator=g)
    layer = FakeQuantLinear(W, b, bits=3, group_size=32, symmetric=False)
    W_q = plain_dequantize(*plain_rtn(W, 3, 32, False), 32)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, W_q, b))
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(layer.weight.grad, gy.T @ x)           # dL/dW = dL/dW_q: rounding passed
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_then_convert(arch):
    model = tiny_model(arch)
    _, blocks = find_blocks(model)
    prepare_qat(model, RTNConfig(bits=4, group_size=32))
    fakes = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert fakes and not any(is_linear(m) for m in blocks.modules())         # every block linear replaced
    ids = random_windows(4, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in fakes)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    trained = {n: plain_rtn(m.weight.detach(), m.bits, m.group_size, m.symmetric)
               for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    with torch.no_grad():
        fake_logits = model(ids).logits
        convert_qat(model)
        quant_logits = model(ids).logits
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quant.keys() == trained.keys()
    for name, (q, s, z) in trained.items():                  # the codes the trained weights round to, exactly
        m = quant[name]
        assert torch.equal(m.codes(), q.to(torch.uint8)), name
        assert torch.equal(m.scale, s) and torch.equal(m.zero.float(), z), name
    assert sqnr_db(fake_logits, quant_logits) > 30           # same codes; only the bf16 kernel's rounding


def test_qat_errors():
    with pytest.raises(ConfigError, match="integer quantization config"):
        prepare_qat(tiny_model("llama"), NF4Config())
    with pytest.raises(ConfigError, match="prepare_qat"):
        convert_qat(tiny_model("llama"))
    with pytest.raises(ConfigError, match="does not divide"):
        prepare_qat(tiny_model("llama"), RTNConfig(group_size=48))
