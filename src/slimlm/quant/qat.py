"""Quantization-aware training: train through the rounding with a straight-through estimator, then convert.

    model = prepare_qat(model, RTNConfig(bits=4, group_size=64))   # target linears -> FakeQuantLinear
    ... an ordinary training loop (the float weights are the trainable parameters) ...
    model = convert_qat(model)                                     # FakeQuantLinear -> QuantLinear

FakeQuantLinear computes with W_q = Q(W) (round-to-nearest on the current weights, scales from their
min/max per group) in the forward pass and passes the gradient straight through the rounding
(Bengio et al. 2013): W_ste = W + (Q(W) - W).detach(), so dL/dW = dL/dW_q. Layer selection (overrides,
ignore, group-size checks) is the one every quantization method uses.

LoRA on a fake-quantized base (add_lora): the weight W is frozen and a rank-r update trains inside the
rounding, W_eff = W + (alpha / r) B A and the layer computes with Q(W_eff) (straight-through to A and B), so
the adapter learns what survives quantization and converting writes the merged, quantized weights: the
packed model computes exactly what training computed (the merge-then-requantize loss of QLoRA cannot occur).

AWQ bases (ScaledQuantLinear: y = Q(W diag(s)) (x / s)) keep their input scale: the fake layer's weight is
the scaled one on AWQ's stored grid, its input is divided by s, and converting writes a ScaledQuantLinear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.core.quant import QuantResult, quantize_grouped, rtn_result
from slimlm.errors import ConfigError
from slimlm.quant.configs import IntQuantConfig
from slimlm.quant.targets import bias_of, plan_targets, set_submodule, swap_in


class FakeQuantLinear(nn.Module):
    """A linear layer with a trainable float weight (out, in) that computes with its quantized value."""

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, group_size: int,
                 symmetric: bool, grid: tuple[Tensor, Tensor, Tensor] | None = None,
                 input_scale: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.fixed = grid is not None
        if grid is not None:                  # a fixed grid: scale, zero (out, G) fp32 and g_idx (in,)
            for name, t in zip(("grid_scale", "grid_zero", "grid_g_idx"), grid):
                self.register_buffer(name, t.detach().clone(), persistent=False)
        self.input_scale = None if input_scale is None else input_scale.detach().float().clone()
        self.lora_A = self.lora_B = None
        self.lora_scale = 0.0

    def add_lora(self, r: int, alpha: float, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """Freeze the weight and train W + (alpha / r) B A inside the rounding; returns [A, B] (B starts at 0)."""
        from slimlm.core.lora import init_lora, lora_scale

        A, B = init_lora(self.out_features, self.in_features, r, generator=generator)
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(A.to(self.weight.device))
        self.lora_B = nn.Parameter(B.to(self.weight.device))
        self.lora_scale = lora_scale(r, alpha)
        return [self.lora_A, self.lora_B]

    def effective_weight(self) -> Tensor:
        """W, or W + (alpha / r) B A with an adapter (differentiable in A and B)."""
        if self.lora_A is None:
            return self.weight
        return self.weight + self.lora_scale * (self.lora_B @ self.lora_A).to(self.weight.dtype)

    def quant_result(self) -> QuantResult:
        """Q(W): round-to-nearest on the current weights' min/max grid, or on the fixed grid (from_packed)."""
        W = self.effective_weight().detach().float()
        if not self.fixed:
            return rtn_result(W, self.bits, self.group_size, self.symmetric)
        codes = quantize_grouped(W, self.grid_scale, self.grid_zero, self.bits, self.grid_g_idx)
        return QuantResult(codes, self.grid_scale, self.grid_zero, self.grid_g_idx, self.bits, self.group_size,
                           self.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        w_q = self.quant_result().dequantize().to(self.weight.dtype)
        w_eff = self.effective_weight()
        w = w_eff + (w_q - w_eff).detach()                     # straight-through estimator
        if self.input_scale is not None:
            x = x / self.input_scale.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
                + (", input_scale=True" if self.input_scale is not None else "")
                + (f", lora_r={self.lora_A.shape[0]}" if self.lora_A is not None else ""))


def prepare_qat(model: nn.Module, config: IntQuantConfig) -> nn.Module:
    """Replace the target linears (as the config selects them) by FakeQuantLinear, in place; returns model."""
    if not isinstance(config, IntQuantConfig):
        raise ConfigError(f"prepare_qat takes an integer quantization config such as RTNConfig(bits=4, "
                          f"group_size=64), not {type(config).__name__}")
    plan = plan_targets(model, config)
    for t in plan.values():
        fq = FakeQuantLinear(t.info.weight().to(t.info.module.weight.dtype), bias_of(t.info.module), t.bits,
                             t.group_size, config.symmetric)
        set_submodule(model, t.name, fq.to(t.info.module.weight.device))
    return model


def qat_from_packed(model: nn.Module) -> int:
    """Continue from a quantized model: every packed QuantLinear (RTN, GPTQ with act-order too, AWQ with its
    input scales) becomes a FakeQuantLinear whose float weight is its dequantized weight and whose grid
    (scales, zero points, column groups) is fixed to the stored one, so training starts exactly at the
    quantized model and convert_qat writes codes on the same grid. Returns the number of layers converted."""
    from slimlm.quant.linear import QuantLinear
    from slimlm.quant.scaled import ScaledQuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    other = next((n for n, m in layers.items() if type(m) not in (QuantLinear, ScaledQuantLinear)), None)
    if other is not None:
        raise ConfigError(f"{other} is a {type(layers[other]).__name__}, a layer quantization-aware training cannot "
                          "continue from; start from the float model or an RTN, GPTQ or AWQ model")
    with torch.no_grad():
        for name, m in layers.items():
            W = m.dequantize_weight(torch.float32)
            bias = None if m.bias is None else m.bias.detach().float()
            fq = FakeQuantLinear(W, bias, m.bits, m.group_size, m.symmetric,
                                 grid=(m.scale.float(), m.zero.float(), m.g_idx.long()),
                                 input_scale=getattr(m, "input_scale", None))
            set_submodule(model, name, fq.to(W.device))
    return len(layers)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by a QuantLinear holding its rounded weights, in place; returns model."""
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    if not fakes:
        raise ConfigError("the model has no FakeQuantLinear layers: call prepare_qat(model, config) first")
    scales = {n: m.input_scale for n, m in fakes.items() if m.input_scale is not None}
    with torch.no_grad():
        swap_in(model, {n: m.quant_result() for n, m in fakes.items()}, "qat", input_scales=scales)
    return model
