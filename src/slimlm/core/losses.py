"""The language-model loss over the output layer, computed over chunks of positions so that the (N, V)
logits and their gradient are never held whole.

For positions i with hidden state h_i (H,), output weight W (V, H), optional bias b (V,) and target y_i:
    z_i = W h_i + b                                  logits (V,), fp32
    loss_i = logsumexp(z_i) - z_i[y_i]               cross-entropy
    dloss_i/dz_i = softmax(z_i) - onehot(y_i)  =: g_i
    dL/dh_i = g_i W      dL/dW = sum_i g_i^T h_i      dL/db = sum_i g_i
Positions whose label is `ignore_index` contribute nothing (g_i = 0); "mean" divides by the number of the
others, as F.cross_entropy does. Each chunk's logits exist only while the chunk is processed; the gradients
are computed then, in the forward (the same idea as Liger-Kernel's fused linear cross-entropy), so that no
logit is ever recomputed.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import ConfigError


def _chunk_logits(h: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """z = h W^T (+ b): h (C, H), W (V, H) fp32 -> (C, V) fp32, one buffer."""
    h = h.float()
    return torch.mm(h, W.t()) if b is None else torch.addmm(b, h, W.t())


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward, per chunk: z, lse = logsumexp(z), loss += lse - z[y], and where gradients are needed
    g = exp(z - lse) - onehot(y) (in place, in z's buffer), grad_h = g W, grad_W += g^T h, grad_b += sum g.
    The loss is the last operation of a training step, so the gradient of the summed loss is computed while
    the chunk's logits exist (two products per chunk, as an unchunked loss takes) and the backward only
    scales it by dL/dloss."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int,
                ignore_index: int, mean: bool) -> Tensor:
        N = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        W = weight.float()                                   # no copy when already fp32
        b = None if bias is None else bias.float()
        valid = labels != ignore_index                       # (N,)
        target = labels.masked_fill(~valid, 0)               # (N,) safe to gather
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_W = torch.zeros_like(W) if need_w else None     # (V, H) fp32 accumulator
        grad_b = torch.zeros_like(b) if need_b else None     # (V,) fp32
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            h = hidden[s:e].float()                          # (C, H)
            z = _chunk_logits(h, W, b)                       # (C, V)
            z_y = z.gather(1, target[s:e, None]).squeeze(1)  # (C,) target logits, before z is overwritten
            m = z.amax(1)                                    # (C,) logsumexp in place: m + log sum exp(z - m)
            z.sub_(m[:, None]).exp_()                        # exp(z - m)
            sumexp = z.sum(1)
            lse = m + sumexp.log()
            total += torch.where(valid[s:e], lse - z_y, 0.0).sum()
            if need_h or need_w or need_b:
                g = z.div_(sumexp[:, None])                  # softmax
                g[torch.arange(e - s, device=g.device), target[s:e]] -= 1.0      # - onehot(y)
                g.mul_(valid[s:e, None])                     # ignored rows -> 0
                if need_h:
                    torch.mm(g, W, out=grad_h[s:e])          # (C, H)
                if need_w:
                    grad_W.addmm_(g.t(), h)                  # (V, H)
                if need_b:
                    grad_b += g.sum(0)
            del z
        count = valid.sum()
        ctx.mean = mean
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_h, grad_W, grad_b, count)
        return total / count if mean else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_W, grad_b, count = ctx.saved_tensors
        scale = grad_out.float() / count if ctx.mean else grad_out.float()    # () dL/dloss_i
        dh, dw, db = ctx.dtypes
        out = [None if g is None else (g * scale).to(dt) for g, dt in ((grad_h, dh), (grad_W, dw), (grad_b, db))]
        return out[0], out[1], out[2], None, None, None, None


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                                 chunk_size: int = 1024, ignore_index: int = -100,
                                 reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `labels`, chunked over positions.

    hidden (..., H) any float dtype (bf16 is fine); weight (V, H); bias (V,) or None; labels (...) long with
    values in [0, V) or `ignore_index`. Returns a scalar fp32 loss equal to
    F.cross_entropy(hidden.float() @ weight.float().T + bias, labels, ignore_index=..., reduction=...),
    "mean" being over the positions not ignored (NaN when all are ignored, as there).
    No logit scaling or soft-capping is applied.

    Gradients flow to hidden, and to weight and bias only when they require grad (a frozen or tied output
    layer skips the (V, H) accumulation entirely); they are returned in each input's dtype.

    Memory: logits, softmax and gradient exist for one chunk at a time, each computed in place in one
    (chunk_size, V) fp32 buffer; across chunks only the (N, H) gradient of `hidden` is kept. Peak extra
    memory is therefore chunk_size * V floats plus: an fp32 copy of W when W is not fp32, and, when W
    requires grad, the (V, H) fp32 grad_weight accumulator (the size of the gradient itself). A plain
    F.cross_entropy holds N * V logits and as many for their gradient. Work: the two products per chunk an
    unchunked loss takes (logits, gradient of hidden), plus grad_weight's when the weight trains.
    """
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) disagree: {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}; found "
                         f"{int(labels[bad][0])}")
    return _ChunkedLinearCE.apply(hidden, weight, bias, labels, chunk_size, ignore_index, reduction == "mean")


