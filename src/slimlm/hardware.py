"""What the compute device does fast, so that defaults follow the machine rather than one machine.

bf16 matrix products are 4-7x faster than fp32 on CPUs with native bf16 instructions (AVX512-BF16, AMX,
Arm's BF16) and on GPUs since Ampere, but on a CPU without them (AVX2 only, e.g. AMD Zen 3) PyTorch emulates
them and a 512 x 576 x 1536 product measured 7.3x SLOWER than fp32 (47.6 ms against 6.5 ms, 2 threads).
Calibration passes therefore run in bf16 only where the device computes it natively.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 'flags', Arm 'Features'); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16, AMX-BF16, or Arm BF16)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True when bf16 matrix products on `device` are faster than fp32 ones."""
    dev = torch.device(device)
    if dev.type == "cuda":          # this device's own capability: bf16 tensor cores since Ampere (8.0)
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 0)
    if dev.type == "cpu":
        return cpu_has_native_bf16()
    return False


def release_large_frees(threshold: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation of at least `threshold` bytes by its own mapping, returned to the
    system when freed (mallopt M_MMAP_THRESHOLD); returns whether it applied (glibc only).

    A training step allocates and frees hundreds of multi-MB activations. By default glibc raises its mmap
    threshold after such frees (up to 32 MB), so later ones come from the heap, which fragments and is not
    returned: the process's resident set then grows to about twice what it holds. Measured on SmolLM2-135M,
    LoRA on every linear layer, batch 4 x 512: peak RSS 7.2 GB with the default, 3.7 GB with a fixed 128 KB
    threshold (activations saved for the backward: 2.4 GB)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))      # M_MMAP_THRESHOLD; fixing it also stops the dynamic raise
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------ allocator
# Directories searched for tcmalloc besides the loader's own search (Debian/Ubuntu multiarch, Fedora, /usr/local).
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def allocator_in_use() -> str:
    """'tcmalloc', 'jemalloc' or 'glibc': the malloc this process runs on, read from its memory map
    (/proc/self/maps; 'unknown' where there is none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def find_tcmalloc(environ: dict[str, str] | None = None) -> str | None:
    """The path of a tcmalloc shared library on this machine (Debian/Ubuntu: `apt install
    libtcmalloc-minimal4`; Fedora: gperftools-libs), or None. SLIMLM_TCMALLOC names one explicitly."""
    explicit = (os.environ if environ is None else environ).get("SLIMLM_TCMALLOC")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for d in _LIB_DIRS:
        for name in _TCMALLOC:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return None


def training_allocator_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment under which a CPU training process should be started, or None to keep this one.

    Training allocates and frees hundreds of multi-MB activations a step. glibc's malloc keeps the freed
    ones in a heap that fragments, so the resident set grows to about twice what the step holds; tcmalloc
    reuses them. Measured on SmolLM2-135M, LoRA on every linear layer, batch 4 x 512, 2-core Xeon without
    native bf16 (bench/RESULTS.md): glibc 7.5 GB peak RSS, 9.25 s/step; tcmalloc 4.0 GB, 8.75 s/step; glibc with
    a fixed 128 KB mmap threshold (`release_memory`) 3.9 GB but 15.3 s/step (every activation is fresh pages).

    SLIMLM_ALLOCATOR: 'auto' (default: tcmalloc where one is installed), 'tcmalloc' (an error if none is),
    'system' (never switch). Linux only; the switch needs a new process (LD_PRELOAD), so the command line
    re-executes itself once at start; the Python API cannot and only reports what it runs on."""
    env = dict(os.environ if environ is None else environ)
    choice = env.get("SLIMLM_ALLOCATOR", "auto").strip().lower()
    if choice not in ("auto", "tcmalloc", "system"):
        from .errors import SlimlmError
        raise SlimlmError(f"SLIMLM_ALLOCATOR={choice!r}: use auto, tcmalloc or system")
    if choice == "system" or not sys.platform.startswith("linux") or allocator_in_use() != "glibc":
        return None
    lib = find_tcmalloc(env)
    if lib is None:
        if choice == "tcmalloc":
            from .errors import SlimlmError
            raise SlimlmError("SLIMLM_ALLOCATOR=tcmalloc but no tcmalloc library was found: install it "
                              "(Debian/Ubuntu: apt install libtcmalloc-minimal4) or set SLIMLM_TCMALLOC=PATH")
        return None
    if lib in env.get("LD_PRELOAD", ""):
        return None                                        # preloaded already and still not loaded: give up
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env
