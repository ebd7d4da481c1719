"""Chunked linear cross-entropy: loss and gradients equal the plain F.cross_entropy over the full logits, for
several chunk sizes, ignored positions, frozen weight, bf16 hidden; no intermediate holds N x V values;
next-token label shifting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slimlm.core.losses import chunked_linear_cross_entropy, shift_labels
from slimlm.errors import ConfigError

N, H, V = 37, 16, 50


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_inputs(seed: int = 0, *, n_ignored: int = 9, bias: bool = True, hidden_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).to(hidden_dtype)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, reduction, ignore_index=-100):
    """The plain loss over the full (N, V) logits in fp32."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def grads(fn, hidden, weight, bias, labels, *, frozen_weight=False):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(not frozen_weight)
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fn(hidden, weight, bias, labels)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 37, 1024])   # 8 and 10 do not divide N = 37
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_grads_equal_plain_cross_entropy(chunk_size, reduction, bias):
    h, W, b, y = make_inputs(bias=bias)
    ours = grads(lambda h, W, b, y: chunked_linear_cross_entropy(h, W, y, bias=b, chunk_size=chunk_size,
                                                                 reduction=reduction), h, W, b, y)
    ref = grads(lambda h, W, b, y: reference(h, W, b, y, reduction), h, W, b, y)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
        else:
            assert a.dtype == r.dtype and a.shape == r.shape
            assert torch.allclose(a, r, rtol=1e-5, atol=1e-6 * float(r.abs().max())), (a - r).abs().max()


def test_ignored_positions_contribute_nothing():
    """Changing the hidden state at an ignored position changes neither loss nor other gradients, and its
    own gradient is exactly zero."""
    h, W, b, y = make_inputs(n_ignored=12)
    ignored = y == -100
    loss, gh, gW, gb = grads(lambda h, W, b, y: chunked_linear_cross_entropy(h, W, y, bias=b, chunk_size=8),
                             h, W, b, y)
    assert torch.all(gh[ignored] == 0) and torch.all(gh[~ignored].abs().sum(1) > 0)
    h2 = h.clone()
    h2[ignored] = torch.randn(int(ignored.sum()), H) * 10
    loss2, _, gW2, gb2 = grads(lambda h, W, b, y: chunked_linear_cross_entropy(h, W, y, bias=b, chunk_size=8),
                               h2, W, b, y)
    assert torch.equal(loss, loss2)
    assert torch.allclose(gW, gW2, atol=1e-6) and torch.allclose(gb, gb2, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_frozen_weight_gets_no_grad(reduction):
    h, W, b, y = make_inputs()
    fn = lambda h, W, b, y: chunked_linear_cross_entropy(h, W, y, bias=b, chunk_size=10,   # noqa: E731
                                                         reduction=reduction)
    loss, gh, gW, gb = grads(fn, h, W, b, y, frozen_weight=True)
    rloss, rgh, _, rgb = grads(lambda h, W, b, y: reference(h, W, b, y, reduction), h, W, b, y,
                               frozen_weight=True)
    assert gW is None
    assert torch.allclose(loss, rloss, rtol=1e-5)
    assert torch.allclose(gh, rgh, rtol=1e-5, atol=1e-6 * float(rgh.abs().max()))
    assert torch.allclose(gb, rgb, rtol=1e-5, atol=1e-6 * float(rgb.abs().max()))


def test_bf16_hidden_computes_in_fp32():
    """bf16 hidden: the loss is the fp32 loss of the bf16 values (not bf16 logits); grads come back in bf16."""
    h, W, b, y = make_inputs(hidden_dtype=torch.bfloat16)
    loss, gh, gW, gb = grads(lambda h, W, b, y: chunked_linear_cross_entropy(h, W, y, bias=b, chunk_size=8,
                                                                             reduction="mean"), h, W, b, y)
    rloss, rgh, rgW, rgb = grads(lambda h, W, b, y: reference(h, W, b, y, "mean"), h.float(), W, b, y)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16
    assert torch.allclose(loss, rloss, rtol=1e-5)
    assert torch.allclose(gh.float(), rgh, rtol=1e-2, atol=1e-2 * float(rgh.abs().max()))   # bf16 rounding
    assert torch.allclose(gW, rgW, rtol=1e-5, atol=1e-6 * float(rgW.abs().max()))
    assert torch.allclose(gb, rgb, rtol=1e-5, atol=1e-6 * float(rgb.abs().max()))


def test_batched_leading_dims():
    h, W, b, y = make_inputs(seed=3, n_ignored=0)
    h, y = h[:36].reshape(4, 9, H), y[:36].reshape(4, 9)
    loss = chunked_linear_cross_entropy(h, W, y, bias=b, chunk_size=5, reduction="mean")
    assert torch.allclose(loss, reference(h.reshape(-1, H), W, b, y.reshape(-1), "mean"), rtol=1e-5)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits():
    """No op output in forward or backward is larger than chunk x V or the inputs' own sizes (V*H, N*H);
    the plain loss makes N x V ones."""
    g = torch.Generator().manual_seed(4)
    n, chunk = 64, 8
    h = torch.randn(n, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (n,), generator=g)
    bound = max(chunk * V, V * H, n * H)
    assert bound < n * V
    with _LargestOutput() as rec:
        chunked_linear_cross_entropy(h, W, y, chunk_size=chunk).backward()
    assert rec.largest <= bound
    with _LargestOutput() as plain:
        F.cross_entropy(h @ W.T, y, reduction="sum").backward()
    assert plain.largest == n * V   # the recorder does see the logits when they exist


def test_all_ignored():
    h, W, b, y = make_inputs()
    y = torch.full_like(y, -100)
    assert chunked_linear_cross_entropy(h, W, y, bias=b).item() == 0.0
    assert torch.isnan(chunked_linear_cross_entropy(h, W, y, bias=b, reduction="mean"))   # as F.cross_entropy


def test_custom_ignore_index():
    h, W, b, y = make_inputs()
    y = torch.where(y == -100, torch.full_like(y, 7), y)
    assert torch.allclose(chunked_linear_cross_entropy(h, W, y, bias=b, ignore_index=7, chunk_size=6),
                          reference(h, W, b, y, "sum", ignore_index=7), rtol=1e-5)


def test_bad_inputs():
    h, W, b, y = make_inputs()
    with pytest.raises(ConfigError, match="reduction must be 'sum' or 'mean'"):
        chunked_linear_cross_entropy(h, W, y, reduction="none")
    with pytest.raises(ConfigError, match="chunk_size must be a positive"):
        chunked_linear_cross_entropy(h, W, y, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        chunked_linear_cross_entropy(h, W.T, y)
    with pytest.raises(ValueError, match="leading shape"):
        chunked_linear_cross_entropy(h, W, y[:-1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        chunked_linear_cross_entropy(h, W, torch.where(y == -100, torch.full_like(y, V), y))


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, -100], [2, 3, 0, -100]]
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0]])   # e.g. prompt/padding masked: targets 7 and 0 dropped
    assert shift_labels(ids, mask).tolist() == [[6, -100, 8, -100], [-100, 3, -100, -100]]
    assert shift_labels(ids, mask.bool(), ignore_index=-1).tolist() == [[6, -1, 8, -1], [-1, 3, -1, -1]]
    with pytest.raises(ValueError, match="loss_mask must match"):
        shift_labels(ids, mask[:, :3])
