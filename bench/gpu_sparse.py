"""2:4 sparsity on a CUDA GPU: PyTorch's semi-structured sparse kernels against dense float16, same GPU, same run.

    python bench/gpu_sparse.py [--model DIR] [--runs 7]

1. The default model pruned 2:4 (magnitude by default: which weights are zero does not change the speed; or
   --model, a 2:4 folder saved by slimlm; where the default model does not load, its architecture with
   random weights, see gpu_common.py), in float16 on the GPU: its logits dense and with the sparse
   kernels (max and relative difference), then prefill (batch x 512 tokens) and greedy decode (batch 1, KV
   cache) tokens/s, dense and sparse runs alternating, medians.
2. Single linear layers, dense float16 against the same 2:4 weight through the kernels, at 1, 512 and 4096
   tokens: the model's shapes and larger ones (a 4096-wide model's), medians of CUDA-event timings.
Writes bench/results/sparse_gpu.json. Exits with a message where there is no CUDA GPU.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as G  # noqa: E402
import protocol as P  # noqa: E402


def model_figures(args) -> dict:
    import copy

    import torch

    import slimlm
    from slimlm import api
    from slimlm import metrics as M
    from slimlm.configs import build_config
    from slimlm.pruning import semi_structured as S
    from slimlm.registry import get

    if args.model:
        model = slimlm.load_model(args.model)
        source = args.model
    else:
        model, source = G.default_model()
        m = get("prune", "magnitude")
        api.prune(model, build_config(m.config_cls, {"sparsity": "2:4"}, "magnitude"))
        source += ", magnitude 2:4"
    model = model.to("cuda", torch.float16).eval()
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        report = S.to_semi_structured(sparse)
    batch, text = G.token_batch(args.batch, P.SEQLEN, model.config.vocab_size)
    batch = batch.cuda()
    with torch.no_grad():
        ld, ls = model(input_ids=batch).logits.float(), sparse(input_ids=batch).logits.float()
    diff = {"max_abs": float((ld - ls).abs().max()), "rel_l2": float((ld - ls).norm() / ld.norm()),
            "top1_agreement": float((ld.argmax(-1) == ls.argmax(-1)).float().mean())}
    prompt = batch[0, :128]
    pre_d, pre_s, dec_d, dec_s = [], [], [], []
    with torch.no_grad():
        for _ in range(args.runs):   # alternating, so drifts of the GPU's clocks hit both
            pre_d.append(batch.numel() / G.time_cuda(lambda: model(input_ids=batch), 1, 1))
            pre_s.append(batch.numel() / G.time_cuda(lambda: sparse(input_ids=batch), 1, 1))
            # metrics.speed: greedy decode at batch 1 with the KV cache (synchronised on a GPU), one run each
            dec_d.append(M.speed(model, prompt, new_tokens=args.new_tokens, runs=1)["decode_tokens_per_s"])
            dec_s.append(M.speed(sparse, prompt, new_tokens=args.new_tokens, runs=1)["decode_tokens_per_s"])
    med = statistics.median
    return {"source": source, "tokens": text, "kernels": report["backend"], "converted_layers": len(report["converted"]),
            "dense_layers": report["dense"], "logits_sparse_vs_dense": diff,
            "prefill_batch": list(batch.shape), "prefill_tokens_per_s_dense": med(pre_d),
            "prefill_tokens_per_s_sparse": med(pre_s), "prefill_sparse_vs_dense": med(pre_s) / med(pre_d),
            "decode_tokens_per_s_dense": med(dec_d), "decode_tokens_per_s_sparse": med(dec_s),
            "decode_sparse_vs_dense": med(dec_s) / med(dec_d), "new_tokens": args.new_tokens, "runs": args.runs}


def layer_figures(args) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    rows = []
    shapes = [(576, 1536), (1536, 576), (576, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
    for k, n in shapes:
        W = torch.randn(n, k, device="cuda", dtype=torch.float16)
        W = W * torch.tensor([0, 0, 1, 1], device="cuda", dtype=torch.float16).repeat(n, k // 4)
        try:
            Ws = to_sparse_semi_structured(W)
        except (RuntimeError, ValueError) as e:
            rows.append({"in": k, "out": n, "error": str(e).splitlines()[0][:200]})
            continue
        for m in (1, 512, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            err = float((F.linear(x, W) - F.linear(x, Ws)).abs().max())
            td = G.time_cuda(lambda x=x, W=W: F.linear(x, W), args.runs * 10)
            ts = G.time_cuda(lambda x=x, Ws=Ws: F.linear(x, Ws), args.runs * 10)
            rows.append({"in": k, "out": n, "tokens": m, "dense_us": td * 1e6, "sparse_us": ts * 1e6,
                         "sparse_speedup": td / ts, "max_abs_diff": err})
    return rows


def main() -> None:
    args = G.gpu_args(__doc__, lambda ap: ap.add_argument(
        "--model", help="a 2:4 sparse folder saved by slimlm (default: the default model, magnitude 2:4)"))
    figures = {**G.gpu_facts(), "model": model_figures(args), "layers": layer_figures(args)}
    path = P.write_result("sparse_gpu", {"runs": args.runs, "batch": args.batch, "new_tokens": args.new_tokens,
                                         "model": args.model or "default, magnitude 2:4"}, figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
