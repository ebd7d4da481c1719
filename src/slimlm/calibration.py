"""The layer-by-layer calibration runner shared by every post-training method (GPTQ, AWQ, SparseGPT, Wanda).

Calibration windows go through the model one decoder block at a time:
1. the inputs of the first block (hidden states plus whatever keyword arguments the architecture passes:
   attention mask, position embeddings, ...) are captured by running the model until block 0 is entered;
2. for each block, the linear layers are discovered in execution order and grouped by shared input
   (q/k/v; o; gate/up; down for a Llama block). For each group, one pass over the calibration inputs
   accumulates the statistics the method asks for (X^T X Hessian, per-channel sums of x^2 and |x|),
   stopping the block as soon as the group's inputs are seen; the method then
   rewrites the group's weights. With `sequential=True` ("true-sequential") each group sees inputs produced
   by the already-processed groups; otherwise one pass collects every group's statistics.
   On a Llama-like block (pre-norm attention then MLP, groups q/k/v, o, gate/up, down) true-sequential
   processing runs staged instead (run_staged): the inputs of o_proj and of down_proj are kept between
   stages, so every linear layer runs once per batch, with its final weights, and the block's output comes
   out of the last stage: about one forward per block instead of about two and a half. It is checked once,
   on the first block's first batch, against the block's own forward, and falls back to the passes above
   where the arithmetic differs (Gemma's extra norms, GPT-2, OPT);
3. the block runs once more to produce the (now compressed) inputs of the next block (each batch's output
   replacing its input; not after the last block, nor after a staged block, whose last stage produced them),
   and freed heap pages are returned to the system.
   With `propagate="dense"` the statistics pass runs each block to its end instead and its (uncompressed)
   outputs become the next block's inputs: one forward per block instead of about two, so every block is
   calibrated on the dense model's activations (llm-compressor's `propagate_error=False`). Methods that
   run the block themselves while processing (AWQ's search) cannot use it: the inputs are gone by then.

Only the current block and its activations live on the compute device. Blocks are found generically: the
longest `nn.ModuleList` of same-class modules. Linear layers are `nn.Linear` and transformers' `Conv1D`
(GPT-2, weights stored transposed), wrapped by `LinearInfo` so methods always see W as (out, in).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

STATS = frozenset({"hessian", "sq_sum", "abs_sum"})


# ----------------------------------------------------------------------------------------------- discovery
def is_linear(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder (or encoder) blocks: the longest ModuleList whose children share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            if len({type(c) for c in m}) == 1 and any(is_linear(x) for x in m[0].modules()):
                if best is None or len(m) > len(best[1]):
                    best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks with linear layers")
    return best


@dataclass
class LinearInfo:
    """A linear layer inside a block, with its weight always seen as W (out, in)."""
    name: str            # qualified name in the model, e.g. "model.layers.3.self_attn.q_proj"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, nn.Linear)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    def weight(self) -> Tensor:
        """A float32 copy of W (out, in)."""
        w = self.module.weight.detach()
        return (w.t() if self.transposed else w).float().clone()

    def set_weight(self, W: Tensor) -> None:
        """Write W (out, in) back in the module's own layout and dtype."""
        p = self.module.weight
        with torch.no_grad():
            p.copy_((W.t() if self.transposed else W).to(p.dtype))


