"""AWQ (Lin et al. 2023) through the calibration runner: per-input-channel scales, weight clipping, rounding.

For each group of layers sharing an input x (q/k/v; o; gate/up; down):
1. s = a^alpha with a = mean |x| per channel, and (duo_scaling, default) also s = a^alpha / (m^(1-alpha) + 1e-4)
   with m the mean share of its group's range that each input channel's weights use; (rms_scales, off by
   default) the same again with a = sqrt(E[x^2]) per channel; alpha from a grid on [0, 1) (n_grid points per
   family: 4 x n_grid with both options) minimising the group's output
   error sum_l ||X W_l^T - (X / s) Q(W_l diag(s))^T||^2 over every calibration token (Q: min-max grids with
   clip_refit's least-squares step sizes under refit_in_search, the default; plain min-max rounding without
   it and under search_loss=module; kv_weight: k/v terms counted once per query head they serve; through E[x x^T];
   with skip_positions = k, over all but the first k positions of each window);
2. 1/s goes where it costs nothing at run time, found generically by probing the block in fp32:
   - the norm whose output IS x (a forward hook compares tensor identity): weight / s (LayerNorm bias too),
     or ((1 + weight) / s - 1) for norms computing x_hat * (1 + weight) (Gemma);
   - else a linear layer earlier in the block with out_features == in_features of the group whose output
     rows can absorb it (up_proj -> down_proj, v_proj -> o_proj with as many key/value heads as heads,
     fc1 -> ReLU -> fc2);
   - else the layers get an explicit input scale (ScaledQuantLinear: x / s at run time).
   A candidate is accepted only if folding random scales into it, and their inverse into the group's
   weights, leaves the block's output unchanged (relative error below 1e-3 in fp32): this catches
   non-linear activations, norms feeding other layers too, and norm variants;
3. per group of weights, the clipping range minimising the output error (core.awq.awq_range_search: the
   reference's symmetric clamp or the group's [min, max] shrunk on both sides, whichever is better; then,
   with clip_refine (default), each end moved on its own where that lowers the error; then, with clip_refit
   (default 3 rounds, with zero-point moves), least-squares step sizes for the codes), then
   round-to-nearest of W diag(s) on that grid; layers matching `clip_skip` are rounded on their whole
   min-max range instead.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimlm.calibration import (
    BlockContext,
    LinearInfo,
    LinearStats,
    RunnerOptions,
    StopForward,
    call_of,
    is_linear,
    run_layerwise,
)
from slimlm.core.awq import (
    awq_grid_search,
    awq_range_search,
    quantize_clipped,
    scaled_fake_quantize,
    weight_channel_mean,
)
from slimlm.core.quant import QuantResult
from slimlm.quant.configs import AWQConfig
from slimlm.quant.targets import (
    Target,
    check_matches,
    fallback_count,
    plan_targets,
    quantize_rest,
    report,
    swap_in,
)
from slimlm.registry import register
from slimlm.selection import name_matches, split_list

log = logging.getLogger(__name__)

_NORM_FORMULAS = ("w", "1+w")


@dataclass(frozen=True)
class Fold:
    """Where a group's 1/s goes: "norm" (`target`, `formula`), "linear" (`target`) or "explicit"."""
    kind: str
    target: str = ""          # name of the norm / producing linear relative to the block
    formula: str = ""         # norms: "w" (y = x_hat * w) or "1+w" (y = x_hat * (1 + w))


