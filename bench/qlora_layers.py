"""Quantized base layers at QLoRA training shapes: forward y = m(x) and backward dL/dx (the base is frozen,
so the backward is the input gradient only), against fp32 nn.Linear measured alternately in the same run.

Layers: fp32 nn.Linear; QuantLinear 4-bit g64 (asymmetric RTN) in the "int4" layout (CPU int4 kernel, bf16
activations) and in the "packed" layout (unpack + dequantize in fp32 + matmul); NF4Linear (NF4, blocks of 64,
double quant); Int8Linear (LLM.int8(), threshold 6). Shapes: the four linear shapes of SmolLM2-135M
(576->576, 576->192, 576->1536, 1536->576) at M = 1 (decode), 128 and 2048 (4 x 512 tokens: a training step)
rows. Each repetition times every layer in turn (inner calls averaged); the figures are medians over
repetitions, and each ratio is the median of the per-repetition ratios to the fp32 layer.

    python bench/qlora_layers.py [--reps 9] [--rows 1,128,2048] [--sweep-rows 1,8,16,32,64,128,512,2048]

Writes bench/results/<name>.json (default qlora_layers). Also records the path each layer took, the bytes
autograd saves for backward per layer (what a training step holds until its backward: a dequantized float
weight saved there is held for every layer at once), each layer's resident storage, and a forward-only
sweep over rows of the two paths the int4 layout can take (the int4 kernel, or dequantize + fp32 matmul)
and of LLM.int8() against a dense fp32 product, from which the path thresholds are chosen.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))   # (in, out) of SmolLM2-135M's linear layers
TARGET_S = 0.02                                               # seconds of calls per layer per repetition
CLOCK = {"fn": time.perf_counter}                             # --clock cpu: this thread's CPU time


def build_layers(K: int, N: int) -> dict:
    import torch
    from torch import nn

    from slimlm.core.quant import QuantResult, default_g_idx, rtn_quantize
    from slimlm.quant.int8_linear import Int8Linear
    from slimlm.quant.linear import QuantLinear
    from slimlm.quant.nf4_linear import NF4Linear

    W = torch.randn(N, K, generator=torch.Generator().manual_seed(K * 7 + N)) * K ** -0.5
    fp32 = nn.Linear(K, N, bias=False)
    fp32.weight.data.copy_(W)
    fp32.weight.requires_grad_(False)
    q, s, z = rtn_quantize(W, 4, False, 64)
    r = QuantResult(q, s, z, default_g_idx(K, 64), 4, 64, False)
    int4 = QuantLinear.from_result(r)
    packed = QuantLinear.from_result(r)
    packed._build(r.codes, r.scale, r.zero, r.g_idx, kernels=False)
    assert int4.layout == "int4" and packed.layout == "packed"
    return {"fp32": fp32, "quant_int4": int4, "quant_packed": packed,
            "nf4_dq": NF4Linear.from_weight(W, None, "nf4", 64, double_quant=True),
            "int8": Int8Linear.from_weight(W, None)}


def paths(name: str, m, rows: int) -> str:
    """The forward / backward path the layer takes at this many rows (also for the code before the per-shape
    paths, run with --sweep-rows '' for a before/after comparison)."""
    import torch

    deq = "dequantize fp32 + matmul"
    if name == "fp32":
        return "fp32 matmul / fp32 matmul"
    if name == "quant_int4":
        kernel = m._kernel_rows(rows, torch.device("cpu")) if hasattr(m, "_kernel_rows") else True
        fwd = "int4 kernel (bf16 x)" if kernel else "decode codes + " + deq
        codes = "decode codes" if getattr(m, "kernel_block", 0) else "codes read through the kernel (identity x)"
        return f"{fwd} / {codes} + {deq}"
    if name == "quant_packed":
        return f"unpack + {deq} / unpack + {deq}"
    if name == "nf4_dq":
        return f"{deq} / " + (deq if hasattr(m, "matmul") else "matmul with the forward's W_hat (saved)")
    if not hasattr(m, "matmul"):
        return f"LLM.int8 (int8 x int8) / {deq}"
    from slimlm.quant import int8_linear

    dense = rows >= int8_linear.INT8_DENSE_ROWS
    return ("dequantize fp32 + matmul" if dense else "LLM.int8 (int8 x int8)") + f" / {deq}"


def time_layer(m, x, gy, inner: int) -> tuple[float, float]:
    """Mean seconds of one forward and of one backward (dL/dx) over `inner` calls."""
    import torch

    fwd = bwd = 0.0
    for _ in range(inner):
        t0 = CLOCK["fn"]()
        y = m(x)
        t1 = CLOCK["fn"]()
        torch.autograd.grad(y, x, gy)
        t2 = CLOCK["fn"]()
        fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
    return fwd / inner, bwd / inner


def saved_bytes(m, x) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of m (fresh allocations only,
    not the layer's own parameters or buffers)."""
    import torch

    own = {t.data_ptr() for t in list(m.parameters()) + list(m.buffers()) if t is not None}
    total = [0]

    def pack(t):
        if t.data_ptr() not in own and t.data_ptr() != x.data_ptr():
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    return total[0]


