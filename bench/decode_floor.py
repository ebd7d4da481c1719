"""Where the decode time goes on this CPU: the default model in fp32, at RTN w4 g64 (int4 kernel), and with every
linear layer inside the blocks replaced by a module that returns zeros (its cost is the floor any weight format
of those layers leaves), also with the output layer replaced; batch 1, greedy, KV cache, alternating, medians.

    python bench/decode_floor.py [--runs 5] [--new-tokens 64]

Writes bench/results/decode_floor.json.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    import torch
    from torch import nn

    import slimlm
    from slimlm import api
    from slimlm import metrics as M
    from slimlm.configs import build_config
    from slimlm.registry import get

    torch.set_num_threads(P.THREADS)

    class Free(nn.Module):
        def __init__(self, out: int) -> None:
            super().__init__()
            self.out = out

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.out)

    fp32 = slimlm.load_model(P.MODEL).eval()
    q = copy.deepcopy(fp32)
    api.quantize(q, build_config(get("quantize", "rtn").config_cls, {"bits": "4", "group_size": "64"}, "rtn"))
    free = copy.deepcopy(fp32)
    for layer in free.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for n, m in list(parent.named_children()):
                if isinstance(m, nn.Linear):
                    setattr(parent, n, Free(m.out_features))
    bare = copy.deepcopy(free)
    bare.lm_head = Free(fp32.config.vocab_size)
    prompt = torch.randint(0, fp32.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0))
    models = {"fp32": fp32, "int4": q, "free_linears": free, "free_linears_and_lm_head": bare}
    runs = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(args.runs):
            for k, m in models.items():
                runs[k].append(M.speed(m, prompt, new_tokens=args.new_tokens, runs=1)["decode_tokens_per_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    figures = {"decode_tokens_per_s": med, "runs": runs, "ms_per_token": {k: 1000 / v for k, v in med.items()},
               "vs_fp32": {k: v / med["fp32"] for k, v in med.items()}}
    path = P.write_result("decode_floor", {"runs": args.runs, "new_tokens": args.new_tokens, "prompt_tokens": 128,
                                           "int4": "rtn w4 g64"}, figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
