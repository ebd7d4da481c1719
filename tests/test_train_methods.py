"""Quantization-aware training and LayerDrop as methods of the training loop: each trains, saves, and
reloads with the logits it had in memory; QAT's saved model is slimlm's packed layers with the fake-quantized
model's logits; LayerDrop really skips layers in training only, resumes exactly, and leaves a model that
can be cut."""
from __future__ import annotations

import json

import pytest
import torch

import slimlm
from slimlm import api
from slimlm.adapt.methods import LayerDropConfig, QATConfig, cut_layers
from slimlm.calibration.common import find_blocks
from slimlm.errors import ConfigError, Interrupted
from slimlm.formats.native import runtime_modules
from slimlm.quant.qat import FakeQuantLinear
from slimlm.training import data as TD
from slimlm.training.config import TrainConfig

from conftest import StopAt, random_windows, tiny_model


def windows_data(steps: int, batch: int = 2, seqlen: int = 32):
    return TD.text_windows(random_windows(200, 64, 0).reshape(-1), seqlen=seqlen, batch_size=batch, batches=steps,
                           seed=0)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_qat_trains_and_saves_packed_layers_with_the_fake_quantized_logits(tmp_path):
    model = tiny_model("llama")
    x = random_windows(2, 12, seed=1)
    cfg = TrainConfig(steps=3, seqlen=32, batch_size=2, lr=1e-3)
    plan_model = model
    report = api.train(plan_model, QATConfig(bits=4, group_size=32), windows_data(3), cfg, output=tmp_path / "q",
                       progress=False)
    assert report["method"] == "qat" and report["trainable_parameters"] > 0
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())      # converted when saved
    assert runtime_modules(model)
    loaded = slimlm.load_model(str(tmp_path / "q"))
    assert runtime_modules(loaded)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_qat_converted_logits_equal_the_fake_quantized_model(tmp_path):
    from slimlm.adapt.methods import TrainContext, prepare_qat_method
    from slimlm.quant.qat import convert_qat

    model = tiny_model("qwen2")
    prepare_qat_method(model, QATConfig(bits=3, group_size=32), TrainContext())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.add_(0.01 * torch.randn_like(m.weight))
    x = random_windows(2, 12, seed=2)
    before = logits(model, x)
    fake_w = {n: m.quant_result().dequantize() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    convert_qat(model)
    packed = dict(model.named_modules())
    for name, w in fake_w.items():            # the packed layer holds exactly the weights the fake layer used
        torch.testing.assert_close(packed[name].dequantize_weight(torch.float32), w, atol=0, rtol=0)
    after = logits(model, x)                  # the int4 kernel computes with bf16 activations: close, not equal
    assert (after - before).pow(2).mean() / before.pow(2).mean() < 1e-3


def test_qat_refuses_bad_settings_and_other_packed_bases():
    with pytest.raises(ConfigError):
        QATConfig(bits=1)
    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.NF4Config())
    with pytest.raises(ConfigError, match="packed quantized layer"):
        api.train(model, QATConfig(), windows_data(2), TrainConfig(steps=2, seqlen=32, batch_size=2), progress=False)


def test_layerdrop_skips_layers_in_training_only():
    from slimlm.adapt.methods import TrainContext, prepare_layerdrop

    model = tiny_model("llama")
    calls = []
    _, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        b.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))   # runs only if the layer runs
    prepare_layerdrop(model, LayerDropConfig(layerdrop=0.5), TrainContext())
    x = random_windows(1, 8, seed=3)
    calls.clear()
    model.train()
    torch.manual_seed(0)
    for _ in range(20):
        model(input_ids=x)
    assert 0 < len(calls) < 40                          # about half of 2 layers x 20 passes ran
    model.eval()
    calls.clear()
    model(input_ids=x)
    assert calls == [0, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layerdrop_trains_resumes_exactly_and_saves_a_plain_model(arch, tmp_path):
    cfg = TrainConfig(steps=6, seqlen=32, batch_size=2, lr=1e-3, save_every=3)
    trained = tiny_model(arch)
    api.train(trained, LayerDropConfig(layerdrop=0.5), windows_data(6), cfg, output=tmp_path / "a", progress=False)


    with pytest.raises(Interrupted):
        api.train(tiny_model(arch), LayerDropConfig(layerdrop=0.5), StopAt(windows_data(6), 4), cfg,
                  output=tmp_path / "b", progress=False)
    api.train(tiny_model(arch), LayerDropConfig(layerdrop=0.5), windows_data(6), cfg, output=tmp_path / "b",
              resume=True, progress=False)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 6
    loaded = slimlm.load_model(str(tmp_path / "a"))
    x = random_windows(1, 8)
    torch.testing.assert_close(logits(loaded, x), logits(trained, x), atol=1e-5, rtol=1e-5)
    assert (logits(loaded, x) - logits(tiny_model(arch), x)).abs().max() > 1e-4      # it trained
    assert all("forward" not in b.__dict__ for b in find_blocks(trained)[1])
    cut_layers(loaded, [0])
    assert len(find_blocks(loaded)[1]) == 1
    assert torch.isfinite(logits(loaded, random_windows(1, 8))).all()


def test_qat_continues_from_a_packed_gptq_model_on_its_own_grid(tmp_path):
    from slimlm.adapt.methods import TrainContext, prepare_qat_method

    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.GPTQConfig(bits=3, group_size=32), data=random_windows(4, 32))
    packed = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if n in runtime_modules(model)}
    plan = prepare_qat_method(model, QATConfig(), TrainContext())
    assert plan.info["from_packed_layers"] == len(packed)
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert fakes.keys() == packed.keys()
    for name, m in fakes.items():              # step 0 is exactly the GPTQ model: same codes, same grid
        torch.testing.assert_close(m.quant_result().dequantize(), packed[name], atol=0, rtol=0)
    x = random_windows(2, 12, seed=5)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert all(m.weight.grad is not None for m in fakes.values())


