"""The distillation benchmark of ../shared/BENCHMARKS.md: the default model (30 layers) as the teacher, a
15-layer student taken from every other layer of it, one results file: bench/results/distill.json.

    python bench/train.py prepare                  # the batches and evaluation windows (shared with training)
    python bench/distill.py run [--only ...] [--steps 50]
    python bench/distill.py peer [--only forward_kl,jsd]   # TRL's GKD trainer at the same settings
    python bench/distill.py encoder               # all-MiniLM-L6-v2 into 3 layers
    python bench/distill.py blackbox              # fine-tuned on the teacher's generations vs on raw text
    python bench/distill.py table

Data and budget: the training benchmark's batches (4 windows of 512 tokens a step from the three training
novels), the same number of steps for every row, so the same training tokens (recorded in each row). Every
row is a fresh process (its peak RSS its own). Each row: perplexity on both evaluation texts (quick
protocol), KL(teacher || student) and top-1 agreement with the teacher on the persuasion windows, step time,
tokens/s, peak RSS; the cached row also the cache's bytes per token and its build time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import SEQLEN, WORK, FileBatches, base_path  # noqa: E402

import protocol as P  # noqa: E402

STUDENT = "layers:every-2"
LR = {"distill": 1e-4}

# row -> (student spec or base folder, DistillConfig options, extra)
ROWS = {
    "untrained": (STUDENT, None, {}),
    "ce": (STUDENT, {"loss": "ce"}, {}),
    "kd_T1": (STUDENT, {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.5}, {}),
    "kd_T2": (STUDENT, {"loss": "forward_kl", "temperature": 2.0, "alpha": 0.5}, {}),
    "forward_kl": (STUDENT, {"loss": "forward_kl", "alpha": 1.0}, {}),
    "reverse_kl": (STUDENT, {"loss": "reverse_kl", "alpha": 1.0}, {}),
    "jsd": (STUDENT, {"loss": "jsd", "beta": 0.5, "alpha": 1.0}, {}),
    "forward_kl_hidden_cos": (STUDENT, {"loss": "forward_kl", "alpha": 1.0, "hidden_weight": 1.0,
                                        "hidden_loss": "cosine", "layer_map": "14:29"}, {}),
    "pkd_skip": (STUDENT, {"loss": "forward_kl", "alpha": 1.0, "hidden_weight": 1.0, "hidden_loss": "mse",
                           "layer_map": "skip"}, {}),
    "minilm": (STUDENT, {"loss": "forward_kl", "alpha": 1.0, "attention_weight": 1.0,
                         "attention_loss": "minilm"}, {}),
    "gkd_on_policy": (STUDENT, {"loss": "jsd", "beta": 0.5, "alpha": 1.0, "on_policy": 0.5, "gen_tokens": 256}, {}),
    "minillm": (STUDENT, {"loss": "minillm", "alpha": 0.8, "mix": 0.2, "gen_tokens": 128}, {}),
    "forward_kl_cached": (STUDENT, {"loss": "forward_kl", "alpha": 1.0}, {"cache_k": 64}),
    # 64 draws from the teacher's distribution instead of its top 64 (an unbiased estimate; the same bytes)
    "forward_kl_cached_sampled": (STUDENT, {"loss": "forward_kl", "alpha": 1.0}, {"cache_k": 64,
                                                                               "cache_kind": "sampled"}),
    "random_init": (STUDENT, {"loss": "forward_kl", "alpha": 1.0}, {"init": "random"}),
    "structured20_distilled": ("structured_20", {"loss": "forward_kl", "alpha": 1.0}, {}),
}


def _evaluate(model, teacher_logprobs) -> dict:
    from safetensors.torch import load_file

    from slimlm import metrics as M

    out = {}
    for name in P.EVAL_TEXTS:
        w = load_file(str(WORK / f"eval_{name}.safetensors"))["windows"]
        ref = teacher_logprobs if name == "persuasion" else None
        r = M.score(model, w, reference=ref, progress=False)
        out[name] = {k: r[k] for k in ("perplexity", "kl_divergence", "top1_agreement") if k in r}
    return out


def row_name(row: str, lr: float | None, steps: int = 50) -> str:
    """The results key: the row, its learning rate where it is not the benchmark's default, and its steps
    where they are not the 50 of the benchmark's budget."""
    name = row if lr is None or lr == LR["distill"] else f"{row}@lr{lr:g}"
    return name if steps == 50 else f"{name}@{steps}steps"


