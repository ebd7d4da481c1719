"""Sparse storage: bit packing, bit-exact encodings and the choice between them, the native sparse files
(size and exact reload) and the compressed-tensors sparse-bitmask export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from slimlm import export, load_model, registry
from slimlm.pruning import storage as st

from conftest import random_windows, tiny_model


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def sparse(shape, frac=0.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g).to(dtype)
    return W.masked_fill(torch.rand(shape, generator=g) < frac, 0)


def nm_sparse(shape, n, m, dtype=torch.float32, seed=0, drop_extra=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g).to(dtype)
    groups = W.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.rand(groups.shape, generator=g).argsort(1)[:, :n], True)
    if drop_extra:  # some groups hold fewer than n nonzeros
        keep[::3, :] = False
    return groups.masked_fill(~keep, 0).reshape(shape)


def magnitude_prune_(model, n_m=None):
    """50% (per row) or N:M magnitude pruning of the linear layers of the decoder blocks, zeros as +0.0."""
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
                W = lin.weight
                if n_m is None:
                    idx = W.abs().argsort(1)[:, : W.shape[1] // 2]
                    drop = torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)
                else:
                    n, m = n_m
                    g = W.abs().reshape(-1, m)
                    drop = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.argsort(1)[:, : m - n], True)
                    drop = drop.reshape(W.shape)
                W.masked_fill_(drop, 0)
    return model


# -------------------------------------------------------------------------------------------------- bits
def test_pack_bits_is_numpy_packbits_little():
    mask = torch.rand(7, 21, generator=torch.Generator().manual_seed(1)) < 0.4
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert torch.equal(st.pack_bits(mask), torch.from_numpy(ref))
    assert torch.equal(st.unpack_bits(st.pack_bits(mask), 21), mask)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = st.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-37 * bits // 8)
    assert torch.equal(st.unpack_codes(packed, bits, 37), codes)


# --------------------------------------------------------------------------------------------- encodings
CASES = {
    "unstructured fp32": lambda: sparse((16, 40)),
    "unstructured bf16": lambda: sparse((16, 40), dtype=torch.bfloat16),
    "unstructured fp16 odd cols": lambda: sparse((5, 13), 0.7, dtype=torch.float16),
    "1-d": lambda: sparse((33,)),
    "2:4 fp32": lambda: nm_sparse((8, 64), 2, 4),
    "2:4 bf16 short groups": lambda: nm_sparse((8, 64), 2, 4, torch.bfloat16, drop_extra=True),
    "4:8 fp16": lambda: nm_sparse((4, 64), 4, 8, torch.float16),
    "1:4": lambda: nm_sparse((4, 32), 1, 4),
    "all zero": lambda: torch.zeros(4, 16),
    "dense": lambda: torch.randn(4, 16),
}


# Cases with no N:M pattern for M in (4, 8) once the NaN and -inf below are set: a row length that no M
# divides, or a group of M holding M nonzeros. (The 50% unstructured fp32/bf16 tensors have at most 7 nonzeros
# in every group of 8, so they are 7:8 patterns and must be accepted.)
NO_NM_PATTERN = {"1-d", "dense", "unstructured fp16 odd cols"}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("encoding", ["auto", "bitmask", "nm", "dense"])
def test_round_trip_is_bit_exact(case, encoding):
    W = CASES[case]()
    W.view(-1)[1] = float("nan")
    W.view(-1)[3] = float("-inf")
    if encoding == "nm" and case in NO_NM_PATTERN:
        with pytest.raises(ValueError, match="no N:M pattern"):
            st.compress_sparse(W, encoding)
        return
    enc = st.compress_sparse(W, encoding)
    back = st.decompress_sparse(enc)
    assert back.dtype == W.dtype and back.shape == W.shape
    assert torch.equal(bits_of(back), bits_of(W))


def test_negative_zero_comes_back_as_zero():
    W = torch.tensor([[1.0, -0.0, 0.0, 2.0]] * 8)
    back = st.decompress_sparse(st.compress_sparse(W, "bitmask"))
    assert torch.equal(back, W) and not torch.signbit(back[0, 1])


def dense_b(W: torch.Tensor) -> int:
    return W.numel() * W.element_size()


def test_auto_picks_the_smallest():
    W = torch.randn(64, 128)
    assert list(st.compress_sparse(W)) == ["dense"]
    W = sparse((64, 128), 0.5)
    enc = st.compress_sparse(W)
    assert "bitmask" in enc and st.nbytes(enc) < 0.55 * dense_b(W)
    for n, m in [(2, 4), (4, 8)]:
        W = nm_sparse((64, 128), n, m, torch.bfloat16)
        enc = st.compress_sparse(W)
        assert enc["nm"].tolist() == [n, m]
        assert st.nbytes(enc) < st.nbytes(st.compress_sparse(W, "bitmask")) < 0.6 * dense_b(W)


def test_nm_refuses_a_denser_tensor():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        st.encode_nm(torch.randn(4, 8), 2, 4)


# ------------------------------------------------------------------------------------------------- files
def dense_bytes(model, tmp_path) -> int:
    model.save_pretrained(tmp_path / "dense")
    return (tmp_path / "dense" / "model.safetensors").stat().st_size


def small_embedding_model(dtype):
    """Tiny Llama whose embeddings (tied, 128 x 64) are a small part of it: 4 layers of 37k weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["50%", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_sparse_is_small_and_reloads_exactly(pattern, dtype, tmp_path):
    model = magnitude_prune_(small_embedding_model(dtype), pattern)
    assert registry.default_format(model).name == "slimlm"     # a pruned model is not written dense by default
    export(model, None, tmp_path / "sparse")
    ratio = (tmp_path / "sparse" / "model.safetensors").stat().st_size / dense_bytes(model, tmp_path)
    assert ratio <= 0.65, ratio
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    back = load_model(str(tmp_path / "sparse"))
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(bits_of(a), bits_of(b)), k
    x = random_windows(2, 10)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)


