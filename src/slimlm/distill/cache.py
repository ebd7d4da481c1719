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


@torch.no_grad()
def _top_k(teacher: nn.Module, batch: dict, k: int, temperature: float, chunk: int = 1024) -> tuple[Tensor, Tensor]:
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
            v, i = lp.topk(k, dim=-1)
            vals.append(v)
            idx.append(i)
        v, i = torch.cat(vals), torch.cat(idx)
    else:
        z = teacher(input_ids=ids, attention_mask=batch.get("attention_mask"), use_cache=False).logits.float()
        v, i = torch.log_softmax(z / temperature, dim=-1).topk(k, dim=-1)
    shape = (*ids.shape, k)
    return v.reshape(shape), i.reshape(shape)


def build_cache(teacher: nn.Module, data, folder: str | os.PathLike, *, k: int = 64, temperature: float = 1.0,
                batches: int | None = None, progress: bool = True) -> dict:
    """Run the teacher once over `batches` batches of `data` (default: all) and write the cache folder."""
    if k < 1:
        raise ConfigError(f"--cache-k must be at least 1 (got {k})")
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
            v, idx = _top_k(teacher, b, k, temperature)
            part[f"logprobs.{i}"] = v.half().contiguous()
            part[f"indices.{i}"] = (idx.to(torch.int32).to(torch.int16) if small else idx.to(torch.int32)).contiguous()
            tokens += b["input_ids"].numel()
            if len(part) == 2 * PER_FILE or i == n - 1:
                save_file(part, str(tmp / f"part-{i // PER_FILE:05d}.safetensors"))
                part = {}
        meta = {"k": k, "temperature": temperature, "vocab": vocab, "batches": n, "tokens": tokens,
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
                 temperature: float | None = None) -> None:
        self.data, self.folder = data, Path(folder)
        self.meta = read_meta(folder)
        m = self.meta
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
