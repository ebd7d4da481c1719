"""Soft prompts and prefixes: prompt tuning, P-tuning, prefix tuning and P-tuning v2, saved as PEFT folders.

    prompt      n trainable embeddings prepended at the input (Lester et al. 2021); initialised from sampled
                vocabulary embeddings, from a text, or at random
    ptuning     the n embeddings are the output of a prompt encoder, an MLP or a bidirectional LSTM + MLP,
                over n trained inputs (Liu et al. 2021, "GPT Understands, Too"), trained end to end
    prefix      trainable keys and values at every attention layer (Li & Liang 2021), reparameterised during
                training as MLP(embedding) -> (n, layers * 2 * kv_heads * head_dim); saved folded into plain
                prefixes
    ptuning-v2  the same deep prompts without the reparameterisation (Liu et al. 2022), initialised from the
                keys and values the model itself computes for n sampled vocabulary tokens

All four enter the model through slimlm.adapt.prefix_cache (one small module touches the cache). The PEFT
folder holds `adapter_config.json` (peft_type PROMPT_TUNING, P_TUNING or PREFIX_TUNING) and
`adapter_model.safetensors` with one tensor, `prompt_embeddings`: the encoder's output as PEFT stores it,
(n, hidden) for the prompt methods, (n, layers * 2 * kv_heads * head_dim) for the prefix methods, laid out
as (layer, key|value, head, dim) along the last axis.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ConfigError
from .prefix_cache import PrefixHook, cache_from_kv, decoder, kv_shape, layer_kv, new_cache

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING", "ptuning-v2": "PREFIX_TUNING"}
_VIRTUAL_HELP = "prompt, ptuning, prefix, ptuning-v2: virtual tokens (the soft prompt's or prefix's length)"
_ENC_HELP = "ptuning, prefix: hidden width of the prompt encoder / prefix MLP (0: the model's hidden size)"


def _check_virtual(n: int) -> None:
    if n < 1:
        raise ConfigError(f"--num-virtual-tokens must be at least 1 (got {n})")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": _VIRTUAL_HELP})
    prompt_init: str = field(default="vocab", metadata={
        "help": "prompt: initial soft prompt: vocab (sampled vocabulary embeddings), text (--prompt-init-text, "
                "repeated to length), random (normal at the embeddings' scale)"})
    prompt_init_text: str | None = field(default=None, metadata={"help": "prompt: the text for --prompt-init text"})
    prompt_teacher: str | None = field(default=None, metadata={
        "help": "prompt: a model (typically the uncompressed one) whose next-token distributions the prompted "
                "model learns to match (KL divergence); without it, the plain language-model loss"})

    def __post_init__(self) -> None:
        _check_virtual(self.num_virtual_tokens)
        if self.prompt_init not in ("vocab", "text", "random"):
            raise ConfigError(f"--prompt-init takes vocab, text or random, not {self.prompt_init!r}")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ConfigError("--prompt-init text needs --prompt-init-text")


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": _VIRTUAL_HELP})
    encoder: str = field(default="mlp", metadata={"help": "ptuning: the prompt encoder, mlp or lstm"})
    encoder_hidden_size: int = field(default=0, metadata={"help": _ENC_HELP})
    encoder_num_layers: int = field(default=2, metadata={"help": "ptuning: LSTM layers of the lstm encoder"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "ptuning: dropout between LSTM layers"})

    def __post_init__(self) -> None:
        _check_virtual(self.num_virtual_tokens)
        if self.encoder not in ("mlp", "lstm"):
            raise ConfigError(f"--encoder takes mlp or lstm, not {self.encoder!r}")
        if self.encoder_hidden_size < 0 or self.encoder_num_layers < 1 or not 0 <= self.encoder_dropout < 1:
            raise ConfigError("--encoder-hidden-size must be >= 0, --encoder-num-layers >= 1 and --encoder-dropout "
                              "in [0, 1)")


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": _VIRTUAL_HELP})
    encoder_hidden_size: int = field(default=0, metadata={"help": _ENC_HELP})

    def __post_init__(self) -> None:
        _check_virtual(self.num_virtual_tokens)
        if self.encoder_hidden_size < 0:
            raise ConfigError(f"--encoder-hidden-size must be >= 0 (got {self.encoder_hidden_size})")


@dataclass
class PTuningV2Config:
    num_virtual_tokens: int = field(default=20, metadata={"help": _VIRTUAL_HELP})

    def __post_init__(self) -> None:
        _check_virtual(self.num_virtual_tokens)


# ------------------------------------------------------------------------------------------ modules
class SoftPrompt(nn.Module):
    """The trainable part of one prompt method. kind: prompt | ptuning | prefix | ptuning-v2, or, for a
    loaded folder, "embeds" / "kv" (fixed encoder outputs). output() is what PEFT saves as prompt_embeddings:
    (n, hidden) for the prompt kinds, (n, layers * 2 * kv_heads * head_dim) for the prefix kinds."""

    def __init__(self, kind: str, n: int, width: int, *, hidden: int = 0, encoder: str = "mlp",
                 lstm_layers: int = 2, dropout: float = 0.0, init: Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.n, self.encoder = kind, n, encoder
        if kind == "ptuning":
            h = hidden or width
            self.embedding = nn.Parameter(torch.randn(n, width))
            if encoder == "lstm":
                self.lstm = nn.LSTM(width, h, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                    batch_first=True)
                self.head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, width))
            else:
                self.head = nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, width))
        elif kind == "prefix":
            token, out = width                          # (token width, layers * 2 * kv width)
            h = hidden or token
            self.embedding = nn.Parameter(torch.randn(n, token))
            self.head = nn.Sequential(nn.Linear(token, h), nn.Tanh(), nn.Linear(h, out))
        else:                                           # prompt, ptuning-v2, embeds, kv: the output itself
            self.embedding = nn.Parameter(init.clone() if init is not None else torch.zeros(n, width))

    def output(self) -> Tensor:
        if self.kind == "ptuning":
            x = self.embedding[None]
            if self.encoder == "lstm":
                x = self.lstm(x)[0]
            return self.head(x)[0]
        if self.kind == "prefix":
            return self.head(self.embedding)
        return self.embedding

    @property
    def makes_kv(self) -> bool:
        return self.kind in ("prefix", "ptuning-v2", "kv")


def split_kv(flat: Tensor, layers: int, heads: int, head_dim: int) -> list[tuple[Tensor, Tensor]]:
    """(n, layers * 2 * heads * head_dim) -> per layer (key, value), each (1, heads, n, head_dim)."""
    n = flat.shape[0]
    t = flat.view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)     # (layers*2, heads, n, hd)
    return [(t[2 * i][None], t[2 * i + 1][None]) for i in range(layers)]


def join_kv(kv: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The inverse of split_kv."""
    t = torch.stack([x[0] for pair in kv for x in pair])                  # (layers*2, heads, n, hd)
    return t.permute(2, 0, 1, 3).reshape(t.shape[2], -1)


