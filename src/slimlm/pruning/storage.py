"""Compact storage of sparse weights, bit-exact.

Encodings of one tensor W (rows = all leading dims, columns = the last dim), a dict of tensors each:
- dense:   {"dense": W}
- bitmask: {"shape": int64 (ndim,), "bitmask": uint8 (R, ceil(C/8)), "values": (nnz,) W.dtype}
           bit j of byte k in a row flags column 8k + j (numpy packbits with bitorder="little", the layout of
           compressed-tensors' sparse-bitmask); values are the flagged elements in row-major order.
- N:M:     {"shape", "nm": uint8 [N, M], "codes": uint8, "values": (R, C/M*N) W.dtype}
           every group of M consecutive columns keeps N positions; the group's code is the rank of its
           position set among the C(M, N) sets in lexicographic order (3 bits for 2:4, 7 for 4:8), the codes
           bit-packed little-endian into bytes. Fewer than N nonzeros in a group are padded with stored zeros.
Zeros are +0.0 and -0.0 (as in compressed-tensors, which keeps W != 0): every other value, NaN included,
comes back bit for bit and zeros come back as +0.0. Prune with torch.where / masked_fill rather than W * mask
(which leaves -0.0) when the zero's sign should survive. `compress_sparse` picks the smallest encoding.

Files: `save_sparse` writes one safetensors file (dense tensors under their own names, encoded ones as
`<name>.<field>`, the encoded names listed in the header metadata) and marks config.json with
`slimlm_sparsity`; `load_sparse` rebuilds the model. `save_sparse_compressed_tensors` writes the
compressed-tensors `sparse-bitmask` layout that transformers loads through compressed-tensors.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import SlimlmError
from ..io import atomic_dir

FIELDS = ("dense", "shape", "bitmask", "nm", "codes", "values")
NM_CHOICES = (4, 8)           # group sizes M tried for N:M encodings
CT_LAYOUT_VERSION = "0.14.0"  # compressed-tensors release whose sparse-bitmask layout is written
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------------ pure helpers
def nonzero_mask(W: Tensor) -> Tensor:
    """True where W is not +0.0 or -0.0 (NaN counts as a value), read from the bits so any float works."""
    if not W.is_floating_point():
        return W != 0
    bits = W.contiguous().view(_INT_OF_SIZE[W.element_size()])
    if W.element_size() == 1:
        return (bits & 0x7F) != 0
    sign = torch.tensor(1, dtype=bits.dtype) << (8 * W.element_size() - 1)
    return (bits & ~sign) != 0


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool (..., C) along the last dim into uint8 (..., ceil(C/8)), little-endian bit order."""
    C = mask.shape[-1]
    pad = (-C) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(*mask.shape[:-1], -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
    return (m * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of pack_bits: bool (..., cols)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :cols].bool()


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer codes (n,) of `bits` bits each as one little-endian bit stream in uint8."""
    shifts = torch.arange(bits, device=codes.device)
    return pack_bits(((codes.long()[:, None] >> shifts) & 1).reshape(-1).bool())


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_codes: int64 (n,)."""
    b = unpack_bits(packed, n * bits).reshape(n, bits).long()
    return (b << torch.arange(bits, device=packed.device)).sum(-1)


def _combos(n: int, m: int, device=None) -> tuple[Tensor, Tensor]:
    """(positions (C, n) of every n-subset of range(m) in lexicographic order, lut (2^m,) pattern -> rank)."""
    pos = torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long, device=device)
    lut = torch.full((1 << m,), -1, dtype=torch.long, device=device)
    lut[(1 << pos).sum(-1)] = torch.arange(pos.shape[0], device=device)
    return pos, lut


