"""Which linear layers a quantization method touches, checked in full before any work, and the glue that
swaps them for runtime modules afterwards.

`plan_targets` resolves a config's layer selection (default: every linear layer of the transformer blocks;
`overrides`, `ignore`, see slimlm.quant.configs) into one `Target` per layer to quantize and checks all of
them up front: a group size that does not divide a layer's input size (unless `group_fallback` says
per-channel), a shape the packed storage cannot hold, a pattern that matches nothing.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.calibration import LinearInfo, find_blocks, is_linear
from slimlm.core.quant import QuantResult, rtn_result
from slimlm.errors import ConfigError
from slimlm.quant import linear as QL
from slimlm.quant.configs import IntQuantConfig, LayerSelection
from slimlm.selection import PATTERN_HELP, name_matches

log = logging.getLogger(__name__)

KERNEL_BITS = (2, 3, 4, 8)      # widths QuantLinear stores natively; 5-7 bit codes go in 8-bit containers


@dataclass
class Target:
    """One layer to quantize."""
    name: str
    info: LinearInfo
    bits: int
    group_size: int              # after the per-channel fallback
    in_block: bool               # inside the transformer blocks the calibration runner visits


def storage_bits(bits: int) -> int:
    """Bits per code as stored: the width itself, or 8 for 5-7 bit codes."""
    return bits if bits in KERNEL_BITS else 8


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> linear layer (nn.Linear or GPT-2's Conv1D), in module order."""
    return {n: m for n, m in model.named_modules() if is_linear(m)}


