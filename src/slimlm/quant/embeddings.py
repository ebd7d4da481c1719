"""Token embeddings and output layer in bfloat16 beside a float32 model (`embed_dtype="bfloat16"`).

After weight-only quantization of the linear layers, the largest float tensor left in a small model is
usually the (often tied) token-embedding / output matrix: 49152 x 576 in SmolLM2, 113 MB of 182 MB in
float32, and the output product streams all of it for every generated token. Stored in bfloat16 it takes
half the memory and, on CPUs with bf16 instructions, the output product runs about 4x faster (see
../shared/MEASURED.md: 7.4 ms fp32 against 2.0 ms bf16 per token for SmolLM2's lm_head).

The rest of the model keeps computing in its own dtype: the embedding's output and the output layer's
logits are cast back to it by forward hooks, and the output layer's input is cast to bfloat16. The hooks
are not saved; `reinstall_casts` puts them back when a saved model whose embedding dtype differs from the
rest of its weights is loaded.
"""
from __future__ import annotations

import torch
from torch import nn

EMBED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MARK = "_slimlm_cast_hooks"


def _compute_dtype(model: nn.Module, skip: set[int]) -> torch.dtype | None:
    """dtype of the first floating parameter that is not one of the embedding/output weights."""
    for p in model.parameters():
        if id(p) not in skip and p.is_floating_point():
            return p.dtype
    return None


def _head_weight(model: nn.Module):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and type(head) is nn.Linear:   # not a quantized replacement
        return head, head.weight
    return None, None


def cast_embeddings(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the input embedding (and an unquantized output layer, tied or not) in `dtype`; the model keeps
    computing in its current dtype. Returns the number of bytes saved (negative if it grew)."""
    emb = model.get_input_embeddings()
    head, hw = _head_weight(model)
    params = [emb.weight] + ([hw] if hw is not None and hw is not emb.weight else [])
    compute = _compute_dtype(model, {id(p) for p in params})
    saved = 0
    for p in params:
        if p.dtype != dtype:
            saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
            p.data = p.data.to(dtype)
    if compute is not None and compute != dtype:
        install_casts(model, compute)
    return saved


def install_casts(model: nn.Module, compute: torch.dtype) -> None:
    """Hooks: embedding output -> `compute`; output layer input -> its weight dtype, logits -> `compute`."""
    if getattr(model, _MARK, None):
        return
    emb = model.get_input_embeddings()
    hooks = [emb.register_forward_hook(lambda _m, _a, out: out.to(compute))]
    head, _ = _head_weight(model)
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:])))
        hooks.append(head.register_forward_hook(lambda _m, _a, out: out.to(compute)))
    setattr(model, _MARK, hooks)


def reinstall_casts(model: nn.Module) -> None:
    """For a loaded model: if its embedding is stored in another dtype than the rest, install the casts."""
    if not hasattr(model, "get_input_embeddings"):
        return
    emb = model.get_input_embeddings()
    if emb is None or not emb.weight.is_floating_point():
        return
    _, hw = _head_weight(model)
    compute = _compute_dtype(model, {id(emb.weight)} | ({id(hw)} if hw is not None else set()))
    if compute is not None and compute != emb.weight.dtype:
        install_casts(model, compute)
