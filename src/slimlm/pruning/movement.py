"""Movement pruning (Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning") as a method of
the training loop.

Every linear layer of the decoder blocks computes with W' = W * M, M a 0/1 mask. While the model fine-tunes
(all weights train), each weight's score accumulates its movement away from zero,

    S <- S - W * dL/dW'          (the gradient of the masked weight, so a pruned weight can come back)

and after every optimizer step t the mask keeps the highest scores at the sparsity s_t of the cubic schedule
(core.prune.cubic_sparsity: 0 until `prune_start`, the target from `prune_end` on). Variants: hard (each
layer keeps its own top (1 - s_t), or N:M within every M inputs) and soft (one score threshold across all
layers, so layers end at different sparsities). Magnitude pruning would rank |W| instead; movement ranks
what fine-tuning did to the weights. At the end the masks are multiplied in and the model is saved with
slimlm's sparse storage (the pruned weights are exact zeros; model.slimlm_masks records them).

With --scores adam the scores are parameters instead, trained by the loop's optimizer at --score-lr through
the straight-through mask (dL/dS = dL/dW' * W), as Sanh et al.'s implementation trains them: Adam normalises
each score's step, so the ranking is the sign-consistency of the movement rather than the sum dominated by
the largest |W * g|.

Checkpoints hold the scores and the step, so --resume continues with the same masks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..calibration.common import find_blocks, is_linear
from ..core.prune import cubic_sparsity, parse_sparsity, score_masks
from ..errors import ConfigError
from ..registry import register


@dataclass
class MovementConfig:
    sparsity: str = field(default="0.5", metadata={
        "help": "movement: target sparsity, a fraction in [0, 1) or N:M like 2:4"})
    variant: str = field(default="hard", metadata={
        "help": "movement: hard (each layer its own top-k) or soft (one score threshold across layers)"})
    prune_start: float = field(default=0.1, metadata={
        "help": "movement: fraction of the steps before pruning starts (the cubic schedule's start)"})
    prune_end: float = field(default=0.7, metadata={
        "help": "movement: fraction of the steps at which the target sparsity is reached (at most 1)"})
    scores: str = field(default="sum", metadata={
        "help": "movement: sum (S -= W * dL/dW' accumulated) or adam (S a parameter the optimizer trains at "
                "--score-lr through the straight-through mask, as Sanh et al.'s implementation does)"})
    score_lr: float = field(default=1e-2, metadata={"help": "movement: the scores' peak learning rate (adam)"})

    def __post_init__(self) -> None:
        self.spec()
        if self.variant not in ("hard", "soft"):
            raise ConfigError(f"--variant takes hard or soft, not {self.variant!r}")
        if isinstance(self.spec(), tuple) and self.variant == "soft":
            raise ConfigError("N:M movement pruning keeps N of every M inputs in each layer: use --variant hard")
        if not 0 <= self.prune_start < self.prune_end:
            raise ConfigError(f"the schedule needs 0 <= --prune-start < --prune-end (got {self.prune_start}, "
                              f"{self.prune_end})")
        if self.prune_end > 1:
            raise ConfigError(f"--prune-end {self.prune_end} ends the schedule after the last step; use at most 1")
        if self.scores not in ("sum", "adam"):
            raise ConfigError(f"--scores takes sum or adam, not {self.scores!r}")
        if not self.score_lr > 0:
            raise ConfigError(f"--score-lr must be > 0 (got {self.score_lr})")

    def spec(self):
        return parse_sparsity(self.sparsity)


class _Straight(torch.autograd.Function):
    """W' = W * M(S) with M the current top-k mask; straight through to the scores: dL/dS = dL/dW' * W
    (Sanh et al. 2020, eq. 4), dL/dW = dL/dW' * M."""

    @staticmethod
    def forward(ctx, W: Tensor, S: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(W, mask)
        return W * mask

    @staticmethod
    def backward(ctx, g: Tensor):
        W, mask = ctx.saved_tensors
        return g * mask, (g * W).to(torch.float32), None


class _Mask(nn.Module):
    """The parametrization W -> W * mask, recording S -= W * dL/dW' in training (scores="sum"), or with S a
    parameter the optimizer trains through the straight-through mask (scores="adam")."""

    def __init__(self, weight: Tensor, learned: bool = False) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        self.learned = learned
        if learned:
            self.scores = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        else:
            self.scores = torch.zeros_like(weight, dtype=torch.float32)
        self.weight: Tensor | None = None

    def forward(self, W: Tensor) -> Tensor:
        if self.learned:
            return _Straight.apply(W, self.scores, self.mask)
        out = W * self.mask
        if out.requires_grad:
            w = W.detach()

            def accumulate(g: Tensor) -> None:
                self.scores.sub_((w * g).float())
            out.register_hook(accumulate)
        return out


class Movement:
    """The masks of every target layer and their schedule."""

    def __init__(self, model: nn.Module, config: MovementConfig, total: int) -> None:
        self.model, self.config, self.total = model, config, total
        prefix, blocks = find_blocks(model)
        self.layers: dict[str, nn.Module] = {}
        for i, b in enumerate(blocks):
            for n, m in b.named_modules():
                if is_linear(m):
                    self.layers[f"{prefix}.{i}.{n}"] = m
        spec = config.spec()
        if isinstance(spec, tuple):
            bad = next((n for n, m in self.layers.items() if _in_features(m) % spec[1]), None)
            if bad:
                raise ConfigError(f"N:M sparsity {spec[0]}:{spec[1]} needs M to divide every layer's inputs; {bad} has "
                                  f"{_in_features(self.layers[bad])}")
        self.masks: dict[str, _Mask] = {}
        for name, m in self.layers.items():
            p = _Mask(m.weight, learned=config.scores == "adam")
            parametrize.register_parametrization(m, "weight", p)
            self.masks[name] = p
        self.start = round(config.prune_start * total)
        self.end = max(self.start + 1, round(config.prune_end * total))
        self.step = 0

    def sparsity_at(self, step: int):
        spec = self.config.spec()
        if isinstance(spec, tuple):                      # N:M: off until the schedule's end, then on
            return spec if step >= self.end else 0.0
        return cubic_sparsity(step, spec, self.start, self.end)

    def update(self, step: int) -> None:
        self.step = step
        s = self.sparsity_at(step)
        names = list(self.masks)
        if s == 0.0:
            for p in self.masks.values():
                p.mask.fill_(True)
            return
        oriented = [_out_in(self.layers[n], self.masks[n].scores.detach()) for n in names]
        keep = score_masks(oriented, s, "global" if self.config.variant == "soft" else "layer")
        for n, k in zip(names, keep):
            self.masks[n].mask.copy_(_out_in(self.layers[n], k))

    def state(self) -> dict[str, Tensor]:
        """The step, and the accumulated scores (learned scores are trained parameters: the plan saves them)."""
        out = {f"movement.scores.{n}": p.scores for n, p in self.masks.items() if not p.learned}
        out["movement.step"] = torch.tensor(self.step)
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.masks.items():
                if not p.learned:
                    p.scores.copy_(tensors[f"movement.scores.{n}"])
        self.update(int(tensors["movement.step"]))

    def finish(self) -> dict[str, Tensor]:
        """Multiply the masks in, drop the parametrizations; the keep-masks (out, in) by layer."""
        masks = {}
        for n, m in self.layers.items():
            keep = self.masks[n].mask.clone()
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            with torch.no_grad():
                m.weight.masked_fill_(~keep, 0)
            masks[n] = _out_in(m, keep).cpu()
        return masks


def _in_features(m: nn.Module) -> int:
    return m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]


