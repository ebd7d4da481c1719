"""slimlm: make language models small, cheap and fast to adapt, CPU first.

Quantize, prune and adapt (distilling is being built) in one toolkit, with evaluation built in and outputs
in the formats transformers and other tools load.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import SlimlmError  # noqa: E402  (light: no torch)

# Every method's config class by name (`from slimlm import GPTQConfig`), imported on first use.
_CONFIGS = {
    "slimlm.quant.configs": ("RTNConfig", "GPTQConfig", "AWQConfig", "NF4Config", "Int8Config"),
    "slimlm.pruning.configs": ("MagnitudeConfig", "WandaConfig", "SparseGPTConfig"),
    "slimlm.pruning.structured": ("StructuredConfig",),
    "slimlm.adapt.methods": ("FullConfig", "TopConfig", "QATConfig", "LayerDropConfig"),
    "slimlm.adapt.lora": ("LoRAConfig",),
    "slimlm.adapt.prompts": ("PromptConfig", "PTuningConfig", "PrefixConfig", "PTuningV2Config"),
    "slimlm.adapt.bottleneck": ("BottleneckConfig",),
    "slimlm.adapt.intrinsic": ("IntrinsicConfig",),
    "slimlm.pruning.movement": ("MovementConfig",),
    "slimlm.pruning.gum": ("GumConfig",),
    "slimlm.distill.method": ("DistillConfig",),
    "slimlm.training.config": ("TrainConfig",),
}

__all__ = ["__version__", "load_model", "load_tokenizer", "save_model", "evaluate", "quantize", "prune",
           "export", "train", "distill", "merge", "calibration_data", "run_tasks", "SlimlmError", *[c for names in _CONFIGS.values() for c in names]]



def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the API is used.
    if name in ("load_model", "load_tokenizer", "save_model"):
        from . import models
        return getattr(models, name)
    if name in ("evaluate", "quantize", "prune", "export", "train", "distill", "merge", "calibration_data"):
        from . import api
        return getattr(api, name)
    if name == "run_tasks":                 # lm-eval's tasks on a model in memory (pip install 'slimlm[eval]')
        from .lmeval import run_tasks
        return run_tasks
    for module, names in _CONFIGS.items():
        if name in names:
            import importlib
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'slimlm' has no attribute {name!r}")
