"""Weight-only integer quantization methods, registered for `slimlm quantize` and `slimlm.quantize`.

    rtn   round to nearest, no data
    gptq  GPTQ through the calibration runner (Hessian per group of layers sharing an input)
    awq   AWQ (its own module, slimlm.quant.awq)
    nf4   NF4 / FP4 blocks (runtime module: slimlm.quant.nf4_linear)
    int8  LLM.int8() (runtime module: slimlm.quant.int8_linear)

Every method resolves and checks its target layers first (slimlm.quant.targets), computes its quantized
weights with the pure functions of slimlm.core, and finally swaps the layers for runtime modules. How a model
is saved is the format registry's business (slimlm.formats), not the method's.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict

import torch
from torch import Tensor, nn

from slimlm.calibration import BlockContext, LinearInfo, LinearStats, RunnerOptions, run_layerwise
from slimlm.core.gptq import gptq_quantize
from slimlm.core.packing import pack_int32, unpack_int32
from slimlm.core.quant import QuantResult, rtn_result
from slimlm.quant.configs import AWQConfig, GPTQConfig, Int8Config, NF4Config, RTNConfig
from slimlm.quant.int8_linear import Int8Linear
from slimlm.quant.nf4_linear import NF4Linear
from slimlm.quant.targets import (
    Target,
    bias_of,
    fallback_count,
    plan_targets,
    quantize_rest,
    report,
    set_submodule,
    swap_in,
)
from slimlm.registry import register

log = logging.getLogger(__name__)

__all__ = ["RTNConfig", "GPTQConfig", "AWQConfig", "NF4Config", "Int8Config"]


@register("quantize", "rtn", RTNConfig, needs_data=False, help="round-to-nearest, no calibration data")
def apply_rtn(model: nn.Module, config: RTNConfig, data: Tensor | None, runner: RunnerOptions) -> dict:
    plan = plan_targets(model, config)
    results = {t.name: rtn_result(t.info.weight(), t.bits, t.group_size, config.symmetric)
               for t in plan.values()}
    swap_in(model, results, "rtn")
    return report("rtn", results, model, per_channel_fallback=fallback_count(config, plan))


# ---------------------------------------------------------------------------------------------- GPTQ
class GPTQProcessor:
    """The calibration runner's view of GPTQ: one solve per group of layers sharing an input.

    Layers of a group share the Hessian of their common input, and GPTQ treats the rows of W independently,
    so the weights of the group's layers with the same (bits, group size) are stacked into one matrix and
    solved at once: one damping and Cholesky factorisation per group instead of one per layer. The
    dequantized result is written back so later groups and blocks calibrate on quantized outputs.
    """
    needs = frozenset({"hessian"})

    def __init__(self, config: GPTQConfig, plan: dict[str, Target]) -> None:
        self.config, self.plan = config, plan
        self.sequential = config.true_sequential
        # codes bit-packed while the runner runs (a byte per weight of every layer done so far held about
        # 100 MB at SmolLM2's last blocks); `results` unpacks them
        self._packed: dict[str, tuple[QuantResult, int]] = {}

    @property
    def results(self) -> dict[str, QuantResult]:
        """The layers' QuantResults so far (a new dict, codes unpacked)."""
        return {n: dataclasses.replace(r, codes=unpack_int32(r.codes, r.bits, cols))
                for n, (r, cols) in self._packed.items()}

    def process(self, ctx: BlockContext, group: list[tuple[LinearInfo, LinearStats]]) -> None:
        H = group[0][1].hessian
        by_scheme: dict[tuple[int, int], list[LinearInfo]] = defaultdict(list)
        for info, _ in group:
            t = self.plan.get(info.name)
            if t is not None:
                by_scheme[(t.bits, t.group_size)].append(info)
        for (bits, group_size), infos in by_scheme.items():
            W = torch.cat([info.weight() for info in infos])                      # (sum of out, in)
            c = self.config
            res = gptq_quantize(W, H, bits, group_size, c.symmetric, damp=c.damp, block_size=c.block_size,
                                act_order=c.act_order, static_groups=c.static_groups,
                                range_search=c.range_search)
            row = 0
            for info in infos:
                rows = slice(row, row + info.out_features)
                row += info.out_features
                part = QuantResult(res.codes[rows].contiguous(), res.scale[rows].contiguous(),
                                   res.zero[rows].contiguous(), res.g_idx, bits, group_size, c.symmetric)
                info.set_weight(part.dequantize())
                self._packed[info.name] = (dataclasses.replace(part, codes=pack_int32(part.codes, bits, pad=True)),
                                           part.codes.shape[1])


@register("quantize", "gptq", GPTQConfig, needs_data=True,
          help="GPTQ: Hessian-aware rounding with error feedback (needs --data)")
def apply_gptq(model: nn.Module, config: GPTQConfig, data: Tensor, runner: RunnerOptions) -> dict:
    plan = plan_targets(model, config)
    proc = GPTQProcessor(config, plan)
    staged = run_layerwise(model, data, proc, runner) if any(t.in_block for t in plan.values()) else 0
    results = proc.results
    rtn_n = quantize_rest(plan, config, results)
    swap_in(model, results, "gptq")
    return report("gptq", results, model, per_channel_fallback=fallback_count(config, plan),
                  rtn_fallback=rtn_n, true_sequential=config.true_sequential, staged_blocks=staged)


@register("quantize", "nf4", NF4Config, needs_data=False,
          help="NF4/FP4 4-bit blocks with double quantization (QLoRA / bitsandbytes), no data")
def apply_nf4(model: nn.Module, config: NF4Config, data: Tensor | None, runner: RunnerOptions) -> dict:
    plan = plan_targets(model, config)
    n_weights, bits = 0, 0.0
    for t in plan.values():
        W = t.info.weight().to(t.info.module.weight.dtype)
        new = NF4Linear.from_weight(W, bias_of(t.info.module), config.quant_type,
                                    config.blocksize, config.double_quant)
        set_submodule(model, t.name, new)
        numel = t.info.in_features * t.info.out_features
        n_weights += numel
        bits += new.bits_per_weight() * numel
    return {"method": config.quant_type, "layers_quantized": len(plan),
            "bits_per_weight": round(bits / n_weights, 4), "quantized_weights": n_weights}


@register("quantize", "int8", Int8Config, needs_data=False,
          help="LLM.int8(): int8 weights and activations with float outlier features, no data")
def apply_int8(model: nn.Module, config: Int8Config, data: Tensor | None, runner: RunnerOptions) -> dict:
    plan = plan_targets(model, config)
    n_weights = 0
    bits = 0.0
    for t in plan.values():
        new = Int8Linear.from_weight(t.info.weight(), bias_of(t.info.module), config.threshold)
        set_submodule(model, t.name, new)
        n_weights += t.info.in_features * t.info.out_features
        bits += new.bits_per_weight() * t.info.in_features * t.info.out_features
    return {"method": "int8", "layers_quantized": len(plan), "bits_per_weight": round(bits / n_weights, 4),
            "quantized_weights": n_weights, "threshold": config.threshold}
