"""Distillation losses: pure functions of tensors, each with its paper's equation.

Notation: z_s, z_t student and teacher logits (C, V) for C positions; p = softmax(z / T) at temperature T;
all sums over the vocabulary v. Per-position functions return (C,); the caller sums over the positions it
keeps (labels != -100) and divides by their number, as the training loop does for the LM loss.

    Hinton et al. 2015 (soft targets)   L = alpha T^2 KL(p_t || p_s) + (1 - alpha) CE(z_s, y)
    forward KL                         KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)           (mode covering)
    reverse KL (MiniLLM, Gu et al. 2023) KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)         (mode seeking)
    generalized JSD (GKD, Agarwal et al. 2024)
        JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s,
        with beta = 0 meaning forward KL and beta = 1 reverse KL (the limits of JSD_beta / beta and
        JSD_beta / (1 - beta); TRL's GKD trainer documents the same endpoints)
    hidden states: MSE (TinyBERT, Jiao et al. 2020) and 1 - cos (DistilBERT's L_cos, Sanh et al. 2019)
    DistilBERT's triple loss for masked LMs: alpha T^2 KL + (1 - alpha) L_mlm + hidden_weight L_cos
    attention: TinyBERT's MSE between attention score matrices; MiniLM's (Wang et al. 2020) KL between the
        teacher's and the student's self-attention distributions and between their value relations
        softmax(V V^T / sqrt(d_k)) per head, on the last layer
    cached top-k teacher: KL over the k stored tokens plus one bucket holding the rest of each distribution
    MiniLLM: the sequence-level reverse KL by policy gradient on teacher-mixed samples (minillm_surrogate)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import forward_kl

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "divergence", "hidden_mse", "hidden_cosine",
           "attention_kl", "attention_score_mse", "value_relation_kl", "topk_coarse", "topk_kl",
           "chunked_topk_divergence", "minillm_surrogate", "mlm_mask", "layer_map"]


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_s || p_t) per position: (C, V), (C, V) -> (C,)."""
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> Tensor:
    """GKD's generalized Jensen-Shannon divergence per position (see the module docstring): (C,).
    beta = 0 is KL(p_t || p_s), beta = 1 is KL(p_s || p_t), 0.5 the symmetric JSD."""
    if beta <= 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta >= 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # log m = logsumexp(log beta + log p_t, log(1 - beta) + log p_s): stable where either is tiny
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1 - beta))
    return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)


def divergence(name: str, *, temperature: float = 1.0, beta: float = 0.5):
    """The per-position divergence `name` (forward_kl, reverse_kl, jsd) at a temperature, as f(z_s, z_t)."""
    if name == "forward_kl":
        return lambda s, t: forward_kl(s, t, temperature)
    if name == "reverse_kl":
        return lambda s, t: reverse_kl(s, t, temperature)
    if name == "jsd":
        return lambda s, t: generalized_jsd(s, t, beta, temperature)
    raise ValueError(f"unknown divergence {name!r}")


def hidden_mse(h_student: Tensor, h_teacher: Tensor) -> Tensor:
    """Per position mean over the width of (h_s - h_t)^2: (C, H), (C, H) -> (C,) (TinyBERT's hidden loss,
    with h_s already projected to the teacher's width where they differ)."""
    return (h_student.float() - h_teacher.float()).pow(2).mean(-1)


def hidden_cosine(h_student: Tensor, h_teacher: Tensor) -> Tensor:
    """Per position 1 - cos(h_s, h_t): (C, H), (C, H) -> (C,) (DistilBERT's cosine embedding loss)."""
    return 1 - torch.nn.functional.cosine_similarity(h_student.float(), h_teacher.float(), dim=-1, eps=1e-8)


def _causal(T: int, device) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def attention_kl(attn_student: Tensor, attn_teacher: Tensor) -> Tensor:
    """MiniLM's self-attention distribution transfer: for attention probabilities (B, A, T, T) of both models
    (A heads each), per query row KL(A_t || A_s) summed over the keys, averaged over heads: (B, T) per
    position. Rows of a causal model hold zeros above the diagonal; those keys contribute nothing."""
    s, t = attn_student.float(), attn_teacher.float()
    tiny = torch.finfo(torch.float32).tiny
    kl = torch.where(t > 0, t * (t.clamp(min=tiny).log() - s.clamp(min=tiny).log()), 0.0).sum(-1)
    return kl.mean(1)


