"""llama.cpp as an evaluation engine (through llama-cpp-python): a GGUF file's perplexity and speed, measured
as slimlm measures its own models, so the two can stand side by side.

- perplexity: the same token ids (slimlm's tokenizer), the same non-overlapping windows, each window
  evaluated from an empty cache with the logits of every position; loss summed over every predicted token;
- speed at batch 1: prefill tokens/s = prompt tokens / time to evaluate the prompt (logits of its last
  position only, as slimlm.metrics.speed); decode tokens/s = new tokens / time of the single-token steps that
  follow (greedy: argmax of each step's logits); medians over `runs` after a warm-up.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from .errors import SlimlmError

INSTALL = ('pip install llama-cpp-python (it builds llama.cpp from source; CMAKE_ARGS="-DGGML_NATIVE=ON" '
           "for this CPU)")


def require():
    """The llama_cpp module, or a one-line error with the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise SlimlmError(f"llama.cpp is not installed; install it with: {INSTALL}") from None
    return llama_cpp


def open_model(path: str | Path, n_ctx: int, threads: int, logits_all: bool):
    """A llama_cpp.Llama on a GGUF file (quiet), with batches as long as the context."""
    llama_cpp = require()
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"{path} does not exist")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise SlimlmError(f"llama.cpp could not load {path}: {str(e).splitlines()[0] if str(e) else e}") from None


def window_logits(llm, ids: Tensor) -> Tensor:
    """Logits (L, V) float32 of every position of one window, evaluated from an empty cache."""
    llm.reset()
    llm.eval(ids.tolist())
    return torch.from_numpy(llm.scores[: ids.numel()].copy())


def perplexity(path: str | Path, windows: Tensor, threads: int = 2) -> dict:
    """Perplexity of the GGUF on (k, L) token windows: exp(sum of -log p(next token) / predicted tokens)."""
    k, L = windows.shape
    llm = open_model(path, L, threads, logits_all=True)
    if llm.n_vocab() <= int(windows.max()):
        raise SlimlmError(f"token id {int(windows.max())} is beyond the GGUF's vocabulary ({llm.n_vocab()} tokens); "
                          "tokenize with the model's own tokenizer")
    nll, count = 0.0, 0
    try:
        for w in windows:
            lp = torch.log_softmax(window_logits(llm, w)[:-1].double(), dim=-1)             # (L-1, V)
            nll -= float(lp.gather(1, w[1:, None]).sum())
            count += L - 1
    finally:
        llm.close()
    return {"perplexity": float(torch.tensor(nll / count).exp()), "tokens": count, "nll_sum": nll}


def _last_logits(llm) -> Tensor:
    import numpy as np

    llama_cpp = require()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())


def greedy(llm, prompt: Tensor, new_tokens: int) -> tuple[list[int], float, float]:
    """(generated ids, prefill seconds, decode seconds) of greedy generation from an empty cache (a Llama
    opened with logits_all=False)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt.tolist())
    nxt = int(_last_logits(llm).argmax())
    t1 = time.perf_counter()
    out = [nxt]
    for _ in range(new_tokens):
        llm.eval([nxt])
        nxt = int(_last_logits(llm).argmax())
        out.append(nxt)
    t2 = time.perf_counter()
    return out[:new_tokens], t1 - t0, t2 - t1


def speed(path: str | Path, prompt: Tensor, *, new_tokens: int = 32, runs: int = 3, threads: int = 2) -> dict:
    """Prefill and greedy decode tokens/s at batch 1, medians over `runs` (see the module docstring)."""
    llm = open_model(path, prompt.numel() + new_tokens + 8, threads, logits_all=False)
    try:
        greedy(llm, prompt, 2)                                  # warm-up
        pre, dec = [], []
        for _ in range(runs):
            _, t_pre, t_dec = greedy(llm, prompt, new_tokens)
            pre.append(prompt.numel() / t_pre)
            dec.append(new_tokens / t_dec)
    finally:
        llm.close()
    return {"prefill_tokens_per_s": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec),
            "prompt_tokens": int(prompt.numel()), "new_tokens": new_tokens, "runs": runs}


def evaluate(path: str | Path, tokenizer, data: str, *, windows: int | None = 32, seqlen: int = 512,
             threads: int = 2, with_speed: bool = True, field: str = "text") -> dict:
    """slimlm eval's figures for a GGUF run by llama.cpp: perplexity on the protocol's windows of `data`
    (tokenized by `tokenizer`), size on disk, prefill/decode tokens/s on the text's first 128 tokens."""
    from . import data as D

    require()
    ids = D.tokenize(tokenizer, D.load_text(data, field=field))
    win = D.eval_windows(ids, seqlen, windows)
    out = {"engine": "llama.cpp", "data": data, "windows": int(win.shape[0]), "seqlen": seqlen,
           **perplexity(path, win, threads), "disk_bytes": Path(path).stat().st_size, "threads": threads}
    if with_speed:
        out.update(speed(path, ids[:128], threads=threads))
    return out
