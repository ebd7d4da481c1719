"""Unstructured and N:M pruning methods: magnitude, Wanda and SparseGPT (optionally joint with GPTQ).

Glue between the configs (prune/configs.py) and the math (core/prune.py, core/sparsegpt.py):
1. `plan_targets` resolves the target layers (the linear layers of the decoder blocks, filtered by `targets`
   and `ignore`) and the sparsity of each (the schedule), and checks everything (patterns that match nothing,
   N:M with M not dividing a layer's inputs, quantized shapes) before any weight changes;
2. magnitude prunes directly; Wanda and SparseGPT run through the layer-by-layer calibration runner, so each
   block is pruned on the activations of the already-pruned blocks before it (or, with propagate=dense, on
   the dense model's activations, one forward per block instead of two);
3. the keep-masks (bool (out, in), True = kept) are recorded per layer name in `model.slimlm_masks`, so a
   later step (fine-tuning, movement pruning) can hold the pruned weights at zero with `apply_masks(model)`.
   Layers left dense (sparsity 0) get no mask. `slimlm.save_model` then writes slimlm's folder format, which
   stores the sparse weights compactly (slimlm.formats.native), with joint SparseGPT's packed layers.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ..calibration import (
    BlockContext,
    LinearInfo,
    LinearStats,
    RunnerOptions,
    find_blocks,
    is_linear,
    run_layerwise,
)
from ..core.gptq import prepare_hessian
from ..core.prune import global_magnitude_masks, magnitude_mask, wanda_mask
from ..core.sparsegpt import sparsegpt_prune
from ..errors import ConfigError, SlimlmError
from ..registry import register
from .configs import (
    MagnitudeConfig,
    PruneConfig,
    SparseGPTConfig,
    Spec,
    WandaConfig,
    name_matches,
    spec_str,
    split_list,
)

log = logging.getLogger(__name__)

__all__ = ["MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "Target", "plan_targets", "apply_masks"]


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class Target:
    """One layer to prune: where it is, and how sparse it becomes."""
    name: str
    info: LinearInfo
    block: int
    spec: Spec

    @property
    def numel(self) -> int:
        return self.info.in_features * self.info.out_features


def _block_linears(model: nn.Module) -> tuple[list[tuple[str, nn.Module, int]], int]:
    """(qualified name, module, block index) of every linear layer in the decoder blocks, and the block count."""
    try:
        prefix, blocks = find_blocks(model)
    except ValueError as e:
        raise SlimlmError(f"cannot prune {type(model).__name__}: {e}") from None
    head = f"{prefix}." if prefix else ""
    found = [(f"{head}{i}.{n}", m, i) for i, b in enumerate(blocks) for n, m in b.named_modules() if is_linear(m)]
    return found, len(blocks)


def plan_targets(model: nn.Module, config: PruneConfig) -> dict[str, Target]:
    """The target layers with their sparsity, in model order; raises ConfigError before any work when a
    pattern matches nothing or a layer cannot take its sparsity."""
    layers, n_blocks = _block_linears(model)
    names = [n for n, _, _ in layers]
    like = f"layer names look like {names[0]}" if names else "the decoder blocks hold no linear layer"
    for p in split_list(config.targets):
        if not any(name_matches(n, p) for n in names):
            raise ConfigError(f"targets pattern {p!r} matches no linear layer of the decoder blocks; {like}")
    modules = [n for n, _ in model.named_modules()]
    ignore = split_list(config.ignore)
    for p in ignore:
        if not any(name_matches(n, p) for n in modules):
            raise ConfigError(f"ignore pattern {p!r} matches no module of the model; {like}")
    targets = split_list(config.targets)
    chosen = [(n, m, i) for n, m, i in layers
              if any(name_matches(n, p) for p in targets) and not any(name_matches(n, p) for p in ignore)]
    if not chosen:
        raise ConfigError(f"no layer left to prune: targets={config.targets!r} minus ignore={config.ignore!r} "
                          f"selects nothing; {like}")
    schedule, default = config.schedule(), config.spec()
    for pattern, _ in schedule.rules:
        if not any(name_matches(n, pattern) for n, _, _ in chosen):
            raise ConfigError(f"layer_sparsity pattern {pattern!r} matches none of the target layers; {like}")
    plan = {}
    for name, module, i in chosen:
        t = Target(name, LinearInfo(name, module), i, schedule.spec_for(name, i, n_blocks, default))
        if isinstance(t.spec, tuple) and t.info.in_features % t.spec[1]:
            leaf = name.rsplit(".", 1)[-1]
            raise ConfigError(f"{spec_str(t.spec)} sparsity needs M={t.spec[1]} to divide the input size of every "
                              f"target layer, but {name} has {t.info.in_features} inputs; choose an M dividing "
                              f"it, or leave the layer dense with ignore={leaf} (or layer_sparsity '{leaf}=0')")
        plan[name] = t
    return plan


def _check_quantizable(plan: dict[str, Target], config: SparseGPTConfig) -> None:
    """Every target must fit a QuantLinear of the asked bits and group size (checked on the meta device)."""
    from ..quant.linear import QuantLinear

    for t in plan.values():
        try:
            QuantLinear.empty(t.info.in_features, t.info.out_features, config.bits, config.group_size,
                              config.symmetric, False)
        except ConfigError as e:
            leaf = t.name.rsplit(".", 1)[-1]
            raise ConfigError(f"cannot quantize {t.name} ({t.info.in_features} inputs, {t.info.out_features} "
                              f"outputs): {e} (or leave it dense and unquantized with ignore={leaf})") from None


def _windows(data: Tensor | None, method: str) -> Tensor:
    if data is None:
        raise SlimlmError(f"{method} needs calibration data: pass data=slimlm.calibration_data(tokenizer, ...) "
                          "(CLI: --data SOURCE)")
    if not isinstance(data, Tensor) or data.dim() != 2 or data.is_floating_point() or data.numel() == 0:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise SlimlmError(f"{method} takes calibration data as token ids (windows, seqlen), got {shape}")
    return data


# ------------------------------------------------------------------------------------------------ results
def apply_masks(model: nn.Module) -> None:
    """Zero the pruned weights again from `model.slimlm_masks` (e.g. after an optimizer step)."""
    modules = dict(model.named_modules())
    for name, mask in (getattr(model, "slimlm_masks", None) or {}).items():
        m = modules.get(name)
        if m is None or not is_linear(m):   # a QuantLinear keeps its zeros in its codes
            continue
        keep = mask if isinstance(m, nn.Linear) else mask.t()   # Conv1D stores W as (in, out)
        m.weight.data.masked_fill_(~keep.to(m.weight.device), 0)


def _report(method: str, config: PruneConfig, plan: dict[str, Target], masks: dict[str, Tensor],
            **extra) -> dict:
    pruned = {n: int((~m).sum()) for n, m in masks.items()}
    total = sum(t.numel for t in plan.values())
    per_block: dict[int, list[int]] = {}
    for t in plan.values():
        acc = per_block.setdefault(t.block, [0, 0])
        acc[0] += pruned.get(t.name, 0)
        acc[1] += t.numel
    return {"method": method, "requested": config.describe(), "sparsity": round(sum(pruned.values()) / total, 4),
            "pruned_weights": sum(pruned.values()), "target_weights": total, "layers": len(plan),
            "block_sparsity": [round(p / n, 4) for _, (p, n) in sorted(per_block.items())], **extra}


def _finish(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Record the masks on the model (apply_masks re-applies them after an optimizer step)."""
    model.slimlm_masks = {**(getattr(model, "slimlm_masks", None) or {}), **masks}


