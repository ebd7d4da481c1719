"""Training data for the training loop: batches by index, so that a resumed run restarts at a step.

A batch is a dict of (B, L) long tensors: "input_ids"; "labels", where labels[b, t] is the token that
position t must predict (input_ids[b, t + 1], already shifted) or -100 where there is no loss; and
"attention_mask" (1 = real token, 0 = padding) only when some row is padded. Because the labels are already
shifted, the loss is cross_entropy(logits[b, t], labels[b, t], ignore_index=-100) with no further shift:
do NOT pass them as `labels=` to a Hugging Face model, which shifts once more.

Two sources:
- `text_windows`: the benchmark protocol (../shared/BENCHMARKS.md, "Training, adaptation and
  distillation"): windows of `seqlen` tokens at random offsets drawn after torch.manual_seed(seed)
  (data.calibration_windows with n = batch_size * batches); batch i is windows[i*B : (i+1)*B]. Each window
  has seqlen - 1 targets (its last position predicts nothing), as HF's shifted LM loss counts them.
- `instruction_data`: a .jsonl file of {prompt, response} or {messages: [...]} examples, one example per
  row, right-padded, loss on the response (or assistant) tokens only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..data import calibration_windows, load_text, tokenize
from ..errors import SlimlmError

Batch = dict[str, Tensor]
IGNORE = -100  # the label of a position without loss (torch's cross_entropy ignore_index)


class TrainData(Protocol):
    """What the training loop reads: a fixed, deterministic sequence of micro-batches."""

    tokens_per_batch: int  # input tokens of one batch (text: B * seqlen; instructions: mean non-padding)

    def __len__(self) -> int:
        """The number of batches available."""
        ...

    def batch(self, i: int) -> Batch:
        """Batch i (0 <= i < len); the same i always gives the same tensors."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the results record about the data (kind, sizes, seed)."""
        ...


def _check_sizes(seqlen: int, batch_size: int, batches: int) -> None:
    if seqlen < 2:
        raise SlimlmError(f"--seqlen must be at least 2 (got {seqlen}): a window needs a token and the next")
    if batch_size < 1:
        raise SlimlmError(f"--batch-size must be at least 1 (got {batch_size})")
    if batches < 1:
        raise SlimlmError(f"the number of batches must be at least 1 (got {batches}); ask for a step or more")


def _check_index(i: int, n: int) -> None:
    if not 0 <= i < n:
        raise IndexError(f"batch {i} out of range: there are {n} batches")


def next_token_labels(ids: Tensor, trained: Tensor | None = None) -> Tensor:
    """(..., L) labels for (..., L) ids: labels[..., t] = ids[..., t + 1] where token t + 1 is trained
    (all tokens when `trained` is None), IGNORE elsewhere and at the last position."""
    labels = torch.full_like(ids, IGNORE)
    labels[..., :-1] = ids[..., 1:]
    if trained is not None:
        labels[..., :-1][~trained[..., 1:]] = IGNORE
    return labels


class TextWindows:
    """Batches of random windows of a token stream (see `text_windows`)."""

    def __init__(self, windows: Tensor, batch_size: int, seed: int, text_tokens: int) -> None:
        self.windows, self.batch_size, self.seed, self.text_tokens = windows, batch_size, seed, text_tokens
        self.tokens_per_batch = batch_size * windows.shape[1]

    def __len__(self) -> int:
        return self.windows.shape[0] // self.batch_size

    def batch(self, i: int) -> Batch:
        _check_index(i, len(self))
        w = self.windows[i * self.batch_size:(i + 1) * self.batch_size].clone()    # (B, L)
        return {"input_ids": w, "labels": next_token_labels(w)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "windows": self.windows.shape[0], "seqlen": self.windows.shape[1],
                "batch_size": self.batch_size, "batches": len(self), "seed": self.seed,
                "text_tokens": self.text_tokens}


def text_windows(ids: Tensor, *, seqlen: int, batch_size: int, batches: int, seed: int = 0) -> TextWindows:
    """`batches` batches of `batch_size` windows of `seqlen` tokens of the 1-D stream `ids`, at offsets
    drawn by data.calibration_windows(ids, batch_size * batches, seqlen, seed). torch's CPU generator draws
    the offsets in sequence, so the first k batches are the same whatever `batches` is."""
    _check_sizes(seqlen, batch_size, batches)
    if ids.numel() < seqlen + 1:
        raise SlimlmError(f"the training text has {ids.numel()} tokens, too few for a window of {seqlen} "
                          "at a random offset; give a longer text or a smaller --seqlen")
    windows = calibration_windows(ids, batch_size * batches, seqlen, seed)         # (B * batches, L)
    return TextWindows(windows, batch_size, seed, ids.numel())


