"""Training data: the benchmark's text windows (offsets as calibration_windows draws them, labels shifted
as HF's LM loss shifts them), instruction examples (prompt/response and chat-template conversations, loss
only on responses, padding), determinism by index, sharding and micro-batches, and each bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slimlm import data as D
from slimlm.errors import SlimlmError
from slimlm.training.data import (
    instruction_data,
    micro_batches,
    shard,
    target_tokens,
    text_windows,
    training_text,
)

from conftest import TEXT, tiny_model, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
EXAMPLES = [{"prompt": f"Q{i}: {'x' * i}?", "response": f"A{i} " + "y" * (i % 3)} for i in range(7)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How?"},
        {"role": "assistant", "content": "Fine"}]


def ids_of(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chat_tokenizer(template: str = TEMPLATE):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def reference_labels(ids: list[int], trained: list[bool], width: int) -> list[int]:
    """Plain loop: position t predicts token t + 1 when that token exists and is trained."""
    return [ids[t + 1] if t + 1 < len(ids) and trained[t + 1] else -100 for t in range(width)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_windows_follow_the_benchmark_protocol():
    ids = D.tokenize(tiny_tokenizer(), TEXT)
    data = text_windows(ids, seqlen=16, batch_size=3, batches=4, seed=5)
    windows = D.calibration_windows(ids, 12, 16, seed=5)
    assert len(data) == 4 and data.tokens_per_batch == 48
    assert data.describe() == {"kind": "text", "windows": 12, "seqlen": 16, "batch_size": 3, "batches": 4,
                               "seed": 5, "text_tokens": ids.numel()}
    for i in range(4):
        b = data.batch(i)
        assert set(b) == {"input_ids", "labels"}
        assert torch.equal(b["input_ids"], windows[i * 3:(i + 1) * 3])
        for row, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            assert labels == reference_labels(row, [True] * 16, 16)
        assert target_tokens(b) == 3 * 15


def test_text_labels_give_hf_shifted_loss():
    ids = D.tokenize(tiny_tokenizer(), TEXT)
    b = text_windows(ids, seqlen=24, batch_size=2, batches=1).batch(0)
    model = tiny_model("llama")
    with torch.no_grad():
        out = model(b["input_ids"], labels=b["input_ids"])
    ours = F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(ours, out.loss)


def test_text_batches_are_deterministic_by_index():
    ids = D.tokenize(tiny_tokenizer(), TEXT)
    a = text_windows(ids, seqlen=8, batch_size=2, batches=5, seed=1)
    b = text_windows(ids, seqlen=8, batch_size=2, batches=5, seed=1)
    backwards = {i: b.batch(i) for i in (4, 2, 0, 3, 1)}
    assert all(same(a.batch(i), backwards[i]) for i in range(5))
    assert same(a.batch(3), a.batch(3))
    shorter = text_windows(ids, seqlen=8, batch_size=2, batches=2, seed=1)
    assert all(same(a.batch(i), shorter.batch(i)) for i in range(2))
    assert not same(a.batch(0), text_windows(ids, seqlen=8, batch_size=2, batches=5, seed=2).batch(0))
    with pytest.raises(IndexError):
        a.batch(5)


def test_training_text_concatenates_sources_in_order(tmp_path):
    files = [tmp_path / f"{n}.txt" for n in ("b", "a", "c")]
    for f, text in zip(files, ("Sense and\n", "Emma, ", "Park.")):
        f.write_text(text, encoding="utf-8")
    ids = training_text(tiny_tokenizer(), [str(f) for f in files])
    assert ids.tolist() == ids_of("Sense and\n") + ids_of("Emma, ") + ids_of("Park.")


def test_prompt_response_rows_labels_and_padding(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    data = instruction_data(path, tok, seqlen=32, batch_size=3, epochs=2, seed=0)
    assert len(data) == 5                                                 # ceil(2 * 7 / 3)
    by_ids = {}
    for ex in EXAMPLES:  # documented rule: prompt tokens + response tokens + eos, loss on response and eos
        p, r = ids_of(ex["prompt"]), ids_of(ex["response"]) + [tok.eos_token_id]
        by_ids[tuple(p + r)] = [False] * len(p) + [True] * len(r)
    seen = []
    for i in range(len(data)):
        b = data.batch(i)
        width = b["input_ids"].shape[1]
        rows = zip(b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist(), strict=True)
        for row, labels, mask in rows:
            n = sum(mask)
            assert mask == [1] * n + [0] * (width - n)
            key = tuple(row[:n])
            assert key in by_ids
            assert labels == reference_labels(list(key), by_ids[key], width)
            seen.append(key)
        assert width == max(len(k) for k in seen[-3:]) and b["input_ids"].shape[0] == 3
    first_epoch = seen[:7]
    assert sorted(first_epoch) == sorted(by_ids)                          # each example once per epoch
    assert sorted(seen[7:14]) == sorted(by_ids)


def test_instruction_batches_are_deterministic_and_padded_to_seqlen(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    a = instruction_data(path, tiny_tokenizer(), seqlen=32, batch_size=2, batches=6, seed=3)
    b = instruction_data(path, tiny_tokenizer(), seqlen=32, batch_size=2, batches=6, seed=3)
    backwards = {i: b.batch(i) for i in reversed(range(6))}
    assert all(same(a.batch(i), backwards[i]) for i in range(6))
    other = instruction_data(path, tiny_tokenizer(), seqlen=32, batch_size=2, batches=6, seed=4)
    assert not all(same(a.batch(i), other.batch(i)) for i in range(6))
    fixed = instruction_data(path, tiny_tokenizer(), seqlen=32, batch_size=2, batches=6, seed=3,
                             pad_to_seqlen=True)
    for i in range(6):
        f, v = fixed.batch(i), a.batch(i)
        assert f["input_ids"].shape == (2, 32) and (f["labels"][:, v["labels"].shape[1]:] == -100).all()
        assert torch.equal(f["labels"][:, :v["labels"].shape[1]], v["labels"])
    assert a.describe()["format"] == "prompt-response" and a.describe()["examples"] == 7


def test_custom_fields_and_no_mask_without_padding(tmp_path):
    rows = [{"q": "ab", "a": "cd"}, {"q": "ef", "a": "gh"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    b = instruction_data(path, tiny_tokenizer(), seqlen=8, batch_size=2, batches=1,
                         prompt_field="q", response_field="a").batch(0)
    assert "attention_mask" not in b
    assert (b["labels"][:, :1] == -100).all() and target_tokens(b) == 2 * 3   # "cd" / "gh" + eos


def test_chat_loss_only_on_assistant_turns(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    b = instruction_data(path, tok, seqlen=128, batch_size=1, batches=1).batch(0)
    rendered = "<system>Be brief.</s><user>Hi</s><assistant>Hello</s><user>How?</s><assistant>Fine</s>"
    assert b["input_ids"][0].tolist() == ids_of(rendered)
    targets = b["labels"][0][b["labels"][0] != -100].tolist()
    assert targets == ids_of("Hello</s>") + ids_of("Fine</s>")           # the turn's content and its close
    trained = [False] * len(ids_of(rendered))
    for text in ("Hello</s>", "Fine</s>"):
        end = len(ids_of(rendered[:rendered.index(text) + len(text)]))
        trained[end - len(ids_of(text)):end] = [True] * len(ids_of(text))
    assert b["labels"][0].tolist() == reference_labels(ids_of(rendered), trained, len(trained))


def test_truncate_drops_the_end_of_the_response(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abc", "response": "defghij"}])
    too_long = r"line 1 is 11 tokens, longer than the window of 6.*--truncate"
    with pytest.raises(SlimlmError, match=too_long) as e:
        instruction_data(path, tok, seqlen=6, batch_size=1, batches=1)
    assert "\n" not in str(e.value)
    data = instruction_data(path, tok, seqlen=6, batch_size=1, batches=1, truncate=True)
    b = data.batch(0)
    assert b["input_ids"][0].tolist() == ids_of("abcdef") and data.describe()["truncated"] == 1
    assert b["labels"][0].tolist() == [-100, -100] + ids_of("def") + [-100]


@pytest.mark.parametrize("rows,world,accum", [(8, 2, 2), (8, 4, 1), (6, 3, 2), (4, 1, 4)])
def test_shard_and_micro_batches_partition_a_batch(tmp_path, rows, world, accum):
    path = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    batch = instruction_data(path, tiny_tokenizer(), seqlen=32, batch_size=rows, batches=1).batch(0)
    shards = [shard(batch, r, world) for r in range(world)]
    parts = [m for s in shards for m in micro_batches(s, accum)]
    assert len(parts) == world * accum
    for k in batch:
        assert torch.equal(torch.cat([p[k] for p in parts]), batch[k])
        assert all(p[k].shape[0] == rows // (world * accum) for p in parts)
    assert sum(target_tokens(p) for p in parts) == target_tokens(batch)


def bad_file(tmp_path, text: str) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("text,kwargs,tok,match", [
    ('{"prompt": "a", "response": "b"}\n\n{oops\n', {}, None, r"bad\.jsonl line 3 is not JSON"),
    ('{"question": "a", "answer": "b"}\n', {}, None,
     r"line 1 has fields question, answer but not 'prompt' and 'response' nor 'messages'.*--prompt-field"),
    ('{"q": "a", "answer": "b"}\n', {"prompt_field": "q"}, None, r"not 'q' and 'response'.*--response-field"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', {}, None, r"line 2 needs string fields"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', {}, "chat", r"line 1 has no assistant turn"),
    ('{"messages": [{"role": "user"}]}\n', {}, "chat", r"must be a list of .*role.*content"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', {}, None,
     r"need a fast tokenizer with a chat template"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', {},
     "{{ messages|length }}",
     r"does not render the conversation prefix by prefix"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', {}, "{{ raise_exception('no') }}",
     r"line 1: the chat template failed \(no\)"),
    ('{"prompt": "abcdefgh", "response": "i"}\n', {"truncate": True}, None,
     r"line 1 leaves no response token to train on within the window of 8"),
    ('{"prompt": "", "response": ""}\n', {}, None, r"line 1 leaves no response token"),
    ("\n  \n", {}, None, r"holds no examples"),
    ('{"prompt": "a", "response": "b"}\n', {"seqlen": 1}, None, r"--seqlen must be at least 2 \(got 1\)"),
    ('{"prompt": "a", "response": "b"}\n', {"batch_size": 0}, None, r"--batch-size must be at least 1"),
    ('{"prompt": "a", "response": "b"}\n', {"batches": 0}, None, r"number of batches must be at least 1"),
    ('{"prompt": "a", "response": "b"}\n', {"batches": 2, "epochs": 1}, None, r"not both"),
])
def test_bad_instruction_input(tmp_path, text, kwargs, tok, match):
    tokenizer = tiny_tokenizer() if tok is None else chat_tokenizer(TEMPLATE if tok == "chat" else tok)
    args = {"seqlen": 8, "batch_size": 1, **kwargs}
    with pytest.raises(SlimlmError, match=match) as e:
        instruction_data(bad_file(tmp_path, text), tokenizer, **args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("call,match", [
    (lambda ids: text_windows(ids[:10], seqlen=10, batch_size=1, batches=1),
     r"training text has 10 tokens, too few for a window of 10"),
    (lambda ids: text_windows(ids, seqlen=1, batch_size=1, batches=1), r"--seqlen must be at least 2"),
    (lambda ids: text_windows(ids, seqlen=8, batch_size=0, batches=1), r"--batch-size must be at least 1"),
    (lambda ids: text_windows(ids, seqlen=8, batch_size=1, batches=0), r"number of batches must be at least"),
    (lambda ids: training_text(tiny_tokenizer(), []), r"no training text given"),
    (lambda ids: shard({"labels": ids[:6, None]}, 0, 4), r"6 rows does not divide among 4 ranks.*of 4"),
    (lambda ids: shard({"labels": ids[:6, None]}, 3, 3), r"rank 3 is outside 0\.\.2"),
    (lambda ids: micro_batches({"labels": ids[:6, None]}, 4), r"6 rows does not split into 4.*--grad-accum"),
])
def test_bad_text_and_split_input(call, match):
    with pytest.raises(SlimlmError, match=match) as e:
        call(D.tokenize(tiny_tokenizer(), TEXT))
    assert "\n" not in str(e.value)
