"""Black-box distillation data: a teacher's responses to prompts, from any model slimlm loads or from an
OpenAI-compatible endpoint (what vLLM, llama.cpp's server and hosted APIs expose), with two ways to grow the
prompt set first:

- evolve (after Evol-Instruct, Xu et al. 2023): the teacher rewrites each prompt into a harder or a broader one,
  following one of several rewriting instructions chosen at random (seeded);
- self-instruct (after Self-Instruct, Wang et al. 2023): the teacher is shown a few prompts of the set and
  asked for a new one; a new prompt too similar to an existing one (word-set Jaccard similarity above 0.7) is
  dropped.

Responses: several per prompt (sampling), deduplicated. The result is a .jsonl of {prompt, response, origin}
rows that `slimlm train --data FILE.jsonl` trains on with the loss on the responses only.
"""
from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, SlimlmError

# The rewriting instructions of the evolve step (our wording; the kinds follow Evol-Instruct's in-depth
# constraints / deepening / concretising / more reasoning steps, and in-breadth new-task mutation).
EVOLVE = (
    "Rewrite the following request so that it adds one more constraint or requirement. Reply with the new "
    "request only.\n\nRequest: {prompt}",
    "Rewrite the following request so that it asks about the topic in more depth. Reply with the new request "
    "only.\n\nRequest: {prompt}",
    "Rewrite the following request so that it is about a more specific, concrete case. Reply with the new "
    "request only.\n\nRequest: {prompt}",
    "Rewrite the following request so that answering it needs several steps of reasoning. Reply with the new "
    "request only.\n\nRequest: {prompt}",
    "Write a new request on a related but different topic, of similar length and difficulty to the following "
    "one. Reply with the new request only.\n\nRequest: {prompt}",
)
SELF_INSTRUCT = ("Here are some requests:\n{examples}\nWrite one new request that is different from all of them. "
                 "Reply with the new request only.")


@dataclass
class Sampling:
    n: int = 2                      # responses per prompt
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError("--n and --max-new-tokens must be at least 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be > 0 and --top-p in (0, 1]")