def run_one(row: str, steps: int, evaluate: bool = True, lr: float | None = None) -> dict:
    import torch

    import slimlm
    from slimlm import api
    from slimlm import metrics as M
    from slimlm.distill.method import DistillConfig
    from slimlm.distill.students import build_student

    torch.set_num_threads(P.THREADS)
    student_ref, opts, extra = ROWS[row]
    teacher = slimlm.load_model(base_path("fp32"))
    if student_ref.startswith("layers:"):
        student = build_student(teacher, student_ref, extra.get("init", "pretrained"))
    else:
        student = slimlm.load_model(base_path(student_ref))
    lr = LR["distill"] if lr is None else lr
    res: dict = {"row": row_name(row, lr, steps), "student": student_ref, "init": extra.get("init", "pretrained"), "steps": steps,
                 "cpu": P.machine(), "run": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "student_parameters": sum(p.numel() for p in student.parameters()),
                 "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
    if opts is not None:
        config = DistillConfig(**opts)
        data = FileBatches(WORK / "batches.safetensors", steps)
        # perplexity on the persuasion windows at half the budget and at the end (the loop's own evaluation):
        # the "reaches the cross-entropy student's final perplexity in half the tokens" target reads it
        cfg = slimlm.TrainConfig(steps=steps, seqlen=SEQLEN, batch_size=4, lr=lr,
                                 eval_every=max(1, steps // 2) if evaluate else 0)
        from safetensors.torch import load_file
        eval_w = load_file(str(WORK / "eval_persuasion.safetensors"))["windows"]
        out = WORK / f"distill_{row_name(row, lr, steps)}"
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(str(out) + ".partial", ignore_errors=True)
        t_teacher = teacher
        if "cache_k" in extra:
            from slimlm.distill.cache import CachedTeacherData, build_cache
            t0 = time.perf_counter()
            kind = extra.get("cache_kind", "topk")
            cache = WORK / (f"teacher_cache_k{extra['cache_k']}_{steps}" if kind == "topk" else
                            f"teacher_cache_{kind}_k{extra['cache_k']}_{steps}")
            if not cache.exists():
                build_cache(teacher, data, cache, k=extra["cache_k"], temperature=config.temperature, progress=False,
                            kind=kind)
                res["cache_build_s"] = time.perf_counter() - t0
            data = CachedTeacherData(data, cache, teacher=teacher, temperature=config.temperature, kind=kind)
            res["cache"] = {k: data.meta.get(k, "topk") for k in ("kind", "k", "bytes_per_token", "bytes_on_disk",
                                                                    "tokens")}
            t_teacher = None
        report = api.distill(t_teacher, student, config, data, cfg, output=out, progress=False,
                             eval_data=eval_w if evaluate else None)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        res["persuasion_ppl_by_step"] = {0: report.get("eval_perplexity_before"),
                                         **{r["step"]: r["eval_perplexity"] for r in rows if "eval_perplexity" in r}}
        res.update(config=opts, lr=lr, tokens=sum(r["tokens"] for r in rows),
                   loss=[r["loss"] for r in rows], step_s=[r["seconds"] for r in rows],
                   step_s_median=report.get("step_seconds_median"), tokens_per_s=report.get("tokens_per_s"))
    res["peak_rss_mb"] = M.peak_rss_bytes() / 2**20
    if evaluate:
        student.eval()
        res["eval"] = _evaluate(student, teacher)
    return res


def run_encoder(steps: int) -> dict:
    """all-MiniLM-L6-v2 (6 layers) distilled into 3 (every other layer) on the training text, judged by the
    cosine of its sentence embeddings (mean-pooled) to the teacher's on held-out windows of an evaluation text,
    against the same 3 layers untrained."""
    import torch
    from train import TRAIN_TEXTS

    import slimlm
    from slimlm import api
    from slimlm import data as D
    from slimlm import metrics as M
    from slimlm.distill.method import DistillConfig
    from slimlm.distill.students import build_student
    from slimlm.training import data as TD

    torch.set_num_threads(P.THREADS)
    teacher = slimlm.load_model("all-minilm-l6-v2")
    tok = slimlm.load_tokenizer("all-minilm-l6-v2")
    seqlen = 128
    held, _ = D.encoder_windows(D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["northangerabbey"]))), seqlen, 64, tok)
    student = build_student(teacher, "layers:every-2")
    before = M.embedding_agreement(student, teacher, held, progress=False)
    ids = TD.training_text(tok, [P.corpus(t) for t in TRAIN_TEXTS])
    data = TD.text_windows(ids, seqlen=seqlen, batch_size=16, batches=steps, seed=0)
    config = DistillConfig(hidden_weight=1.0, hidden_loss="cosine", layer_map="skip")
    t0 = time.perf_counter()
    rep = api.distill(teacher, student, config, data, slimlm.TrainConfig(steps=steps, seqlen=seqlen, batch_size=16,
                      lr=1e-4), tokenizer=tok, progress=False)
    after = M.embedding_agreement(student, teacher, held, progress=False)
    return {"row": "encoder_minilm_3of6", "steps": steps, "tokens": steps * 16 * seqlen, "cpu": P.machine(),
            "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_s": time.perf_counter() - t0,
            "step_s_median": rep.get("step_seconds_median"), "peak_rss_mb": M.peak_rss_bytes() / 2**20,
            "embedding_cosine_untrained": before, "embedding_cosine_distilled": after,
            "held_out": f"{P.EVAL_TEXTS['northangerabbey']}: 64 windows of {seqlen}"}