class PromptRuntime:
    """A SoftPrompt installed on a model (model.slimlm_prompt): every forward of the model sees it."""

    def __init__(self, model: nn.Module, prompt: SoftPrompt, method: str) -> None:
        self.model, self.prompt, self.method = model, prompt, method
        self.layers, self.kv_heads, self.head_dim = kv_shape(model)
        self.hook = PrefixHook(model, self._supply, prompt.n)

    def _supply(self):
        out = self.prompt.output()
        if self.prompt.makes_kv:
            dtype = _dtype(self.model)
            return cache_from_kv(self.model, split_kv(out.to(dtype), self.layers, self.kv_heads, self.head_dim))
        cache = new_cache(self.model)
        self.hook.run_plain(inputs_embeds=out[None].to(_dtype(self.model)), use_cache=True, **{self.hook.arg: cache})
        return cache

    def remove(self) -> None:
        self.hook.remove()
        self.model.__dict__.pop("slimlm_prompt", None)

    def hidden_states(self, batch: dict) -> Tensor:
        """Training path of the prompt kinds: the soft prompt concatenated to the input embeddings (as PEFT
        computes it) and the text's last hidden states (B, L, H). Equal to the cache path (a test), but one
        causal pass, so attention keeps its unmasked fast kernel (with a cache it needs an explicit mask)."""
        ids = batch["input_ids"]
        emb = self.model.get_input_embeddings()(ids)
        p = self.prompt.output()[None].to(emb.dtype).expand(ids.shape[0], -1, -1)
        mask = batch.get("attention_mask")
        if mask is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], self.prompt.n), mask], dim=1)
        self.hook.enabled = False
        try:
            out = self.hook.decoder(inputs_embeds=torch.cat([p, emb], dim=1), attention_mask=mask, use_cache=False)
        finally:
            self.hook.enabled = True
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h[:, self.prompt.n:]

    def lm_loss(self, chunk: int = 1024):
        """TrainPlan.loss for the prompt kinds (prompt, ptuning): the language-model loss through
        hidden_states(); other outputs (soft-capped logits, an adapted head) fall back to the model's own
        forward through the cache."""
        from ..core.losses import chunked_linear_cross_entropy
        from ..training.plan import _plain_head, lm_loss

        def loss(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
            head = _plain_head(model)
            if head is None or self.prompt.makes_kv:
                return lm_loss(model, batch, chunk)
            labels = batch["labels"]
            h = self.hidden_states(batch)
            total = chunked_linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, labels.reshape(-1),
                                                 bias=head.bias, chunk_size=chunk, reduction="sum")
            return total, (labels != -100).sum()
        return loss


