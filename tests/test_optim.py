"""Learning-rate schedule values; make_optimizer's groups (no_decay, frozen params), SGD momentum against a
hand-written update, and bitsandbytes' 8-bit AdamW on CPU: 8-bit block-wise states, tracking fp32 AdamW."""
from __future__ import annotations

import math

import bitsandbytes  # noqa: F401  (the dev extra installs it: a broken install fails here, never skips)
import pytest
import torch

from slimlm.core.optim import lr_at
from slimlm.errors import ConfigError
from slimlm.training.optim import is_vector, make_optimizer, param_groups


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# total=110, warmup=10, base 1e-3: decay runs over 100 steps, halfway at step 60
@pytest.mark.parametrize("schedule,min_ratio,step,expected", [
    ("cosine", 0.0, 0, 0.0),
    ("cosine", 0.0, 1, 1e-4),
    ("cosine", 0.0, 5, 5e-4),
    ("cosine", 0.0, 10, 1e-3),
    ("cosine", 0.0, 35, 1e-3 * (1 + math.cos(math.pi / 4)) / 2),
    ("cosine", 0.0, 60, 5e-4),
    ("cosine", 0.1, 60, 1e-4 + 9e-4 * 0.5),
    ("cosine", 0.1, 110, 1e-4),
    ("cosine", 0.1, 500, 1e-4),
    ("linear", 0.0, 5, 5e-4),
    ("linear", 0.0, 35, 7.5e-4),
    ("linear", 0.0, 110, 0.0),
    ("linear", 0.2, 60, 2e-4 + 8e-4 * 0.5),
    ("constant", 0.0, 3, 3e-4),
    ("constant", 0.5, 10, 1e-3),
    ("constant", 0.5, 1000, 1e-3),
])
def test_lr_at_known_values(schedule, min_ratio, step, expected):
    got = lr_at(step, total=110, warmup=10, base_lr=1e-3, schedule=schedule, min_lr_ratio=min_ratio)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_at_without_warmup_and_monotone_decay():
    assert lr_at(0, total=50, warmup=0, base_lr=2.0) == 2.0
    lrs = [lr_at(s, total=50, warmup=0, base_lr=2.0, min_lr_ratio=0.1) for s in range(51)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.2)
    assert lr_at(20, total=20, warmup=20, base_lr=1.0) == 1.0   # all warmup: base at the end


def test_lr_at_bad_inputs():
    with pytest.raises(ConfigError, match="schedule must be one of cosine, linear, constant"):
        lr_at(0, total=10, warmup=0, base_lr=1.0, schedule="step")
    with pytest.raises(ConfigError, match="warmup must be in 0..total"):
        lr_at(0, total=10, warmup=11, base_lr=1.0)
    with pytest.raises(ConfigError, match="total must be a positive"):
        lr_at(0, total=0, warmup=0, base_lr=1.0)
    with pytest.raises(ConfigError, match="min_lr_ratio must be in"):
        lr_at(0, total=10, warmup=0, base_lr=1.0, min_lr_ratio=1.5)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.LayerNorm(50), torch.nn.Linear(50, 8))


