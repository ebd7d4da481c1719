"""PEFT's LoRA adapter folder, written and read without the peft library (tests/test_peft_interop.py proves
the format against peft itself, both ways).

A folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, lora_dropout, target_modules,
use_rslora, use_dora, fan_in_fan_out, ...) and `adapter_model.safetensors` with, per adapted layer <layer>
(its module name in the transformers model):

    base_model.model.<layer>.lora_A.weight          (r, in)
    base_model.model.<layer>.lora_B.weight          (out, r)
    base_model.model.<layer>.lora_magnitude_vector  (out,)   DoRA only (PEFT 0.21 writes no ".weight")

Loading takes the layers from the tensor keys (so PEFT's target_modules, exclude_modules and
layers_to_transform need no re-implementation), each layer's rank from its A, and alpha from alpha_pattern
where a key matches (PEFT's rule: re.match(rf"(.*\\.)?({key})$", layer)). Pickles (adapter_model.bin) are
never loaded. Config keys this module does not know (newer PEFT versions) are ignored; known ones that
change the computation beyond LoRA / DoRA are refused.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slimlm.adapt.layer import LoRAAdapter, LoRALinear, linear_dims
from slimlm.adapt.lora import adapter_layers, attach, check_new_name, linear_like_layers, lora_layers
from slimlm.calibration.common import is_linear
from slimlm.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
SUPPORTED_TYPES = ("LORA",)
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
             ".lora_magnitude_vector.weight": "m"}
# PEFT config entries that add computation beyond LoRA / DoRA: refused when set (falsy = unused)
_REFUSED = ("modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters",
            "alora_invocation_tokens", "use_qalora", "lora_bias", "use_bdlora", "arrow_config")
# initialisations that rewrite the base weights: the adapter is right only on the base saved beside it
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def read_adapter_config(folder: Path | str) -> dict:
    """The parsed adapter_config.json of a PEFT adapter folder."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {CONFIG_FILE}: it is not a PEFT adapter folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


# ------------------------------------------------------------------------------------------ save
def _clean_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees the model before wrapping (the insides of LoRALinear left out)."""
    wrappers = [n + "." for n in lora_layers(model)]
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(w) for w in wrappers)]


def _target_modules(model: nn.Module, layers: list[str]) -> list[str]:
    """The leaf names of `layers` where they select exactly those modules under PEFT's rule (a name equal to
    a target or ending in '.' + target), else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    chosen = set(layers)
    extra = [n for n in _clean_names(model)
             if n not in chosen and any(n == t or n.endswith("." + t) for t in leaves)]
    return sorted(layers) if extra else leaves


def _common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def save_peft(model: nn.Module, folder: Path | str, name: str = "default", *,
              base_model_ref: str | None = None) -> None:
    """Write adapter `name` as a PEFT LoRA folder into `folder`, which must exist and be empty (the caller
    handles atomicity). base_model_ref: what PEFT records as base_model_name_or_path (default: the
    model's config._name_or_path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: create an empty folder for the adapter first")
    if any(folder.iterdir()):
        raise ConfigError(f"{folder} is not empty: save_peft writes into an empty folder")
    adapters = {n: w.adapters[name] for n, w in adapter_layers(model, name).items()}
    for flag in ("dora", "rslora"):
        if len({getattr(a, flag) for a in adapters.values()}) > 1:
            raise ConfigError(f"adapter {name!r} mixes layers with and without {flag}, which one PEFT config "
                              "cannot describe; save such layers as separate adapters")
    r = _common([a.r for a in adapters.values()])
    alpha = _common([a.alpha for a in adapters.values()])
    first = next(iter(adapters.values()))
    tensors: dict[str, Tensor] = {}
    for n, a in adapters.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = a.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = a.lora_B.detach().cpu().contiguous()
        if a.lora_magnitude is not None:
            tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = a.lora_magnitude.detach().cpu().contiguous()
    bases = [w.base for w in adapter_layers(model, name).values()]
    ref = base_model_ref or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": ref,
        "r": r, "lora_alpha": alpha, "lora_dropout": first.dropout_p,
        "rank_pattern": {re.escape(n): a.r for n, a in adapters.items() if a.r != r},
        "alpha_pattern": {re.escape(n): a.alpha for n, a in adapters.items() if a.alpha != alpha},
        "target_modules": _target_modules(model, list(adapters)),
        "use_rslora": first.rslora, "use_dora": first.dora, "bias": "none",
        "fan_in_fan_out": any(is_linear(b) and not isinstance(b, nn.Linear) for b in bases),   # Conv1D
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "inference_mode": True, "modules_to_save": None, "lora_bias": False, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None,
    }
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("adapter %r (%d layers) saved to %s", name, len(adapters), folder)


# ------------------------------------------------------------------------------------------ load
def _check_config(cfg: dict, folder: Path) -> None:
    kind = cfg.get("peft_type")
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"{folder} holds a {kind} adapter; slimlm loads {', '.join(SUPPORTED_TYPES)} "
                          "adapters (LoRA, DoRA, rsLoRA)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise ConfigError(f"{folder}/{CONFIG_FILE} lacks a numeric {key}")
    p = cfg.get("lora_dropout") or 0.0
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ConfigError(f"{folder}/{CONFIG_FILE}: lora_dropout must be in [0, 1), got {p!r}")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"{folder} trains biases (bias={cfg['bias']!r}); slimlm loads adapters with "
                          "bias 'none' only")
    used = next((k for k in _REFUSED if cfg.get(k)), None)
    if used is not None:
        raise ConfigError(f"{folder} uses PEFT's {used}={cfg[used]!r}, which slimlm's LoRA runtime does not "
                          "support (plain LoRA / DoRA / rsLoRA adapters only)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        log.warning("%s was initialised with %s, which rewrites the base weights: it is right only on the "
                    "base model saved with it", folder, init)


def _groups(tensors: dict[str, Tensor], where: Path) -> dict[str, dict[str, Tensor]]:
    """Layer name -> {"A", "B", "m"} tensors, from the file's keys."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in _SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            raise ConfigError(f"{where} holds {key}, which is not a LoRA A, B or DoRA magnitude tensor "
                              "(trained biases, modules_to_save and other PEFT extras are not supported)")
        groups.setdefault(k[: -len(suffix)], {})[_SUFFIXES[suffix]] = t
    if not groups:
        raise ConfigError(f"{where} holds no tensors")
    return groups