def _dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb.weight.is_floating_point() else torch.float32


def prompt_runtime(model: nn.Module) -> PromptRuntime | None:
    return getattr(model, "slimlm_prompt", None)


def install(model: nn.Module, prompt: SoftPrompt, method: str) -> PromptRuntime:
    if prompt_runtime(model) is not None:
        raise ConfigError("this model already has a soft prompt or prefix; one at a time")
    dev = next(model.parameters()).device
    prompt.to(dev)
    rt = PromptRuntime(model, prompt, method)
    model.__dict__["slimlm_prompt"] = rt             # not a submodule: the model's own state dict stays clean
    return rt


def _widths(model: nn.Module) -> tuple[int, int, int]:
    """(hidden size, kv width, layers * 2 * kv width)."""
    layers, kv, hd = kv_shape(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    return hidden, kv * hd, layers * 2 * kv * hd


def _vocab_rows(model: nn.Module, n: int, seed: int) -> Tensor:
    w = model.get_input_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, min(w.shape[0], 5000), (n,), generator=g)   # frequent tokens come first in BPE vocabularies
    return rows.to(w.device)


def build(model: nn.Module, method: str, config, *, tokenizer=None, seed: int = 0) -> SoftPrompt:
    """A freshly initialised SoftPrompt of `method` for `model`."""
    hidden, kv_width, flat = _widths(model)
    n = config.num_virtual_tokens
    torch.manual_seed(seed)
    emb = model.get_input_embeddings().weight.detach().float()
    if method == "prompt":
        if config.prompt_init == "text":
            if tokenizer is None:
                raise ConfigError("--prompt-init text needs the model's tokenizer")
            ids = tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError("--prompt-init-text tokenizes to nothing")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            init = emb[torch.tensor(ids, device=emb.device)]
        elif config.prompt_init == "vocab":
            init = emb[_vocab_rows(model, n, seed)]
        else:
            init = torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)).to(emb.device) * emb.std()
        return SoftPrompt("prompt", n, hidden, init=init.cpu())
    if method == "ptuning":
        return SoftPrompt("ptuning", n, hidden, hidden=config.encoder_hidden_size, encoder=config.encoder,
                          lstm_layers=config.encoder_num_layers, dropout=config.encoder_dropout)
    if method == "prefix":
        return SoftPrompt("prefix", n, (kv_width, flat), hidden=config.encoder_hidden_size)
    if method == "ptuning-v2":
        return SoftPrompt("ptuning-v2", n, flat, init=_real_kv(model, n, seed).cpu())
    raise ValueError(method)


@torch.no_grad()
def _real_kv(model: nn.Module, n: int, seed: int) -> Tensor:
    """The keys and values the model computes for n sampled vocabulary tokens, flattened as prompt_embeddings."""
    cache = new_cache(model)
    ids = _vocab_rows(model, n, seed)[None]
    was = model.training
    model.eval()
    decoder(model)(input_ids=ids, use_cache=True, **{_arg(model): cache})
    model.train(was)
    layers = kv_shape(model)[0]
    kv = [layer_kv(cache, i) for i in range(layers)]
    return join_kv(kv).float()


def _arg(model: nn.Module) -> str:
    from .prefix_cache import _cache_arg
    return _cache_arg(decoder(model))