class LocalTeacher:
    """A model slimlm loads, prompted through its chat template when its tokenizer has one. Prompts are
    generated `batch_size` at a time (left-padded, with the attention mask), each batch's sampling seeded from
    the run's seed and the batch's first prompt index, so a run repeats exactly at the same batch size."""

    def __init__(self, model, tokenizer, name: str = "local", batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
        self.model, self.tok, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token

    def _render(self, prompt: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    def complete(self, prompts: list[str], s: Sampling, n: int | None = None) -> list[list[str]]:
        import torch

        n = n or s.n
        pad = self.tok.pad_token_id
        out = []
        for i in range(0, len(prompts), self.batch_size):
            rows = [self._render(p) for p in prompts[i:i + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])                     # left padding
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(s.seed * 1_000_003 + i)
                gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                          temperature=s.temperature, top_p=s.top_p, top_k=0,
                                          max_new_tokens=s.max_new_tokens, num_return_sequences=n,
                                          pad_token_id=pad)
            text = [self.tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
            out.extend(text[k * n:(k + 1) * n] for k in range(len(rows)))     # generate repeats each row n times
        return out


class EndpointTeacher:
    """An OpenAI-compatible chat-completions endpoint: POST {base}/v1/chat/completions."""

    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else (
            base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions"))
        self.model, self.timeout, self.name = model, timeout, url
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise SlimlmError(f"the endpoint {self.url} answered HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
                              ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SlimlmError(f"the endpoint {self.url} does not answer ({reason}); start the server or check the "
                              "URL") from None
        except json.JSONDecodeError:
            raise SlimlmError(f"the endpoint {self.url} did not answer with JSON; is it OpenAI-compatible?") from None

    def complete(self, prompts: list[str], s: Sampling, n: int | None = None) -> list[list[str]]:
        n = n or s.n
        out = []
        for i, p in enumerate(prompts):
            texts: list[str] = []
            while len(texts) < n:                     # servers that ignore `n` answer one choice at a time
                r = self._post({"model": self.model, "messages": [{"role": "user", "content": p}],
                                "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                                "n": n - len(texts), "seed": s.seed * 1_000_003 + i + len(texts)})
                choices = r.get("choices") or []
                if not choices:
                    raise SlimlmError(f"the endpoint {self.url} answered without choices: {str(r)[:200]}")
                texts += [(c.get("message") or {}).get("content", "").strip() for c in choices]
            out.append(texts[:n])
        return out


def read_prompts(path: str | os.PathLike, field: str = "prompt") -> list[str]:
    """Prompts from a .txt (one per non-empty line) or a .jsonl ({field: ...} per line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"the prompts file {path} does not exist")
    if p.suffix == ".jsonl":
        prompts = []
        for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(str(json.loads(line)[field]).strip())
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{path} line {k}: expected a JSON object with a {field!r} field") from None
    else:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [q for q in prompts if q]
    if not prompts:
        raise ConfigError(f"the prompts file {path} holds no prompts")
    return prompts


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def similar(a: str, b: str, threshold: float = 0.7) -> bool:
    """Word-set Jaccard similarity above `threshold` (the near-duplicate filter of the growth steps)."""
    wa, wb = _words(a), _words(b)
    return bool(wa or wb) and len(wa & wb) / max(len(wa | wb), 1) > threshold


def _clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    return re.sub(r"^(new request|request)\s*:\s*", "", text, flags=re.IGNORECASE).strip()


def evolve(teacher, prompts: list[str], s: Sampling, rounds: int = 1) -> list[str]:
    """`rounds` of rewriting every prompt of the growing set once; returns the new prompts."""
    rng = random.Random(s.seed)
    pool, new = list(prompts), []
    for _ in range(rounds):
        asks = [rng.choice(EVOLVE).format(prompt=p) for p in pool]
        outs = teacher.complete(asks, s, n=1)
        fresh = [_clean(o[0]) for o in outs]
        fresh = [f for f, old in zip(fresh, pool) if f and f != old and len(f) < 4 * max(len(old), 200)
                 and not any(similar(f, q) for q in prompts + new)]
        new += fresh
        pool = fresh
    return new


def self_instruct(teacher, prompts: list[str], s: Sampling, count: int, shots: int = 3) -> list[str]:
    """Up to `count` new prompts, each asked for with `shots` examples drawn from the growing set; at most
    4 * count requests."""
    rng = random.Random(s.seed + 1)
    pool, new = list(prompts), []
    for _ in range(4 * count):
        if len(new) >= count:
            break
        ex = rng.sample(pool, min(shots, len(pool)))
        ask = SELF_INSTRUCT.format(examples="\n".join(f"{i + 1}. {e}" for i, e in enumerate(ex)))
        f = _clean(teacher.complete([ask], Sampling(1, s.max_new_tokens, s.temperature, s.top_p,
                                                    s.seed + 7 * len(new) + rng.randrange(10**6)), n=1)[0][0])
        if f and not any(similar(f, q) for q in pool):
            new.append(f)
            pool.append(f)
    return new


def generate(teacher, prompts: list[str], s: Sampling, output: str | os.PathLike, *, evolve_rounds: int = 0,
             self_instruct_count: int = 0) -> dict:
    """Grow the prompts (optional), collect the teacher's responses, deduplicate, write `output` (.jsonl)
    atomically. Returns counts."""
    origin = {p: "given" for p in prompts}
    if evolve_rounds:
        for p in evolve(teacher, prompts, s, evolve_rounds):
            origin.setdefault(p, "evolved")
    if self_instruct_count:
        for p in self_instruct(teacher, list(origin), s, self_instruct_count):
            origin.setdefault(p, "self-instruct")
    allp = list(origin)
    responses = teacher.complete(allp, s)
    rows, seen = [], set()
    for p, rs in zip(allp, responses):
        for r in rs:
            key = (p, " ".join(r.split()))
            if r.strip() and key not in seen:
                seen.add(key)
                rows.append({"prompt": p, "response": r, "origin": origin[p], "teacher": teacher.name})
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return {"prompts": len(allp), "given": len(prompts), "evolved": sum(v == "evolved" for v in origin.values()),
            "self_instruct": sum(v == "self-instruct" for v in origin.values()), "rows": len(rows),
            "duplicates_dropped": sum(len(rs) for rs in responses) - len(rows)}
