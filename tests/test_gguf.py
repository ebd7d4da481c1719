"""GGUF export without llama.cpp: packed blocks against the gguf package's own dequantization, the rope row
permutation against both rotary conventions, whole files read back by transformers' GGUF reader, refusals.
(tests/test_gguf_llamacpp.py runs the files in llama.cpp itself.)"""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

import slimlm
from slimlm.cli import main
from slimlm.core import gguf_blocks as B
from slimlm.core.quant import QuantResult, rtn_result
from slimlm.modules import set_submodule
from slimlm.quant.configs import RTNConfig
from slimlm.quant.linear import QuantLinear
from slimlm.quant.scaled import ScaledQuantLinear

from conftest import TEXT, random_windows, tiny_model


def tiny_bpe():
    """A byte-level BPE tokenizer of at most 128 tokens trained on TEXT (llama.cpp needs merges and byte-level
    tokens, which conftest's character-level WordLevel tokenizer lacks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=128, special_tokens=["<|endoftext|>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def expected_blocks(m: QuantLinear) -> np.ndarray:
    """What a GGUF reader must get back from m's blocks: (q - z) * s with d = s and m = -s z rounded to fp16,
    computed in float32 in the order ggml (and gguf.quants) dequantize: q * d + m, (q - 8) * d, qs * d."""
    g = m.g_idx.long()
    q = m.codes().numpy().astype(np.float32)
    s = m.scale[:, g].numpy().astype(np.float16).astype(np.float32)
    z = m.zero[:, g].numpy().astype(np.float32)
    if m.bits <= 4 and not m.symmetric:
        mm = (-m.scale[:, g] * m.zero[:, g].float()).numpy().astype(np.float16).astype(np.float32)
        return q * s + mm
    return (q - z) * s


SCHEMES = [(4, False, 32), (4, False, 64), (4, False, 128), (4, False, -1), (3, False, 64), (2, False, 32),
           (4, True, 32), (4, True, 128), (3, True, 32), (2, True, 64), (8, True, 32), (8, True, -1)]


@pytest.mark.parametrize("bits,symmetric,group_size", SCHEMES)
def test_blocks_dequantize_to_w_hat(bits, symmetric, group_size):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    W = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)
    m = QuantLinear.from_result(rtn_result(W, bits, group_size, symmetric))
    qtype, data = B.pack_codes(m.codes(), m.scale, m.zero, bits, group_size, symmetric)
    assert qtype == {(True, 8): "Q8_0"}.get((symmetric, bits), "Q4_0" if symmetric else "Q4_1")
    assert data.shape == (64, 256 // 32 * B.BLOCK_BYTES[qtype]) and data.dtype == np.uint8
    got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(got, expected_blocks(m))
    w_hat = m.dequantize_weight().numpy()
    assert np.abs(got - w_hat).max() <= 2e-3 * np.abs(w_hat).max()       # only the fp16 rounding of d, m


def test_float_types():
    w = torch.randn(8, 64, dtype=torch.float32)
    for kind, back in (("f32", w), ("f16", w.half().float()), ("bf16", w.bfloat16().float())):
        qtype, data = B.pack_float(w, kind)
        got = gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType[qtype]).reshape(8, 64)
        np.testing.assert_array_equal(got, back.numpy())
    qtype, data = B.pack_float(w, "q8_0")
    got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    assert qtype == "Q8_0" and np.abs(got - w.numpy()).max() < w.abs().max().item() / 127


def _rope_hf(x: torch.Tensor, pos: int) -> torch.Tensor:
    """transformers' rotary embedding of one head (d,): dimension i turns with i + d/2 (rotate_half)."""
    d = x.shape[-1]
    theta = pos / 10000 ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    cos, sin = torch.cat([theta.cos(), theta.cos()]), torch.cat([theta.sin(), theta.sin()])
    return x * cos + torch.cat([-x[d // 2:], x[: d // 2]]) * sin


def _rope_ggml(x: torch.Tensor, pos: int) -> torch.Tensor:
    """llama.cpp's normal rope of one head (d,): the adjacent pair (2i, 2i + 1) turns by the angle of i."""
    d = x.shape[-1]
    theta = pos / 10000 ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()
    return out


def test_rope_permutation_preserves_attention_scores():
    n_heads, hd, hidden = 3, 16, 24
    g = torch.Generator().manual_seed(0)
    Wq, Wk = torch.randn(n_heads * hd, hidden, generator=g, dtype=torch.float64), \
        torch.randn(n_heads * hd, hidden, generator=g, dtype=torch.float64)
    x1, x2 = torch.randn(hidden, generator=g, dtype=torch.float64), torch.randn(hidden, generator=g, dtype=torch.float64)
    Pq, Pk = B.permute_rope_rows(Wq, n_heads), B.permute_rope_rows(Wk, n_heads)
    for h in range(n_heads):
        rows = slice(h * hd, (h + 1) * hd)
        hf = _rope_hf(Wq[rows] @ x1, 5) @ _rope_hf(Wk[rows] @ x2, 2)
        gg = _rope_ggml(Pq[rows] @ x1, 5) @ _rope_ggml(Pk[rows] @ x2, 2)
        torch.testing.assert_close(gg, hf)


# ------------------------------------------------------------------------- whole files, transformers' reader
def fp16_reference(model, float_rounding: bool = True):
    """A float copy of a quantized model with what GGUF stores: each packed weight with d and m rounded to
    fp16 (expected_blocks), 2-D float weights rounded to fp16 (the default float_type; float_rounding=False:
    kept, for float_type=f32)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2 and float_rounding:
                p.copy_(p.half().float())
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            W = torch.from_numpy(expected_blocks(m))
            if getattr(m, "input_scale", None) is not None:
                W = W / m.input_scale
            lin.weight.data = W
            if m.bias is not None:
                lin.bias.data = m.bias.detach().clone()
            set_submodule(ref, name, lin)
    return ref.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_export_reads_back_in_transformers(tmp_path, arch):
    """transformers' GGUF reader undoes the rope permutation and names by its own tables: the model it reads
    must be the fp16-rounded model, bit for bit."""
    tok = tiny_bpe()
    model = tiny_model(arch)
    slimlm.quantize(model, RTNConfig(bits=4, group_size=32, symmetric=False))
    out = tmp_path / "m.gguf"
    slimlm.export(model, tok, out, "gguf")
    back = slimlm.load_model(str(out))
    ids = torch.tensor(tok(TEXT[:300])["input_ids"][:32])          # tiny Mistral's sliding window: 32
    torch.testing.assert_close(_logits(back, ids), _logits(fp16_reference(model), ids), rtol=0, atol=1e-5)
    assert slimlm.load_tokenizer(str(out))(TEXT[:300])["input_ids"][:32] == ids.tolist()


def _with_input_scales(model, seed: int = 0):
    """Give every o_proj an explicit AWQ input scale (as AWQ leaves it when key/value heads are shared)."""
    g = torch.Generator().manual_seed(seed)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and name.endswith("o_proj"):
            res = QuantResult(m.codes(), m.scale, m.zero.float(), m.g_idx, m.bits, m.group_size, m.symmetric)
            s = ScaledQuantLinear.from_result(res)
            s.set_input_scale(0.5 + torch.rand(m.in_features, generator=g))
            set_submodule(model, name, s)
    return model


def test_awq_input_scales_fold_into_repeated_kv_heads(tmp_path):
    tok = tiny_bpe()
    model = tiny_model("llama")
    slimlm.quantize(model, RTNConfig(bits=4, group_size=32, symmetric=True))
    _with_input_scales(model)
    out = tmp_path / "m.gguf"
    slimlm.export(model, tok, out, "gguf")
    from slimlm.formats.gguf_vocab import read_kv
    assert read_kv(out, "llama.attention.head_count")["llama.attention.head_count_kv"][1] == 4
    back = slimlm.load_model(str(out))
    ids = torch.tensor(tok(TEXT[:300])["input_ids"][:48])
    ref = _logits(model, ids)
    assert (_logits(back, ids) - ref).abs().max() < 0.02 * ref.abs().max()


# ----------------------------------------------------------------------------------------------- refusals
def _quantized_folder(tmp_path, model_dir, *args):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--output", str(out), *args]) == 0
    return out


def _export(src, out, *options):
    return main(["export", "--model", str(src), "--format", "gguf", "--output", str(out),
                 *[a for o in options for a in ("--option", o)]])


def test_refusals_one_line_exit_2_nothing_written(tmp_path, capsys):
    d = tmp_path / "opt"
    tiny_model("opt").save_pretrained(str(d))
    tiny_bpe().save_pretrained(str(d))
    capsys.readouterr()
    assert _export(d, tmp_path / "o.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "covers: llama, mistral, qwen2" in err
    assert _export(d, tmp_path / "missing" / "o.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_asymmetric_8bit_needs_accept_requantize(tmp_path, capsys, caplog):
    d = tmp_path / "llama"
    tiny_model("llama").save_pretrained(str(d))
    tiny_bpe().save_pretrained(str(d))
    q = _quantized_folder(tmp_path, d, "--bits", "8", "--group-size", "32", "--symmetric", "false")
    capsys.readouterr()
    out = tmp_path / "q8.gguf"
    assert _export(q, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "accept_requantize=true" in err and not out.exists()
    assert not list(tmp_path.glob(".*tmp*"))
    with caplog.at_level(logging.WARNING, logger="slimlm"):
        assert _export(q, out, "accept_requantize=true", "float_type=q8_0") == 0
    assert "re-quantized 14 layers" in caplog.text
    from slimlm.formats.gguf_vocab import read_kv
    assert read_kv(out, "general.file_type")["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _export(q, out, "no_such=1") == 2
    assert "options: float_type, accept_requantize, tokenizer_pre" in capsys.readouterr().err


def test_llamacpp_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    slimlm.export(tiny_model("llama"), tiny_bpe(), out, "gguf")
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)        # import llama_cpp -> ImportError
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--engine", "llama.cpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install llama-cpp-python" in err


def test_act_order_groups_refused_in_one_line(tmp_path):
    from slimlm.errors import ConfigError
    from slimlm.quant.configs import GPTQConfig

    model = tiny_model("llama")
    slimlm.quantize(model, GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False),
                    data=random_windows())
    assert any(m.act_order for m in model.modules() if isinstance(m, QuantLinear))
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="act-order") as e:
        slimlm.export(model, tiny_bpe(), out, "gguf")
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_default_model_exports_as_its_original_gguf(tmp_path):
    """The embedded default (converted from SmolLM2-135M-Instruct.Q4_1.gguf): the export carries the original
    file's tokenizer keys, has its tensor names and shapes, and its Q8_0 embedding bytes are the original's
    (the fp32 embedding came from those Q8_0 blocks)."""
    from slimlm import models
    from slimlm.formats.gguf_vocab import read_kv

    e = models.EMBEDDED["smollm2-135m"]
    original = models._package_dir(e) / e.file
    out = tmp_path / "smol.gguf"
    slimlm.export(slimlm.load_model("smollm2-135m"), slimlm.load_tokenizer("smollm2-135m"), out, "gguf",
                  float_type="q8_0")
    assert read_kv(out, "tokenizer.") == read_kv(original, "tokenizer.")
    ours = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(original)).tensors}
    assert {n: tuple(t.shape) for n, t in ours.items()} == {n: tuple(t.shape) for n, t in theirs.items()}
    assert np.array_equal(ours["token_embd.weight"].data, theirs["token_embd.weight"].data)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    """Interrupted while the tensors are written: neither the file nor its temporary file remains."""
    def interrupted(self, **_):
        self.fout[0].write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slimlm.export(tiny_model("llama"), tiny_bpe(), tmp_path / "m.gguf", "gguf")
    assert not list(tmp_path.iterdir())
