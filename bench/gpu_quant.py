"""4-bit weights on a CUDA GPU: QuantLinear's int4 layout (aten._weight_int4pack_mm) against dense bfloat16
and against dequantize-then-matmul, same GPU, same run.

    python bench/gpu_quant.py [--runs 7]

1. The default model (or its architecture with random weights where it does not load: see gpu_common.py),
   RTN 4-bit group 64 (on the CPU), moved to the GPU in bfloat16 three ways: dense (the unquantized
   weights), the int4 kernel layout, and the same codes dequantized at each call ("packed"). Reported:
   which layouts the layers took, the logits of the kernel against the dequantized product of the same
   codes (the kernel's own error), bytes held on the GPU, prefill (batch x 512 tokens) and greedy decode
   (batch 1, KV cache) tokens/s, the three alternating, medians.
2. Single layers at 1, 16, 512 and 4096 tokens, the model's shapes and a 4096-wide model's: dense bf16,
   the int4 kernel, and dequantize-then-matmul, by CUDA events; the kernel's largest relative error against
   x @ W_hat^T in fp32.
Writes bench/results/quant_gpu.json. Exits with a message where there is no CUDA GPU.
"""
from __future__ import annotations

import copy
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402
import protocol as P  # noqa: E402


def _force_packed(model) -> None:
    """Every QuantLinear dequantizes at each call (the layout a GPU without the int4 kernel would use)."""
    from slimlm.quant.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m._build(m.codes(), m.scale, m.zero, m.g_idx, kernels=False)


def model_figures(args) -> dict:
    import torch

    from slimlm import api
    from slimlm import metrics as M
    from slimlm.configs import build_config
    from slimlm.quant.linear import QuantLinear
    from slimlm.registry import get

    model, source = G.default_model()
    qmodel = copy.deepcopy(model)
    rtn = get("quantize", "rtn")
    api.quantize(qmodel, build_config(rtn.config_cls, {"bits": "4", "group_size": "64"}, "rtn"))
    packed = copy.deepcopy(qmodel)
    dense = model.to("cuda", torch.bfloat16).eval()
    kernel = qmodel.to("cuda", torch.bfloat16).eval()
    packed = packed.to("cuda", torch.bfloat16).eval()
    _force_packed(packed)
    layouts = Counter(m.layout for m in kernel.modules() if isinstance(m, QuantLinear))
    batch, text = G.token_batch(args.batch, P.SEQLEN, dense.config.vocab_size)
    batch = batch.cuda()
    with torch.no_grad():
        lk, lp, ld = (m(input_ids=batch).logits.float() for m in (kernel, packed, dense))
    kernel_err = {"rel_l2": float((lk - lp).norm() / lp.norm()), "max_abs": float((lk - lp).abs().max()),
                  "top1_agreement": float((lk.argmax(-1) == lp.argmax(-1)).float().mean())}
    quant_err = {"rel_l2": float((lk - ld).norm() / ld.norm()),
                 "top1_agreement": float((lk.argmax(-1) == ld.argmax(-1)).float().mean())}
    del lk, lp, ld
    prompt = batch[0, :128]
    runs = {k: {"prefill": [], "decode": []} for k in ("dense", "int4", "packed")}
    models = {"dense": dense, "int4": kernel, "packed": packed}
    with torch.no_grad():
        for _ in range(args.runs):   # alternating, so drifts of the GPU's clocks hit all three
            for k, m in models.items():
                runs[k]["prefill"].append(batch.numel() / G.time_cuda(lambda m=m: m(input_ids=batch), 1, 1))
                runs[k]["decode"].append(M.speed(m, prompt, new_tokens=args.new_tokens, runs=1)["decode_tokens_per_s"])
    med = statistics.median
    out = {"source": source, "tokens": text, "method": "rtn w4 g64", "layouts": dict(layouts),
           "logits_int4_kernel_vs_dequantized": kernel_err, "logits_int4_vs_dense_bf16": quant_err,
           "gpu_bytes": {k: M.tensor_bytes(m) for k, m in models.items()},
           "prefill_batch": list(batch.shape), "new_tokens": args.new_tokens, "runs": args.runs}
    for k in models:
        out[f"prefill_tokens_per_s_{k}"] = med(runs[k]["prefill"])
        out[f"decode_tokens_per_s_{k}"] = med(runs[k]["decode"])
    for k in ("int4", "packed"):
        out[f"prefill_{k}_vs_dense"] = out[f"prefill_tokens_per_s_{k}"] / out["prefill_tokens_per_s_dense"]
        out[f"decode_{k}_vs_dense"] = out[f"decode_tokens_per_s_{k}"] / out["decode_tokens_per_s_dense"]
    return out


def layer_figures(args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from slimlm.core.quant import QuantResult, default_g_idx, rtn_quantize
    from slimlm.quant.linear import QuantLinear

    rows = []
    for k, n in [(576, 1536), (1536, 576), (576, 576), (4096, 4096), (4096, 11008), (11008, 4096)]:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, k, generator=g) * 0.02
        q, s, z = rtn_quantize(W, 4, False, 64)
        r = QuantResult(q, s, z, default_g_idx(k, 64), 4, 64, False)
        kern = QuantLinear.from_result(r).to("cuda")
        slow = QuantLinear.from_result(r).to("cuda")
        slow._build(slow.codes(), slow.scale, slow.zero, slow.g_idx, kernels=False)
        W_hat = r.dequantize().cuda()
        Wb = W.to("cuda", torch.bfloat16)
        for m in (1, 16, 512, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = x.float() @ W_hat.T
                err = float((kern(x).float() - ref).norm() / ref.norm())
                reps = args.runs * 10
                td = G.time_cuda(lambda x=x, Wb=Wb: F.linear(x, Wb), reps)
                tk = G.time_cuda(lambda x=x, kern=kern: kern(x), reps)
                tp = G.time_cuda(lambda x=x, slow=slow: slow(x), reps)
            rows.append({"in": k, "out": n, "tokens": m, "layout": kern.layout, "dense_bf16_us": td * 1e6,
                         "int4_us": tk * 1e6, "dequant_matmul_us": tp * 1e6, "int4_speedup_vs_dense": td / tk,
                         "int4_rel_err_vs_fp32": err})
    return rows


def main() -> None:
    args = G.gpu_args(__doc__)
    figures = {**G.gpu_facts(), "model": model_figures(args), "layers": layer_figures(args)}
    path = P.write_result("quant_gpu", {"runs": args.runs, "batch": args.batch, "new_tokens": args.new_tokens},
                          figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
