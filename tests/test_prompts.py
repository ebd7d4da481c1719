"""Prompt tuning, P-tuning, prefix tuning, P-tuning v2 and bottleneck adapters on the training loop.

Proven with the real peft library on every architecture of the test table: a slimlm prompt or prefix saved as
a PEFT folder loads with peft.PeftModel.from_pretrained and gives the same logits, and PEFT's own folders load
into slimlm with PEFT's logits. The cache code (slimlm.adapt.prefix_cache) is checked where transformers
changes break it: generate() with its key/value cache must equal a plain greedy loop, and prompt tuning through
the cache must equal the plain reference (the soft prompt concatenated to the input embeddings)."""
from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import slimlm
from slimlm import api
from slimlm.adapt import bottleneck as BN
from slimlm.adapt import prompts as PR
from slimlm.adapt.loading import load_adapter
from slimlm.cli import main
from slimlm.errors import ConfigError, SlimlmError
from slimlm.training import data as TD
from slimlm.training.config import TrainConfig

from conftest import TEXT, random_windows, tiny_model

KINDS = ("prompt", "ptuning", "prefix", "ptuning-v2")
N = 3


def ours_config(kind: str, lstm: bool = False):
    return {"prompt": PR.PromptConfig(num_virtual_tokens=N),
            "ptuning": PR.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=32, encoder="lstm" if lstm else "mlp"),
            "prefix": PR.PrefixConfig(num_virtual_tokens=N, encoder_hidden_size=32),
            "ptuning-v2": PR.PTuningV2Config(num_virtual_tokens=N)}[kind]


def peft_config(kind: str):
    return {"prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
            "ptuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=32),
            "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                              encoder_hidden_size=32),
            "ptuning-v2": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)}[kind]


