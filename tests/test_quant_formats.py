"""slimlm's own folder, GPTQ and compressed-tensors formats of models holding QuantLinear layers, through the
format registry (slimlm.export writes, slimlm.load_model recognises and reads)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimlm import export
from slimlm.core.quant import QuantResult, choose_qparams, default_g_idx, quantize_grouped, rtn_quantize
from slimlm.errors import ConfigError, SlimlmError
from slimlm.formats.packed import quantized_modules
from slimlm.models import load_model
from slimlm.modules import set_submodule
from slimlm.quant.linear import QuantLinear

from conftest import VOCAB, tiny_model, tiny_tokenizer

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _result(W, bits, gs, sym, act_order, seed):
    K = W.shape[1]
    if not act_order:
        q, s, z = rtn_quantize(W, bits, sym, gs)
        return QuantResult(q, s, z, default_g_idx(K, gs), bits, gs, sym)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[torch.randperm(K, generator=torch.Generator().manual_seed(seed))] = (torch.arange(K) // gs).int()
    G = K // gs
    s, z = torch.ones(W.shape[0], G), torch.zeros(W.shape[0], G)
    for j in range(G):
        sj, zj = choose_qparams(W[:, g_idx == j], bits, sym)
        s[:, j], z[:, j] = sj[:, 0], zj[:, 0]
    return QuantResult(quantize_grouped(W, s, z, bits, g_idx), s, z, g_idx, bits, gs, sym)


def quantize_linears(model, bits=4, gs=32, sym=False, lm_head=False, act_order=False, bits_of=None):
    """RTN (or act-order-grouped RTN) on every nn.Linear; `bits_of(name)` may override the width."""
    for i, (name, lin) in enumerate([(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]):
        if "lm_head" in name and not lm_head:
            continue
        b = bits_of(name) if bits_of else bits
        r = _result(lin.weight.detach(), b, gs, sym, act_order, seed=i)
        set_submodule(model, name, QuantLinear.from_result(r, lin.bias, method="rtn"))
    return model


def dequantized_copy(model, scale_dtype=None):
    """The float model slimlm's quantized model stands for (scales optionally rounded to scale_dtype)."""
    m = copy.deepcopy(model)
    for name, q in quantized_modules(m).items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        s = q.scale if scale_dtype is None else q.scale.to(scale_dtype).float()
        lin.weight.data = (q.codes().float() - q.zero.float()[:, q.g_idx.long()]) * s[:, q.g_idx.long()]
        if q.bias is not None:
            lin.bias.data = q.bias.data.clone()
        set_submodule(m, name, lin)
    return m.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def llama(tie: bool):
    m = tiny_model("llama")
    if tie:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