def test_make_optimizer_kinds_and_errors():
    m = _model()
    assert isinstance(make_optimizer(m.parameters(), "adamw", lr=1e-3), torch.optim.AdamW)
    sgd = make_optimizer(m.parameters(), "sgd", lr=0.1, momentum=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'; choose one of adamw, adamw8bit, sgd"):
        make_optimizer(m.parameters(), "lion", lr=1e-3)
    m.requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter requires grad"):
        make_optimizer(m.parameters(), lr=1e-3)


def test_no_decay_and_frozen_params():
    """Zero gradients: AdamW's update is decay alone, p <- p (1 - lr wd), only on the dim >= 2 params; frozen
    params are not in the optimizer at all."""
    m = _model()
    m[2].requires_grad_(False)   # a frozen layer
    groups = param_groups(m.parameters(), 0.1, is_vector)
    assert [len(g["params"]) for g in groups] == [1, 3] and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = make_optimizer(m.parameters(), "adamw", lr=0.5, weight_decay=0.1, no_decay=is_vector)
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt.step()
    for n, p in m.named_parameters():
        if n == "0.weight":
            assert torch.allclose(p, before[n] * 0.95 ** 3, rtol=1e-6)
        else:
            assert torch.equal(p, before[n]), n


def test_sgd_momentum_matches_hand_written_update():
    """torch's SGD: b <- mu b + (g + wd p) (b = g at the first step), p <- p - lr b."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(6, 4, generator=g)
    p = torch.randn(6, 4, generator=g, requires_grad=True)
    ref, buf = p.detach().clone(), None
    opt = make_optimizer([p], "sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        opt.zero_grad()
        (p - target).pow(2).sum().backward()
        opt.step()
        d = 2 * (ref - target) + 0.01 * ref
        buf = d if buf is None else 0.9 * buf + d
        ref = ref - 0.1 * buf
    assert torch.allclose(p.detach(), ref, rtol=1e-5, atol=1e-6)


def _fit(name: str, steps: int = 50):
    """A least-squares fit of a 100 -> 50 linear map; returns the model, optimizer and losses."""
    torch.manual_seed(2)
    m = torch.nn.Linear(100, 50)   # 5000 weights: 8-bit states (>= 4096), 20 blocks of 256 (the last partial)
    X = torch.randn(256, 100)
    Y = X @ (torch.randn(50, 100) * 0.1).T
    opt = make_optimizer(m.parameters(), name, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (m(X) - Y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return m, opt, losses


def test_adamw8bit_states_are_blockwise_8bit():
    m, opt, _ = _fit("adamw8bit", steps=2)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-2, (0.9, 0.99), 1e-8, 0.01)
    st = opt.state[m.weight]
    n, blocks = m.weight.numel(), math.ceil(m.weight.numel() / 256)
    for code, absmax in (("state1", "absmax1"), ("state2", "absmax2")):
        assert st[code].dtype == torch.uint8 and st[code].numel() == n
        assert st[absmax].dtype == torch.float32 and st[absmax].numel() == blocks
        assert st[code].nbytes + st[absmax].nbytes == n + 4 * blocks   # 1 byte per value + 4 per block
    # the signed dynamic map for m, the unsigned one for v
    assert float(st["qmap1"].min()) < 0 and float(st["qmap2"].min()) == 0
    assert opt.state[m.bias]["state1"].dtype == torch.float32       # 50 < 4096 values: fp32 moments


def test_adamw8bit_tracks_fp32_adamw():
    torch.manual_seed(2)
    w0 = torch.nn.Linear(100, 50).weight.detach().clone()
    ref, _, ref_losses = _fit("adamw")
    q, _, q_losses = _fit("adamw8bit")
    du_ref, du_q = ref.weight.detach() - w0, q.weight.detach() - w0
    rel = float((du_q - du_ref).norm() / du_ref.norm())
    assert 0 < rel < 0.05, rel                          # close, and not fp32 in disguise
    assert q_losses[-1] < 0.05 * q_losses[0]            # it does fit
    assert q_losses[-1] == pytest.approx(ref_losses[-1], rel=0.1)


def test_adamw_is_torchs_fused_kernel_and_tracks_the_per_tensor_loop():
    """make_optimizer's AdamW runs torch's fused kernel on CPU; five steps with weight decay land where the
    per-tensor AdamW lands (the same update, another order of operations)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    runs = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = (make_optimizer(ps, "adamw", lr=1e-2, weight_decay=0.1) if fused else
               torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))
        assert bool(opt.defaults.get("fused")) == fused
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        runs.append(ps)
    for a, b, s in zip(*runs, start):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert (a - s).abs().max() > 1e-3                      # the steps moved the weights