def output_layers(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """Names of the output layer and of any linear sharing its weight with an embedding."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n for n, m in linears.items() if m is out or id(getattr(m, "weight", None)) in emb_weights}


def _block_prefix(model: nn.Module) -> str | None:
    try:
        name, _ = find_blocks(model)
    except ValueError:
        return None
    return name + "." if name else ""


def check_matches(pattern: str, names: list[str], option: str) -> None:
    if not any(name_matches(n, pattern) for n in names):
        examples = ", ".join(names[:2] + names[-1:])
        raise ConfigError(f"{option} pattern {pattern!r} matches no linear layer (names look like "
                          f"{examples}); fix the pattern ({PATTERN_HELP})")


def _bits_per_layer(config: LayerSelection, linears: dict[str, nn.Module],
                    default: set[str]) -> dict[str, int]:
    """Bit width of every layer to quantize: overrides (first match), else the default for `default` layers,
    minus the ignored ones."""
    names = list(linears)
    rules, ignore = config.rules(), config.ignore_patterns()
    for r in rules:
        check_matches(r.pattern, names, "overrides")
    for p in ignore:
        check_matches(p, names, "ignore")
    bits = {}
    for n in names:
        rule = next((r for r in rules if name_matches(n, r.pattern)), None)
        b = rule.bits if rule is not None else (config.default_bits() if n in default else None)
        if b is not None and not any(name_matches(n, p) for p in ignore):
            bits[n] = b
    return bits


def _groups_per_layer(config: LayerSelection, names) -> dict[str, int]:
    """The group sizes the first matching override gives (bits/group values), by layer."""
    rules = config.rules()
    out = {}
    for n in names:
        rule = next((r for r in rules if name_matches(n, r.pattern)), None)
        if rule is not None and rule.group_size is not None:
            out[n] = rule.group_size
    return out


def _divisor_hint(sizes: list[int]) -> str:
    g = math.gcd(*sizes)
    fits = [d for d in range(16, g + 1) if g % d == 0]
    if not fits:
        return "No group size of 16 or more divides every layer; use -1 (per channel)"
    return f"Group sizes that divide every layer: {', '.join(map(str, fits))}; or -1 (per channel)"


def _resolve_groups(config: IntQuantConfig, targets: list[Target]) -> None:
    g = config.group_size
    bad = [t for t in targets if t.group_size > 0 and t.info.in_features % t.group_size]
    if not bad:
        return
    if config.group_fallback == "per-channel":
        for t in bad:
            t.group_size = -1
        log.warning("group_size %d does not divide %d layer(s) (e.g. %s); those are quantized per channel",
                    g, len(bad), bad[0].name)
        return
    shown = "; ".join(f"{t.name} ({t.info.in_features} inputs)" for t in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ConfigError(
        f"group_size {g} does not divide the input size of {len(bad)} layer(s): {shown}{more}. "
        f"{_divisor_hint([t.info.in_features for t in targets])}; or set group_fallback='per-channel' "
        "(--group-fallback per-channel) to quantize just those layers per channel")


def _check_storable(targets: list[Target]) -> None:
    bad = []
    for t in targets:
        try:
            QL._check_shape(t.info.in_features, t.info.out_features, storage_bits(t.bits), t.group_size)
        except ConfigError as e:
            bad.append((t, str(e)))
    if bad:
        t, why = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise ConfigError(f"{t.name} ({t.info.out_features} x {t.info.in_features}) cannot be stored at "
                          f"{t.bits} bits{more}: {why}. Keep such layers in full precision with "
                          "ignore=PATTERN or an override PATTERN=none")


def plan_targets(model: nn.Module, config: LayerSelection) -> dict[str, Target]:
    """Resolve and check the layers `config` quantizes; raises ConfigError before any work is done."""
    linears = linear_layers(model)
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear layers to quantize")
    prefix = _block_prefix(model)
    outputs = output_layers(model, linears)
    default = {n for n in linears if (n.startswith(prefix) if prefix is not None else n not in outputs)}
    bits = _bits_per_layer(config, linears, default)
    gs = config.group_size if isinstance(config, IntQuantConfig) else -1
    own = _groups_per_layer(config, bits)
    if own and not isinstance(config, IntQuantConfig):
        raise ConfigError(f"overrides give group sizes (bits/group) to {len(own)} layer(s), but this method has no "
                          "group size; give bits only")
    targets = [Target(n, LinearInfo(n, linears[n]), b, own.get(n, gs), prefix is not None and n.startswith(prefix))
               for n, b in bits.items()]
    if not targets:
        raise ConfigError("no layer is left to quantize: the overrides and ignore patterns exclude them all")
    if isinstance(config, IntQuantConfig):
        _resolve_groups(config, targets)
        _check_storable(targets)
    return {t.name: t for t in targets}


def fallback_count(config: IntQuantConfig, plan: dict[str, Target]) -> int:
    """Layers quantized per channel because group_size does not divide their input size."""
    g = config.group_size
    return sum(1 for t in plan.values() if t.group_size == -1 and g > 0 and t.info.in_features % g)


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


# ---------------------------------------------------------------------------------------------- after
def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def to_storage(result: QuantResult) -> QuantResult:
    """5-7 bit codes re-expressed as an 8-bit result (same values, explicit zero points)."""
    if result.bits in KERNEL_BITS:
        return result
    return QuantResult(result.codes, result.scale, result.zero, result.g_idx, 8, result.group_size, False)


def bias_of(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float().clone()


def swap_in(model: nn.Module, results: dict[str, QuantResult], method: str,
            input_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each layer named in `results` by a QuantLinear (ScaledQuantLinear where an input scale is
    given)."""
    from slimlm.quant.scaled import ScaledQuantLinear

    input_scales = input_scales or {}
    for name, res in results.items():
        old = model.get_submodule(name)
        res = to_storage(res)
        if name in input_scales:
            new = ScaledQuantLinear.from_result(res, bias_of(old), method=method)
            new.set_input_scale(input_scales[name])
        else:
            new = QL.QuantLinear.from_result(res, bias_of(old), method=method)
        set_submodule(model, name, new)


def report(method: str, results: dict[str, QuantResult], model: nn.Module, **extra) -> dict:
    """The summary a method returns: counts, bit widths and storage bits per quantized weight (codes, fp32
    scales and zero points as saved); `extra` entries that are zero or empty are left out."""
    n_weights = bits_total = 0
    widths: dict[int, int] = {}
    for res in results.values():
        out_f, in_f = res.codes.shape
        b = storage_bits(res.bits)
        n_weights += out_f * in_f
        bits_total += b * out_f * in_f + res.scale.shape[1] * out_f * (32 + b)   # codes, fp32 scales, zeros
        widths[res.bits] = widths.get(res.bits, 0) + 1
    rep = {"method": method, "layers_quantized": len(results),
           "layers_full_precision": len(linear_layers(model)),
           "bits": ", ".join(f"{b} ({k} layer{'s' * (k > 1)})" for b, k in sorted(widths.items())),
           "bits_per_weight": round(bits_total / max(n_weights, 1), 4),
           "quantized_weights": n_weights}
    rep.update({k: v for k, v in extra.items() if v})
    return rep
