"""What a training method hands the loop, and the default loss.

A method (registered in the "train" family) prepares the model and returns a TrainPlan: the parameters to
train, the loss of a batch, the tensors a checkpoint must hold, and how to write its result. The loop never
learns method names: LoRA, prompts, full fine-tuning, distillation differ only in their plans.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.losses import chunked_linear_cross_entropy

Batch = dict[str, Tensor]


@dataclass
class TrainPlan:
    """params: the trainable parameters by stable name (the checkpoint's keys).
    loss(model, batch) -> (sum of the loss over the batch's target tokens, their count): the loop divides by
        the count over the whole optimizer step (every micro-batch, every process), so accumulation and data
        parallelism give the mean over the step's tokens exactly.
    save(model, tokenizer, folder): write the method's result into an existing, empty folder.
    extra_state() / load_extra(tensors): tensors a checkpoint holds besides the params and the optimizer (a
        method's scores, step, counters), and how to take them back (a missing key raises KeyError).
    after_step(step): called after each optimizer step (masks, schedules of the method's own).
    finish(): called once after the last step, before saving, with or without an output: turns what training
        needed (masks, hooks) into the final model in memory; returns figures for the report (or None).
    lr_scale: parameter name -> multiplier of the schedule's learning rate (default 1), for parameters that
        train at their own rate (movement pruning's scores).
    info: figures for the report (trainable parameters, ...)."""
    params: dict[str, nn.Parameter]
    save: Callable[[nn.Module, Any, Path], None]
    loss: Callable[[nn.Module, Batch], tuple[Tensor, Tensor]] | None = None
    extra_state: Callable[[], dict[str, Tensor]] | None = None
    load_extra: Callable[[dict[str, Tensor]], None] | None = None
    after_step: Callable[[int], None] | None = None
    finish: Callable[[], dict | None] | None = None
    lr_scale: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {k: p.detach() for k, p in self.params.items()}
        if self.extra_state is not None:
            out.update(self.extra_state())
        return out

    def restore(self, tensors: dict[str, Tensor]) -> None:
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise KeyError(f"the checkpoint lacks {missing[:3]}")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[k])
        if self.load_extra is not None:
            self.load_extra(tensors)


def hidden_states(model: nn.Module, batch: Batch) -> Tensor:
    """The last hidden states (B, L, H) of a causal LM, from its base model (no logits computed)."""
    base = model.base_model if getattr(model, "base_model", None) is not model else model
    out = base(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The output layer when the logits are exactly hidden @ W^T + b (no soft-capping, no scaling)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if type(head) is not nn.Linear or getattr(text, "final_logit_softcapping", None):
        return None
    if getattr(model, "base_model", None) is model:
        return None
    return head


def lm_loss(model: nn.Module, batch: Batch, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy summed over the target tokens (labels != -100), and their count.

    With a plain output layer, the loss runs over chunks of `chunk` positions (core.losses): the (B*L, V)
    logits and their gradient are never held at once (at batch 4 x 512 and SmolLM2's 49,152 tokens they are
    the largest tensors of a step). Otherwise (soft-capped logits, an adapted output layer) the model's own
    forward computes the logits."""
    labels = batch["labels"]
    count = (labels != -100).sum()
    head = _plain_head(model)
    if head is not None:
        h = hidden_states(model, batch)
        loss = chunked_linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, labels.reshape(-1),
                                            bias=head.bias, chunk_size=chunk, reduction="sum")
        return loss, count
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, count