def _code_bits(n: int, m: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def _as_bits(W: Tensor) -> Tensor:
    """The same memory as integers: indexing them moves values bit for bit (floats may canonicalise NaNs)."""
    return W.contiguous().view(_INT_OF_SIZE[W.element_size()]) if W.is_floating_point() else W


def encode_bitmask(W: Tensor) -> dict[str, Tensor]:
    W2 = W.reshape(-1, W.shape[-1]) if W.dim() else W.reshape(1, 1)
    mask = nonzero_mask(W2)
    return {"shape": torch.tensor(list(W.shape), dtype=torch.long), "bitmask": pack_bits(mask),
            "values": _as_bits(W2)[mask].view(W.dtype)}


def nm_of(W: Tensor, m: int) -> int | None:
    """Smallest N such that W is N:M sparse along its last dim (None if C is not a multiple of M)."""
    if W.dim() == 0 or W.shape[-1] % m:
        return None
    return int(nonzero_mask(W).reshape(-1, m).sum(-1).max()) if W.numel() else 0


def encode_nm(W: Tensor, n: int, m: int) -> dict[str, Tensor]:
    """N:M encoding; W must hold at most n nonzeros in every group of m consecutive columns."""
    groups = W.reshape(-1, m)                                          # (R * C/m, m)
    mask = nonzero_mask(groups)
    if int(mask.sum(-1).max()) > n:
        raise ValueError(f"tensor is not {n}:{m} sparse")
    key = (~mask).long() * m + torch.arange(m, device=W.device)      # nonzeros first, then by position
    pos = torch.sort(torch.argsort(key, dim=-1)[:, :n], dim=-1).values  # (G, n)
    _, lut = _combos(n, m, W.device)
    codes = lut[(1 << pos).sum(-1)]
    values = torch.gather(_as_bits(groups), 1, pos).view(W.dtype).reshape(*W.shape[:-1], W.shape[-1] // m * n)
    return {"shape": torch.tensor(list(W.shape), dtype=torch.long), "nm": torch.tensor([n, m], dtype=torch.uint8),
            "codes": pack_codes(codes, _code_bits(n, m)), "values": values}


def nbytes(enc: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in enc.values())


def compress_sparse(W: Tensor, encoding: str = "auto") -> dict[str, Tensor]:
    """Encode W as dense, bitmask or N:M (see module docstring); "auto" picks the fewest bytes."""
    W = W.detach().contiguous()
    if encoding == "dense":
        return {"dense": W}
    if encoding == "bitmask":
        return encode_bitmask(W)
    if encoding == "nm":
        cands = [(n, m) for m in NM_CHOICES if (n := nm_of(W, m)) is not None and 0 < n < m]
        if not cands:
            raise ValueError(f"tensor of shape {tuple(W.shape)} has no N:M pattern with M in {NM_CHOICES}")
        return min((encode_nm(W, n, m) for n, m in cands), key=nbytes)
    if encoding != "auto":
        raise ValueError(f"encoding must be auto, dense, bitmask or nm, not {encoding!r}")
    best = {"dense": W}
    nnz, size = int(nonzero_mask(W).sum()), W.element_size()
    worth_bitmask = nnz * size + W.numel() / 8 < W.numel() * size  # else skip copying out nearly every value
    for enc in ("bitmask", "nm") if worth_bitmask else ("nm",):
        try:
            cand = compress_sparse(W, enc)
        except ValueError:
            continue
        if nbytes(cand) < nbytes(best):
            best = cand
    return best


def decompress_sparse(enc: dict[str, Tensor]) -> Tensor:
    """Rebuild the exact tensor from any encoding produced by compress_sparse."""
    if "dense" in enc:
        return enc["dense"]
    shape, values = [int(s) for s in enc["shape"]], enc["values"]
    if "bitmask" in enc:
        cols = shape[-1] if shape else 1
        mask = unpack_bits(enc["bitmask"], cols)
        out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
        _as_bits(out)[mask] = _as_bits(values)
        return out.reshape(shape)
    n, m = (int(x) for x in enc["nm"])
    G = math.prod(shape) // m
    pos, _ = _combos(n, m, values.device)
    where = pos[unpack_codes(enc["codes"], _code_bits(n, m), G)]     # (G, n)
    out = torch.zeros(G, m, dtype=values.dtype, device=values.device)
    _as_bits(out).scatter_(1, where, _as_bits(values).reshape(G, n))
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------------- files
def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without the second name of tied (shared) tensors."""
    out, seen = {}, set()
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out[k] = t.detach().cpu().contiguous()
    return out


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _write_config(model: nn.Module, tokenizer, folder: Path, **extra) -> None:
    cfg = copy.deepcopy(model.config)
    cfg.dtype = _param_dtype(model)
    for k, v in extra.items():
        setattr(cfg, k, v)
    cfg.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_sparse(model: nn.Module, tokenizer, folder: str | os.PathLike) -> dict:
    """Write `model` with every tensor in its smallest encoding; returns {"encoded": n, "bytes": size}."""
    from safetensors.torch import save_file

    tensors, encoded, kinds = {}, [], {}
    for name, t in _unique_state(model).items():
        enc = compress_sparse(t) if t.is_floating_point() and t.dim() == 2 else {"dense": t}
        if "dense" in enc:
            tensors[name] = t
            continue
        encoded.append(name)
        kinds["nm" if "nm" in enc else "bitmask"] = kinds.get("nm" if "nm" in enc else "bitmask", 0) + 1
        tensors.update({f"{name}.{f}": v.contiguous() for f, v in enc.items()})
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "slimlm_sparse": json.dumps(encoded)})
        _write_config(model, tokenizer, tmp, slimlm_sparsity={"format": "slimlm-sparse", "version": 1, **kinds})
        size = (tmp / "model.safetensors").stat().st_size
    return {"encoded": len(encoded), "bytes": size}


def config_dtype(config) -> torch.dtype:
    v = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, v) if isinstance(v, str) else v


def load_state(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load a full state dict strictly (assigning the tensors: the model may be on the meta device), allowing
    only tied weights to be absent."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:                              # a shape that does not fit the config
        raise SlimlmError(f"{where} does not match its config.json ({' '.join(str(e).split())[:300]})") from None
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if k not in params or id(params[k]) not in loaded]
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if missing or unexpected or left:
        raise SlimlmError(f"{where} does not match its config.json: missing {(missing or left)[:3]}, "
                          f"unexpected {list(unexpected)[:3]}")


def load_sparse(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by save_sparse or by save_pretrained (dense, or structurally pruned with or
    without per-layer sizes), in eval mode; every tensor comes back exactly as saved.

    The model is built with its parameters on the meta device (except a non-uniform structured model, whose
    layer sizes are found by a forward pass), each tensor is read and decompressed in turn (a compressed
    tensor's parts are freed before the next is read) and the result assigned, so loading holds about one
    copy of the weights, not a random-initialised model beside a decompressed state dict beside the file."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    from .structured import build_model

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"{folder} holds no .safetensors file; save the model with save_sparse or save_pretrained")
    config = AutoConfig.from_pretrained(folder)
    text = getattr(config, "text_config", None) or config
    # per-layer sizes are found by a forward pass of the full-size model, which cannot run on meta
    skeleton = contextlib.nullcontext() if getattr(text, "slimlm_structured", None) else \
        init_empty_weights(include_buffers=False)
    with skeleton:
        model = build_model(config, dtype)
    own = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    fallback = dtype or config_dtype(config)

    def want(name: str) -> torch.dtype:      # each tensor in the dtype the model built it with
        t = own.get(name)
        return t.dtype if t is not None and t.is_floating_point() else fallback

    state: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names = set(h.keys())
            for name in json.loads((h.metadata() or {}).get("slimlm_sparse", "[]")):
                fields = {fld: h.get_tensor(f"{name}.{fld}") for fld in FIELDS if f"{name}.{fld}" in names}
                names -= {f"{name}.{fld}" for fld in fields}
                state[name] = _as_dtype(decompress_sparse(fields), want(name))
            for k in names:
                state[k] = _as_dtype(h.get_tensor(k), want(k))
    load_state(model, state, str(folder))
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Floating tensors in the model's dtype (as a load into an existing model would cast them)."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


# ------------------------------------------------------------------------------ compressed-tensors export
def _layer_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (lm_head and embeddings stay dense)."""
    from .structured import find_layers

    layers = find_layers(model)
    inside = {id(m) for m in layers.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


def save_sparse_compressed_tensors(model: nn.Module, tokenizer, folder: str | os.PathLike) -> dict:
    """Write the compressed-tensors `sparse-bitmask` layout: for each linear layer of the decoder blocks
    `<module>.shape`, `<module>.compressed` (the nonzeros, row-major), `<module>.bitmask` (uint8 packbits,
    little-endian, per row) and `<module>.row_offsets` (int64 start of each row in `compressed`), everything
    else dense, and quantization_config.sparsity_config in config.json."""
    from safetensors.torch import save_file

    state = _unique_state(model)
    linears = _layer_linears(model)
    zeros = total = 0
    structure = "2:4"
    for name in linears:
        W = state.pop(f"{name}.weight")
        mask = W != 0
        zeros, total = zeros + int((~mask).sum()), total + W.numel()
        structure = structure if nm_of(W.masked_fill(~mask, 0), 4) in (0, 1, 2) else "unstructured"
        counts = mask.sum(-1)
        state.update({f"{name}.shape": torch.tensor(list(W.shape), dtype=torch.long),
                      f"{name}.compressed": W[mask], f"{name}.bitmask": pack_bits(mask),
                      f"{name}.row_offsets": torch.cumsum(counts, 0) - counts})
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    sparsity = {"format": "sparse-bitmask", "targets": ["Linear"], "ignore": ignore,
                "global_sparsity": round(zeros / max(total, 1), 4), "sparsity_structure": structure}
    qcfg = {"quant_method": "compressed-tensors", "version": CT_LAYOUT_VERSION, "sparsity_config": sparsity}
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_config(model, tokenizer, tmp, quantization_config=qcfg)
    return {"layers": len(linears), "global_sparsity": sparsity["global_sparsity"], "structure": structure}