def resident_bytes(m) -> int:
    ts = [t for t in list(m.parameters()) + list(m.buffers()) if t is not None]
    return sum(t.numel() * t.element_size() for t in ts)


def bench_shape(K: int, N: int, M: int, reps: int) -> dict:
    import torch

    layers = build_layers(K, N)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).requires_grad_(True)
    gy = torch.randn(M, N, generator=g)
    inner = {}
    for name, m in layers.items():                       # warm up, then size the inner loop
        time_layer(m, x, gy, 2)
        f, b = time_layer(m, x, gy, 3)
        inner[name] = max(1, min(500, round(TARGET_S / max(f + b, 1e-6))))
    runs = {name: {"fwd": [], "bwd": []} for name in layers}
    for _ in range(reps):
        for name, m in layers.items():
            f, b = time_layer(m, x, gy, inner[name])
            runs[name]["fwd"].append(f)
            runs[name]["bwd"].append(b)
    base = runs["fp32"]
    out = {}
    for name, r in runs.items():
        tot = [f + b for f, b in zip(r["fwd"], r["bwd"])]
        btot = [f + b for f, b in zip(base["fwd"], base["bwd"])]
        out[name] = {
            "fwd_ms": 1e3 * statistics.median(r["fwd"]), "bwd_ms": 1e3 * statistics.median(r["bwd"]),
            "fwd_bwd_ms": 1e3 * statistics.median(tot),
            "ratio_fwd": statistics.median(a / b for a, b in zip(r["fwd"], base["fwd"])),
            "ratio_bwd": statistics.median(a / b for a, b in zip(r["bwd"], base["bwd"])),
            "ratio_fwd_bwd": statistics.median(a / b for a, b in zip(tot, btot)),
            "inner": inner[name], "saved_for_backward_bytes": saved_bytes(layers[name], x),
            "resident_bytes": resident_bytes(layers[name]),
            "path": paths(name, layers[name], M),
        }
    return out