def check_fits(model: nn.Module, n: int, seqlen: int) -> None:
    """Refuse a prompt that leaves the text no room in the model's context."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and n + seqlen > limit:
        raise ConfigError(f"--num-virtual-tokens {n} plus --seqlen {seqlen} exceeds the model's context of {limit} "
                          f"positions; use at most {limit - seqlen} virtual tokens or a shorter --seqlen")


# ------------------------------------------------------------------------------------------ PEFT folders
def save_prompt(model: nn.Module, folder: Path | str, *, base_model_ref: str | None = None,
                extra: dict | None = None) -> None:
    """Write the model's soft prompt as a PEFT folder (the encoder's output, as PEFT saves it)."""
    rt = prompt_runtime(model)
    if rt is None:
        raise ConfigError("the model has no soft prompt to save")
    folder = Path(folder)
    p = rt.prompt
    with torch.no_grad():
        out = p.output().detach().float().cpu().contiguous()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, kv, hd = kv_shape(model)
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_ref, "inference_mode": True,
              "num_virtual_tokens": p.n, "num_transformer_submodules": 1, "num_layers": layers,
              "revision": None, "modules_to_save": None}
    if p.makes_kv:
        config = {**common, "peft_type": "PREFIX_TUNING", "token_dim": kv * hd, "num_attention_heads": kv,
                  "prefix_projection": p.kind == "prefix",
                  "encoder_hidden_size": (p.head[0].out_features if p.kind == "prefix" else kv * hd)}
    else:
        config = {**common, "peft_type": PEFT_TYPES.get(p.kind, "PROMPT_TUNING"), "token_dim": out.shape[1],
                  "num_attention_heads": cfg.num_attention_heads}
        if config["peft_type"] == "P_TUNING":
            config.update(encoder_reparameterization_type=p.encoder.upper(),
                          encoder_hidden_size=p.head[0].out_features // (2 if p.encoder == "lstm" else 1),
                          encoder_num_layers=p.lstm.num_layers if p.encoder == "lstm" else 2,
                          encoder_dropout=float(p.lstm.dropout) if p.encoder == "lstm" else 0.0)
        else:
            config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    save_file({"prompt_embeddings": out}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt", "slimlm_method": rt.method, **{k: str(v) for k, v in (extra or {}).items()}})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_prompt(model: nn.Module, folder: Path | str, cfg: dict) -> PromptRuntime:
    """Load a PEFT PROMPT_TUNING / P_TUNING / PREFIX_TUNING folder (PEFT's or slimlm's) onto `model`."""
    folder = Path(folder)
    kind = cfg.get("peft_type")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise ConfigError(f"{folder} is a prompt for an encoder-decoder model; slimlm trains causal LMs")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}")
    tensors = load_file(str(path))
    if "prompt_embeddings" not in tensors:
        raise ConfigError(f"{path} holds no prompt_embeddings tensor (keys: {sorted(tensors)[:3]})")
    emb = tensors["prompt_embeddings"].float()
    n = emb.shape[0] if emb.ndim == 2 else -1
    hidden, _, flat = _widths(model)
    want = flat if kind == "PREFIX_TUNING" else hidden
    if emb.ndim != 2 or emb.shape[1] != want or n != cfg.get("num_virtual_tokens", n):
        what = "layers x 2 x key/value width" if kind == "PREFIX_TUNING" else "hidden size"
        raise ConfigError(f"the prompt in {folder} was made for another model's width: prompt_embeddings is "
                          f"{tuple(emb.shape)}, this model's {what} needs (n, {want})")
    method = "kv" if kind == "PREFIX_TUNING" else "embeds"
    with torch.no_grad():
        prompt = SoftPrompt(method, n, want, init=emb.to(_dtype(model)))
    prompt.requires_grad_(False)
    rt = install(model, prompt, method)
    return rt


def teacher_kl_loss(teacher: nn.Module, chunk: int = 1024):
    """The loss of "compress, then prompt": KL(teacher || prompted model) summed over the target positions,
    with their count (TrainPlan.loss's contract); both models' logits are computed chunk by chunk."""
    from ..core.losses import chunked_head_divergence
    from ..training.plan import _plain_head, hidden_states

    def loss(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        keep = batch["labels"].reshape(-1) != -100
        head_s, head_t = _plain_head(model), _plain_head(teacher)
        if head_s is None or head_t is None:
            from ..core.losses import forward_kl
            z_s = model(input_ids=batch["input_ids"], use_cache=False).logits
            with torch.no_grad():
                z_t = teacher(input_ids=batch["input_ids"], use_cache=False).logits
            kl = forward_kl(z_s.reshape(-1, z_s.shape[-1]), z_t.reshape(-1, z_t.shape[-1]))
            return torch.where(keep, kl, 0.0).sum(), keep.sum()
        h = hidden_states(model, batch)
        with torch.no_grad():
            ht = hidden_states(teacher, batch)
        total = chunked_head_divergence(h.reshape(-1, h.shape[-1]), head_s.weight, ht.reshape(-1, ht.shape[-1]),
                                        head_t.weight, keep, b_student=head_s.bias, b_teacher=head_t.bias,
                                        chunk_size=chunk)
        return total, keep.sum()
    return loss
