"""The registries: methods by (family, name) and file formats by name.

A method module registers itself with `@register("quantize", "gptq", GPTQConfig, needs_data=True)` on its
apply function `apply(model, config, data) -> dict`. A format module registers a `Format` with
`register_format(...)`: how it recognises a folder or file, loads it, and writes a model. The CLI, the Python
API and recipe files look methods and formats up here; nothing dispatches on their names elsewhere.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SlimlmError


@dataclass(frozen=True)
class Family:
    """A family of methods sharing one command (`slimlm quantize --method gptq ...`) and one API function.

    modules: modules whose import registers the family's methods (imported on first lookup)
    api: the name of the slimlm.api function that applies a method of the family
    done: how the command reports a result ("quantized ... with gptq")
    reserved: option names the command takes itself; a method config field of the same name would be
              shadowed by it, so `register` refuses one
    command: which kind of command the CLI builds: "compress" (one shot: load, apply, save) or "train"
    """
    name: str
    modules: tuple[str, ...]
    api: str
    done: str
    reserved: frozenset[str]
    help: str = ""
    command: str = "compress"


# Options of the one-shot compression commands (slimlm.cli._family_command), shared by quantize and prune.
COMPRESSION_OPTIONS = frozenset({"model", "method", "data", "field", "samples", "seqlen", "output", "overwrite",
                                 "batch_size", "precise", "threads", "trust_remote_code", "device", "dtype",
                                 "budget_candidates"})

_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    _REGISTRY.setdefault(family.name, {})
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


@dataclass(frozen=True)
class Method:
    family: str
    name: str
    config_cls: type
    apply: Callable[..., Any]
    needs_data: bool | Callable[[Any], bool]   # or a function of the config (structured: by its score)
    help: str

    def data_needed(self, config: Any) -> bool:
        """Whether this configuration of the method needs calibration data."""
        return bool(self.needs_data(config) if callable(self.needs_data) else self.needs_data)


_REGISTRY: dict[str, dict[str, Method]] = {}
_loaded: set[str] = set()


def register(family: str, name: str, config_cls: type, *, needs_data: bool | Callable[[Any], bool] = False,
             help: str = ""):
    """Decorator registering `apply(model, config, data)` as method `name` of `family`. A config field named
    like one of the family command's own options is refused here: it could never be set from the CLI."""
    import dataclasses

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    clash = sorted({f.name for f in dataclasses.fields(config_cls)} & _FAMILIES[family].reserved)
    if clash:
        raise ValueError(f"{config_cls.__name__} has a field {clash[0]!r}, which the {family} command takes as its "
                         f"own option --{clash[0].replace('_', '-')}; rename the field")

    def deco(fn):
        _REGISTRY[family][name] = Method(family, name, config_cls, fn, needs_data, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def _load(family: str) -> None:
    if family in _loaded:
        return
    _loaded.add(family)
    for mod in _FAMILIES[family].modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # family not built yet in this checkout
            if e.name != mod and not mod.startswith(str(e.name)):
                raise


def methods(family: str) -> dict[str, Method]:
    if family not in _FAMILIES:
        raise SlimlmError(f"unknown family {family!r}; choose one of: {', '.join(_FAMILIES)}")
    _load(family)
    return dict(_REGISTRY[family])


def get(family: str, name: str) -> Method:
    table = methods(family)
    if name not in table:
        valid = ", ".join(sorted(table)) or "none available"
        raise SlimlmError(f"unknown {family} method {name!r}; choose one of: {valid}")
    return table[name]


# ------------------------------------------------------------------------------------------------ formats
# Modules whose import registers formats.
_FORMAT_MODULES = ("slimlm.formats.native", "slimlm.formats.bnb", "slimlm.formats.gptq",
                   "slimlm.formats.compressed_tensors", "slimlm.formats.peft", "slimlm.formats.gguf",
                   "slimlm.formats.hf")


@dataclass(frozen=True)
class Format:
    """A way to store a model on disk.

    recognise(path, config) -> bool   whether a folder (config: its config.json as a dict) or a file (config:
                                      None) is in this format
    load(path, **options) -> model    build the model from it (options: dtype, trust_remote_code)
    save(model, tokenizer, folder, **options)   write the model into an existing, empty folder (with a
                                      suffix: write the single file `folder` names); may return a report dict
    refuses(model) -> str | None      why this format cannot hold the model (None: it can)
    suits(model) -> bool              whether it is a good default for the model (hf: not for a sparse model,
                                      which it would write dense)
    default_rank: formats with a rank are candidates for `save_model` without a format: the candidate with
                  the lowest rank that suits the model and does not refuse it is used
    catch_all: recognised only when no other format recognises the path (plain transformers folders)
    suffix: the format is one file, not a folder (".gguf"): outputs must end with it, and slimlm.export writes
            a temporary file beside the target and renames it when complete
    """
    name: str
    help: str
    recognise: Callable[[Path, dict | None], bool] | None = None
    load: Callable[..., Any] | None = None
    save: Callable[..., Any] | None = None
    refuses: Callable[[Any], str | None] = lambda model: None
    suits: Callable[[Any], bool] = lambda model: True
    default_rank: int | None = None
    catch_all: bool = False
    suffix: str | None = None


_FORMATS: dict[str, Format] = {}
_formats_loaded = False


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, Format]:
    """Every registered format, in recognition order."""
    global _formats_loaded
    if not _formats_loaded:
        _formats_loaded = True
        for mod in _FORMAT_MODULES:
            importlib.import_module(mod)
    return dict(_FORMATS)


