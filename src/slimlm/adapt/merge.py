"""Merging an adapter into its base, quantized bases included.

A float base takes the merged weight exactly (LoRA: W + s B A; DoRA: m (W + s B A) / ||W + s B A||_c). A
quantized base cannot hold it without a new rounding, which PEFT refuses for GPTQ and AWQ layers. Here:
- packed integer layers (RTN, GPTQ, AWQ): the merged weight W' = W_hat + delta is rounded onto the grid the
  layer already has (its scales, zero points and groups), by round-to-nearest, or by GPTQ's error feedback
  under a Hessian from calibration data (`method="gptq"`, layers with contiguous groups);
- NF4/FP4 and LLM.int8() layers: W' quantized again by their own quantizer (new block absmaxes / row scales);
- `into="float"`: every adapted layer becomes an nn.Linear holding W' (a full-precision copy of the base's
  adapted layers; nothing is rounded).
`merge_adapter` reports what the merge changed: the KL divergence and perplexity of the merged model
against the unmerged one (adapters applied) on evaluation windows; the CLI refuses above a threshold
unless forced.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..core.lora import dora_weight, merge
from ..core.quant import QuantResult, quantize_grouped
from ..errors import ConfigError
from ..modules import set_submodule
from ..quant.int8_linear import Int8Linear
from ..quant.linear import QuantLinear
from ..quant.nf4_linear import NF4Linear
from .layer import LoRALinear, base_weight
from .lora import adapter_layers

INTO = ("base", "float")
METHODS = ("rtn", "gptq")


def merged_weight(layer: LoRALinear, name: str) -> Tensor:
    """W' (out, in) fp32: the base weight (dequantized if packed) with adapter `name` folded in."""
    a = layer.adapters[name]
    W = base_weight(layer.base)
    if a.dora:
        return dora_weight(W, a.lora_A.float(), a.lora_B.float(), a.scale, a.lora_magnitude.float())
    return merge(W, a.delta().float())


def _bias(m: nn.Module) -> Tensor | None:
    b = getattr(m, "bias", None)
    return None if b is None else b.detach().float().clone()


def on_stored_grid(base: QuantLinear, W: Tensor, H: Tensor | None = None) -> QuantLinear:
    """W (out, in) rounded onto base's scales, zero points and column groups: RTN, or GPTQ under H."""
    zero = base.zero.float()
    if H is None:
        codes = quantize_grouped(W, base.scale, zero, base.bits, base.g_idx)
        res = QuantResult(codes, base.scale.clone(), zero, base.g_idx.clone(), base.bits, base.group_size,
                          base.symmetric)
    else:
        from ..core.gptq import gptq_quantize

        if base.act_order:
            raise ConfigError("GPTQ re-quantization keeps contiguous groups; this layer has act-order groups: "
                              "merge with --requantize rtn")
        res = gptq_quantize(W, H, base.bits, base.group_size, base.symmetric, grid=(base.scale, zero))
    new = type(base).from_result(res, _bias(base), method=base.method)
    if getattr(base, "input_scale", None) is not None:             # AWQ's unfolded input scales stay
        new.set_input_scale(base.input_scale)
    return new


def requantized(base: nn.Module, W: Tensor, H: Tensor | None = None) -> nn.Module:
    """A runtime module of base's kind holding W (out, in)."""
    if isinstance(base, QuantLinear):
        if getattr(base, "input_scale", None) is not None:
            W = W * base.input_scale.float()[None, :]            # the layer stores W diag(s); x / s at its input
        return on_stored_grid(base, W, H)
    if isinstance(base, NF4Linear):
        return NF4Linear.from_weight(W.to(base.weight_dtype), _bias(base), base.quant_type, base.blocksize,
                                     base.absmax2 is not None)
    if isinstance(base, Int8Linear):
        return Int8Linear.from_weight(W, _bias(base), base.threshold)
    raise ConfigError(f"cannot re-quantize a {type(base).__name__}")


def _float_linear(base: nn.Module, W: Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=getattr(base, "bias", None) is not None)
    lin.weight.data = W.clone()
    if lin.bias is not None:
        lin.bias.data = _bias(base)
    return lin


def merge_adapter(model: nn.Module, name: str = "default", *, into: str = "base",
                  hessians: dict[str, Tensor] | None = None) -> dict:
    """Fold adapter `name` into the model and remove the adapter layers; returns counts of what was done.
    `hessians` (layer name -> H (in, in)) switches packed layers to GPTQ re-quantization."""
    if into not in INTO:
        raise ConfigError(f"into must be one of {', '.join(INTO)} (got {into!r})")
    counts = {"merged_exactly": 0, "requantized": 0, "to_float": 0}
    for lname, layer in adapter_layers(model, name).items():
        if len(layer.adapters) > 1:
            raise ConfigError(f"{lname} holds adapters {list(layer.adapters)}; delete the others first")
        W = merged_weight(layer, name)
        if into == "float":
            set_submodule(model, lname, _float_linear(layer.base, W))
            counts["to_float"] += 1
        elif not layer.quantized:
            layer.merge(name)
            set_submodule(model, lname, layer.base)
            counts["merged_exactly"] += 1
        else:
            H = (hessians or {}).get(lname)
            set_submodule(model, lname, requantized(layer.base, W, H))
            counts["requantized"] += 1
    return counts


def input_hessians(model: nn.Module, windows: Tensor, name: str = "default", batch_size: int = 4) -> dict[str, Tensor]:
    """H = 2/n sum_t x_t x_t^T of every adapted packed layer's input over calibration `windows` (N, L), with
    the adapters applied (the inputs the merged model's layers will see), one forward per batch."""
    from ..calibration import input_grams

    layers = {n: w for n, w in adapter_layers(model, name).items() if isinstance(w.base, QuantLinear)}
    return {n: H.mul_(2.0) for n, H in input_grams(model, layers, windows, batch_size).items()}
