"""slimlm's own 4-bit CPU runtime against the fp32 default model: prefill (a 512-token prompt) and greedy
decode tokens/s at batch 1, measured in alternation in one process (4-bit, fp32, 4-bit, fp32, ...) so that
machine noise hits both alike; medians over runs and the median of the per-run ratios. Records the CPU (model,
flags, whether it multiplies bf16 natively) and the path each quantized layer takes at 1 row and at the prompt's rows.

    python bench/cpu_runtime.py --label after [--runs 7] [--prompt 512] [--new-tokens 32] [--method rtn]
    SLIMLM_BENCH_THREADS=1 python bench/cpu_runtime.py --label after --clock cpu    # on a shared machine

Writes bench/results/cpu_runtime_<label>.json. --method gptq calibrates on the protocol's windows first
(minutes); rtn (the default) gives the same resident layout (4-bit g64, asymmetric, no act-order).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402


def cpu_description() -> dict:
    from slimlm.hardware import _cpu_flags, cpu_has_native_bf16

    text = Path("/proc/cpuinfo").read_text()
    model = "?"
    if "model name" in text:
        model = text.split("model name", 1)[1].split(":", 1)[1].split("\n")[0].strip()
    flags = _cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))
    return {"cpu_model": model, "native_bf16": cpu_has_native_bf16(), "flags": shown}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--note", default="", help="recorded in the settings (e.g. which code ran)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the timing thread's CPU time (with SLIMLM_BENCH_THREADS=1), robust to other "
                         "processes sharing the cores; wall: elapsed time (the protocol)")
    args = ap.parse_args()
    import torch

    import slimlm
    from slimlm import api
    from slimlm import data as D
    from slimlm import metrics as M
    from slimlm.configs import build_config
    from slimlm.quant.linear import QuantLinear
    from slimlm.registry import get

    torch.set_num_threads(P.THREADS)
    if args.clock == "cpu":
        import time
        import types

        if P.THREADS != 1:
            sys.exit("--clock cpu needs SLIMLM_BENCH_THREADS=1 (one thread's CPU time is the whole work)")
        M.time = types.SimpleNamespace(perf_counter=time.thread_time)      # the clock metrics.speed reads
    fp32 = slimlm.load_model(P.MODEL).eval()
    tok = slimlm.load_tokenizer(P.MODEL)
    q = copy.deepcopy(fp32)
    options = {"bits": "4", "group_size": "64"}
    cfg = build_config(get("quantize", args.method).config_cls, options, args.method)
    if args.method == "gptq":
        ids = D.tokenize(tok, D.load_text(P.corpus(P.CALIB_TEXT)))
        calib = D.calibration_windows(ids, P.CALIB_SAMPLES, P.SEQLEN)
        api.quantize(q, cfg, calib)
    else:
        api.quantize(q, cfg)
    q.eval()
    prompt = D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["persuasion"])))[:args.prompt]
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    path_of = getattr(QuantLinear, "cpu_path", None)
    paths = {}
    for rows in (1, args.prompt):
        seen = {}
        for m in layers:
            key = f"{m.in_features}->{m.out_features} {m.layout}"
            if path_of:
                seen[key] = path_of(m, rows)
            elif m.layout == "int4" and hasattr(m, "_kernel_rows"):   # code from before cpu_path existed
                seen[key] = "kernel" if m._kernel_rows(rows, torch.device("cpu")) else "dense"
            else:
                seen[key] = m.layout
        paths[rows] = seen
    models = {"int4": q, "fp32": fp32}
    got = {k: {"decode": [], "prefill": []} for k in models}
    with torch.no_grad():
        for m in models.values():
            M.speed(m, prompt, new_tokens=2, runs=1)                     # warm-up (buffers, caches)
        for i in range(args.runs):
            for k, m in models.items():
                r = M.speed(m, prompt, new_tokens=args.new_tokens, runs=1)
                got[k]["decode"].append(r["decode_tokens_per_s"])
                got[k]["prefill"].append(r["prefill_tokens_per_s"])
            line = ", ".join(f"{k} prefill {got[k]['prefill'][-1]:.1f} decode {got[k]['decode'][-1]:.2f}"
                             for k in models)
            print(f"run {i}: {line}", flush=True)
    med = {k: {f: statistics.median(v) for f, v in d.items()} for k, d in got.items()}
    paired = {f: [a / b for a, b in zip(got["int4"][f], got["fp32"][f])] for f in ("decode", "prefill")}
    figures = {
        "cpu": cpu_description(),
        "paths": {str(k): v for k, v in paths.items()},
        "tokens_per_s": med,
        "vs_fp32": {f: med["int4"][f] / med["fp32"][f] for f in ("decode", "prefill")},
        "vs_fp32_paired_median": {f: statistics.median(v) for f, v in paired.items()},
        "vs_fp32_runs": paired,
        "runs": got,
    }
    import slimlm.quant.linear as QL

    settings = {"label": args.label, "note": args.note, "slimlm_source": QL.__file__,
                "int4_dense_rows": {str(k): v for k, v in getattr(QL, "INT4_DENSE_ROWS", {}).items()},
                "runs": args.runs, "prompt_tokens": int(prompt.shape[0]), "new_tokens": args.new_tokens,
                "clock": args.clock, "threads": P.THREADS, "int4": f"{args.method} w4 g64 asymmetric"}
    out = P.write_result(f"cpu_runtime_{args.label}", settings, figures)
    x, pm = figures["vs_fp32"], figures["vs_fp32_paired_median"]
    print(f"prefill x {x['prefill']:.3f} (paired {pm['prefill']:.3f}), "
          f"decode x {x['decode']:.3f} (paired {pm['decode']:.3f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
