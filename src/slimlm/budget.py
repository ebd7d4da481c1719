"""The budget options of `slimlm quantize` (--budget-bits, --budget-mb) and `slimlm prune` (--budget-sparsity):
checked before the model loads, then turned into per-layer overrides of the method's config by
slimlm.allocation (sensitivity per layer and setting, allocation under the budget)."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from torch import nn

from .errors import SlimlmError

log = logging.getLogger(__name__)

FULL_BITS = 32.0          # what an unquantized fp32 weight costs
VALIDATE_EVERY = 21       # the proxy checked against measured KL at every candidate on every 21st layer


def _quant_candidates(config, kw: dict) -> str:
    g = config.group_size if config.group_size > 0 else 64
    return kw.get("budget_candidates") or f"2/{g},3/{g},4/{g},8/{g},3/-1,4/-1"


def check(family: str, config: Any, kw: dict) -> None:
    """What can be refused before the model loads."""
    if not kw.get("data"):
        raise SlimlmError("a budget measures each layer's sensitivity on calibration data: add --data SOURCE")
    if family == "quantize":
        from .quant.configs import IntQuantConfig
        if not isinstance(config, IntQuantConfig):
            raise SlimlmError("--budget-bits / --budget-mb choose integer bit widths and group sizes: use --method "
                              "rtn, gptq or awq")
        if kw.get("budget_bits") is not None and kw.get("budget_mb") is not None:
            raise SlimlmError("give --budget-bits or --budget-mb, not both")
        if config.overrides:
            raise SlimlmError("a budget writes the per-layer overrides itself: drop --overrides")
        bits = kw.get("budget_bits")
        if bits is not None and not 0 < bits < FULL_BITS:
            raise SlimlmError(f"--budget-bits {bits:g} is outside (0, {FULL_BITS:g}): at or above full precision "
                              "there is nothing to allocate")
        if kw.get("budget_mb") is not None and not kw["budget_mb"] > 0:
            raise SlimlmError(f"--budget-mb must be > 0 (got {kw['budget_mb']:g})")
        from .allocation import quant_settings
        quant_settings(_quant_candidates(config, kw), config.symmetric, 64 * 1024)      # the syntax, early
    else:
        from .pruning.configs import PruneConfig
        if not isinstance(config, PruneConfig):
            raise SlimlmError("--budget-sparsity chooses per-layer sparsities: use --method magnitude, wanda or "
                              "sparsegpt")
        s = kw["budget_sparsity"]
        if not 0 < s < 1:
            raise SlimlmError(f"--budget-sparsity is an average fraction of weights removed, in (0, 1); got {s:g}")
        if config.layer_sparsity:
            raise SlimlmError("a budget writes the per-layer sparsities itself: drop --layer-sparsity")
        from .allocation import sparsity_settings
        sparsity_settings(kw.get("budget_candidates") or "0.5")


def _fixed_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of everything the allocation does not set: every tensor but the targets' weights, each shared
    tensor once."""
    mods = dict(model.named_modules())
    skip = {id(mods[n].weight) for n in names}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def apply(family: str, model: nn.Module, config: Any, windows, kw: dict) -> tuple[Any, dict]:
    """(config with the allocation as its per-layer overrides, the allocation's record for allocation.json)."""
    from . import allocation as A

    t0 = time.perf_counter()
    mods = dict(model.named_modules())
    if family == "quantize":
        from .quant.targets import plan_targets
        names = list(plan_targets(model, config))
        spec = _quant_candidates(config, kw)
        settings = {n: A.quant_settings(spec, config.symmetric, mods[n].weight.shape[1]) for n in names}
        weights = sum(mods[n].weight.numel() for n in names)
        if kw.get("budget_mb") is not None:
            # the weights file: the unquantized tensors, each quantized layer's g_idx (int32 per input column),
            # and the safetensors header (about 90 bytes a tensor; 128 allowed)
            n_tensors = sum(1 for _ in model.state_dict()) + 3 * len(names)
            fixed = _fixed_bytes(model, names) + sum(4 * mods[n].weight.shape[1] for n in names) + 128 * n_tensors
            budget = (kw["budget_mb"] * 2**20 - fixed) * 8 / weights
            full = (fixed + weights * 4) / 2**20
            if kw["budget_mb"] >= full:
                raise SlimlmError(f"--budget-mb {kw['budget_mb']:g} is at or above the model at full precision "
                                  f"({full:.1f} MiB): nothing to allocate")
            if budget <= 0:
                raise SlimlmError(f"--budget-mb {kw['budget_mb']:g} does not even hold the parts that stay unquantized "
                                  f"({fixed / 2**20:.1f} MiB)")
            what = {"budget_mb": kw["budget_mb"], "fixed_mb": fixed / 2**20, "budget_bits_per_weight": budget}
        else:
            budget = kw["budget_bits"]
            what = {"budget_bits_per_weight": budget}
    else:
        from .pruning.methods import plan_targets
        names = list(plan_targets(model, config))
        spec = kw.get("budget_candidates") or "0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
        settings = {n: A.sparsity_settings(spec) for n in names}
        weights = sum(mods[n].weight.numel() for n in names)
        budget = 1.0 - kw["budget_sparsity"]                                   # kept fraction
        what = {"budget_sparsity": kw["budget_sparsity"]}
    empty = [n for n, s in settings.items() if not s]
    if empty:
        raise SlimlmError(f"no candidate fits {empty[0]} ({mods[empty[0]].weight.shape[1]} inputs): add one whose group "
                          "divides it to --budget-candidates (or -1, per channel)")
    cheapest = sum(mods[n].weight.numel() * min(s.cost for s in settings[n]) for n in names) / weights
    if cheapest > budget * (1 + 1e-9):
        unit = "bits per weight" if family == "quantize" else "kept fraction"
        raise SlimlmError(f"the budget ({budget:.4g} {unit}) is below what the cheapest candidates reach "
                          f"({cheapest:.4g}); raise it or add cheaper --budget-candidates")
    reference = {n: min(settings[n], key=lambda s: abs(s.cost - budget)).label for n in names}
    ref_label = max(set(reference.values()), key=list(reference.values()).count)
    sens = A.sensitivities(model, names, settings, ref_label, windows[: min(32, windows.shape[0])],
                           windows[:2, : min(256, windows.shape[1])], validate_every=VALIDATE_EVERY,
                           progress=log.isEnabledFor(logging.INFO))
    choice = A.allocate(sens["layers"], budget)
    if family == "quantize":
        overrides = ",".join(f"{n}={c}" for n, c in choice.items())
        config = dataclasses.replace(config, overrides=overrides)
    else:
        config = dataclasses.replace(config, layer_sparsity=",".join(f"{n}={c}" for n, c in choice.items()))
    record = {"family": family, **what, "candidates": spec, "reference_setting": ref_label,
              "seconds": round(time.perf_counter() - t0, 1), "summary": A.summary(sens["layers"], choice),
              "validation": sens.get("validation"), "per_layer": {
                  n: {"setting": choice[n], "weights": t["weights"], "kl_reference": t["kl_reference"],
                      "predicted": t["predicted"], "cost": t["cost"]} for n, t in sens["layers"].items()}}
    if family == "quantize" and kw.get("budget_mb") is not None:
        record["summary"]["predicted_mb"] = (what["fixed_mb"] * 2**20 + record["summary"]["average_cost"]
                                             * weights / 8) / 2**20
    s = record["summary"]
    log.info("allocation: average %.4f, settings %s", s["average_cost"], s["settings"])
    return config, record
