"""`ScaledQuantLinear`: a QuantLinear whose input is divided by a per-channel scale first.

AWQ quantizes W diag(s) and needs x / s at the layer's input. Where the producer of x is a norm or a linear
layer that can absorb 1/s, it does so and no runtime cost remains; elsewhere (after a non-linear activation,
after attention with grouped key/value heads) this module applies y = QuantLinear(x / s). The scale is a
persistent buffer `input_scale` (in,), saved beside the portable QuantLinear tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimlm.quant.linear import QuantLinear


class ScaledQuantLinear(QuantLinear):
    """y = x_scaled W_hat^T + b with x_scaled = x / input_scale (input_scale (in,) > 0)."""

    def __init__(self, in_features: int, out_features: int, *args, device=None, **kwargs) -> None:
        super().__init__(in_features, out_features, *args, device=device, **kwargs)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32, device=device))

    def set_input_scale(self, s: Tensor) -> None:
        if s.shape != (self.in_features,) or not bool((s > 0).all()):
            raise ValueError(f"input_scale must be positive with shape ({self.in_features},)")
        self.input_scale = s.detach().float().clone()

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x / self.input_scale.to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", input_scale=True"
