"""Globally Unique Movement (GUM; Santacroce, Wen, Shen & Li 2023, "What Matters In The Structured Pruning of
Generative Language Models?") as a method of the training loop: whole MLP neurons removed during fine-tuning,
chosen by movement sensitivity and uniqueness.

Every MLP neuron j of every decoder layer gets a 0/1 mask m_j on its activation h_j (the input of the down
projection: act(gate) * up), so the layer computes down(h * m). While the whole model fine-tunes:

- sensitivity: the neuron's movement score accumulates S_j <- S_j - dL/dm_j (straight-through: the mask
  is 0/1 forward, its gradient sum_t h_tj * dL/dh'_tj flows to the score), the block movement of Lagunas et
  al. 2021 with one neuron as the block; a masked neuron still gets a gradient, so it can come back;
- uniqueness: the loss gains lambda * mean over layers of the kept neurons' mean cosine similarity between a
  neuron's activations and the sum of the other kept neurons' (core.structured.uniqueness_penalty); its
  gradient pushes kept neurons apart and, through the straight-through mask, lowers the scores of neurons
  that the others already reproduce, so redundant neurons go first;
- global Top-v: after each optimizer step the cubic schedule (core.prune.cubic_sparsity) gives the fraction of
  all MLP neurons to mask, and the lowest scores across every layer are masked (`selection=global`; layers
  end with different widths, at least `min_keep` of each layer kept), or the same fraction in every layer
  (`selection=layer`, a uniform model transformers loads as it is).

`uniqueness=0, selection=layer` is plain structured movement pruning of MLP neurons, the ablation GUM is
measured against. At the end the masked neurons are removed physically (rows of gate/up, columns of down),
as `slimlm prune --method structured` removes channels, and the model is saved: smaller, dense, and loaded
by slimlm.load_model (non-uniform widths are recorded in config.json as structured pruning records them).
Checkpoints hold the scores and the step, so --resume continues with the same masks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..core import structured as S
from ..core.prune import cubic_sparsity
from ..errors import ConfigError, SlimlmError
from ..registry import register


@dataclass
class GumConfig:
    ratio: float = field(default=0.2, metadata={
        "help": "gum: fraction of all MLP neurons removed, in [0, 1)"})
    uniqueness: float = field(default=1.0, metadata={
        "help": "gum: weight of the uniqueness (cosine-similarity) regularizer; 0 = plain neuron movement"})
    selection: str = field(default="global", metadata={
        "help": "gum: global (lowest scores across all layers: GUM's global Top-v) or layer (same fraction per layer)"})
    min_keep: float = field(default=0.1, metadata={
        "help": "gum: with global selection, the fraction of each layer's neurons always kept"})
    prune_start: float = field(default=0.1, metadata={
        "help": "gum: fraction of the steps before pruning starts (the cubic schedule's start)"})
    prune_end: float = field(default=0.7, metadata={
        "help": "gum: fraction of the steps at which the target is reached (at most 1)"})

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"--ratio is the fraction of MLP neurons to remove, in [0, 1); got {self.ratio}")
        if self.uniqueness < 0:
            raise ConfigError(f"--uniqueness is a weight >= 0 (0 turns the regularizer off); got {self.uniqueness}")
        if self.selection not in ("global", "layer"):
            raise ConfigError(f"--selection takes global or layer, not {self.selection!r}")
        if not 0 < self.min_keep <= 1 - self.ratio:
            raise ConfigError(f"--min-keep must be in (0, 1 - ratio] = (0, {1 - self.ratio:g}]; got {self.min_keep}")
        if not 0 <= self.prune_start < self.prune_end:
            raise ConfigError(f"the schedule needs 0 <= --prune-start < --prune-end (got {self.prune_start}, "
                              f"{self.prune_end})")
        if self.prune_end > 1:
            raise ConfigError(f"--prune-end {self.prune_end} ends the schedule after the last step; use at most 1")


class NeuronMasks:
    """The neuron masks of every decoder layer's MLP, their scores, the regularizer terms of the last forward
    and the schedule."""

    def __init__(self, model: nn.Module, config: GumConfig, total: int) -> None:
        from .structured import find_layers, find_parts, model_dims

        self.model, self.config = model, config
        try:
            self.dims = model_dims(model)
            self.layers = find_layers(model)
            self.parts = find_parts(model, self.layers, self.dims)
        except (SlimlmError, ValueError) as e:
            raise ConfigError(f"GUM removes MLP neurons as structured pruning does: {e}") from None
        if getattr(model.config, "slimlm_structured", None):
            raise ConfigError("GUM needs every layer at the model's full MLP width; prune the original model")
        n = self.dims.inter
        self.scores = [torch.zeros(n) for _ in self.parts]
        self.masks = [torch.ones(n, dtype=torch.bool) for _ in self.parts]
        self.penalties: list[Tensor] = []
        self.start = round(config.prune_start * total)
        self.end = max(self.start + 1, round(config.prune_end * total))
        self.step = 0
        self.hooks = [getattr(p.mlp, p.mlp_out).register_forward_pre_hook(self._hook(i))
                      for i, p in enumerate(self.parts)]

    def _hook(self, i: int):
        def pre(module: nn.Module, args: tuple):
            x = args[0]
            if not (torch.is_grad_enabled() and module.training):
                return (x * self.masks[i].to(device=x.device, dtype=x.dtype), *args[1:])
            m = self.masks[i].to(device=x.device, dtype=x.dtype).requires_grad_(True)         # a leaf: dL/dm_j feeds the score

            def accumulate(g: Tensor) -> None:
                self.scores[i].sub_(g.detach().float().cpu())
            m.register_hook(accumulate)
            if self.config.uniqueness:
                self.penalties.append(S.uniqueness_penalty(x.reshape(-1, x.shape[-1]), m))
            return (x * m, *args[1:])
        return pre

    def neurons_removed(self, step: int) -> int:
        frac = cubic_sparsity(step, self.config.ratio, self.start, self.end)
        return round(frac * self.dims.inter * len(self.parts))

    def update(self, step: int) -> None:
        self.step = step
        n = self.neurons_removed(step)
        if self.config.selection == "global":
            floor = max(1, round(self.config.min_keep * self.dims.inter))
            counts = S.remove_global(self.scores, n, min_keep=floor)
        else:
            counts = [round(n / len(self.parts))] * len(self.parts)
        for mask, score, c in zip(self.masks, self.scores, counts):
            mask.fill_(False)
            mask[S.keep_top(score, c)] = True

    def state(self) -> dict[str, Tensor]:
        out = {f"gum.scores.{i}": s for i, s in enumerate(self.scores)}
        out["gum.step"] = torch.tensor(self.step)
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        for i, s in enumerate(self.scores):
            s.copy_(tensors[f"gum.scores.{i}"])
        self.update(int(tensors["gum.step"]))

    def finish(self) -> dict:
        """Remove the hooks and the masked neurons (physically); the per-layer widths kept."""
        from .structured import Selection, apply_selection

        for h in self.hooks:
            h.remove()
        kept = [torch.nonzero(m).flatten() for m in self.masks]
        n = len(self.parts)
        sel = Selection(list(range(n)), [torch.arange(self.dims.kv_heads)] * n, kept)
        apply_selection(self.model, sel)
        return {"intermediate_per_layer": [len(k) for k in kept]}


@register("train", "gum", GumConfig, needs_data=True,
          help="GUM: MLP neurons removed during full fine-tuning by movement and uniqueness (global Top-v)")
def prepare_gum(model: nn.Module, config: GumConfig, ctx) -> object:
    from ..adapt.methods import _check_float, _plan
    from ..training.plan import lm_loss

    _check_float(model, "GUM")
    if ctx.total_steps is None:
        raise ConfigError("GUM needs the run's number of steps for its schedule")
    nm = NeuronMasks(model, config, ctx.total_steps)
    plan = _plan(model, None, {"method": "gum", **asdict(config), "layers": len(nm.parts)})
    keep_zeros = plan.after_step

    def loss(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        nm.penalties.clear()
        total, count = lm_loss(model, batch)
        if nm.penalties:
            reg = torch.stack(nm.penalties).mean()
            nm.penalties.clear()
            total = total + config.uniqueness * reg * count
        return total, count


    def after_step(step: int) -> None:
        if keep_zeros is not None:
            keep_zeros(step)
        nm.update(step)

    plan.loss, plan.extra_state, plan.load_extra, plan.after_step, plan.finish = loss, nm.state, nm.load, after_step, nm.finish
    model.__dict__["slimlm_gum"] = nm
    return plan