def _passages(tok, texts: list[str], n: int, seed: int, prompt_tokens: int = 48, cont_tokens: int = 96):
    """n (passage, true continuation) pairs cut at random token offsets of the texts."""
    import torch

    from slimlm import data as D

    ids = torch.cat([D.tokenize(tok, D.load_text(P.corpus(t))) for t in texts])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - prompt_tokens - cont_tokens, (n,), generator=g).tolist()
    return [(tok.decode(ids[s:s + prompt_tokens]).strip(),
             tok.decode(ids[s + prompt_tokens:s + prompt_tokens + cont_tokens]).strip()) for s in starts]


def _response_agreement(teacher, student, tok, pairs: list[tuple[str, str]]) -> dict:
    """KL(teacher || student) and top-1 agreement over the response tokens of chat-rendered (prompt, response)
    pairs: the positions that predict the assistant's tokens, both models reading the same ids."""
    import torch
    import torch.nn.functional as F

    from slimlm.training.data import _chat

    kls, agree, n = 0.0, 0, 0
    teacher.eval(), student.eval()
    with torch.no_grad():
        for prompt, response in pairs:
            ids, trained = _chat(tok, [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}], "held-out")
            x = torch.tensor([ids])
            pos = torch.tensor(trained[1:]).nonzero().squeeze(1)        # logits at t predict token t + 1
            lt = F.log_softmax(teacher(input_ids=x).logits[0, :-1][pos].float(), -1)
            ls = F.log_softmax(student(input_ids=x).logits[0, :-1][pos].float(), -1)
            kls += (lt.exp() * (lt - ls)).sum().item()
            agree += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
            n += pos.numel()
    return {"kl_divergence": kls / n, "top1_agreement": agree / n, "positions": n}


