"""2:4 sparse linear layers on a CUDA GPU through PyTorch's semi-structured sparse kernels.

A 2:4 pruned model (SparseGPT, Wanda or magnitude with sparsity 2:4) runs as a dense one everywhere; on an
NVIDIA GPU of compute capability 8.0 or newer, `to_semi_structured(model)` swaps the weights of its 2:4
linear layers for `torch.sparse.to_sparse_semi_structured` tensors (half the values plus metadata), whose
matrix products skip the zeros in hardware (cuSPARSELt where PyTorch has it, CUTLASS otherwise). The kernels
take float16 or bfloat16 weights and need shapes they can tile; a layer they refuse stays dense and is named
in the report with the kernel's reason. Whether it is faster depends on the shapes: the benchmark
(`bench/gpu_sparse.py`) measures the model and larger layers against dense ones on the same GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import SlimlmError
from .storage import nm_of

DTYPES = (torch.float16, torch.bfloat16)


def is_2_4(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every output row holds at most 2 non-zeros."""
    n = nm_of(weight.detach(), 4)
    return n is not None and n <= 2


def check_device(model: nn.Module) -> torch.device:
    """The model's CUDA device, or a one-line error saying what the kernels need."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda":
        where = "no parameters" if p is None else f"parameters on {p.device}"
        raise SlimlmError(f"2:4 sparse kernels run on a CUDA GPU (the model has {where}); move it with "
                          "model.to('cuda', torch.float16) first, or run the model as a dense one")
    major, minor = torch.cuda.get_device_capability(p.device)
    if major < 8:
        raise SlimlmError(f"2:4 sparse kernels need compute capability 8.0 or newer; this GPU has {major}.{minor}")
    return p.device


def to_semi_structured(model: nn.Module, *, backend: str = "auto") -> dict:
    """Swap the weight of every 2:4 sparse nn.Linear of `model` (on a CUDA GPU, float16 or bfloat16) for a
    semi-structured sparse tensor, in place. backend: "auto" (PyTorch's choice: cuSPARSELt where available),
    "cutlass" or "cusparselt". Returns {"converted": [names], "dense": {name: why}, "backend": ...}.
    Layers that are not 2:4 sparse (the output layer, embeddings) stay as they are."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in ("auto", "cutlass", "cusparselt"):
        raise SlimlmError(f"backend must be auto, cutlass or cusparselt, not {backend!r}")
    check_device(model)
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    if backend != "auto":
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    converted, dense, kinds = [], {}, set()
    try:
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            W = mod.weight
            if W.dtype not in DTYPES:
                dense[name] = f"dtype {W.dtype} (the kernels take float16 or bfloat16)"
                continue
            if not is_2_4(W):
                dense[name] = "not 2:4 sparse"
                continue
            try:
                sparse = to_sparse_semi_structured(W.detach())
            except (RuntimeError, ValueError) as e:   # shapes the kernels cannot tile, missing backend
                dense[name] = str(e).strip().splitlines()[0][:200]
                continue
            mod.weight = nn.Parameter(sparse, requires_grad=False)
            converted.append(name)
            kinds.add(type(sparse).__name__)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    return {"converted": converted, "dense": dense, "backend": ",".join(sorted(kinds)) or None}


def to_dense(model: nn.Module) -> int:
    """Undo to_semi_structured in place (each sparse weight back to a dense tensor); returns how many."""
    from torch.sparse import SparseSemiStructuredTensor

    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and isinstance(mod.weight, SparseSemiStructuredTensor):
            mod.weight = nn.Parameter(mod.weight.to_dense(), requires_grad=False)
            n += 1
    return n