def _out_in(m: nn.Module, t: Tensor) -> Tensor:
    """A (out, in) view of a tensor shaped like the module's weight (GPT-2's Conv1D stores (in, out))."""
    return t if isinstance(m, nn.Linear) else t.t()


@register("train", "movement", MovementConfig, needs_data=True,
          help="movement pruning during full fine-tuning (cubic schedule, hard or soft, N:M); a sparse model")
def prepare_movement(model: nn.Module, config: MovementConfig, ctx) -> object:
    from ..adapt.methods import _check_float, _plan

    _check_float(model, "movement-pruning")
    if ctx.total_steps is None:
        raise ConfigError("movement pruning needs the run's number of steps for its schedule")
    mv = Movement(model, config, ctx.total_steps)
    plan = _plan(model, None, {"method": "movement", **asdict(config), "pruned_layers": len(mv.layers)})
    params = plan.params

    if config.scores == "adam":
        if ctx.lr is None:
            raise ConfigError("movement with learned scores needs the run's learning rate")
        for k in params:
            if k.endswith(".scores"):
                plan.lr_scale[k] = config.score_lr / ctx.lr
        plan.info["score_parameters"] = sum(p.numel() for k, p in params.items() if k.endswith(".scores"))

    def finish() -> None:
        masks = mv.finish()
        model.slimlm_masks = {**(getattr(model, "slimlm_masks", None) or {}), **masks}

    def after_step(step: int) -> None:
        mv.update(step)

    plan.extra_state, plan.load_extra, plan.after_step, plan.finish = mv.state, mv.load, after_step, finish
    plan.info["final_sparsity"] = str(config.sparsity)
    model.__dict__["slimlm_movement"] = mv
    return plan
