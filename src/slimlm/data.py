"""Text sources by name, tokenization, calibration windows and evaluation windows (../shared/BENCHMARKS.md).

Sources: `python-docs` (the Python documentation inside every CPython, always there), a local `.txt`,
`.jsonl` (a field) or `.parquet` (a column) file, and, when online, the Hugging Face datasets `wikitext2`
(raw test split joined with "\\n\\n", as the GPTQ papers use it) and `c4` (validation shard 0).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from .errors import SlimlmError

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "python-docs"
NAMED_SOURCES = ("python-docs", "wikitext2", "c4")


def load_text(source: str = DEFAULT_SOURCE, *, field: str = "text") -> str:
    """The whole text of a source as one string."""
    if source == "python-docs":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
    if source in ("wikitext2", "c4"):
        return _hub_text(source)
    p = Path(source).expanduser()
    if not p.exists():
        raise SlimlmError(f"data {source!r} does not exist: give a .txt, .jsonl or .parquet file "
                          f"or one of: {', '.join(NAMED_SOURCES)}")
    if p.is_dir():
        raise SlimlmError(f"data {p} is a folder; give a .txt, .jsonl or .parquet file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        text = _parquet_text(p, field)
    else:
        raw = p.read_bytes()
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SlimlmError(f"{p} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
        text = _jsonl_text(p, decoded, field) if suffix == ".jsonl" else decoded
    if not text.strip():
        raise SlimlmError(f"{p} holds no text; give a non-empty file")
    return text


def _jsonl_text(p: Path, decoded: str, field: str) -> str:
    parts = []
    for i, line in enumerate(decoded.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SlimlmError(f"{p} line {i} is not JSON; each line of a .jsonl file must be one object") from None
        if not isinstance(row, dict) or field not in row:
            raise SlimlmError(f"{p} line {i} has no field {field!r}; choose the text field with --field")
        parts.append(str(row[field]))
    return "\n\n".join(parts)


def _parquet_text(p: Path, field: str) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SlimlmError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        columns = pq.read_schema(str(p)).names
        if field not in columns:
            raise SlimlmError(f"{p} has no column {field!r} (it has {', '.join(columns)}); "
                              "choose the text column with --field")
        table = pq.read_table(str(p), columns=[field])
    except SlimlmError:
        raise
    except Exception as e:  # pyarrow's own error types
        raise SlimlmError(f"{p} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    return "\n\n".join(str(x) for x in table.column(field).to_pylist() if x is not None)


def _hub_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise SlimlmError(f"the {name} source needs the datasets package: pip install 'slimlm[data]'") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return "\n\n".join(ds["text"])
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                   split="validation")
        return "\n\n".join(ds["text"][:3000])
    except Exception as e:  # network and hub errors come in many types
        raise SlimlmError(f"could not fetch {name} from the Hugging Face hub ({str(e).splitlines()[0][:200]}); "
                          "offline, use a local .txt/.jsonl/.parquet file or python-docs") from None


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids (n,) of the whole text at once, without special tokens."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model" is expected here
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(level)
    return torch.tensor(ids, dtype=torch.long)


def _check_window(ids: Tensor, seqlen: int, what: str) -> None:
    if seqlen < 2:
        raise SlimlmError(f"--seqlen must be at least 2 (got {seqlen})")
    if ids.numel() < seqlen + (1 if what == "calibration" else 0):
        raise SlimlmError(f"the {what} text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                          "give a longer text or a smaller --seqlen")


def calibration_windows(ids: Tensor, n: int, seqlen: int, seed: int = 0) -> Tensor:
    """(n, seqlen) windows at random offsets, drawn as after `torch.manual_seed(seed)`:
    starts = randint(0, len(ids) - seqlen, (n,)), window i = ids[starts[i] : starts[i] + seqlen]."""
    if n < 1:
        raise SlimlmError(f"--samples must be at least 1 (got {n})")
    _check_window(ids, seqlen, "calibration")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(ids: Tensor, seqlen: int, n: int | None = None) -> Tensor:
    """(k, seqlen) non-overlapping windows from the start, remainder dropped; the first n if n is given."""
    if n is not None and n < 1:
        raise SlimlmError(f"--windows must be at least 1 or 'all' (got {n})")
    _check_window(ids, seqlen, "evaluation")
    k = ids.numel() // seqlen
    if n is not None:
        k = min(k, n)
    return ids[: k * seqlen].view(k, seqlen)


def encoder_windows(ids: Tensor, seqlen: int, n: int | None, tokenizer) -> tuple[Tensor, Tensor]:
    """(k, seqlen) windows for an encoder and the (seqlen,) bool mask of their text positions.

    Each window is [CLS] + (seqlen - 2) consecutive text tokens + [SEP], the way a BERT-style tokenizer wraps
    one sequence (its cls and sep tokens; RoBERTa's are <s> and </s>), text windows non-overlapping from the
    start as in `eval_windows`. A tokenizer without cls and sep tokens gets plain windows. seqlen counts the
    special tokens (it is the length the model sees), so --seqlen 512 fits BERT's 512 positions.
    """
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    pre, post = ([cls_id], [sep_id]) if cls_id is not None and sep_id is not None else ([], [])
    inner = seqlen - len(pre) - len(post)
    if inner < 1:
        raise SlimlmError(f"--seqlen must be at least {len(pre) + len(post) + 1} for an encoder "
                          f"(its window holds {len(pre) + len(post)} special tokens; got {seqlen})")
    text = eval_windows(ids, inner, n)                                      # (k, inner)
    k = text.shape[0]
    win = torch.cat([text.new_tensor(pre).expand(k, -1), text, text.new_tensor(post).expand(k, -1)], 1)
    scorable = torch.zeros(seqlen, dtype=torch.bool)
    scorable[len(pre):len(pre) + inner] = True
    return win, scorable


def context_length(model) -> int | None:
    """The model's context in tokens, where its config says it."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(model, seqlen: int) -> None:
    """A window longer than the model's context is an input error, not a silent extrapolation."""
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise SlimlmError(f"--seqlen {seqlen} is longer than the model's context of {limit} tokens; "
                          f"use --seqlen {min(limit, 2048)} or less")
