"""Train with PEFT + transformers (the training peer) on batches written by slimlm's driver; report as JSON.

Runs in the SEPARATE venv made by bench/setup_peft_peer.sh and never imports slimlm: the model, the adapters
and the quantization are PEFT, transformers and bitsandbytes as a user of those tools would call them.

    bench/.venv-peft/bin/python bench/peer_peft.py --model ~/.cache/slimlm/models/smollm2-135m \
        --batches batches.safetensors --eval eval.safetensors --mode lora-qv --lr 2e-4 --steps 200 \
        --json bench/results/peer_peft_lora-qv.json

Inputs (safetensors): --batches holds "input_ids" (steps, B, L) int64 and "labels" (steps, B, L) int64,
already shifted (labels[..., t] is the target of position t; -100 = not scored); --eval holds "windows"
(n, L) int64. The loop is plain PyTorch, not the HF Trainer: per step, loss = mean cross-entropy over the
target tokens, backward, clip the global grad norm, AdamW step; the learning rate is a linear warmup over
int(warmup_frac * steps) steps then a cosine decay to 0 (transformers' get_cosine_schedule_with_warmup).
Each optimizer step is timed with time.perf_counter (and time.process_time, the CPU seconds); memory is the process's ru_maxrss. Perplexity:
exp(summed loss over every predicted token of each window / their count), fp32 logits, eval mode.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("lora-qv", "lora-all", "qlora-nf4", "full", "prompt", "ptuning", "prefix", "ptuning-v2")
PROMPT_MODES = ("prompt", "ptuning", "prefix", "ptuning-v2")
DEFAULT_TARGETS = {"lora-qv": "q_proj,v_proj", "lora-all": "all-linear", "qlora-nf4": "all-linear"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face folder of the fp32 model")
    p.add_argument("--batches", required=True, type=Path, help="safetensors: input_ids, labels (steps, B, L)")
    p.add_argument("--eval", type=Path, default=None, help="safetensors: windows (n, L); omit to skip perplexity")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--targets", default=None,
                   help="LoRA target modules, comma-separated, or all-linear (default: q_proj,v_proj for "
                        "lora-qv, all-linear for lora-all and qlora-nf4)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt modes: virtual tokens")
    p.add_argument("--encoder-hidden-size", type=int, default=None,
                   help="ptuning, prefix: hidden width of the prompt encoder / prefix MLP (default: the model's)")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup-frac", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of the run (the schedule's length); default: every batch in the file")
    p.add_argument("--time-steps", type=int, default=None,
                   help="timing only: run the first k steps of the --steps schedule and skip perplexity")
    p.add_argument("--untimed-steps", type=int, default=2,
                   help="steps left out of the median step time (allocator and kernel warm-up)")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto = what PEFT's docs do: on for qlora-nf4 (prepare_model_for_kbit_training's "
                        "default), off otherwise; on = use_reentrant=False")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the adapters are made")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the result here (it is also printed)")
    a = p.parse_args(argv)
    if (a.mode == "full" or a.mode in PROMPT_MODES) and a.targets:
        p.error("--targets applies to the LoRA modes only")
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be a positive number of steps")
    if a.time_steps is not None and a.time_steps < 1:
        p.error("--time-steps must be a positive number of steps")
    if not 0 <= a.warmup_frac < 1:
        p.error("--warmup-frac must be in [0, 1)")
    return a


# ----------------------------------------------------------------------------------------------- inputs
def load_batches(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    missing = {"input_ids", "labels"} - set(t)
    if missing:
        raise SystemExit(f"{path}: missing tensor(s) {sorted(missing)}; expected input_ids and labels")
    ids, labels = t["input_ids"], t["labels"]
    if ids.dim() != 3 or ids.shape != labels.shape or ids.dtype != torch.int64 or labels.dtype != torch.int64:
        raise SystemExit(f"{path}: input_ids and labels must be int64 (steps, B, L) of one shape; got "
                         f"{tuple(ids.shape)} {ids.dtype} and {tuple(labels.shape)} {labels.dtype}")
    return ids, labels


def load_windows(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    t = load_file(str(path))
    if "windows" not in t or t["windows"].dim() != 2:
        raise SystemExit(f"{path}: expected a tensor 'windows' of shape (n, L)")
    return t["windows"].long()


# ------------------------------------------------------------------------------------------------ model
def build_model(a: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The base model from transformers, adapted by PEFT as --mode says; returns it and what was done."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    info: dict = {"mode": a.mode}
    kwargs: dict = {"dtype": torch.float32}
    if a.mode == "qlora-nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        kwargs["quantization_config"] = q
        info["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}
    model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    model.config.use_cache = False

    gc = a.gradient_checkpointing
    if a.mode == "qlora-nf4":
        # PEFT's QLoRA recipe: freeze the base, upcast non-4-bit params, and (by default) checkpointing.
        if gc == "auto":
            model = prepare_model_for_kbit_training(model)
        else:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc == "on",
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        info["prepare_model_for_kbit_training"] = True
    elif gc == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if a.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif a.mode in PROMPT_MODES:
        import peft

        torch.manual_seed(a.seed)
        n, h = a.num_virtual_tokens, a.encoder_hidden_size or model.config.hidden_size
        cfg = {"prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                         prompt_tuning_init="SAMPLE_VOCAB"),
               "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                           encoder_hidden_size=h),
               "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                         prefix_projection=True, encoder_hidden_size=h),
               "ptuning-v2": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)}[a.mode]()
        model = peft.get_peft_model(model, cfg)
        info["prompt"] = {"num_virtual_tokens": n, "encoder_hidden_size": h, "peft_type": str(cfg.peft_type)}
    else:
        targets = a.targets or DEFAULT_TARGETS[a.mode]
        target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
        torch.manual_seed(a.seed)
        cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=target_modules,
                         bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        info["lora"] = {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target_modules": target_modules,
                        "bias": "none", "adapted_modules": sorted({n.rsplit(".", 1)[-1] for n, m in
                                                                   model.named_modules() if hasattr(m, "lora_A")})}
        info["lora"]["adapted_module_count"] = sum(1 for _, m in model.named_modules()
                                                   if hasattr(m, "lora_A") and len(m.lora_A))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(type(base), "is_activation_checkpointing", None)             # transformers >= 5.x
    info["gradient_checkpointing"] = bool(base.is_activation_checkpointing if flag is not None
                                          else getattr(base, "is_gradient_checkpointing", False))
    info["quantized_linear_modules"] = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    params = {id(p): p for p in model.parameters()}.values()          # tied weights count once
    info["trainable_parameters"] = sum(p.numel() for p in params if p.requires_grad)
    info["total_parameters"] = sum(_logical_numel(p) for p in params)
    return model, info


def _logical_numel(p: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a bitsandbytes Params4bit packs two per byte."""
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None else p.numel()


