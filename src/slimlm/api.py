"""The Python API: the same operations as the CLI, on models in memory.

    model = slimlm.load_model("smollm2-135m")
    tok = slimlm.load_tokenizer("smollm2-135m")
    slimlm.quantize(model, GPTQConfig(bits=4, group_size=64), data=slimlm.calibration_data(tok))
    print(slimlm.evaluate(model, tok, data="python-docs"))
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from . import data as D
from . import metrics as E
from . import registry
from .calibration import RunnerOptions
from .errors import SlimlmError

log = logging.getLogger(__name__)


def calibration_data(tokenizer, source: str = D.DEFAULT_SOURCE, *, samples: int = 128, seqlen: int = 512,
                     seed: int = 0, field: str = "text") -> Tensor:
    """(samples, seqlen) token windows at seeded random offsets of a text source."""
    return D.calibration_windows(D.tokenize(tokenizer, D.load_text(source, field=field)), samples, seqlen, seed)


def _method_for(family: str, config: Any) -> registry.Method:
    for m in registry.methods(family).values():
        if type(config) is m.config_cls:
            return m
    raise SlimlmError(f"{type(config).__name__} is not a {family} config; use one of: "
                      + ", ".join(m.config_cls.__name__ for m in registry.methods(family).values()))


def _apply(family: str, model: nn.Module, config: Any, data: Tensor | None,
           runner: RunnerOptions | None) -> dict:
    method = _method_for(family, config)
    if method.data_needed(config) and data is None:
        raise SlimlmError(f"{method.name} needs calibration data: pass data=calibration_data(tokenizer, ...) "
                          "(CLI: --data SOURCE)")
    check_finite(model)
    with torch.no_grad():
        return method.apply(model, config, data, runner or RunnerOptions())


def quantize(model: nn.Module, config: Any, data: Tensor | None = None,
             runner: RunnerOptions | None = None) -> dict:
    """Quantize `model` in place with the method whose config this is; returns the method's report."""
    report = _apply("quantize", model, config, data, runner)
    embed = getattr(config, "embed_dtype", "float32")
    if embed != "float32":
        from .quant.embeddings import EMBED_DTYPES, cast_embeddings

        report["embed_dtype"] = embed
        report["embed_bytes_saved"] = cast_embeddings(model, EMBED_DTYPES[embed])
    return report


def prune(model: nn.Module, config: Any, data: Tensor | None = None, runner: RunnerOptions | None = None) -> dict:
    """Prune `model` in place with the method whose config this is; returns the method's report."""
    return _apply("prune", model, config, data, runner)


def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
            raise SlimlmError(f"weight {name} holds NaN or infinite values; the model is broken, fix it first")


def evaluate(model: nn.Module, tokenizer, data: str = D.DEFAULT_SOURCE, *, windows: int | None = 32,
             seqlen: int = 512, reference: nn.Module | None = None, speed: bool = False,
             disk_bytes: int | None = None, field: str = "text", progress: bool = True) -> dict:
    """Perplexity (and agreement, size, speed) by the benchmark protocol; returns a flat dict."""
    D.check_context(model, seqlen)
    ids = D.tokenize(tokenizer, D.load_text(data, field=field))
    win = D.eval_windows(ids, seqlen, windows)
    result: dict[str, Any] = {"data": data, "windows": int(win.shape[0]), "seqlen": seqlen}
    result.update(E.score(model, win, reference, progress=progress))
    result.update(E.as_dict(E.size(model, disk_bytes)))
    if speed:
        result.update(E.speed(model, ids[:128]))
    return result
