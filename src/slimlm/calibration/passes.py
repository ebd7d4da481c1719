"""The generic passes of the runner: capturing the first block's inputs, discovering a block's groups of
linear layers, collecting their statistics, and the buffers that keep the hidden states compact."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .common import BlockContext, LinearInfo, LinearStats, RunnerOptions, StopForward, is_linear


@dataclass
class Captured:
    """Block-0 inputs per batch, and what every block received on the first batch of each shape."""
    inputs: list[Tensor]
    args: list[tuple]
    kwargs: list[dict]
    first: dict[tuple, list]          # hidden-state shape -> [(args, kwargs) seen by block i]

    def block_arguments(self, i: int) -> tuple[list[tuple], list[dict]]:
        """Arguments of block i for every batch.

        Most architectures hand every block the same objects (one mask, one pair of rotary tables); a value
        that block i received as a different object than block 0 (Gemma 3's sliding-window layers get their
        own mask and rotary tables) is taken from block i's own call on the first batch of that shape.
        """
        args, kwargs = [], []
        for b in range(len(self.inputs)):
            seen = self.first[tuple(self.inputs[b].shape)]
            a0, kw0 = seen[0]
            ai, kwi = seen[i]
            kwargs.append({k: (self.kwargs[b][k] if k in kw0 and v is kw0[k] else v) for k, v in kwi.items()})
            args.append(tuple(self.args[b][j] if j < len(a0) and v is a0[j] else v for j, v in enumerate(ai)))
        return args, kwargs


_DROP = ("hidden_states", "past_key_value", "past_key_values", "layer_past", "cache")


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: Tensor,
                         opts: RunnerOptions) -> Captured:
    """Run the model into block 0 for each batch of windows (all the way through for the first batch of
    each shape, to see what every block receives) and keep block 0's hidden states and arguments."""
    cap = Captured([], [], [], {})
    state = {"record": None}

    def make_hook(i):
        def hook(_mod, args, kw):
            hs = args[0] if args else kw["hidden_states"]
            rest = tuple(_detach(a) for a in args[1:])
            kw = {k: _detach(v) for k, v in kw.items() if k not in _DROP}
            if i == 0:
                cap.inputs.append(hs.detach())
                cap.args.append(rest)
                cap.kwargs.append(kw)
            if state["record"] is not None:
                state["record"].append((rest, kw))
                return None
            raise StopForward
        return hook

    def after_last(_mod, _args, _out):
        if state["record"] is not None:
            raise StopForward  # the arguments are recorded; the final norm and output layer need not run

    hooks = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_hook(after_last))
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], opts.batch_size):
                batch = windows[start:start + opts.batch_size].to(opts.device)
                # The first batch of each shape runs through every block to record their arguments.
                new_shape = not any(k[:2] == tuple(batch.shape) for k in cap.first)
                state["record"] = [] if new_shape else None
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
                if new_shape:
                    cap.first[tuple(cap.inputs[-1].shape)] = state["record"]
    finally:
        for h in hooks:
            h.remove()
    return cap