def training_text(tokenizer, sources: list[str]) -> Tensor:
    """(n,) token ids: each source (a file or a data.load_text name) tokenized whole without special
    tokens, concatenated in the order given (the benchmark: Sense and Sensibility, Emma, Mansfield Park)."""
    if not sources:
        raise SlimlmError("no training text given; name at least one text file")
    return torch.cat([tokenize(tokenizer, load_text(s)) for s in sources])


Example = tuple[list[int], list[bool]]  # token ids and, per token, whether it is trained (a target)


class InstructionData:
    """Batches of instruction examples, one per row (see `instruction_data`)."""

    def __init__(self, examples: list[Example], order: Tensor, batch_size: int, pad_id: int,
                 pad_to: int | None, info: dict[str, Any]) -> None:
        self.examples, self.order, self.batch_size = examples, order, batch_size
        self.pad_id, self.pad_to, self.info = pad_id, pad_to, info
        lengths = torch.tensor([len(ex[0]) for ex in examples])
        self.tokens_per_batch = round(float(lengths[order].sum()) / len(self))

    def __len__(self) -> int:
        return self.order.numel() // self.batch_size

    def batch(self, i: int) -> Batch:
        _check_index(i, len(self))
        rows = [self.examples[k] for k in self.order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]
        width = self.pad_to or max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)        # (B, L), right-padded
        trained = torch.zeros(len(rows), width, dtype=torch.bool)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (row, tr) in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
            trained[b, :len(row)] = torch.tensor(tr)
            mask[b, :len(row)] = 1
        out = {"input_ids": ids, "labels": next_token_labels(ids, trained)}
        if not bool(mask.all()):
            out["attention_mask"] = mask
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "instruction", **self.info, "batches": len(self), "batch_size": self.batch_size,
                "epochs": round(self.order.numel() / len(self.examples), 3),
                "tokens_per_batch": self.tokens_per_batch}