def attention_score_mse(attn_student: Tensor, attn_teacher: Tensor) -> Tensor:
    """TinyBERT's attention loss, MSE between the heads' attention score matrices, (B, A, T, T) -> (B, T).

    The scores are recovered from the probabilities as log A (the scores minus each row's logsumexp: softmax
    ignores a per-row constant, so these are the scores that softmax sees), over the causal positions only."""
    tiny = torch.finfo(torch.float32).tiny
    T = attn_student.shape[-1]
    mask = _causal(T, attn_student.device)
    d = (attn_student.float().clamp(min=tiny).log() - attn_teacher.float().clamp(min=tiny).log()).pow(2)
    d = torch.where(mask, d, 0.0).sum(-1) / mask.sum(-1)
    return d.mean(1)


def value_relation_kl(v_student: Tensor, v_teacher: Tensor, heads: int) -> Tensor:
    """MiniLM's value-relation transfer: the values (B, T, D) of each model (heads concatenated) are split
    into `heads` relation heads of D / heads (as MiniLMv2 does, so the two models may have different head
    counts and widths), VR = softmax(V_h V_h^T / sqrt(d_h)) over the causal keys, and per query row
    KL(VR_t || VR_s) averaged over the relation heads: (B, T)."""
    def relation(v: Tensor) -> Tensor:
        B, T, D = v.shape
        if D % heads:
            raise ValueError(f"value width {D} does not split into {heads} relation heads")
        vh = v.float().reshape(B, T, heads, D // heads).transpose(1, 2)          # (B, R, T, d)
        scores = vh @ vh.transpose(-1, -2) / math.sqrt(D // heads)
        scores = scores.masked_fill(~_causal(T, v.device), float("-inf"))
        return torch.log_softmax(scores, dim=-1)
    ls, lt = relation(v_student), relation(v_teacher)
    kl = torch.where(torch.isfinite(lt), lt.exp() * (lt - ls), 0.0).sum(-1)
    return kl.mean(1)


def topk_coarse(student_logits: Tensor, top_logprobs: Tensor, top_indices: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Both distributions coarsened to k + 1 outcomes, as log-probabilities (C, k + 1): the teacher's k cached
    tokens top_indices (C, k) with their log-probabilities top_logprobs (at the same temperature), plus one
    bucket with the rest of each distribution, r_t = 1 - sum_k p_t,k and r_s = 1 - sum_k p_s,k (student first,
    teacher second). Any divergence of the module applies to them (log_softmax leaves log-probabilities as
    they are); the coarsened KL is a lower bound of the full one, equal to it when the teacher's mass is all
    in its top k."""
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ls_k = log_s.gather(-1, top_indices.long())
    lt_k = top_logprobs.float()
    floor = math.log(1e-30)                         # an empty bucket: mass ~0, no nan from 0 * log 0
    r_t = (1 - lt_k.exp().sum(-1)).clamp(min=0)
    log_r_t = torch.log(r_t.clamp(min=1e-30)).clamp(min=floor)
    log_r_s = torch.log1p(-ls_k.exp().sum(-1).clamp(max=1 - 1e-7)).clamp(min=floor)
    return torch.cat([ls_k, log_r_s[..., None]], -1), torch.cat([lt_k, log_r_t[..., None]], -1)


def topk_kl(student_logits: Tensor, top_logprobs: Tensor, top_indices: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t || p_s) per position from a cached teacher (topk_coarse):

        KL = sum_k p_t,k (log p_t,k - log p_s,k) + r_t (log r_t - log r_s)"""
    s, t = topk_coarse(student_logits, top_logprobs, top_indices, temperature)
    return forward_kl(s, t)


def chunked_topk_divergence(h_student: Tensor, w_student: Tensor, top_logprobs: Tensor, top_indices: Tensor,
                            keep: Tensor, divergence=forward_kl, *, b_student: Tensor | None = None,
                            temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """sum_i keep_i * divergence over the coarsened distributions (topk_coarse) for N positions: h_student
    (N, H), w_student (V, H), top_logprobs / top_indices (N, k), keep (N,) bool. The student's logits exist
    one chunk at a time (checkpointed: recomputed in the backward, never stored)."""
    from torch.utils.checkpoint import checkpoint

    def part(h: Tensor, lp: Tensor, idx: Tensor, k: Tensor) -> Tensor:
        z = h.float() @ w_student.float().t()
        if b_student is not None:
            z = z + b_student.float()
        s, t = topk_coarse(z, lp, idx, temperature)
        return torch.where(k, divergence(s, t), 0.0).sum()

    total = h_student.new_zeros((), dtype=torch.float32)
    for s in range(0, h_student.shape[0], chunk_size):
        e = min(s + chunk_size, h_student.shape[0])
        total = total + checkpoint(part, h_student[s:e], top_logprobs[s:e], top_indices[s:e], keep[s:e],
                                   use_reentrant=False)
    return total


def minillm_surrogate(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, mix: float = 0.2,
                      clip: float = 5.0) -> Tensor:
    """MiniLLM's policy-gradient estimate of the sequence-level reverse KL (Gu et al. 2024, "MiniLLM:
    Knowledge Distillation of Large Language Models", section 2.2), as a surrogate whose gradient is the
    estimator, per generated token: (B, n).

    tokens y (B, n) were sampled from the teacher-mixed distribution p~ = mix p + (1 - mix) q_theta (student
    q, teacher p); student_logits / teacher_logits (B, n, V) are the logits that predicted them. With
    r_t = log p(y_t) - log q(y_t) (detached) and the length-normalised long-term reward
    R_{t+1} = (1 / (n - t - 1)) sum_{t' > t} r_t' (0 at the last token),

        surrogate_t = w_t [ KL(q(.|y_<t) || p(.|y_<t)) - R_{t+1} log q(y_t | y_<t) ]

    the first term the single-step part (its gradient is E_{y_t ~ q} of the reward's gradient, computed
    exactly over the vocabulary), the second the long-term part (REINFORCE with the normalised reward), and
    w_t = q(y_t) / p~(y_t) the per-token importance weight of teacher-mixed sampling (detached, at most
    `clip`). PPO's ratio clipping of the paper's implementation is not applied."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    lq_y = log_q.gather(-1, tokens[..., None].long())[..., 0]
    lp_y = log_p.gather(-1, tokens[..., None].long())[..., 0]
    r = (lp_y - lq_y).detach()
    n = r.shape[-1]
    after = r.flip(-1).cumsum(-1).flip(-1) - r                    # sum over t' > t
    remaining = torch.arange(n - 1, -1, -1, device=r.device, dtype=r.dtype)   # n - t - 1
    R = torch.where(remaining > 0, after / remaining.clamp(min=1), 0.0)
    q_y, p_y = lq_y.detach().exp(), lp_y.detach().exp()
    w = (q_y / (mix * p_y + (1 - mix) * q_y).clamp(min=1e-30)).clamp(max=clip)
    single = (log_q.exp() * (log_q - log_p)).sum(-1)
    return w * (single - R * lq_y)


def mlm_mask(ids: Tensor, mask_id: int, vocab: int, maskable: Tensor, generator: torch.Generator,
             p: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT's masking for the masked-language-model loss (Devlin et al. 2019; DistilBERT trains with it):
    each maskable position (maskable (B, L) bool) is chosen with probability p; a chosen token becomes the
    mask token 80% of the time, a random token 10%, itself 10%. Returns (inputs, labels) (B, L): labels the
    original token at the chosen positions, -100 elsewhere."""
    chosen = (torch.rand(ids.shape, generator=generator) < p) & maskable
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    rnd = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rnd] = torch.randint(0, vocab, ids.shape, generator=generator)[rnd]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, labels


def layer_map(spec: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 0-based, each layer's output hidden state:
    "last" (Patient-KD-Last: the student's layers against the teacher's last n_student layers), "skip"
    (Patient-KD-Skip: every k-th teacher layer, k = n_teacher // n_student, ending at a k-th layer), or an
    explicit "s:t,s:t,..." list. Raises ValueError naming a layer either model lacks."""
    if spec == "last":
        pairs = [(i, n_teacher - n_student + i) for i in range(n_student)]
    elif spec == "skip":
        k = max(1, n_teacher // n_student)
        pairs = [(i, (i + 1) * k - 1) for i in range(n_student)]
    else:
        try:
            pairs = [(int(a), int(b)) for a, b in (p.split(":") for p in spec.split(",") if p.strip())]
        except ValueError:
            raise ValueError(f"a layer map is last, skip or 's:t,s:t,...' (student:teacher), not {spec!r}") from None
    for s, t in pairs:
        if not 0 <= s < n_student:
            raise ValueError(f"the layer map names student layer {s}; the student has layers 0..{n_student - 1}")
        if not 0 <= t < n_teacher:
            raise ValueError(f"the layer map names teacher layer {t}; the teacher has layers 0..{n_teacher - 1}")
    if not pairs:
        raise ValueError("the layer map is empty")
    return pairs