# ---------------------------------------------------------------------------------------------- folding
def fold_into_norm(norm: nn.Module, s: Tensor, formula: str) -> None:
    """Make the norm's output x / s: divide its affine weight (and bias) by s (in,)."""
    w = norm.weight.data
    if formula == "w":
        w.copy_((w.float() / s).to(w.dtype))
    else:
        w.copy_(((1 + w.float()) / s - 1).to(w.dtype))
    b = getattr(norm, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data.copy_((b.data.float() / s).to(b.dtype))


def _scale_rows(info: LinearInfo, s: Tensor) -> None:
    info.set_weight(info.weight() / s[:, None])
    b = getattr(info.module, "bias", None)
    if b is not None:
        b.data.copy_((b.data.float() / s).to(b.dtype))


def _one_window(ctx: BlockContext) -> tuple[Tensor, tuple, dict]:
    """The first calibration window of the block's inputs (batch dimension cut to 1 in every argument)."""
    x = ctx.inputs[0]
    B = x.shape[0]

    def cut(v):
        if isinstance(v, Tensor):
            return v[:1] if B > 1 and v.dim() > 0 and v.shape[0] == B else v
        if isinstance(v, (tuple, list)):
            return type(v)(cut(a) for a in v)
        if isinstance(v, dict):
            return {k: cut(a) for k, a in v.items()}
        return v
    return x[:1], cut(ctx.args[0]), cut(ctx.kwargs[0])


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run(block: nn.Module, window) -> Tensor:
    x, args, kwargs = window
    return _first(block(x, *args, **kwargs))


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (not is_linear(m) and isinstance(w, nn.Parameter) and w.dim() == 1
            and next(m.children(), None) is None)


def _observe(block: nn.Module, window) -> tuple[dict[str, Tensor], list[tuple[str, Tensor]], list[str]]:
    """One forward: each linear's first input, every norm-like output, and the linears' execution order."""
    inputs: dict[str, Tensor] = {}
    norm_outs: list[tuple[str, Tensor]] = []
    hooks = []
    for name, m in block.named_modules():
        if is_linear(m):
            def pre(mod, args, _n=name):
                inputs.setdefault(_n, args[0])
            hooks.append(m.register_forward_pre_hook(pre))
        elif _is_norm(m):
            def post(mod, args, out, _n=name):
                norm_outs.append((_n, out))
            hooks.append(m.register_forward_hook(post))
    try:
        _run(block, window)
    finally:
        for h in hooks:
            h.remove()
    return inputs, norm_outs, list(inputs)


def _judging_module(ctx: BlockContext, rel: tuple[str, ...]) -> str | None:
    """The members' common parent module ("" = the block), or None when its output is one member's own output
    (seen on one window)."""
    parts = [r.split(".")[:-1] for r in rel]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    where = ".".join(common)
    module = ctx.block.get_submodule(where) if where else ctx.block
    outs: list[Tensor] = []
    seen: dict[str, Tensor] = {}
    hooks = [ctx.block.get_submodule(r).register_forward_hook(
        lambda _m, _a, out: outs.append(out)) for r in rel]

    def after(_m, _a, out):
        seen["y"] = _first(out)
        raise StopForward
    hooks.append(module.register_forward_hook(after))
    try:
        with torch.no_grad(), ctx.autocast():
            _run(ctx.block, _one_window(ctx))
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    if "y" not in seen or any(seen["y"] is o for o in outs):
        return None
    return where


def _module_calls(ctx: BlockContext, module: nn.Module, windows: int) -> list[tuple[tuple, dict]]:
    """The arguments `module` receives on the first batches of the block's inputs (at least `windows` windows,
    whole batches)."""
    calls: list[tuple[tuple, dict]] = []
    got = 0
    for b in range(len(ctx.inputs)):
        if got >= windows:
            break
        if module is ctx.block:
            calls.append(((ctx.inputs[b], *ctx.args[b]), dict(ctx.kwargs[b])))
        else:
            calls.append(call_of(ctx, lambda b=b: ctx.forward(batches=[b]), module))
        got += ctx.inputs[b].shape[0]
    return calls


class FoldFinder:
    """Finds (and caches per block class and layer names) where each group's input scale can go."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Fold] = {}
        self._gen = torch.Generator().manual_seed(0)

    def __call__(self, ctx: BlockContext, names: tuple[str, ...]) -> Fold:
        key = (type(ctx.block).__name__, names)
        if key not in self._cache:
            self._cache[key] = self._find(ctx, names)
            log.info("AWQ: input of %s -> %s", ", ".join(names), self._cache[key])
        return self._cache[key]

    def _find(self, ctx: BlockContext, names: tuple[str, ...]) -> Fold:
        block, window = ctx.block, _one_window(ctx)
        with torch.no_grad():
            inputs, norm_outs, order = _observe(block, window)
            x = inputs.get(names[0])
            if x is None:
                return Fold("explicit")
            in_f = LinearInfo("", block.get_submodule(names[0])).in_features
            cands = [Fold("norm", n, f) for n, out in norm_outs if out is x for f in _NORM_FORMULAS]
            before = order[:order.index(names[0])]
            cands += [Fold("linear", n) for n in reversed(before)
                      if n not in names and LinearInfo("", block.get_submodule(n)).out_features == in_f]
            if not cands:
                return Fold("explicit")
            y0 = _run(block, window)
            for fold in cands:
                if self._exact(block, window, names, fold, y0, in_f):
                    return fold
        return Fold("explicit")

    def _exact(self, block: nn.Module, window, names: tuple[str, ...], fold: Fold, y0: Tensor,
               in_f: int) -> bool:
        """Fold random scales r and multiply the group's weights by r: is the block's output unchanged?"""
        r = 0.5 + 1.5 * torch.rand(in_f, generator=self._gen)
        src = block.get_submodule(fold.target)
        touched = [src] + [block.get_submodule(n) for n in names]
        saved = [(p, p.data.clone()) for m in touched for p in m.parameters(recurse=False)]
        try:
            if fold.kind == "norm":
                fold_into_norm(src, r.to(src.weight.device), fold.formula)
            else:
                _scale_rows(LinearInfo(fold.target, src), r)
            for n in names:
                info = LinearInfo(n, block.get_submodule(n))
                info.set_weight(info.weight() * r)
            y1 = _run(block, window)
        finally:
            for p, data in saved:
                p.data.copy_(data)
        tol = 1e-3 if y0.dtype == torch.float32 else 3e-2
        ref = (y0 - window[0]).float().norm().clamp(min=1e-12)
        return bool(torch.isfinite(y1).all()) and float((y1 - y0).float().norm() / ref) < tol


# ---------------------------------------------------------------------------------------------- processor
class AWQProcessor:
    """The calibration runner's view of AWQ (see the module docstring)."""
    needs = frozenset({"abs_sum", "hessian"})
    reads_inputs = True   # the search reads the block's inputs (ctx.inputs), so propagate="dense" is refused

    def __init__(self, config: AWQConfig, plan: dict[str, Target]) -> None:
        self.config, self.plan = config, plan
        self.sequential = config.true_sequential
        self.results: dict[str, QuantResult] = {}
        self.input_scales: dict[str, Tensor] = {}
        self.folds = FoldFinder()
        self.counts: Counter = Counter()
        self._modules: dict[tuple, str | None] = {}   # search_loss=module: the module judging each group

    def process(self, ctx: BlockContext, group: list[tuple[LinearInfo, LinearStats]]) -> None:
        infos = [info for info, _ in group]
        targets = [self.plan[i.name] for i in infos if i.name in self.plan]
        st = group[0][1]
        if not targets or st.hessian is None or st.nsamples == 0:
            return
        gram = st.hessian / 2                          # E[x x^T] over every calibration token (in, in)
        act_mean = st.abs_sum / st.nsamples
        module_loss = self._module_loss(ctx, infos, targets) if self.config.search_loss == "module" else None
        if module_loss is None:
            s = self.search_scale(targets, gram, act_mean)
        else:
            loss, restore = module_loss
            try:
                s = self.search_scale(targets, gram, act_mean, loss)
            finally:
                restore()
        fold = self.folds(ctx, tuple(i.name[len(ctx.prefix) + 1:] for i in infos))
        self.counts[fold.kind] += 1
        if fold.kind == "norm":
            fold_into_norm(ctx.block.get_submodule(fold.target), s, fold.formula)
        elif fold.kind == "linear":
            self._fold_into_producer(ctx, fold.target, s)
        if fold.kind != "explicit":   # x arrives divided by s: full-precision members absorb s exactly
            for info in infos:
                if info.name not in self.plan:
                    info.set_weight(info.weight() * s)
        gram_s = gram / s[:, None] / s[None, :]        # E[(x / s)(x / s)^T]
        for t in targets:
            res = self.quantize(t.info.weight() * s, gram_s, t)
            self.results[t.name] = res
            W_eff = res.dequantize()
            if fold.kind == "explicit":
                self.input_scales[t.name] = s
                W_eff = W_eff / s
            t.info.set_weight(W_eff)

    def search_scale(self, targets: list[Target], gram: Tensor, act_mean: Tensor,
                     module_loss: Callable[[Tensor], float] | None = None) -> Tensor:
        """Scales s (in,) of the best alpha for the group's layers: by their output error through gram =
        E[x x^T], or by `module_loss` (see _module_loss)."""
        weights = [(t, t.info.weight()) for t in targets]
        sym = self.config.symmetric
        widest = max(W.shape[0] for _, W in weights)
        share = {t.name: widest // W.shape[0] if self.config.kv_weight and widest % W.shape[0] == 0 else 1
                 for t, W in weights}

        # refit_in_search with clip_refit=0 has no step size to refit: plain min-max judging, the fast way
        judged = self.config.clip_in_search or (self.config.refit_in_search and self.config.clip_refit > 0)

        def loss(s: Tensor) -> float:
            total = 0.0
            gram_s = gram / s[:, None] / s[None, :] if judged else None
            for t, W in weights:
                if gram_s is None:                       # min-max rounding of W diag(s)
                    W_hat = scaled_fake_quantize(W, s, t.bits, t.group_size, sym)
                elif not self.config.clip_in_search:     # min-max grids with the least-squares step sizes
                    W_hat = awq_range_search(W * s, gram_s, t.bits, t.group_size, sym, max_shrink=0.0,
                                             refit=self.config.clip_refit,
                                             refit_zero=self.config.clip_refit_zero).dequantize() / s
                else:                                    # the clipped rounding quantize() will apply, on a
                    W_hat = self.quantize(W * s, gram_s, t,  # coarser grid of clipping ratios
                                          n_grid=self.config.clip_in_search_grid).dequantize() / s
                E = W - W_hat                                                      # (out, in)
                total += share[t.name] * float(((E @ gram) * E).sum())
            return total
        wm = weight_channel_mean([W for _, W in weights], targets[0].group_size) if self.config.duo_scaling else None
        rms = gram.diagonal().clamp(min=0).sqrt() if self.config.rms_scales else None
        best = awq_grid_search(act_mean, module_loss or loss, self.config.n_grid, wm, rms)
        self.counts["duo" if best.duo else "plain"] += 1
        self.counts[f"stat_{best.stat}"] += 1
        log.debug("AWQ %s: alpha=%.2f duo=%s loss=%.4g", targets[0].name, best.alpha, best.duo, min(best.losses))
        return best.scales

    def _module_loss(self, ctx: BlockContext, infos: list[LinearInfo], targets: list[Target]):
        """(loss, restore) judging scales s on the output of the module holding the group (its members' common
        parent: self_attn for q/k/v, mlp for gate/up), run on the first search_windows calibration windows
        with each target's weight set to Q(W diag(s)) diag(s)^-1, against its output with the weights of now;
        restore() puts the weights back. None where that output is a member's own output (o_proj, down_proj:
        the layer loss measures the same there, on every token)."""
        rel = tuple(i.name[len(ctx.prefix) + 1:] for i in infos)
        key = (type(ctx.block).__name__, rel)
        if key not in self._modules:
            self._modules[key] = _judging_module(ctx, rel)
            log.info("AWQ: %s judged on %s", ", ".join(rel), self._modules[key] or "their own outputs")
        where = self._modules[key]
        if where is None:
            return None
        module = ctx.block.get_submodule(where) if where else ctx.block
        calls = _module_calls(ctx, module, self.config.search_windows)
        with torch.no_grad(), ctx.autocast():
            refs = [_first(module(*a, **kw)).float() for a, kw in calls]
        originals = [(t, t.info.weight()) for t in targets]
        sym = self.config.symmetric

        def loss(s: Tensor) -> float:
            for t, W in originals:
                t.info.set_weight(scaled_fake_quantize(W, s, t.bits, t.group_size, sym))
            total = 0.0
            with torch.no_grad(), ctx.autocast():
                for (a, kw), y0 in zip(calls, refs):
                    total += float((_first(module(*a, **kw)).float() - y0).pow(2).sum())
            return total

        def restore() -> None:
            for t, W in originals:
                t.info.set_weight(W)
        return loss, restore

    def quantize(self, Ws: Tensor, gram_s: Tensor, t: Target, n_grid: int = 20) -> QuantResult:
        """Clipping search (when enabled) and round-to-nearest of the scaled weight W diag(s)."""
        sym = self.config.symmetric
        if self.config.clip and not any(name_matches(t.name, p) for p in split_list(self.config.clip_skip)):
            return awq_range_search(Ws, gram_s, t.bits, t.group_size, sym, n_grid=n_grid,
                                    refine=self.config.clip_refine, refit=self.config.clip_refit,
                                    refit_zero=self.config.clip_refit_zero)
        g = t.group_size if t.group_size > 0 else Ws.shape[1]
        max_abs = Ws.abs().reshape(Ws.shape[0], -1, g).amax(-1)                    # no clipping
        return quantize_clipped(Ws, max_abs, t.bits, t.group_size, sym)

    def _fold_into_producer(self, ctx: BlockContext, rel: str, s: Tensor) -> None:
        """Divide the output rows of an earlier linear (quantized or not) by s."""
        name = f"{ctx.prefix}.{rel}"
        info = LinearInfo(name, ctx.block.get_submodule(rel))
        res = self.results.get(name)
        if res is None:
            _scale_rows(info, s)
            return
        res.scale = res.scale / s[:, None]           # rows of W_hat = (q - z) * scale scale exactly
        W_eff = res.dequantize()
        if name in self.input_scales:
            W_eff = W_eff / self.input_scales[name]
        info.set_weight(W_eff)
        b = getattr(info.module, "bias", None)
        if b is not None:
            b.data.copy_((b.data.float() / s).to(b.dtype))


@register("quantize", "awq", AWQConfig, needs_data=True,
          help="AWQ: activation-aware scaling and clipping, then rounding (needs --data)")
def apply_awq(model: nn.Module, config: AWQConfig, data: Tensor, runner: RunnerOptions) -> dict:
    plan = plan_targets(model, config)
    for p in split_list(config.clip_skip):
        check_matches(p, list(plan), "clip_skip")
    proc = AWQProcessor(config, plan)
    if config.skip_positions:   # the runner refuses a value that leaves no token of a window
        runner = dataclasses.replace(runner, skip_positions=config.skip_positions)
    if any(t.in_block for t in plan.values()):
        run_layerwise(model, data, proc, runner)
    rtn_n = quantize_rest(plan, config, proc.results)
    swap_in(model, proc.results, "awq", proc.input_scales)
    return report("awq", proc.results, model, per_channel_fallback=fallback_count(config, plan),
                  rtn_fallback=rtn_n, groups_folded_into_norms=proc.counts["norm"],
                  groups_folded_into_linears=proc.counts["linear"],
                  layers_with_input_scale=len(proc.input_scales), groups_with_duo_scales=proc.counts["duo"],
                  groups_with_rms_scales=proc.counts["stat_rms"])
