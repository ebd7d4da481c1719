"""Exported GGUF files run in llama.cpp itself (llama-cpp-python): its logits and greedy tokens against
slimlm's for the same model and token ids, and `slimlm eval --engine llama.cpp` against the torch engine.
Skipped, with the install command, where llama-cpp-python is not installed (building it takes minutes)."""
from __future__ import annotations

import json

import pytest
import torch
from test_gguf import fp16_reference, tiny_bpe

import slimlm
from slimlm import llamacpp
from slimlm.cli import main
from slimlm.quant.configs import RTNConfig

from conftest import TEXT, tiny_model

try:
    import llama_cpp  # noqa: F401
except ImportError:
    pytest.skip(f"llama.cpp is not installed: `make llamacpp`, or {llamacpp.INSTALL}", allow_module_level=True)


def _ids(tok, n: int = 32) -> torch.Tensor:
    return torch.tensor(tok(TEXT[:400])["input_ids"][:n])


def _llamacpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llm = llamacpp.open_model(path, ids.numel(), threads=2, logits_all=True)
    try:
        return llamacpp.window_logits(llm, ids)
    finally:
        llm.close()


def _torch_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_float_export_matches_transformers(tmp_path, arch):
    """f32 weights: llama.cpp computes what transformers computes (names, rope permutation, norms, heads)."""
    tok = tiny_bpe()
    model = tiny_model(arch)
    out = tmp_path / "f32.gguf"
    slimlm.export(model, tok, out, "gguf", float_type="f32")
    ids = _ids(tok)                                           # within tiny Mistral's sliding window (32)
    ref, got = _torch_logits(model, ids), _llamacpp_logits(out, ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
    llm = llamacpp.open_model(out, 64, threads=2, logits_all=False)
    try:
        tokens, _, _ = llamacpp.greedy(llm, ids[:8], 8)
    finally:
        llm.close()
    expected = model.generate(ids[None, :8], max_new_tokens=8, do_sample=False)[0, 8:].tolist()
    assert tokens == expected


@pytest.mark.parametrize("bits,symmetric,group_size,qtype", [(4, False, 32, "Q4_1"), (4, True, 32, "Q4_0"),
                                                             (8, True, 32, "Q8_0"), (3, False, 64, "Q4_1")])
def test_quantized_export_matches_slimlm(tmp_path, bits, symmetric, group_size, qtype):
    """Packed layers: llama.cpp's logits are slimlm's model with fp16 block scales, up to llama.cpp's 8-bit
    rounding of activations in its quantized dot products."""
    from slimlm.formats.gguf_vocab import read_kv

    tok = tiny_bpe()
    model = tiny_model("llama")
    slimlm.quantize(model, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    out = tmp_path / "q.gguf"
    slimlm.export(model, tok, out, "gguf", float_type="f32")
    ftype = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype]
    assert read_kv(out, "general.file_type")["general.file_type"][1] == ftype
    ids = _ids(tok)
    ref, got = _torch_logits(fp16_reference(model, float_rounding=False), ids), _llamacpp_logits(out, ids)
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9


@pytest.mark.parametrize("bits,tolerance", [(None, 1e-3), (4, 1e-2)])
def test_eval_engine_matches_torch_engine(tmp_path, capsys, bits, tolerance):
    """`slimlm eval --engine llama.cpp` against slimlm's own evaluation of the same GGUF (read by transformers):
    the same windows and token ids. An f32 file agrees to 1e-3 (a window shifted by one token is ~1.5% off
    even on this random model); a Q4_1 file within 1% (llama.cpp rounds activations to 8 bits)."""
    tok = tiny_bpe()
    model = tiny_model("llama")
    if bits:
        slimlm.quantize(model, RTNConfig(bits=bits, group_size=32, symmetric=False))
    out = tmp_path / "m.gguf"
    slimlm.export(model, tok, out, "gguf", float_type="f32")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    common = ["eval", "--model", str(out), "--data", str(text), "--windows", "4", "--seqlen", "64", "--json"]
    capsys.readouterr()
    assert main([*common, "--engine", "llama.cpp", "--threads", "2"]) == 0
    cpp = json.loads(capsys.readouterr().out)
    assert main([*common, "--no-speed"]) == 0
    torch_ = json.loads(capsys.readouterr().out)
    assert cpp["tokens"] == torch_["tokens"] == 4 * 63
    assert abs(cpp["perplexity"] / torch_["perplexity"] - 1) < tolerance
    assert cpp["decode_tokens_per_s"] > 0 and cpp["prefill_tokens_per_s"] > 0
