"""PEFT's adapter folder, proven with the real peft library both ways: a slimlm adapter (LoRA, DoRA, rsLoRA,
all-linear, GPT-2's Conv1D) trained a few steps and saved with save_peft loads with
peft.PeftModel.from_pretrained and gives the same logits, with the same tensor keys PEFT itself writes;
an adapter made by PEFT loads with load_peft and gives PEFT's logits; unknown config keys are ignored;
other bases, other adapter types, pickles and missing files are refused in one line."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from slimlm.adapt.lora import LoRAConfig, add_lora, lora_layers, lora_parameters
from slimlm.adapt.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_peft, read_adapter_config, save_peft
from slimlm.errors import ConfigError

from conftest import random_windows, tiny_model

CASES = {                                       # id: (arch, slimlm config, the same adapter as a peft.LoraConfig)
    "llama-lora": ("llama", LoRAConfig(r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "qwen2-dora-all-linear": ("qwen2", LoRAConfig(r=4, targets="all-linear", dora=True),
                              dict(r=4, lora_alpha=16, target_modules="all-linear", use_dora=True)),
    "mistral-rslora": ("mistral", LoRAConfig(r=8, alpha=4, targets="self_attn", rslora=True, init="gaussian"),
                       dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            use_rslora=True)),
    "gpt2-conv1d-all-linear": ("gpt2", LoRAConfig(r=4, targets="all-linear"),
                               dict(r=4, lora_alpha=16, target_modules="all-linear")),
    "gpt2-conv1d-dora": ("gpt2", LoRAConfig(r=2, alpha=3, targets="c_attn,mlp.c_proj", dora=True),
                         dict(r=2, lora_alpha=3, target_modules=["c_attn", "mlp.c_proj"], use_dora=True)),
    "phi3-layer1": ("phi3", LoRAConfig(r=4, targets="layers.1.self_attn.qkv_proj"),
                    dict(r=4, lora_alpha=16, target_modules=["model.layers.1.self_attn.qkv_proj"])),
}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def base_dir(tmp_path, request):
    """The tiny base of the case saved with save_pretrained, as both libraries load it."""
    case = getattr(getattr(request.node, "callspec", None), "params", {}).get("case")
    arch = CASES[case][0] if case else "llama"
    d = tmp_path / f"base-{arch}"
    model = tiny_model(arch)
    with torch.no_grad():                      # nonzero biases: DoRA must leave the bias out of its scaling
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(str(d))
    return d


def base(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def randomize(named: dict, seed: int = 1) -> None:
    """Nonzero B (and DoRA magnitudes off their init), whatever the naming (slimlm's or peft's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in named.items():
            if "lora_B" in k:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "magnitude" in k:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def train_a_few_steps(model, steps: int = 3) -> None:
    params = lora_parameters(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    x = random_windows(2, 16, seed=3)
    model.train()
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())      # only the adapter moved


@pytest.mark.parametrize("case", list(CASES))
def test_slimlm_adapter_loads_in_peft(case, base_dir, tmp_path):
    arch, config, _ = CASES[case]
    x = random_windows(2, 16)
    model = base(base_dir)
    add_lora(model, config)
    randomize(lora_parameters(model))
    train_a_few_steps(model)
    ours = logits(model, x)
    assert not torch.allclose(ours, logits(base(base_dir), x), atol=1e-3)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_peft(model, folder, base_model_ref=str(base_dir))
    cfg = read_adapter_config(folder)
    assert cfg["fan_in_fan_out"] is (arch == "gpt2") and cfg["base_model_name_or_path"] == str(base_dir)
    theirs = peft.PeftModel.from_pretrained(base(base_dir), str(folder)).eval()
    assert torch.allclose(logits(theirs, x), ours, rtol=1e-5, atol=1e-6)
    # the keys and tensors PEFT itself writes for this adapter are the ones save_peft wrote
    resaved = tmp_path / "resaved"
    theirs.save_pretrained(str(resaved))
    mine, peft_own = load_file(str(folder / WEIGHTS_FILE)), load_file(str(resaved / WEIGHTS_FILE))
    assert set(mine) == set(peft_own)
    assert all(torch.equal(mine[k], peft_own[k]) for k in mine)
    n = len(lora_layers(model))
    assert sum(k.endswith(".lora_A.weight") for k in mine) == n
    assert sum(k.endswith(".lora_magnitude_vector") for k in mine) == (n if config.dora else 0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_slimlm(case, base_dir, tmp_path):
    arch, _, peft_kwargs = CASES[case]
    x = random_windows(2, 16)
    theirs = peft.get_peft_model(base(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **peft_kwargs)).eval()
    randomize(dict(theirs.named_parameters()))
    want = logits(theirs, x)
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = base(base_dir)
    names = load_peft(model, tmp_path / "peft")
    assert set(names) == set(lora_layers(model))
    assert torch.allclose(logits(model, x), want, rtol=1e-5, atol=1e-6)


def test_rank_and_alpha_patterns(base_dir, tmp_path):
    """Per-layer rank and alpha (PEFT's rank_pattern / alpha_pattern) both ways."""
    x = random_windows(2, 16)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                          rank_pattern={"v_proj": 2, "layers.1.self_attn.o_proj": 8}, alpha_pattern={"q_proj": 32})
    theirs = peft.get_peft_model(base(base_dir), cfg).eval()
    randomize(dict(theirs.named_parameters()))
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = base(base_dir)
    load_peft(model, tmp_path / "peft")
    assert torch.allclose(logits(model, x), logits(theirs, x), rtol=1e-5, atol=1e-6)
    ranks = {n: w.adapters["default"].r for n, w in lora_layers(model).items()}
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.1.self_attn.o_proj"] == 8
    (tmp_path / "back").mkdir()
    save_peft(model, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(base(base_dir), str(tmp_path / "back")).eval()
    assert torch.allclose(logits(again, x), logits(theirs, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_trains_as_peft(base_dir, dora):
    """Training mode with dropout > 0 (PEFT's DoRA then uses x_d W^T for the base part): the same dropout
    masks (same seed) must give the same outputs and the same gradients."""
    x = random_windows(2, 16)
    theirs = peft.get_peft_model(base(base_dir), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.3, use_dora=dora, target_modules=["q_proj", "v_proj"]))
    ours = base(base_dir)
    add_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.3, dora=dora))
    randomize(dict(theirs.named_parameters()))
    randomize(lora_parameters(ours))
    mine = lora_parameters(ours)
    with torch.no_grad():                                             # the same A, B, m in both
        for k, p in theirs.named_parameters():
            if p.requires_grad:
                layer = k.removeprefix("base_model.model.").split(".lora_")[0]
                part = "lora_magnitude" if "magnitude" in k else ("lora_A" if "lora_A" in k else "lora_B")
                p.copy_(mine[f"{layer}.{part}"])
    outs = []
    for m in (theirs, ours):
        m.train()
        torch.manual_seed(7)
        y = m(x).logits
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs.append(y.detach())
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outs[1], logits(ours.eval(), x), atol=1e-3)     # dropout did act
    grad = {k.removeprefix("base_model.model.").replace(".default", "").replace(".weight", ""): p.grad
            for k, p in theirs.named_parameters() if p.requires_grad}
    for k, p in mine.items():
        peft_key = k.replace("lora_magnitude", "lora_magnitude_vector")
        assert torch.allclose(p.grad, grad[peft_key], rtol=1e-4, atol=1e-6), k


