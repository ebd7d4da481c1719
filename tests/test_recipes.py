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
    assert "stage 1 (quantize, line 6): done before" in out and "continuing its checkpoint" in out
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
     "stage 2 (merge, line 4): merge folds in the adapter of the train stage"),
    ("model: {model}\nstages:\n  - distill: {{steps: 2, data: {text}}}\n", "the student would be the teacher itself"),
    ("model: {model}\nstages:\n  - train: {{method: lora, data: {text}, steps: 0}}\n", "stage 1 (train, line 3): --steps"),
    ("model: {model}\nstages:\n  - train: {{method: lora, data: {text}, sparsity: 0.5}}\n",
     "--sparsity does not apply to method lora"),
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
