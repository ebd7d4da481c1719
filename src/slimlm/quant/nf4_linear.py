"""NF4 / FP4 weights (QLoRA): `NF4Linear`, the runtime module (the `nf4` method: slimlm.quant.methods).

NF4Linear holds what bitsandbytes' Linear4bit holds (packed 4-bit codes, block absmaxes, the double-quant
state; slimlm.core.nf4) and computes y = x W_hat^T + b by dequantizing W_hat in the activation dtype at each
call (one table lookup per packed byte; about 1 ms for 576 x 1536 weights), then a dense matmul: there is no
other path (no CPU kernel multiplies NF4 codes), so at every size the cost over fp32 is that dequantization.
Under autograd the backward is dL/dx only, with W_hat dequantized again there (slimlm.quant.frozen): no float
weight is kept between the forward and the backward.

Its state_dict is bitsandbytes' own layout (`weight` packed (n/2, 1) uint8, `weight.absmax`, `weight.quant_map`,
`weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`), so a saved model loads in transformers with
bitsandbytes as well as in slimlm (slimlm.formats.bnb).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.nf4 import (
    NF4Weight,
    bits_per_param,
    dequantize_4bit,
    from_bnb_state_dict,
    quantize_4bit,
    to_bnb_state_dict,
)
from slimlm.quant.frozen import frozen_matmul


class NF4Linear(nn.Module):
    """A linear layer with NF4/FP4 block-quantized weights (dequantize, then matmul)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "nf4",
                 blocksize: int = 64, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize = quant_type, blocksize
        self.weight_dtype = dtype or torch.float32
        self.absmax_offset: float | None = None
        self.dq_blocksize = 256
        n = in_features * out_features
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device), False)
        self.register_buffer("absmax", torch.zeros(-(-n // blocksize), device=device), False)
        self.register_buffer("absmax2", None, False)
        self.register_buffer("absmax_code", None, False)
        b = torch.zeros(out_features, dtype=self.weight_dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, W: Tensor, bias: Tensor | None, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> NF4Linear:
        """Quantize W (out, in) (slimlm.core.nf4.quantize_4bit) into a new module."""
        m = cls(W.shape[1], W.shape[0], bias is not None, quant_type, blocksize, device="meta", dtype=W.dtype)
        m.set_weight(quantize_4bit(W, quant_type, blocksize, double_quant))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def set_weight(self, q: NF4Weight) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"an NF4 weight of shape {q.shape} does not fit a "
                             f"{self.in_features} -> {self.out_features} layer")
        self.packed, self.absmax = q.packed, q.absmax
        self.absmax2, self.absmax_code = q.absmax2, q.absmax_code
        self.quant_type, self.blocksize, self.weight_dtype = q.quant_type, q.blocksize, q.dtype
        self.absmax_offset, self.dq_blocksize = q.absmax_offset, q.dq_blocksize

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.weight_dtype,
                         self.quant_type, self.blocksize, self.absmax2, self.absmax_offset, self.absmax_code,
                         self.dq_blocksize)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_4bit(self.nf4_weight(), dtype)

    def matmul(self, x: Tensor) -> Tensor:
        """x (..., in) @ W_hat^T (..., out), W_hat dequantized in x's dtype for this call (no bias)."""
        return x @ self.dequantize_weight(x.dtype).T

    def forward(self, x: Tensor) -> Tensor:
        y = frozen_matmul(self, x)          # dL/dx = dL/dy @ W_hat, dequantized again in the backward
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def bits_per_weight(self) -> float:
        return bits_per_param(self.nf4_weight())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)        # bias
        destination.update(to_bnb_state_dict(self.nf4_weight(), prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items()
                if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        if "weight" in mine:
            try:
                self.set_weight(from_bnb_state_dict(mine, "weight"))
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{prefix[:-1]}: not a bitsandbytes 4-bit weight ({e})")
        else:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if k[len(prefix):] not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}, bias={self.bias is not None}")