# ---------------------------------------------------------------------------------- refusals
def _saved(tmp_path, arch="llama"):
    model = tiny_model(arch)
    add_lora(model, LoRAConfig(r=4, dora=True))
    randomize(lora_parameters(model))
    folder = tmp_path / f"adapter-{arch}"
    folder.mkdir()
    save_peft(model, folder)
    return model, folder


def test_unknown_config_keys_are_ignored(tmp_path):
    model, folder = _saved(tmp_path)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["a_setting_from_peft_0_99"] = {"nested": [1, 2]}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    other = tiny_model("llama")
    load_peft(other, folder)
    x = random_windows(2, 16)
    assert torch.equal(logits(other, x), logits(model, x))


def _edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def _refused(model, folder, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_peft(model, folder)
    assert "\n" not in str(e.value)
    assert not lora_layers(model)                                    # nothing changed


def test_other_base_refused(tmp_path):
    _, folder = _saved(tmp_path)
    _refused(tiny_model("gpt2"), folder, r"made for another base: it adapts model.layers.0.self_attn.q_proj, and "
                                         r"this model has no such module \(its linear layers look like transformer")
    small = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    _refused(small, folder, r"made for another base: model.layers.0.self_attn.q_proj is 32 x 32 \(out x in\) here, "
                            r"which needs A \(r, 32\), B \(32, r\), but the adapter has A \(4, 64\), B \(64, 4\), "
                            r"magnitude \(64,\)")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 128)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(64, 4)
    tensors["base_model.model.model.embed_tokens.lora_magnitude_vector"] = torch.zeros(64)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    _refused(tiny_model("llama"), folder, "model.embed_tokens, and this model has it as Embedding, not a linear layer")


