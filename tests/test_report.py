"""report.md and its plots: written beside every output that changes a model (with the allocation and the
loss curve where there is one), for a recipe's run with every stage evaluated, redrawn and compared by
`slimlm report`; text only, saying how to get plots, without matplotlib."""
from __future__ import annotations

import builtins
import json

import pytest

from slimlm import report as R
from slimlm.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_commands_write_their_report(model_dir, text_file, tmp_path):
    common = ["--model", str(model_dir), "--data", str(text_file), "--seqlen", "32"]
    q = tmp_path / "q"
    assert main(["quantize", *common, "--samples", "4", "--method", "rtn", "--budget-bits", "3.5",
                 "--output", str(q)]) == 0
    md = (q / "report.md").read_text()
    assert "| quantize |" in md and "allocation under 3.5" in md and "![allocation_quantize]" in md
    assert _is_png(q / "allocation_quantize.png") and _is_png(q / "cost.png")
    t = tmp_path / "t"
    assert main(["train", *common, "--method", "lora", "--steps", "3", "--batch-size", "2", "--output", str(t)]) == 0
    data = json.loads((t / "report.json").read_text())
    assert len(data["curves"]["train"]) == 3 and data["rows"][0]["final_loss"] > 0
    assert _is_png(t / "loss_curves.png")


def test_without_matplotlib_the_report_is_text_and_says_how_to_get_plots(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    R.write(tmp_path, "t", [{"name": "a", "perplexity": 3.0, "disk_mb": 1.0}], curves={"x": [(1, 2.0), (2, 1.0)]})
    md = (tmp_path / "report.md").read_text()
    assert R.PLOTS_MISSING in md and not list(tmp_path.glob("*.png"))


def test_a_recipe_reports_every_stage_and_slimlm_report_redraws_and_compares(model_dir, text_file, tmp_path,
                                                                             capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {model_dir}\ndata: {{text: {text_file}}}\n"
                      "report: {data: text, windows: 2, seqlen: 32, speed: false}\nstages:\n"
                      "  - quantize: {method: rtn, bits: 4, group_size: 32}\n"
                      "  - train: {method: lora, data: text, steps: 2, seqlen: 32, batch_size: 2}\n"
                      "  - merge: {windows: 0}\n")
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--output", str(run)]) == 0
    data = json.loads((run / "report.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["start: tiny-llama", "01-quantize", "02-train", "03-merge"]
    start, quant = data["rows"][0], data["rows"][1]
    assert start["kl_divergence"] == pytest.approx(0, abs=1e-6) and start["top1_agreement"] == 1.0
    assert quant["kl_divergence"] > 0 and quant["disk_mb"] < start["disk_mb"] and quant["peak_rss_mb"] > 0
    assert _is_png(run / "size_quality.png") and _is_png(run / "loss_curves.png")
    first = (run / "report.md").read_text()
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.md").read_text() == first
    assert main(["run", str(recipe), "--output", str(run), "--resume"]) == 0       # reused, evaluations too
    assert json.loads((run / "report.json").read_text())["rows"] == data["rows"]
    recipe.write_text(recipe.read_text().replace("windows: 2", "windows: 3"))      # other report settings:
    assert main(["run", str(recipe), "--output", str(run), "--resume"]) == 0       # the stages are reused,
    assert json.loads((run / "report" / "01-quantize.json").read_text())["eval"]["windows"] == 3   # re-evaluated
    both = tmp_path / "both"
    assert main(["report", str(run), str(run / "01-quantize"), "--output", str(both)]) == 0
    rows = json.loads((both / "report.json").read_text())["rows"]
    assert "run: 01-quantize" in [r["name"] for r in rows] and "01-quantize: quantize" in [r["name"] for r in rows]
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2 and "holds no report.json" in capsys.readouterr().err