# ------------------------------------------------------------------------------------------------ magnitude
@register("prune", "magnitude", MagnitudeConfig, needs_data=False,
          help="remove the weights of smallest |w|, per layer or globally; no data")
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, data: Tensor | None = None,
                    runner: RunnerOptions | None = None) -> dict:
    """Magnitude pruning: per layer (fraction over the tensor, or N:M) or one global |w| threshold."""
    plan = plan_targets(model, config)
    todo = [t for t in plan.values() if t.spec != 0]
    if config.scope == "global":
        found = global_magnitude_masks([t.info.weight() for t in todo], config.spec()) if todo else []
        masks = {t.name: m for t, m in zip(todo, found, strict=True)}
    else:
        masks = {t.name: magnitude_mask(t.info.weight(), t.spec) for t in todo}
    for t in todo:
        t.info.set_weight(t.info.weight().masked_fill(~masks[t.name], 0))
    masks = {n: m.cpu() for n, m in masks.items()}
    _finish(model, masks)
    return _report("magnitude", config, plan, masks, scope=config.scope)


# ------------------------------------------------------------------------------------------------ calibrated
LayerFn = Callable[[BlockContext, LinearInfo, LinearStats, Spec], "Tensor | None"]


class LayerPruner:
    """A calibration-runner Processor calling `fn(ctx, info, stats, spec) -> keep-mask or None` on each target
    layer of each group; collects the masks on the CPU, eight to a byte while the run lasts (a bool per weight
    of every layer pruned so far held about 100 MB at SmolLM2's last blocks, beside the runner's stashes)."""

    def __init__(self, plan: dict[str, Target], fn: LayerFn, needs: frozenset, sequential: bool) -> None:
        self.plan, self.fn = plan, fn
        self.needs, self.sequential = frozenset(needs), sequential
        self.packed: dict[str, tuple[Tensor, int]] = {}   # name -> (pack_bits(mask), columns)
        self.done: set[str] = set()

    @property
    def masks(self) -> dict[str, Tensor]:
        """The keep-masks, bool (out, in)."""
        from .storage import unpack_bits
        return {n: unpack_bits(p, cols) for n, (p, cols) in self.packed.items()}

    def process(self, ctx: BlockContext, group: list[tuple[LinearInfo, LinearStats]]) -> None:
        for info, stats in group:
            target = self.plan.get(info.name)
            if target is None:
                continue
            mask = self.fn(ctx, info, stats, target.spec)
            self.done.add(info.name)
            if mask is not None:
                from .storage import pack_bits
                self.packed[info.name] = (pack_bits(mask.cpu()), mask.shape[-1])


