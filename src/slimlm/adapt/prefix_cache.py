"""The one place where slimlm touches transformers' key/value cache: soft prompts and prefixes enter a model as
keys and values that every attention layer sees before the text.

Prefix tuning and P-tuning v2 train those keys and values directly. Prompt tuning and P-tuning prepend
trainable embeddings at the input; in a causal model the virtual tokens come first and never attend to the
text, so their effect on the text is exactly the keys and values they leave in the cache, computed by one
forward pass of the n virtual tokens (at batch 1, positions 0..n-1). All four methods therefore reduce to
"a prefix of n cached positions", installed as a forward pre-hook on the decoder (the module that owns the layers):

    prefill (no cache, or an empty one: a plain forward, a training step, generate()'s first call)
        cache <- the prefix's keys and values, repeated for the batch
    every call
        attention_mask (B, T) that does not count the prefix  ->  ones(B, n) ++ attention_mask
        explicit position_ids (the text's own, from 0)        ->  position_ids + n
    so the text sits at positions n.. in every call, as in PEFT's forward.

The Cache API used: DynamicCache(config=...), update, get_seq_length, batch_repeat_interleave, and the
per-layer keys and values (layer_kv) to read the model's own prefix for P-tuning v2's initialisation.
Transformers renamed the decoder's cache argument (past_key_values -> cache, 5.x); the name is read from the
decoder's signature, and tests/test_prompts.py checks logits against PEFT and generate() against a plain
greedy loop on every architecture of the test table, so a transformers upgrade that changes the cache
classes fails there first.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

CACHE_NAMES = ("cache", "past_key_values")


def decoder(model: nn.Module) -> nn.Module:
    """The module that runs the decoder layers (model.model, transformer, OPT's model.decoder): the owner of
    the list of blocks, which every path to the logits goes through (the causal-LM head, lm_loss)."""
    name, _ = layer_list(model)
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return model.get_submodule(owner)


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, the decoder layers): the calibration runner's rule, and for a packed quantized model (whose layers
    hold no nn.Linear) the longest ModuleList of same-class modules that hold weights."""
    from ..calibration.common import find_blocks

    try:
        return find_blocks(model)
    except ValueError:
        pass
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            if any(True for _ in m[0].parameters()) and (best is None or len(m) > len(best[1])):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return best


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's attention."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, hd


def _cache_arg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise TypeError(f"{type(module).__name__}.forward takes no key/value cache ({' or '.join(CACHE_NAMES)}); "
                    "prompt and prefix methods need one")


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return DynamicCache(config=cfg)


def cache_from_kv(model: nn.Module, kv: list[tuple[Tensor, Tensor]]):
    """A batch-1 cache holding layer i's keys and values kv[i] (each (1, kv_heads, n, head_dim))."""
    cache = new_cache(model)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def layer_kv(cache, i: int) -> tuple[Tensor, Tensor]:
    """Layer i's cached keys and values (1, kv_heads, n, head_dim): P-tuning v2's initial prefix is the model's
    own keys and values for sampled tokens. (DynamicCache.layers: the one non-public attribute used here.)"""
    layer = cache.layers[i]
    return layer.keys, layer.values


class PrefixHook:
    """Installs `supplier` (() -> a batch-1 cache holding the prefix) on the decoder of `model`.
    `n`: the prefix length. While `run_plain()` is active (the supplier's own forward pass), calls go through
    untouched."""

    def __init__(self, model: nn.Module, supplier: Callable[[], object], n: int) -> None:
        self.model, self.supplier, self.n = model, supplier, n
        self.decoder = decoder(model)
        self.arg = _cache_arg(self.decoder)
        self.enabled = True
        self._plain = 0
        self._handle = self.decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def run_plain(self, **kwargs):
        """A decoder forward without the prefix (the prompt pass of prompt tuning and P-tuning)."""
        self._plain += 1
        try:
            return self.decoder(**kwargs)
        finally:
            self._plain -= 1

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._plain or not self.enabled:
            return None
        if args:                                    # decoder(input_ids, ...) called positionally
            names = [p for p in inspect.signature(module.forward).parameters][: len(args)]
            kwargs = {**dict(zip(names, args)), **kwargs}
        cache = next((kwargs.pop(k) for k in CACHE_NAMES if kwargs.get(k) is not None), None)
        for k in CACHE_NAMES:
            kwargs.pop(k, None)
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs["inputs_embeds"]
        batch, length = x.shape[0], x.shape[1]
        if cache is None or cache.get_seq_length() == 0:
            cache = self.supplier()
            if batch > 1:
                cache.batch_repeat_interleave(batch)
        kwargs[self.arg] = cache
        total = cache.get_seq_length() + length
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] + self.n == total:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.n), mask], dim=1)
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor):
            kwargs["position_ids"] = pos + self.n
        if "cache_position" in kwargs and kwargs["cache_position"] is not None:     # transformers < 5.x
            start = total - length
            kwargs["cache_position"] = torch.arange(start, total, device=x.device)
        return (), kwargs