def run_blackbox(steps: int, prompts: int = 64, held: int = 16, batch: int = 8) -> dict:
    """Black-box distillation: the teacher answers prompts cut from the training text ("Continue this
    passage: ..."; `slimlm generate`'s LocalTeacher, chat template, 2 sampled responses each, deduplicated);
    the every-other-layer student is fine-tuned (full, loss on the responses only, chat-rendered) on those
    pairs, against the same student fine-tuned on twice as many passages of the same training text paired
    with the book's own continuation (the raw text), same steps and batch. Judged by KL(teacher || student)
    and top-1 agreement on the teacher's responses to held-out prompts cut from an evaluation text."""
    import torch
    from train import TRAIN_TEXTS

    import slimlm
    from slimlm import api
    from slimlm import metrics as M
    from slimlm.distill import blackbox as BB
    from slimlm.distill.students import build_student
    from slimlm.training import data as TD

    torch.set_num_threads(P.THREADS)
    tok = slimlm.load_tokenizer(P.MODEL)
    teacher = slimlm.load_model(base_path("fp32"))
    ask = "Continue this passage:\n\n{}"
    s = BB.Sampling(n=2, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=0)
    gen = WORK / f"blackbox_gen_{prompts}.jsonl"
    t0 = time.perf_counter()
    train_pairs = _passages(tok, [*TRAIN_TEXTS], 2 * prompts, seed=1)
    if not gen.exists():
        BB.generate(BB.LocalTeacher(teacher, tok), [ask.format(p) for p, _ in train_pairs[:prompts]], s, gen)
    gen_s = time.perf_counter() - t0
    held_path = WORK / f"blackbox_held_{held}.jsonl"
    if not held_path.exists():
        hp = [ask.format(p) for p, _ in _passages(tok, [P.EVAL_TEXTS["persuasion"]], held, seed=2)]
        BB.generate(BB.LocalTeacher(teacher, tok), hp, BB.Sampling(n=1, max_new_tokens=96, seed=1), held_path)
    held_pairs = [(r["prompt"], r["response"]) for r in map(json.loads, held_path.read_text().splitlines())]

    def as_messages(path: Path, pairs) -> Path:
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": r}]}) + "\n"
                                for p, r in pairs))
        return path

    arms = {"teacher_generations": as_messages(WORK / "blackbox_train_generations.jsonl",
                                               [(r["prompt"], r["response"]) for r in
                                                map(json.loads, gen.read_text().splitlines())]),
            "raw_text": as_messages(WORK / "blackbox_train_raw.jsonl",
                                    [(ask.format(p), c) for p, c in train_pairs])}
    res: dict = {"row": "blackbox", "steps": steps, "batch": batch, "lr": LR["distill"], "cpu": P.machine(),
                 "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "generation_s": gen_s,
                 "held_out": f"{held} prompts from {P.EVAL_TEXTS['persuasion']}, the teacher's responses",
                 "untrained": _response_agreement(teacher, build_student(teacher, STUDENT), tok, held_pairs)}
    for arm, path in arms.items():
        student = build_student(teacher, STUDENT)
        data = TD.instruction_data(path, tok, seqlen=SEQLEN, batch_size=batch, batches=steps, truncate=True)
        rep = api.train(student, slimlm.FullConfig(), data, slimlm.TrainConfig(steps=steps, seqlen=SEQLEN,
                        batch_size=batch, lr=LR["distill"]), tokenizer=tok, progress=False)
        res[arm] = {"examples": data.describe()["examples"], "tokens": sum(TD.target_tokens(data.batch(i)) for i in range(len(data))),
                    "step_s_median": rep.get("step_seconds_median"), "final_loss": rep.get("final_loss"),
                    **_response_agreement(teacher, student, tok, held_pairs)}
    res["peak_rss_mb"] = M.peak_rss_bytes() / 2**20
    return res


PEER_PY = P.ROOT / "bench" / ".venv-peft" / "bin" / "python"
PEER_ROWS = {"forward_kl": 0.0, "jsd": 0.5, "reverse_kl": 1.0}       # TRL's GKD beta for slimlm's row


