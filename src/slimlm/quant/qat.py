"""Quantization-aware training: train through the rounding with a straight-through estimator, then convert.

    model = prepare_qat(model, RTNConfig(bits=4, group_size=64))   # target linears -> FakeQuantLinear
    ... an ordinary training loop (the float weights are the trainable parameters) ...
    model = convert_qat(model)                                     # FakeQuantLinear -> QuantLinear

FakeQuantLinear computes with W_q = Q(W) (round-to-nearest on the current weights, scales from their
min/max per group) in the forward pass and passes the gradient straight through the rounding
(Bengio et al. 2013): W_ste = W + (Q(W) - W).detach(), so dL/dW = dL/dW_q. Layer selection (overrides,
ignore, group-size checks) is the one every quantization method uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.core.quant import QuantResult, rtn_result
from slimlm.errors import ConfigError
from slimlm.quant.configs import IntQuantConfig
from slimlm.quant.targets import bias_of, plan_targets, set_submodule, swap_in


class FakeQuantLinear(nn.Module):
    """A linear layer with a trainable float weight (out, in) that computes with its quantized value."""

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, group_size: int,
                 symmetric: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def quant_result(self) -> QuantResult:

        return rtn_result(self.weight.detach().float(), self.bits, self.group_size, self.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        w_q = self.quant_result().dequantize().to(self.weight.dtype)
        w = self.weight + (w_q - self.weight).detach()        # straight-through estimator
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


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


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by a QuantLinear holding its rounded weights, in place; returns model."""
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    if not fakes:
        raise ConfigError("the model has no FakeQuantLinear layers: call prepare_qat(model, config) first")
    with torch.no_grad():
        swap_in(model, {n: m.quant_result() for n, m in fakes.items()}, "qat")
    return model