def perturb(params, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def installed(arch: str, kind: str, lstm: bool = False):
    model = tiny_model(arch)
    prompt = PR.build(model, kind, ours_config(kind, lstm))
    perturb(prompt.parameters())
    PR.install(model, prompt, kind)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_slimlm_prompt_loads_in_peft_with_the_same_logits(arch, kind, tmp_path):
    x = random_windows(2, 10, seed=5)
    model = installed(arch, kind, lstm=(arch == "llama"))
    PR.save_prompt(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == PR.PEFT_TYPES[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    b = logits(theirs, x)
    assert b.shape[1] in (10, 10 + N)          # PEFT returns the virtual positions too for the prompt methods
    torch.testing.assert_close(logits(model, x), b[:, -10:], atol=2e-5, rtol=1e-5)
    assert (logits(model, x) - logits(tiny_model(arch), x)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_peft_prompt_folder_loads_into_slimlm_with_peft_logits(arch, kind, tmp_path):
    x = random_windows(2, 10, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model(arch), peft_config(kind))
        perturb(theirs.parameters())
        theirs.eval()
        theirs.save_pretrained(str(tmp_path))
    model = tiny_model(arch)
    assert load_adapter(model, tmp_path) == "prompt"
    torch.testing.assert_close(logits(model, x), logits(theirs, x)[:, -10:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ("prompt", "prefix"))
def test_generate_with_the_cache_equals_a_plain_greedy_loop(arch, kind):
    """generate() fills and extends the key/value cache itself: the prefix must enter once, the attention mask
    and positions must count it at every step."""
    model = installed(arch, kind)
    x = random_windows(2, 7, seed=7)
    with torch.no_grad():
        got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        seq = x
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_prompt_tuning_through_the_cache_equals_concatenated_embeddings(arch):
    model = installed(arch, "prompt")
    rt = PR.prompt_runtime(model)
    x = random_windows(2, 9, seed=8)
    ours = logits(model, x)
    rt.hook.enabled = False
    with torch.no_grad():
        embeds = torch.cat([rt.prompt.embedding[None].expand(2, -1, -1), model.get_input_embeddings()(x)], dim=1)
        ref = model(inputs_embeds=embeds).logits[:, N:]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_prompt_gradients_flow_to_the_prompt_only():
    model = installed("llama", "ptuning")
    for p in model.parameters():                 # the base frozen as the training methods freeze it
        p.requires_grad_(False)
    x = random_windows(2, 8, seed=9)
    model(input_ids=x, labels=x).loss.backward()
    prompt = PR.prompt_runtime(model).prompt
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("style", ("houlsby", "pfeiffer"))
def test_bottleneck_adapters_start_at_the_base_and_train(arch, style):
    model, base = tiny_model(arch), tiny_model(arch)
    x = random_windows(2, 10, seed=10)
    rt = BN.add_bottleneck(model, BN.BottleneckConfig(style=style, bottleneck_size=8))
    from slimlm.calibration.common import find_blocks
    layers = len(find_blocks(model)[1])
    assert len(rt.handles) == layers * (2 if style == "houlsby" else 1)
    assert torch.equal(logits(model, x), logits(base, x))          # W_up = 0: exactly the base at step 0
    model(input_ids=x, labels=x).loss.backward()
    ups = [a.up.weight.grad for a in rt.named().values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)


def test_bottleneck_on_a_packed_quantized_base(tmp_path):
    model = tiny_model("llama")
    slimlm.quantize(model, slimlm.RTNConfig(bits=4, group_size=32))
    rt = BN.add_bottleneck(model, BN.BottleneckConfig(bottleneck_size=4))
    perturb(rt.adapters.parameters())
    for p in rt.adapters.parameters():
        p.requires_grad_(True)
    x = random_windows(2, 10, seed=11)
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in rt.adapters.parameters())


def windows_data(steps: int, batch: int, seqlen: int = 32):
    return TD.text_windows(random_windows(200, 64, 0).reshape(-1), seqlen=seqlen, batch_size=batch, batches=steps,
                           seed=0)


@pytest.mark.parametrize("method,config", [
    ("prompt", PR.PromptConfig(num_virtual_tokens=4)),
    ("ptuning", PR.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16)),
    ("prefix", PR.PrefixConfig(num_virtual_tokens=4, encoder_hidden_size=16)),
    ("ptuning-v2", PR.PTuningV2Config(num_virtual_tokens=4)),
    ("adapter", BN.BottleneckConfig(style="pfeiffer", reduction_factor=8)),
])
def test_each_method_trains_saves_and_reloads_with_identical_logits(method, config, tmp_path):
    model = tiny_model("qwen2")
    x = random_windows(2, 12, seed=12)
    before = logits(model, x)
    cfg = TrainConfig(steps=4, seqlen=32, batch_size=2, lr=5e-2)
    report = api.train(model, config, windows_data(4, 2), cfg, output=tmp_path / "out", progress=False)
    assert report["trainable_parameters"] > 0 and report["method"] == method
    trained = logits(model, x)
    assert (trained - before).abs().max() > 1e-4
    fresh = tiny_model("qwen2")
    load_adapter(fresh, tmp_path / "out")
    torch.testing.assert_close(logits(fresh, x), trained, atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in fresh.parameters())


def test_prompt_from_the_command_line_evaluates_with_adapter(model_dir, tmp_path, capsys):
    (model_dir / "text.txt").write_text(TEXT * 5)
    out = tmp_path / "p"
    assert main(["train", "--model", str(model_dir), "--method", "prompt", "--num-virtual-tokens", "4",
                 "--prompt-init", "text", "--prompt-init-text", "the", "--data", str(model_dir / "text.txt"),
                 "--seqlen", "32", "--batch-size", "2", "--steps", "3", "--lr", "1e-2", "--output", str(out)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"} <= {f.name for f in out.iterdir()}
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(model_dir / "text.txt"),
                 "--windows", "2", "--seqlen", "32", "--json"]) == 0
    with_prompt = json.loads(capsys.readouterr().out)["perplexity"]
    assert main(["eval", "--model", str(model_dir), "--data", str(model_dir / "text.txt"), "--windows", "2",
                 "--seqlen", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] != with_prompt
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out)).eval()
    ours = slimlm.load_model(str(out))                        # an adapter folder loads as base + prompt
    x = random_windows(2, 10, seed=13)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x)[:, -10:], atol=2e-5, rtol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    (model_dir / "text.txt").write_text(TEXT * 5)
    outs = tmp_path / "outs"
    outs.mkdir()
    base = ["train", "--model", str(model_dir), "--data", str(model_dir / "text.txt"), "--output", str(outs / "o"),
            "--seqlen", "32", "--steps", "2"]
    limit = AutoModelForCausalLM.from_pretrained(str(model_dir)).config.max_position_embeddings
    for extra, match in [(["--method", "prompt", "--num-virtual-tokens", "0"], "--num-virtual-tokens must be at least 1"),
                         (["--method", "prefix", "--num-virtual-tokens", str(limit)], "exceeds the model's context"),
                         (["--method", "adapter", "--bottleneck-size", "-1"], "bottleneck size must be at least 1"),
                         (["--method", "adapter", "--reduction-factor", "1000"], "leaves no bottleneck"),
                         (["--method", "ptuning", "--encoder", "gru"], "--encoder takes mlp or lstm")]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not list(outs.iterdir()), extra


def test_foreign_folders_are_refused_in_one_line(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(task_type="CAUSAL_LM"))
        ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ConfigError, match="holds a IA3 adapter"):
        load_adapter(tiny_model("llama"), tmp_path / "ia3")
    wide = installed("llama", "prompt")                       # hidden 64
    (tmp_path / "p").mkdir()
    PR.save_prompt(wide, tmp_path / "p")
    narrow = AutoModelForCausalLM.from_config(
        tiny_model("llama").config.__class__(**{**tiny_model("llama").config.to_dict(), "hidden_size": 32,
                                                "head_dim": 8}))
    with pytest.raises(ConfigError, match="made for another model's width"):
        load_adapter(narrow, tmp_path / "p")
    shutil.rmtree(tmp_path / "p")
    bn = tiny_model("llama")
    BN.add_bottleneck(bn, BN.BottleneckConfig(bottleneck_size=4))
    (tmp_path / "b").mkdir()
    BN.save_bottleneck(bn, tmp_path / "b")
    with pytest.raises(ConfigError, match="made for another base"):
        load_adapter(tiny_model("gpt2"), tmp_path / "b")
    with pytest.raises(SlimlmError, match="only LoRA adapters merge"):
        api.merge(tiny_model("llama"), tmp_path / "b")