def _detach(v):
    if isinstance(v, Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    return v


@dataclass
class FirstBatch:
    """What the discovery pass gathered on batch 0: each group's statistics (not finalized) and the block's
    output. The statistics pass continues from them instead of running batch 0 again (one batch forward less
    per block); the inputs themselves are not kept."""
    stats: list[LinearStats]
    output: Tensor | None       # kept only where it becomes the next block's input (propagate="dense")


def discover_groups(ctx: BlockContext, needs: frozenset = frozenset(), fast_stats: bool = False,
                    stat_groups: int | None = None,
                    keep_output: bool = False, skip: int = 0) -> tuple[list[list[LinearInfo]], FirstBatch | None]:
    """Linear layers of the block in execution order, grouped by the input tensor they share (consecutive
    layers called on the same tensor object); with `needs`, batch 0's statistics of the first `stat_groups`
    groups (all by default) and, with `keep_output`, the block's output (FirstBatch is None when a linear
    layer ran twice: its statistics would then need every call)."""
    groups: list[list[LinearInfo]] = []
    stats: list[LinearStats] = []
    seen: dict[str, int] = {}
    state = {"last_x": None, "repeat": False}
    hooks = []
    for name, m in ctx.block.named_modules():
        if is_linear(m):
            def pre(mod, args, _name=name):
                x = args[0]
                if _name in seen:   # a module called twice (weight sharing) keeps its first group
                    state["repeat"] = True
                    return
                info = LinearInfo(f"{ctx.prefix}.{_name}", mod)
                if groups and x is state["last_x"]:
                    groups[-1].append(info)
                else:
                    groups.append([info])
                    st = LinearStats()
                    if needs and (stat_groups is None or len(stats) < stat_groups):
                        st.add(x.detach(), needs, fast_stats, skip)
                    stats.append(st)
                seen[_name] = len(groups) - 1
                state["last_x"] = x
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        out = ctx.forward(batches=[0])[0]
    finally:
        for h in hooks:
            h.remove()
    state["last_x"] = None
    if not needs or state["repeat"]:
        return groups, None
    return groups, FirstBatch(stats[:stat_groups] if stat_groups is not None else stats,
                              out if keep_output else None)


def _collect(ctx: BlockContext, groups: list[list[LinearInfo]], needs: frozenset,
             opts: RunnerOptions, keep_outputs: bool = False, first: FirstBatch | None = None) -> list[LinearStats]:
    """One pass over the calibration inputs accumulating stats of each group's input; stops once the last
    group's input is seen, or with `keep_outputs` runs the block to its end and puts each batch's output in
    place of its input (ctx.consumed). With `first` (the discovery pass's batch 0, gathered while the
    weights were those of now; one LinearStats per group), batch 0 is not run again."""
    stats = first.stats if first is not None else [LinearStats() for _ in groups]
    last = groups[-1][0].module
    hooks = []
    for g, st in zip(groups, stats):
        def pre(mod, args, _st=st, _stop=(g[0].module is last and not keep_outputs)):
            _st.add(args[0].detach(), needs, opts.fast_stats, opts.skip_positions)
            if _stop:
                raise StopForward
        hooks.append(g[0].module.register_forward_pre_hook(pre))
    start = 0 if first is None else 1
    if keep_outputs and first is not None:   # batch 0 is done: its output takes its input's place at once
        if first.output is None:
            raise ValueError("keep_outputs needs the discovery pass's output (discover_groups keep_output=True)")
        ctx.inputs[0], first.output = first.output, None
    try:
        for i in range(start, len(ctx.inputs)):
            try:
                out = ctx.forward(batches=[i])
            except StopForward:
                continue
            if keep_outputs:
                ctx.inputs[i] = out[0]
        ctx.consumed = keep_outputs
    finally:
        for h in hooks:
            h.remove()
    for st in stats:
        st.finalize()
    return stats


class _Arena:
    """One byte buffer that successive stashes reuse (grown when one needs more). A fresh multi-MB buffer
    per stash is fresh mapped pages, each zeroed by the kernel on first touch: on SmolLM2 with 128 windows,
    filling the two staged stashes of a block took 0.19-0.22 s in new buffers and 0.02 s in a reused one."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self.buf is None or self.buf.numel() < nbytes or self.buf.device != device:
            self.buf = None   # the old buffer goes before the new one is allocated
            self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.buf[:nbytes].view(dtype).view(shape)


class _Stash:
    """Per-batch tensors of one shape kept in a single buffer, allocated at the first put (dtype: the first
    tensor's unless given), or taken from `arena` (whose earlier stash must no longer be in use). A batch
    of another shape (a shorter last batch) gets a tensor of its own."""

    def __init__(self, n: int, dtype: torch.dtype | None = None, arena: _Arena | None = None) -> None:
        self.n, self.dtype, self.arena = n, dtype, arena
        self.buf: Tensor | None = None
        self.extra: dict[int, Tensor] = {}

    def put(self, b: int, x: Tensor) -> Tensor:
        if self.buf is None:
            shape, dtype = (self.n, *x.shape), self.dtype or x.dtype
            self.buf = (self.arena.take(shape, dtype, x.device) if self.arena is not None
                        else x.new_empty(shape, dtype=dtype))
        if x.shape == self.buf.shape[1:]:
            self.buf[b].copy_(x)
        else:
            self.extra[b] = x.to(self.buf.dtype)
        return x

    def __getitem__(self, b: int) -> Tensor:
        return self.extra[b] if b in self.extra else self.buf[b]


def _one_buffer(xs: list[Tensor]) -> list[Tensor]:
    """The same tensors as views of one buffer (a _Stash). The hidden states live through the whole run and
    are overwritten in place block after block; captured one by one, amid the forward passes' temporaries,
    they would pin that stretch of the heap."""
    stash = _Stash(len(xs))
    for i, x in enumerate(xs):
        stash.put(i, x)
        xs[i] = None
    return [stash[i] for i in range(len(xs))]


def return_freed_memory() -> None:
    """Hand the free pages of glibc's heap back to the system (malloc_trim); no-op elsewhere.

    A layer-by-layer pass allocates and frees many multi-MB tensors (weight copies, activations); glibc
    serves them from a heap whose free space fragments and is not returned, so without trimming the
    resident set grows block after block beyond what the process holds. Trimming once per block costs
    milliseconds; a fixed low mmap threshold (the other cure) made every allocation page-fault and the GPTQ
    run 65% slower here."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
