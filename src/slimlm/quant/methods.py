"""Weight-only integer quantization methods, registered for `slimlm quantize` and `slimlm.quantize`.

    rtn   round to nearest, no data
    gptq  GPTQ through the calibration runner (Hessian per group of layers sharing an input)
    awq   AWQ (slimlm.quant.awq)
    nf4   NF4 / FP4 (slimlm.quant.nf4_linear), int8: LLM.int8() (slimlm.quant.int8_linear)

Every method resolves and checks its target layers first (slimlm.quant.targets), computes one QuantResult
per layer with the pure functions of slimlm.core, and finally swaps the layers for QuantLinear modules.
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
from slimlm.core.quant import QuantResult, default_g_idx, rtn_quantize
from slimlm.quant.configs import AWQConfig, GPTQConfig, Int8Config, IntQuantConfig, NF4Config, RTNConfig
from slimlm.quant.targets import Target, plan_targets, report, swap_in
from slimlm.registry import register

log = logging.getLogger(__name__)

__all__ = ["RTNConfig", "GPTQConfig", "AWQConfig", "NF4Config", "Int8Config", "rtn_result"]


def rtn_result(W: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantResult:
    """Round-to-nearest QuantResult of W (out, in)."""
    codes, scale, zero = rtn_quantize(W, bits, symmetric, group_size)
    return QuantResult(codes, scale, zero, default_g_idx(W.shape[1], group_size, W.device), bits, group_size,
                       symmetric)


def fallback_count(config: IntQuantConfig, plan: dict[str, Target]) -> int:
    """Layers quantized per channel because group_size does not divide their input size."""
    return sum(1 for t in plan.values() if t.group_size != config.group_size)


def quantize_rest(plan: dict[str, Target], config: IntQuantConfig, results: dict[str, QuantResult]) -> int:
    """Round-to-nearest for the targets calibration did not reach (outside the transformer blocks, e.g.
    lm_head when an override asks for it, or never called); returns how many there were."""
    n = 0
    for t in plan.values():
        if t.name not in results:
            log.warning("%s is not reached by the calibration runner: round-to-nearest", t.name)
            results[t.name] = rtn_result(t.info.weight(), t.bits, t.group_size, config.symmetric)
            n += 1
    return n


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


# Further methods register themselves on import (the registry imports only this module).
from slimlm.quant import awq as _awq  # noqa: E402,F401
from slimlm.quant import int8_linear as _int8  # noqa: E402,F401
from slimlm.quant import nf4_linear as _nf4  # noqa: E402,F401