def _pattern_value(patterns: dict | None, layer: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", layer)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def _adapters(model: nn.Module, cfg: dict, groups: dict[str, dict[str, Tensor]],
              where: Path) -> dict[str, LoRAAdapter]:
    """One LoRAAdapter per layer of the file, after checking that every layer exists here and fits."""
    layers = linear_like_layers(model)
    dora = bool(cfg.get("use_dora"))
    out = {}
    for layer, t in groups.items():
        if layer not in layers:
            there = dict(model.named_modules()).get(layer)
            what = "has no such module" if there is None else f"has it as {type(there).__name__}, not a linear layer"
            examples = ", ".join(list(layers)[:2])
            raise ConfigError(f"the adapter in {where} was made for another base: it adapts {layer}, and this "
                              f"model {what} (its linear layers look like {examples})")
        need = ["A", "B"] + (["m"] if dora else [])
        missing = [k for k in need if k not in t]
        if missing or ("m" in t and not dora):
            raise ConfigError(f"{where} is inconsistent at {layer}: tensors {sorted(t)} with use_dora={dora}")
        A, B, m = t["A"], t["B"], t.get("m")
        base = layers[layer].base if isinstance(layers[layer], LoRALinear) else layers[layer]
        i, o = linear_dims(base)
        r = A.shape[0] if A.ndim == 2 else -1
        if A.ndim != 2 or A.shape[1] != i or tuple(B.shape) != (o, r) or (m is not None and tuple(m.shape) != (o,)):
            got = f"A {tuple(A.shape)}, B {tuple(B.shape)}" + ("" if m is None else f", magnitude {tuple(m.shape)}")
            raise ConfigError(f"the adapter in {where} was made for another base: {layer} is {o} x {i} (out x in) "
                              f"here, which needs A (r, {i}), B ({o}, r), but the adapter has {got}")
        want = _pattern_value(cfg.get("rank_pattern"), layer, cfg["r"])
        if r != want:
            raise ConfigError(f"{where} is inconsistent at {layer}: A has rank {r}, adapter_config.json says {want}")
        alpha = _pattern_value(cfg.get("alpha_pattern"), layer, cfg["lora_alpha"])
        init = "gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming"
        out[layer] = LoRAAdapter(A.float(), B.float(), alpha, rslora=bool(cfg.get("use_rslora")),
                                 dropout=float(cfg.get("lora_dropout") or 0.0),
                                 magnitude=None if m is None else m.float(), init=init)
    return out


def load_peft(model: nn.Module, folder: Path | str, name: str = "default") -> list[str]:
    """Load a PEFT LoRA / DoRA folder (written by PEFT or by save_peft) onto `model` as adapter `name`;
    returns the adapted layer names. Every check runs before the model changes; then, as add_lora, the
    base is frozen and `name` is the active, trainable adapter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    cfg = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLE_FILE).is_file():
            raise ConfigError(f"{folder} holds {PICKLE_FILE}, a pickle, which slimlm never loads: convert it to "
                              f"{WEIGHTS_FILE} (peft: model.save_pretrained(folder, safe_serialization=True))")
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}")
    _check_config(cfg, folder)
    check_new_name(model, name)
    adapters = _adapters(model, cfg, _groups(load_file(str(weights)), weights), folder)
    attach(model, name, adapters)
    return list(adapters)