# ------------------------------------------------------------------------------------------------- loop
def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens; labels are already shifted (labels[:, t] follows t)."""
    logits = model(input_ids=input_ids, use_cache=False).logits        # (B, L, V); (B, n + L, V) with a prompt
    logits = logits[:, -input_ids.shape[1]:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def train(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, a: argparse.Namespace,
          total: int, run: int) -> dict:
    """`run` optimizer steps of a `total`-step schedule over batches ids[i], labels[i]."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    warmup = int(a.warmup_frac * total)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    out: dict = {"total_steps": total, "warmup_steps": warmup, "steps_run": run, "loss": [], "lr": [],
                 "grad_norm": [], "step_s": [], "step_cpu_s": [], "target_tokens": []}
    model.train()
    t_all = time.perf_counter()
    for step in range(run):
        x, y = ids[step], labels[step]
        lr = sched.get_last_lr()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = lm_loss(model, x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_v = loss.item()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["loss"].append(loss_v)
        out["lr"].append(lr)
        out["grad_norm"].append(float(norm))
        out["step_s"].append(dt)
        out["step_cpu_s"].append(cpu)                                   # all threads: less noisy when shared
        out["target_tokens"].append(int((y != -100).sum()))
        print(f"step {step + 1}/{run} loss {loss_v:.4f} lr {lr:.3e} {dt:.2f} s", file=sys.stderr, flush=True)
    out["wall_s"] = time.perf_counter() - t_all
    timed = out["step_s"][a.untimed_steps:] or out["step_s"]
    out["median_step_s"] = statistics.median(timed)
    out["median_step_cpu_s"] = statistics.median(out["step_cpu_s"][a.untimed_steps:] or out["step_cpu_s"])
    out["median_over_steps"] = len(timed)
    out["tokens_per_s"] = ids.shape[1] * ids.shape[2] / out["median_step_s"]
    out["final_loss"] = out["loss"][-1]
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> dict:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x in windows.split(batch):
        logits = model(input_ids=x, use_cache=False).logits.float()[:, -x.shape[1]:]    # (b, L, V)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was)
    return {"ppl": math.exp(total / count), "nll_sum": total, "tokens_scored": count,
            "windows": int(windows.shape[0])}


# --------------------------------------------------------------------------------------------- records
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                  "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                                 if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        info["cpu_model"] = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = set(next(ln for ln in cpuinfo.splitlines() if ln.startswith("flags")).split(":", 1)[1].split())
        for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"):
            info[f] = f in flags
    except (OSError, StopIteration):
        pass
    return info


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ids, labels = load_batches(a.batches)
    total = a.steps if a.steps is not None else ids.shape[0]
    run = min(a.time_steps, total) if a.time_steps is not None else total
    if total > ids.shape[0]:
        raise SystemExit(f"--steps {total} but {a.batches} holds {ids.shape[0]} batches")

    result: dict = {"tool": "peft", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                    "data": {"steps_in_file": int(ids.shape[0]), "batch_size": int(ids.shape[1]),
                             "seqlen": int(ids.shape[2]), "input_ids_sum": int(ids.sum()),
                             "target_tokens_per_step_first": int((labels[0] != -100).sum())}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        model, info = build_model(a)
        info["load_s"] = time.perf_counter() - t0
        result["model"] = info
        result["memory"] = {"peak_rss_mb_after_load": peak_rss_mb(), "rss_mb_after_load": rss_mb()}
        windows = load_windows(a.eval) if a.eval is not None and a.time_steps is None else None
        result["eval"] = {}
        if windows is not None:
            result["eval"]["before"] = perplexity(model, windows, a.eval_batch)
            result["memory"]["peak_rss_mb_after_eval_before"] = peak_rss_mb()
        result["train"] = train(model, ids, labels, a, total, run)
        result["memory"]["peak_rss_mb_after_train"] = peak_rss_mb()
        if windows is not None:
            result["eval"]["after"] = perplexity(model, windows, a.eval_batch)
            print(f"perplexity {result['eval']['before']['ppl']:.3f} -> {result['eval']['after']['ppl']:.3f}",
                  file=sys.stderr)
    result["memory"]["peak_rss_mb"] = peak_rss_mb()
    result["tool_warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught})
    for w in result["tool_warnings"]:
        print(w, file=sys.stderr)
    result["versions"] = versions()
    result["machine"] = machine()
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
