"""Evaluation: perplexity, agreement with a reference model, size, and speed.

Perplexity follows ../shared/BENCHMARKS.md: non-overlapping windows, fp32 forward, the loss summed over
every predicted token (L - 1 per window of L) and exp(sum / count). Encoders have no next-token head
(`lm_kind`): a masked LM gets pseudo-perplexity, an embedding model only agreement with a reference.
"""
from __future__ import annotations

import logging
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration import is_linear
from .core.mlm import masked_copies, mean_pool, sample_positions
from .errors import SlimlmError

log = logging.getLogger(__name__)

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


def lm_kind(model: nn.Module) -> str:
    """The model's head: "causal" (next-token logits), "masked" (a ...ForMaskedLM) or "none" (a bare encoder or
    backbone such as BertModel, whose first output is hidden states, not logits). A module that is not a
    transformers model counts as causal."""
    if type(model).__name__.endswith("ForMaskedLM"):
        return "masked"
    head = getattr(model, "get_output_embeddings", None)
    return "none" if callable(head) and head() is None else "causal"


def _masked_logits(model: nn.Module, x: Tensor, pos: Tensor) -> Tensor:
    """(B, V) float logits at position pos[b] of copy b, from one forward of x (B, L).

    A pre-hook on the output embedding (the vocabulary projection) keeps only the masked position's state, so
    a copy costs an encoder forward and one projection, not L of them; without one, all logits are gathered."""
    rows = torch.arange(pos.numel())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fired = []

    def keep(_m, args):
        fired.append(True)
        return (args[0][rows, pos][:, None], *args[1:])                 # (B, L, H) -> (B, 1, H)

    hook = head.register_forward_pre_hook(keep) if head is not None else None
    try:
        out = model(input_ids=x)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return (logits[:, 0] if fired else logits[rows, pos]).float()


@torch.no_grad()
def pseudo_perplexity(model: nn.Module, windows: Tensor, scorable: Tensor, mask_id: int, *,
                      positions: int | None = None, seed: int = 0, batch_size: int = 16,
                      reference: nn.Module | None = None, progress: bool = True) -> dict:
    """Pseudo-perplexity of a masked LM (Salazar et al. 2020, "Masked Language Model Scoring", ACL 2020).

    windows (k, L): token ids, each wrapped as the model was trained ([CLS] ... [SEP]); scorable (L,) bool: the
    positions that may be scored (the text, not the special tokens). For window W and scored position t the
    model sees W with w_t replaced by [MASK] (one masked copy per position, `batch_size` copies per forward):

        PLL(W) = sum_t log P_MLM(w_t | W_\\t)        PPPL = exp(-(1/N) sum_W PLL(W)),  N = tokens scored

    That is one forward per scored token. `positions` bounds it: that many positions per window, drawn
    uniformly without replacement from the scorable ones by a generator seeded with `seed`, so every model
    evaluated on the same windows is scored on the same tokens (a model and its compressed copy compare
    pairwise), and the mean log-probability over the draw is an unbiased estimate of the full mean. None
    scores every position: the paper's PPPL. (Masking 15% at once, as BERT pretraining does, would score
    P(w_t | W minus several tokens), a different quantity, so each copy masks one token.)

    Given a reference masked LM: KL(P_ref || P_model) and top-1 agreement of the distributions at the masked
    positions, from its forward on the same copies. Returns pseudo_perplexity, pseudo_nll_sum (-sum PLL),
    tokens (N), masked_positions (per window, None = all) and masked_kl_divergence, masked_top1_agreement.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for w in tqdm(windows, desc="pseudo-perplexity", disable=not progress, leave=False):
        for pos in sample_positions(scorable, positions, g).split(batch_size):   # (B,)
            x = masked_copies(w, pos, mask_id)                                    # (B, L)
            lp = F.log_softmax(_masked_logits(model, x, pos), -1)                 # (B, V)
            nll -= lp.gather(1, w[pos, None]).sum().item()
            if reference is not None:
                lq = F.log_softmax(_masked_logits(reference, x, pos), -1)
                kl += F.kl_div(lp, lq, log_target=True, reduction="sum").item()
                agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
            count += pos.numel()
    out = {"pseudo_perplexity": math.exp(nll / count), "pseudo_nll_sum": nll, "tokens": count,
           "masked_positions": positions}
    if reference is not None:
        out.update(masked_kl_divergence=kl / count, masked_top1_agreement=agree / count)
    return out


def _embed(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """(B, H) mean-pooled last hidden states of the encoder under any head (model.base_model)."""
    out = getattr(model, "base_model", model)(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden.float(), mask)


@torch.no_grad()
def embedding_agreement(model: nn.Module, reference: nn.Module, windows: Tensor, *, batch_size: int = 8,
                        progress: bool = True) -> dict:
    """Cosine similarity of the model's sentence embeddings to the reference's, one per window of `windows`
    (k, L): e = mean-pooled last hidden states (attention-mask weighted, core.mlm.mean_pool, as
    sentence-transformers pools), cos_i = <e_i, r_i> / (|e_i| |r_i|). Returns embedding_cosine_mean,
    embedding_cosine_min over the windows, and tokens (k * L)."""
    from tqdm.auto import tqdm

    cos = []
    for x in tqdm(windows.split(batch_size), desc="embeddings", disable=not progress, leave=False):
        mask = torch.ones_like(x)                          # equal-length windows: nothing is padding
        e, r = _embed(model, x, mask), _embed(reference, x, mask)
        if e.shape != r.shape:
            raise SlimlmError(f"the model's embeddings have width {e.shape[-1]} and the reference's {r.shape[-1]}; "
                              "compare with a reference of the same architecture")
        cos.append(F.cosine_similarity(e, r, dim=-1))
    c = torch.cat(cos)
    return {"embedding_cosine_mean": c.mean().item(), "embedding_cosine_min": c.min().item(),
            "tokens": windows.numel()}


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
    An encoder decodes nothing: for one (lm_kind not "causal") this measures `encode_speed` instead.
    """
    if lm_kind(model) != "causal":
        log.info("%s has no next-token head: measuring encode tokens/s, not decode", type(model).__name__)
        return encode_speed(model, prompt, runs=runs)
    ids = prompt[None]
    prefill, decode = [], []
    _greedy(model, ids, 2)  # warm-up
    for _ in range(runs):
        t_pre, t_dec = _greedy(model, ids, new_tokens)
        prefill.append(ids.shape[1] / t_pre)
        decode.append(new_tokens / t_dec)
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "runs": runs}


@torch.no_grad()
def encode_speed(model: nn.Module, ids: Tensor, *, runs: int = 3) -> dict:
    """Encoder throughput: tokens of `ids` (L,) per second of one full forward at batch 1, median over `runs`
    after a warm-up (what an embedding model or a masked LM does per input; there is no decode)."""
    x = ids[None]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    model(input_ids=x)  # warm-up
    rates = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        model(input_ids=x)
        sync()
        rates.append(x.shape[1] / (time.perf_counter() - t0))
    return {"encode_tokens_per_s": statistics.median(rates), "encode_tokens": x.shape[1], "runs": runs}


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

