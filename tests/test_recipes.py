"""Recipes (`slimlm run`): a chain of stages on a tiny model end to end, reuse of completed stages on
--resume and re-running of the ones whose inputs or settings changed, a training stage interrupted and
continued from its checkpoint with the same losses, and bad recipes refused in one line before anything
is written."""
from __future__ import annotations

import json

import pytest

from slimlm import recipes
from slimlm.cli import main
from slimlm.errors import Interrupted

from conftest import step_losses

CHAIN = """\
name: tiny-chain
model: {model}
data:
  text: {text}
report: {{data: text, windows: 2, seqlen: 32, speed: false}}
stages:
  - quantize: {{method: rtn, bits: 4, group-size: 32}}
  - train: {{method: lora, data: text, steps: {steps}, seqlen: 32, batch_size: 2, r: 4, save_every: 1}}
  - merge: {{windows: 0}}
  - eval: {{data: text, windows: 2, seqlen: 32, speed: false}}
  - export: {{format: compressed-tensors}}
"""


def write(tmp_path, text: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def ran(out: str) -> list[str]:
    """The stages a run's output says it ran (not reused)."""
    return [line.split(": ")[1].split(" (")[0] for line in out.splitlines()
            if line.startswith("slimlm run: stage") and "->" in line]


def test_a_chain_runs_and_resumes_only_what_changed(model_dir, text_file, tmp_path, capsys):
    recipe = write(tmp_path, CHAIN.format(model=model_dir, text=text_file, steps=2))
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--output", str(run)]) == 0
    assert ran(capsys.readouterr().out) == ["stage 1", "stage 2", "stage 3", "stage 4", "stage 5"]
    assert (run / "02-train" / "adapter_config.json").is_file()                     # the LoRA adapter
    assert (run / "03-merge" / "model.safetensors").is_file()                       # merged into the 4-bit base
    res = json.loads((run / "04-eval" / "eval.json").read_text())
    assert res["model"] == str(run / "03-merge") and res["perplexity"] > 1
    assert (run / "05-export" / "config.json").is_file()
    state = json.loads((run / recipes.STATE).read_text())
    assert [s["done"] for s in state["stages"]] == [True] * 5 and state["model_out"] == str(run / "03-merge")

    assert main(["run", str(recipe), "--output", str(run), "--resume"]) == 0          # nothing changed
    assert ran(capsys.readouterr().out) == []
    write(tmp_path, CHAIN.format(model=model_dir, text=text_file, steps=3))          # training settings changed
    assert main(["run", str(recipe), "--output", str(run), "--resume"]) == 0
    assert ran(capsys.readouterr().out) == ["stage 2", "stage 3", "stage 4", "stage 5"]
    assert len(step_losses(run / "02-train")) == 3
    text_file.write_text(text_file.read_text() + " and more text")                   # a data file changed
    assert main(["run", str(recipe), "--output", str(run), "--resume"]) == 0
    assert ran(capsys.readouterr().out) == ["stage 2", "stage 3", "stage 4", "stage 5"]


def test_an_interrupted_training_stage_continues_from_its_checkpoint(model_dir, text_file, tmp_path, monkeypatch,
                                                                    capsys):
    from slimlm.training import data as TD

    recipe = write(tmp_path, CHAIN.format(model=model_dir, text=text_file, steps=4))
    assert main(["run", str(recipe), "--output", str(tmp_path / "straight")]) == 0
    batch = TD.TextWindows.batch
    fired = []

    def stop_at_2(self, i):
        if i == 2 and not fired:
            fired.append(i)
            raise KeyboardInterrupt                      # as Ctrl-C would, in the middle of the train stage
        return batch(self, i)

    monkeypatch.setattr(TD.TextWindows, "batch", stop_at_2)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        recipes.run(recipe, cut)
    assert (cut / "02-train.partial").is_dir() and not (cut / "02-train").exists()
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(cut), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (quantize, line 7): done before" in out and "continuing its checkpoint" in out
    assert step_losses(cut / "02-train") == step_losses(tmp_path / "straight" / "02-train")


@pytest.mark.parametrize("body,msg", [
    ("model: m\nstages:\n  - quantize: {{method: rtn\n", "not valid YAML at line 4, column 1"),
    ("model: m\nstages:\n  - quantise: {{method: rtn}}\n", "stage 1 (line 3): unknown stage 'quantise'; the stages are"),
    ("model: {model}\nstages:\n  - quantize: {{method: rtn, bitz: 4}}\n",
     "stage 1 (quantize, line 3): unknown field 'bitz'; its fields are:"),
    ("model: {model}\nstages:\n  - quantize: {{method: rtn, bits: four}}\n", "stage 1 (quantize, line 3): --bits"),
    ("model: {model}\nstages:\n  - eval: {{}}\n  - quantize: {{method: rtn, output: x}}\n",
     "stage 2 (quantize, line 4): output is set by the recipe"),
    ("model: {model}\nstages:\n  - export: {{format: hf}}\n  - train: {{method: lora, data: {text}}}\n",
     "stage 2 (train, line 4): train cannot follow an export"),
    ("model: {model}\nstages:\n  - quantize: {{method: rtn}}\n  - merge: {{}}\n",
     "stage 2 (merge, line 4): merge folds in the LoRA adapter of a train stage before it; there is none"),
    ("model: {model}\nstages:\n  - train: {{method: prompt, data: {text}}}\n  - merge: {{}}\n",
     "a prompt adapter cannot be merged"),
    ("model: {model}\nstages:\n  - train: {{method: lora, data: {text}}}\n  - quantize: {{method: rtn}}\n",
     "fold it in with a merge stage first"),
    ("model: {model}\nstages:\n  - distill: {{steps: 2, data: {text}}}\n", "the student would be the teacher itself"),
    ("model: {model}\nstages:\n  - train: {{method: lora, data: {text}, steps: 0}}\n", "stage 1 (train, line 3): --steps"),
    ("model: {model}\nstages:\n  - train: {{method: lora, data: {text}, sparsity: 0.5}}\n",
     "--sparsity does not apply to method lora"),
    ("model: {model}\nstages:\n  - quantize: {{method: rtn, data: {text}, budget_bits: 40}}\n",
     "stage 1 (quantize, line 3): --budget-bits 40 is outside"),
])
def test_bad_recipes_fail_in_one_line_before_anything_runs(model_dir, text_file, tmp_path, capsys, body, msg):
    recipe = write(tmp_path, body.format(model=model_dir, text=text_file))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_run_folder_belongs_to_its_recipe(model_dir, text_file, tmp_path, capsys):
    one = write(tmp_path, f"name: one\nmodel: {model_dir}\nstages:\n  - eval: {{data: {text_file}, windows: 1, "
                          "seqlen: 32, speed: false}\n", "one.yaml")
    other = write(tmp_path, one.read_text().replace("name: one", "name: other"), "other.yaml")
    run = tmp_path / "run"
    assert main(["run", str(one), "--output", str(run)]) == 0
    assert main(["run", str(one), "--output", str(run)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["run", str(other), "--output", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "made by recipe 'one'" in err and err.count("\n") == 1
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    assert main(["run", str(one), "--output", str(tmp_path / "plain"), "--resume"]) == 2
    assert "not a recipe's run folder" in capsys.readouterr().err


SHRINK = {   # the shipped recipes' settings scaled to a tiny model and a paragraph of text
    "quantize": {"samples": 4, "seqlen": 32},
    "prune": {"samples": 4, "seqlen": 32},
    "train": {"steps": 2, "seqlen": 32, "batch_size": 2, "save_every": 1},
    "distill": {"steps": 2, "seqlen": 32, "batch_size": 2, "save_every": 1},
    "merge": {"samples": 4, "seqlen": 32, "windows": 0},
    "eval": {"windows": 2, "seqlen": 32, "speed": False},
    "export": {},
}


@pytest.mark.parametrize("name", ["qlora-recover", "minitron", "compress-then-prompt", "fit-budget"])
def test_shipped_recipes_run_end_to_end_on_a_tiny_model(name, text_file, tmp_path):
    """Each recipe under recipes/ as shipped (its stages, methods and their settings), on a tiny Llama with a
    byte-level BPE tokenizer (so the GGUF export runs too), with the sizes of SHRINK and the tiny model in
    place of the default one."""
    from pathlib import Path

    import yaml
    from test_gguf import tiny_bpe

    from conftest import tiny_model

    model = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(str(model), safe_serialization=True)
    tiny_bpe().save_pretrained(str(model))
    doc = yaml.safe_load((Path(__file__).parents[1] / "recipes" / f"{name}.yaml").read_text())
    doc["report"] = {"windows": 2, "seqlen": 32, "speed": False}
    for stage in doc["stages"]:
        (kind, opts), = stage.items()
        opts.update(SHRINK[kind])
        if "prompt_teacher" in opts:
            opts["prompt_teacher"] = str(model)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    run = tmp_path / "run"
    sources = [a for k in doc["data"] for a in ("--data", f"{k}={text_file}")]
    assert main(["run", str(recipe), "--output", str(run), "--model", str(model), *sources]) == 0
    state = json.loads((run / recipes.STATE).read_text())
    assert [s["kind"] for s in state["stages"]] == [next(iter(s)) for s in doc["stages"]]
    assert all(s["done"] for s in state["stages"]) and all(Path(s["output"]).exists() for s in state["stages"])
    evals = [json.loads(Path(s["output"]).read_text()) for s in state["stages"] if s["kind"] == "eval"]
    assert evals and all(e["perplexity"] > 1 for e in evals)
