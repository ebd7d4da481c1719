"""The LoRA / DoRA runtime (slimlm.adapt.lora): a fresh adapter is the base model bit for bit on every
architecture, merge/unmerge round trip, named adapters switch, disable and delete, only adapter parameters
train, gradients pass exactly through frozen quantized bases, seeded init, every bad input refused."""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch import nn

from slimlm.adapt.layer import LoRALinear, base_weight
from slimlm.adapt.lora import (
    LoRAConfig,
    adapter_names,
    add_lora,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    lora_layers,
    lora_parameters,
    merge_lora,
    remove_lora,
    set_adapter,
    unmerge_lora,
)
from slimlm.core.quant import rtn_result
from slimlm.errors import ConfigError
from slimlm.quant.int8_linear import Int8Linear
from slimlm.quant.linear import QuantLinear
from slimlm.quant.nf4_linear import NF4Linear
from slimlm.quant.targets import set_submodule

from conftest import ARCHS, random_windows, tiny_model

CLI_OWNED = {"model", "method", "data", "field", "samples", "seqlen", "output", "overwrite", "batch_size",
             "precise", "threads", "trust_remote_code", "device", "dtype", "steps", "tokens", "lr", "resume",
             "save_every", "eval_data", "grad_accum", "seed"}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def randomize(model, name="default", seed=1):
    """Nonzero B (and a magnitude off its init), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in lora_parameters(model, name).items():
            if k.endswith("lora_B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif k.endswith("lora_magnitude"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def test_config_fields_have_help_and_leave_the_cli_names():
    for f in fields(LoRAConfig):
        assert f.metadata.get("help"), f.name
        assert f.name not in CLI_OWNED, f.name


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_the_base_model_bit_for_bit(arch, dora):
    model, x = tiny_model(arch), random_windows(2, 16)
    ref = logits(model, x)
    names = add_lora(model, LoRAConfig(targets="all-linear", dora=dora))
    assert names and set(names) == set(lora_layers(model))
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert torch.equal(logits(model, x), ref)


def test_all_linear_on_a_quantized_model():
    """QLoRA: every block linear NF4 (so no nn.Linear marks the blocks): all-linear still leaves lm_head
    out, and the fresh adapter is the quantized model bit for bit."""
    model, x = tiny_model("llama"), random_windows(2, 16)
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for n in blocks:
        lin = model.get_submodule(n)
        set_submodule(model, n, NF4Linear.from_weight(lin.weight.detach(), lin.bias))
    ref = logits(model, x)
    assert add_lora(model, LoRAConfig(targets="all-linear", dora=True)) == blocks
    assert torch.equal(logits(model, x), ref)


def test_only_the_new_adapter_trains():
    model = tiny_model("llama")
    add_lora(model, LoRAConfig(dora=True), "a")
    add_lora(model, LoRAConfig(), "b")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model, "b").values()}
    assert len(lora_parameters(model, "a")) == 3 * 4      # q, v of 2 layers: A, B, magnitude
    assert set(lora_parameters(model, "b")) == {f"model.layers.{i}.self_attn.{p}_proj.lora_{t}"
                                               for i in range(2) for p in "qv" for t in "AB"}
    model(random_windows(1, 8), labels=random_windows(1, 8)).loss.backward()
    grads = {id(p) for p in model.parameters() if p.grad is not None}
    assert grads == trainable
    set_adapter(model, "a")
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
        {id(p) for p in lora_parameters(model, "a").values()}


def test_seeded_init_is_reproducible():
    models = [tiny_model("llama") for _ in range(3)]
    for m, seed in zip(models, (0, 0, 1)):
        add_lora(m, LoRAConfig(init="gaussian"), seed=seed)
    A = [{k: v for k, v in lora_parameters(m).items() if k.endswith("lora_A")} for m in models]
    assert all(torch.equal(A[0][k], A[1][k]) for k in A[0])
    assert not any(torch.equal(A[0][k], A[2][k]) for k in A[0])
    assert all(not p.any() for k, p in lora_parameters(models[0]).items() if k.endswith("lora_B"))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])           # gpt2: Conv1D stores W as (in, out)
def test_merge_and_unmerge(arch, dora):
    model, x = tiny_model(arch), random_windows(2, 16)
    add_lora(model, LoRAConfig(targets="all-linear", r=4, dora=dora))
    randomize(model)
    before = {n: base_weight(w.base).clone() for n, w in lora_layers(model).items()}
    adapted = logits(model, x)
    merge_lora(model)
    for n, w in lora_layers(model).items():
        a = w.adapters["default"]
        V = before[n] + a.scale * a.lora_B.detach() @ a.lora_A.detach()
        if dora:
            V = V * (a.lora_magnitude.detach() / V.norm(dim=1))[:, None]
        assert torch.allclose(base_weight(w.base), V, atol=1e-6)
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)
    unmerge_lora(model)
    for n, w in lora_layers(model).items():
        assert torch.allclose(base_weight(w.base), before[n], atol=1e-6, rtol=0)
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)
    merge_lora(model)
    remove_lora(model)                                         # merged weights stay, wrappers go
    assert not lora_layers(model)
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)


def test_named_adapters_switch_disable_delete():
    model, x = tiny_model("qwen2"), random_windows(2, 16)
    base = logits(model, x)
    add_lora(model, LoRAConfig(), "a", seed=0)
    randomize(model, "a", seed=1)
    add_lora(model, LoRAConfig(targets="q_proj,o_proj", dora=True), "b", seed=1)
    randomize(model, "b", seed=2)
    assert adapter_names(model) == ["a", "b"]
    out_b = logits(model, x)                                  # the newest adapter is active
    set_adapter(model, "a")
    out_a = logits(model, x)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base) and not torch.allclose(out_a, out_b)
    with disable_adapters(model):
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), out_a)
    disable_adapters(model)
    assert torch.equal(logits(model, x), base)
    enable_adapters(model)
    assert torch.equal(logits(model, x), out_a)
    # both active: each layer adds both terms
    layer = model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, 64)
    with torch.no_grad():
        y0 = layer.base(h)
        set_adapter(model, "a")
        ya = layer(h)
        set_adapter(model, "b")
        yb = layer(h)
        set_adapter(model, ["a", "b"])
        assert torch.allclose(layer(h), ya + yb - y0, atol=1e-6)
    delete_adapter(model, "a")
    assert adapter_names(model) == ["b"]
    assert torch.equal(logits(model, x), out_b)
    delete_adapter(model, "b")
    assert not lora_layers(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(logits(model, x), base)


# ---------------------------------------------------------------------------------- quantized bases
def _quantized(kind: str, W: torch.Tensor) -> nn.Module:
    if kind == "QuantLinear":
        m = QuantLinear.from_result(rtn_result(W, 4, 32, False))
        assert m.layout == "int4"                                # the kernel layout, not a dequantizing path
        return m
    if kind == "NF4Linear":
        return NF4Linear.from_weight(W, None)
    return Int8Linear.from_weight(W, None)                      # int8 x int8 products (no outliers here)


class _Stack(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["QuantLinear", "NF4Linear", "Int8Linear"])
def test_gradient_through_a_quantized_base(kind, dora):
    """LoRA on a float layer feeding a frozen quantized layer (with its own adapter): every adapter gradient
    equals the one computed with the quantized layer replaced by nn.Linear(W_hat). The loss is linear in
    the output, so the gradients do not depend on the (lossy) forward values, only on W_hat."""
    g = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(64, 64, generator=g) * 0.1, torch.randn(64, 64, generator=g) * 0.1
    x, c = torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, 64, generator=g)
    q = _quantized(kind, W2)
    ref = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize_weight())
    grads = []
    for second in (q, ref):
        first = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            first.weight.copy_(W1)
        model = _Stack(first, second)
        add_lora(model, LoRAConfig(targets="first,second", r=4, dora=dora))
        randomize(model)
        (model(x) * c).sum().backward()
        grads.append({k: p.grad.clone() for k, p in lora_parameters(model).items()})
    assert set(grads[0]) == set(grads[1]) and "first.lora_B" in grads[0]
    for k in grads[0]:
        if k.endswith("lora_magnitude"):     # dL/dm holds the base output itself: as close as the forward is
            err = (grads[0][k] - grads[1][k]).norm() / grads[1][k].norm()
            assert err < 2e-2, (k, float(err))
        else:
            assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5), k
    model = _Stack(nn.Linear(64, 64), q)
    add_lora(model, LoRAConfig(targets="second", r=4))
    with pytest.raises(ConfigError, match=rf"second has a quantized base \({kind}\).*use `slimlm merge`"):
        merge_lora(model)


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    (dict(targets=" , "), "targets is empty"),
    (dict(targets="all-linear,q_proj"), "give it alone"),
    (dict(init="xavier"), "init must be one of kaiming, gaussian"),
])
def test_bad_config_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        LoRAConfig(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config, name, match", [
    (LoRAConfig(targets="q_proj,qq_proj"), "default",
     r"targets pattern 'qq_proj' matches no linear layer \(names look like model.layers.0.self_attn.q_proj"),
    (LoRAConfig(targets="embed_tokens"), "default",
     r"names model.embed_tokens \(Embedding\), which is not a linear layer"),
    (LoRAConfig(targets="input_layernorm"), "default", r"\(LlamaRMSNorm\), which is not a linear layer"),
    (LoRAConfig(targets="all-linear", r=65), "default",
     r"r=65 exceeds min\(in, out\) = 64 of model.layers.0.self_attn.q_proj \(64 x 64\)"),
    (LoRAConfig(targets="k_proj", r=33), "default", r"r=33 exceeds min\(in, out\) = 32 .*k_proj \(32 x 64\)"),
    (LoRAConfig(), "a.b", "without dots"),
])
def test_bad_targets_refused_before_any_change(config, name, match):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=match) as e:
        add_lora(model, config, name)
    assert "\n" not in str(e.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_bad_adapter_operations_refused():
    model = tiny_model("llama")
    add_lora(model, LoRAConfig(), "a")
    cases = [
        (lambda: add_lora(model, LoRAConfig(targets="o_proj"), "a"), "the model already has an adapter named 'a'"),
        (lambda: set_adapter(model, "nope"), r"no adapter named 'nope' \(adapters: a\)"),
        (lambda: lora_parameters(model, "nope"), "no adapter named 'nope'"),
        (lambda: delete_adapter(model, "nope"), "no adapter named 'nope'"),
        (lambda: unmerge_lora(model, "a"), "adapter 'a' is not merged"),
    ]
    for call, match in cases:
        with pytest.raises(ConfigError, match=match):
            call()
    merge_lora(model, "a")
    for call, match in [(lambda: merge_lora(model, "a"), "already merged"),
                        (lambda: disable_adapters(model), r"merged .* unmerge_lora\(model, 'a'\) first"),
                        (lambda: delete_adapter(model, "a"), "unmerge_lora")]:
        with pytest.raises(ConfigError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_a_merged_adapter_stays_in_the_weights_under_a_new_one():
    """Merge adapter a, then train b on top: a stays in effect whatever the active set until unmerged."""
    model, x = tiny_model("llama"), random_windows(2, 16)
    base = logits(model, x)
    add_lora(model, LoRAConfig(), "a")
    randomize(model, "a")
    out_a = logits(model, x)
    merge_lora(model, "a")
    add_lora(model, LoRAConfig(targets="o_proj"), "b")          # fresh b: still exactly the merged a
    assert adapter_names(model) == ["a", "b"]
    assert torch.allclose(logits(model, x), out_a, atol=1e-5)
    unmerge_lora(model, "a")                                    # a is not active: its term is gone
    assert torch.allclose(logits(model, x), base, atol=1e-5)


# ------------------------------------------------------------------------- starting from a reference
def _kl(reference, model, x) -> float:
    p = torch.log_softmax(logits(reference, x), -1)
    q = torch.log_softmax(logits(model, x), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_init_from_reference_starts_a_quantized_base_near_the_float_model():
    """LoftQ / QERA start: every block linear of a tiny Llama rounded to 3 bits; the rank-4 adapters fitted to
    the rounding's residual bring the model closer to the float one than the bare 3-bit model (KL on unseen
    windows), and the fit weighted by the inputs beats the plain SVD of the residual on the same adapters."""
    from slimlm.adapt.lora import init_from_reference
    from slimlm.core.lora import residual_init

    ref, x = tiny_model("llama"), random_windows(4, 32, seed=7)
    model = tiny_model("llama")
    for n, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and n != "lm_head":
            set_submodule(model, n, QuantLinear.from_result(rtn_result(m.weight.detach(), 3, 16, False)))
    bare = _kl(ref, model, x)
    add_lora(model, LoRAConfig(targets="all-linear", r=4, alpha=8))
    assert _kl(ref, model, x) == pytest.approx(bare)                    # B = 0: still the bare base
    left = init_from_reference(model, ref, "default", random_windows(16, 32, seed=1))
    assert left and all(0 < v < 1 for v in left.values())
    weighted = _kl(ref, model, x)
    assert weighted < 0.8 * bare
    for n, w in lora_layers(model).items():                            # the same adapters, unweighted fit
        a = w.adapters["default"]
        A, B = residual_init(base_weight(ref.get_submodule(n)) - base_weight(w.base), a.r, a.scale)
        with torch.no_grad():
            a.lora_A.copy_(A), a.lora_B.copy_(B)
    assert weighted < _kl(ref, model, x) < bare


def test_init_from_reference_at_full_rank_is_the_reference_layer():
    from slimlm.adapt.lora import init_from_reference

    ref, model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    add_lora(model, LoRAConfig(targets="q_proj", r=min(ref.model.layers[0].self_attn.q_proj.weight.shape)))
    init_from_reference(model, ref, "default", random_windows(8, 32))
    for n, w in lora_layers(model).items():
        torch.testing.assert_close(base_weight(w.base) + w.adapters["default"].delta(),
                                   ref.get_submodule(n).weight, atol=1e-4, rtol=1e-4)


def test_init_from_a_model_of_other_shapes_is_refused():
    from slimlm.adapt.lora import init_from_reference

    model = tiny_model("llama")
    add_lora(model, LoRAConfig(targets="q_proj", r=2))
    other = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="reference model's model.layers.0.self_attn.q_proj is no such layer"):
        init_from_reference(model, other, "default", random_windows(2, 16))
    with pytest.raises(ConfigError, match="drop --dora or --init-from"):
        LoRAConfig(dora=True, init_from="x")


def test_input_grams_leave_padding_out():
    """With an attention mask, padded positions add nothing to X^T X / n: a right-padded row counts as its
    first tokens alone (a causal model's earlier positions do not see the padding)."""
    from slimlm.calibration.common import input_grams

    model, x = tiny_model("llama"), random_windows(2, 16, seed=3)
    mods = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    mask = torch.ones_like(x)
    mask[0, 11:] = 0
    got = input_grams(model, mods, x, attention_mask=mask)
    a, b = input_grams(model, mods, x[:1, :11]), input_grams(model, mods, x[1:])
    for n in mods:
        torch.testing.assert_close(got[n], (11 * a[n] + 16 * b[n]) / 27, rtol=1e-4, atol=1e-6)
    unmasked = input_grams(model, mods, x)
    assert not torch.allclose(unmasked[next(iter(mods))], got[next(iter(mods))], rtol=1e-3, atol=1e-6)


def test_init_from_the_base_itself_keeps_the_fresh_start():
    """A reference equal to the base leaves nothing to fit: the adapters keep A random and B zero (a fit of
    A = B = 0 would never receive a gradient)."""
    from slimlm.adapt.lora import init_from_reference

    model, x = tiny_model("llama"), random_windows(2, 16)
    add_lora(model, LoRAConfig(targets="q_proj", r=2))
    before = {n: w.adapters["default"].lora_A.detach().clone() for n, w in lora_layers(model).items()}
    left = init_from_reference(model, tiny_model("llama"), "default", x)
    for n, w in lora_layers(model).items():
        assert torch.equal(w.adapters["default"].lora_A, before[n]) and not w.adapters["default"].lora_B.any()
        assert left[n] == 0.0
