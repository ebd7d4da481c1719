"""The one training loop. Every training method of slimlm runs here; a method only hands it a TrainPlan.

    for step in range(start, total):
        lr = warmup then cosine/linear decay (core.optim.lr_at)
        for each micro-batch of this process: loss_sum, n = plan.loss(model, batch)
            (loss_sum / tokens of the whole step).backward()     # accumulation and processes: one mean
        sum the gradients across processes; clip their global norm; optimizer step; plan.after_step
        log {step, loss, lr, tokens, seconds, ...} to metrics.jsonl; evaluate every eval_every steps;
        checkpoint every save_every steps (and on Ctrl-C / SIGTERM)

The run lives in OUTPUT.partial/ (checkpoint, metrics.jsonl) until it finishes; then the method's result and
the metrics are written to a temporary folder that replaces OUTPUT in one rename, and OUTPUT.partial/ goes.
`resume=True` continues from the checkpoint exactly: same batches, learning rates, optimizer state and
random generators, so the logged losses are those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import time
import uuid
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.optim import lr_at
from ..errors import Interrupted, SlimlmError
from . import checkpoint as C
from .config import TrainConfig
from .dist import Dist
from .optim import is_vector, make_optimizer
from .plan import Batch, TrainPlan, lm_loss

log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, loss_fn, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over `windows` (n, L), every predicted token counted, in eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dev = _device(model)
    for x in windows.split(batch_size):
        labels = torch.full_like(x, -100)
        labels[:, :-1] = x[:, 1:]
        s, n = loss_fn(model, _to({"input_ids": x, "labels": labels}, dev))
        total, count = total + float(s), count + int(n)
    model.train(was)
    return math.exp(total / count)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


class _Run:
    """One training run's state: the step, the metrics file, the checkpoint folder."""

    def __init__(self, output: Path | None, run: dict, dist: Dist) -> None:
        self.output, self.run, self.dist = output, run, dist
        self.partial = C.partial_dir(output) if output is not None else None
        self.saved_step = -1

    def log(self, row: dict) -> None:
        if self.partial is None or not self.dist.main:
            return
        self.partial.mkdir(parents=True, exist_ok=True)
        with open(self.partial / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def checkpoint(self, step: int, plan: TrainPlan, opt: torch.optim.Optimizer) -> None:
        if self.partial is None or step == self.saved_step:
            return
        if self.dist.main:
            C.save(self.partial, step, self.run, plan.state_tensors(), opt)
        self.saved_step = step


def train(model: nn.Module, plan: TrainPlan, data, cfg: TrainConfig, *, output: Path | None = None,
          tokenizer=None, eval_windows: Tensor | None = None, resume: bool = False, run: dict | None = None,
          progress: bool = True, dist: Dist | None = None) -> dict:
    """Train `plan.params` of `model` on `data` (slimlm.training.data: batch(i) -> Batch) as `cfg` says; write
    the method's result to `output` (None: keep it in memory only). Returns the run's report."""
    from tqdm.auto import tqdm

    dist = dist or Dist()
    run = {**(run or {}), "world": dist.world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
           "seqlen": cfg.seqlen, "seed": cfg.seed}
    total = cfg.total_steps(dist.world)
    warmup = cfg.warmup_steps(total)
    per_step = cfg.grad_accum * dist.world
    if len(data) < total * per_step:
        raise SlimlmError(f"the training data gives {len(data)} batches, the run needs {total * per_step}")
    params = list(plan.params.values())
    if not params:
        raise SlimlmError("the method left no parameter to train")
    device = _device(model)
    allocator = None
    if device.type == "cpu":
        from ..hardware import allocator_in_use, release_large_frees
        allocator = allocator_in_use()
        if cfg.release_memory and allocator == "glibc":       # a glibc setting: tcmalloc reuses memory itself
            release_large_frees()
        elif cfg.release_memory and dist.rank == 0:
            log.warning("release_memory sets glibc's malloc; this process runs on %s, which it does not change",
                        allocator)
        elif allocator == "glibc" and dist.rank == 0:
            log.info("training on glibc's malloc: peak memory is about twice what a step holds (freed "
                     "activations stay in a fragmented heap); `slimlm train` switches to tcmalloc where one is "
                     "installed, see TrainConfig.release_memory and README.md")
    scale = {id(plan.params[k]): v for k, v in plan.lr_scale.items()}
    opt = make_optimizer(params, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                         no_decay=is_vector,                  # biases, norms (and DoRA's magnitudes): no decay
                         lr_scale=(lambda p: scale.get(id(p), 1.0)) if scale else None)
    def plain_loss(m: nn.Module, b: Batch) -> tuple[Tensor, Tensor]:
        return lm_loss(m, b, cfg.loss_chunk)

    loss_fn = plan.loss or plain_loss                       # training; evaluation is always perplexity
    state = _Run(output, run, dist)
    torch.manual_seed(cfg.seed)
    start = _start(state, plan, opt, resume)
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.bf16 if cfg.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    report: dict = {"steps": total, "trainable_parameters": sum(p.numel() for p in params),
                    "processes": dist.world, **plan.info}
    if allocator:
        report["allocator"] = allocator + (" (release_memory)" if cfg.release_memory and allocator == "glibc" else "")
    if eval_windows is not None and start == 0:
        report["eval_perplexity_before"] = perplexity(model, eval_windows, plain_loss)
    model.train()
    times, losses = [], []
    reduce_on = device if dist.world > 1 and device.type == "cuda" else torch.device("cpu")   # nccl: GPU tensors
    bar = tqdm(total=total, initial=start, desc="train", disable=not (progress and dist.main), leave=False)
    done = start                                  # optimizer steps completed (and logged)
    try:
        for step in range(start, total):
            lr = lr_at(step, total=total, warmup=warmup, base_lr=cfg.lr, schedule=cfg.schedule,
                       min_lr_ratio=cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            t0 = time.perf_counter()
            micro = [data.batch(step * per_step + k * dist.world + dist.rank) for k in range(cfg.grad_accum)]
            count = dist.sum_(torch.tensor(sum(int((b["labels"] != -100).sum()) for b in micro), dtype=torch.float64,
                                           device=reduce_on))
            loss_sum = torch.zeros((), dtype=torch.float64, device=reduce_on)
            for b in micro:
                with autocast():
                    s, _ = loss_fn(model, _to(b, device))
                (s / count.to(s.device, s.dtype)).backward()
                loss_sum += s.detach().double().to(reduce_on)
            dist.sum_grads_(params)
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm
                         else None)
            with _deferred_interrupts():          # the update and its log line happen together or not at all
                opt.step()
                opt.zero_grad(set_to_none=True)
                if plan.after_step is not None:
                    plan.after_step(step + 1)
                loss = float(dist.sum_(loss_sum) / count)
                seconds = time.perf_counter() - t0
                tokens = int(count)
                row = {"step": step + 1, "loss": loss, "lr": lr, "tokens": tokens, "seconds": round(seconds, 4),
                       "tokens_per_s": round(tokens / seconds, 1)}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if eval_windows is not None and (step + 1 == total or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                    row["eval_perplexity"] = perplexity(model, eval_windows, plain_loss)
                state.log(row)
                done = step + 1
            times.append(seconds)
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < total:
                state.checkpoint(done, plan, opt)
    except KeyboardInterrupt:
        opt.zero_grad(set_to_none=True)           # a half-accumulated step is dropped, not saved
        bar.close()
        if state.partial is None or done == 0:
            raise
        state.checkpoint(done, plan, opt)
        raise Interrupted(f"interrupted after step {done} of {total}; its checkpoint is in {state.partial} and no "
                          "output was written: the same command with --resume continues") from None
    bar.close()
    if eval_windows is not None:
        report["eval_perplexity_after"] = row["eval_perplexity"] if times else perplexity(model, eval_windows, plain_loss)
    timed = times[2:] or times                      # the first steps warm the allocator and kernels
    report.update(final_loss=losses[-1] if losses else None, step_seconds_median=statistics.median(timed) if timed
                  else None, peak_rss_mb=_peak_rss_mb(), resumed_at=start)
    if report["step_seconds_median"]:
        report["tokens_per_s"] = cfg.batch_size * cfg.grad_accum * dist.world * cfg.seqlen / report["step_seconds_median"]
    if cfg.checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    if plan.finish is not None:
        report.update(plan.finish() or {})
    if output is not None:
        _finish(state, plan, model, tokenizer, report)
    return report


@contextlib.contextmanager
def _deferred_interrupts():
    """Ctrl-C or SIGTERM inside the block is delivered when the block ends (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if caught:
            raise KeyboardInterrupt


def _start(state: _Run, plan: TrainPlan, opt: torch.optim.Optimizer, resume: bool) -> int:
    """The step to start from: 0, or the checkpoint's with resume (everything restored)."""
    partial = state.partial
    if partial is None:
        return 0
    saved = C.read_run(partial)
    if not resume:
        if partial.exists() and state.dist.main:
            if saved is not None:
                raise SlimlmError(f"{partial} holds an interrupted run (step {saved['step']}); add --resume to "
                                  f"continue it, or remove {partial} to start over")
            shutil.rmtree(partial)                 # metrics of a run that never checkpointed
        return 0
    if saved is None:
        raise SlimlmError(f"--resume: no checkpoint in {partial}; run without --resume to start")
    C.check_same_run(saved, state.run, partial)
    step, tensors = C.load(partial, opt)
    try:
        plan.restore(tensors)
    except (KeyError, RuntimeError) as e:
        raise SlimlmError(f"{partial}: the checkpoint does not fit this model and method ({e})") from None
    if state.dist.main:
        C.truncate_metrics(partial, step)
    state.saved_step = step
    log.info("resuming at step %d from %s", step, partial)
    return step


def _finish(state: _Run, plan: TrainPlan, model: nn.Module, tokenizer, report: dict) -> None:
    """Rank 0 writes the result into a temporary folder beside OUTPUT, then renames it into place."""
    out, partial = state.output, state.partial
    if state.dist.main:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            plan.save(model, tokenizer, tmp)
            if (partial / "metrics.jsonl").is_file():
                shutil.copyfile(partial / "metrics.jsonl", tmp / "metrics.jsonl")
            (tmp / "train_report.json").write_text(json.dumps({**report, **state.run}, indent=1, default=str) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    state.dist.barrier()
