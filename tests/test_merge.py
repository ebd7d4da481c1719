"""Merging a LoRA adapter into float and quantized bases (slimlm merge, slimlm.merge), and evaluating a base
with an adapter (slimlm eval --adapter)."""
from __future__ import annotations

import json

import pytest
import torch

import slimlm
from slimlm.adapt.lora import LoRAConfig, add_lora, lora_parameters
from slimlm.adapt.peft_io import save_peft
from slimlm.cli import main
from slimlm.core.quant import quantize_grouped
from slimlm.quant.linear import QuantLinear
from slimlm.quant.nf4_linear import NF4Linear

from conftest import TEXT, random_windows, tiny_model, tiny_tokenizer

IDS = random_windows(2, 16, seed=3)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapter_on(base_dir, tmp_path, targets="all-linear", dora=False, seed=1):
    """A trained-looking adapter (B random, not zero) for the model in base_dir, saved as a PEFT folder."""
    model = slimlm.load_model(str(base_dir))
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=targets, dora=dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path / "adapter"
    out.mkdir()
    save_peft(model, out, base_model_ref=str(base_dir))
    return out, logits(model)


@pytest.fixture
def quant_dir(tmp_path):
    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.RTNConfig(bits=4, group_size=32))
    return slimlm.export(model, tiny_tokenizer(), tmp_path / "q4")


def test_float_merge_equals_the_adapted_model_and_loads_in_transformers(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, adapted = adapter_on(model_dir, tmp_path, dora=True)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m"),
                 "--windows", "0"]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(logits(theirs), adapted, atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["merged_exactly"] == 14 and report["requantized"] == 0


def test_merge_into_a_packed_base_rounds_onto_its_stored_grid(quant_dir, tmp_path, text_file):
    adapter, _ = adapter_on(quant_dir, tmp_path)
    base = slimlm.load_model(str(quant_dir))
    model = slimlm.load_model(str(quant_dir))
    report = slimlm.merge(model, adapter, eval_data=random_windows(4, 32, seed=5), progress=False)
    assert report["requantized"] == 14 and report["merge_kl_divergence"] > 0
    name = "model.layers.1.mlp.down_proj"
    old, new = base.get_submodule(name), model.get_submodule(name)
    assert isinstance(new, QuantLinear)
    assert torch.equal(new.scale, old.scale) and torch.equal(new.zero, old.zero) and torch.equal(new.g_idx, old.g_idx)
    # the codes are W' rounded on that grid, W' being the dequantized base plus the adapter's update
    from slimlm.adapt.peft_io import load_peft
    ref = slimlm.load_model(str(quant_dir))
    load_peft(ref, adapter)
    w = ref.get_submodule(name)
    a = w.adapters["default"]
    W_merged = old.dequantize_weight() + a.scale * (a.lora_B.float() @ a.lora_A.float())
    assert torch.equal(new.codes(), quantize_grouped(W_merged, old.scale, old.zero.float(), 4, old.g_idx))


def test_gptq_requantization_loses_less_than_rtn(quant_dir, tmp_path):
    adapter, _ = adapter_on(quant_dir, tmp_path, seed=2)
    evalw, calib = random_windows(4, 32, seed=5), random_windows(16, 32, seed=6)
    rtn = slimlm.merge(slimlm.load_model(str(quant_dir)), adapter, eval_data=evalw, progress=False)
    gptq = slimlm.merge(slimlm.load_model(str(quant_dir)), adapter, requantize="gptq", calibration=calib,
                        eval_data=evalw, progress=False)
    assert gptq["merge_kl_divergence"] < rtn["merge_kl_divergence"]


def test_merge_into_float_copies_and_nf4_bases(tmp_path):
    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.NF4Config())
    nf4_dir = slimlm.export(model, None, tmp_path / "nf4")
    adapter, adapted = adapter_on(nf4_dir, tmp_path)
    merged = slimlm.load_model(str(nf4_dir))
    slimlm.merge(merged, adapter)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, NF4Linear)
    copy = slimlm.load_model(str(nf4_dir))
    slimlm.merge(copy, adapter, into="float")
    assert type(copy.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(copy), adapted, atol=1e-4, rtol=1e-4)