def get_format(name: str) -> Format:
    table = formats()
    if name not in table:
        raise SlimlmError(f"unknown format {name!r}; choose one of: {', '.join(savable_formats())}")
    return table[name]


def savable_formats() -> list[str]:
    return [n for n, f in formats().items() if f.save is not None]


def recognise(path: Path, config: dict | None) -> Format | None:
    """The format of a folder (with its parsed config.json) or file, or None if no format knows it: the one
    format that recognises it, a catch-all format only when no other does."""
    for fmt in sorted(formats().values(), key=lambda f: f.catch_all):
        if fmt.load is not None and fmt.recognise is not None and fmt.recognise(path, config):
            return fmt
    return None


def default_format(model: Any) -> Format:
    """The format `save_model` writes when none is named: the best-ranked candidate that can hold the model."""
    reasons = []
    for fmt in sorted((f for f in formats().values() if f.default_rank is not None), key=lambda f: f.default_rank):
        why = fmt.refuses(model)
        if why is None and fmt.suits(model):
            return fmt
        reasons.append(f"{fmt.name}: {why or 'not suited'}")
    raise SlimlmError("no format can hold this model (" + "; ".join(reasons) + ")")


# ---------------------------------------------------------------------------------------- built-in families
register_family(Family("quantize", ("slimlm.quant.methods", "slimlm.quant.awq"), "quantize", "quantized",
                       COMPRESSION_OPTIONS | {"budget_bits", "budget_mb"}, "Quantize a model"))
register_family(Family("prune", ("slimlm.pruning.methods", "slimlm.pruning.structured"), "prune", "pruned",
                       COMPRESSION_OPTIONS | {"budget_sparsity"}, "Prune a model"))


def _train_options() -> frozenset[str]:
    """`slimlm train`'s own options: every TrainConfig field and the command's model, data and output ones."""
    import dataclasses

    from .training.config import TrainConfig

    return frozenset({f.name for f in dataclasses.fields(TrainConfig)} | {
        "model", "method", "data", "field", "output", "overwrite", "resume", "eval_data", "device", "dtype",
        "threads", "trust_remote_code", "prompt_field", "response_field", "messages_field", "truncate"})


register_family(Family("train", ("slimlm.adapt.methods", "slimlm.pruning.movement", "slimlm.pruning.gum"), "train", "trained",
                       _train_options(), "Train a model (fine-tuning, adapters)", command="train"))
register_family(Family("distill", ("slimlm.distill.method",), "distill", "distilled",
                       (_train_options() - {"model", "method"}) | {"teacher", "student", "student_init",
                                                                    "teacher_cache", "cache_k", "cache_kind", "assistant"},
                       "Distill a teacher into a student", command="distill"))
