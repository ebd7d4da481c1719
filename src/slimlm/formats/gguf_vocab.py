"""The tokenizer of a GGUF file: the `tokenizer.*` keys llama.cpp reads.

    tokenizer.ggml.model        "gpt2" (byte-level BPE)
    tokenizer.ggml.pre          llama.cpp's name of the pre-tokenizer (its split regexes), e.g. "gpt-2",
                                "llama-bpe", "qwen2", "smollm"
    tokenizer.ggml.tokens       one string per model row (byte-level text, as in tokenizer.json), padded
                                with "[PADn]" up to the embedding's rows
    tokenizer.ggml.token_type   1 normal, 3 control (special added tokens), 4 user-defined (other added
                                tokens), 5 unused (padding)
    tokenizer.ggml.merges       "left right" per BPE merge, in rank order
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, tokenizer.chat_template

Two sources, in this order:
1. the GGUF the model came from (a model loaded from a .gguf file, or the embedded default, converted from
   the GGUF inside its package) when its token list is the tokenizer's: its tokenizer keys are copied as
   they are, so llama.cpp tokenizes exactly as it did with the original file;
2. the fast (tokenizers) tokenizer, for byte-level BPE tokenizers, with the pre-tokenizer recognised from
   tokenizer.json's pre_tokenizer (or named by the user: tokenizer_pre).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SlimlmError

log = logging.getLogger(__name__)

# tokenizer.json split regexes (as the Hugging Face tokenizers write them) -> llama.cpp pre-tokenizer names
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEX_PRE = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}

Key = tuple[str, Any, Any, Any]          # (key, value, GGUFValueType, array element type or None)


def tokenizer_keys(tokenizer, vocab_size: int, pre: str | None = None, model_ref: str | None = None) -> list[Key]:
    """The tokenizer keys for a model with `vocab_size` embedding rows (see the module docstring)."""
    if tokenizer is None:
        raise ConfigError("a GGUF file needs the model's tokenizer; give a model folder that has one")
    tokens = hf_tokens(tokenizer)
    for src in _source_ggufs(model_ref):
        keys = _keys_from_gguf(src, tokens, vocab_size)
        if keys is not None:
            log.info("tokenizer keys copied from %s", src)
            return keys
    return _keys_from_fast(tokenizer, vocab_size, pre)


def write_keys(w, keys: list[Key]) -> None:
    for key, value, vtype, sub in keys:
        w.add_key_value(key, value, vtype, sub_type=sub)


def hf_tokens(tokenizer) -> list[str]:
    """The tokenizer's token strings by id (added tokens included)."""
    vocab = tokenizer.get_vocab()
    out = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        out[i] = t
    return out


# ------------------------------------------------------------------------------------- from a GGUF
def _source_ggufs(model_ref: str | None) -> list[Path]:
    from .. import models

    out = []
    if model_ref and str(model_ref).endswith(".gguf") and Path(model_ref).is_file():
        out.append(Path(model_ref))
    for e in models.EMBEDDED.values():
        if e.file and e.file.endswith(".gguf"):
            try:
                p = models._package_dir(e) / e.file
            except SlimlmError:     # the package is not installed: not a candidate
                continue
            if p.is_file():
                out.append(p)
    return out


