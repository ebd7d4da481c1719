"""TrainConfig: the settings of the one training loop, shared by every training method (a method's own
settings live in its own config: LoRAConfig, ...). Every field documents itself; the CLI's `slimlm train`
turns each into an option."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    steps: int | None = field(default=None, metadata={
        "help": "optimizer steps to run (give this or tokens; default 200 when neither is given)"})
    tokens: int | None = field(default=None, metadata={
        "help": "training tokens to run instead of steps: steps = ceil(tokens / (batch_size * seqlen * grad_accum "
                "* processes))"})
    seqlen: int = field(default=512, metadata={"help": "tokens per training window / example"})
    batch_size: int = field(default=4, metadata={"help": "windows per micro-batch in each process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    schedule: str = field(default="cosine", metadata={
        "help": "after the warmup: cosine or linear decay to min_lr_ratio * lr, or constant"})
    warmup: float = field(default=0.1, metadata={
        "help": "linear warmup: a fraction of the steps (< 1) or a number of steps (>= 1)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "the learning rate at the end, as a fraction of lr"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw; adamw8bit (block-wise 8-bit moments, bitsandbytes); sgd (momentum, no second moment)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (AdamW), L2 for sgd; "
                                                       "never on biases and norms"})
    momentum: float = field(default=0.9, metadata={"help": "sgd's momentum"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradients' global norm to this (0: off)"})
    seed: int = field(default=0, metadata={"help": "seeds the data order, initialisation and dropout"})
    save_every: int = field(default=0, metadata={
        "help": "write a checkpoint every N steps (0: only when interrupted); --resume continues from the last"})
    eval_every: int = field(default=0, metadata={
        "help": "perplexity on the evaluation data every N steps (0: before and after only)"})
    eval_windows: int = field(default=8, metadata={"help": "evaluation windows of seqlen tokens"})
    checkpointing: bool = field(default=False, metadata={
        "help": "activation checkpointing: keep each decoder layer's input only and recompute the rest in the "
                "backward pass (less memory, about a third more time)"})
    release_memory: bool = field(default=False, metadata={
        "help": "CPU: return each freed activation to the system at once (a fixed glibc mmap threshold) instead "
                "of keeping it in a heap that fragments: about half the peak memory, slower steps (every large "
                "allocation is fresh pages; see bench/RESULTS.md for the measured cost)"})
    loss_chunk: int = field(default=1024, metadata={
        "help": "positions per chunk of the output layer's cross-entropy (the full logits are never held)"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast (default: on a GPU that multiplies bf16 natively, off on a CPU)"})

    def __post_init__(self) -> None:
        if self.steps is not None and self.tokens is not None:
            raise ConfigError("give either --steps or --tokens, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be at least 1 (got {self.steps})")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(f"--tokens must be at least 1 (got {self.tokens})")
        for name in ("seqlen", "batch_size", "grad_accum", "eval_windows", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number (got {self.lr})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be 0 or more (got {self.warmup})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("--weight-decay and --max-grad-norm must be 0 or more")
        if self.save_every < 0 or self.eval_every < 0:
            raise ConfigError("--save-every and --eval-every must be 0 or more")

    def total_steps(self, world: int = 1) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seqlen * self.grad_accum * world)))
        return self.steps if self.steps is not None else 200

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup * total) if self.warmup < 1 else min(int(self.warmup), total)
