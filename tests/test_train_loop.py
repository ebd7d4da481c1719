"""The training loop: determinism, checkpoints and exact resume after kill -9, Ctrl-C, gradient accumulation,
two data-parallel processes against one with the doubled batch, the report and the metrics log."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from slimlm import api
from slimlm.adapt.methods import FullConfig, TopConfig
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.training import data as TD
from slimlm.training.config import TrainConfig

from conftest import TEXT, StopAt, random_windows, tiny_model

ENV = {**os.environ, "SLIMLM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def windows_data(steps: int, batch: int, seqlen: int = 32, seed: int = 0):
    return TD.text_windows(random_windows(200, 64, seed).reshape(-1), seqlen=seqlen, batch_size=batch,
                           batches=steps, seed=seed)


def losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def cli_train(folder, out, *extra, steps=6):
    return [sys.executable, "-m", "slimlm", "train", "--model", str(folder), "--method", "top", "--layers", "1",
            "--data", str(folder / "text.txt"), "--seqlen", "32", "--batch-size", "2", "--steps", str(steps),
            "--lr", "1e-3", "--output", str(out), *extra]


@pytest.fixture
def run_dir(model_dir):
    (model_dir / "text.txt").write_text(TEXT * 5)
    return model_dir


def test_same_run_twice_gives_the_same_losses_and_every_step_is_logged(tmp_path):
    cfg = TrainConfig(steps=5, seqlen=32, batch_size=2, lr=1e-3, eval_every=2, eval_windows=2)
    reports = []
    for name in ("a", "b"):
        rep = api.train(tiny_model("llama"), TopConfig(layers=1), windows_data(5, 2), cfg, output=tmp_path / name,
                        eval_data=random_windows(2, 32, 9), progress=False)
        reports.append(rep)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr", "tokens", "seconds"} <= set(r) for r in rows)
    assert [("eval_perplexity" in r) for r in rows] == [False, True, False, True, True]
    assert rows[-1]["eval_perplexity"] == reports[0]["eval_perplexity_after"]
    # 10% warmup of 5 steps is none: cosine from the first step
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)])
    assert not (tmp_path / "a.partial").exists()


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """4 windows in one micro-batch, or 2 micro-batches of 2: the same mean over the step's tokens."""
    one = api.train(tiny_model("llama"), FullConfig(), windows_data(4, 4), TrainConfig(steps=4, seqlen=32, batch_size=4,
                    lr=1e-3), output=tmp_path / "one", progress=False)
    two = api.train(tiny_model("llama"), FullConfig(), windows_data(8, 2), TrainConfig(steps=4, seqlen=32, batch_size=2,
                    grad_accum=2, lr=1e-3), output=tmp_path / "two", progress=False)
    assert one["final_loss"] == pytest.approx(two["final_loss"], abs=1e-5)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)