def _fake_weights(model) -> dict:
    return {n: m.quant_result().dequantize() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def test_qat_continues_from_an_awq_model_with_its_input_scales(tmp_path):
    from slimlm.adapt.methods import TrainContext, prepare_qat_method
    from slimlm.quant.qat import convert_qat
    from slimlm.quant.scaled import ScaledQuantLinear

    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.AWQConfig(bits=4, group_size=32), data=random_windows(4, 32))
    scaled = {n for n, m in model.named_modules() if isinstance(m, ScaledQuantLinear)}
    assert scaled                                   # the case that needs the input scale (after the activation)
    x = random_windows(2, 12, seed=6)
    packed = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if n in runtime_modules(model)}
    before = logits(model, x)
    prepare_qat_method(model, QATConfig(), TrainContext())
    for name, w in _fake_weights(model).items():     # step 0 is exactly the AWQ model: its codes on its grid
        torch.testing.assert_close(w, packed[name], atol=0, rtol=0)
    fake0 = logits(model, x)
    assert (fake0 - before).pow(2).mean() / before.pow(2).mean() < 1e-3
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.add_(0.02 * torch.randn_like(m.weight))
    moved, fake_w = logits(model, x), _fake_weights(model)
    convert_qat(model)
    mods = dict(model.named_modules())
    assert {n for n, m in mods.items() if isinstance(m, ScaledQuantLinear)} == scaled
    for name, w in fake_w.items():
        torch.testing.assert_close(mods[name].dequantize_weight(torch.float32), w, atol=0, rtol=0)
    after = logits(model, x)
    assert (after - moved).pow(2).mean() / moved.pow(2).mean() < 1e-3
    assert (moved - fake0).abs().max() > 1e-3       # the weights did move


def test_lora_inside_the_rounding_trains_only_the_update_and_saves_what_it_computed(tmp_path):
    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.GPTQConfig(bits=3, group_size=32), data=random_windows(4, 32))
    packed = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if n in runtime_modules(model)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=4, seqlen=32, batch_size=2, lr=1e-2)
    from slimlm.adapt.methods import TrainContext, prepare_qat_method

    probe = tiny_model("llama")
    slimlm.quantize(probe, slimlm.GPTQConfig(bits=3, group_size=32), data=random_windows(4, 32))
    plan = prepare_qat_method(probe, QATConfig(lora_r=4, lora_alpha=8), TrainContext())
    assert plan.info["adapted_layers"] == len(packed)
    assert set(plan.params) == {f"{n}.lora_{k}" for n in packed for k in "AB"}
    assert all(not p.requires_grad for n, p in probe.named_parameters() if "lora_" not in n)
    for name, w in _fake_weights(probe).items():     # B = 0: step 0 is the GPTQ model
        torch.testing.assert_close(w, packed[name], atol=0, rtol=0)

    report = api.train(model, QATConfig(lora_r=4, lora_alpha=8), windows_data(4), cfg, output=tmp_path / "q",
                       progress=False)
    assert report["trainable_parameters"] == sum(p.numel() for p in plan.params.values())
    assert runtime_modules(model) and not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    changed = [n for n, m in model.named_modules() if n in packed
               and not torch.equal(m.dequantize_weight(torch.float32), packed[n])]
    assert changed                                  # the update moved codes
    for n, p in model.named_parameters():           # nothing outside the packed layers trained
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], atol=0, rtol=0)
    loaded = slimlm.load_model(str(tmp_path / "q"))
    x = random_windows(2, 12, seed=1)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_qat_lora_bad_settings():
    with pytest.raises(ConfigError, match="lora-r"):
        QATConfig(lora_r=-1)
    with pytest.raises(ConfigError, match="lora-alpha"):
        QATConfig(lora_r=4, lora_alpha=0)
