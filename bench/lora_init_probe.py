"""How far the LoRA start fitted to the rounding residual (LoRAConfig.init_from, adapt.lora.init_from_reference)
brings the GPTQ 3-bit g64 base towards the fp32 model before any training: perplexity on the quick
persuasion windows of the bare base, of the base plus the rank-r start fitted by the plain SVD of the residual,
and by the fit weighted by each layer's inputs (the default), for r = 16 and 64; the inputs are the first 32
training windows (bench/train.py prepare). Results: bench/results/lora_init_probe.json.

    python bench/lora_init_probe.py [--ranks 16,64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import WORK, base_path  # noqa: E402

import protocol as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64")
    a = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    import slimlm
    from slimlm import metrics as M
    from slimlm.adapt.layer import base_weight
    from slimlm.adapt.lora import LoRAConfig, add_lora, init_from_reference, lora_layers, remove_lora
    from slimlm.core.lora import residual_init

    torch.set_num_threads(P.THREADS)
    ref = slimlm.load_model(base_path("fp32"))
    windows = load_file(str(WORK / "batches.safetensors"))["input_ids"][:8].flatten(0, 1)      # 32 x 512
    ev = load_file(str(WORK / "eval_persuasion.safetensors"))["windows"]

    def ppl(model) -> float:
        return M.score(model.eval(), ev, progress=False)["perplexity"]
    model = slimlm.load_model(base_path("gptq_w3g64"))
    res: dict = {"cpu": P.machine(), "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "base": "gptq_w3g64",
                 "fp32": ppl(ref), "bare": ppl(model), "ranks": {}}
    for r in (int(x) for x in a.ranks.split(",")):
        add_lora(model, LoRAConfig(r=r, alpha=2 * r, targets="all-linear"))
        t0 = time.perf_counter()
        left = init_from_reference(model, ref, "default", windows)
        fit_s = time.perf_counter() - t0
        weighted = ppl(model)
        for n, w in lora_layers(model).items():              # the same adapters, the residual's plain SVD
            ad = w.adapters["default"]
            A, B = residual_init(base_weight(ref.get_submodule(n)) - base_weight(w.base), r, ad.scale)
            with torch.no_grad():
                ad.lora_A.copy_(A), ad.lora_B.copy_(B)
        res["ranks"][r] = {"weighted": weighted, "plain_svd": ppl(model), "fit_s": fit_s,
                           "residual_left_mean": sum(left.values()) / len(left)}
        remove_lora(model)
        print(f"bench: r={r}: bare {res['bare']:.2f}, plain SVD {res['ranks'][r]['plain_svd']:.2f}, weighted "
              f"{weighted:.2f} (fp32 {res['fp32']:.2f})", flush=True)
    P.write_result("lora_init_probe", {"windows": "32 x 512 of the training batches"}, res)


if __name__ == "__main__":
    main()
