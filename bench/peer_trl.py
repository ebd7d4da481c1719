"""Distill with TRL's GKD trainer (the distillation peer) on batches written by slimlm's driver; report as JSON.

Runs in the peer venv (bench/setup_peft_peer.sh, then `pip install trl==1.16.0` with torch held at 2.13.0) and
never imports slimlm. The teacher is the model folder; the student is the teacher with every k-th decoder layer
kept (built here with plain transformers: the same layers slimlm's `layers:every-k` keeps), trained by
trl.experimental.gkd.GKDTrainer (TRL 1.16: GKD lives in trl.experimental) with lmbda = 0 (the data's own
sequences, no on-policy generation), its generalized JSD at --beta (0 = forward KL) and --temperature, on the
same windows in the same order (a sequential sampler), AdamW, warmup then cosine, clipping at 1.0.

    bench/.venv-peft/bin/python bench/peer_trl.py --teacher ~/.cache/slimlm/models/smollm2-135m \
        --batches batches.safetensors --eval eval.safetensors --steps 50 --lr 1e-4 --beta 0 --json out.json

Each optimizer step is timed (a callback's clock at every step end); memory is the process's ru_maxrss.
Evaluation: perplexity of the student on the --eval windows, KL(teacher || student) and top-1 agreement per
predicted token, fp32 logits, eval mode.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--every", type=int, default=2, help="keep every k-th decoder layer of the teacher")
    p.add_argument("--batches", required=True, type=Path)
    p.add_argument("--eval", type=Path, default=None)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", required=True, type=Path)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_student(teacher, every: int):
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    keep = list(range(0, len(layers), every))
    student.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


@torch.no_grad()
def evaluate(student, teacher, windows) -> dict:
    student.eval()
    nll = kl = 0.0
    agree = count = 0
    for w in windows:
        ids = w[None]
        ls = F.log_softmax(student(input_ids=ids).logits[0, :-1].float(), -1)
        lt = F.log_softmax(teacher(input_ids=ids).logits[0, :-1].float(), -1)
        nll += F.nll_loss(ls, ids[0, 1:], reduction="sum").item()
        kl += F.kl_div(ls, lt, log_target=True, reduction="sum").item()
        agree += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
        count += ids.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "kl_divergence": kl / count, "top1_agreement": agree / count}


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from safetensors.torch import load_file
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher = AutoModelForCausalLM.from_pretrained(str(a.teacher), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(a.teacher))
    student = build_student(teacher, a.every)
    b = load_file(str(a.batches))
    ids = b["input_ids"][: a.steps]                          # (steps, B, L)
    B = ids.shape[1]
    rows = ids.reshape(-1, ids.shape[-1])
    ds = Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(examples):
        x = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    class Clock(TrainerCallback):
        def __init__(self):
            self.t = [time.perf_counter()]
            self.loss = []

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(logs["loss"])

    class Sequential(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(output_dir=tmp, per_device_train_batch_size=B, max_steps=a.steps, learning_rate=a.lr,
                        lr_scheduler_type="cosine", warmup_steps=max(1, int(0.1 * a.steps)), max_grad_norm=1.0,
                        weight_decay=0.0, lmbda=0.0, beta=a.beta, temperature=a.temperature, logging_steps=1,
                        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                        max_length=ids.shape[-1], seq_kd=False, disable_dropout=True, bf16=False, fp16=False)
        trainer = Sequential(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                             data_collator=collate, processing_class=tok)
        trainer.add_callback(clock)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    steps = [b - a_ for a_, b in zip(clock.t, clock.t[1:])]
    timed = steps[2:] or steps
    result = {"tool": "trl", "versions": {k: md.version(k) for k in ("trl", "transformers", "torch")},
              "python": sys.version.split()[0], "args": {k: str(v) for k, v in vars(a).items()},
              "student_layers": student.config.num_hidden_layers, "train_wall_s": wall, "step_s": steps,
              "step_s_median": statistics.median(timed) if timed else None, "loss": clock.loss,
              "tokens": int(rows.numel()), "peak_rss_mb": peak_rss_mb()}
    if a.eval is not None:
        result["eval"] = evaluate(student, teacher, load_file(str(a.eval))["windows"])
    a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
