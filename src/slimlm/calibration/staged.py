"""Staged true-sequential processing of a Llama-like block in about one forward pass (run_staged)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import BlockContext, LinearInfo, LinearStats, Processor, RunnerOptions, StopForward
from .passes import FirstBatch, _Arena, _Stash, return_freed_memory

log = logging.getLogger(__name__)


@dataclass
class StagedLayout:
    """A pre-norm block laid out as Llama's: out = r + mlp(ln2(r)), r = x + o_proj(attention(ln1(x))), whose
    four groups of linear layers are [q, k, v], [o_proj], [gate, up], [down_proj] (tested: Llama, Qwen2, Mistral, Phi-3
    with its fused projections). Stages cut the block at the inputs of o_proj and of down_proj."""
    ln2: nn.Module
    mlp: nn.Module
    o: LinearInfo
    down: LinearInfo


def staged_layout(block: nn.Module, groups: list[list[LinearInfo]]) -> StagedLayout | None:
    """The block's StagedLayout if its modules and groups have that shape (checked on data by verify_staged)."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    ln1, ln2 = getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None)
    if None in (attn, mlp, ln1, ln2) or len(groups) != 4 or len(groups[1]) != 1 or len(groups[3]) != 1:
        return None
    in_attn, in_mlp = set(attn.modules()), set(mlp.modules())
    if not (all(i.module in in_attn for i in groups[0] + groups[1])
            and all(i.module in in_mlp for i in groups[2] + groups[3])):
        return None
    if groups[1][0].transposed or groups[3][0].transposed:
        return None
    return StagedLayout(ln2, mlp, groups[1][0], groups[3][0])


def call_of(ctx: BlockContext, run: Callable[[], object], module: nn.Module) -> tuple[tuple, dict]:
    """The (args, kwargs) `module` is called with when `run()` executes (stopped there: nothing after it runs)."""
    seen = {}

    def pre(_m, args, kwargs):
        seen["call"] = (args, kwargs)
        raise StopForward
    h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), ctx.autocast():
            run()
    except StopForward:
        pass
    finally:
        h.remove()
    if "call" not in seen:
        raise RuntimeError(f"{type(module).__name__} was not called")
    return seen["call"]


def _input_of(ctx: BlockContext, run: Callable[[], object], module: nn.Module) -> Tensor:
    """The input `module` receives when `run()` executes (stopped there: nothing after it runs)."""
    return call_of(ctx, run, module)[0][0].detach()


def _current(ctx: BlockContext, info: LinearInfo) -> nn.Module:
    """The module now at info's place in the block: a method may have swapped in a new one (joint SparseGPT's
    quantized layers) since the groups were found."""
    return ctx.block.get_submodule(info.name[len(ctx.prefix) + 1:])


def _block_input_of(ctx: BlockContext, b: int, module: nn.Module) -> Tensor:
    """What `module` receives when the block runs on batch b (stopped there)."""
    return _input_of(ctx, lambda: ctx.forward(batches=[b]), module)


def _residual_attention(ctx: BlockContext, lay: StagedLayout, x: Tensor, z: Tensor) -> Tensor:
    with torch.no_grad(), ctx.autocast():
        return (x + _current(ctx, lay.o)(z)).to(x.dtype)


def _mlp_input_of_down(ctx: BlockContext, lay: StagedLayout, r: Tensor) -> Tensor:
    return _input_of(ctx, lambda: lay.mlp(lay.ln2(r)), _current(ctx, lay.down))


def _residual_mlp(ctx: BlockContext, lay: StagedLayout, r: Tensor, m: Tensor) -> Tensor:
    with torch.no_grad(), ctx.autocast():
        return (r + _current(ctx, lay.down)(m.to(r.dtype))).to(r.dtype)


