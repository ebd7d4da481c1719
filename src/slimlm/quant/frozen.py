"""The autograd rule of a frozen quantized base layer (QuantLinear, NF4Linear, Int8Linear), for adapters trained
on top (QLoRA): the layer's weights never get gradients, so its backward is the input gradient only,

    dL/dx = dL/dy @ W_hat        (x (..., in), dL/dy (..., out), W_hat (out, in))

with W_hat dequantized again inside the backward, in dL/dy's dtype, and dropped after it. Nothing is saved
for the backward (not x, not a float weight): saving one layer's dequantized weight until its backward
would hold a float copy of every layer at once during a training step, the memory QLoRA exists to save.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenBaseGrad(torch.autograd.Function):
    """y = layer.matmul(x) in forward (the layer's own path for this call: x W_hat^T up to its rounding, plus
    at most a constant bias); dL/dx = dL/dy @ layer.dequantize_weight(dL/dy's dtype) in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module, kw: dict) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.matmul(x, **kw)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        return gy @ ctx.layer.dequantize_weight(gy.dtype), None, None


def frozen_matmul(layer: nn.Module, x: Tensor, **kw) -> Tensor:
    """layer.matmul(x, **kw), differentiable in x where autograd needs it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenBaseGrad.apply(x, layer, kw)
    return layer.matmul(x, **kw)