def run_peer(row: str, steps: int) -> dict:
    """TRL's GKD trainer (bench/peer_trl.py, in the peer venv) at the settings of slimlm's `row`."""
    cfg = ROWS[row][1]
    out = WORK / f"peer_trl_{row}_{steps}.json"
    cmd = [str(PEER_PY), str(P.ROOT / "bench" / "peer_trl.py"), "--teacher", base_path("fp32"), "--every", "2",
           "--batches", str(WORK / "batches.safetensors"), "--eval", str(WORK / "eval_persuasion.safetensors"),
           "--steps", str(steps), "--lr", str(LR["distill"]), "--beta", str(PEER_ROWS[row]),
           "--temperature", str(cfg.get("temperature", 1.0)), "--threads", str(P.THREADS), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench: TRL peer for {row} failed:\n{done.stderr[-3000:]}")
    r = json.loads(out.read_text())
    return {"row": f"{row}__trl", "tool": "trl", "steps": steps, "cpu": P.machine(),
            "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "tokens": r["tokens"], "loss": r["loss"],
            "step_s": r["step_s"], "step_s_median": r["step_s_median"], "peak_rss_mb": r["peak_rss_mb"],
            "versions": r["versions"], "eval": {"persuasion": r["eval"]}}


def run_speed(steps: int, repeats: int) -> dict:
    """Step time and peak memory only (no evaluation), each run a fresh process, in rotation: slimlm online
    forward KL, slimlm from the cached top-k logits (the cache built before, untimed), TRL's GKD at beta 0;
    `steps` steps each, the first two left out of each median. For the targets' ratios (cache >= 1.5x online,
    slimlm <= 0.8x TRL's step time and <= 0.6x its peak), measured back to back on a quiet CPU."""
    import statistics

    from slimlm.hardware import training_allocator_env

    env = training_allocator_env() or os.environ.copy()
    runs: dict[str, list] = {"forward_kl": [], "forward_kl_cached_sampled": [], "forward_kl__trl": []}
    for _ in range(repeats):
        for row in ("forward_kl", "forward_kl_cached_sampled"):
            done = subprocess.run([sys.executable, __file__, "one", "--row", row, "--steps", str(steps), "--no-eval"],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"bench: {row} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            runs[row].append({"step_s_median": statistics.median(r["step_s"][2:]), "peak_rss_mb": r["peak_rss_mb"],
                              "allocator": "tcmalloc" if "LD_PRELOAD" in env else "glibc"})
        out = WORK / f"peer_trl_speed_{steps}.json"
        cmd = [str(PEER_PY), str(P.ROOT / "bench" / "peer_trl.py"), "--teacher", base_path("fp32"), "--every", "2",
               "--batches", str(WORK / "batches.safetensors"), "--steps", str(steps), "--lr", str(LR["distill"]),
               "--beta", "0", "--threads", str(P.THREADS), "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: TRL failed:\n{done.stderr[-3000:]}")
        r = json.loads(out.read_text())
        runs["forward_kl__trl"].append({"step_s_median": r["step_s_median"], "peak_rss_mb": r["peak_rss_mb"],
                                        "versions": r["versions"]})
    med = {k: statistics.median(x["step_s_median"] for x in v) for k, v in runs.items()}
    peak = {k: statistics.median(x["peak_rss_mb"] for x in v) for k, v in runs.items()}
    return {"row": "speed", "steps": steps, "repeats": repeats, "cpu": P.machine(),
            "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": runs, "step_s_median": med, "peak_rss_mb": peak,
            "cached_speedup": med["forward_kl"] / med["forward_kl_cached_sampled"],
            "step_vs_trl": med["forward_kl"] / med["forward_kl__trl"],
            "peak_vs_trl": peak["forward_kl"] / peak["forward_kl__trl"]}


def _record(row: str, res: dict) -> None:
    path = P.RESULTS / "distill.json"
    figures = json.loads(path.read_text())["figures"] if path.is_file() else {}
    figures[row] = res
    P.write_result("distill", {"student": STUDENT, "batch": 4, "seqlen": SEQLEN, "lr": LR}, figures)