def _read_jsonl(p: Path) -> list[tuple[int, dict]]:
    if not p.is_file():
        raise SlimlmError(f"instruction file {p} does not exist; give a .jsonl file, one example per line")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SlimlmError(f"{p} line {n} is not JSON; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise SlimlmError(f"{p} line {n} is not a JSON object; each line must be one {{...}} example")
        rows.append((n, row))
    if not rows:
        raise SlimlmError(f"{p} holds no examples; give a .jsonl file with one JSON object per line")
    return rows


def _prompt_response(tokenizer, prompt: str, response: str) -> Example:
    """Plain concatenation: tokenize(prompt) + tokenize(response) + [eos], each part tokenized alone
    without special tokens (no separator and no chat template: put any separator in the data); the
    response tokens and the eos (when the tokenizer has one) are trained."""
    p, r = tokenize(tokenizer, prompt).tolist(), tokenize(tokenizer, response).tolist()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return p + r + eos, [False] * len(p) + [True] * (len(r) + len(eos))


def _chat(tokenizer, messages: list[dict], where: str) -> Example:
    """The conversation rendered once by the chat template and tokenized once (with character offsets);
    a token is trained if its first character lies in an assistant span. Assistant turn i spans from the
    end of render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i + 1]): its
    content and whatever the template closes the turn with (e.g. <|im_end|>), not the header that opens
    it. Each of these prefix renders must be a prefix of the whole render (an error says so otherwise)."""
    def render(msgs: list[dict], gen: bool = False) -> str:
        if not msgs:
            return ""
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises its own types, and templates raise on bad conversations
            raise SlimlmError(f"{where}: the chat template failed ({str(e).splitlines()[0][:200]})") from None

    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = render(messages[:i], gen=True), render(messages[:i + 1])
            if not (end.startswith(start) and full.startswith(end)):
                raise SlimlmError(f"{where}: the chat template does not render the conversation prefix by "
                                  "prefix, so assistant turns cannot be found; use prompt/response examples")
            spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def _example(tokenizer, row: dict, fields: tuple[str, str, str], chat: bool, where: str) -> Example:
    prompt_field, response_field, messages_field = fields
    if chat:
        msgs = row.get(messages_field)
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise SlimlmError(f"{where}: {messages_field!r} must be a list of {{\"role\", \"content\"}} "
                              "objects with string values")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SlimlmError(f"{where} has no assistant turn; each conversation needs at least one "
                              "message with role 'assistant' to train on")
        return _chat(tokenizer, msgs, where)
    values = row.get(prompt_field), row.get(response_field)
    if not all(isinstance(v, str) for v in values):
        raise SlimlmError(f"{where} needs string fields {prompt_field!r} and {response_field!r} like line 1 "
                          f"(it has {', '.join(row) or 'none'})")
    return _prompt_response(tokenizer, *values)


def instruction_data(path: str | Path, tokenizer, *, seqlen: int, batch_size: int, batches: int | None = None,
                     seed: int = 0, prompt_field: str = "prompt", response_field: str = "response",
                     messages_field: str = "messages", truncate: bool = False, epochs: int | None = None,
                     pad_to_seqlen: bool = False) -> InstructionData:
    """Batches of the examples of a .jsonl file, one example per row, right-padded with the tokenizer's pad
    token (else its eos, else 0) to the longest row of the batch (to `seqlen` with pad_to_seqlen), with
    "attention_mask" when a row is padded. Labels: the next token where that token is trained, else -100.

    Format, chosen by line 1: {messages_field: [{role, content}, ...]} rendered with the tokenizer's chat
    template (loss on the assistant turns, see `_chat`), else {prompt_field, response_field}: tokens =
    tokenize(prompt) + tokenize(response) + [eos], each part alone, without special tokens, separator or
    chat template (loss on the response and the eos; see `_prompt_response`). An example longer than
    `seqlen` tokens is an error, or with truncate=True keeps its first `seqlen` tokens (the end of the
    response is dropped, its eos with it); an example with no trained token left in the window is an error
    either way.

    Order: the examples shuffled by torch.randperm with a generator seeded with `seed`, one fresh
    permutation per epoch, concatenated; batch i takes rows [i*B, (i+1)*B) of that stream (a batch may span
    two epochs). Give `batches`, or `epochs` (ceil(epochs * examples / batch_size) batches; default 1).
    """
    if batches is not None and epochs is not None:
        raise SlimlmError("give either the number of batches (steps) or of epochs, not both")
    if epochs is not None and epochs < 1:
        raise SlimlmError(f"--epochs must be at least 1 (got {epochs})")
    _check_sizes(seqlen, batch_size, batches if batches is not None else 1)
    p = Path(path).expanduser()
    rows = _read_jsonl(p)
    first = rows[0][1]
    chat = messages_field in first
    if not chat and not (prompt_field in first and response_field in first):
        raise SlimlmError(f"{p} line {rows[0][0]} has fields {', '.join(first) or 'none'} but not "
                          f"{prompt_field!r} and {response_field!r} nor {messages_field!r}; name them with "
                          "--prompt-field and --response-field, or --messages-field")
    if chat and (getattr(tokenizer, "chat_template", None) is None or not tokenizer.is_fast):
        raise SlimlmError(f"{p} holds conversations, which need a fast tokenizer with a chat template; "
                          "set tokenizer.chat_template or use prompt/response examples")
    examples, truncated = [], 0
    for n, row in rows:
        where = f"{p} line {n}"
        ids, trained = _example(tokenizer, row, (prompt_field, response_field, messages_field), chat, where)
        if len(ids) > seqlen:
            if not truncate:
                raise SlimlmError(f"{where} is {len(ids)} tokens, longer than the window of {seqlen}; raise "
                                  "--seqlen, shorten the example, or pass --truncate to cut the response's "
                                  "end")
            ids, trained, truncated = ids[:seqlen], trained[:seqlen], truncated + 1
        if not any(trained[1:]):
            raise SlimlmError(f"{where} leaves no response token to train on within the window of {seqlen} "
                              "tokens; shorten the prompt or raise --seqlen")
        examples.append((ids, trained))
    total = batches if batches is not None else math.ceil((epochs or 1) * len(examples) / batch_size)
    g = torch.Generator().manual_seed(seed)
    epochs_needed = math.ceil(total * batch_size / len(examples))
    order = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(epochs_needed)])
    order = order[:total * batch_size]                                              # (batches * B,)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    info = {"path": str(p), "format": "messages" if chat else "prompt-response", "examples": len(examples),
            "truncated": truncated, "seqlen": seqlen, "seed": seed}
    return InstructionData(examples, order, batch_size, pad_id, seqlen if pad_to_seqlen else None, info)


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """The rows [rank * B/world, (rank + 1) * B/world) of a global batch of B rows: data-parallel rank
    `rank`'s part. The global batch size must be divisible by `world`."""
    rows = next(iter(batch.values())).shape[0]
    if rows % world:
        raise SlimlmError(f"the global batch of {rows} rows does not divide among {world} ranks; "
                          f"choose --batch-size a multiple of {world}")
    if not 0 <= rank < world:
        raise SlimlmError(f"rank {rank} is outside 0..{world - 1}")
    k = rows // world
    return {name: t[rank * k:(rank + 1) * k] for name, t in batch.items()}


def micro_batches(batch: Batch, n: int) -> list[Batch]:
    """The batch's rows split into n equal consecutive micro-batches (gradient accumulation); normalise the
    loss by target_tokens of the whole batch so that the sum over micro-batches equals the batch's mean."""
    rows = next(iter(batch.values())).shape[0]
    if n < 1 or rows % n:
        raise SlimlmError(f"a batch of {rows} rows does not split into {n} equal micro-batches; choose "
                          f"--grad-accum dividing {rows}")
    k = rows // n
    return [{name: t[j * k:(j + 1) * k] for name, t in batch.items()} for j in range(n)]


def target_tokens(batch: Batch) -> int:
    """The number of positions with a loss (labels != -100)."""
    return int((batch["labels"] != IGNORE).sum())
