"""The training benchmark of ../shared/BENCHMARKS.md ("Training, adaptation and distillation"), slimlm beside
PEFT + transformers (bench/peer_peft.py in its own venv, bench/setup_peft_peer.sh), one results file:
bench/results/training.json.

    python bench/train.py prepare                 # batches, evaluation windows and quantized/pruned bases
    python bench/train.py time [--repeats 3]      # short runs, slimlm and the peer alternating: step time, peak
    python bench/train.py quality [--only ...]    # one run at the budget per case: loss curve, perplexity
    python bench/train.py table

Data: the three training novels tokenized whole and joined (Sense and Sensibility, Emma, Mansfield Park);
windows of 512 tokens at random offsets after seed 0, batch 4 (2,048 tokens a step); the same batches for
every case and tool (written once to a safetensors file the peer reads). Evaluation: perplexity on the quick
protocol (32 windows of 512) of both evaluation texts, before and after. Optimizer: AdamW, 10% linear warmup
then cosine decay, gradient clipping at 1.0, no weight decay, learning rate per method (LR below, chosen on
the short sweep recorded in bench/RESULTS.md). Every run is a fresh process, so peak RSS is the run's own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

WORK = Path(os.environ.get("SLIMLM_BENCH_WORK", Path.home() / ".cache" / "slimlm" / "bench-train"))
PEER_PY = P.ROOT / "bench" / ".venv-peft" / "bin" / "python"
TRAIN_TEXTS = ("austen_sensesensibility.txt", "austen_emma.txt", "austen_mansfieldpark.txt")
BATCH, SEQLEN, STEPS = 4, 512, 200
R, ALPHA = 16, 32
LR = {"lora": 1e-3, "full": 5e-5, "prompt": 1e-2, "ptuning": 1e-3, "prefix": 1e-3, "ptuning-v2": 1e-2,
      "qat": 5e-5, "movement": 5e-5, "layerdrop": 5e-5, "gum": 5e-5,
      "intrinsic": 1e-3}
INTRINSIC_DIMS = (100, 1000, 10000, 30000, 100000)     # the d sweep (d90 from these, beside full and LoRA)
VIRTUAL, ENC_HIDDEN = 20, 576          # prompt methods: virtual tokens; P-tuning / prefix MLP width (the model's)

# case -> (base folder under WORK or "fp32", slimlm method options, the peer's mode or None)
CASES = {
    "lora_qv": ("fp32", {"method": "lora", "targets": "q_proj,v_proj"}, "lora-qv"),
    "lora_all": ("fp32", {"method": "lora", "targets": "all-linear"}, "lora-all"),
    "lora_all_ckpt": ("fp32", {"method": "lora", "targets": "all-linear", "checkpointing": True}, None),
    "lora_all_lowmem": ("fp32", {"method": "lora", "targets": "all-linear", "release_memory": True}, None),
    "qlora_nf4": ("nf4", {"method": "lora", "targets": "all-linear"}, "qlora-nf4"),
    "qlora_gptq4": ("gptq_w4g64", {"method": "lora", "targets": "all-linear"}, None),
    "qlora_gptq3": ("gptq_w3g64", {"method": "lora", "targets": "all-linear"}, None),
    # the adapters start at the input-weighted rank-16 residual to the fp32 model (LoftQ / QERA start)
    "qlora_gptq3_init": ("gptq_w3g64", {"method": "lora", "targets": "all-linear", "init_from": "fp32"}, None),
    "lora_structured20": ("structured_20", {"method": "lora", "targets": "all-linear"}, None),
    "full": ("fp32", {"method": "full"}, "full"),
    "prompt": ("fp32", {"method": "prompt", "num_virtual_tokens": VIRTUAL}, "prompt"),
    "ptuning": ("fp32", {"method": "ptuning", "num_virtual_tokens": VIRTUAL, "encoder_hidden_size": ENC_HIDDEN},
                "ptuning"),
    "prefix": ("fp32", {"method": "prefix", "num_virtual_tokens": VIRTUAL, "encoder_hidden_size": ENC_HIDDEN},
               "prefix"),
    "ptuning_v2": ("fp32", {"method": "ptuning-v2", "num_virtual_tokens": VIRTUAL}, "ptuning-v2"),
    "adapter_houlsby": ("fp32", {"method": "adapter", "style": "houlsby", "reduction_factor": 16}, None),
    "qat_w3g64": ("fp32", {"method": "qat", "bits": 3, "group_size": 64}, None),
    "qat_from_gptq3": ("gptq_w3g64", {"method": "qat", "lr": 1e-4}, None),    # GPTQ's grid and codes at step 0
    "movement_70": ("fp32", {"method": "movement", "sparsity": "0.7"}, None),
    "magnitude_70_ft": ("magnitude_70", {"method": "full"}, None),     # the zeros stay (adapt.methods._plan)
    "movement_70_adam": ("fp32", {"method": "movement", "sparsity": "0.7", "scores": "adam"}, None),
    "movement_90": ("fp32", {"method": "movement", "sparsity": "0.9"}, None),
    "movement_90_adam": ("fp32", {"method": "movement", "sparsity": "0.9", "scores": "adam"}, None),
    "magnitude_90_ft": ("magnitude_90", {"method": "full"}, None),
    "layerdrop": ("fp32", {"method": "layerdrop", "layerdrop": 0.2}, None),
    # structured: 20% of the MLP neurons removed, the same fine-tuning budget (GUM prunes while it fine-tunes)
    # Adam moves each of the d coordinates by about lr a step, so a weight moves by about lr * sqrt(d / D_i)
    # (P's entries have variance 1/D_i): lr = 0.1 / sqrt(d) keeps an MLP weight's step (D_i = 884,736) near
    # 1e-4, twice full fine-tuning's, at every d (lr 1e-2 at d = 1000 raised the loss from 3.52 to 5.61 in a step)
    **{f"intrinsic_d{d}": ("fp32", {"method": "intrinsic", "dim": d, "lr": float(f"{0.1 / d ** 0.5:.1e}")}, None)
       for d in INTRINSIC_DIMS},
    "gum_20": ("fp32", {"method": "gum", "ratio": 0.2}, None),
    "gum_20_layer": ("fp32", {"method": "gum", "ratio": 0.2, "selection": "layer"}, None),   # the regularizer alone
    "movement_struct20": ("fp32", {"method": "gum", "ratio": 0.2, "uniqueness": 0.0, "selection": "layer"}, None),
    "magnitude_struct20_ft": ("magstruct_20", {"method": "full"}, None),
    "qat_lora_gptq3": ("gptq_w3g64", {"method": "qat", "lora_r": R, "lora_alpha": ALPHA, "lr": 1e-3}, None),
    "activation_struct20_ft": ("actstruct_20", {"method": "full"}, None),
    # compress, then prompt: a soft prompt on the compressed model trained towards the fp32 model (KL)
    "prompt_recover_gptq3": ("gptq_w3g64", {"method": "prompt", "num_virtual_tokens": VIRTUAL,
                                            "prompt_teacher": "fp32"}, None),
    # the most virtual tokens within the target's 0.01% of the parameters: 23 x 576 = 13,248 of 134,515,008
    "prompt_recover_gptq3_23": ("gptq_w3g64", {"method": "prompt", "num_virtual_tokens": 23,
                                               "prompt_teacher": "fp32"}, None),
    "prompt_recover_sparsegpt50": ("sparsegpt_50", {"method": "prompt", "num_virtual_tokens": VIRTUAL,
                                                    "prompt_teacher": "fp32"}, None),
}
BASES = {   # folder -> slimlm command that makes it from the default model
    "nf4": ["quantize", "--method", "nf4"],
    "gptq_w4g64": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64"],
    "gptq_w3g64": ["quantize", "--method", "gptq", "--bits", "3", "--group-size", "64"],
    "structured_20": ["prune", "--method", "structured", "--ratio", "0.2"],
    "magnitude_70": ["prune", "--method", "magnitude", "--sparsity", "0.7"],
    "magnitude_90": ["prune", "--method", "magnitude", "--sparsity", "0.9"],
    "sparsegpt_50": ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
    # 20% of the MLP neurons (307 of 1536 in each of the 30 layers; no heads): 307 * 3 * 576 * 30 / 134,515,008
    "magstruct_20": ["prune", "--method", "structured", "--importance", "magnitude", "--ratio", "0.1183",
                     "--head-fraction", "0"],
    "actstruct_20": ["prune", "--method", "structured", "--importance", "activation", "--ratio", "0.1183",
                     "--head-fraction", "0"],
}


def base_path(base: str) -> str:
    if base == "fp32":
        from slimlm.models import embedded_folder
        return str(embedded_folder(P.MODEL))
    return str(WORK / base)


# ------------------------------------------------------------------------------------------------ prepare
def prepare(steps: int, bases: list[str] | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    import slimlm
    from slimlm import data as D
    from slimlm.training import data as TD

    WORK.mkdir(parents=True, exist_ok=True)
    tok = slimlm.load_tokenizer(P.MODEL)
    ids = TD.training_text(tok, [P.corpus(t) for t in TRAIN_TEXTS])
    data = TD.text_windows(ids, seqlen=SEQLEN, batch_size=BATCH, batches=steps, seed=0)
    batches = [data.batch(i) for i in range(steps)]
    save_file({"input_ids": torch.stack([b["input_ids"] for b in batches]),
               "labels": torch.stack([b["labels"] for b in batches])}, str(WORK / "batches.safetensors"))
    for name, f in P.EVAL_TEXTS.items():
        win = D.eval_windows(D.tokenize(tok, D.load_text(P.corpus(f))), SEQLEN, P.QUICK_WINDOWS)
        save_file({"windows": win}, str(WORK / f"eval_{name}.safetensors"))
    for base, cmd in BASES.items():
        if (WORK / base / "config.json").is_file() or (bases is not None and base not in bases):
            continue
        full = [sys.executable, "-m", "slimlm", *cmd, "--data", P.corpus(P.CALIB_TEXT), "--samples",
                str(P.CALIB_SAMPLES), "--seqlen", str(SEQLEN), "--output", str(WORK / base), "--threads", str(P.THREADS)]
        print("bench:", " ".join(full[2:]), flush=True)
        subprocess.run(full, check=True)
    print(f"bench: {steps} batches of {BATCH} x {SEQLEN} and the bases are in {WORK}", flush=True)


class FileBatches:
    """TrainData over the prepared batches file (what the peer reads too)."""

    def __init__(self, path: Path, steps: int) -> None:
        from safetensors.torch import load_file

        t = load_file(str(path))
        self.ids, self.labels, self.steps = t["input_ids"][:steps], t["labels"][:steps], steps

    def __len__(self) -> int:
        return self.steps

    def batch(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}

    def describe(self) -> dict:
        return {"kind": "bench batches", "steps": self.steps, "batch": BATCH, "seqlen": SEQLEN}


class SplitBatches(FileBatches):
    """The same steps for `parts` data-parallel processes: step s's 4 windows as `parts` micro-batches of
    4 / parts, in the order the loop asks for them (index parts * s + rank)."""

    def __init__(self, path: Path, steps: int, parts: int) -> None:
        super().__init__(path, steps)
        self.parts = parts

    def __len__(self) -> int:
        return self.steps * self.parts

    def batch(self, i: int) -> dict:
        s, k = divmod(i, self.parts)
        n = BATCH // self.parts
        return {"input_ids": self.ids[s][k * n:(k + 1) * n], "labels": self.labels[s][k * n:(k + 1) * n]}


# ------------------------------------------------------------------------------------------------ one run
def run_one(case: str, steps: int, run_steps: int, evaluate: bool, out: str | None, lr: float | None = None) -> dict:
    """In this process: one slimlm run of `case` (its schedule `steps` long, `run_steps` of it run)."""
    import torch
    from safetensors.torch import load_file

    import slimlm
    from slimlm import metrics as M
    from slimlm.configs import build_config
    from slimlm.registry import get

    torch.set_num_threads(P.THREADS)
    base, opts, _ = CASES[case]
    opts = dict(opts)
    case_lr = opts.pop("lr", None)                         # a case's own learning rate, else the method's
    method = get("train", opts.pop("method"))
    train_opts = {k: opts.pop(k) for k in list(opts) if k in ("checkpointing", "release_memory")}
    if method.name == "lora":
        opts.update(r=R, alpha=ALPHA)
    for k in ("prompt_teacher", "init_from"):
        if opts.get(k) == "fp32":
            opts[k] = base_path("fp32")
    config = build_config(method.config_cls, opts, method.name)
    lr = lr or case_lr or LR.get(method.name, LR["lora"])
    cfg = slimlm.TrainConfig(steps=steps, seqlen=SEQLEN, batch_size=BATCH, lr=lr, **train_opts)
    t0 = time.perf_counter()
    model = slimlm.load_model(base_path(base))
    load_s = time.perf_counter() - t0
    rss_loaded = M.peak_rss_bytes() / 2**20
    evals = {name: load_file(str(WORK / f"eval_{name}.safetensors"))["windows"] for name in P.EVAL_TEXTS}
    row: dict = {"case": case, "tool": "slimlm", "base": base, "lr": lr, "steps": steps, "run_steps": run_steps,
                 "load_s": load_s, "peak_rss_mb_after_load": rss_loaded}
    if evaluate:
        row["ppl_before"] = {n: M.score(model, w, progress=False)["perplexity"] for n, w in evals.items()}
    world = int(os.environ.get("WORLD_SIZE", "1"))          # under torchrun: this process's share of each step
    data = (FileBatches(WORK / "batches.safetensors", run_steps) if world == 1
            else SplitBatches(WORK / "batches.safetensors", run_steps, world))
    cfg.batch_size = BATCH // world
    from slimlm import api
    # a timing run runs the first run_steps batches as a run of its own (the step time does not depend on the
    # schedule's length)
    cfg.steps = run_steps
    report = api.train(model, config, data, cfg, output=Path(out) if out else None, progress=False,
                       model_ref=base_path(base))
    row["peak_rss_mb"] = M.peak_rss_bytes() / 2**20
    if out:
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        row["loss"] = [r["loss"] for r in rows]
        row["step_s"] = [r["seconds"] for r in rows]
        row["saved_bytes"] = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
        row["trainable_parameters"] = report["trainable_parameters"]
        row["allocator"] = report.get("allocator")
        row["lr"] = max(r["lr"] for r in rows)  # the schedule's peak as the loop logged it
    if evaluate:
        row["ppl_after"] = {n: M.score(model, w, progress=False)["perplexity"] for n, w in evals.items()}
    if evaluate and out and base.startswith("gptq") and method.name == "lora":
        row["merged"] = merged_figures(base, out, evals)
    return row


def merged_figures(base: str, adapter: str, evals: dict) -> dict:
    """The adapter merged into its packed base, re-quantized by RTN on the stored grid and by GPTQ: the
    merge's own error against the unmerged model, and the merged model's perplexity on both texts."""
    import slimlm
    from slimlm import api
    from slimlm import metrics as M

    tok = slimlm.load_tokenizer(P.MODEL)
    calib = api.calibration_data(tok, P.corpus(P.CALIB_TEXT), samples=P.CALIB_SAMPLES, seqlen=SEQLEN)
    out = {}
    for how in ("rtn", "gptq"):
        model = slimlm.load_model(base_path(base))
        t0 = time.perf_counter()
        rep = api.merge(model, adapter, requantize=how, calibration=calib if how == "gptq" else None,
                        eval_data=evals["persuasion"][:8], progress=False)
        out[how] = {"merge_s": time.perf_counter() - t0, **{k: rep[k] for k in (
            "merge_kl_divergence", "merge_top1_agreement", "perplexity_unmerged", "perplexity_merged")},
            "ppl": {n: M.score(model, w, progress=False)["perplexity"] for n, w in evals.items()}}
    return out


def _child(args: list[str]) -> dict:
    """A slimlm run in a new process, under the allocator `slimlm train` would choose on this machine
    (hardware.training_allocator_env: tcmalloc where installed, unless SLIMLM_ALLOCATOR=system)."""
    from slimlm.hardware import training_allocator_env
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=training_allocator_env())
    if done.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peer(mode: str, steps: int, run_steps: int, evaluate: bool, tcmalloc: bool = False) -> dict:
    """The PEFT run, on glibc's malloc as a plain `python` process gets it, or with tcmalloc preloaded (to
    show what the allocator alone does for the peer)."""
    out = WORK / f"peer_{mode}_{run_steps}{'_tcmalloc' if tcmalloc else ''}.json"
    cmd = [str(PEER_PY), str(P.ROOT / "bench" / "peer_peft.py"), "--model", base_path("fp32"),
           "--batches", str(WORK / "batches.safetensors"), "--mode", mode, "--r", str(R), "--alpha", str(ALPHA),
           "--lr", str(LR.get(mode, LR["lora"])), "--steps", str(steps), "--threads",
           str(P.THREADS), "--json", str(out), "--gradient-checkpointing", "off"]
    if mode in ("prompt", "ptuning", "prefix", "ptuning-v2"):
        cmd += ["--num-virtual-tokens", str(VIRTUAL), "--encoder-hidden-size", str(ENC_HIDDEN)]
    if run_steps < steps:
        cmd += ["--time-steps", str(run_steps)]
    if evaluate:
        cmd += [f"--eval={WORK / 'eval_persuasion.safetensors'}"]
    env = None
    if tcmalloc:
        from slimlm.hardware import find_tcmalloc
        env = {**os.environ, "LD_PRELOAD": find_tcmalloc() or sys.exit("bench: --peer-tcmalloc: no tcmalloc here")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peer {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ suites
def suite_cut(cases: list[str], keep: str) -> None:
    """LayerDrop's promise: each fine-tuned model (its quality run's output) and the untouched base, cut to the
    decoder layers `keep` ("even": 0, 2, 4, ...), then perplexity on both texts."""
    from safetensors.torch import load_file

    import slimlm
    from slimlm import metrics as M
    from slimlm.adapt.methods import cut_layers
    from slimlm.calibration.common import find_blocks

    evals = {name: load_file(str(WORK / f"eval_{name}.safetensors"))["windows"] for name in P.EVAL_TEXTS}
    out = {}
    for case in ["base", *cases]:
        folder = base_path("fp32") if case == "base" else str(WORK / f"quality_{case}")
        model = slimlm.load_model(folder)
        n = len(find_blocks(model)[1])
        layers = list(range(0, n, 2)) if keep == "even" else [int(x) for x in keep.split(",")]
        full = {k: M.score(model, w, progress=False)["perplexity"] for k, w in evals.items()}
        cut_layers(model, layers)
        out[case] = {"layers_kept": layers, "of": n, "ppl_full_depth": full,
                     "ppl_cut": {k: M.score(model, w, progress=False)["perplexity"] for k, w in evals.items()}}
        print(f"bench: cut {case}: {full} -> {out[case]['ppl_cut']}", flush=True)
    _record("cut", keep, {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": P.machine(), "cases": out}, {})


def _load_results() -> dict:
    path = P.RESULTS / "training.json"
    return json.loads(path.read_text())["figures"] if path.is_file() else {"time": {}, "quality": {}}


def suite_time(only: list[str], repeats: int, run_steps: int, untimed: int, peer_tcmalloc: bool = False) -> None:
    """Short runs (the 200-step schedule cut after run_steps), slimlm and the peer alternating, `repeats`
    times; step time is the median over the steps after the first `untimed`, peak RSS the run's."""
    figures = _load_results()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for case in only:
        _, _, peer_mode = CASES[case]
        runs, peers, peers_tc = [], [], []
        for _ in range(repeats):
            r = _child(["one", "--case", case, "--run-steps", str(run_steps), "--no-eval", "--out",
                        str(WORK / f"time_{case}")])
            r["step_s_median"] = statistics.median(r["step_s"][untimed:])
            runs.append(r)
            if peer_mode:
                p = _peer(peer_mode, STEPS, run_steps, evaluate=False)
                p["step_s_median"] = statistics.median(p["train"]["step_s"][untimed:])
                peers.append(p)
                if peer_tcmalloc:
                    p = _peer(peer_mode, STEPS, run_steps, evaluate=False, tcmalloc=True)
                    p["step_s_median"] = statistics.median(p["train"]["step_s"][untimed:])
                    peers_tc.append(p)
            print(f"bench: {case} {r['step_s_median']:.2f} s/step, {r['peak_rss_mb']:.0f} MB"
                  + (f"; peer {peers[-1]['step_s_median']:.2f} s/step, {peers[-1]['memory']['peak_rss_mb']:.0f} MB"
                     if peer_mode else ""), flush=True)
        row = {"run": stamp, "cpu": P.machine(), "allocator": runs[0].get("allocator"),
               "runs": [{k: r.get(k) for k in ("step_s_median", "peak_rss_mb", "trainable_parameters", "allocator")}
                        for r in runs]}
        row["step_s"] = statistics.median(r["step_s_median"] for r in runs)
        row["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
        row["tokens_per_s"] = BATCH * SEQLEN / row["step_s"]
        if peers:
            row["peer"] = {"step_s": statistics.median(p["step_s_median"] for p in peers),
                           "peak_rss_mb": statistics.median(p["memory"]["peak_rss_mb"] for p in peers),
                           "runs": [{"step_s_median": p["step_s_median"], "peak_rss_mb": p["memory"]["peak_rss_mb"]}
                                    for p in peers],
                           "trainable_parameters": peers[0].get("model", {}).get("trainable_parameters")}
            row["time_ratio"] = statistics.median(r["step_s_median"] / p["step_s_median"] for r, p in zip(runs, peers))
            row["peak_ratio"] = statistics.median(r["peak_rss_mb"] / p["memory"]["peak_rss_mb"]
                                                  for r, p in zip(runs, peers))
        if peers_tc:
            row["peer_tcmalloc"] = {"step_s": statistics.median(p["step_s_median"] for p in peers_tc),
                                    "peak_rss_mb": statistics.median(p["memory"]["peak_rss_mb"] for p in peers_tc),
                                    "runs": [{"step_s_median": p["step_s_median"],
                                              "peak_rss_mb": p["memory"]["peak_rss_mb"]} for p in peers_tc]}
        figures["time"][case] = row
        P.write_result("training", {"batch": BATCH, "seqlen": SEQLEN, "steps": STEPS, "r": R, "alpha": ALPHA,
                                    "lr": LR, "run_steps": run_steps, "untimed": untimed}, figures)


def _record(kind: str, key: str, row: dict, settings: dict) -> None:
    """Add one row to the results file at once (read again first, so rows written meanwhile by another
    invocation stay, and a run stopped later keeps the rows it finished)."""
    figures = _load_results()
    figures.setdefault(kind, {})[key] = row
    P.write_result("training", {"batch": BATCH, "seqlen": SEQLEN, "r": R, "alpha": ALPHA, "lr": LR, **settings},
                   figures)


def suite_quality(only: list[str], steps: int, peer: bool, peer_only: bool = False, kind: str = "quality") -> None:
    """One run per case at the budget; `kind` is the results file's section (another budget than the main
    rows' goes in a section of its own, so the targets table never compares runs of different budgets)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for case in only:
        _, _, peer_mode = CASES[case]
        if peer_only:                       # the peer's row beside a slimlm row recorded earlier
            r = _load_results().get(kind, {}).get(case)
            if not r or len(r["loss"]) != steps:
                sys.exit(f"bench: --peer-only needs a recorded {steps}-step slimlm row for {case}")
        else:
            r = _child(["one", "--case", case, "--steps", str(steps), "--run-steps", str(steps), "--out",
                        str(WORK / f"{kind}_{case}")])
            r.update(run=stamp, cpu=P.machine())
            _record(kind, case, r, {"steps": steps} if kind == "quality" else {})   # rows hold their steps
        print(f"bench: {case} final loss {r['loss'][-1]:.4f}, persuasion {r['ppl_before']['persuasion']:.2f} -> "
              f"{r['ppl_after']['persuasion']:.2f}", flush=True)
        if peer and peer_mode:
            p = _peer(peer_mode, steps, steps, evaluate=True)
            _record(kind, f"{case}__peft", {"case": case, "tool": "peft", "run": stamp, "cpu": P.machine(),
                                                 "loss": p["train"]["loss"], "ppl_before": p["eval"].get("before"),
                                                 "ppl_after": p["eval"].get("after"), "versions": p.get("versions")},
                    {"steps": steps} if kind == "quality" else {})


def suite_sweep(cases: list[str], lrs: dict[str, list[float]], steps: int) -> None:
    """The learning rate of each method, chosen once: `steps`-step runs (their own schedule) at each rate,
    judged by the mean training loss of the last quarter of the steps."""
    figures = _load_results()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for case in cases:
        kind = "full" if CASES[case][1]["method"] == "full" else "lora"
        for lr in lrs[kind]:
            r = _child(["one", "--case", case, "--steps", str(steps), "--run-steps", str(steps), "--no-eval",
                        "--lr", str(lr), "--out", str(WORK / f"sweep_{case}")])
            tail = r["loss"][-max(1, steps // 4):]
            figures.setdefault("sweep", {})[f"{case}@{lr:g}"] = {
                "case": case, "lr": lr, "steps": steps, "run": stamp, "loss": r["loss"],
                "tail_loss": statistics.mean(tail)}
            print(f"bench: sweep {case} lr {lr:g}: last-quarter loss {statistics.mean(tail):.4f}", flush=True)
            P.write_result("training", {"batch": BATCH, "seqlen": SEQLEN, "steps": STEPS, "r": R, "alpha": ALPHA,
                                        "lr": LR}, figures)


def rescore(case: str) -> None:
    """The quality row of a finished run rebuilt from its output folder (metrics.jsonl, the saved adapter or
    model) when the invocation that ran it was stopped before recording it: perplexity of the base and of
    the saved result on both texts, the loss curve from the metrics log. The run's peak RSS is not known."""
    import torch
    from safetensors.torch import load_file

    import slimlm
    from slimlm import metrics as M

    torch.set_num_threads(P.THREADS)
    out = WORK / f"quality_{case}"
    if not (out / "metrics.jsonl").is_file():
        sys.exit(f"bench: {out} holds no finished run")
    base = CASES[case][0]
    evals = {name: load_file(str(WORK / f"eval_{name}.safetensors"))["windows"] for name in P.EVAL_TEXTS}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tensors = [load_file(str(f)) for f in out.glob("*.safetensors")]
    row = {"case": case, "tool": "slimlm", "base": base, "lr": max(r["lr"] for r in rows), "steps": len(rows),
           "loss": [r["loss"] for r in rows], "step_s": [r["seconds"] for r in rows],
           "saved_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
           "trainable_parameters": sum(t.numel() for d in tensors for t in d.values()),
           "rescored": "rebuilt from the output folder after the run; peak RSS not recorded",
           "run": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((out / "metrics.jsonl").stat().st_mtime)),
           "cpu": P.machine()}
    before = slimlm.load_model(base_path(base))
    row["ppl_before"] = {n: M.score(before, w, progress=False)["perplexity"] for n, w in evals.items()}
    del before
    after = slimlm.load_model(str(out))
    row["ppl_after"] = {n: M.score(after, w, progress=False)["perplexity"] for n, w in evals.items()}
    _record("quality", case, row, {"steps": len(rows)})
    print(f"bench: {case} rescored: persuasion {row['ppl_before']['persuasion']:.2f} -> "
          f"{row['ppl_after']['persuasion']:.2f}", flush=True)