def test_chunked_head_divergence_equals_the_plain_kl_and_its_gradient():
    from slimlm.core.losses import chunked_head_divergence, forward_kl

    g = torch.Generator().manual_seed(20)
    hs = torch.randn(37, 8, generator=g, requires_grad=True)
    ws = torch.randn(50, 8, generator=g, requires_grad=True)
    ht, wt = torch.randn(37, 12, generator=g), torch.randn(50, 12, generator=g)
    keep = torch.rand(37, generator=g) > 0.3
    got = chunked_head_divergence(hs, ws, ht, wt, keep, chunk_size=10)
    gh, gw = torch.autograd.grad(got, (hs, ws))
    ps, pt = torch.log_softmax(hs @ ws.T, -1), torch.log_softmax(ht @ wt.T, -1)
    ref = (pt.exp() * (pt - ps)).sum(-1)[keep].sum()          # plain reference: full logits
    rh, rw = torch.autograd.grad(ref, (hs, ws))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(forward_kl(hs @ ws.T, hs @ ws.T), torch.zeros(37), atol=1e-6, rtol=0)


def test_compress_then_prompt_learns_to_agree_with_the_uncompressed_model(model_dir, tmp_path):
    student = slimlm.load_model(str(model_dir))
    slimlm.quantize(student, slimlm.RTNConfig(bits=2, group_size=32))
    cfg = TrainConfig(steps=12, seqlen=32, batch_size=2, lr=5e-2)
    config = PR.PromptConfig(num_virtual_tokens=4, prompt_teacher=str(model_dir))
    report = api.train(student, config, windows_data(12, 2), cfg, output=tmp_path / "p", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first                                        # the KL to the teacher falls
    assert report["trainable_parameters"] == 4 * 64


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_the_training_path_equals_the_cache_path_with_its_gradient(arch):
    """Prompt kinds train with the prompt concatenated to the embeddings (one causal pass); evaluation and
    generate() use the cache: same loss, same gradient."""
    from slimlm.training.plan import lm_loss

    model = installed(arch, "ptuning")
    for p in model.parameters():
        p.requires_grad_(False)
    rt = PR.prompt_runtime(model)
    x = random_windows(2, 12, seed=21)
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    batch = {"input_ids": x, "labels": labels}
    params = list(rt.prompt.parameters())
    a, n = rt.lm_loss(chunk=7)(model, batch)
    ga = torch.autograd.grad(a, params)
    b, m = lm_loss(model, batch, 7)
    gb = torch.autograd.grad(b, params)
    assert int(n) == int(m)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
