"""Distillation as a method of the training loop: the student is the model the loop trains; the loss of a
batch also reads a frozen teacher (slimlm.core.distill holds the losses).

    L = alpha T^2 D(p_t || p_s)                   logits at temperature T (D: forward KL, reverse KL, GJSD)
      + (1 - alpha) CE(student, labels)           the hard loss (alpha = 0: cross-entropy only)
      + hidden_weight * mean over mapped layers of MSE or 1 - cos between hidden states
      + embedding_weight * MSE(E_s W_e, E_t)      TinyBERT's embedding loss (W_e only when the widths differ)
      + attention_weight * (MiniLM: last layer attention KL + value-relation KL;
                            TinyBERT: attention-score MSE over the mapped layers)

every term summed over the positions with a target and divided by their number. The logit terms run over
chunks of positions (core.losses.chunked_head_divergence): neither model's (positions x vocabulary) logits are
ever held whole. Where the widths differ, a learned linear projection maps the student's hidden states to the
teacher's (trained with the student, not saved). The teacher may be any model slimlm loads, quantized ones
included; its forward runs without gradient.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..core import distill as KD
from ..core.losses import chunked_head_divergence, chunked_linear_cross_entropy
from ..errors import ConfigError
from ..registry import register


def _lm(model: nn.Module, batch: dict):
    from ..training.plan import lm_loss
    return lm_loss(model, batch)

LOSSES = ("forward_kl", "reverse_kl", "jsd", "minillm", "ce")


@dataclass
class DistillConfig:
    loss: str = field(default="forward_kl", metadata={
        "help": "logit loss: forward_kl (Hinton's soft targets), reverse_kl (token-level), jsd (GKD's generalized "
                "JSD, --beta), minillm (sequence-level reverse KL by policy gradient on teacher-mixed samples of "
                "--gen-tokens continuing each window's first part; --alpha weighs it against the LM loss on the "
                "data), or ce (cross-entropy with the labels only: the baseline)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T of both models (loss x T^2)"})
    alpha: float = field(default=0.5, metadata={
        "help": "weight of the distillation loss, 1 - alpha on the cross-entropy with the labels (0.25 is the "
                "Switch Transformer's 75% hard, 25% soft)"})
    beta: float = field(default=0.5, metadata={"help": "jsd: 0 = forward KL, 1 = reverse KL, 0.5 symmetric"})
    hidden_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state loss (0: off)"})
    hidden_loss: str = field(default="cosine", metadata={"help": "hidden-state loss: cosine (DistilBERT) or mse"})
    layer_map: str = field(default="skip", metadata={
        "help": "student:teacher layers for hidden states and TinyBERT attention: skip (Patient-KD-Skip), last "
                "(Patient-KD-Last) or an explicit list like 0:1,1:3"})
    embedding_weight: float = field(default=0.0, metadata={
        "help": "weight of TinyBERT's embedding loss: MSE between the two models' embedding-layer outputs, "
                "through a learned projection when the widths differ (0: off)"})
    attention_weight: float = field(default=0.0, metadata={"help": "weight of the attention loss (0: off)"})
    attention_loss: str = field(default="minilm", metadata={
        "help": "minilm (last layer: attention distributions and value relations) or tinybert (attention-score "
                "MSE over the mapped layers)"})
    relation_heads: int = field(default=0, metadata={
        "help": "minilm: relation heads of the value relation (0: the student's attention heads)"})
    on_policy: float = field(default=0.0, metadata={
        "help": "fraction of the batches replaced by the student's own continuations of their first part, scored "
                "by the teacher (GKD's on-policy data; divergence only, no hard loss on them)"})
    gen_tokens: int = field(default=0, metadata={
        "help": "on-policy: tokens the student generates per sequence (0: half the window)"})
    gen_temperature: float = field(default=1.0, metadata={"help": "on-policy: the student's sampling temperature"})
    mix: float = field(default=0.2, metadata={
        "help": "minillm: the teacher's share of the sampling distribution mix p + (1 - mix) q (MiniLLM: 0.2)"})

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss takes {', '.join(LOSSES)}, not {self.loss!r}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0 (got {self.temperature})")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must be in [0, 1] (got {self.alpha})")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"--beta must be in [0, 1] (got {self.beta})")
        if self.hidden_weight < 0 or self.attention_weight < 0 or self.embedding_weight < 0:
            raise ConfigError("--hidden-weight, --embedding-weight and --attention-weight must be >= 0")
        if self.hidden_loss not in ("cosine", "mse"):
            raise ConfigError(f"--hidden-loss takes cosine or mse, not {self.hidden_loss!r}")
        if self.attention_loss not in ("minilm", "tinybert"):
            raise ConfigError(f"--attention-loss takes minilm or tinybert, not {self.attention_loss!r}")
        if self.relation_heads < 0:
            raise ConfigError(f"--relation-heads must be >= 0 (got {self.relation_heads})")
        if not 0 <= self.on_policy <= 1:
            raise ConfigError(f"--on-policy is a fraction of the batches, in [0, 1] (got {self.on_policy})")
        if self.on_policy and self.loss == "ce":
            raise ConfigError("on-policy batches are scored by the teacher: use a divergence, not --loss ce")
        if not 0 <= self.mix <= 1:
            raise ConfigError(f"--mix must be in [0, 1] (got {self.mix})")
        if self.loss == "minillm" and self.on_policy:
            raise ConfigError("minillm samples its own sequences on every batch: drop --on-policy")
        if self.gen_tokens < 0 or not self.gen_temperature > 0:
            raise ConfigError("--gen-tokens must be >= 0 and --gen-temperature > 0")


def _base(model: nn.Module) -> nn.Module:
    return model.base_model if getattr(model, "base_model", None) is not model else model


def _head(model: nn.Module):
    from ..training.plan import _plain_head
    return _plain_head(model)


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, of a packed quantized teacher too (adapt.prefix_cache.layer_list)."""
    from ..adapt.prefix_cache import layer_list
    try:
        return layer_list(model)[1]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _value_proj(model: nn.Module) -> nn.Module:
    last = _blocks(model)[-1]
    for name, m in last.named_modules():
        if name.endswith("v_proj") and isinstance(m, nn.Module):
            return m
    raise ConfigError(f"MiniLM's value relation needs a separate v_proj in {type(model).__name__}'s attention; "
                      "use --attention-loss tinybert")