def table() -> None:
    path = P.RESULTS / "distill.json"
    if not path.is_file():
        sys.exit("bench: no distill results yet")
    f = json.loads(path.read_text())["figures"]
    print("| row | tokens | persuasion ppl | northangerabbey ppl | KL to teacher | top-1 | step s | peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row, r in f.items():
        if "eval" not in r:
            continue
        e = r["eval"]
        na = e.get("northangerabbey", {}).get("perplexity", float("nan"))
        print(f"| {row} | {r.get('tokens', 0):,} | {e['persuasion']['perplexity']:.2f} | {na:.2f} | {e['persuasion'].get('kl_divergence', float('nan')):.4f} | "
              f"{e['persuasion'].get('top1_agreement', float('nan')):.3f} | {r.get('step_s_median') or 0:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--only", default=",".join(ROWS))
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {LR['distill']:g}; "
                   "another one is recorded as ROW@lrX)")
    one = sub.add_parser("one", help="(internal) one row in this process")
    one.add_argument("--lr", type=float, default=None)
    one.add_argument("--row", required=True, choices=sorted(ROWS))
    one.add_argument("--steps", type=int, default=50)
    one.add_argument("--no-eval", action="store_true")
    spd = sub.add_parser("speed", help="step time and peak memory: online, cached, TRL, in rotation")
    spd.add_argument("--steps", type=int, default=8)
    spd.add_argument("--repeats", type=int, default=2)
    pe = sub.add_parser("peer", help="TRL's GKD trainer at the settings of slimlm's rows")
    pe.add_argument("--only", default=",".join(PEER_ROWS))
    pe.add_argument("--steps", type=int, default=50)
    enc = sub.add_parser("encoder", help="all-MiniLM-L6-v2 distilled into 3 layers")
    enc.add_argument("--steps", type=int, default=100)
    bb = sub.add_parser("blackbox", help="a student fine-tuned on the teacher's generations against raw text")
    bb.add_argument("--steps", type=int, default=32)
    bb.add_argument("--prompts", type=int, default=64)
    sub.add_parser("table")
    a = ap.parse_args()
    if a.cmd == "one":
        print(json.dumps(run_one(a.row, a.steps, evaluate=not a.no_eval, lr=a.lr)))
    elif a.cmd == "speed":
        res = run_speed(a.steps, a.repeats)
        _record("speed", res)
        print(f"bench: speed: step s {res['step_s_median']}, peak MB {res['peak_rss_mb']}; cached x"
              f"{res['cached_speedup']:.2f}, vs TRL step {res['step_vs_trl']:.2f}, peak {res['peak_vs_trl']:.2f}")
    elif a.cmd == "peer":
        for row in a.only.split(","):
            res = run_peer(row, a.steps)
            _record(res["row"], res)
            e = res["eval"]["persuasion"]
            print(f"bench: {res['row']}: persuasion {e['perplexity']:.2f}, KL {e['kl_divergence']:.4f}, step "
                  f"{res['step_s_median']:.2f} s, peak {res['peak_rss_mb']:.0f} MB", flush=True)
    elif a.cmd == "encoder":
        res = run_encoder(a.steps)
        _record(res["row"], res)
        print(f"bench: encoder: embedding cosine {res['embedding_cosine_untrained']['embedding_cosine_mean']:.4f} "
              f"untrained -> {res['embedding_cosine_distilled']['embedding_cosine_mean']:.4f} distilled", flush=True)
    elif a.cmd == "blackbox":
        res = run_blackbox(a.steps, a.prompts)
        _record(res["row"], res)
        for arm in ("untrained", "raw_text", "teacher_generations"):
            print(f"bench: blackbox {arm}: KL {res[arm]['kl_divergence']:.4f}, top-1 {res[arm]['top1_agreement']:.3f}",
                  flush=True)
    elif a.cmd == "run":
        from slimlm.hardware import training_allocator_env
        for row in a.only.split(","):
            lr_opt = [] if a.lr is None else ["--lr", str(a.lr)]
            done = subprocess.run([sys.executable, __file__, "one", "--row", row, "--steps", str(a.steps), *lr_opt],
                                  capture_output=True, text=True, env=training_allocator_env() or os.environ.copy())
            if done.returncode != 0:
                sys.exit(f"bench: {row} failed:\n{done.stderr[-3000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            _record(res["row"], res)
            e = res["eval"]["persuasion"]
            print(f"bench: {res['row']}: persuasion {e['perplexity']:.2f}, KL {e.get('kl_divergence', 0):.4f}, "
                  f"top-1 {e.get('top1_agreement', 0):.3f}", flush=True)
    else:
        table()


if __name__ == "__main__":
    main()
