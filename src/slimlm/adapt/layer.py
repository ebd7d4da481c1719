"""`LoRALinear`: the runtime module that wraps one linear-like layer and adds named LoRA / DoRA adapters
(the equations are in slimlm.adapt.lora's docstring; the math is slimlm.core.lora).

The base term is always the base layer's own forward (QuantLinear, NF4Linear and Int8Linear compute from
their packed storage and pass the gradient to x). DoRA's norm needs W: a quantized base dequantizes it at
each call (base.dequantize_weight()); no float copy is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.calibration.common import LinearInfo, is_linear
from slimlm.core.lora import dora_magnitude_init, dora_weight, lora_delta, lora_scale, merge, unmerge

LINEAR_KINDS = "nn.Linear, transformers Conv1D, QuantLinear, NF4Linear and Int8Linear"


# ------------------------------------------------------------------------------------------ base layers
def is_linear_like(m: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, Conv1D, or a quantized linear with dequantize_weight()."""
    if isinstance(m, LoRALinear):
        return False
    return is_linear(m) or (callable(getattr(m, "dequantize_weight", None))
                            and hasattr(m, "in_features") and hasattr(m, "out_features"))


def linear_dims(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer (Conv1D stores W as (in, out))."""
    if is_linear(m):
        info = LinearInfo("", m)
        return info.in_features, info.out_features
    return int(m.in_features), int(m.out_features)


def base_weight(m: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """W (out, in) of a linear-like layer, detached, in `dtype`: the float weight (Conv1D's transposed), or
    W_hat dequantized now; ScaledQuantLinear's input scale s is folded in ((x / s) W_hat^T = x (W_hat / s)^T)."""
    if is_linear(m):
        w = m.weight.detach()
        return (w if isinstance(m, nn.Linear) else w.T).to(dtype)
    w = m.dequantize_weight(dtype)
    s = getattr(m, "input_scale", None)
    return w if s is None else w / s.to(dtype)


def device_of(m: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU if it has none)."""
    t = next(iter(m.parameters()), None)
    t = t if t is not None else next(iter(m.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------ modules
class LoRAAdapter(nn.Module):
    """One named adapter of one layer: lora_A (r, in), lora_B (out, r), scale s, dropout, and for DoRA the
    magnitude lora_magnitude (out,)."""

    def __init__(self, A: Tensor, B: Tensor, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
                 magnitude: Tensor | None = None, init: str = "kaiming") -> None:
        super().__init__()
        self.r, self.alpha, self.rslora, self.init = A.shape[0], float(alpha), rslora, init
        self.scale = lora_scale(self.r, self.alpha, rslora)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(B)
        self.lora_magnitude = None if magnitude is None else nn.Parameter(magnitude)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def dora(self) -> bool:
        return self.lora_magnitude is not None

    @property
    def dropout_p(self) -> float:
        return float(getattr(self.dropout, "p", 0.0))

    def lora(self, x: Tensor) -> Tensor:
        """(x A^T) B^T (..., out), unscaled, in the adapter's dtype."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def delta(self) -> Tensor:
        """s B A (out, in)."""
        return lora_delta(self.lora_A, self.lora_B, self.scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dora={self.dora}"


class LoRALinear(nn.Module):
    """A linear-like `base` plus named adapters; forward adds the term of each active, unmerged adapter
    (equations: slimlm.adapt.lora). With several active adapters each term is computed against the base
    output alone, DoRA's included."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_dims(base)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: dict[str, Tensor | None] = {}   # merged adapter -> DoRA's ||V||_c at merge time (LoRA: None)
        self.disabled = False

    @property
    def quantized(self) -> bool:
        return not is_linear(self.base)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)                                       # (..., out), the base layer's own kernel
        if self.disabled:
            return y
        out = y
        for name in self.active:
            if name not in self.merged:
                out = out + self._term(self.adapters[name], x, y)
        return out

    def _term(self, a: LoRAAdapter, x: Tensor, y: Tensor) -> Tensor:
        """What adapter `a` adds to the base output y (..., out) for input x (..., in)."""
        if not a.dora:
            return (a.lora(a.dropout(x)) * a.scale).to(y.dtype)
        W = base_weight(self.base, x.dtype)                    # (out, in): dequantized now if quantized
        with torch.no_grad():                                  # ||W + s B A||_c, a constant in the backward
            norm = dora_magnitude_init(merge(W, a.delta())).clamp_min(torch.finfo(W.dtype).tiny)
        g = (a.lora_magnitude / norm).view(1, -1)              # (1, out): m / ||W + s B A||_c
        if isinstance(a.dropout, nn.Identity) or not self.training:
            xd, bias = x, getattr(self.base, "bias", None)
            base_out = y if bias is None else y - bias.to(y.dtype)           # x W^T
        else:
            xd = a.dropout(x)
            base_out = F.linear(xd, W)                                       # x_d W^T (PEFT's form)
        return ((g - 1) * base_out + g * a.lora(xd) * a.scale).to(y.dtype)

    # ------------------------------------------------------------------ merging (float bases)
    def _write(self, W: Tensor) -> None:
        """Write W (out, in) into the float base weight, in its own layout and dtype."""
        w = self.base.weight
        with torch.no_grad():
            w.copy_((W if isinstance(self.base, nn.Linear) else W.T).to(w.dtype))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W <- W + s B A (LoRA) or W' = m (W + s B A) / ||W + s B A||_c (DoRA)."""
        a = self.adapters[name]
        W, delta = base_weight(self.base), a.delta().float()
        if a.dora:
            norm = dora_magnitude_init(merge(W, delta))
            self.merged[name] = norm.clamp_min(torch.finfo(norm.dtype).tiny)
            self._write(dora_weight(W, a.lora_A.float(), a.lora_B.float(), a.scale, a.lora_magnitude.float()))
        else:
            self.merged[name] = None
            self._write(merge(W, delta))

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """The inverse of merge, to fp32 rounding: W = W' / (m / ||V||_c) - s B A for DoRA."""
        a, norm = self.adapters[name], self.merged.pop(name)
        W = base_weight(self.base)
        if norm is not None:
            W = W / (a.lora_magnitude.float() / norm)[:, None]
        self._write(unmerge(W, a.delta().float()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, active={self.active}, "
                f"merged={list(self.merged)}, disabled={self.disabled}")