@dataclass
class LinearStats:
    """Statistics of one group's common input x (rows = tokens), accumulated over calibration data."""
    nsamples: int = 0
    hessian: Tensor | None = None   # (in, in) fp32: 2/n * sum_t x_t x_t^T  (after finalize)
    sq_sum: Tensor | None = None    # (in,) fp32: sum_t x_t^2   (Wanda's ||X_j||_2^2)
    abs_sum: Tensor | None = None   # (in,) fp32: sum_t |x_t|   (AWQ's activation magnitude * n)

    def add(self, x: Tensor, needs: frozenset, fast: bool, skip: int = 0) -> None:
        """Accumulate the rows of x (batch, positions, in) or (rows, in); `skip` > 0 leaves out the first
        `skip` positions of every window (3-D x only)."""
        if skip and x.dim() == 3:
            x = x[:, skip:]
        # Hooks run inside the bf16 autocast of the forward pass; the statistics must not.
        with torch.autocast(device_type=x.device.type, enabled=False):
            self._add(x, needs, fast)

    def _add(self, x: Tensor, needs: frozenset, fast: bool) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        if "hessian" in needs:
            if fast:
                xm = x.to(torch.bfloat16)
                xx = (xm.t() @ xm).float()
                self.hessian = xx if self.hessian is None else self.hessian.add_(xx)
            else:
                if self.hessian is None:
                    self.hessian = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float32)
                gram_upper_(self.hessian, x.float())
        xf = x.float() if ({"sq_sum", "abs_sum"} & needs) else None
        if "sq_sum" in needs:
            s = xf.pow(2).sum(0)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
        if "abs_sum" in needs:
            s = xf.abs().sum(0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        self.nsamples += n

    def finalize(self) -> None:
        if self.hessian is not None and self.nsamples:
            mirror_upper_(self.hessian)   # the fp32 path fills the upper triangle only
            self.hessian.mul_(2.0 / self.nsamples)


def gram_upper_(acc: Tensor, x: Tensor) -> None:
    """acc += x^T x on and above the diagonal only (x (n, d) fp32): the row strips of the upper triangle
    cost (p + 1) / 2p of the full product for p strips; mirror_upper_ completes the matrix once at the end.
    Below the diagonal, acc holds partial sums of no meaning until then. Strips of about 96 rows, at most 8:
    on 4096 rows, 2 threads (AMD EPYC, AVX2) d=576 took 16.0 ms in one product, 13.0 in 2 strips, 10.1 in 6;
    d=1536 104.7, 71.6 in 4, 67.8 in 8 (12 strips: slower again)."""
    d = x.shape[1]
    p = max(1, min(8, d // 96))
    bounds = [d * i // p for i in range(p + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])


def mirror_upper_(m: Tensor) -> None:
    """Make m symmetric from its upper triangle (diagonal included), in place."""
    upper = torch.triu(m)
    m.copy_(upper + torch.triu(upper, 1).t())


# ----------------------------------------------------------------------------------------------- contexts
class StopForward(Exception):
    """Raised inside a block (by a hook) to stop a forward pass once what was needed has been seen."""


@dataclass
class BlockContext:
    """What a method sees of the current block: its inputs and a way to run it."""
    index: int
    block: nn.Module
    prefix: str                      # qualified name of the block, e.g. "model.layers.3"
    inputs: list[Tensor]             # hidden states per batch (B, T, C), on the compute device
    args: list[tuple]                # further positional arguments per batch
    kwargs: list[dict]               # keyword arguments per batch
    autocast: Callable[[], contextlib.AbstractContextManager]
    consumed: bool = False           # propagate="dense": `inputs` already hold this block's outputs

    def forward(self, module: nn.Module | None = None, batches: Iterable[int] | None = None) -> list[Tensor]:
        """Run the block (or a replacement `module` taking the same arguments) on the captured inputs."""
        if self.consumed:
            raise RuntimeError("this block's inputs were replaced by its outputs (propagate='dense'); a method "
                               "that runs the block while processing needs propagate='compressed'")
        module = module or self.block
        idx = range(len(self.inputs)) if batches is None else batches
        outs = []
        with torch.no_grad(), self.autocast():
            for i in idx:
                out = module(self.inputs[i], *self.args[i], **self.kwargs[i])
                outs.append((out[0] if isinstance(out, (tuple, list)) else out).to(self.inputs[i].dtype))
        return outs


class Processor(Protocol):
    """A post-training method as the runner sees it."""
    needs: frozenset            # subset of STATS
    sequential: bool            # true-sequential groups inside a block
    # optional `reads_inputs: bool`: process() reads ctx.inputs or runs the block (refused with propagate="dense")

    def process(self, ctx: BlockContext, group: list[tuple[LinearInfo, LinearStats]]) -> None:
        """Rewrite the weights of one group of linear layers (they share one input, hence one LinearStats)."""


# ----------------------------------------------------------------------------------------------- the runner
@dataclass
class RunnerOptions:
    batch_size: int = 4              # windows per forward pass (Wanda 50%: 8 peaked 280-380 MB higher, no faster)
    fast: bool | None = None         # bf16 autocast forwards (statistics still accumulate in fp32); None:
                                     # where the device multiplies bf16 natively (hardware.native_bf16)
    fast_stats: bool = False         # X^T X products in bf16 too: ~4x faster, but rounding each product to
                                     # bf16 can make H indefinite (GPTQ then needs more damping)
    device: str = "cpu"
    progress: bool = True
    staged: bool = True              # true-sequential on a Llama-like block in about one forward (run_staged)
    stash_bf16: bool = True          # staged: keep the down_proj inputs between stages in bf16 (half the memory)
    propagate: str = "compressed"    # next block's inputs: outputs of the compressed block (a second forward
                                     # per block) or "dense": the statistics pass's own outputs (see above)
    skip_positions: int = 0          # statistics leave out the first k positions of every window (their
                                     # tokens still run through the model): the attention-sink token 0
                                     # carries massive activations (SmolLM2 layer 11's down_proj input: 3497
                                     # at position 0, at most 8.7 elsewhere; 99.8% of E[x^2])

    def __post_init__(self) -> None:
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate must be one of {', '.join(PROPAGATE)}, got {self.propagate!r}")
        if self.skip_positions < 0:
            raise ValueError(f"skip_positions must be 0 or more, got {self.skip_positions}")


PROPAGATE = ("compressed", "dense")


def passes_in_bf16(opts: RunnerOptions) -> bool:
    """Whether the calibration passes run under bf16 autocast: as asked, or where bf16 is native."""
    if opts.fast is None:
        from .hardware import native_bf16
        return native_bf16(opts.device)
    return opts.fast


def _autocast_factory(opts: RunnerOptions):
    if not passes_in_bf16(opts):
        return contextlib.nullcontext
    dev = torch.device(opts.device).type
    return lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)


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


# ----------------------------------------------------------------------------------------------- staged blocks
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


def run_layerwise(model: nn.Module, windows: Tensor, processor: Processor,
                  opts: RunnerOptions | None = None) -> int:
    """Apply `processor` to every block of `model`, block by block, on calibration `windows` (N, L); returns
    how many blocks ran staged (run_staged)."""
    from tqdm.auto import tqdm

    opts = opts or RunnerOptions()
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
        from .errors import ConfigError
        raise ConfigError(f"skip_positions {opts.skip_positions} leaves nothing of the {windows.shape[-1]}-token "
                          "calibration windows; use a smaller value (e.g. 1)")
    prefix, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    cache_flag = getattr(model.config, "use_cache", None) if hasattr(model, "config") else None
    if cache_flag is not None:
        model.config.use_cache = False
    autocast = _autocast_factory(opts)
    log.info("calibration passes in %s on %s", "bf16" if passes_in_bf16(opts) else "fp32", opts.device)
    try:
        cap = capture_block_inputs(model, blocks, windows, opts)
        inputs = cap.inputs = _one_buffer(cap.inputs)
        return_freed_memory()
        staged_ok = None       # whether the staged passes reproduce this model's blocks (verified once)
        staged_names = None    # the verified block's groups, as names inside the block: later blocks skip discovery
        n_staged = 0
        arena = _Arena()       # the staged passes' stashes, one buffer for the whole run
        for i in tqdm(range(len(blocks)), desc="blocks", disable=not opts.progress, leave=False):
            block = blocks[i]
            home = next(block.parameters()).device
            block.to(opts.device)
            args, kwargs = cap.block_arguments(i)
            ctx = BlockContext(i, block, f"{prefix}.{i}" if prefix else str(i), inputs, args, kwargs, autocast)
            dense = opts.propagate == "dense" and i + 1 < len(blocks)   # the last block's outputs go nowhere
            # batch 0 is seen by discovery with the weights of now: every group's in one pass; in true-
            # sequential order only the first group's (later groups' inputs depend on the groups rewritten since)
            staged = opts.staged and processor.sequential and not getattr(processor, "reads_inputs", False)
            lay = None
            if staged and staged_names:   # set once verified; blocks of one class: the verified block's groups
                groups = [[LinearInfo(f"{ctx.prefix}.{r}", block.get_submodule(r)) for r in g] for g in staged_names]
                first = None
                lay = staged_layout(block, groups)
            if lay is None:
                groups, first = discover_groups(ctx, needs, opts.fast_stats,
                                                stat_groups=1 if processor.sequential else None,
                                                keep_output=dense or (staged and staged_ok is None),
                                                skip=opts.skip_positions)
                if staged and staged_ok is not False and first is not None:
                    lay = staged_layout(block, groups)
            if lay is not None and staged_ok is None:   # checked once, on the first block, before any rewrite
                staged_ok = verify_staged(ctx, lay, groups, first.output)
                first.output = None
                skip = len(ctx.prefix) + 1
                staged_names = [[info.name[skip:] for info in g] for g in groups] if staged_ok else None
            if lay is not None and staged_ok:
                run_staged(ctx, lay, groups, processor, needs, opts, first, propagate=i + 1 < len(blocks),
                           arena=arena)
                n_staged += 1
                first = None
                block.to(home)
                return_freed_memory()
                continue
            if processor.sequential:
                for k, g in enumerate(groups):
                    st = _collect(ctx, [g], needs, opts, first=first if k == 0 else None)[0]
                    first = None
                    processor.process(ctx, [(info, st) for info in g])
            else:
                all_stats = _collect(ctx, groups, needs, opts, keep_outputs=dense, first=first)
                first = None
                for g, st in zip(groups, all_stats):
                    processor.process(ctx, [(info, st) for info in g])
            # each batch's output replaces its input at once: one copy of the hidden states, not two;
            # nothing reads the last block's outputs
            for b in range(len(inputs) if i + 1 < len(blocks) and not dense else 0):
                inputs[b].copy_(ctx.forward(batches=[b])[0])   # in place: see run_staged
            block.to(home)
            return_freed_memory()
        return n_staged
    finally:
        if cache_flag is not None:
            model.config.use_cache = cache_flag
        model.train(was_training)