def test_sparse_nonuniform_structured_model_reloads(tmp_path):
    from slimlm.pruning.structured import StructuredConfig, prune_structured

    model = tiny_model("qwen2")
    prune_structured(model, StructuredConfig(ratio=0.3, importance="magnitude", uniform=False))
    magnitude_prune_(model)
    export(model, None, tmp_path / "out")
    (tmp_path / "out" / "stale").write_text("")  # a second save replaces the whole folder
    export(model, None, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale").exists()
    back = load_model(str(tmp_path / "out"))
    x = random_windows(2, 10)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)


# ------------------------------------------------------------------------------------ compressed-tensors
def test_compressed_tensors_layout(tmp_path):
    from compressed_tensors.utils import unpack_bitmasks  # the reference unpacking of the format

    model = magnitude_prune_(tiny_model("llama"), (2, 4))
    tmp_path = export(model, None, tmp_path / "ct", "compressed-tensors")
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["sparsity_config"]["format"] == "sparse-bitmask"
    assert qcfg["sparsity_config"]["sparsity_structure"] == "2:4"
    assert qcfg["sparsity_config"]["ignore"] == ["lm_head"]
    state = model.state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.1.mlp.down_proj"
        assert f"{name}.weight" not in keys and "model.embed_tokens.weight" in keys
        shape = f.get_tensor(f"{name}.shape").tolist()
        mask = unpack_bitmasks(f.get_tensor(f"{name}.bitmask"), shape)
        W = torch.zeros(shape)
        W[mask] = f.get_tensor(f"{name}.compressed")
        assert torch.equal(W, state[f"{name}.weight"])
        counts = mask.sum(1)
        assert torch.equal(f.get_tensor(f"{name}.row_offsets"), torch.cumsum(counts, 0) - counts)
    back = load_model(str(tmp_path))                          # slimlm reads the layout back
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
