"""LLM.int8() (Dettmers et al. 2022): `Int8Linear`, the runtime module (the `int8` method: slimlm.quant.methods).

Int8Linear stores the row-wise int8 weight CB (out, in) and its row absmaxes SCB (out,) and computes
slimlm.core.llm_int8.int8_linear: int8 x int8 -> int32 products for the ordinary features, floating point for
the outlier features (|x| >= threshold). Its state_dict is bitsandbytes' Linear8bitLt layout (`weight` int8,
`SCB` fp32, `weight_format` 0 = row-major), so a saved model also loads in transformers with bitsandbytes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.llm_int8 import int8_dequantize_weight, int8_linear, int8_quantize_weight


class _Int8Grad(torch.autograd.Function):
    """LLM.int8() product in forward; dL/dx = dL/dy @ W_hat in backward (W_hat = CB * SCB / 127 rebuilt at
    each call, nothing float is cached), as bitsandbytes' MatMul8bitLt does for a frozen weight. Without it
    the rounding of x to int8 would cut the gradient to adapters before a frozen int8 layer."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: Int8Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return int8_linear(x, layer.weight, layer.SCB, layer.bias, layer.threshold)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        return gy @ ctx.layer.dequantize_weight(gy.dtype), None


class Int8Linear(nn.Module):
    """y = LLM.int8()(x; CB, SCB) + b (weights int8 row-wise, outlier features in floating point)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float = 6.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        cb = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight", cb)
        self.register_buffer("SCB", torch.ones(out_features, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, dtype=dtype or torch.float32, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, W: Tensor, bias: Tensor | None, threshold: float = 6.0) -> Int8Linear:
        """Quantize W (out, in) row-wise to int8 into a new module."""
        m = cls(W.shape[1], W.shape[0], bias is not None, threshold, device="meta")
        m.weight, m.SCB = int8_quantize_weight(W)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return int8_dequantize_weight(self.weight, self.SCB).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:   # frozen weight: the gradient flows to x only
            return _Int8Grad.apply(x, self)
        return int8_linear(x, self.weight, self.SCB, self.bias, self.threshold)

    def bits_per_weight(self) -> float:
        return 8 + 32 / self.in_features

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        fmt = state_dict.get(prefix + "weight_format")
        if fmt is not None and int(fmt) != 0:
            error_msgs.append(f"{prefix[:-1]}: only row-major int8 weights (weight_format 0) can be loaded")
        rest = {k: v for k, v in state_dict.items() if k != prefix + "weight_format"}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold}, bias={self.bias is not None}")
