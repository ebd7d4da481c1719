"""`QuantLinear`: the runtime module for a weight-only quantized linear layer.

It stores integer codes, scales, zero points and the column -> group map, never a float weight, and
computes y = x W_hat^T + b with W_hat = (q - z[g_idx]) * s[g_idx] (see slimlm.core.quant).

Resident layouts (chosen from the device and the quantization, re-chosen when the module moves):
- "int4": CPU, bits <= 4, out_features % 16 == 0 and groups that are (after one permutation of the input
  columns, for act-order) contiguous blocks the kernel accepts. Codes live in the layout of
  `aten._convert_weight_to_int4pack_for_cpu` and the product runs `aten._weight_int4pack_mm_for_cpu` on
  bf16 activations. That kernel computes w = (c - 8) * s' + z' per group. We store c = q + 8 - m with
  m = 2^(bits-1) (c = q for 4-bit; 2- and 3-bit codes are shifted to the middle of the 4-bit range), so
  our (q - z) * s maps to s' = s, z' = (m - z) * s (both in bf16): the two terms stay small and bf16
  rounding stays at the level of the scale's rounding for every bit width.
  Per-channel (one group of size in_features) runs as kernel groups of 256/128/64/32 sharing one scale.
  Where the CPU emulates bf16 (no AVX512-BF16/AMX), from INT4_DENSE_ROWS rows of x on the forward instead
  dequantizes W_hat in fp32 (in the kernel's column order, groups contiguous also under act-order) and runs
  a dense matmul (the kernel costs ~2x fp32 per row there); QuantLinear.cpu_path(rows) names the path.
  The codes are read back with bit operations (core.packing.int4pack_cpu_codes, checked at build against
  the codes packed; else through the kernel on an identity input, in x in x out multiply-adds).
- "int8": 8-bit codes stored as int8 (q - 128). Per-channel on CPU runs `aten._weight_int8pack_mm` on bf16
  activations; an asymmetric zero point adds the rank-one term sum_k(x_k) * (128 - z) * s.
  Grouped 8-bit dequantizes then multiplies.
- "int4" on a CUDA GPU (compute capability 8.0 or newer, out_features % 8 == 0, in_features % 32 == 0):
  the same codes, scales and zero points in the layout of `aten._convert_weight_to_int4pack` (its input is
  uint8 (out, in/2), the even column in the high nibble) and the product runs `aten._weight_int4pack_mm`
  (tinygemm) on bf16 activations, with the same w = (c - 8) * s' + z' per group as on CPU. The first
  layer built on a GPU in a process reads its codes back through the kernel and compares them with the
  codes it was given, and its product on unit inputs with the dequantized weight (which checks the layout
  of the scales too); if either differs, or the conversion fails, every layer of the process takes the
  "packed" layout instead (a warning says so), so a wrong layout can cost speed but never give wrong
  outputs. This path has not yet run on a GPU here (no GPU was lent to the sessions that wrote it).
- "packed": everything else: int32 words (slimlm.core.packing) unpacked and dequantized in the activation
  dtype at each call, then a dense matmul. Correct everywhere; on a GPU it is the slow fallback.

Under autograd (adapters on a frozen base) the backward is dL/dx = dL/dy @ W_hat, with W_hat dequantized
again in the backward in dL/dy's dtype (slimlm.quant.frozen): no float weight lives between the two.

state_dict() always holds the portable tensors (GPTQ orientation, true zero points, fp32 scales):
qweight int32 (in*bits/32, out), scales fp32 (G, out), qzeros int32 (G, out*bits/32), g_idx int32 (in,),
bias; loading them (also into a module built on the meta device) rebuilds the resident layout.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from slimlm.core.packing import int4pack_cpu_codes, pack_int32, unpack_int32
from slimlm.core.quant import QuantResult, default_g_idx, dequantize_blocks, dequantize_grouped, num_groups
from slimlm.errors import ConfigError
from slimlm.hardware import native_bf16
from slimlm.quant.frozen import frozen_matmul

KERNEL_GROUPS = (256, 128, 64, 32)   # group sizes _weight_int4pack_mm_for_cpu accepts
INNER_K_TILES = 2
PORTABLE_KEYS = ("qweight", "scales", "qzeros", "g_idx")
_STORAGE = ("packed", "scale", "zero", "g_idx", "perm", "kernel_scales", "kernel_corr")
_UNIT_ROWS = 512                      # identity rows per kernel call when reading int4 codes back
CPU_INT4_BLOCKS = (64, 32)            # row blocks of the CPU int4 layout that int4pack_cpu_codes can read
# Rows of x (tokens) from which the "int4" layout on a CPU runs its forward as W_hat dequantized in x's dtype
# and a dense matmul instead of the int4 kernel (bf16 activations), keyed by whether the CPU multiplies
# bf16 natively (slimlm.hardware). None: the kernel at every size. See _kernel_rows for the figures.
INT4_DENSE_ROWS = {True: None, False: 128}
_CUDA_INT4 = {"verified": None}       # the GPU int4 layout: None = not tried yet, True = checked, False = off

log = logging.getLogger(__name__)


@functools.cache
def _cpu_native_bf16() -> bool:
    return native_bf16("cpu")


def _int4_mm(device: torch.device):
    """The int4 weight-packed matmul operator for a device (CPU or CUDA)."""
    if device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm
    return torch.ops.aten._weight_int4pack_mm_for_cpu


def cuda_int4_pack(c: Tensor) -> Tensor:
    """Unsigned 4-bit codes c (N, K) as the uint8 (N, K/2) input of aten._convert_weight_to_int4pack:
    column 2j in the high nibble, column 2j + 1 in the low nibble of byte j."""
    c = c.to(torch.int32)
    return (c[:, 0::2] << 4 | c[:, 1::2]).to(torch.uint8).contiguous()


def _check_shape(in_features: int, out_features: int, bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"QuantLinear supports bits 2, 3, 4 or 8, got {bits}")
    if group_size > 0 and in_features % group_size:
        raise ConfigError(f"group_size {group_size} does not divide in_features {in_features}; "
                          "pick a group size that divides it or use -1 (per channel)")
    per = 32 if bits == 3 else 32 // bits
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if n % per:
            raise ConfigError(f"{name}={n} is not a multiple of {per}, which {bits}-bit packing needs; "
                              "leave this layer unquantized")


class QuantLinear(nn.Module):
    """Weight-only quantized replacement for nn.Linear (see the module docstring for layouts)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, act_order: bool = False, method: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_shape(in_features, out_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.act_order, self.method = act_order, method
        self.layout, self.kernel_group = "packed", 0
        self.kernel_block, self.plain_groups = 0, True
        G, K, N = num_groups(in_features, group_size), in_features, out_features
        kw = dict(device=device)
        self.register_buffer("packed", torch.zeros(N, K * bits // 32, dtype=torch.int32, **kw), False)
        self.register_buffer("scale", torch.ones(N, G, dtype=torch.float32, **kw), False)
        self.register_buffer("zero", torch.zeros(N, G, dtype=torch.uint8, **kw), False)
        self.register_buffer("g_idx", default_g_idx(K, group_size, device=device), False)
        for name in ("perm", "kernel_scales", "kernel_corr"):
            self.register_buffer(name, None, False)
        b = torch.zeros(N, dtype=dtype or torch.float32, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_result(cls, result: QuantResult, bias: Tensor | None = None,
                    method: str | None = None) -> QuantLinear:
        """Build from a QuantResult (codes, scale, zero, g_idx) and an optional float bias (out,)."""
        N, K = result.codes.shape
        g_idx = result.g_idx.to(torch.int32)
        act_order = not torch.equal(g_idx.cpu(), default_g_idx(K, result.group_size))
        m = cls(K, N, result.bits, result.group_size, result.symmetric, bias is not None, act_order, method,
                device="meta", dtype=None if bias is None else bias.dtype)
        if int(result.codes.max()) > (1 << result.bits) - 1:
            raise ConfigError(f"codes exceed the {result.bits}-bit range")
        G = num_groups(K, result.group_size)
        if result.scale.shape != (N, G) or result.zero.shape != (N, G) or g_idx.shape != (K,) \
                or int(g_idx.max()) >= G:
            raise ConfigError(f"QuantResult shapes do not agree: codes {(N, K)}, scale "
                              f"{tuple(result.scale.shape)}, zero {tuple(result.zero.shape)}, g_idx "
                              f"{tuple(g_idx.shape)} (max {int(g_idx.max())}); expected {G} groups")
        m._build(result.codes, result.scale, result.zero, g_idx)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
              has_bias: bool, act_order: bool = False, method: str | None = None,
              dtype: torch.dtype | None = None) -> QuantLinear:
        """A module on the meta device, to be filled by load_state_dict(..., assign=True)."""
        return cls(in_features, out_features, bits, group_size, symmetric, has_bias, act_order, method,
                   device="meta", dtype=dtype)

    def _int4_plan(self, g_idx: Tensor, device: torch.device) -> tuple[int, Tensor | None] | None:
        """(kernel group size, input permutation or None) if the int4 kernel of `device` can run this layer."""
        K, N = self.in_features, self.out_features
        if self.bits > 4:
            return None
        if device.type == "cuda":
            if (_CUDA_INT4["verified"] is False or torch.cuda.get_device_capability(device)[0] < 8
                    or N % 8 or K % (INNER_K_TILES * 16)):
                return None
        elif device.type != "cpu" or N % 16:
            return None
        span = self.group_size if self.group_size > 0 else K
        kg = next((g for g in KERNEL_GROUPS if span % g == 0 and K % g == 0), None)
        if kg is None:
            return None
        if self.group_size <= 0:
            return kg, None
        ref = default_g_idx(K, self.group_size, device=g_idx.device)
        if torch.equal(g_idx, ref):
            return kg, None
        perm = torch.argsort(g_idx, stable=True)
        return (kg, perm) if torch.equal(g_idx[perm], ref) else None

    def _build(self, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, kernels: bool = True) -> None:
        """Set the resident layout from codes (out, in), scale/zero (out, G) and g_idx (in,) on the codes'
        device: the kernel layout for that device where one fits, else "int8"/"packed" (always with
        kernels=False, which gives tensors that move to any device)."""
        dev = codes.device
        self.scale = scale.to(dev, torch.float32).contiguous()
        self.zero = zero.to(dev).round().to(torch.uint8).contiguous()
        self.g_idx = g_idx.to(dev, torch.int32).contiguous()
        self.perm = self.kernel_scales = self.kernel_corr = None
        self.kernel_group = self.kernel_block = 0
        self.plain_groups = torch.equal(self.g_idx, default_g_idx(self.in_features, self.group_size, dev))
        plan = self._int4_plan(self.g_idx, dev) if kernels else None
        if plan is not None and self._build_int4(codes, *plan):
            return
        if self.bits == 8:
            self.layout = "int8"
            self.packed = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
            if kernels and dev.type == "cpu" and self.scale.shape[1] == 1:
                s, z = self.scale[:, 0], self.zero[:, 0].float()
                self.kernel_scales = s.to(torch.bfloat16)
                self.kernel_corr = None if bool((z == 128).all()) else (128 - z) * s
        else:
            self.layout = "packed"
            self.packed = pack_int32(codes, self.bits, dim=-1)

    def _build_int4(self, codes: Tensor, kg: int, perm: Tensor | None) -> bool:
        """Set the int4 layout on the codes' device; False (nothing set) where the GPU layout is refused."""
        mid = 1 << (self.bits - 1)                 # codes are stored as q + (8 - mid): centred on 8
        c = (codes if perm is None else codes[:, perm]).to(torch.int32).add(8 - mid)
        if codes.device.type == "cuda":
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack(cuda_int4_pack(c), INNER_K_TILES)
            except RuntimeError as e:
                return self._cuda_int4_off(f"the conversion failed ({str(e).strip().splitlines()[0][:160]})")
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.contiguous(), INNER_K_TILES)
            N, K = c.shape     # read the codes back with bit operations where that gives exactly these codes
            self.kernel_block = next((b for b in CPU_INT4_BLOCKS
                                      if torch.equal(int4pack_cpu_codes(packed, N, K, b), c.to(torch.uint8))), 0)
        self.layout, self.kernel_group, self.perm, self.packed = "int4", kg, perm, packed
        g = self.g_idx if perm is None else self.g_idx[perm]
        gk = g[::kg].long()                                              # group of each kernel group
        s, z = self.scale[:, gk], self.zero[:, gk].float()              # (N, K/kg)
        sz = torch.stack([s, (mid - z) * s], dim=-1)                    # (N, K/kg, 2)
        self.kernel_scales = sz.transpose(0, 1).to(torch.bfloat16).contiguous()  # (K/kg, N, 2)
        if codes.device.type == "cuda" and not _CUDA_INT4["verified"]:
            why = self._cuda_mismatch(codes)
            if why:
                self.layout, self.kernel_group, self.perm, self.kernel_scales = "packed", 0, None, None
                return self._cuda_int4_off(why)
            _CUDA_INT4["verified"] = True
        return True

    def _cuda_mismatch(self, codes: Tensor) -> str | None:
        """Check the GPU layout once per process: the codes read back through the kernel, and the kernel's
        product on the first (up to) 256 unit inputs against the dequantized weight (bf16 scales)."""
        if not torch.equal(self._int4_codes(), codes.to(torch.uint8)):
            return "codes read back through the kernel differ from the codes packed"
        n, dev = min(self.in_features, 256), codes.device
        eye = torch.eye(n, self.in_features, dtype=torch.bfloat16, device=dev)
        got = _int4_mm(dev)(eye, self.packed, self.kernel_group, self.kernel_scales).float()   # (n, N)
        W = dequantize_grouped(codes, self.scale, self.zero.float(), self.g_idx)
        want = (W if self.perm is None else W[:, self.perm])[:, :n].T
        err = float((got - want).norm() / want.norm().clamp(min=1e-30))
        return None if err < 2e-2 else f"the kernel's product is off by {err:.3g} (relative) from the dequantized weight"

    @staticmethod
    def _cuda_int4_off(why: str) -> bool:
        _CUDA_INT4["verified"] = False
        log.warning("int4 GPU kernel not used (%s): quantized layers dequantize at each call instead", why)
        return False

    # ----------------------------------------------------------------- reading back
    def codes(self) -> Tensor:
        """Unsigned codes (out, in) uint8 in the original column order, from the resident layout."""
        if self.layout == "int8":
            return (self.packed.to(torch.int16) + 128).to(torch.uint8)
        if self.layout == "packed":
            return unpack_int32(self.packed, self.bits, self.in_features, dim=-1)
        return self._int4_codes()

    def _int4_codes(self) -> Tensor:
        """The codes (out, in) uint8 of the int4 layout in the original column order."""
        c = self._int4_kernel_codes()
        if self.perm is None:
            return c
        out = torch.empty_like(c)
        out[:, self.perm] = c
        return out

    def _int4_kernel_codes(self) -> Tensor:
        """The codes of the int4 layout in the kernel's column order (in[perm] under act-order): with bit
        operations where _build_int4 found a layout int4pack_cpu_codes reads exactly (about 1 ms for
        576 x 1536), else through the kernel itself: with
        s' = 1, z' = 8 it returns w = c exactly, so an identity input yields the stored codes whatever the
        kernel's private layout (in x in x out multiply-adds: 1536 x 1536 x 576 takes ~50 ms)."""
        K, N, kg, dev = self.in_features, self.out_features, self.kernel_group, self.packed.device
        mid = 1 << (self.bits - 1)
        if self.kernel_block:
            c = int4pack_cpu_codes(self.packed, N, K, self.kernel_block)
            c = c if mid == 8 else c - (8 - mid)
        else:
            unit = torch.ones(K // kg, N, 2, dtype=torch.bfloat16, device=dev)
            unit[..., 1] = 8.0
            rows, mm = [], _int4_mm(dev)
            for start in range(0, K, _UNIT_ROWS):
                n = min(_UNIT_ROWS, K - start)
                eye = torch.zeros(n, K, dtype=torch.bfloat16, device=dev)
                eye[torch.arange(n, device=dev), torch.arange(start, start + n, device=dev)] = 1.0
                rows.append(mm(eye, self.packed, kg, unit))
            c = (torch.cat(rows).T - (8 - mid)).to(torch.uint8)         # (N, K), permuted columns
        return c.contiguous()

    def _kernel_order_weight(self) -> Tensor:
        """W_hat[:, perm] (out, in) fp32 of the int4 layout in the kernel's column order (W_hat without
        act-order), for the dense forward, bit for bit dequantize_weight()'s columns. In that order the groups
        are contiguous blocks also under act-order (_int4_plan checked it), so it broadcasts the (out, G)
        scales (dequantize_blocks) instead of gathering them per column, and it skips putting the codes back
        in the original order. Measured (one thread, 576 x 1536 and 1536 x 576): ~0.85 ms without act-order
        (as before); under act-order ~0.85 ms against 9-10 ms for the per-column gather it replaced.
        (A fused c * s - z * s in one addcmul pass measured slower, 1.3 ms: its scalar broadcast along the
        innermost dimension does not vectorise.)"""
        return dequantize_blocks(self._int4_kernel_codes(), self.scale, self.zero)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat (out, in) = (q - z[g_idx]) * s[g_idx] from the stored codes (exact in fp32)."""
        if self.plain_groups:
            return dequantize_blocks(self.codes(), self.scale, self.zero).to(dtype)
        if self.layout == "int4":
            # act-order: contiguous groups in the kernel's column order, then the columns back in place
            # (index_select: ~0.45 ms for 576 x 1536 on one thread, against 2.4 ms to scatter them)
            inv = torch.argsort(self.perm)
            return self._kernel_order_weight().index_select(1, inv).to(dtype)
        return dequantize_grouped(self.codes(), self.scale, self.zero.float(), self.g_idx).to(dtype)

    def portable_tensors(self) -> dict[str, Tensor]:
        """The tensors saved in state_dict (GPTQ orientation, true zero points, fp32 scales)."""
        K, N, b = self.in_features, self.out_features, self.bits
        if self.packed.is_meta:
            G = self.scale.shape[1]
            shapes = {"qweight": (K * b // 32, N), "scales": (G, N), "qzeros": (G, N * b // 32), "g_idx": (K,)}
            dtypes = {"qweight": torch.int32, "scales": torch.float32, "qzeros": torch.int32,
                      "g_idx": torch.int32}
            return {k: torch.empty(shapes[k], dtype=dtypes[k], device="meta") for k in PORTABLE_KEYS}
        return {"qweight": pack_int32(self.codes(), b, dim=-1).T.contiguous(),
                "scales": self.scale.T.contiguous(),
                "qzeros": pack_int32(self.zero.T, b, dim=-1),
                "g_idx": self.g_idx.clone()}

    # ----------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)        # bias only
        for k, v in self.portable_tensors().items():
            destination[prefix + k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        got = {k: state_dict[prefix + k] for k in PORTABLE_KEYS if prefix + k in state_dict}
        missing_keys.extend(prefix + k for k in PORTABLE_KEYS if k not in got)
        if len(got) == len(PORTABLE_KEYS):
            err = self._check_portable(got)
            if err:
                error_msgs.append(f"{prefix[:-1]}: {err}")
            else:
                self.load_portable(got)
        rest = {k: v for k, v in state_dict.items()
                if k.startswith(prefix) and k[len(prefix):] not in PORTABLE_KEYS}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_portable(self, t: dict[str, Tensor]) -> str | None:
        K, N, b = self.in_features, self.out_features, self.bits
        G = num_groups(K, self.group_size)
        want = {"qweight": (K * b // 32, N), "scales": (G, N), "qzeros": (G, N * b // 32), "g_idx": (K,)}
        for k, shape in want.items():
            if tuple(t[k].shape) != shape:
                return f"{k} has shape {tuple(t[k].shape)}, expected {shape}"
        return None

    def load_portable(self, t: dict[str, Tensor]) -> None:
        """Rebuild the resident layout from portable tensors (as returned by portable_tensors())."""
        K, N, b = self.in_features, self.out_features, self.bits
        codes = unpack_int32(t["qweight"].to(torch.int32), b, K, dim=0).T
        zero = unpack_int32(t["qzeros"].to(torch.int32), b, N, dim=-1).T
        self._build(codes, t["scales"].T.float(), zero, t["g_idx"])

    # ----------------------------------------------------------------- device / dtype moves
    def _apply(self, fn, recurse=True):
        """Storage keeps its dtypes under .to(dtype)/.half(); the layout is re-chosen for a new device."""
        old, dev = self.packed.device, fn(torch.zeros(())).device
        if self.layout == "int4" and dev.type != old.type:   # a kernel layout belongs to its device: read the
            self._build(self.codes(), self.scale, self.zero, self.g_idx, kernels=False)   # codes there first
        held = {k: self._buffers.pop(k) for k in _STORAGE}
        super()._apply(fn, recurse)
        for k, t in held.items():
            moved = None if t is None else fn(t)
            if moved is not None and moved.dtype != t.dtype:
                moved = t.to(moved.device)
            self._buffers[k] = moved
        if dev.type != old.type and "meta" not in (dev.type, old.type):
            self._build(self.codes(), self.scale, self.zero, self.g_idx)
        return self

    # ----------------------------------------------------------------- compute
    def _kernel_rows(self, rows: int, device: torch.device) -> bool:
        """Whether the int4 layout runs x (rows, in) through the int4 kernel (else dequantize + dense matmul).

        Measured (bench/qlora_layers.py --clock cpu: one thread) on a Xeon with AVX-512 VNNI but no
        AVX512-BF16, where PyTorch emulates bf16; forward time over fp32 nn.Linear, kernel / dense, 4-bit g64,
        for 576->576, 576->192, 576->1536, 1536->576: 1 row 1.40/12.0, 2.18/13.4, 0.54/10.6, 0.60/9.0;
        64 rows 2.00/2.27, 2.29/2.68, 1.74/2.27, 1.69/2.53 (summed 4.98 against 6.59 ms); 128 rows
        2.33/1.78, 2.47/2.03, 1.80/1.85, 1.88/1.89 (10.9 against 10.5 ms); 256 rows 2.27/1.51, 2.37/1.57,
        1.89/1.32, 1.98/1.50; 2048 rows 1.92/1.05, 2.18/1.20, 2.02/1.03, 2.10/1.04. The kernel costs ~2x
        fp32 per row from 32 rows on; the dense path costs fp32 plus one dequantization (~1.4 ms for
        576 x 1536 weights), so they cross at 128 rows. With native bf16 the kernel beat fp32 at 512 rows
        (MEASURED.md: 3.6 ms against 7.4 ms for 576 -> 1536), so it runs at every size there; on a GPU it
        always runs.

        Checked again on 2026-12-07 (bench/cpu_runtime.py, bench/RESULTS.md "The 4-bit CPU runtime without
        native bf16"; Intel Xeon, family 6 model 207, AVX-512 with VNNI, no avx512_bf16/AMX; one thread, CPU
        time, the four shapes summed, kernel / dense / fp32 in us): 1 row 178 / 2391 / 279; 16 rows 1079 /
        3140 / 996; 32 rows 2131 / 3917 / 1431; 64 rows 4304 / 4527 / 2246; 128 rows 8446 / 6464 / 4017: the
        crossing stays between 64 and 128 rows. Measured there and not taken: PyTorch's int4 operators on
        fp32 activations (`_weight_int4pack_mm_for_cpu`, `quantized.int4mm_packed_weight_cpu`: 1.8 ms for one
        row of 576 -> 1536 against 0.12 ms in fp32); int8 products on VNNI (`torch._int_mm`, 1.4 ms against
        6.2 ms for 512 x 576 x 1536), which need one product per group for grouped scales (9 groups: 8.5 ms)
        or the weight re-rounded per channel with int8 activations (3.5 ms, but 27 dB SQNR against W_hat with
        one outlier input channel; 43 dB with the activations split in two int8 terms, then 8.2 ms); nibble
        readers straight into a (in, out) fp32 buffer (0.78 against 0.85 ms to dequantize 576 x 1536). The
        dense path thus costs the fp32 product plus ~13% for 512 rows, and a 4-bit model's prefill stays
        below fp32's on such a CPU (about 0.85x at the model level).
        """
        if device.type != "cpu":
            return True
        limit = INT4_DENSE_ROWS[_cpu_native_bf16()]
        return limit is None or rows < limit

    def cpu_path(self, rows: int) -> str:
        """The path this layer's forward takes on a CPU for x of `rows` rows: "kernel" (int4 kernel, bf16
        activations) or "dense" (W_hat dequantized in fp32 in the kernel's column order, then a dense matmul)
        for the int4 layout; "int8" (int8 kernel) or "packed" (dequantize + matmul) for the others."""
        if self.layout == "int4":
            return "kernel" if self._kernel_rows(rows, torch.device("cpu")) else "dense"
        if self.layout == "int8" and self.kernel_scales is not None:
            return "int8"
        return "packed"

    def matmul(self, x: Tensor) -> Tensor:
        """x (..., in) @ W_hat^T (..., out) by the resident layout's path for this many rows (no bias)."""
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        if self.layout == "int4":
            dev = x2.device
            if self.perm is not None:
                x2 = x2.index_select(1, self.perm)
            if self._kernel_rows(x2.shape[0], dev):
                b = self._buffers          # plain dict lookups: ~200 calls per decoded token
                y = _int4_mm(dev)(x2.to(torch.bfloat16).contiguous(), b["packed"], self.kernel_group,
                                  b["kernel_scales"])
            else:
                w = self._kernel_order_weight()
                y = x2 @ (w if x.dtype == torch.float32 else w.to(x.dtype)).T
        elif self.layout == "int8" and self.kernel_scales is not None and x.device.type == "cpu":
            xb = x2.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(xb, self.packed, self.kernel_scales)
            if self.kernel_corr is not None:
                y = y.float() + xb.float().sum(-1, keepdim=True) * self.kernel_corr
        else:
            y = x2 @ self.dequantize_weight(x.dtype).T
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    def forward(self, x: Tensor) -> Tensor:
        y = frozen_matmul(self, x)          # dL/dx = dL/dy @ W_hat, dequantized again in the backward
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def storage_bytes(self) -> int:
        """Bytes of all resident tensors (buffers and bias)."""
        ts = [t for t in self._buffers.values() if t is not None] + [p for p in self.parameters()]
        return sum(t.numel() * t.element_size() for t in ts)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, act_order={self.act_order}, "
                f"layout={self.layout}, bias={self.bias is not None}")
