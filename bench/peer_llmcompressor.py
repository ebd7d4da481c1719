"""Run llm-compressor (the peer tool) on the standard benchmark: same model, data, windows and settings.

Runs in the SEPARATE peer venv made by bench/setup_peer.sh and never imports slimlm:

    ~/.cache/slimlm/peer-venv/bin/python bench/peer_llmcompressor.py --model DIR --method gptq \
        --bits 4 --group-size 64 --calib ../shared/corpora/austen_prideprejudice.txt \
        --eval ../shared/corpora/austen_persuasion.txt --json bench/results/peer_gptq_w4g64.json

Protocol (../shared/BENCHMARKS.md): each file is tokenized whole with no special tokens. Calibration:
torch.manual_seed(0), starts = torch.randint(0, n_tokens - seqlen, (samples,)), window i =
ids[starts[i]:starts[i]+seqlen] (the rule slimlm uses, so both tools see identical windows). Perplexity:
non-overlapping 512-token windows, remainder dropped, fp32 forward, summed token losses / count;
quick = first 32 windows. Only the oneshot call is timed; peak RSS is the process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

QUANT_METHODS = ("rtn", "gptq", "awq")
SPARSE_METHODS = ("sparsegpt", "wanda")
QUICK_WINDOWS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face folder of the fp32 default model")
    p.add_argument("--method", required=True, choices=QUANT_METHODS + SPARSE_METHODS + ("none",))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="-1 = per output channel")
    p.add_argument("--sparsity", default="0.5", help="fraction (0.5) or N:M pattern (2:4, 4:8)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib", type=Path, default=None, help="calibration text file")
    p.add_argument("--eval", type=Path, nargs="+", default=[], help="evaluation text file(s)")
    p.add_argument("--windows", default="quick",
                   help="quick (first 32 windows, the protocol's), full, or an integer N for smoke runs")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--actorder", choices=("static", "weight", "group", "none"), default="static",
                   help="GPTQ activation ordering (llm-compressor's default is static)")
    p.add_argument("--dampening", type=float, default=0.01, help="GPTQ/SparseGPT dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ/SparseGPT block_size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.method in QUANT_METHODS + SPARSE_METHODS and args.method != "rtn" and args.calib is None:
        p.error(f"--method {args.method} needs --calib FILE")
    if args.windows not in ("quick", "full") and not args.windows.isdigit():
        p.error("--windows must be quick, full or a positive integer")
    if args.group_size == 0 or args.group_size < -1:
        p.error("--group-size must be a positive integer or -1 (per channel)")
    return args


def tokenize_file(tok, path: Path) -> torch.Tensor:
    """Whole file at once, no special tokens -> (n_tokens,) int64."""
    text = path.read_text(encoding="utf-8")
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, seqlen) windows at random offsets drawn right after torch.manual_seed(0), and the offsets."""
    n_tokens = ids.numel()
    if n_tokens <= seqlen:
        raise SystemExit(f"calibration text has {n_tokens} tokens, fewer than seqlen {seqlen}")
    torch.manual_seed(0)
    starts = torch.randint(0, n_tokens - seqlen, (samples,))
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()]), starts


def weight_args(bits: int, group_size: int) -> dict:
    """Asymmetric integer weights, per group or per output channel (compressed-tensors QuantizationArgs)."""
    args = {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False}
    if group_size == -1:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=group_size)
    return args


def build_recipe(a: argparse.Namespace) -> tuple[list, list[dict]]:
    """Return (modifiers, a JSON-able description of them)."""
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if a.method in QUANT_METHODS:
        groups = {"group_0": {"targets": ["Linear"], "weights": weight_args(a.bits, a.group_size)}}
        common = {"config_groups": groups, "ignore": ["lm_head"]}
        if a.method == "rtn":
            kw = [("QuantizationModifier", common)]
        elif a.method == "gptq":
            actorder = None if a.actorder == "none" else a.actorder
            kw = [("GPTQModifier", {**common, "actorder": actorder, "block_size": a.block_size,
                                    "dampening_frac": a.dampening})]
        else:
            kw = [("AWQModifier", {"duo_scaling": True, "n_grid": 20}), ("QuantizationModifier", common)]
    else:
        if ":" in a.sparsity:
            n, m = (int(x) for x in a.sparsity.split(":"))
            sparsity, mask = n / m, a.sparsity
        else:
            sparsity, mask = float(a.sparsity), "0:0"
        common = {"sparsity": sparsity, "mask_structure": mask, "targets": ["Linear"],
                  "ignore": ["re:.*lm_head"]}
        if a.method == "sparsegpt":
            kw = [("SparseGPTModifier", {**common, "block_size": a.block_size,
                                         "dampening_frac": a.dampening})]
        else:
            kw = [("WandaPruningModifier", common)]
    classes = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier,
               "AWQModifier": AWQModifier, "SparseGPTModifier": SparseGPTModifier,
               "WandaPruningModifier": WandaPruningModifier}
    modifiers = [classes[name](**kwargs) for name, kwargs in kw]
    return modifiers, [{name: kwargs} for name, kwargs in kw]


