"""Teacher logits cached once to disk as each position's top-k log-probabilities and token ids, and training
batches that carry them, so distillation runs without the teacher's forward pass (and without the teacher in
memory) in every later epoch and run.

Layout of a cache folder (written to a temporary folder, renamed into place when complete):
    cache.json                 k, temperature, vocabulary, batches, bytes per token, the teacher's and the
                               data's fingerprints
    part-00000.safetensors     per batch i: "logprobs.i" (B, L, k) float16 and "indices.i" (B, L, k) int16 (the
                               token ids as unsigned 16-bit values, for vocabularies up to 65,536) or int32
Bytes per token: k * (2 + 2) (k * 6 beyond 65,536 tokens): k = 64 is 256 bytes. The loss from the cache
(core.distill.topk_kl) puts the teacher's mass outside its top k into one more bucket.

Two kinds of cache, the same layout:
    topk     the teacher's k most likely tokens with their log-probabilities: the mass outside them (13% on
             average at k = 64 for the default model on the training text) reaches the student only as the
             bucket's total, so the student's tail is never shaped by the teacher;
    sampled  k tokens drawn from the teacher's distribution with replacement (seeded per batch), stored as the
             distinct tokens drawn with log(count / k) and, in the remaining slots, undrawn tokens at log-
             probability ~0: an unbiased estimate of the teacher's distribution (the sparse random-sampling
             distillation of Anshumann et al. 2025), so the forward-KL gradient from the cache is unbiased:
             E[p_s - p_hat] = p_s - p_t, for every token, the tail included.

Fingerprints: the teacher's is a hash of its configuration and of a strided sample of every weight; the
data's a hash of the token ids of each batch (a run of fewer steps reuses the first batches of a cache). Training from a cache with other data, or checking it against
another teacher, is refused in one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ConfigError

PER_FILE = 64                     # batches per part file


def teacher_fingerprint(model: nn.Module) -> str:
    """A hash of the model's configuration and of every 997th value of each parameter and buffer."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        flat = t.detach().reshape(-1)[::997]
        h.update(name.encode())
        h.update(flat.float().cpu().numpy().tobytes() if flat.is_floating_point() else flat.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def batch_hashes(data, batches: int) -> list[str]:
    """A short hash of each batch's token ids and labels (the data's fingerprint, batch by batch)."""
    out = []
    for i in range(batches):
        b = data.batch(i)
        h = hashlib.sha256(b["input_ids"].to(torch.int64).numpy().tobytes())
        h.update(b["labels"].to(torch.int64).numpy().tobytes())
        out.append(h.hexdigest()[:16])
    return out


KINDS = ("topk", "sampled")
FLOOR = -69.0                     # log(1e-30): an undrawn token's log-probability in a sampled cache


def _select(lp: Tensor, k: int, kind: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(values, ids) (C, k) from log-probabilities lp (C, V): the top k, or k draws with replacement
    summarised as distinct ids with log(count / k) (undrawn slots: other ids at FLOOR)."""
    if kind == "topk":
        return lp.topk(k, dim=-1)
    draws = torch.multinomial(lp.exp(), k, replacement=True, generator=generator)          # (C, k)
    counts = torch.zeros_like(lp).scatter_add_(1, draws, torch.ones_like(draws, dtype=lp.dtype))
    c, ids = counts.topk(k, dim=-1)                       # the drawn ids first, then distinct undrawn ones
    vals = torch.where(c > 0, torch.log(c.clamp(min=1) / k), torch.full_like(c, FLOOR))
    return vals, ids


@torch.no_grad()
def _top_k(teacher: nn.Module, batch: dict, k: int, temperature: float, chunk: int = 1024, kind: str = "topk",
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    from ..distill.method import _base, _head

    ids = batch["input_ids"]
    head = _head(teacher)
    if head is not None:
        h = _base(teacher)(input_ids=ids, attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
        h = h.reshape(-1, h.shape[-1]).float()
        vals, idx = [], []
        for s in range(0, h.shape[0], chunk):
            z = h[s:s + chunk] @ head.weight.float().t()
            if head.bias is not None:
                z = z + head.bias.float()
            lp = torch.log_softmax(z / temperature, dim=-1)
            v, i = _select(lp, k, kind, generator)
            vals.append(v)
            idx.append(i)
        v, i = torch.cat(vals), torch.cat(idx)
    else:
        z = teacher(input_ids=ids, attention_mask=batch.get("attention_mask"), use_cache=False).logits.float()
        lp = torch.log_softmax(z / temperature, dim=-1)
        v, i = _select(lp.reshape(-1, lp.shape[-1]), k, kind, generator)
    shape = (*ids.shape, k)
    return v.reshape(shape), i.reshape(shape)


def build_cache(teacher: nn.Module, data, folder: str | os.PathLike, *, k: int = 64, temperature: float = 1.0,
                batches: int | None = None, progress: bool = True, kind: str = "topk", seed: int = 0) -> dict:
    """Run the teacher once over `batches` batches of `data` (default: all) and write the cache folder
    (`kind`: topk or sampled, see the module docstring; `seed` seeds a sampled cache's draws)."""
    if k < 1:
        raise ConfigError(f"--cache-k must be at least 1 (got {k})")
    if kind not in KINDS:
        raise ConfigError(f"--cache-kind takes {' or '.join(KINDS)}, not {kind!r}")
    folder = Path(folder)
    n = len(data) if batches is None else batches
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = min(k, vocab)
    small = vocab <= 65536
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    teacher.eval()
    tokens = 0
    try:
        part: dict[str, Tensor] = {}
        it = range(n)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="teacher top-k", unit="batch")
        for i in it:
            b = data.batch(i)
            g = torch.Generator().manual_seed(seed * 1_000_003 + i) if kind == "sampled" else None
            v, idx = _top_k(teacher, b, k, temperature, kind=kind, generator=g)
            part[f"logprobs.{i}"] = v.half().contiguous()
            part[f"indices.{i}"] = (idx.to(torch.int32).to(torch.int16) if small else idx.to(torch.int32)).contiguous()
            tokens += b["input_ids"].numel()
            if len(part) == 2 * PER_FILE or i == n - 1:
                save_file(part, str(tmp / f"part-{i // PER_FILE:05d}.safetensors"))
                part = {}
        meta = {"kind": kind, "k": k, "temperature": temperature, "vocab": vocab, "batches": n, "tokens": tokens,
                "index_bytes": 2 if small else 4, "bytes_per_token": k * (2 + (2 if small else 4)),
                "teacher": teacher_fingerprint(teacher), "teacher_ref": getattr(teacher, "slimlm_ref", None),
                "data": batch_hashes(data, n)}
        meta["bytes_on_disk"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / "cache.json").write_text(json.dumps(meta, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "cache.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a teacher-logit cache (no cache.json): build one with --cache-teacher")
    return json.loads(path.read_text())


class CachedTeacherData:
    """Training data whose batches carry the teacher's cached top-k ("teacher_logprobs", "teacher_indices")."""

    def __init__(self, data, folder: str | os.PathLike, *, teacher: nn.Module | None = None,
                 temperature: float | None = None, kind: str | None = None) -> None:
        self.data, self.folder = data, Path(folder)
        self.meta = read_meta(folder)
        m = self.meta
        if kind is not None and kind != m.get("kind", "topk"):
            raise ConfigError(f"the cache in {folder} holds the teacher's {m.get('kind', 'topk')} tokens, not "
                              f"{kind}: use --cache-kind {m.get('kind', 'topk')} or build a new cache elsewhere")
        if len(data) > m["batches"]:
            raise ConfigError(f"the cache in {folder} holds {m['batches']} batches; this run needs {len(data)}: use "
                              "the same --steps/--tokens, --batch-size and --seqlen, or build a new cache")
        if batch_hashes(data, len(data)) != m["data"][:len(data)]:
            raise ConfigError(f"the cache in {folder} was made from other text (or other windows of it); build a "
                              "new cache for this data")
        if teacher is not None and teacher_fingerprint(teacher) != m["teacher"]:
            raise ConfigError(f"the cache in {folder} was made from another teacher ({m.get('teacher_ref')}); build "
                              "a new cache for this one")
        if temperature is not None and abs(temperature - m["temperature"]) > 1e-9:
            raise ConfigError(f"the cache in {folder} holds the teacher at temperature {m['temperature']}, not "
                              f"{temperature}: use --temperature {m['temperature']} or build a new cache")
        self._part: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        return {**(self.data.describe() if hasattr(self.data, "describe") else {}), "teacher_cache": str(self.folder)}

    def batch(self, i: int) -> dict:
        b = dict(self.data.batch(i))
        p = i // PER_FILE
        if self._part is None or self._part[0] != p:
            self._part = (p, load_file(str(self.folder / f"part-{p:05d}.safetensors")))
        t = self._part[1]
        idx = t[f"indices.{i}"]
        if idx.dtype == torch.int16:
            idx = idx.to(torch.int32) & 0xFFFF            # the unsigned 16-bit ids back
        b["teacher_logprobs"] = t[f"logprobs.{i}"].float()
        b["teacher_indices"] = idx.long()
        return b
