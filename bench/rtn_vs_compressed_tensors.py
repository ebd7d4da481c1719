"""slimlm's RTN weights against compressed-tensors' min-max fake quantization (llm-compressor's RTN), weight by
weight, on the default model: how many effective weights differ, and whether every difference is a tie.

    python bench/rtn_vs_compressed_tensors.py        # slimlm's .venv (it has compressed-tensors for the export tests)

Both tools map [min(w, 0), max(w, 0)] onto the same asymmetric grid with the same zero point. They round in a
different order: slimlm (like the GPTQ and AWQ reference code) computes round(w / s) + z, compressed-tensors
round(w / s + z). The two differ only where w / s lies exactly half-way between two integers and z is odd
(round-half-to-even then picks different neighbours). The default model's weights come from a Q4_1 GGUF, so
they lie on a grid and such exact ties occur. Writes bench/results/rtn_vs_compressed_tensors.json.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

SETTINGS = ((4, 64), (3, 64), (2, 64), (4, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    import importlib.metadata as md

    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    import slimlm
    from slimlm import api
    from slimlm.configs import build_config
    from slimlm.quant.linear import QuantLinear
    from slimlm.registry import get

    torch.set_num_threads(P.THREADS)
    fp32 = slimlm.load_model(P.MODEL).eval()
    originals = {n: m.weight.detach().float().clone() for n, m in fp32.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    figures = {}
    for bits, gs in SETTINGS:
        model = copy.deepcopy(fp32)
        api.quantize(model, build_config(get("quantize", "rtn").config_cls,
                                         {"bits": str(bits), "group_size": str(gs)}, "rtn"))
        diff = ties = total = 0
        max_abs = 0.0
        for name, m in model.named_modules():
            if not isinstance(m, QuantLinear):
                continue
            W = originals[name]
            ours = m.dequantize_weight(torch.float32)
            if gs > 0:
                args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=gs)
                Wg = W.reshape(W.shape[0], -1, gs)
                scale, zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
                per_col = torch.arange(W.shape[1]) // gs
                s_full = scale[:, per_col]
            else:
                args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel")
                scale, zero = calculate_qparams(W.amin(-1, keepdim=True), W.amax(-1, keepdim=True), args)
                s_full = scale.expand_as(W)
            theirs = fake_quantize(W, scale, zero, args)
            d = ours != theirs
            r = W / s_full
            diff += int(d.sum())
            ties += int(((r - r.floor()) == 0.5)[d].sum())
            total += W.numel()
            max_abs = max(max_abs, float((ours - theirs).abs().max()))
        key = f"w{bits}" + (f"g{gs}" if gs > 0 else "pc")
        figures[key] = {"bits": bits, "group_size": gs, "weights": total, "differ": diff, "differ_fraction": diff / total,
                        "differ_at_exact_ties": ties, "max_abs_difference": max_abs}
        print(key, figures[key], flush=True)
    path = P.write_result("rtn_vs_compressed_tensors", {"compressed_tensors": md.version("compressed-tensors")},
                          figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