ALLOCATORS = {  # name -> environment additions for the run's process (None: not on this machine)
    "glibc": lambda: {"SLIMLM_ALLOCATOR": "system"},
    "glibc-mmap-128k": lambda: {"SLIMLM_ALLOCATOR": "system", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
    "tcmalloc": lambda: _preload("libtcmalloc_minimal.so.4"),
    "jemalloc": lambda: _preload("libjemalloc.so.2"),
}


def _preload(name: str) -> dict | None:
    from slimlm.hardware import _LIB_DIRS
    lib = next((Path(d) / name for d in _LIB_DIRS if (Path(d) / name).is_file()), None)
    return {"SLIMLM_ALLOCATOR": "system", "LD_PRELOAD": str(lib)} if lib else None


def suite_allocators(only: list[str], run_steps: int, untimed: int) -> None:
    """The same short slimlm run under each malloc (glibc's default, glibc with a fixed 128 KB mmap
    threshold as TrainConfig.release_memory sets, tcmalloc, jemalloc with its defaults), one after another:
    step time (median after `untimed` steps) and peak RSS. What the allocator alone does to a training step."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for case in only:
        for name, make in ALLOCATORS.items():
            extra = make()
            if extra is None:
                print(f"bench: {name} is not installed here: skipped", flush=True)
                continue
            done = subprocess.run([sys.executable, __file__, "one", "--case", case, "--run-steps", str(run_steps),
                                   "--no-eval", "--out", str(WORK / f"alloc_{case}_{name}")], capture_output=True,
                                  text=True, env={**os.environ, **extra})
            if done.returncode != 0:
                raise RuntimeError(f"bench: {case} under {name} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            row = {"run": stamp, "cpu": P.machine(), "env": extra, "allocator": r.get("allocator"),
                   "step_s": r["step_s"], "step_s_median": statistics.median(r["step_s"][untimed:]),
                   "peak_rss_mb": r["peak_rss_mb"], "loss": r["loss"]}
            _record("allocators", f"{case}@{name}", row, {"run_steps": run_steps, "untimed": untimed})
            print(f"bench: {case} under {name}: {row['step_s_median']:.2f} s/step, {row['peak_rss_mb']:.0f} MB",
                  flush=True)


def suite_dist(case: str, run_steps: int, untimed: int) -> None:
    """The same steps (4 x 512 windows each) run by one process with the protocol's 2 threads and by 2
    data-parallel processes (torchrun, gloo) of 1 thread and 2 windows each: losses (equal up to the order
    of the sums) and tokens/s of both. Peak RSS: rank 0's."""
    import shutil

    from slimlm.hardware import training_allocator_env
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    one = _child(["one", "--case", case, "--run-steps", str(run_steps), "--no-eval", "--out", str(WORK / "dist_1")])
    out2 = WORK / "dist_2"
    shutil.rmtree(out2, ignore_errors=True)
    shutil.rmtree(str(out2) + ".partial", ignore_errors=True)
    env = {**(training_allocator_env() or os.environ), "SLIMLM_BENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, "one", "--case", case, "--run-steps", str(run_steps), "--no-eval", "--out",
                           str(out2)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench: 2 processes failed:\n{done.stderr[-3000:]}")
    two = json.loads(done.stdout.strip().splitlines()[-1])
    rep2 = json.loads((out2 / "train_report.json").read_text())
    row = {"run": stamp, "cpu": P.machine(), "case": case}
    for key, r in (("one_process_2_threads", one), ("two_processes_1_thread", two)):
        med = statistics.median(r["step_s"][untimed:])
        row[key] = {"step_s": r["step_s"], "step_s_median": med, "tokens_per_s": BATCH * SEQLEN / med,
                    "peak_rss_mb_rank0": r["peak_rss_mb"], "loss": r["loss"], "allocator": r.get("allocator")}
    row["two_processes_1_thread"]["processes"] = rep2.get("processes")
    row["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(one["loss"], two["loss"]))
    _record("dist", case, row, {"run_steps": run_steps, "untimed": untimed})
    print(f"bench: {case}: 1 process {row['one_process_2_threads']['tokens_per_s']:.0f} tokens/s, 2 processes "
          f"{row['two_processes_1_thread']['tokens_per_s']:.0f} tokens/s, largest loss difference "
          f"{row['max_abs_loss_diff']:.2e}", flush=True)


def _time_table(t: dict) -> None:
    print("| case | trainable | allocator | s/step | tokens/s | peak RSS MB | PEFT s/step | PEFT peak MB | time ratio "
          "| peak ratio | PEFT + tcmalloc s/step, peak MB | load |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for case, r in t.items():
        p, ptc = r.get("peer") or {}, r.get("peer_tcmalloc") or {}
        print(f"| {case} | {r['runs'][0].get('trainable_parameters') or ''} | {r.get('allocator') or 'glibc'} | "
              f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              + (f"{p['step_s']:.2f} | {p['peak_rss_mb']:.0f} | {r['time_ratio']:.2f} | {r['peak_ratio']:.2f}"
                 if p else "| | |")
              + (f" | {ptc['step_s']:.2f}, {ptc['peak_rss_mb']:.0f}" if ptc else " |")
              + f" | {r['cpu'].get('loadavg_1_5_15')} |")


def table() -> None:
    """The results file as markdown: the timing rows (slimlm beside PEFT; every `time*` block, the current
    one and earlier ones kept under their own key) and the quality rows, then each target of the issue
    computed from the current rows (nothing is computed where a row is missing)."""
    f = _load_results()
    t, q = f.get("time", {}), f.get("quality", {})
    for key in sorted(k for k in f if k.startswith("time") and f[k]):
        print(f"{key}:\n")
        _time_table(f[key])
        print()
    if q:
        print("| case | tool | steps | final loss | persuasion before -> after | northangerabbey before -> after |")
        print("| --- | --- | ---: | ---: | --- | --- |")
        for case, r in q.items():
            b, a = r.get("ppl_before") or {}, r.get("ppl_after") or {}
            cell = [f"{b[n]:.2f} -> {a[n]:.2f}" if n in b and n in a else "" for n in P.EVAL_TEXTS]
            print(f"| {case} | {r.get('tool', 'slimlm')} | {len(r['loss'])} | {r['loss'][-1]:.4f} | {' | '.join(cell)} |")
    print()
    for line in targets(t or f.get("time_glibc_2026-12-07T07:43", {}), q, f.get("cut")):
        print("- " + line)


def targets(t: dict, q: dict, cut: dict | None = None) -> list[str]:
    """Each target of the training issue as a line, from the rows present."""
    out = []
    for case in ("lora_qv", "lora_all"):
        r = t.get(case)
        if r and r.get("peer"):
            out.append(f"{case}: step time {r['time_ratio']:.2f}x PEFT's (target <= 0.9), peak {r['peak_ratio']:.2f}x "
                       "(target <= 0.8)")
    for case in ("lora_all_ckpt", "lora_all_lowmem"):
        if case in t and "lora_all" in t and t["lora_all"].get("peer"):
            r = t[case]
            out.append(f"{case}: peak {r['peak_rss_mb'] / t['lora_all']['peer']['peak_rss_mb']:.2f}x PEFT's LoRA "
                       f"(checkpointing target <= 0.5), step {r['step_s'] / t['lora_all']['step_s']:.2f}x slimlm's LoRA")
    if "lora_all" in t:
        for case in ("qlora_nf4", "qlora_gptq4", "qlora_gptq3"):
            if case in t:
                r, own = t[case], t["lora_all"]
                peer = (t.get("qlora_nf4") or {}).get("peer")
                out.append(f"{case}: peak {r['peak_rss_mb']:.0f} MB against own LoRA {own['peak_rss_mb']:.0f} MB"
                           + (f" and PEFT QLoRA {peer['peak_rss_mb']:.0f} MB" if peer else "")
                           + f"; step {r['step_s'] / own['step_s']:.2f}x own LoRA (target <= 1.3)")
    base = "persuasion"

    def gain(case):
        r = q.get(case)
        return None if not r or not r.get("ppl_after") else (r["ppl_before"][base], r["ppl_after"][base])
    full, lora = gain("full"), gain("lora_all")
    if full and lora:
        frac = (lora[0] - lora[1]) / (full[0] - full[1])
        out.append(f"LoRA all-linear reaches {100 * frac:.0f}% of full fine-tuning's perplexity improvement on "
                   f"{base} ({lora[0]:.2f} -> {lora[1]:.2f} against {full[0]:.2f} -> {full[1]:.2f}; target >= 80%)")
    for case in ("qlora_gptq3", "qlora_gptq3_init"):
        g3 = gain(case)
        if not (g3 and lora):
            continue
        out.append(f"GPTQ 3-bit + QLoRA ({case}) {g3[1]:.2f} against fp32 + LoRA {lora[1]:.2f}: "
                   f"{100 * (g3[1] / lora[1] - 1):+.1f}% (target within 10%)")
        for how, m in (q[case].get("merged") or {}).items():
            kept = (g3[0] - m["ppl"][base]) / (g3[0] - g3[1])
            out.append(f"{case} merged ({how}): {m['ppl'][base]:.2f}, {100 * kept:.0f}% of the recovery kept "
                       "(target >= 80%)")
    g3, ql = gain("qlora_gptq3"), gain("qat_lora_gptq3")
    if g3 and ql:                 # LoRA inside the rounding: the trained model is already the merged 3-bit one
        out.append(f"LoRA trained inside the 3-bit rounding (qat_lora_gptq3, merged by construction): "
                   f"{ql[0]:.2f} -> {ql[1]:.2f}, {100 * (ql[0] - ql[1]) / (g3[0] - g3[1]):.0f}% of QLoRA's "
                   f"recovery ({g3[0]:.2f} -> {g3[1]:.2f}) in the 3-bit model (target >= 80%)")
    s = gain("lora_structured20")
    if s and lora:
        closed = (s[0] - s[1]) / (s[0] - lora[1]) if s[0] > lora[1] else float("nan")
        out.append(f"structured 20% + LoRA {s[0]:.2f} -> {s[1]:.2f}: closes {100 * closed:.0f}% of the gap to fp32 + LoRA "
                   f"{lora[1]:.2f} (target >= 50%)")
    return out + targets_part2(q, cut)


def targets_part2(q: dict, cut: dict | None) -> list[str]:
    """The targets of "Training, part 2" from the rows present (persuasion, the training domain)."""
    out, base = [], "persuasion"

    def after(case):
        r = q.get(case)
        if not r or not r.get("ppl_after"):
            return None
        a = r["ppl_after"]
        return a["ppl"] if "ppl" in a else a[base]           # the peer's rows: persuasion only
    for case in ("prompt", "ptuning", "prefix", "ptuning_v2"):
        mine, peer = after(case), after(f"{case}__peft")
        if mine and peer:
            out.append(f"{case}: {mine:.2f} against PEFT's {peer:.2f} (target: at or below)")
    for case in ("qat_w3g64", "qat_from_gptq3", "qat_lora_gptq3"):
        if after(case):
            out.append(f"{case}: {after(case):.2f} (target below GPTQ 3-bit g64's 48.0)")
    for s in ("50", "70", "90"):
        mv, mg = after(f"movement_{s}"), after(f"magnitude_{s}_ft")
        if mv and mg:
            out.append(f"{s}% sparsity after the same fine-tuning: movement {mv:,.2f}, magnitude {mg:,.2f} "
                       f"(target: movement lower)")
    gum = after("gum_20")
    rivals = {c: after(c) for c in ("movement_struct20", "magnitude_struct20_ft", "activation_struct20_ft") if after(c)}
    if gum and rivals:
        out.append(f"20% of the MLP neurons removed: GUM {gum:.2f}, " + ", ".join(f"{c} {v:.2f}" for c, v in rivals.items())
                   + " (target: GUM below movement and magnitude)")
    for keep, row in (cut or {}).items():
        c = row.get("cases", {})
        if "layerdrop" in c and "full" in c:
            a, b = c["layerdrop"]["ppl_cut"][base], c["full"]["ppl_cut"][base]
            out.append(f"cut to layers {keep}: LayerDrop-trained {a:.2f} against full fine-tuning {b:.2f} (target: lower)")
    for case in ("prompt_recover_gptq3", "prompt_recover_gptq3_23", "prompt_recover_sparsegpt50"):
        r = q.get(case)
        if r and r.get("ppl_after") and "full" in q:
            fp32 = q["full"]["ppl_before"][base]
            gap = r["ppl_before"][base] - fp32
            out.append(f"{case}: {r['ppl_before'][base]:.2f} -> {r['ppl_after'][base]:.2f}, closes "
                       f"{100 * (r['ppl_before'][base] - r['ppl_after'][base]) / gap:.1f}% of the gap to fp32 {fp32:.2f} "
                       f"with {r.get('trainable_parameters', 0):,} parameters (target >= 25%, <= 0.01%)")
    full = q.get("full")
    dims = sorted((int(c.split("_d")[1]), q[c]) for c in q if c.startswith("intrinsic_d") and q[c].get("ppl_after"))
    if full and full.get("ppl_after") and dims:
        best = full["ppl_before"][base] - full["ppl_after"][base]
        gains = [(d, (r["ppl_before"][base] - r["ppl_after"][base]) / best) for d, r in dims]
        d90 = next((d for d, g in gains if g >= 0.9), None)
        out.append("intrinsic dimension: " + ", ".join(f"d={d:,} {100 * g:.0f}%" for d, g in gains)
                   + f" of full fine-tuning's improvement; d90 = {f'{d90:,}' if d90 else 'beyond the sweep'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--steps", type=int, default=STEPS)
    pr.add_argument("--bases", default=",".join(BASES), help="which compressed bases to build (default: all)")
    t = sub.add_parser("time")
    t.add_argument("--only", default=",".join(CASES))
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--run-steps", type=int, default=12)
    t.add_argument("--untimed", type=int, default=2)
    t.add_argument("--peer-tcmalloc", action="store_true", help="also time PEFT with tcmalloc preloaded")
    q = sub.add_parser("quality")
    q.add_argument("--only", default=",".join(CASES))
    q.add_argument("--steps", type=int, default=STEPS)
    q.add_argument("--no-peer", action="store_true")
    q.add_argument("--peer-only", action="store_true", help="run the peer beside an already recorded slimlm row")
    q.add_argument("--record-as", default="quality", help="the results file's section for these rows")
    sw = sub.add_parser("sweep")
    sw.add_argument("--only", default="lora_all,full")
    sw.add_argument("--steps", type=int, default=40)
    sw.add_argument("--lora", default="2e-4,5e-4,1e-3")
    sw.add_argument("--full", default="2e-5,5e-5,1e-4")
    al = sub.add_parser("allocators", help="one short run under each malloc")
    al.add_argument("--only", default="lora_all,qlora_nf4")
    al.add_argument("--run-steps", type=int, default=6)
    al.add_argument("--untimed", type=int, default=2)
    di = sub.add_parser("dist", help="one process with 2 threads against 2 data-parallel processes of 1 thread")
    di.add_argument("--case", default="lora_all", choices=sorted(CASES))
    di.add_argument("--run-steps", type=int, default=6)
    di.add_argument("--untimed", type=int, default=2)
    cu = sub.add_parser("cut", help="LayerDrop: the quality runs' models cut to half their depth")
    cu.add_argument("--only", default="layerdrop,full")
    cu.add_argument("--keep", default="even")
    sub.add_parser("table")
    rs = sub.add_parser("rescore", help="record a finished run's quality row from its output folder")
    rs.add_argument("--case", required=True, choices=sorted(CASES))
    one = sub.add_parser("one", help="(internal) one slimlm run in this process")
    one.add_argument("--lr", type=float, default=None)
    one.add_argument("--case", required=True, choices=sorted(CASES))
    one.add_argument("--steps", type=int, default=STEPS)
    one.add_argument("--run-steps", type=int, default=STEPS)
    one.add_argument("--no-eval", action="store_true")
    one.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.cmd == "prepare":
        unknown = set(a.bases.split(",")) - set(BASES)
        if unknown:
            sys.exit(f"bench: unknown bases {sorted(unknown)}; choose from {', '.join(BASES)}")
        prepare(a.steps, a.bases.split(","))
    elif a.cmd == "time":
        suite_time(a.only.split(","), a.repeats, a.run_steps, a.untimed, a.peer_tcmalloc)
    elif a.cmd == "quality":
        suite_quality(a.only.split(","), a.steps, not a.no_peer, a.peer_only, a.record_as)
    elif a.cmd == "sweep":
        suite_sweep(a.only.split(","), {"lora": [float(x) for x in a.lora.split(",")],
                                        "full": [float(x) for x in a.full.split(",")]}, a.steps)
    elif a.cmd == "allocators":
        suite_allocators(a.only.split(","), a.run_steps, a.untimed)
    elif a.cmd == "rescore":
        rescore(a.case)
    elif a.cmd == "cut":
        suite_cut(a.only.split(","), a.keep)
    elif a.cmd == "table":
        table()
    elif a.cmd == "dist":
        suite_dist(a.case, a.run_steps, a.untimed)
    elif a.cmd == "one":
        if int(os.environ.get("RANK", "0")):                 # a data-parallel rank other than 0: no row
            run_one(a.case, a.steps, a.run_steps, not a.no_eval, a.out, a.lr)
            return
        if a.out and "WORLD_SIZE" not in os.environ:
            import shutil
            shutil.rmtree(a.out, ignore_errors=True)
            shutil.rmtree(a.out + ".partial", ignore_errors=True)
        print(json.dumps(run_one(a.case, a.steps, a.run_steps, not a.no_eval, a.out, a.lr)))


if __name__ == "__main__":
    main()
