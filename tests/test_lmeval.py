"""slimlm eval --tasks: EleutherAI's lm-evaluation-harness on the model slimlm holds in memory, proven against
lm-eval's own command line on a local task folder (tests/data/lmeval_task: next-word multiple choice and
rolling perplexity over the sentence of conftest.TEXT; no download)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm import lmeval
from slimlm.adapt.lora import LoRAConfig, add_lora, lora_parameters
from slimlm.adapt.peft_io import save_peft
from slimlm.cli import main

from conftest import TEXT, VOCAB, tiny_model, tiny_tokenizer

TASKS = Path(__file__).resolve().parent / "data" / "lmeval_task"
NAMES = ["slimlm_next_word", "slimlm_sentence_ppl"]


def slimlm_tasks(capsys, *argv) -> dict:
    """`slimlm eval --tasks TASKS --limit 8 ... --json`: lm-eval's results per task."""
    code = main(["eval", *argv, "--tasks", str(TASKS), "--limit", "8", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)["results"]


def metrics(results: dict) -> dict:
    """{task: {metric key: value}} without lm-eval's bookkeeping (name, alias, sample_len)."""
    return {t: {k: v for k, v in r.items() if "," in k} for t, r in results.items()}


def test_task_data_is_the_sentence_of_TEXT():
    sentence = TEXT.splitlines()[0]
    rows = [json.loads(line) for line in (TASKS / "next_word.jsonl").read_text().splitlines()]
    assert len(rows) == len(sentence.split(" ")) - 2
    for r in rows:
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        assert sentence.startswith(r["context"] + " " + r["choices"][r["label"]])


def test_eval_tasks_gives_the_numbers_of_lm_evals_command_line(capsys, model_dir, tmp_path):
    """The same metrics, exactly (every value and stderr of both tasks, 1-shot, 8 examples), as
    `lm-eval run --model hf` loading the same folder in a subprocess."""
    ours = slimlm_tasks(capsys, "--model", str(model_dir), "--num-fewshot", "1")
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", ",".join(NAMES),
         "--include_path", str(TASKS), "--limit", "8", "--num_fewshot", "1", "--device", "cpu",
         "--output_path", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert sorted(ours) == NAMES
    assert metrics(ours) == metrics(theirs)
    assert {"acc,none", "acc_norm,none"} <= set(ours["slimlm_next_word"])
    assert 0 < ours["slimlm_sentence_ppl"]["bits_per_byte,none"] < 8


def test_quantized_and_adapted_models_are_evaluated_as_they_are(capsys, tmp_path):
    """RTN 4-bit and a LoRA adapter change the numbers; the adapted model's are exactly those of lm-eval's HF
    backend with PEFT loading the same adapter folder; the text table lists every metric. (The model's
    vocabulary is cut to the tokenizer's: with an adapter, lm-eval resizes the embeddings to the tokenizer.)"""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tok = tiny_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    base = slimlm_tasks(capsys, "--model", str(model_dir))

    model = slimlm.load_model(str(model_dir))
    slimlm.quantize(model, slimlm.RTNConfig(bits=4, group_size=32))
    slimlm.export(model, tok, tmp_path / "q4")
    quant = slimlm_tasks(capsys, "--model", str(tmp_path / "q4"))

    model = slimlm.load_model(str(model_dir))
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    (tmp_path / "adapter").mkdir()
    save_peft(model, tmp_path / "adapter", base_model_ref=str(model_dir))
    adapted = slimlm_tasks(capsys, "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"))

    bpb = [r["slimlm_sentence_ppl"]["bits_per_byte,none"] for r in (base, quant, adapted)]
    assert len(set(bpb)) == 3, bpb
    peft = simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "peft": str(tmp_path / "adapter"),
                                                   "dtype": "float32"}, device="cpu", tasks=NAMES, limit=8,
                           task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), log_samples=False)
    assert metrics(adapted) == metrics(peft["results"])

    assert main(["eval", "--model", str(tmp_path / "q4"), "--tasks", str(TASKS), "--limit", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "limit: 8" in lines[0] and lines[1].split() == ["task", "metric", "value", "stderr"]
    table = {(c[0], c[1]): c[2] for c in (line.split() for line in lines[2:])}
    assert set(table) == {(t, k.split(",")[0]) for t, r in metrics(quant).items() for k in r if "_stderr" not in k}
    assert float(table["slimlm_next_word", "acc"]) == pytest.approx(quant["slimlm_next_word"]["acc,none"], abs=1e-4)


def test_run_tasks_leaves_the_model_as_it_was():
    """A tied model whose lm_head slimlm quantized: lm-eval's backend re-ties embeddings on what it is given,
    which would hang a float weight on the packed lm_head; the API keeps the module as it was (state, mode)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True)
    model = T.AutoModelForCausalLM.from_config(cfg)
    slimlm.quantize(model, slimlm.RTNConfig(bits=4, group_size=32, overrides="lm_head=4"))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = lmeval.run_tasks(model, tiny_tokenizer(), "slimlm_next_word", include_path=TASKS, limit=2)
    assert r["results"]["slimlm_next_word"]["sample_len"] == 2
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert model.training


@pytest.mark.parametrize("argv,match", [
    (["--tasks", "slimlm_nxt_word", "--tasks-dir", str(TASKS)],
     ["no task 'slimlm_nxt_word'", "registry", str(TASKS), "did you mean slimlm_next_word"]),
    (["--tasks", str(TASKS / "missing.yaml")], ["does not exist"]),
    (["--tasks", "slimlm_next_word", "--tasks-dir", "/no/such/folder"], ["/no/such/folder does not exist"]),
    (["--limit", "8"], ["go with --tasks"]),
    (["--tasks", str(TASKS), "--reference", "x", "--windows", "3"], ["--windows, --reference", "replaces"]),
    (["--tasks", str(TASKS), "--limit", "0"], ["--limit must be positive"]),
])
def test_tasks_bad_input_is_one_line(capsys, model_dir, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()                                     # the fixture's output (saving the model)
    code = main(["eval", "--model", str(model_dir), *argv])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert len(out.err.strip().splitlines()) == 1 and all(m in out.err for m in match), out.err
    assert sorted(tmp_path.rglob("*")) == before


def test_lm_eval_missing_names_the_install_command(capsys, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)       # import lm_eval raises ImportError
    capsys.readouterr()
    code = main(["eval", "--model", str(model_dir), "--tasks", "hellaswag"])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and len(out.err.strip().splitlines()) == 1
    assert "pip install 'slimlm[eval]'" in out.err and "not installed" in out.err