def test_kill_9_then_resume_logs_the_same_losses(run_dir, tmp_path):
    whole = subprocess.run(cli_train(run_dir, tmp_path / "whole", steps=40), env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_train(run_dir, out, "--save-every", "4", steps=40), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_json = tmp_path / "killed.partial" / "checkpoint" / "run.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (run_json.is_file() and json.loads(run_json.read_text())["step"] >= 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed; make it longer"
    saved = json.loads(run_json.read_text())["step"]
    assert 8 <= saved < 40
    resumed = subprocess.run(cli_train(run_dir, out, "--save-every", "4", "--resume", steps=40), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(tmp_path / "whole")          # bit for bit, steps before and after the kill
    assert not (tmp_path / "killed.partial").exists()
    report = json.loads((out / "train_report.json").read_text())
    assert report["resumed_at"] == saved


def test_ctrl_c_writes_a_checkpoint_and_no_output(run_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli_train(run_dir, out, steps=400), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out.partial" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]                # above it: the progress bar
    assert last.startswith("slimlm: interrupted after step") and "--resume" in last, err
    assert not out.exists()
    step = json.loads((tmp_path / "out.partial" / "checkpoint" / "run.json").read_text())["step"]
    assert step >= 3 and len(metrics.read_text().splitlines()) == step
    # without --resume the interrupted run is not silently discarded
    again = subprocess.run(cli_train(run_dir, out, steps=400), env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_one_with_the_doubled_batch(run_dir, tmp_path, launcher):
    one = subprocess.run(cli_train(run_dir, tmp_path / "one", "--batch-size", "4", steps=4), env=ENV,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    args = cli_train(run_dir, tmp_path / "two", steps=4)[3:]            # after "-m slimlm"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "slimlm",
               *args]
    else:
        # accelerate's --cpu runs one process (its multi-CPU mode needs MPI); --multi_gpu starts the processes
        # through torchrun, and slimlm joins them with gloo on a CPU
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "slimlm", *args]
    two = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    report = json.loads((tmp_path / "two" / "train_report.json").read_text())
    assert report["processes"] == 2 and report["world"] == 2


def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):
    outs = tmp_path / "outs"
    outs.mkdir()
    base = ["train", "--model", str(run_dir), "--method", "top", "--data", str(run_dir / "text.txt"),
            "--output", str(outs / "o"), "--seqlen", "32"]
    for extra, match in [(["--lr", "0"], "--lr must be a positive number"),
                         (["--steps", "0"], "--steps must be at least 1"),
                         (["--steps", "2", "--tokens", "9"], "either --steps or --tokens"),
                         (["--layers", "9"], "more than the model's 2 decoder layers"),
                         (["--resume"], "no checkpoint"),
                         (["--optimizer", "lion"], "--optimizer must be one of")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not list(outs.iterdir()), extra


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    data = windows_data(6, 2)
    cfg = TrainConfig(steps=6, seqlen=32, batch_size=2, save_every=2)
    model = tiny_model("llama")
    api.train(model, TopConfig(layers=1), data, TrainConfig(steps=2, seqlen=32, batch_size=2), progress=False)
    from slimlm.training import checkpoint as C
    from slimlm.training.loop import train as loop
    from slimlm.training.plan import TrainPlan

    plan = TrainPlan(params={"w": torch.nn.Parameter(torch.zeros(2))}, save=lambda *a: None)
    C.save(tmp_path / "o.partial", 2, {"model": "m", "method": "top", "method_config": {"layers": 1}, "data": None,
                                       "world": 1, "batch_size": 2, "grad_accum": 1, "seqlen": 32, "seed": 0},
           {"w": torch.zeros(2)}, torch.optim.SGD(plan.params.values(), lr=0.1))
    with pytest.raises(SlimlmError, match="another run .method was 'top', now 'full'"):
        loop(model, plan, data, cfg, output=tmp_path / "o", resume=True, progress=False,
             run={"model": "m", "method": "full", "method_config": {}, "data": None})


def test_train_command_reports_the_allocator_it_ran_on(run_dir, tmp_path):
    """`slimlm train` as a process: SLIMLM_ALLOCATOR=system keeps glibc's malloc; auto re-executes under
    tcmalloc exactly when this machine has one; the report names what the loop ran on, and the losses agree."""
    from slimlm.hardware import find_tcmalloc
    curves = []
    for choice in ("system", "auto"):
        out = tmp_path / choice
        done = subprocess.run(cli_train(run_dir, out, steps=2), env={**ENV, "SLIMLM_ALLOCATOR": choice},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        report = json.loads((out / "train_report.json").read_text())
        assert report["allocator"] == ("tcmalloc" if choice == "auto" and find_tcmalloc() else "glibc")
        curves.append(losses(out))
    assert curves[1] == pytest.approx(curves[0], abs=1e-5)
    bad = subprocess.run(cli_train(run_dir, tmp_path / "bad", steps=2), env={**ENV, "SLIMLM_ALLOCATOR": "fast"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "slimlm: error: SLIMLM_ALLOCATOR='fast': use auto, tcmalloc or system"]
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_training_allocator_env(tmp_path, monkeypatch):
    """Which environment a training process is re-executed under (a pure decision; nothing is executed)."""
    from slimlm import hardware as H
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(H, "allocator_in_use", lambda: "glibc")
    monkeypatch.setattr(sys, "platform", "linux")
    env = H.training_allocator_env({"SLIMLM_TCMALLOC": str(lib), "LD_PRELOAD": "/x/other.so"})
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so"
    assert H.training_allocator_env({"SLIMLM_TCMALLOC": str(lib), "SLIMLM_ALLOCATOR": "system"}) is None
    assert H.training_allocator_env({"SLIMLM_TCMALLOC": str(lib), "LD_PRELOAD": str(lib)}) is None  # no loop
    assert H.training_allocator_env({"SLIMLM_TCMALLOC": str(tmp_path / "none.so")}) is None
    with pytest.raises(SlimlmError, match="apt install libtcmalloc-minimal4"):
        H.training_allocator_env({"SLIMLM_TCMALLOC": str(tmp_path / "none.so"), "SLIMLM_ALLOCATOR": "tcmalloc"})
    monkeypatch.setattr(H, "allocator_in_use", lambda: "tcmalloc")
    assert H.training_allocator_env({"SLIMLM_TCMALLOC": str(lib)}) is None




def test_adamw8bit_state_is_checkpointed_and_resumed_exactly(tmp_path):
    """bitsandbytes keeps a nested dict of tensors in each parameter's state: the checkpoint holds it, and an
    interrupted run resumed from it logs the losses of an uninterrupted one."""
    from slimlm.errors import Interrupted
    cfg = TrainConfig(steps=6, seqlen=32, batch_size=2, lr=1e-3, optimizer="adamw8bit")
    api.train(tiny_model("llama"), FullConfig(), windows_data(6, 2), cfg, output=tmp_path / "whole", progress=False)
    with pytest.raises(Interrupted):
        api.train(tiny_model("llama"), FullConfig(), StopAt(windows_data(6, 2), 3), cfg, output=tmp_path / "cut",
                  progress=False)
    ck = tmp_path / "cut.partial" / "checkpoint"
    from safetensors.torch import load_file
    assert any("/" in k for k in load_file(str(ck / "optimizer.safetensors")))       # the nested quant state
    assert json.loads((ck / "run.json").read_text())["step"] == 3
    api.train(tiny_model("llama"), FullConfig(), windows_data(6, 2), cfg, output=tmp_path / "cut", resume=True,
              progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_lora_from_the_command_line_is_a_peft_folder_peft_loads(run_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    import slimlm
    out = tmp_path / "lora"
    assert main(["train", "--model", str(run_dir), "--method", "lora", "--targets", "all-linear", "--r", "4",
                 "--dora", "true", "--data", str(run_dir / "text.txt"), "--seqlen", "32", "--batch-size", "2",
                 "--steps", "3", "--lr", "1e-2", "--output", str(out)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "train_report.json"} <= {
        f.name for f in out.iterdir()}
    assert len(losses(out)) == 3
    ids = random_windows(2, 16, seed=4)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(run_dir)), str(out)).eval()
    ours = slimlm.load_model(str(out))                     # an adapter folder loads as base + adapter
    base = slimlm.load_model(str(run_dir))
    with torch.no_grad():
        a, b, c = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3                      # the adapter was trained: not the base


def test_qlora_started_from_the_float_model_from_the_command_line(run_dir, tmp_path, capsys):
    """--init-from: QLoRA on a 3-bit base whose adapters start at the residual to the float model it was made
    from: the first step's loss is below the zero-start run's, the report says how much of the residual the
    start leaves, and a reference of other shapes is refused in one line with nothing written."""
    q = tmp_path / "q3"
    assert main(["quantize", "--model", str(run_dir), "--method", "rtn", "--bits", "3", "--group-size", "16",
                 "--output", str(q)]) == 0
    common = ["train", "--model", str(q), "--method", "lora", "--targets", "all-linear", "--r", "4",
              "--data", str(run_dir / "text.txt"), "--seqlen", "32", "--batch-size", "2", "--steps", "2",
              "--lr", "1e-3"]
    assert main(common + ["--output", str(tmp_path / "zero")]) == 0
    assert main(common + ["--init-from", str(run_dir), "--init-samples", "4", "--output", str(tmp_path / "ref")]) == 0
    assert losses(tmp_path / "ref")[0] < losses(tmp_path / "zero")[0]
    chat = tmp_path / "chat.jsonl"                       # instruction batches: padded, each to its own width
    chat.write_text("".join(json.dumps({"prompt": "Q " * (2 + i), "response": "A " * (1 + i)}) + "\n"
                            for i in range(6)))
    assert main(common[:common.index("--data")] + ["--data", str(chat), "--seqlen", "32", "--batch-size", "2",
                                                   "--steps", "2", "--lr", "1e-3", "--init-from", str(run_dir),
                                                   "--output", str(tmp_path / "chat")]) == 0
    info = json.loads((tmp_path / "ref" / "train_report.json").read_text())
    assert 0 < info["init_residual_left_mean"] < 1, info
    capsys.readouterr()
    other = tmp_path / "other"
    tiny_model("gpt2").save_pretrained(str(other), safe_serialization=True)
    assert main(common + ["--init-from", str(other), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "give the model this base was made from" in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_instruction_jsonl_from_the_command_line(run_dir, tmp_path):
    rows = [{"prompt": f"Q{i}?", "response": f" A{i}."} for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "inst"
    assert main(["train", "--model", str(run_dir), "--method", "top", "--layers", "1", "--data", str(data),
                 "--seqlen", "32", "--batch-size", "2", "--steps", "3", "--lr", "1e-3", "--output", str(out)]) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["data"]["kind"] == "instruction" and len(losses(out)) == 3
    assert all(math.isfinite(x) and x > 0 for x in losses(out))   # response tokens were scored


def test_activation_checkpointing_recomputes_and_gives_the_same_losses(tmp_path):
    runs = {}
    for on in (False, True):
        model = tiny_model("llama")
        calls, mlp = [], model.model.layers[0].mlp
        forward = mlp.forward

        def counted(*a, _forward=forward, _calls=calls, **k):
            _calls.append(1)
            return _forward(*a, **k)
        mlp.forward = counted
        api.train(model, FullConfig(), windows_data(3, 2), TrainConfig(steps=3, seqlen=32, batch_size=2, lr=1e-3,
                  checkpointing=on), output=tmp_path / str(on), progress=False)
        runs[on] = (losses(tmp_path / str(on)), len(calls))
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    assert runs[False][1] == 3 and runs[True][1] == 6      # the layer ran again in each backward


def test_gradient_clipping_bounds_the_update(tmp_path):
    """SGD (no normalisation of the gradient's scale) with the global norm clipped to 1e-6: every step moves
    the weights by at most lr * 1e-6 * (1 + momentum + ...), against a far larger move unclipped."""
    moved = {}
    for clip in (0.0, 1e-6):
        model = tiny_model("llama")
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        api.train(model, FullConfig(), windows_data(3, 2), TrainConfig(steps=3, seqlen=32, batch_size=2, lr=0.1,
                  optimizer="sgd", max_grad_norm=clip, warmup=0), output=tmp_path / str(clip), progress=False)
        moved[clip] = torch.cat([(p.detach() - w0[n]).flatten() for n, p in model.named_parameters()]).norm().item()
    assert moved[1e-6] <= 0.1 * 1e-6 * (1 + 2 + 3) * 1.001  # momentum 0.9: at most 1, 1.9, 2.71 steps' worth
    assert moved[0.0] > 1e3 * moved[1e-6]