def patch_for_cpu() -> list[str]:
    """Work around llm-compressor 0.14 code that assumes an accelerator; return what was patched.

    AWQModifier pins its cached block inputs (IntermediatesCache.pin_memory) before the grid search, and
    torch's tensor.pin_memory() raises "Cannot access accelerator device when none is available" on a
    CPU-only torch. Pinning only speeds host-to-device copies, so a no-op changes no number.
    """
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    def _no_pin(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = _no_pin
    return ["llmcompressor.pipelines.cache.IntermediatesCache.pin_memory -> no-op (no accelerator)"]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None) -> dict:
    n_win = ids.numel() // seqlen
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    total, count = 0.0, 0
    for w in range(n_win):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += loss.item()
        count += seqlen - 1
    return {"ppl": math.exp(total / count), "nll_sum": total, "tokens_scored": count, "windows": n_win,
            "n_tokens": ids.numel()}


def model_checks(model) -> dict:
    """Facts about the compressed model: zero fraction of the decoder's linear weights as the forward pass
    sees them (after fake quantization, so RTN/GPTQ/AWQ show the zeros of the grid too), levels per group."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    zeros = total = n_quant = 0
    max_levels = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "lm_head" in name:
            continue
        w = mod.weight.data
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            n_quant += 1
            if name.endswith("layers.0.self_attn.q_proj") or name.endswith("layers.0.mlp.down_proj"):
                wq = forward_quantize(mod, w, "weight", scheme.weights)
                gs = scheme.weights.group_size or wq.shape[1]
                groups = wq.reshape(wq.shape[0], -1, gs)
                levels = max(len(torch.unique(groups[r, g])) for r in range(0, wq.shape[0], 37)
                             for g in range(groups.shape[1]))
                max_levels = max(max_levels, levels)
            w = forward_quantize(mod, w, "weight", scheme.weights)
        zeros += int((w == 0).sum())
        total += w.numel()
    out = {"effective_weight_zero_fraction": zeros / total, "quantized_linear_modules": n_quant}
    if n_quant:
        out["max_levels_per_group_sampled"] = max_levels
    return out


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # llm-compressor logs to stdout: send everything written to fd 1 to stderr, keep stdout for the JSON.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    result: dict = {"tool": "llm-compressor", "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(a).items()}}
    result["settings"]["eval"] = [str(p) for p in a.eval]

    wall = None
    if a.method != "none":
        from datasets import Dataset
        from llmcompressor import oneshot
        from loguru import logger

        result["patches"] = patch_for_cpu()
        modifiers, recipe_desc = build_recipe(a)
        result["recipe"] = recipe_desc
        kwargs: dict = {"model": model, "tokenizer": tok, "recipe": modifiers}
        if a.method != "rtn":
            calib_ids = tokenize_file(tok, a.calib)
            calib, starts = calibration_windows(calib_ids, a.samples, a.seqlen)
            ds = Dataset.from_dict({"input_ids": calib.tolist(),
                                    "attention_mask": torch.ones_like(calib).tolist()})
            kwargs.update(dataset=ds, num_calibration_samples=a.samples, max_seq_length=a.seqlen,
                          shuffle_calibration_samples=False, batch_size=1)
            result["calibration"] = {"n_tokens": calib_ids.numel(), "windows": int(calib.shape[0]),
                                     "seqlen": int(calib.shape[1]), "starts_first8": starts[:8].tolist(),
                                     "token_sum": int(calib.sum())}
        warnings: list[str] = []  # e.g. GPTQ's "Hessian inversion failed for k/n modules" (RTN fallback)
        sink = logger.add(lambda msg: warnings.append(str(msg).strip()[:400]), level="WARNING")
        t0 = time.perf_counter()
        model = oneshot(**kwargs)
        wall = time.perf_counter() - t0
        logger.remove(sink)
        # loguru METRIC lines (per-module times and errors) rank above WARNING: keep the real warnings only
        result["tool_warnings"] = [w for w in warnings if "| METRIC " not in w]
        model.eval()
    result["wall_s"] = wall
    result["peak_rss_mb_after_compress"] = peak_rss_mb()
    result["checks"] = model_checks(model)

    if a.windows == "quick":
        max_windows = QUICK_WINDOWS
    elif a.windows == "full":
        max_windows = None
    else:
        max_windows = int(a.windows)
    result["ppl"] = {}
    for path in a.eval:
        r = perplexity(model, tokenize_file(tok, path), a.eval_seqlen, max_windows)
        result["ppl"][path.name] = r
        print(f"{path.name}: ppl {r['ppl']:.4f} ({r['windows']} windows, {r['tokens_scored']} tokens)",
              file=sys.stderr)
    result["peak_rss_mb"] = peak_rss_mb()
    result["versions"] = versions()
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    json_out.write(text + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