def shift_labels(input_ids: Tensor, loss_mask: Tensor | None = None, *, ignore_index: int = -100) -> Tensor:
    """Next-token labels for a causal LM: labels[:, t] = input_ids[:, t + 1], `ignore_index` at the last
    position and wherever the target token is masked out.

    input_ids (B, T) long. loss_mask (B, T) bool or 0/1, aligned with input_ids: true where the token is
    one to be predicted (e.g. response tokens, not padding); position t is kept iff loss_mask[:, t + 1].
    Returns labels (B, T) long, to pair with the hidden states of every input position.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if loss_mask is not None:
        if loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask must match input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(loss_mask.shape)}")
        labels[:, :-1].masked_fill_(~loss_mask[:, 1:].bool(), ignore_index)
    return labels


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t || p_s) per position, (C, V) logits -> (C,):

        p = softmax(z / T),   KL_i = sum_v p_t,v (log p_t,v - log p_s,v)

    the forward KL of knowledge distillation (Hinton et al. 2015, without the T^2 factor, which belongs to
    the caller's mixture with the hard loss)."""
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def chunked_head_divergence(h_student: Tensor, w_student: Tensor, h_teacher: Tensor, w_teacher: Tensor,
                            keep: Tensor, divergence=forward_kl, *, b_student: Tensor | None = None,
                            b_teacher: Tensor | None = None, chunk_size: int = 1024) -> Tensor:
    """sum_i keep_i * divergence(z_s,i, z_t,i) over N positions, z = W h + b for each model: h_student (N, H),
    w_student (V, H), h_teacher (N, H_t), w_teacher (V, H_t), keep (N,) bool.

    Neither model's (N, V) logits are held: each chunk of positions computes both models' logits (the
    teacher's without gradient) inside a checkpoint, so the backward recomputes that chunk's student logits
    and never stores them."""
    from torch.utils.checkpoint import checkpoint

    if h_student.shape[0] != h_teacher.shape[0] or w_student.shape[0] != w_teacher.shape[0]:
        raise ConfigError(f"student and teacher disagree: {h_student.shape[0]} vs {h_teacher.shape[0]} positions, "
                          f"vocabularies {w_student.shape[0]} vs {w_teacher.shape[0]}")

    def part(h: Tensor, t: Tensor, k: Tensor) -> Tensor:
        z_s = _chunk_logits(h, w_student, b_student)
        with torch.no_grad():
            z_t = _chunk_logits(t, w_teacher.detach(), None if b_teacher is None else b_teacher.detach())
        return torch.where(k, divergence(z_s, z_t), 0.0).sum()

    total = h_student.new_zeros((), dtype=torch.float32)
    for s in range(0, h_student.shape[0], chunk_size):
        e = min(s + chunk_size, h_student.shape[0])
        total = total + checkpoint(part, h_student[s:e], h_teacher[s:e].detach(), keep[s:e], use_reentrant=False)
    return total
