"""Black-box distillation data: `slimlm generate` from a local teacher and from an OpenAI-compatible server
started here, the evolve and self-instruct growth steps, deduplication, the generated pairs trained on with
the loss on the responses; bad input in one line."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slimlm.cli import main
from slimlm.distill import blackbox as BB


class Stub:
    """A teacher that answers from a function of the prompt (and counts its calls)."""

    name = "stub"

    def __init__(self, answer) -> None:
        self.answer, self.calls = answer, []

    def complete(self, prompts, s, n=None):
        self.calls.append(list(prompts))
        return [[self.answer(p, k) for k in range(n or s.n)] for p in prompts]


def test_generate_deduplicates_and_records_where_each_prompt_came_from(tmp_path):
    t = Stub(lambda p, k: "same answer" if "dup" in p else f"answer {k} to {p}")
    rep = BB.generate(t, ["first question", "dup question"], BB.Sampling(n=3), tmp_path / "o.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rep == {"prompts": 2, "given": 2, "evolved": 0, "self_instruct": 0, "rows": 4, "duplicates_dropped": 2}
    assert [r["response"] for r in rows if r["prompt"] == "dup question"] == ["same answer"]
    assert {r["origin"] for r in rows} == {"given"} and all(r["teacher"] == "stub" for r in rows)


def test_evolve_rewrites_each_prompt_and_drops_copies():
    rewrites = {"Explain tides.": "Explain tides and how the moon's distance changes them, in three steps.",
                "Name a colour.": "Name a colour."}                                         # unchanged: dropped
    t = Stub(lambda ask, k: next(v for q, v in rewrites.items() if q in ask))
    new = BB.evolve(t, list(rewrites), BB.Sampling(n=1), rounds=1)
    assert new == ["Explain tides and how the moon's distance changes them, in three steps."]
    assert all(any(q in a for q in rewrites) for a in t.calls[0])                            # one ask per prompt
    assert all(a.startswith(tuple(tpl.split("{")[0] for tpl in BB.EVOLVE)) for a in t.calls[0])


def test_self_instruct_grows_the_set_without_near_duplicates():
    answers = iter(["Describe a forest at night.", "describe a forest at night", "Write a haiku about rain.",
                    "List three prime numbers.", "Summarise a film you like."])
    t = Stub(lambda ask, k: next(answers))
    new = BB.self_instruct(t, ["Describe a forest at dawn."], BB.Sampling(n=1), count=3)
    assert new == ["Describe a forest at night.", "Write a haiku about rain.", "List three prime numbers."]
    assert BB.similar("Describe a forest at night.", "describe a forest at night")
    assert not BB.similar("Write a haiku about rain.", "List three prime numbers.")


def test_local_teacher_through_the_cli_then_training_on_the_pairs(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a story\n\nWhat is a truth\n")
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--teacher", str(model_dir), "--prompts", str(prompts), "--output", str(out), "--n", "2",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["prompt"] for r in rows} == {"Tell me a story", "What is a truth"} and len(rows) <= 4
    first = out.read_text()
    assert main([*args, "--overwrite"]) == 0 and out.read_text() == first          # seeded
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    lines = [json.dumps({"prompt": r["prompt"], "response": (r["response"] + " ok")}) for r in rows]
    (tmp_path / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    assert main(["train", "--model", str(model_dir), "--method", "lora", "--data", str(tmp_path / "train.jsonl"),
                 "--seqlen", "48", "--batch-size", "2", "--steps", "2", "--output", str(tmp_path / "sft")]) == 0
    assert (tmp_path / "sft" / "adapter_config.json").is_file()


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append((self.path, body))
        prompt = body["messages"][-1]["content"]
        choices = [{"index": k, "message": {"role": "assistant", "content": f"reply {k} to {prompt}"},
                    "finish_reason": "stop"} for k in range(body.get("n", 1))]
        data = json.dumps({"id": "x", "object": "chat.completion", "choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    _Handler.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_an_openai_compatible_endpoint(server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n" + json.dumps({"prompt": "Name a river."})
                       + "\n")
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--teacher", server, "--endpoint-model", "tiny", "--prompts", str(prompts), "--output",
                 str(out), "--n", "2", "--max-new-tokens", "9", "--evolve", "1"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {"prompt": "Why is the sky blue?", "response": "reply 1 to Why is the sky blue?", "origin": "given",
            "teacher": server} in rows
    assert any(r["origin"] == "evolved" for r in rows)
    path, body = _Handler.seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "tiny" and body["max_tokens"] == 9
    assert body["messages"][0]["role"] == "user" and body["n"] == 2


def test_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--teacher", "http://127.0.0.1:9", "--prompts", str(empty), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds no prompts" in err and err.count("\n") == 1
    (tmp_path / "p.txt").write_text("hello\n")
    assert main(["generate", "--teacher", "http://127.0.0.1:9", "--prompts", str(tmp_path / "p.txt"), "--output",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/v1/chat/completions does not answer" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".o.jsonl*"))


def test_local_teacher_batches_prompts_of_different_lengths_like_one_at_a_time(model_dir):
    """Left padding with the attention mask leaves each prompt's continuation unchanged: near-greedy sampling
    (top_p so small only the top token survives) gives the same responses one prompt at a time and batched."""
    from slimlm import models

    model, tok = models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir))
    prompts = ["It is a truth", "A single man in possession of a good fortune", "Wife", "must be in want of"]
    s = BB.Sampling(n=2, max_new_tokens=7, top_p=1e-6)
    alone = BB.LocalTeacher(model, tok, batch_size=1).complete(prompts, s)
    batched = BB.LocalTeacher(model, tok, batch_size=3).complete(prompts, s)
    assert batched == alone and len(alone) == 4 and all(len(r) == 2 and r[0] for r in alone)
    with pytest.raises(BB.ConfigError, match="batch-size"):
        BB.LocalTeacher(model, tok, batch_size=0)
