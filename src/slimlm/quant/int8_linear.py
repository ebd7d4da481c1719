"""LLM.int8() (Dettmers et al. 2022): `Int8Linear`, the runtime module (the `int8` method: slimlm.quant.methods).

Int8Linear stores the row-wise int8 weight CB (out, in) and its row absmaxes SCB (out,) and computes
slimlm.core.llm_int8.int8_linear: int8 x int8 -> int32 products for the ordinary features, floating point for
the outlier features (|x| >= threshold). Its state_dict is bitsandbytes' Linear8bitLt layout (`weight` int8,
`SCB` fp32, `weight_format` 0 = row-major), so a saved model also loads in transformers with bitsandbytes.

In training (autograd on) on a CPU, from INT8_DENSE_ROWS rows of x on, the forward is x W_hat^T + b with
W_hat = CB * SCB / 127 dequantized for the call in x's dtype and a dense matmul, as bitsandbytes' MatMul8bitFp
does on CPUs in training: weight-only int8, without LLM.int8()'s rounding of x. Inference (no_grad, as in
evaluation) stays LLM.int8() at every size, so the method's figures keep their meaning. Under autograd the
backward is dL/dx = dL/dy W_hat with W_hat dequantized again there (slimlm.quant.frozen); nothing float is
kept between the two.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.llm_int8 import int8_dequantize_weight, int8_linear, int8_quantize_weight
from slimlm.quant.frozen import frozen_matmul

# Rows of x from which a CPU forward dequantizes W_hat and runs a dense matmul instead of LLM.int8().
# Measured (bench/qlora_layers.py --clock cpu: one thread; Xeon with AVX-512 VNNI, no AVX512-BF16), forward
# time over fp32 nn.Linear, LLM.int8() / dense, for 576->576, 576->192, 576->1536, 1536->576: 512 rows
# 0.71/1.10, 1.31/1.11, 0.67/1.03, 0.82/1.12; 1024 rows 1.03/1.16, 1.73/1.15, 0.98/1.07, 0.88/1.07 (summed
# 37.6 against 41.1 ms); 2048 rows 1.22/1.12, 2.08/1.08, 1.05/0.97, 1.08/1.06 (91.7 against 84.1 ms). The
# int8 product (torch._int_mm on VNNI) wins while the passes that round x to int8 stay small; the crossover
# lies between 1024 and 2048 rows.
INT8_DENSE_ROWS = 1536


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

    def matmul(self, x: Tensor, dense: bool = False) -> Tensor:
        """x (..., in) -> x W_hat^T + b: LLM.int8(), or with `dense` W_hat dequantized in x's dtype for this
        call and a dense matmul (weight-only int8)."""
        if dense:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.dequantize_weight(x.dtype), bias)
        return int8_linear(x, self.weight, self.SCB, self.bias, self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        dense = (torch.is_grad_enabled() and x.device.type == "cpu"          # training on a CPU, large batch
                 and x.numel() >= INT8_DENSE_ROWS * self.in_features)
        return frozen_matmul(self, x, dense=dense)   # dL/dx = dL/dy @ W_hat, dequantized again in backward

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