def _run(model: nn.Module, data: Tensor | None, plan: dict[str, Target], fn: LayerFn, needs: set[str],
         sequential: bool, runner: RunnerOptions | None, method: str,
         propagate: str = "compressed") -> tuple[dict[str, Tensor], dict]:
    proc = LayerPruner(plan, fn, frozenset(needs), sequential)
    runner = runner or RunnerOptions()
    # "compressed" is both sides' default: a "dense" asked on either the config or the runner holds
    propagate = "dense" if "dense" in (propagate, runner.propagate) else "compressed"
    runner = dataclasses.replace(runner, propagate=propagate)
    staged = run_layerwise(model, _windows(data, method), proc, runner)
    missed = [n for n in plan if n not in proc.done]
    if missed:
        log.warning("%d target layers never ran in a forward pass and were left dense: %s", len(missed),
                    ", ".join(missed[:5]))
    return proc.masks, ({"never_called": missed} if missed else {}) | {
        "propagate": propagate, "true_sequential": sequential, "staged_blocks": staged}


def _wanda_layer(ctx: BlockContext, info: LinearInfo, stats: LinearStats, spec: Spec) -> Tensor | None:
    if spec == 0:
        return None
    W = info.weight()                                     # (out, in)
    mask = wanda_mask(W, stats.sq_sum, spec)              # |W_ij| * ||X_j||, per output row or N:M
    info.set_weight(W.masked_fill(~mask, 0))
    return mask


@register("prune", "wanda", WandaConfig, needs_data=True,
          help="remove the smallest |w| * ||x|| per output row (Wanda); needs data")
def apply_wanda(model: nn.Module, config: WandaConfig, data: Tensor | None,
                runner: RunnerOptions | None = None) -> dict:
    """Wanda: one pass per block collects sum_t x_t^2 of every linear's input, then prunes the block."""
    plan = plan_targets(model, config)
    masks, extra = _run(model, data, plan, _wanda_layer, {"sq_sum"}, False, runner, "wanda", config.propagate)
    _finish(model, masks)
    return _report("wanda", config, plan, masks, **extra)


def _sparsegpt_layer(config: SparseGPTConfig) -> LayerFn:
    quant = config.quant()
    last: list = [None, None]   # (stats, its factorisation): layers sharing an input share one

    def fn(ctx: BlockContext, info: LinearInfo, stats: LinearStats, spec: Spec) -> Tensor | None:
        if spec == 0 and quant is None:
            return None
        n, m = spec if isinstance(spec, tuple) else (0, 0)
        if last[0] is not stats:
            last[:] = [stats, prepare_hessian(stats.hessian, config.damp)]
        res = sparsegpt_prune(info.weight(), stats.hessian, sparsity=None if n else spec, prune_n=n,
                              prune_m=m, block_size=config.block_size, damp=config.damp, quant=quant,
                              prep=last[1])
        if quant is None:
            info.set_weight(res.weight)
        else:
            from ..quant.linear import QuantLinear
            bias = getattr(info.module, "bias", None)
            layer = QuantLinear.from_result(res.quant, None if bias is None else bias.detach(), method="sparsegpt")
            ctx.block.set_submodule(info.name[len(ctx.prefix) + 1:], layer)
        return res.mask if spec != 0 else None
    return fn


@register("prune", "sparsegpt", SparseGPTConfig, needs_data=True,
          help="OBS pruning with reconstruction of the kept weights (SparseGPT), optionally joint with GPTQ; "
               "needs data")
def apply_sparsegpt(model: nn.Module, config: SparseGPTConfig, data: Tensor | None,
                    runner: RunnerOptions | None = None) -> dict:
    """SparseGPT: one statistics pass per block (as llm-compressor), or with true_sequential each group of
    linears pruned on the inputs produced by the groups already pruned (and quantized, with bits)."""
    plan = plan_targets(model, config)
    if config.bits is not None:
        _check_quantizable(plan, config)
    masks, extra = _run(model, data, plan, _sparsegpt_layer(config), {"hessian"}, config.true_sequential,
                        runner, "sparsegpt", config.propagate)
    _finish(model, masks)
    if config.bits is not None:
        extra.update(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)
    return _report("sparsegpt", config, plan, masks, **extra)
