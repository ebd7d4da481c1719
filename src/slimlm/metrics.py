"""Evaluation: perplexity, agreement with a reference model, size, and speed.

Perplexity follows ../shared/BENCHMARKS.md: non-overlapping windows, fp32 forward, the loss summed over
every predicted token (L - 1 per window of L) and exp(sum / count).
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration import is_linear


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


class ReferenceLogprobs:
    """A reference model's next-token log-probabilities on fixed windows, kept in a raw float32 file.

    `agreement` against many candidates on the same windows (a benchmark suite) then runs the reference
    once instead of once per candidate. The file is read window by window with plain reads, not memory-
    mapped, so the reader's resident set does not grow by the file's size.
    """

    def __init__(self, path, shape: tuple[int, int, int]):
        self.path, self.shape = str(path), tuple(shape)   # (windows, positions, vocabulary)

    @classmethod
    @torch.no_grad()
    def write(cls, reference: nn.Module, windows: Tensor, path, *, progress: bool = True) -> ReferenceLogprobs:
        from tqdm.auto import tqdm

        shape = None
        with open(path, "wb") as f:
            for w in tqdm(windows, desc="reference", disable=not progress, leave=False):
                lq = F.log_softmax(_logits(reference, w[None])[0, :-1], -1).contiguous()
                shape = shape or (windows.shape[0], *lq.shape)
                f.write(lq.numpy().tobytes())
        return cls(path, shape)

    def __call__(self, i: int) -> Tensor:
        import numpy as np

        per = self.shape[1] * self.shape[2]
        with open(self.path, "rb") as f:
            f.seek(i * per * 4)
            a = np.fromfile(f, dtype=np.float32, count=per)
        if a.size != per:
            raise ValueError(f"{self.path} is shorter than its {self.shape} log-probabilities")
        return torch.from_numpy(a).view(self.shape[1], self.shape[2])


@torch.no_grad()
def score(model: nn.Module, windows: Tensor, reference: nn.Module | ReferenceLogprobs | None = None, *,
          progress: bool = True) -> dict:
    """Perplexity and, given a reference (a model or its cached log-probabilities on the same windows),
    the mean KL(P_ref || P_model) and top-1 agreement per predicted token, from one forward per window."""
    from tqdm.auto import tqdm

    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for i, w in enumerate(tqdm(windows, desc="evaluate", disable=not progress, leave=False)):
        ids = w[None]
        logits = _logits(model, ids)[0, :-1]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        if reference is not None:
            lp = F.log_softmax(logits, -1)
            del logits
            if isinstance(reference, ReferenceLogprobs):
                lq = reference(i)
            else:
                lq = F.log_softmax(_logits(reference, ids)[0, :-1], -1)
            kl += F.kl_div(lp, lq, log_target=True, reduction="sum").item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        count += ids.shape[1] - 1
    out = {"perplexity": math.exp(nll / count), "nll_sum": nll, "tokens": count}
    if reference is not None:
        out.update(kl_divergence=kl / count, top1_agreement=agree / count)
    return out


def perplexity(model: nn.Module, windows: Tensor, *, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over `windows` (k, L); returns ppl, nll_sum and the scored token count."""
    return score(model, windows, progress=progress)


def agreement(model: nn.Module, reference: nn.Module | ReferenceLogprobs, windows: Tensor, *,
              progress: bool = True) -> dict:
    """Mean KL(P_ref || P_model) of the next-token distributions and top-1 agreement, per predicted token."""
    r = score(model, windows, reference, progress=progress)
    return {k: r[k] for k in ("kl_divergence", "top1_agreement", "tokens")}


def _packed_numel(m: nn.Module) -> int | None:
    """Weights a packed linear module represents (in * out + bias), or None for an ordinary module.

    A quantized linear (QuantLinear, NF4Linear, Int8Linear, ...) keeps its weight as buffers, not as a
    `weight` parameter, but still declares in_features and out_features.
    """
    if is_linear(m) or isinstance(getattr(m, "weight", None), nn.Parameter):
        return None
    i, o = getattr(m, "in_features", None), getattr(m, "out_features", None)
    if not (isinstance(i, int) and isinstance(o, int)):
        return None
    bias = getattr(m, "bias", None)
    return i * o + (bias.numel() if isinstance(bias, torch.Tensor) else 0)


def logical_numel(module: nn.Module) -> int:
    """Parameters the model represents (a packed 4-bit weight counts in*out, not its int32 words)."""
    total = 0
    seen = set()
    for m in module.modules():
        own = _packed_numel(m)
        if own is not None:
            total += own
            seen.update(id(t) for t in list(m.parameters()) + list(m.buffers()))
    for t in module.parameters():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@dataclass
class Size:
    parameters: int
    resident_bytes: int
    disk_bytes: int | None
    bits_per_weight: float
    linear_bits_per_weight: float


def size(model: nn.Module, disk_bytes: int | None = None) -> Size:
    params = logical_numel(model)
    resident = tensor_bytes(model)
    lin_bits, lin_params = 0, 0
    for m in model.modules():
        own = _packed_numel(m)
        if own is not None:
            lin_params += own
            lin_bits += 8 * tensor_bytes(m)
        elif is_linear(m) and m.weight.device.type != "meta":
            lin_params += m.weight.numel()
            lin_bits += 8 * m.weight.numel() * m.weight.element_size()
    return Size(params, resident, disk_bytes, 8 * resident / max(params, 1), lin_bits / max(lin_params, 1))


@torch.no_grad()
def speed(model: nn.Module, prompt: Tensor, *, new_tokens: int = 32, runs: int = 3) -> dict:
    """Prefill and greedy decode tokens/s at batch 1 with the KV cache, medians over `runs`.

    prefill = prompt tokens / time of the first forward; decode = new tokens / time of the single-token
    steps that follow. The first forward computes the logits of the last prompt position only, as
    transformers' generate() does (logits_to_keep=1, where the model's forward takes it): the output layer's
    product for the other prompt positions serves no generation. (Before 2026-12-02 it computed all of them.)
    """
    ids = prompt[None]
    prefill, decode = [], []
    _greedy(model, ids, 2)  # warm-up
    for _ in range(runs):
        t_pre, t_dec = _greedy(model, ids, new_tokens)
        prefill.append(ids.shape[1] / t_pre)
        decode.append(new_tokens / t_dec)
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "runs": runs}


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; use whichever this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _last_logits_kwargs(model: nn.Module) -> dict:
    """{"logits_to_keep": 1} (transformers >= 4.50; "num_logits_to_keep" before) where forward takes it."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _greedy(model: nn.Module, ids: Tensor, n: int) -> tuple[float, float]:
    key = _cache_kwarg(model)
    last_only = _last_logits_kwargs(model)
    # on a GPU the calls return before the kernels finish: wait for them at each clock reading
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **last_only)
    sync()
    t1 = time.perf_counter()
    past = _out_cache(out)
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(n):
        out = model(input_ids=tok, use_cache=True, **{key: past})
        past = _out_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
    sync()
    return t1 - t0, time.perf_counter() - t1


def peak_rss_bytes() -> int:
    """Maximum resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def as_dict(x) -> dict:
    return asdict(x) if hasattr(x, "__dataclass_fields__") else dict(x)