def sweep(K: int, N: int, rows: list[int], reps: int) -> list[dict]:
    """Forward only (no autograd, as in decoding): fp32, NF4Linear, the int4 layout on its kernel and on
    dequantize + matmul, LLM.int8() and Int8Linear's weight dequantized + matmul, alternating; medians and
    median ratios to fp32. Without the per-shape paths (the code before them) only fp32, NF4, the int4
    layout as it runs and LLM.int8()."""
    import torch

    from slimlm.core.llm_int8 import int8_linear
    from slimlm.quant import linear as QL

    layers = build_layers(K, N)
    int4, int8, fp32 = layers["quant_int4"], layers["int8"], layers["fp32"]
    limits = dict(getattr(QL, "INT4_DENSE_ROWS", {}))

    def forced(dense_from):
        def f(x):
            QL.INT4_DENSE_ROWS.update({True: dense_from, False: dense_from})
            try:
                return int4(x)
            finally:
                QL.INT4_DENSE_ROWS.update(limits)
        return f

    cases = {"fp32": fp32, "nf4_dq": layers["nf4_dq"], "int4_kernel": forced(None), "int4_dense": forced(1),
             "int8_llm_int8": lambda x: int8_linear(x, int8.weight, int8.SCB, None, int8.threshold),
             "int8_dense": lambda x: x @ int8.dequantize_weight(x.dtype).T}
    if not limits:
        cases = {k: v for k, v in cases.items() if k not in ("int4_dense", "int8_dense")}
        cases["int4_kernel"] = int4
    out = []
    with torch.no_grad():
        for M in rows:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
            inner = {}
            for k, f in cases.items():
                f(x)
                t = CLOCK["fn"]()
                f(x)
                inner[k] = max(1, min(500, round(TARGET_S / max(CLOCK["fn"]() - t, 1e-6))))
            runs = {k: [] for k in cases}
            for _ in range(reps):
                for k, f in cases.items():
                    t = CLOCK["fn"]()
                    for _ in range(inner[k]):
                        f(x)
                    runs[k].append((CLOCK["fn"]() - t) / inner[k])
            row = {"in": K, "out": N, "rows": M}
            for k, v in runs.items():
                row[k] = {"ms": 1e3 * statistics.median(v),
                          "ratio": statistics.median(a / b for a, b in zip(v, runs["fp32"]))}
            print(f"sweep {K:>5}->{N:<5} M={M:<5} " + "  ".join(
                f"{k} {row[k]['ms']:.3f} ms ({row[k]['ratio']:.2f}x)" for k in cases), flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rows", default="1,128,2048", help="comma-separated M (rows of x)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="in x out, comma-separated")
    ap.add_argument("--sweep-rows", default="1,8,16,32,64,128,512,2048",
                    help="rows of the forward-only path sweep; empty: no sweep")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: wall time at the protocol's threads; cpu: the CPU time of one thread (torch on 1 "
                         "thread), which time slices lost to other processes on a loaded machine do not inflate")
    ap.add_argument("--name", default="qlora_layers", help="results file bench/results/<name>.json")
    args = ap.parse_args()
    import torch

    from slimlm.hardware import native_bf16

    torch.set_num_threads(1 if args.clock == "cpu" else P.THREADS)
    if args.clock == "cpu":
        CLOCK["fn"] = time.thread_time
    rows = [int(v) for v in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    figures = {"layers": [], "sweep": []}
    for K, N in shapes:
        if args.sweep_rows:
            figures["sweep"] += sweep(K, N, [int(v) for v in args.sweep_rows.split(",")], args.reps)
    for K, N in shapes:
        for M in rows:
            res = bench_shape(K, N, M, args.reps)
            figures["layers"].append({"in": K, "out": N, "rows": M, "layers": res})
            for name, r in res.items():
                print(f"{K:>5}->{N:<5} M={M:<5} {name:<13} fwd {r['fwd_ms']:8.3f} ms  bwd {r['bwd_ms']:8.3f} ms"
                      f"  x fp32: fwd {r['ratio_fwd']:6.2f} bwd {r['ratio_bwd']:6.2f} "
                      f"both {r['ratio_fwd_bwd']:6.2f}  saved {r['saved_for_backward_bytes'] / 2**20:7.2f} MiB"
                      f"  path {r['path']}", flush=True)
    settings = {"reps": args.reps, "rows": rows, "shapes": shapes, "quant": "QuantLinear rtn w4 g64 asym; "
                "NF4 blocks 64 double quant; LLM.int8() threshold 6", "x": "randn (M, in), gy randn (M, out)",
                "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16("cpu"), "clock": args.clock}
    path = P.write_result(args.name, settings, figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
