"""The real embedded default model (SmolLM2-135M). Slow: conversion on first use, a 135M forward pass."""
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm.cli import main

pytestmark = pytest.mark.slow

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
PERSUASION = CORPORA / "austen_persuasion.txt"


@pytest.fixture(scope="module")
def default():
    return slimlm.load_model("smollm2-135m"), slimlm.load_tokenizer("smollm2-135m")


def test_default_model_is_the_documented_architecture(default):
    model, _ = default
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not PERSUASION.is_file(), reason="needs ../shared/corpora")
def test_quick_protocol_perplexity_reproduces_37_03(capsys):
    code = main(["eval", "--data", str(PERSUASION), "--windows", "32", "--seqlen", "512", "--no-speed", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    import json
    r = json.loads(out)
    assert r["tokens"] == 16352
    assert abs(r["perplexity"] - 37.03) <= 0.05


def test_window_longer_than_context_is_refused(default, capsys):
    code = main(["eval", "--seqlen", "9000", "--windows", "1"])
    assert code == 2 and "context" in capsys.readouterr().err