def _keys_from_gguf(path: Path, tokens: list[str], vocab_size: int) -> list[Key] | None:
    """The tokenizer keys of a GGUF file whose token list is `tokens` (padding aside) and has vocab_size
    entries; None otherwise."""
    kv = read_kv(path, "tokenizer.")
    theirs = kv.get("tokenizer.ggml.tokens", (None, []))[1]
    if len(theirs) != vocab_size or len(tokens) > vocab_size or theirs[: len(tokens)] != tokens:
        return None
    return [(name, value, vtype, sub) for name, (vtype, value, sub) in kv.items()]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_kv(path: Path, prefix: str = "") -> dict[str, tuple[Any, Any, Any]]:
    """Key -> (GGUFValueType, value, array element type or None) of a GGUF file's metadata whose key starts
    with `prefix`. Reads the header only (magic "GGUF", u32 version, u64 tensor count, u64 key count, then per
    key: u64-length string, u32 type, value; strings are u64-length UTF-8, arrays u32 element type, u64 count,
    elements): ~0.2 s for a 49k-token vocabulary where gguf.GGUFReader, which maps every tensor and string,
    takes seconds."""
    import struct

    import gguf

    V = gguf.GGUFValueType
    data = path.read_bytes() if path.stat().st_size < (1 << 24) else _head(path)
    if data[:4] != b"GGUF":
        raise ConfigError(f"{path} is not a GGUF file")
    pos = 24
    n_kv = struct.unpack_from("<Q", data, 16)[0]

    def string() -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8", errors="replace")

    def value(t: int):
        nonlocal pos
        if t == 8:
            return string()
        fmt = _SCALARS[t]
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, data, pos - struct.calcsize(fmt))[0]

    out = {}
    for _ in range(n_kv):
        key = string()
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if t == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            val, vt, st = [value(sub) for _ in range(n)], V.ARRAY, V(sub)
        else:
            val, vt, st = value(t), V(t), None
        if key.startswith(prefix):
            out[key] = (vt, val, st)
    return out


def _head(path: Path, limit: int = 1 << 26) -> bytes:
    """The first `limit` bytes (the metadata of a large file comes before its tensors)."""
    with open(path, "rb") as fh:
        return fh.read(limit)


# ------------------------------------------------------------------------------ from a fast tokenizer
def _keys_from_fast(tokenizer, vocab_size: int, pre: str | None) -> list[Key]:
    import gguf

    V = gguf.GGUFValueType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; the GGUF writer "
                          "builds the vocabulary from one")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(tj):
        raise ConfigError(f"the tokenizer is a {model.get('type')} model without byte-level pre-tokenization; the "
                          "GGUF writer covers byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style)")
    pre = pre or recognise_pre(tj, tokenizer)
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    rev = {int(i): t for t, i in model["vocab"].items()}
    top = max([*rev, *added]) + 1
    if top > vocab_size:
        raise ConfigError(f"the tokenizer has {top} tokens but the model only {vocab_size} embedding rows")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(int(T.CONTROL if added[i].get("special") else T.USER_DEFINED))
        elif i in rev:
            tokens.append(rev[i])
            types.append(int(T.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ConfigError("the tokenizer has no BPE merges, which llama.cpp requires")
    keys: list[Key] = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
                       ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
                       ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
                       ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    for attr, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unk_token_id", "unknown_token_id"), ("pad_token_id", "padding_token_id")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            keys.append((f"tokenizer.ggml.{key}", int(tid), V.UINT32, None))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    keys.append(("tokenizer.ggml.add_bos_token", bool(bos is not None and probe[:1] == [bos]), V.BOOL, None))
    keys.append(("tokenizer.ggml.add_eos_token", bool(eos is not None and len(probe) > 1 and probe[-1] == eos),
                 V.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        keys.append(("tokenizer.chat_template", template, V.STRING, None))
    return keys


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for n in node.get("pretokenizers", node.get("normalizers", [])) for s in _steps(n)]
    return [node]


def _byte_level(tj: dict) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _steps(tj.get("pre_tokenizer"))) or \
        (tj.get("decoder") or {}).get("type") == "ByteLevel"


def recognise_pre(tj: dict, tokenizer=None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json's pre_tokenizer:
    ByteLevel with its own (GPT-2) regex -> "gpt-2"; Digits(individual) then that -> "smollm" (clean-up of
    spaces off) or "starcoder" (on); a Split on the Llama 3 or Qwen2 regex then ByteLevel -> "llama-bpe",
    "qwen2". Anything else: ConfigError naming the tokenizer_pre option."""
    steps = _steps(tj.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    byte = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte is not None and byte.get("use_regex", True):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            clean = getattr(tokenizer, "clean_up_tokenization_spaces", False)
            return "starcoder" if clean else "smollm"
    if byte is not None and kinds[:-1] == ["Split"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEX_PRE:
            return SPLIT_REGEX_PRE[regex]
    raise ConfigError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one the GGUF "
                      "writer recognises; name llama.cpp's pre-tokenizer with --option tokenizer_pre=NAME "
                      "(e.g. gpt-2, llama-bpe, qwen2, smollm)")
