"""GGUF export against llama.cpp, by the protocol of ../shared/BENCHMARKS.md (results: bench/results/gguf.json).
(Not named gguf.py: run as a script, that name would shadow the gguf package for every script in bench/.)

    python bench/gguf_export.py          # quantize, export, measure (reuses quantized folders in --work)
    python bench/gguf_export.py --work DIR  # keep the quantized models and GGUF files in DIR

1. The default model quantized with `slimlm quantize` on the protocol's calibration windows: GPTQ and AWQ
   4-bit g64 (asymmetric, the defaults) and 4-bit g32 symmetric.
2. Each exported with `slimlm export --format gguf` (g64 asymmetric -> Q4_1, g32 symmetric -> Q4_0; the tied
   embedding/output matrix as Q8_0, float_type=q8_0, as llama.cpp's own files store it).
3. Perplexity on `quick` (persuasion, 32 windows x 512) of the same model run by slimlm and by llama.cpp
   (the same token ids and windows), and their relative difference; greedy continuation (16 tokens after the
   text's first 32) by both, and how many leading tokens agree.
4. llama.cpp's own Q4_0 of the fp32 model: the fp32 model exported as an f32 GGUF, quantized by
   llama_model_quantize (llama-cpp-python's binding) to Q4_0 with the token embedding in Q8_0: the same
   types, hence the same bytes, as the exported g32 files.
5. Decode speed at batch 1: llama.cpp on the exported 4-bit files against fp32 transformers (slimlm.metrics
   .speed on the plain fp32 model), alternating runs in this process, medians (prompt: the text's first 128
   tokens, 64 new tokens).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

SLIMLM = [sys.executable, "-m", "slimlm"]
CASES = {
    # name: (method, quantize options, expected GGUF type)
    "gptq_w4g64": ("gptq", ["--bits", "4", "--group-size", "64"], "Q4_1"),
    "awq_w4g64": ("awq", ["--bits", "4", "--group-size", "64"], "Q4_1"),
    "gptq_w4g32_sym": ("gptq", ["--bits", "4", "--group-size", "32", "--symmetric", "true"], "Q4_0"),
    "awq_w4g32_sym": ("awq", ["--bits", "4", "--group-size", "32", "--symmetric", "true"], "Q4_0"),
}
FLOAT_TYPE = "q8_0"
GREEDY_PROMPT, GREEDY_NEW = 32, 16


def run(cmd: list[str]) -> float:
    """Run a command (its output shown on failure); returns its wall seconds."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def quantize(name: str, work: Path) -> dict:
    method, opts, _ = CASES[name]
    out = work / name
    if (out / "config.json").is_file():
        return {"reused": True}
    wall = run([*SLIMLM, "quantize", "--model", P.MODEL, "--method", method, *opts, "--data",
                P.corpus(P.CALIB_TEXT), "--samples", str(P.CALIB_SAMPLES), "--seqlen", str(P.SEQLEN),
                "--threads", str(P.THREADS), "--output", str(out), "--overwrite"])
    return {"quantize_wall_s": wall}


def export(src: str, out: Path, float_type: str = FLOAT_TYPE) -> float:
    return run([*SLIMLM, "export", "--model", src, "--format", "gguf", "--output", str(out), "--overwrite",
                "--option", f"float_type={float_type}"])


