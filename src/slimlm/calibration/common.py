"""The pieces every calibration pass shares: finding blocks and linear layers, the statistics of a group's
input, the context a method sees of the current block, and the runner's options."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..selection import PROPAGATE

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


def input_grams(model: nn.Module, modules: dict[str, nn.Module], windows: Tensor,
                batch_size: int = 4, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """X^T X / n (in, in) fp32 of each named module's input over token `windows` (N, L), one plain forward of
    the whole model per batch (forward pre-hooks; a module never called is left out). With an
    `attention_mask` (N, L), padding positions (mask 0) are left out of X."""
    acc: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    keep: list[Tensor | None] = [None]

    def hook(name):
        def pre(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if keep[0] is not None and x.shape[0] == keep[0].numel():
                x = x[keep[0]]
            if name not in acc:
                acc[name] = x.new_zeros(x.shape[1], x.shape[1])
                rows[name] = 0
            gram_upper_(acc[name], x)
            rows[name] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    device = next(model.parameters()).device
    masks = [None] * len(windows.split(batch_size)) if attention_mask is None else attention_mask.split(batch_size)
    try:
        with torch.no_grad():
            for x, mask in zip(windows.split(batch_size), masks):
                keep[0] = None if mask is None else mask.reshape(-1).bool().to(device)
                model(input_ids=x.to(device), use_cache=False,
                      **({} if mask is None else {"attention_mask": mask.to(device)}))
    finally:
        for h in handles:
            h.remove()
    for n, H in acc.items():
        mirror_upper_(H)
        H.div_(max(rows[n], 1))
    return acc


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




def passes_in_bf16(opts: RunnerOptions) -> bool:
    """Whether the calibration passes run under bf16 autocast: as asked, or where bf16 is native."""
    if opts.fast is None:
        from ..hardware import native_bf16
        return native_bf16(opts.device)
    return opts.fast


def _autocast_factory(opts: RunnerOptions):
    if not passes_in_bf16(opts):
        return contextlib.nullcontext
    dev = torch.device(opts.device).type
    return lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)