def check_vocabularies(student: nn.Module, teacher: nn.Module, tokenizer=None) -> int:
    """The number of logits compared: the student's vocabulary rows. The teacher may have more rows only as
    padding beyond the tokenizer's vocabulary (dropped); otherwise ConfigError naming both."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs == vt:
        return vs
    real = len(tokenizer) if tokenizer is not None else None
    if vt > vs and real is not None and real <= vs:
        return vs
    raise ConfigError(f"the teacher's vocabulary has {vt} tokens and the student's {vs}"
                      + (f" (tokenizer: {real})" if real is not None else "")
                      + "; white-box distillation compares logits token by token: use a student with the teacher's "
                      "tokenizer, or black-box distillation (slimlm generate, then train on the generations)")


class _Values:
    """Forward hook keeping the last output of a v_proj."""

    def __init__(self, module: nn.Module) -> None:
        self.out: Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out) -> None:
        self.out = out


@torch.no_grad()
def on_policy_batch(model: nn.Module, batch: dict, new_tokens: int, temperature: float, seed: int) -> dict:
    """GKD's on-policy data: the first L - n tokens of each window as the prompt, n tokens sampled from the
    student at `temperature` (seeded: the same step draws the same tokens after a resume), and labels on the
    generated tokens only (label i is token i + 1)."""
    ids = batch["input_ids"]
    B, L = ids.shape
    n = min(new_tokens or L // 2, L - 1)
    prompt = ids[:, :L - n]
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             min_new_tokens=n, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             pad_token_id=0)
    model.train(was)
    out = out[:, :L]
    labels = torch.full_like(out, -100)
    labels[:, L - n - 1:L - 1] = out[:, L - n:]
    return {"input_ids": out, "labels": labels}


@torch.no_grad()
def mixed_sample(student: nn.Module, teacher: nn.Module, prompt: Tensor, n: int, mix: float, seed: int) -> Tensor:
    """n tokens after `prompt` (B, P), each drawn from mix * p_teacher + (1 - mix) * q_student given the
    sequence so far (both models stepping with their key/value caches); returns (B, P + n)."""
    from ..metrics import _cache_kwarg, _out_cache

    was = student.training
    student.eval()
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    ks, kt = _cache_kwarg(student), _cache_kwarg(teacher)
    out_s = student(input_ids=prompt, use_cache=True)
    out_t = teacher(input_ids=prompt, use_cache=True)
    seq = [prompt]
    for _ in range(n):
        q = torch.softmax(out_s.logits[:, -1].float(), -1)
        p = torch.softmax(out_t.logits[:, -1].float(), -1)
        tok = torch.multinomial(mix * p + (1 - mix) * q, 1, generator=g)
        seq.append(tok)
        out_s = student(input_ids=tok, use_cache=True, **{ks: _out_cache(out_s)})
        out_t = teacher(input_ids=tok, use_cache=True, **{kt: _out_cache(out_t)})
    student.train(was)
    return torch.cat(seq, 1)


@register("distill", "distill", DistillConfig, needs_data=True,
          help="white-box distillation from a teacher: logits, hidden states, attention")
def prepare_distill(model: nn.Module, config: DistillConfig, ctx) -> object:
    from ..adapt.methods import _check_float, _plan

    teacher = getattr(ctx, "teacher", None)
    cache = getattr(ctx, "teacher_cache", None)            # the cache's metadata when training from one
    if teacher is None and cache is None:
        raise ConfigError("distillation needs a teacher: slimlm.distill(teacher, student, config, data) or "
                          "slimlm distill --teacher REF")
    _check_float(model, "distillation (the student)")
    device = next(model.parameters()).device
    if cache is not None:
        if config.on_policy or config.loss == "minillm":
            raise ConfigError("a teacher-logit cache scores the data's own tokens: on-policy batches and minillm (the "
                              "student's continuations) need the teacher itself; drop --teacher-cache")
        if config.hidden_weight > 0 or config.attention_weight > 0 or config.embedding_weight > 0:
            raise ConfigError("a teacher-logit cache holds logits only: hidden-state, embedding and attention losses "
                              "need the teacher itself (drop --teacher-cache, or the --*-weight options)")
        vs = model.get_output_embeddings().weight.shape[0]
        if cache["vocab"] != vs and not (cache["vocab"] > vs and ctx.tokenizer is not None and len(ctx.tokenizer) <= vs):
            raise ConfigError(f"the cache's teacher has {cache['vocab']} tokens and the student {vs}; white-box "
                              "distillation needs the same vocabulary")
        teacher = None
        n_t = None
        vocab = vs
    else:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        from ..metrics import lm_kind
        vocab = None if lm_kind(model) == "none" else check_vocabularies(model, teacher, ctx.tokenizer)
        n_t = len(_blocks(teacher))
    n_s = len(_blocks(model))
    need_pairs = config.hidden_weight > 0 or (config.attention_weight > 0 and config.attention_loss == "tinybert")
    try:
        pairs = KD.layer_map(config.layer_map, n_s, n_t) if need_pairs else []
    except ValueError as e:
        raise ConfigError(str(e)) from None
    attn = config.attention_weight > 0
    values = None
    attn_before = [(m, m.config._attn_implementation) for m in (model, teacher) if m is not None]
    if attn:
        heads_s = model.config.get_text_config().num_attention_heads
        heads_t = teacher.config.get_text_config().num_attention_heads
        if heads_s != heads_t:
            raise ConfigError(f"the attention losses compare attention maps head by head: the student has {heads_s} "
                              f"heads, the teacher {heads_t}; use hidden-state losses (--hidden-weight) instead")
        if config.attention_loss == "minilm":
            values = (_Values(_value_proj(model)), _Values(_value_proj(teacher)))
        for m in (model, teacher):
            m.set_attn_implementation("eager")       # the attention probabilities are returned by eager only
    rel_heads = config.relation_heads or model.config.get_text_config().num_attention_heads

    plan = _plan(model, None, {"method": "distill", **asdict(config), "student_layers": n_s, "teacher_layers": n_t,
                               "layer_pairs": pairs})
    w_s = model.config.get_text_config().hidden_size
    w_t = w_s if teacher is None else teacher.config.get_text_config().hidden_size
    projections = nn.ModuleList()
    if config.hidden_weight > 0 and w_s != w_t:
        g = torch.Generator().manual_seed(ctx.seed)
        for _ in pairs:
            lin = nn.Linear(w_s, w_t, bias=False, device=device)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(w_t, w_s, generator=g) / w_s ** 0.5)
            projections.append(lin)
        for i, lin in enumerate(projections):
            plan.params[f"distill.projection.{i}.weight"] = lin.weight
    embed_proj = None
    if config.embedding_weight > 0 and w_s != w_t:                # TinyBERT's W_e
        g = torch.Generator().manual_seed(ctx.seed + 1)
        embed_proj = nn.Linear(w_s, w_t, bias=False, device=device)
        with torch.no_grad():
            embed_proj.weight.copy_(torch.randn(w_t, w_s, generator=g) / w_s ** 0.5)
        projections.append(embed_proj)
        plan.params["distill.projection.embedding.weight"] = embed_proj.weight
    model.__dict__["slimlm_distill_projections"] = projections       # not a submodule: never saved
    divergence = None if config.loss in ("ce", "minillm") else KD.divergence(
        config.loss, temperature=config.temperature, beta=config.beta)
    soft = 0.0 if config.loss == "ce" else config.alpha
    hard = 1.0 if config.loss == "ce" else 1 - config.alpha
    head_s = _head(model)
    head_t = _head(teacher) if teacher is not None else head_s
    coarse = None if divergence is None else KD.divergence(config.loss, beta=config.beta)   # on log-probabilities

    calls = [0]                                       # micro-batches seen: decides and seeds on-policy batches

    def loss(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        i = calls[0]
        calls[0] += 1
        own = config.on_policy and torch.rand((), generator=torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)) \
            < config.on_policy
        if own:
            batch = on_policy_batch(model, batch, config.gen_tokens, config.gen_temperature, ctx.seed * 7919 + i)
        hard_now = 0.0 if own else hard
        labels = batch["labels"]
        keep = labels != -100
        count = keep.sum()
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False,
              "output_hidden_states": bool(pairs and config.hidden_weight > 0) or config.embedding_weight > 0,
              "output_attentions": attn}
        total = torch.zeros((), device=labels.device)
        flat_keep = keep.reshape(-1)
        if "teacher_logprobs" in batch:                   # from the cache: no teacher forward
            if head_s is None:
                raise ConfigError("training from a teacher-logit cache needs a plain output layer in the student")
            h = _base(model)(**kw).last_hidden_state
            h = h.reshape(-1, h.shape[-1])
            if hard_now:
                total = total + hard_now * chunked_linear_cross_entropy(h, head_s.weight, labels.reshape(-1),
                                                                   bias=head_s.bias, reduction="sum")
            if soft:
                k = batch["teacher_logprobs"].shape[-1]
                total = total + soft * config.temperature ** 2 * KD.chunked_topk_divergence(
                    h, head_s.weight[:vocab], batch["teacher_logprobs"].reshape(-1, k),
                    batch["teacher_indices"].reshape(-1, k), flat_keep, coarse,
                    b_student=None if head_s.bias is None else head_s.bias[:vocab], temperature=config.temperature)
            return total, count
        if teacher is None:
            raise ConfigError("this batch carries no cached teacher logits and no teacher was given")
        if config.loss == "minillm":
            ids = batch["input_ids"]
            L = ids.shape[1]
            n = min(config.gen_tokens or L // 2, L - 1)
            seq = mixed_sample(model, teacher, ids[:, :L - n], n, config.mix, ctx.seed * 7919 + i)
            z_s = model(input_ids=seq, use_cache=False).logits[:, L - n - 1:L - 1]
            with torch.no_grad():
                z_t = teacher(input_ids=seq, use_cache=False).logits[:, L - n - 1:L - 1, :vocab]
            per = KD.minillm_surrogate(z_s[..., :vocab], z_t, seq[:, L - n:], config.mix)
            total = total + config.alpha * per.sum() * (count / per.numel())
            if config.alpha < 1:                          # MiniLLM's language-modelling loss on the data
                lm_sum, _ = _lm(model, batch)
                total = total + (1 - config.alpha) * lm_sum
            return total, count
        with torch.no_grad():
            t_out = _base(teacher)(**kw) if head_t is not None and head_s is not None else teacher(**kw)
        s_out = _base(model)(**kw) if head_t is not None and head_s is not None else model(**kw)
        if head_s is not None and head_t is not None:
            h_s = s_out.last_hidden_state.reshape(-1, s_out.last_hidden_state.shape[-1])
            if hard_now:
                total = total + hard_now * chunked_linear_cross_entropy(h_s, head_s.weight, labels.reshape(-1),
                                                                   bias=head_s.bias, reduction="sum")
            if soft:
                h_t = t_out.last_hidden_state.reshape(-1, t_out.last_hidden_state.shape[-1])
                total = total + soft * config.temperature ** 2 * chunked_head_divergence(
                    h_s, head_s.weight, h_t, head_t.weight[:vocab], flat_keep, divergence, b_student=head_s.bias,
                    b_teacher=None if head_t.bias is None else head_t.bias[:vocab])
        else:                                  # soft-capped or adapted heads: the models' own logits
            z_s = s_out.logits.reshape(-1, s_out.logits.shape[-1]).float()
            if hard_now:
                total = total + hard_now * torch.nn.functional.cross_entropy(z_s, labels.reshape(-1), ignore_index=-100,
                                                                        reduction="sum")
            if soft:
                z_t = t_out.logits.reshape(-1, t_out.logits.shape[-1])[:, :vocab].float()
                total = total + soft * config.temperature ** 2 * torch.where(
                    flat_keep, divergence(z_s, z_t), 0.0).sum()
        if config.hidden_weight > 0:
            f = KD.hidden_cosine if config.hidden_loss == "cosine" else KD.hidden_mse
            part = torch.zeros((), device=labels.device)
            for k, (i, j) in enumerate(pairs):
                hs, ht = s_out.hidden_states[i + 1], t_out.hidden_states[j + 1]
                if w_s != w_t:
                    hs = projections[k](hs)
                per = f(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]))
                part = part + torch.where(flat_keep, per, 0.0).sum()
            total = total + config.hidden_weight * part / len(pairs)
        if config.embedding_weight > 0:                   # TinyBERT: hidden_states[0] is the embedding output
            hs, ht = s_out.hidden_states[0], t_out.hidden_states[0]
            if embed_proj is not None:
                hs = embed_proj(hs)
            per = KD.hidden_mse(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]))
            total = total + config.embedding_weight * torch.where(flat_keep, per, 0.0).sum()
        if attn:
            if config.attention_loss == "minilm":
                per = KD.attention_kl(s_out.attentions[-1], t_out.attentions[-1])
                per = per + KD.value_relation_kl(values[0].out, values[1].out, rel_heads)
            else:
                per = sum(KD.attention_score_mse(s_out.attentions[i], t_out.attentions[j]) for i, j in pairs) / len(pairs)
            total = total + config.attention_weight * torch.where(keep, per, 0.0).sum()
        return total, count

    def extra_state() -> dict[str, Tensor]:
        return {"distill.calls": torch.tensor(calls[0])}

    def load_extra(tensors: dict[str, Tensor]) -> None:
        calls[0] = int(tensors["distill.calls"])

    def finish() -> None:
        """Drop what training needed: the value hooks (and the tensors they hold), the projections, eager
        attention."""
        for v in values or ():
            v.handle.remove()
            v.out = None
        model.__dict__.pop("slimlm_distill_projections", None)
        if attn:
            for m, impl in attn_before:
                m.set_attn_implementation(impl)

    from ..metrics import lm_kind
    kind = lm_kind(model)
    if kind != "causal":
        if teacher is None or lm_kind(teacher) != kind:
            raise ConfigError(f"the student is {'a masked LM' if kind == 'masked' else 'a bare encoder'}: the teacher "
                              "must be one too (and not a logit cache)")
        plan.loss = _encoder_loss(model, teacher, config, ctx, kind, pairs, calls, embed_proj)
    else:
        plan.loss = loss
    plan.extra_state, plan.load_extra, plan.finish = extra_state, load_extra, finish
    plan.info["student_kind"] = kind
    return plan


def _encoder_loss(student: nn.Module, teacher: nn.Module, config: DistillConfig, ctx, kind: str, pairs, calls,
                  embed_proj: nn.Module | None):
    """Encoders. Masked LMs: DistilBERT's triple loss on BERT-masked windows, alpha T^2 KL(teacher || student)
    over the masked positions' MLM logits + (1 - alpha) MLM cross-entropy + hidden_weight (1 - cos) of the last
    hidden states over every token. Bare encoders (no head, e.g. sentence-transformers models): the hidden
    states only, 1 - cos (or MSE) of the last layer's states, plus the mapped layers with --hidden-weight.
    Either kind adds TinyBERT's embedding-layer MSE with --embedding-weight.
    Each window is wrapped as [CLS] text [SEP] when the tokenizer has them."""
    tok = ctx.tokenizer
    if kind == "masked" and (tok is None or tok.mask_token_id is None):
        raise ConfigError("distilling a masked LM needs its tokenizer's mask token: pass tokenizer=")
    cls_id = getattr(tok, "cls_token_id", None) if tok is not None else None
    sep_id = getattr(tok, "sep_token_id", None) if tok is not None else None
    vocab = student.get_input_embeddings().weight.shape[0]
    f = KD.hidden_cosine if config.hidden_loss == "cosine" else KD.hidden_mse
    divergence = KD.divergence("forward_kl" if config.loss in ("ce", "minillm") else config.loss,
                               temperature=config.temperature, beta=config.beta)

    def loss(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        i = calls[0]
        calls[0] += 1
        ids = batch["input_ids"].clone()
        if cls_id is not None and sep_id is not None:
            ids[:, 0], ids[:, -1] = cls_id, sep_id
        maskable = torch.ones_like(ids, dtype=torch.bool)
        if cls_id is not None and sep_id is not None:
            maskable[:, 0] = maskable[:, -1] = False
        count = maskable.sum()
        kw = {"attention_mask": torch.ones_like(ids), "output_hidden_states": True}
        total = torch.zeros((), device=ids.device)
        if kind == "masked":
            g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)
            inputs, labels = KD.mlm_mask(ids.cpu(), tok.mask_token_id, vocab, maskable.cpu(), g)
            inputs, labels = inputs.to(ids.device), labels.to(ids.device)
            with torch.no_grad():
                t_out = teacher(input_ids=inputs, **kw)
            s_out = model(input_ids=inputs, **kw)
            m = labels != -100
            z_s, z_t = s_out.logits[m].float(), t_out.logits[m][:, :vocab].float()
            soft = 0.0 if config.loss == "ce" else config.alpha
            if soft:
                total = total + soft * config.temperature ** 2 * divergence(z_s, z_t).sum() * (count / m.sum().clamp(min=1))
            if soft < 1:
                ce = torch.nn.functional.cross_entropy(z_s, labels[m], reduction="sum") * (count / m.sum().clamp(min=1))
                total = total + (1 - soft) * ce
            hs, ht = s_out.hidden_states, t_out.hidden_states
        else:
            with torch.no_grad():
                t_out = _base(teacher)(input_ids=ids, **kw)
            s_out = _base(model)(input_ids=ids, **kw)
            hs, ht = s_out.hidden_states, t_out.hidden_states
            last = f(s_out.last_hidden_state.reshape(-1, hs[-1].shape[-1]),
                     t_out.last_hidden_state.reshape(-1, ht[-1].shape[-1]))
            total = total + torch.where(maskable.reshape(-1), last, 0.0).sum()
        if config.hidden_weight:
            part = sum(torch.where(maskable.reshape(-1), f(hs[a + 1].reshape(-1, hs[a + 1].shape[-1]),
                                                           ht[b + 1].reshape(-1, ht[b + 1].shape[-1])), 0.0).sum()
                       for a, b in pairs) / len(pairs)
            total = total + config.hidden_weight * part
        if config.embedding_weight:                                   # TinyBERT's embedding loss
            e_s = hs[0] if embed_proj is None else embed_proj(hs[0])
            per = KD.hidden_mse(e_s.reshape(-1, e_s.shape[-1]), ht[0].reshape(-1, ht[0].shape[-1]))
            total = total + config.embedding_weight * torch.where(maskable.reshape(-1), per, 0.0).sum()
        return total, count

    return loss