def verify_staged(ctx: BlockContext, lay: StagedLayout, groups: list[list[LinearInfo]], out0: Tensor) -> bool:
    """Whether the staged arithmetic reproduces the block on batch 0 (weights untouched so far): its output,
    and the input the gate/up group really receives. Any mismatch or error: run the block unstaged."""
    tol = 1e-4 if ctx.autocast is contextlib.nullcontext else 1e-2

    def close(a: Tensor, b: Tensor) -> bool:
        a, b = a.float(), b.float()
        return a.shape == b.shape and bool((a - b).norm() <= tol * b.norm() + 1e-12)
    try:
        x = ctx.inputs[0]
        z = _block_input_of(ctx, 0, _current(ctx, lay.o))
        r = _residual_attention(ctx, lay, x, z)
        gate_in = _block_input_of(ctx, 0, groups[2][0].module)
        with torch.no_grad(), ctx.autocast():
            ok = close(lay.ln2(r), gate_in)
        out = _residual_mlp(ctx, lay, r, _mlp_input_of_down(ctx, lay, r))
        ok = ok and close(out, out0)
    except Exception as e:  # noqa: BLE001 - any failure means "not this layout": fall back, do not fail
        log.info("staged passes do not apply to %s (%s): one partial pass per group", type(ctx.block).__name__, e)
        return False
    if not ok:
        log.info("staged passes do not reproduce %s: one partial pass per group", type(ctx.block).__name__)
    return ok


def run_staged(ctx: BlockContext, lay: StagedLayout, groups: list[list[LinearInfo]], processor: Processor,
               needs: frozenset, opts: RunnerOptions, first: FirstBatch | None, propagate: bool,
               arena: _Arena | None = None) -> None:
    """True-sequential processing of one block in about one forward pass: each linear layer runs once, with
    its final weights, on inputs produced by the groups already rewritten.
    1. q/k/v: statistics of the block's input up to q_proj (the input norm; batch 0 from discovery where it ran);
    2. o_proj: the attention output z of every batch is kept (the block run up to o_proj);
    3. gate/up: r = x + o_proj(z) overwrites x; statistics of ln2(r); z is freed;
    4. down: m, the input of down_proj, is kept (in bf16 with opts.stash_bf16; statistics in full precision);
    5. the block's output r + down_proj(m) overwrites r (not for the last block).
    Equal to the generic true-sequential passes up to the bf16 rounding of m in step 5. The stashes of z and m
    (never alive together) are carved from `arena` when given: the caller keeps one across blocks."""
    n = len(ctx.inputs)

    def stats_of(xs: Callable[[int], Tensor], start: int = 0, seed: LinearStats | None = None) -> LinearStats:
        st = seed or LinearStats()
        for b in range(start, n):
            st.add(xs(b), needs, opts.fast_stats, opts.skip_positions)
        st.finalize()
        return st

    def process(g: list[LinearInfo], st: LinearStats) -> None:
        processor.process(ctx, [(info, st) for info in g])

    def block_in(b: int) -> Tensor:
        return _block_input_of(ctx, b, groups[0][0].module)
    if first is not None:   # batch 0 was seen by discovery
        process(groups[0], stats_of(block_in, start=1, seed=first.stats[0]))
    else:
        process(groups[0], stats_of(block_in))

    # The stashes are one allocation each (a large one: mapped, and handed back whole when freed), and the
    # residuals are written into the input tensors in place: kept per-batch tensors interleaved with the
    # forwards' temporaries fragmented the heap (about 150-300 MB above the live tensors, on 8 SmolLM2 blocks).
    z = _Stash(n, arena=arena)

    def attn_out(b: int) -> Tensor:
        return z.put(b, _block_input_of(ctx, b, _current(ctx, lay.o)))
    process(groups[1], stats_of(attn_out))

    def residual(b: int) -> Tensor:
        ctx.inputs[b].copy_(_residual_attention(ctx, lay, ctx.inputs[b], z[b]))
        return _input_of(ctx, lambda: lay.mlp(lay.ln2(ctx.inputs[b])), groups[2][0].module)
    process(groups[2], stats_of(residual))
    z = None
    return_freed_memory()

    m = _Stash(n, torch.bfloat16 if opts.stash_bf16 else None, arena=arena)

    def mlp_in(b: int) -> Tensor:
        x = _mlp_input_of_down(ctx, lay, ctx.inputs[b])
        if propagate:
            m.put(b, x)
        return x
    process(groups[3], stats_of(mlp_in))
    if propagate:
        for b in range(n):
            ctx.inputs[b].copy_(_residual_mlp(ctx, lay, ctx.inputs[b], m[b]))
    m = None
