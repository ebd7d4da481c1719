"""What the GPU benchmarks share: the model to run, token batches, CUDA-event timing.

The GPU machine has neither the GGUF package nor the corpora (nothing can be fetched there, and the fp32
cache is too large to carry), so where the default model does not load, the benchmarks build its
architecture (bench/smollm2_config.json, the default model's config.json) with random weights. Kernel
speed does not depend on the weights' values; the results say which model ran.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

CONFIG = Path(__file__).with_name("smollm2_config.json")


def default_model():
    """(model on the CPU in fp32, description): the default model where it loads, else its architecture with
    random weights (seed 0)."""
    import torch

    import slimlm

    try:
        return slimlm.load_model(P.MODEL), P.MODEL
    except Exception as e:   # no GGUF package, no cache, no hub: any failure means "not here"
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(CONFIG.read_text())
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if not k.startswith("_")})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, f"{P.MODEL} architecture with random weights ({why})"


def token_batch(batch: int, seqlen: int, vocab: int):
    """(ids (batch, seqlen), description): windows of the first evaluation text where the tokenizer and the
    corpora are here, else random token ids (seed 0)."""
    import torch

    import slimlm
    from slimlm import data as D

    try:
        tok = slimlm.load_tokenizer(P.MODEL)
        ids = D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["persuasion"])))
        return torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in range(batch)]), "persuasion windows"
    except Exception:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (batch, seqlen), generator=g), "random token ids"


def time_cuda(fn, runs: int, warmup: int = 3) -> float:
    """Median seconds of fn() over runs, by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)



def gpu_args(doc: str, extra=None):
    """The GPU benchmarks' command line (--runs, --batch, --new-tokens, plus `extra(parser)`), parsed; exits
    with a message where there is no CUDA GPU."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="windows of 512 tokens in the prefill batch")
    ap.add_argument("--new-tokens", type=int, default=64)
    if extra:
        extra(ap)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: no CUDA GPU here; these kernels run only on one (compute capability >= 8.0)")
    return args


def gpu_facts() -> dict:
    import torch

    return {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "torch": torch.__version__}
