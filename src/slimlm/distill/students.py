"""Students built from the teacher, as DistilBERT (every other layer) and the Switch Transformer distillation
did: a copy of the teacher keeping some of its decoder layers.

    layers:every-K     layers 0, K, 2K, ... (every-2: half the depth)
    layers:first-N     the first N layers
    layers:last-N      the last N layers
    layers:0,3,5       an explicit list (0-based)

Any other student is a model reference slimlm loads (a structured-pruned folder, a smaller model with the same
tokenizer). `init="random"` re-initialises the built student's weights (the untrained baseline of the same
shape: the architecture's own initialisation).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError


def is_spec(student: str) -> bool:
    return isinstance(student, str) and student.startswith("layers:")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """The teacher layers a `layers:...` spec keeps (sorted, 0-based); ConfigError for a bad spec or one that
    keeps no layer or names a layer the teacher lacks."""
    body = spec[len("layers:"):].strip()
    try:
        if body.startswith("every-"):
            k = int(body[len("every-"):])
            if k < 1:
                raise ValueError
            keep = list(range(0, n_layers, k))
        elif body.startswith("first-"):
            keep = list(range(min(int(body[len("first-"):]), n_layers)))
        elif body.startswith("last-"):
            n = int(body[len("last-"):])
            keep = list(range(max(n_layers - n, 0), n_layers)) if n > 0 else []
        else:
            keep = sorted({int(x) for x in body.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--student {spec!r}: use layers:every-K, layers:first-N, layers:last-N or layers:i,j,... "
                          "(0-based), or a model reference") from None
    if not keep:
        raise ConfigError(f"--student {spec!r} keeps no layer of the teacher's {n_layers}")
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"--student {spec!r} names layer {bad[0]}; the teacher has layers 0..{n_layers - 1}")
    return keep


def build_student(teacher: nn.Module, spec: str, init: str = "pretrained", seed: int = 0) -> nn.Module:
    """A new model: a deep copy of `teacher` keeping the layers `spec` names, its weights the teacher's
    (init="pretrained") or freshly initialised by the architecture (init="random")."""
    from ..adapt.methods import cut_layers
    from ..calibration.common import find_blocks

    if init not in ("pretrained", "random"):
        raise ConfigError(f"--student-init takes pretrained or random, not {init!r}")
    n = len(find_blocks(teacher)[1])
    keep = parse_layers(spec, n)
    student = copy.deepcopy(teacher)
    student.__dict__.pop("slimlm_ref", None)          # a new model: not the folder the teacher came from
    for p in student.parameters():
        p.requires_grad_(True)
    cut_layers(student, keep)
    student.slimlm_teacher_layers = keep
    if init == "random":
        torch.manual_seed(seed)
        student.apply(student._init_weights)
        if hasattr(student, "tie_weights"):
            student.tie_weights()
    return student