def test_a_merge_above_the_error_threshold_is_refused_and_writes_nothing(quant_dir, tmp_path, text_file, capsys):
    adapter, _ = adapter_on(quant_dir, tmp_path)
    argv = ["merge", "--model", str(quant_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m"),
            "--eval-data", str(text_file), "--seqlen", "32", "--windows", "2", "--max-kl", "1e-9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "merging adds a KL divergence" in err and "--force" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    assert main(argv + ["--force"]) == 0
    assert (tmp_path / "m" / "merge_report.json").is_file()


def test_eval_with_an_adapter_scores_the_adapted_model(model_dir, tmp_path, text_file, capsys):
    adapter, _ = adapter_on(model_dir, tmp_path)
    base = ["eval", "--model", str(model_dir), "--data", str(text_file), "--windows", "2", "--seqlen", "32",
            "--no-speed", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--adapter", str(adapter)]) == 0
    adapted = json.loads(capsys.readouterr().out)
    model = slimlm.load_model(str(model_dir))
    from slimlm.adapt.peft_io import load_peft
    load_peft(model, adapter)
    tok = slimlm.load_tokenizer(str(model_dir))
    expect = slimlm.evaluate(model.eval(), tok, str(text_file), windows=2, seqlen=32, progress=False)
    assert adapted["perplexity"] == pytest.approx(expect["perplexity"], rel=1e-6)
    assert adapted["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-4)


def test_merging_into_a_base_without_the_targeted_layers_is_refused(tmp_path, model_dir, capsys):
    adapter, _ = adapter_on(model_dir, tmp_path)
    other = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(str(other))
    tiny_tokenizer().save_pretrained(str(other))
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["merge", "--model", str(other), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimlm: error:") and err.count("\n") == 1 and not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["int8", "awq"])
def test_merge_into_int8_and_awq_bases(kind, tmp_path):
    """The adapter merged into LLM.int8() and AWQ 4-bit layers: the layers keep their kind, the merged model
    moves toward the adapted one, and the float merge equals the adapter on the dequantized base."""
    model = tiny_model("llama")
    if kind == "int8":
        slimlm.quantize(model, slimlm.Int8Config())
    else:
        slimlm.quantize(model, slimlm.AWQConfig(bits=4, group_size=32), data=random_windows(8, 32, seed=4))
    base_dir = slimlm.export(model, tiny_tokenizer(), tmp_path / kind)
    adapter, adapted = adapter_on(base_dir, tmp_path)
    base = slimlm.load_model(str(base_dir))
    merged = slimlm.load_model(str(base_dir))
    report = slimlm.merge(merged, adapter, eval_data=random_windows(4, 32, seed=5), progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert type(merged.get_submodule(name)) is type(base.get_submodule(name))
    assert report["adapted_layers"] == 14 and report["merge_kl_divergence"] >= 0
    assert (logits(merged) - adapted).abs().max() < (logits(base) - adapted).abs().max()
    copy = slimlm.load_model(str(base_dir))
    slimlm.merge(copy, adapter, into="float")
    # the float merge is the adapter on the dequantized base (the adapted model itself differs by the runtime's
    # own rounding: int8 activations, bf16 kernel inputs)
    from slimlm.adapt.peft_io import load_peft
    from slimlm.modules import set_submodule
    ref = slimlm.load_model(str(base_dir))
    for n, m in list(ref.named_modules()):
        if hasattr(m, "dequantize_weight") and not isinstance(m, torch.nn.Linear):
            W = m.dequantize_weight(torch.float32)
            if hasattr(m, "input_scale"):                  # AWQ's unfolded scales: y = (x / s) W^T
                W = W / m.input_scale
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=getattr(m, "bias", None) is not None)
            with torch.no_grad():
                lin.weight.copy_(W)
                if lin.bias is not None:
                    lin.bias.copy_(m.bias.float())
            set_submodule(ref, n, lin)
    load_peft(ref, adapter)
    torch.testing.assert_close(logits(copy), logits(ref), atol=1e-4, rtol=1e-4)
