"""The format registry: which format a model is written in by default, models mixing kinds of compressed
layers, refusals, recognition of older folders, and the CLI's export command."""
from __future__ import annotations

import json

import pytest
import torch

import slimlm
from slimlm import registry
from slimlm.cli import main
from slimlm.core.quant import rtn_result
from slimlm.errors import ConfigError
from slimlm.modules import set_submodule
from slimlm.quant.int8_linear import Int8Linear
from slimlm.quant.linear import QuantLinear
from slimlm.quant.nf4_linear import NF4Linear

from conftest import random_windows, tiny_model, tiny_tokenizer

IDS = random_windows(2, 12)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def mixed_model():
    """A tiny Llama whose block 0 holds NF4, LLM.int8() and packed 3-bit layers, and whose block 1 is pruned
    to 50% (plain float layers with zeros)."""
    model = tiny_model("llama")
    b0 = "model.layers.0"
    q = model.get_submodule(f"{b0}.self_attn.q_proj")
    set_submodule(model, f"{b0}.self_attn.q_proj", NF4Linear.from_weight(q.weight.detach(), None))
    k = model.get_submodule(f"{b0}.self_attn.k_proj")
    set_submodule(model, f"{b0}.self_attn.k_proj", Int8Linear.from_weight(k.weight.detach(), None, 6.0))
    up = model.get_submodule(f"{b0}.mlp.up_proj")
    set_submodule(model, f"{b0}.mlp.up_proj",
                  QuantLinear.from_result(rtn_result(up.weight.detach().float(), 3, 32, False), method="rtn"))
    with torch.no_grad():
        for m in model.model.layers[1].modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.masked_fill_(m.weight.abs() < m.weight.abs().median(), 0)
    return model


def test_a_model_mixing_every_kind_of_layer_saves_and_loads_exactly(tmp_path):
    model = mixed_model()
    assert registry.default_format(model).name == "slimlm"
    assert slimlm.save_model(model, tiny_tokenizer(), tmp_path / "m") == "slimlm"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    kinds = {n: s["kind"] for n, s in cfg["quantization_config"]["modules"].items()}
    assert kinds == {"model.layers.0.self_attn.q_proj": "nf4", "model.layers.0.self_attn.k_proj": "int8",
                     "model.layers.0.mlp.up_proj": "quant"}
    assert cfg["slimlm_sparsity"]["bitmask"] >= 7               # block 1's seven linear layers
    back = slimlm.load_model(str(tmp_path / "m"))
    for name, cls in [("model.layers.0.self_attn.q_proj", NF4Linear), ("model.layers.0.self_attn.k_proj", Int8Linear),
                      ("model.layers.0.mlp.up_proj", QuantLinear)]:
        assert type(back.get_submodule(name)) is cls
    assert torch.equal(back.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(logits(back), logits(model))


def test_default_format_follows_what_the_model_holds():
    plain = tiny_model("llama")
    assert registry.default_format(plain).name == "hf"
    nf4 = tiny_model("llama")
    lin = nf4.model.layers[0].mlp.down_proj
    set_submodule(nf4, "model.layers.0.mlp.down_proj", NF4Linear.from_weight(lin.weight.detach(), None))
    assert registry.default_format(nf4).name == "bitsandbytes"
    assert registry.default_format(mixed_model()).name == "slimlm"


def test_a_format_that_cannot_hold_the_model_refuses_in_one_line(tmp_path):
    model = mixed_model()
    for fmt, match in [("hf", "packed quantized layer"), ("bitsandbytes", "one kind per model"),
                       ("gptq", "not quantized"), ("compressed-tensors", "NF4/FP4 or LLM.int8")]:
        with pytest.raises(ConfigError, match=match) as e:
            slimlm.export(model, None, tmp_path / fmt, fmt)
        assert "\n" not in str(e.value)
        assert not (tmp_path / fmt).exists() and not list(tmp_path.iterdir())   # nothing half-written
    with pytest.raises(slimlm.SlimlmError, match="unknown format 'gguff'; choose one of: .*slimlm"):
        slimlm.export(model, None, tmp_path / "x", "gguff")


def test_a_version_1_folder_still_loads(tmp_path):
    """Folders written before module kinds existed (format_version 1: every module a packed QuantLinear)."""
    model = tiny_model("llama")
    up = model.model.layers[0].mlp.up_proj
    set_submodule(model, "model.layers.0.mlp.up_proj",
                  QuantLinear.from_result(rtn_result(up.weight.detach().float(), 4, 32, False), method="rtn"))
    slimlm.export(model, None, tmp_path / "v1", "slimlm")
    path = tmp_path / "v1" / "config.json"
    cfg = json.loads(path.read_text())
    q = cfg["quantization_config"]
    q["format_version"] = 1
    for spec in q["modules"].values():
        del spec["kind"]
    path.write_text(json.dumps(cfg))
    back = slimlm.load_model(str(tmp_path / "v1"))
    assert isinstance(back.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(logits(back), logits(model))


def test_export_command_lists_the_registry_and_refuses_unknown_formats(capsys, tmp_path, model_dir):
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    for name in registry.savable_formats():
        assert name in out
    assert main(["export", "--model", str(model_dir), "--format", "nope", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "choose one of" in err and "gptq" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["export", "--model", str(model_dir), "--format", "gptq", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot write this model as gptq" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert main(["export", "--model", str(model_dir), "--format", "slimlm", "--output", str(tmp_path / "o")]) == 0
    back, ref = slimlm.load_model(str(tmp_path / "o")), slimlm.load_model(str(model_dir))
    assert torch.equal(logits(back), logits(ref))


def test_a_model_with_an_adapter_saves_the_adapter_and_loads_back_from_it(tmp_path, model_dir):
    """The peft format: the default for a model holding LoRA layers (the base formats refuse it); its folder
    is a model reference: the base it names, with the adapter on it."""
    from slimlm.adapt.lora import LoRAConfig, add_lora, lora_parameters

    model = slimlm.load_model(str(model_dir))
    add_lora(model, LoRAConfig(r=2, targets="q_proj,v_proj"))
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert registry.default_format(model).name == "peft"
    for fmt in ("hf", "slimlm", "gptq", "compressed-tensors"):
        with pytest.raises(ConfigError, match="carries a LoRA adapter"):
            slimlm.export(model, None, tmp_path / fmt, fmt)
    out = slimlm.export(model, None, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    back = slimlm.load_model(str(out))
    assert torch.equal(logits(back), logits(model))
    assert slimlm.load_tokenizer(str(out)).vocab_size == slimlm.load_tokenizer(str(model_dir)).vocab_size
