"""Benchmarks by the protocol of ../shared/BENCHMARKS.md. Each suite writes bench/results/<suite>.json.

    python bench/run.py baseline            # the fp32 default model: perplexity (quick and full), speed, memory

Every measurement that reports memory runs in its own process, so peak RSS is that measurement's own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402


def _child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process (its own peak RSS); it prints one JSON line last."""
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {argv} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_eval(model_ref: str, windows: str, speed: bool, reference: str | None = None) -> dict:
    """In this process: load, perplexity on both texts, optional agreement and speed, peak RSS."""
    import torch

    import slimlm
    from slimlm import data as D
    from slimlm import metrics as M
    from slimlm import models

    torch.set_num_threads(P.THREADS)
    t0 = time.perf_counter()
    model = slimlm.load_model(model_ref)
    load_s = time.perf_counter() - t0
    rss_after_load = M.peak_rss_bytes()
    tok = slimlm.load_tokenizer(model_ref)
    ref = slimlm.load_model(reference) if reference else None
    out = {"model": model_ref, "load_seconds": load_s, "peak_rss_after_load_mb": rss_after_load / 2**20,
           **M.as_dict(M.size(model, models.files_bytes(model_ref)))}
    n = None if windows == "all" else int(windows)
    for key, fname in P.EVAL_TEXTS.items():
        ids = D.tokenize(tok, D.load_text(P.corpus(fname)))
        win = D.eval_windows(ids, P.SEQLEN, n)
        r = M.perplexity(model, win, progress=False)
        out[f"ppl_{key}"] = r["perplexity"]
        out[f"tokens_{key}"] = r["tokens"]
        if ref is not None:
            a = M.agreement(model, ref, win, progress=False)
            out[f"kl_{key}"] = a["kl_divergence"]
            out[f"top1_{key}"] = a["top1_agreement"]
    if speed:
        ids = D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["persuasion"])))
        out.update(M.speed(model, ids[:128], new_tokens=64, runs=5))
    out["peak_rss_mb"] = M.peak_rss_bytes() / 2**20
    return out


def suite_baseline(args) -> None:
    quick = _child(["eval-one", P.MODEL, str(P.QUICK_WINDOWS), "--speed"])
    full = _child(["eval-one", P.MODEL, "all"])
    figures = {"quick": quick, "full": {k: v for k, v in full.items() if k.startswith(("ppl_", "tokens_"))}}
    path = P.write_result("baseline_fp32", {"dtype": "float32"}, figures)
    print(f"wrote {path}")
    print(json.dumps({k: quick[k] for k in quick if k.startswith(("ppl_", "decode", "prefill", "load", "peak"))}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("baseline", help="the fp32 default model")
    one = sub.add_parser("eval-one", help="(internal) one evaluation in this process")
    one.add_argument("model")
    one.add_argument("windows")
    one.add_argument("--speed", action="store_true")
    one.add_argument("--reference")
    args = ap.parse_args()
    if args.cmd == "eval-one":
        print(json.dumps(measure_eval(args.model, args.windows, args.speed, args.reference)))
    elif args.cmd == "baseline":
        suite_baseline(args)


if __name__ == "__main__":
    main()