def llamacpp_q4_0(f32_gguf: Path, out: Path) -> None:
    """llama.cpp's own Q4_0 of an f32 GGUF (llama_model_quantize), token embedding (= tied output) in Q8_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    params.nthread = P.THREADS
    rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def greedy_match(model, path: Path, prompt, new_tokens: int = GREEDY_NEW) -> dict:
    """Greedy continuation of `prompt` by slimlm's model (full forward per step, no EOS stop) and by llama.cpp
    on the GGUF: both token lists and the length of their common prefix."""
    import torch

    from slimlm import llamacpp

    llm = llamacpp.open_model(path, prompt.numel() + new_tokens + 8, P.THREADS, logits_all=False)
    try:
        cpp, _, _ = llamacpp.greedy(llm, prompt, new_tokens)
    finally:
        llm.close()
    ids, ref = prompt[None], []
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            ref.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    k = next((i for i, (a, b) in enumerate(zip(cpp, ref)) if a != b), new_tokens)
    return {"greedy_matching_prefix": k, "greedy_new_tokens": new_tokens, "greedy_slimlm": ref,
            "greedy_llamacpp": cpp}


def gguf_types(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="folder for quantized models and GGUF files (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--speed-runs", type=int, default=3, help="alternating llama.cpp / fp32 decode runs (median)")
    ap.add_argument("--note", default="", help="recorded in the results' settings (say, what else ran on the CPU)")
    ap.add_argument("--speed-only", action="store_true",
                    help="keep the figures of bench/results/gguf.json and run only the decode-speed stage on the "
                         "GGUF files of its cases in --work (a run stopped before it)")
    args = ap.parse_args()

    import torch

    import slimlm
    from slimlm import data as D
    from slimlm import llamacpp

    llamacpp.require()
    torch.set_num_threads(P.THREADS)
    work = Path(args.work or tempfile.mkdtemp(prefix="slimlm-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = [c for c in args.only.split(",") if c] or list(CASES)
    tok = slimlm.load_tokenizer(P.MODEL)
    ids = D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["persuasion"])))
    win = D.eval_windows(ids, P.SEQLEN, P.QUICK_WINDOWS)
    figures: dict = {"cases": {}, "complete": False}

    def save():
        """Write what is measured so far (`complete` false until the speed runs are in): a run cut short
        still leaves its figures."""
        settings = {"cases": {n: CASES[n] for n in cases}, "float_type": FLOAT_TYPE, "windows": P.QUICK_WINDOWS,
                    "text": P.EVAL_TEXTS["persuasion"], "speed_runs": args.speed_runs, "prompt_tokens": 128,
                    "new_tokens": 64, "greedy_prompt_tokens": GREEDY_PROMPT, "greedy_new_tokens": GREEDY_NEW,
                    "llama_cpp_python": _version("llama_cpp_python"), "note": args.note}
        return P.write_result("gguf", settings, figures)

    fp32 = slimlm.load_model(P.MODEL)
    if args.speed_only:
        figures = json.loads((P.RESULTS / "gguf.json").read_text())["figures"]
        cases = [n for n in figures["cases"] if (work / f"{n}.gguf").is_file()]
        figures["speed_only_rerun"] = {"cases": cases, "note": args.note}
    else:
        measure(figures, cases, work, fp32, win, ids, save)
    speed(figures, cases, work, fp32, ids, args.speed_runs)
    path = save()
    print(f"wrote {path}")
    print(json.dumps(figures, indent=1))


def measure(figures: dict, cases: list[str], work: Path, fp32, win, ids, save) -> None:
    """Perplexity in slimlm and in llama.cpp, greedy agreement, file bytes and types: fp32, llama.cpp's own
    Q4_0, then each case (quantized in `work` unless there already)."""
    import slimlm
    from slimlm import llamacpp
    from slimlm import metrics as M

    # the fp32 model: transformers' perplexity, its f32 GGUF in llama.cpp, and llama.cpp's own Q4_0 of it
    f32_gguf, q4_0 = work / "fp32.f32.gguf", work / "fp32.llamacpp-q4_0.gguf"
    figures["fp32"] = {"slimlm_ppl": M.score(fp32, win, progress=False)["perplexity"]}
    if not f32_gguf.is_file():
        export(P.MODEL, f32_gguf, "f32")
    if not q4_0.is_file():
        llamacpp_q4_0(f32_gguf, q4_0)
    figures["fp32"]["llamacpp_ppl_f32_gguf"] = llamacpp.perplexity(f32_gguf, win, P.THREADS)["perplexity"]
    figures["fp32"]["ppl_rel_diff"] = figures["fp32"]["llamacpp_ppl_f32_gguf"] / figures["fp32"]["slimlm_ppl"] - 1
    figures["fp32"].update(greedy_match(fp32, f32_gguf, ids[:GREEDY_PROMPT]))
    figures["llamacpp_q4_0"] = {"file_bytes": q4_0.stat().st_size, "types": gguf_types(q4_0),
                                "llamacpp_ppl": llamacpp.perplexity(q4_0, win, P.THREADS)["perplexity"]}
    print(json.dumps(figures, indent=1), flush=True)
    save()

    for name in cases:
        row = quantize(name, work)
        path = work / f"{name}.gguf"
        row["export_wall_s"] = export(str(work / name), path)
        model = slimlm.load_model(str(work / name))
        row["slimlm_ppl"] = M.score(model, win, progress=False)["perplexity"]
        row["llamacpp_ppl"] = llamacpp.perplexity(path, win, P.THREADS)["perplexity"]
        row.update(greedy_match(model, path, ids[:GREEDY_PROMPT]))
        del model
        row["ppl_rel_diff"] = row["llamacpp_ppl"] / row["slimlm_ppl"] - 1
        row["file_bytes"] = path.stat().st_size
        row["types"] = gguf_types(path)
        if CASES[name][2] == "Q4_0":
            row["vs_llamacpp_q4_0"] = row["llamacpp_ppl"] - figures["llamacpp_q4_0"]["llamacpp_ppl"]
            row["same_bytes_as_llamacpp_q4_0"] = row["file_bytes"] == figures["llamacpp_q4_0"]["file_bytes"]
        figures["cases"][name] = row
        save()
        print(name, json.dumps(row, indent=1), flush=True)


def speed(figures: dict, cases: list[str], work: Path, fp32, ids, speed_runs: int) -> None:
    from slimlm import llamacpp
    from slimlm import metrics as M

    q4_0 = work / "fp32.llamacpp-q4_0.gguf"
    # decode speed: llama.cpp on each exported file and on its own Q4_0, against fp32 transformers, alternating
    prompt = ids[:128]
    files = {n: work / f"{n}.gguf" for n in cases} | {"llamacpp_q4_0": q4_0}
    for f in files.values():          # untimed: the first run of a file in a process pages it in (measured
        llamacpp.speed(f, prompt, new_tokens=8, runs=1, threads=P.THREADS)   # 15-27 against 60-82 tokens/s)
    M.speed(fp32, prompt, new_tokens=8, runs=1)
    got: dict[str, list[float]] = {n: [] for n in [*files, "fp32_transformers"]}
    prefill: dict[str, list[float]] = {n: [] for n in got}
    for _ in range(speed_runs):
        for n, f in files.items():
            r = llamacpp.speed(f, prompt, new_tokens=64, runs=1, threads=P.THREADS)
            got[n].append(r["decode_tokens_per_s"])
            prefill[n].append(r["prefill_tokens_per_s"])
        r = M.speed(fp32, prompt, new_tokens=64, runs=1)
        got["fp32_transformers"].append(r["decode_tokens_per_s"])
        prefill["fp32_transformers"].append(r["prefill_tokens_per_s"])
    base = statistics.median(got["fp32_transformers"])
    figures["speed"] = {n: {"decode_tokens_per_s": statistics.median(v), "decode_runs": v,
                            "prefill_tokens_per_s": statistics.median(prefill[n]),
                            "decode_vs_fp32_transformers": statistics.median(v) / base} for n, v in got.items()}
    figures["complete"] = True


def _version(pkg: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