# ---------------------------------------------------------------------------------- native format
@pytest.mark.parametrize("tie,lm_head", [(True, False), (True, True), (False, True)])
def test_native_round_trip_logits_equal(tmp_path, tie, lm_head):
    model = quantize_linears(llama(tie), bits=4, gs=32, lm_head=lm_head)
    out = export(model, tiny_tokenizer(), tmp_path / "q", "slimlm")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "slimlm" and qc["format"] == "slimlm-packed"
    spec = qc["modules"]["model.layers.0.mlp.down_proj"]
    assert spec == {"kind": "quant", "bits": 4, "group_size": 32, "symmetric": False, "act_order": False, "method": "rtn",
                    "in_features": 128, "out_features": 64, "bias": False}
    assert ("lm_head" in qc["modules"]) == lm_head
    assert not any(k.endswith("proj.weight") for k in load_file(str(out / "model.safetensors")))
    loaded = load_model(str(out))
    assert isinstance(loaded.lm_head, QuantLinear) == lm_head
    if tie and not lm_head:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_native_mixed_bits_act_order_and_overwrite(tmp_path):
    model = quantize_linears(tiny_model("qwen2"), gs=32, act_order=True,
                             bits_of=lambda n: 8 if "down" in n else 3)
    export(model, None, tmp_path / "q", "slimlm")
    loaded = load_model(str(tmp_path / "q"))
    assert loaded.model.layers[0].mlp.down_proj.bits == 8
    assert loaded.model.layers[0].self_attn.q_proj.act_order
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(SlimlmError, match="already exists"):
        export(model, None, tmp_path / "q", "slimlm")
    export(model, None, tmp_path / "q", "slimlm", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary folders left


def test_native_round_trip_keeps_input_scales(tmp_path):
    from slimlm.quant.scaled import ScaledQuantLinear

    model = quantize_linears(tiny_model("llama"))
    q = model.model.layers[0].mlp.down_proj
    r = QuantResult(q.codes(), q.scale, q.zero.float(), q.g_idx, q.bits, q.group_size, q.symmetric)
    scaled = ScaledQuantLinear.from_result(r)
    scaled.set_input_scale(torch.rand(q.in_features) + 0.5)
    set_submodule(model, "model.layers.0.mlp.down_proj", scaled)
    export(model, None, tmp_path / "q", "slimlm")
    loaded = load_model(str(tmp_path / "q"))
    assert isinstance(loaded.model.layers[0].mlp.down_proj, ScaledQuantLinear)
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(ConfigError, match="input"):
        export(model, None, tmp_path / "g", "gptq")


def test_each_format_is_recognised_on_load(tmp_path):
    """load_model dispatches on what the folder is, not on what was asked: every written format comes back
    through its own reader with the same logits."""
    from slimlm import registry

    model = quantize_linears(tiny_model("llama"))
    for fmt in ("slimlm", "gptq", "gptq_v2", "compressed-tensors"):
        export(model, None, tmp_path / fmt, fmt)
        cfg = json.loads((tmp_path / fmt / "config.json").read_text())
        assert registry.recognise(tmp_path / fmt, cfg).name == ("gptq" if fmt == "gptq_v2" else fmt)
        back = load_model(str(tmp_path / fmt))
        assert set(quantized_modules(back)) == set(quantized_modules(model))
        scales = torch.float16 if "gptq" in fmt else None        # GPTQ stores fp16 scales
        assert torch.equal(logits(dequantized_copy(back)), logits(dequantized_copy(model, scales)))


# ---------------------------------------------------------------------------------- GPTQ
def _unpack_documented(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Independent reading of GPTQ's layout: along dim 0 the int32 words of one column form a little-endian
    bit stream and code i sits at bits [bits*i, bits*i + bits) of it (3-bit codes straddle words)."""
    cols = []
    for col in words.T.tolist():
        stream = sum((w & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(col))
        cols.append([(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(n)])
    return torch.tensor(cols).T                                           # (n, columns)


@pytest.mark.parametrize("bits,sym,fmt,act_order", [(4, False, "gptq", False), (3, True, "gptq", True),
                                                    (2, False, "gptq_v2", False), (8, False, "gptq", True)])
def test_gptq_layout_against_documented_unpacking(tmp_path, bits, sym, fmt, act_order):
    model = quantize_linears(tiny_model("llama"), bits=bits, gs=32, sym=sym, act_order=act_order)
    export(model, None, tmp_path / "g", fmt)
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == 32
    assert qc["sym"] == sym and qc["desc_act"] == act_order and qc["checkpoint_format"] == fmt
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == qc
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"                                  # in 128 -> out 64
    layer = model.get_submodule(name)
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    assert qweight.shape == (128 * bits // 32, 64) and qweight.dtype == torch.int32
    assert qzeros.shape == (4, 64 * bits // 32) and scales.shape == (4, 64) and scales.dtype == torch.float16
    q = _unpack_documented(qweight, bits, 128)                            # (in, out)
    z = _unpack_documented(qzeros.T, bits, 64).T + (1 if fmt == "gptq" else 0)   # (G, out)
    g = g_idx.long()
    w = (q - z[g]).float() * scales.float()[g]                             # (in, out)
    assert torch.equal(g_idx, layer.g_idx)
    assert torch.equal(w.T, dequantized_copy(model, torch.float16).get_submodule(name).weight.data)


def test_gptq_v1_cannot_hold_zero_point_zero(tmp_path):
    model = quantize_linears(tiny_model("llama"))
    q = model.model.layers[0].mlp.up_proj
    q.load_portable({**q.portable_tensors(), "qzeros": torch.zeros_like(q.portable_tensors()["qzeros"])})
    with pytest.raises(ConfigError, match="gptq_v2"):
        export(model, None, tmp_path / "v1", "gptq")
    export(model, None, tmp_path / "v2", "gptq_v2")
    assert torch.equal(load_model(str(tmp_path / "v2")).model.layers[0].mlp.up_proj.zero, q.zero)


def test_gptq_import_round_trip(tmp_path):
    model = quantize_linears(tiny_model("llama"), bits=4, gs=32, act_order=True)
    export(model, tiny_tokenizer(), tmp_path / "a", "gptq")
    imported = load_model(str(tmp_path / "a"))
    qa, qb = quantized_modules(model), quantized_modules(imported)
    assert qa.keys() == qb.keys()
    for name in qa:
        assert (qb[name].act_order, qb[name].layout, qb[name].method) == (True, "int4", "gptq")
        assert torch.equal(qb[name].codes(), qa[name].codes()) and torch.equal(qb[name].zero, qa[name].zero)
        assert torch.equal(qb[name].scale, qa[name].scale.half().float())
    export(imported, None, tmp_path / "b", "gptq")
    ta, tb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(logits(dequantized_copy(imported)), logits(dequantized_copy(model, torch.float16)))


def test_gptq_refuses_mixed_schemes_and_plain_linears(tmp_path):
    mixed = quantize_linears(tiny_model("llama"), bits_of=lambda n: 8 if "down" in n else 4)
    with pytest.raises(ConfigError, match="one \\(bits, group_size, symmetric\\)"):
        export(mixed, None, tmp_path / "m", "gptq")
    partial = tiny_model("llama")
    quantize_linears(partial.model.layers[0])
    with pytest.raises(ConfigError, match="not quantized"):
        export(partial, None, tmp_path / "p", "gptq")


# ---------------------------------------------------------------------------------- compressed-tensors
# compressed-tensors is a dev dependency (pyproject.toml): the tests below import it where they use it, so a
# missing install fails them instead of silently skipping this whole file.


@pytest.mark.parametrize("bits,sym,gs", [(4, False, 32), (4, True, 32), (3, False, 32), (8, True, -1)])
def test_compressed_tensors_matches_its_own_compressor(tmp_path, bits, sym, gs):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model = quantize_linears(tiny_model("llama"), bits=bits, gs=gs, sym=sym)
    export(model, None, tmp_path / "c", "compressed-tensors")
    t = load_file(str(tmp_path / "c" / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj"
    q = model.get_submodule(name)
    args = QuantizationArgs(num_bits=bits, symmetric=sym, strategy="group" if gs > 0 else "channel",
                            group_size=gs if gs > 0 else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": q.dequantize_weight(), "weight_scale": q.scale.clone()}
    if not sym:
        state["weight_zero_point"] = (q.zero.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    want = PackedQuantizationCompressor.compress(state, scheme)
    for k in ("weight_packed", "weight_shape", "weight_zero_point", "weight_scale"):
        assert (k in want) == (f"{name}.{k}" in t), k
        if k in want:
            assert torch.equal(t[f"{name}.{k}"], want[k].to(t[f"{name}.{k}"].dtype)), k


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("bits,sym,mixed", [(4, True, True), (3, False, False)])
def test_compressed_tensors_loads_in_transformers(tmp_path, bits, sym, mixed):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = quantize_linears(tiny_model("llama"), bits=bits, gs=32, sym=sym,
                             bits_of=(lambda n: 8 if "down" in n else bits) if mixed else None)
    export(model, tiny_tokenizer(), tmp_path / "c", "compressed-tensors")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == (2 if mixed else 1)
    # transformers 5.24 + compressed-tensors 0.20 build asymmetric layers with unpacked zero-point shapes in
    # their compressed (default) path and refuse the packed ones their own compressor writes; the
    # decompress-at-load path reads them.
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"), **kw).eval()
    torch.testing.assert_close(logits(hf), logits(dequantized_copy(model)), atol=1e-5, rtol=0)
    imported = load_model(str(tmp_path / "c"))
    for name, q in quantized_modules(model).items():
        r = imported.get_submodule(name)
        assert (r.bits, r.group_size, r.symmetric) == (q.bits, q.group_size, q.symmetric)
        assert torch.equal(r.dequantize_weight(), q.dequantize_weight())
    assert torch.equal(logits(imported), logits(model))


def test_compressed_tensors_refuses_act_order(tmp_path):
    model = quantize_linears(tiny_model("llama"), act_order=True)
    with pytest.raises(ConfigError, match="act-order"):
        export(model, None, tmp_path / "c", "compressed-tensors")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_embeddings_halve_their_bytes_and_survive_save_and_load(tmp_path, tie):
    import slimlm
    from slimlm.quant.configs import RTNConfig

    same = llama(tie)
    slimlm.quantize(same, RTNConfig(bits=4, group_size=32))
    ref = logits(same)                                               # same quantization, fp32 embeddings
    model = llama(tie)
    rep = slimlm.quantize(model, RTNConfig(bits=4, group_size=32, embed_dtype="bfloat16"))
    emb = model.model.embed_tokens.weight
    assert emb.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert (model.lm_head.weight is emb) == tie
    assert rep["embed_bytes_saved"] == emb.numel() * 2 * (1 if tie else 2)
    assert model.model.norm.weight.dtype == torch.float32          # the rest still computes in fp32
    out = logits(model)
    assert out.dtype == torch.float32
    assert 0 < (out - ref).abs().max() < 0.02 * ref.abs().max()    # only the bf16 rounding differs
    export(model, None, tmp_path / "q", "slimlm")
    loaded = slimlm.load_model(str(tmp_path / "q"))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), out)


def test_embed_dtype_is_checked():
    from slimlm.quant.configs import RTNConfig

    with pytest.raises(ConfigError, match="embed_dtype"):
        RTNConfig(embed_dtype="float16")
