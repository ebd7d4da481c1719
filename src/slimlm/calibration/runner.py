"""run_layerwise: a method's Processor applied block by block (see the package docstring for the order)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import Tensor, nn

from ..errors import ConfigError
from .common import (
    STATS,
    BlockContext,
    LinearInfo,
    Processor,
    RunnerOptions,
    _autocast_factory,
    find_blocks,
    passes_in_bf16,
)
from .passes import (
    FirstBatch,
    _Arena,
    _collect,
    _one_buffer,
    capture_block_inputs,
    discover_groups,
    return_freed_memory,
)
from .staged import run_staged, staged_layout, verify_staged

log = logging.getLogger(__name__)


def _check(processor: Processor, opts: RunnerOptions, windows: Tensor) -> frozenset:
    needs = frozenset(processor.needs)
    if not needs <= STATS:
        raise ValueError(f"unknown statistics {set(needs) - STATS}")
    if opts.propagate == "dense" and processor.sequential:
        raise ValueError("propagate='dense' collects a block's statistics in one pass; it does not combine with "
                         "true-sequential processing")
    if opts.propagate == "dense" and getattr(processor, "reads_inputs", False):
        raise ValueError(f"{type(processor).__name__} reads each block's inputs while processing it; with "
                         "propagate='dense' they are already replaced by the outputs: use propagate='compressed'")
    if opts.skip_positions and opts.skip_positions >= windows.shape[-1]:
        raise ConfigError(f"skip_positions {opts.skip_positions} leaves nothing of the {windows.shape[-1]}-token "
                          "calibration windows; use a smaller value (e.g. 1)")
    return needs


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no key/value cache while the runner runs; both restored afterwards."""
    was_training = model.training
    model.eval()
    cache_flag = getattr(model.config, "use_cache", None) if hasattr(model, "config") else None
    if cache_flag is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        if cache_flag is not None:
            model.config.use_cache = cache_flag
        model.train(was_training)


class _Blocks:
    """The state carried from block to block: whether the staged passes reproduce this model's blocks
    (verified once, on the first block, before any rewrite), the verified block's groups as names inside
    the block (later blocks of the same class skip discovery), and the staged passes' stash buffer."""

    def __init__(self, processor: Processor, needs: frozenset, opts: RunnerOptions) -> None:
        self.processor, self.needs, self.opts = processor, needs, opts
        self.staged = (opts.staged and processor.sequential and not getattr(processor, "reads_inputs", False))
        self.staged_ok: bool | None = None
        self.staged_names: list[list[str]] | None = None
        self.n_staged = 0
        self.arena = _Arena()

    def run(self, ctx: BlockContext, last: bool) -> None:
        dense = self.opts.propagate == "dense" and not last     # the last block's outputs go nowhere
        groups, first, lay = self._groups(ctx, dense)
        if lay is not None and self.staged_ok is None:
            self.staged_ok = verify_staged(ctx, lay, groups, first.output)
            first.output = None
            skip = len(ctx.prefix) + 1
            self.staged_names = [[info.name[skip:] for info in g] for g in groups] if self.staged_ok else None
        if lay is not None and self.staged_ok:
            run_staged(ctx, lay, groups, self.processor, self.needs, self.opts, first, propagate=not last,
                       arena=self.arena)
            self.n_staged += 1
            return
        self._generic(ctx, groups, first, dense)
        # each batch's output replaces its input at once: one copy of the hidden states, not two; nothing
        # reads the last block's outputs
        for b in range(len(ctx.inputs) if not last and not dense else 0):
            ctx.inputs[b].copy_(ctx.forward(batches=[b])[0])   # in place: see run_staged

    def _groups(self, ctx: BlockContext, dense: bool):
        """The block's groups, batch 0's statistics where discovery gathered them, and the staged layout if
        the block may run staged. Discovery sees batch 0 with the weights of now: every group's statistics in
        one pass, or in true-sequential order only the first group's (later groups' inputs depend on the
        groups rewritten since)."""
        if self.staged and self.staged_names:
            groups = [[LinearInfo(f"{ctx.prefix}.{r}", ctx.block.get_submodule(r)) for r in g]
                      for g in self.staged_names]
            lay = staged_layout(ctx.block, groups)
            if lay is not None:
                return groups, None, lay
        seq = self.processor.sequential
        groups, first = discover_groups(ctx, self.needs, self.opts.fast_stats, stat_groups=1 if seq else None,
                                        keep_output=dense or (self.staged and self.staged_ok is None),
                                        skip=self.opts.skip_positions)
        lay = None
        if self.staged and self.staged_ok is not False and first is not None:
            lay = staged_layout(ctx.block, groups)
        return groups, first, lay

    def _generic(self, ctx: BlockContext, groups: list[list[LinearInfo]], first: FirstBatch | None,
                 dense: bool) -> None:
        if self.processor.sequential:
            for k, g in enumerate(groups):
                st = _collect(ctx, [g], self.needs, self.opts, first=first if k == 0 else None)[0]
                self.processor.process(ctx, [(info, st) for info in g])
            return
        all_stats = _collect(ctx, groups, self.needs, self.opts, keep_outputs=dense, first=first)
        for g, st in zip(groups, all_stats):
            self.processor.process(ctx, [(info, st) for info in g])


def run_layerwise(model: nn.Module, windows: Tensor, processor: Processor,
                  opts: RunnerOptions | None = None) -> int:
    """Apply `processor` to every block of `model`, block by block, on calibration `windows` (N, L); returns
    how many blocks ran staged (run_staged)."""
    from tqdm.auto import tqdm

    opts = opts or RunnerOptions()
    needs = _check(processor, opts, windows)
    prefix, blocks = find_blocks(model)
    autocast = _autocast_factory(opts)
    log.info("calibration passes in %s on %s", "bf16" if passes_in_bf16(opts) else "fp32", opts.device)
    with _calibrating(model):
        cap = capture_block_inputs(model, blocks, windows, opts)
        inputs = cap.inputs = _one_buffer(cap.inputs)
        return_freed_memory()
        state = _Blocks(processor, needs, opts)
        for i in tqdm(range(len(blocks)), desc="blocks", disable=not opts.progress, leave=False):
            block = blocks[i]
            home = next(block.parameters()).device
            block.to(opts.device)
            args, kwargs = cap.block_arguments(i)
            ctx = BlockContext(i, block, f"{prefix}.{i}" if prefix else str(i), inputs, args, kwargs, autocast)
            state.run(ctx, last=i + 1 == len(blocks))
            block.to(home)
            return_freed_memory()
        return state.n_staged