@pytest.mark.parametrize("edit, match", [
    (dict(peft_type="IA3"), "holds a IA3 adapter; slimlm loads LORA adapters"),
    (dict(bias="lora_only"), "trains biases"),
    (dict(modules_to_save=["lm_head"]), "uses PEFT's modules_to_save=\\['lm_head'\\]"),
    (dict(use_dora=False), "inconsistent at model.layers.0.self_attn.q_proj"),
    (dict(r=8), "A has rank 4, adapter_config.json says 8"),
    (dict(lora_alpha="x"), "lacks a numeric lora_alpha"),
])
def test_unsupported_config_refused(tmp_path, edit, match):
    _, folder = _saved(tmp_path)
    _edit_config(folder, **edit)
    _refused(tiny_model("llama"), folder, match)


def test_files_refused(tmp_path):
    _, folder = _saved(tmp_path)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    extra = dict(tensors)
    extra["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(64)
    save_file(extra, str(folder / WEIGHTS_FILE))
    _refused(tiny_model("llama"), folder, "q_proj.lora_B.bias, which is not a LoRA A, B or DoRA magnitude tensor")
    (folder / WEIGHTS_FILE).unlink()
    _refused(tiny_model("llama"), folder, f"has no {WEIGHTS_FILE}")
    torch.save(tensors, folder / "adapter_model.bin")
    _refused(tiny_model("llama"), folder, "adapter_model.bin, a pickle, which slimlm never loads: convert it")
    (folder / CONFIG_FILE).unlink()
    _refused(tiny_model("llama"), folder, f"has no {CONFIG_FILE}: it is not a PEFT adapter folder")
    _refused(tiny_model("llama"), tmp_path / "nowhere", "is not a folder")


def test_load_refuses_a_taken_name(tmp_path):
    model, folder = _saved(tmp_path)
    with pytest.raises(ConfigError, match="the model already has an adapter named 'default'"):
        load_peft(model, folder)
    assert load_peft(model, folder, "second") and len(lora_parameters(model, "second")) == 3 * 4


def test_save_refuses_a_used_folder(tmp_path):
    model, folder = _saved(tmp_path)
    with pytest.raises(ConfigError, match="is not empty"):
        save_peft(model, folder)
    with pytest.raises(ConfigError, match="is not a folder: create an empty folder"):
        save_peft(model, tmp_path / "missing")
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        (tmp_path / "empty").mkdir()
        save_peft(model, tmp_path / "empty", "other")
