"""Shared fixtures: tiny randomly initialised models of several architectures, built from configs (no
download), and helpers. The real default model is used only by tests marked `slow`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 128
ROOT = Path(__file__).resolve().parent.parent


def interop_python(name: str, variable: str) -> str:
    """The python of an extra environment that runs a real consumer library whose pins clash with ours
    (`make interop` builds each under .venv/interop/NAME; `make test` builds them and names them in
    $SLIMLM_*_PYTHON). Named by the variable but missing: the test fails. Not named (a plain pytest run):
    the default folder if it is built, else the test is skipped with the command that builds it."""
    named = os.environ.get(variable)
    python = Path(named) if named else ROOT / ".venv" / "interop" / name / "bin" / "python"
    if python.is_file():
        return str(python)
    if named:
        pytest.fail(f"${variable} names {python}, which does not exist: run `make interop`")
    pytest.skip(f"the {name} environment is not built ({python}): run `make interop` (make test builds it "
                "and fails without it)")


def _configs():
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": lambda: T.LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": lambda: T.Qwen2Config(**common),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=32),
        "gemma3": lambda: T.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=16,
                                            sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "phi3": lambda: T.Phi3Config(**common, pad_token_id=0),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }


ARCHS = sorted(_configs())


def tiny_model(arch: str, seed: int = 0):
    """A tiny random causal LM of the given architecture, in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _configs()[arch]()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves activations tiny; widen the weights so quantization and pruning are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def random_windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def plain_agreement(model, reference, windows: torch.Tensor) -> tuple[float, float]:
    """A plain reference for slimlm.metrics' agreement: mean KL(P_ref || P_model) and top-1 agreement over
    every predicted position (L - 1 per window), from log-softmaxes written out here."""
    kl, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)        # (L-1, V) model
            lq = torch.log_softmax(reference(w[None]).logits[0, :-1].double(), -1)    # (L-1, V) reference
            kl += float((lq.exp() * (lq - lp)).sum())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            count += w.numel() - 1
    return kl / count, agree / count


def text_windows(text: str, seqlen: int, n: int) -> torch.Tensor:
    """The first n non-overlapping windows of seqlen tokens of `text` under tiny_tokenizer()."""
    ids = torch.tensor(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])
    return ids[: n * seqlen].view(n, seqlen)


def tiny_tokenizer():
    """A character-level fast tokenizer (ids < VOCAB) built offline, savable with save_pretrained."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    vocab["\n"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\n") * 40


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as safetensors with a tokenizer, as a user's local model folder."""
    d = tmp_path / "tiny-llama"
    model = tiny_model("llama")
    model.save_pretrained(str(d), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


class StopAt:
    """Training data that raises KeyboardInterrupt (as Ctrl-C would) when batch `at` is first asked for."""

    def __init__(self, data, at: int) -> None:
        self.data, self.at, self.fired = data, at, False

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, i: int):
        if i == self.at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return self.data.batch(i)

    def describe(self) -> dict:
        return self.data.describe()


def step_losses(folder) -> list[float]:
    """The loss of every optimizer step of a finished run, from its metrics.jsonl."""
    import json
    return [json.loads(x)["loss"] for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def assert_resumes_exactly(run, data, at: int, tmp_path):
    """run(data, output, resume) trains once straight through (into tmp_path/"a"), once interrupted as Ctrl-C
    would when batch `at` is first asked for and then resumed (tmp_path/"b"); `data()` gives fresh training
    data. Both runs must log the same loss at every step. Returns what the uninterrupted run returned."""
    from slimlm.errors import Interrupted

    first = run(data(), tmp_path / "a", False)
    with pytest.raises(Interrupted):
        run(StopAt(data(), at), tmp_path / "b", False)
    run(data(), tmp_path / "b", True)
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    return first
