"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""
import json
import subprocess
import sys

import pytest

from slimlm.cli import main

from conftest import TEXT, plain_agreement, text_windows, tiny_model


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "eval" in out and "quantize" in out and "prune" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "0.1.0" in out


@pytest.mark.parametrize("argv,match", [
    (["frobnicate"], "No such command"),
    (["eval", "--bogus"], "No such option"),
    (["eval", "--model", "/does/not/exist"], "does not exist"),
    (["eval", "--windows", "0"], "at least 1"),
    (["eval", "--windows", "many"], "positive integer or 'all'"),
])
def test_bad_input_is_one_line(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_on_a_local_model(capsys, model_dir, text_file, tmp_path):
    """--reference names another model folder (seed 1): the KL and top-1 agreement printed are those
    computed here from the two models' log-softmaxes over the same windows."""
    reference = tiny_model("llama", seed=1)
    reference.save_pretrained(str(tmp_path / "reference"), safe_serialization=True)
    code, out, err = run(capsys, "eval", "--model", str(model_dir), "--data", str(text_file), "--windows", "3",
                         "--seqlen", "64", "--no-speed", "--json", "--reference", str(tmp_path / "reference"))
    assert code == 0, err
    r = json.loads(out)
    assert r["windows"] == 3 and r["tokens"] == 3 * 63
    assert r["disk_bytes"] > 0 and r["parameters"] > 0
    kl, top1 = plain_agreement(tiny_model("llama"), reference, text_windows(TEXT, 64, 3))
    assert kl > 0.01 and top1 < 1.0
    assert r["kl_divergence"] == pytest.approx(kl, rel=1e-4) and r["top1_agreement"] == top1


@pytest.mark.parametrize("make,match", [
    (lambda d, t: ["--model", str(d), "--data", str(t), "--seqlen", "100000"], "longer than the model's context"),
    (lambda d, t: ["--model", str(d), "--data", str(t), "--seqlen", "4096", "--windows", "1"], "context"),
    (lambda d, t: ["--model", str(t.parent), "--data", str(t)], "holds no model"),
])
def test_eval_input_errors(capsys, model_dir, text_file, make, match):
    code, _, err = run(capsys, "eval", *make(model_dir, text_file))
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_short_text(capsys, model_dir, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("too short", encoding="utf-8")
    code, _, err = run(capsys, "eval", "--model", str(model_dir), "--data", str(p), "--seqlen", "64")
    assert code == 2 and "fewer than one window" in err


def test_console_script_exit_code_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slimlm.cli", "eval", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("slimlm: error:")


def test_demo_makes_its_output_parent_before_any_work(monkeypatch, tmp_path):
    """Regression: in a fresh clone out/ does not exist; the demo failed on it only after quantizing."""
    from slimlm import models

    def stop(*_a, **_k):
        raise RuntimeError("stopped before loading")
    monkeypatch.setattr(models, "load_model", stop)
    target = tmp_path / "out" / "nested" / "demo-model"
    with pytest.raises(RuntimeError, match="stopped before loading"):
        main(["demo", "--output", str(target)])
    assert target.parent.is_dir() and not target.exists()



@pytest.mark.parametrize("argv,match", [
    (["eval", "--device", "cuda"], "PyTorch sees no CUDA GPU"),
    (["eval", "--device", "tpu"], "--device takes cpu, cuda or cuda:N"),
    (["eval", "--dtype", "float64"], "--dtype takes one of float32, bfloat16, float16"),
    (["quantize", "--method", "rtn", "--device", "cuda:3", "--output", "o"], "PyTorch sees no CUDA GPU"),
    (["merge", "--model", "m", "--adapter", "a", "--output", "o", "--device", "cuda"], "PyTorch sees no CUDA GPU"),
    (["merge", "--model", "m", "--adapter", "a", "--output", "o", "--dtype", "int8"], "--dtype takes one of"),
])
def test_device_and_dtype_are_checked_in_one_line(capsys, argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "quantize", "prune", "train", "merge", "demo"])
def test_every_command_that_computes_takes_a_device(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "--device" in out


def test_eval_loads_in_the_asked_dtype(capsys, model_dir, text_file):
    code, out, _ = run(capsys, "eval", "--model", str(model_dir), "--data", str(text_file), "--windows", "2",
                       "--seqlen", "32", "--no-speed", "--json", "--dtype", "bfloat16")
    assert code == 0
    res = json.loads(out)
    fp32 = tiny_model("llama")
    buffers = sum(b.numel() * b.element_size() for b in fp32.buffers())      # rotary tables stay fp32
    assert res["resident_bytes"] == sum(p.numel() * 2 for p in fp32.parameters()) + buffers
