"""The layer-by-layer calibration runner (run_layerwise) shared by every post-training method (GPTQ, AWQ, SparseGPT, Wanda).

Calibration windows go through the model one decoder block at a time:
1. the inputs of the first block (hidden states plus whatever keyword arguments the architecture passes:
   attention mask, position embeddings, ...) are captured by running the model until block 0 is entered;
2. for each block, the linear layers are discovered in execution order and grouped by shared input
   (q/k/v; o; gate/up; down for a Llama block). For each group, one pass over the calibration inputs
   accumulates the statistics the method asks for (X^T X Hessian, per-channel sums of x^2 and |x|),
   stopping the block as soon as the group's inputs are seen; the method then
   rewrites the group's weights. With `sequential=True` ("true-sequential") each group sees inputs produced
   by the already-processed groups; otherwise one pass collects every group's statistics.
   On a Llama-like block (pre-norm attention then MLP, groups q/k/v, o, gate/up, down) true-sequential
   processing runs staged instead (run_staged): the inputs of o_proj and of down_proj are kept between
   stages, so every linear layer runs once per batch, with its final weights, and the block's output comes
   out of the last stage: about one forward per block instead of about two and a half. It is checked once,
   on the first block's first batch, against the block's own forward, and falls back to the passes above
   where the arithmetic differs (Gemma's extra norms, GPT-2, OPT);
3. the block runs once more to produce the (now compressed) inputs of the next block (each batch's output
   replacing its input; not after the last block, nor after a staged block, whose last stage produced them),
   and freed heap pages are returned to the system.
   With `propagate="dense"` the statistics pass runs each block to its end instead and its (uncompressed)
   outputs become the next block's inputs: one forward per block instead of about two, so every block is
   calibrated on the dense model's activations (llm-compressor's `propagate_error=False`). Methods that
   run the block themselves while processing (AWQ's search) cannot use it: the inputs are gone by then.

Only the current block and its activations live on the compute device. Blocks are found generically: the
longest `nn.ModuleList` of same-class modules. Linear layers are `nn.Linear` and transformers' `Conv1D`
(GPT-2, weights stored transposed), wrapped by `LinearInfo` so methods always see W as (out, in).

Files: common.py (discovery, statistics, the block context, options), passes.py (capture, discovery and
statistics passes, buffers), staged.py (run_staged), runner.py (run_layerwise).
"""
from __future__ import annotations

from .common import (
    STATS,
    BlockContext,
    LinearInfo,
    LinearStats,
    Processor,
    RunnerOptions,
    StopForward,
    find_blocks,
    gram_upper_,
    input_grams,
    is_linear,
    mirror_upper_,
    passes_in_bf16,
)
from .runner import run_layerwise
from .staged import call_of

__all__ = ["STATS", "BlockContext", "LinearInfo", "LinearStats", "Processor", "RunnerOptions", "StopForward",
           "call_of", "find_blocks", "gram_upper_", "input_grams", "is_linear", "mirror_upper_", "passes_in_bf16", "run_layerwise"]
