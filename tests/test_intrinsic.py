"""Intrinsic-dimension training: the Walsh-Hadamard transform and the Fastfood projection against plain dense
references, and the method on the loop (step 0 is the base, only theta_d and the SAID scalars train, the
saved model reloads with the trained logits, bad dimensions are refused)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import slimlm
from slimlm import api
from slimlm.adapt.intrinsic import IntrinsicConfig
from slimlm.core.intrinsic import Fastfood, fwht
from slimlm.errors import ConfigError
from slimlm.training import data as TD
from slimlm.training.config import TrainConfig

from conftest import random_windows, tiny_model


def hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_fwht_equals_the_hadamard_matrix():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fwht(x), x @ hadamard(64).T, atol=1e-4, rtol=1e-5)
    for n in (1, 2, 32, 2048):                               # one factor, several, and a smaller last one
        y = torch.randn(2, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        torch.testing.assert_close(fwht(y), y @ hadamard(n).T.double(), atol=1e-8, rtol=1e-10)
    with pytest.raises(ValueError):
        fwht(torch.zeros(6))


def test_fastfood_is_the_documented_linear_map_with_the_dense_scale():
    g = torch.Generator().manual_seed(1)
    ff = Fastfood(5, 100, g)
    L = ff.L
    assert L == 128
    H = hadamard(L)
    Pi = torch.zeros(L, L)
    Pi[torch.arange(L), ff.Pi] = 1                           # (Pi v)[i] = v[Pi[i]]
    ref = (H @ torch.diag(ff.G) @ Pi @ H @ torch.diag(ff.B))[:100, :5] * ff.scale
    torch.testing.assert_close(ff.dense(), ref, atol=1e-4, rtol=1e-4)
    x = torch.randn(5, generator=g)
    torch.testing.assert_close(ff(x), ref @ x, atol=1e-4, rtol=1e-4)
    xg = x.clone().requires_grad_()                          # the gradient is P^T g (the permutation's backward)
    w = torch.randn(100, generator=g)
    (ff(xg) * w).sum().backward()
    torch.testing.assert_close(xg.grad, ref.T @ w, atol=1e-4, rtol=1e-4)
    big = Fastfood(8, 4096, torch.Generator().manual_seed(2)).dense()
    assert big.var(dim=0).mean().item() == pytest.approx(1 / 4096, rel=0.1)   # entries ~ N(0, 1/D)


def windows_data(steps: int, batch: int = 2, seqlen: int = 32):
    return TD.text_windows(random_windows(200, 64, 0).reshape(-1), seqlen=seqlen, batch_size=batch, batches=steps,
                           seed=0)


@pytest.mark.parametrize("projection,said", [("fastfood", True), ("dense", False)])
def test_intrinsic_trains_only_theta_d_and_saves_the_moved_model(projection, said, tmp_path):
    model, base = tiny_model("llama"), tiny_model("llama")
    x = random_windows(2, 12, seed=3)
    cfg = TrainConfig(steps=4, seqlen=32, batch_size=2, lr=5e-2)
    report = api.train(model, IntrinsicConfig(dim=16, projection=projection, said=said), windows_data(4), cfg,
                       output=tmp_path / "i", progress=False)
    assert report["trainable_parameters"] == 16 + (report["projected_tensors"] if said else 0)
    with torch.no_grad():
        trained, plain = model(input_ids=x).logits, base(input_ids=x).logits
    assert (trained - plain).abs().max() > 1e-4
    loaded = slimlm.load_model(str(tmp_path / "i"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, trained, atol=1e-5, rtol=1e-5)
    vec = load_file(str(tmp_path / "i" / "intrinsic.safetensors"))
    assert vec["theta_d"].shape == (16,) and vec["theta_d"].abs().sum() > 0
    emb = dict(loaded.named_parameters())["model.embed_tokens.weight"]
    assert torch.equal(emb, dict(base.named_parameters())["model.embed_tokens.weight"])   # blocks only


def test_step_zero_is_the_base_model():
    from slimlm.adapt.intrinsic import Intrinsic

    model, base = tiny_model("gpt2"), tiny_model("gpt2")
    Intrinsic(model, IntrinsicConfig(dim=8), seed=0)
    x = random_windows(2, 10, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, atol=0, rtol=0)


def test_bad_dimensions_are_refused():
    from slimlm.adapt.intrinsic import Intrinsic

    with pytest.raises(ConfigError, match="--dim must be at least 1"):
        IntrinsicConfig(dim=0)
    with pytest.raises(ConfigError, match="larger than the"):
        Intrinsic(tiny_model("llama"), IntrinsicConfig(dim=10**9), seed=0)
