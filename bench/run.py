"""Benchmarks by the protocol of ../shared/BENCHMARKS.md. Each suite writes bench/results/<suite>.json.

    python bench/run.py baseline            # the fp32 default model: perplexity (quick and full), speed, memory

Every measurement that reports memory runs in its own process, so peak RSS is that measurement's own.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402


def _child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process (its own peak RSS); it prints one JSON line last."""
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {argv} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_eval(model_ref: str, windows: str, speed: bool, reference: str | None = None,
                 ref_cache: str | None = None) -> dict:
    """In this process: load, perplexity on both texts, optional agreement and speed, peak RSS."""
    import torch

    import slimlm
    from slimlm import data as D
    from slimlm import metrics as M
    from slimlm import models

    torch.set_num_threads(P.THREADS)
    t0 = time.perf_counter()
    model = slimlm.load_model(model_ref)
    load_s = time.perf_counter() - t0
    rss_after_load = M.peak_rss_bytes()
    with torch.no_grad():          # weights mapped from a file count once touched: one token touches them all
        model(input_ids=torch.ones(1, 1, dtype=torch.long))
    rss_ready = M.peak_rss_bytes()
    tok = slimlm.load_tokenizer(model_ref)
    ref = slimlm.load_model(reference) if reference and not ref_cache else None
    out = {"model": model_ref, "load_seconds": load_s, "peak_rss_after_load_mb": rss_after_load / 2**20,
           "peak_rss_ready_mb": rss_ready / 2**20,
           **M.as_dict(M.size(model, models.files_bytes(model_ref)))}
    n = None if windows == "all" else int(windows)
    for key, fname in P.EVAL_TEXTS.items():
        ids = D.tokenize(tok, D.load_text(P.corpus(fname)))
        win = D.eval_windows(ids, P.SEQLEN, n)
        if ref_cache:
            meta = json.loads((Path(ref_cache) / "reference.json").read_text())[key]
            ref = M.ReferenceLogprobs(meta["path"], meta["shape"])
        r = M.score(model, win, ref, progress=False)
        out[f"ppl_{key}"] = r["perplexity"]
        out[f"tokens_{key}"] = r["tokens"]
        if ref is not None:
            out[f"kl_{key}"] = r["kl_divergence"]
            out[f"top1_{key}"] = r["top1_agreement"]
    if speed:
        ids = D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["persuasion"])))
        out.update(M.speed(model, ids[:128], new_tokens=64, runs=5))
    out["peak_rss_mb"] = M.peak_rss_bytes() / 2**20
    return out


def write_reference(model_ref: str, windows: str, work: str) -> dict:
    """The reference's log-probabilities on the evaluation windows, written once per suite run (fp32, raw),
    so that each case's agreement needs no second model: the same numbers, one forward instead of two."""
    import torch

    import slimlm
    from slimlm import data as D
    from slimlm import metrics as M

    torch.set_num_threads(P.THREADS)
    model = slimlm.load_model(model_ref)
    tok = slimlm.load_tokenizer(model_ref)
    n = None if windows == "all" else int(windows)
    meta = {}
    for key, fname in P.EVAL_TEXTS.items():
        win = D.eval_windows(D.tokenize(tok, D.load_text(P.corpus(fname))), P.SEQLEN, n)
        cache = M.ReferenceLogprobs.write(model, win, Path(work) / f"reference-{key}.f32", progress=False)
        meta[key] = {"path": cache.path, "shape": list(cache.shape)}
    (Path(work) / "reference.json").write_text(json.dumps(meta))
    return meta


def measure_speed_pair(model_ref: str, reference: str, runs: int) -> dict:
    """Decode and prefill tokens/s of a model and of the reference, measured in alternation in one process
    (model, reference, model, reference, ...): machine noise then hits both alike. Medians over `runs`."""
    import statistics

    import torch

    import slimlm
    from slimlm import data as D
    from slimlm import metrics as M

    torch.set_num_threads(P.THREADS)
    models_ = {"model": slimlm.load_model(model_ref), "reference": slimlm.load_model(reference)}
    tok = slimlm.load_tokenizer(reference)
    prompt = D.tokenize(tok, D.load_text(P.corpus(P.EVAL_TEXTS["persuasion"])))[:128]
    got = {k: {"decode": [], "prefill": []} for k in models_}
    for _ in range(runs):
        for k, m in models_.items():
            r = M.speed(m, prompt, new_tokens=64, runs=1)
            got[k]["decode"].append(r["decode_tokens_per_s"])
            got[k]["prefill"].append(r["prefill_tokens_per_s"])
    med = {k: {f: statistics.median(v) for f, v in d.items()} for k, d in got.items()}
    # each run's own ratio (model over the reference measured right after it): the machine's drift between
    # runs cancels in it; kept beside the ratio of the medians, which remains the headline figure
    paired = {f: [m / r for m, r in zip(got["model"][f], got["reference"][f])] for f in ("decode", "prefill")}
    return {"decode_tokens_per_s": med["model"]["decode"], "prefill_tokens_per_s": med["model"]["prefill"],
            "reference_decode_tokens_per_s": med["reference"]["decode"],
            "reference_prefill_tokens_per_s": med["reference"]["prefill"],
            "decode_vs_fp32": med["model"]["decode"] / med["reference"]["decode"],
            "prefill_vs_fp32": med["model"]["prefill"] / med["reference"]["prefill"],
            "decode_vs_fp32_runs": paired["decode"], "prefill_vs_fp32_runs": paired["prefill"],
            "decode_vs_fp32_paired_median": statistics.median(paired["decode"]),
            "prefill_vs_fp32_paired_median": statistics.median(paired["prefill"]),
            "decode_tokens_per_s_runs": got["model"]["decode"], "prefill_tokens_per_s_runs": got["model"]["prefill"],
            "reference_decode_tokens_per_s_runs": got["reference"]["decode"],
            "reference_prefill_tokens_per_s_runs": got["reference"]["prefill"],
            "speed_runs": runs, "prompt_tokens": int(prompt.shape[0]), "new_tokens": 64}


def measure_compress(family: str, method: str, options: dict, out_dir: str) -> dict:
    """In this process: load the default, calibrate on the protocol's windows, compress, save; time and RSS."""
    import torch

    import slimlm
    from slimlm import api, io, models, registry
    from slimlm import metrics as M
    from slimlm.configs import build_config

    torch.set_num_threads(P.THREADS)
    from slimlm.calibration import RunnerOptions

    options = dict(options)
    runner = RunnerOptions(progress=False, **options.pop("runner", {}))   # e.g. {"batch_size": 4}
    stages = [(family, method, options)]
    if "then" in options:
        stages.append(tuple(options.pop("then")))
    model = slimlm.load_model(P.MODEL)
    tok = slimlm.load_tokenizer(P.MODEL)
    windows = api.calibration_data(tok, P.corpus(P.CALIB_TEXT), samples=P.CALIB_SAMPLES, seqlen=P.SEQLEN)
    t0 = time.perf_counter()
    report = {}
    allocation = None
    for fam, meth, opts in stages:
        m = registry.get(fam, meth)
        opts = dict(opts)
        budget = opts.pop("budget", None)          # {"budget_bits": 3.5} or {"budget_sparsity": 0.6}: slimlm.budget
        config = build_config(m.config_cls, opts, meth)
        if budget is not None:
            from slimlm import budget as B
            config, allocation = B.apply(fam, model, config, windows, budget)
        report = getattr(api, fam)(model, config, data=windows if m.data_needed(config) else None, runner=runner)
    wall = time.perf_counter() - t0
    peak = M.peak_rss_bytes()
    with io.atomic_dir(out_dir, overwrite=True) as tmp:
        models.save_model(model, tok, tmp)
    out = {"wall_s": wall, "peak_rss_mb": peak / 2**20, "file_bytes": models.files_bytes(out_dir),
           "report": {k: v for k, v in (report or {}).items() if isinstance(v, (int, float, str, bool))}}
    if allocation is not None:
        out["allocation"] = {k: v for k, v in allocation.items() if k != "per_layer"}
        out["allocation"]["kl_reference"] = {n: t["kl_reference"] for n, t in allocation["per_layer"].items()}
    return out


def _peer(method: str, opts: dict, workdir: Path, evaluate: bool = True) -> dict:
    """llm-compressor on the same model, data and settings, in its own venv (bench/setup_peer.sh); without
    `evaluate` it only compresses (a repeat timing the same settings again)."""
    import os

    py = Path(os.environ.get("SLIMLM_PEER_VENV", Path.home() / ".cache/slimlm/peer-venv")) / "bin" / "python"
    if not py.is_file():
        return {"error": f"peer venv missing ({py}); run bash bench/setup_peer.sh"}
    from slimlm import models

    model_dir = models.embedded_folder(P.MODEL)
    out = workdir / f"peer-{method}.json"
    cmd = [str(py), str(Path(__file__).parent / "peer_llmcompressor.py"), "--model", str(model_dir),
           "--method", method, "--calib", P.corpus(P.CALIB_TEXT), "--json", str(out)]
    if evaluate:
        cmd += ["--eval", *[P.corpus(f) for f in P.EVAL_TEXTS.values()]]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(out.read_text())


QUANT_CASES = {
    # name: (method, slimlm options, peer method or None, peer options)
    "rtn_w4g64": ("rtn", {"bits": "4", "group_size": "64"}, "rtn", {"bits": 4, "group_size": 64}),
    "rtn_w3g64": ("rtn", {"bits": "3", "group_size": "64"}, "rtn", {"bits": 3, "group_size": 64}),
    "rtn_w2g64": ("rtn", {"bits": "2", "group_size": "64"}, "rtn", {"bits": 2, "group_size": 64}),
    "rtn_w4pc": ("rtn", {"bits": "4", "group_size": "-1"}, "rtn", {"bits": 4, "group_size": -1}),
    "gptq_w4g64": ("gptq", {"bits": "4", "group_size": "64"}, "gptq", {"bits": 4, "group_size": 64}),
    "gptq_w3g64": ("gptq", {"bits": "3", "group_size": "64"}, "gptq", {"bits": 3, "group_size": 64}),
    "gptq_w2g64": ("gptq", {"bits": "2", "group_size": "64"}, "gptq", {"bits": 2, "group_size": 64}),
    "gptq_w4pc": ("gptq", {"bits": "4", "group_size": "-1"}, "gptq", {"bits": 4, "group_size": -1}),
    "awq_w4g64": ("awq", {"bits": "4", "group_size": "64"}, "awq", {"bits": 4, "group_size": 64}),
    "awq_w3g64": ("awq", {"bits": "3", "group_size": "64"}, "awq", {"bits": 3, "group_size": 64}),
    # AWQ variants as measured (before clip_refine, clip_refit, refit_in_search became defaults on 2026-12-02: off in them)
    "awq_w3g64_clipsearch": ("awq", {"bits": "3", "group_size": "64", "clip_in_search": "true", "clip_refine": "false", "clip_refit": "0", "refit_in_search": "false"}, None, {}),
    "awq_w3g64_module": ("awq", {"bits": "3", "group_size": "64", "search_loss": "module",
                                 "search_windows": "16", "clip_refine": "false", "clip_refit": "0", "refit_in_search": "false"}, None, {}),
    "awq_w3g64_clipskip": ("awq", {"bits": "3", "group_size": "64", "clip_skip": "q_proj,k_proj", "clip_refine": "false", "clip_refit": "0", "refit_in_search": "false"}, None, {}),
    "awq_w3g64_skip1": ("awq", {"bits": "3", "group_size": "64", "skip_positions": "1", "clip_refine": "false", "clip_refit": "0", "refit_in_search": "false"}, None, {}),
    # least-squares step sizes after the clipping search (clip_refit), zero points moved too, k/v weighted
    "awq_w3g64_refit": ("awq", {"bits": "3", "group_size": "64", "clip_refit": "3", "clip_refit_zero": "false", "refit_in_search": "false"}, None, {}),
    "awq_w3g64_refitzero": ("awq", {"bits": "3", "group_size": "64", "clip_refit": "3", "clip_refit_zero": "true", "refit_in_search": "false"}, None, {}),
    "awq_w3g64_refitzero_kv": ("awq", {"bits": "3", "group_size": "64", "clip_refit": "3", "clip_refit_zero": "true",
                                       "kv_weight": "true", "refit_in_search": "false"}, None, {}),
    "awq_w3g64_refitzero_rms": ("awq", {"bits": "3", "group_size": "64", "clip_refit": "3", "clip_refit_zero": "true",
                                        "rms_scales": "true", "refit_in_search": "false"}, None, {}),
    # the screen of refit_in_search, kept by its name: the same settings as awq_w3g64 since it became the default
    "awq_w3g64_refit_in_search": ("awq", {"bits": "3", "group_size": "64", "clip_refit": "3", "clip_refit_zero": "true",
                                          "refit_in_search": "true"}, None, {}),
    "awq_w3g64_refit_kv": ("awq", {"bits": "3", "group_size": "64", "clip_refit": "3", "clip_refit_zero": "false", "kv_weight": "true", "refit_in_search": "false"}, None, {}),
    "awq_w2g64": ("awq", {"bits": "2", "group_size": "64"}, "awq", {"bits": 2, "group_size": 64}),
    "awq_w4pc": ("awq", {"bits": "4", "group_size": "-1"}, "awq", {"bits": 4, "group_size": -1}),
    # per-layer bits and group sizes (2/3/4/8 bits, g64 or per channel) under 3.5 bits per weight (issue 29)
    "gptq_budget_3p5": ("gptq", {"group_size": "64", "budget": {"budget_bits": 3.5}}, None, {}),
    "nf4_dq": ("nf4", {}, None, {}),
    "llm_int8": ("int8", {}, None, {}),
}

# The pruning suite: method, options, peer. A case may chain a second stage ("then": family, method, options).
_SPARSITIES = {"50": "0.5", "2of4": "2:4", "4of8": "4:8", "60": "0.6", "70": "0.7"}
_PEER_SPARSE = {"50": "0.5", "2of4": "2:4"}
PRUNE_CASES = {
    f"{m}_{k}": (m, {"sparsity": v}, m if m != "magnitude" and k in _PEER_SPARSE else None, {"sparsity": v})
    for m in ("magnitude", "wanda", "sparsegpt") for k, v in _SPARSITIES.items()
}
# The same settings with one forward per block (propagate=dense): the peer row beside them is llm-compressor at
# its default (propagate_error=True, two forwards per block), the comparison the targets name.
PRUNE_CASES.update({
    f"{m}_{k}_dense": (m, {"sparsity": v, "propagate": "dense"}, m, {"sparsity": v})
    for m in ("wanda", "sparsegpt") for k, v in _PEER_SPARSE.items()
})
PRUNE_CASES.update({
    # per-layer sparsities (0.2 .. 0.9) under 60% on average (issue 29), against sparsegpt_60
    "sparsegpt_budget_60": ("sparsegpt", {"budget": {"budget_sparsity": 0.6}}, None, {}),
    "sparsegpt_50_joint_w4g64": ("sparsegpt", {"sparsity": "0.5", "bits": "4", "group_size": "64"}, None, {}),
    "sparsegpt_50_then_rtn_w4g64": ("sparsegpt", {"sparsity": "0.5", "then": ["quantize", "rtn",
                                                                        {"bits": "4", "group_size": "64"}]},
                                    None, {}),
    "structured_10_taylor": ("structured", {"ratio": "0.1", "importance": "taylor", "head_fraction": "0"},
                             None, {}),
    "structured_20_taylor": ("structured", {"ratio": "0.2", "importance": "taylor", "head_fraction": "0"},
                             None, {}),
    "structured_20_activation": ("structured", {"ratio": "0.2", "importance": "activation",
                                                "head_fraction": "0"}, None, {}),
    "structured_10_activation": ("structured", {"ratio": "0.1", "importance": "activation",
                                                "head_fraction": "0"}, None, {}),
    "structured_30_activation": ("structured", {"ratio": "0.3", "importance": "activation",
                                                "head_fraction": "0"}, None, {}),
    "structured_20_magnitude": ("structured", {"ratio": "0.2", "importance": "magnitude", "head_fraction": "0"},
                                None, {}),
    # the same 20% with whole decoder layers among the removed units (MLP channels take the rest)
    "structured_20_taylor_2layers": ("structured", {"ratio": "0.2", "importance": "taylor", "head_fraction": "0",
                                                    "layers": "2"}, None, {}),
    "structured_20_taylor_4layers": ("structured", {"ratio": "0.2", "importance": "taylor", "head_fraction": "0",
                                                    "layers": "4"}, None, {}),
    "structured_30_taylor": ("structured", {"ratio": "0.3", "importance": "taylor", "head_fraction": "0"},
                             None, {}),
})


def suite_compress(args, family: str, cases: dict, result_name: str) -> None:
    """Each case: compress in one process, evaluate the saved folder in another; peer rows beside them."""
    import tempfile

    wanted = [c for c in args.only.split(",") if c] if args.only else list(cases)
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        sys.exit(f"bench: unknown case(s) {', '.join(unknown)}; known: {', '.join(cases)}")
    if args.peer_only and args.no_peer:
        sys.exit("bench: --peer-only and --no-peer exclude each other; give one of them")
    selected = wanted  # in the order given
    work = Path(tempfile.mkdtemp(prefix="slimlm-bench-"))
    path = P.RESULTS / f"{result_name}.json"
    rows = {}
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        rows = old["figures"]["rows"]
        last = max((r.get("run", "") for r in rows.values()), default="")
        for r in rows.values():   # the file's machine is that of its last run; older rows' stays unknown
            r.setdefault("machine", old.get("machine") if r.get("run", "") == last else None)
    try:
        _run_cases(args, family, cases, result_name, selected, work, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")


def _run_cases(args, family: str, cases: dict, result_name: str, selected: list, work: Path, rows: dict) -> None:
    run = time.strftime("%Y-%m-%dT%H:%M:%S")   # rows measured in one invocation share this
    here = {**P.machine(), "threads": P.THREADS}   # and this: the file mixes runs, possibly on other CPUs
    if not args.peer_only:   # the peer evaluates its own model; slimlm's rows need the fp32 reference
        fp32 = _child(["eval-one", P.MODEL, str(P.QUICK_WINDOWS), "--speed"])
        _keep_earlier(rows, "fp32", run)
        rows["fp32"] = {"tool": "reference", "run": run, "machine": here, **fp32}
        _child(["reference-one", P.MODEL, str(P.QUICK_WINDOWS), str(work)])
    for name in selected:
        method, opts, peer_method, peer_opts = cases[name]
        if args.peer_only:
            if peer_method:
                print(f"[{name}] llm-compressor {peer_method} {peer_opts}", flush=True)
                peer = _peer(peer_method, peer_opts, work)
                _keep_earlier(rows, f"{name}__llmcompressor", run)
                rows[f"{name}__llmcompressor"] = {"tool": "llm-compressor", "run": run, "machine": here, **peer}
                P.write_result(result_name, {"cases": selected}, {"rows": rows})
            continue
        with_peer = bool(peer_method and not args.no_peer and (args.peers is None or name in args.peers.split(",")))
        # a wall-time ratio is a median over repeats (BENCHMARKS.md), each pair run back to back: slimlm, peer
        repeats = max(1, args.repeats) if with_peer else 1
        out_dir = str(work / name)
        comps, peers = [], []
        try:
            for k in range(repeats):
                print(f"[{name}] slimlm {method} {opts} (run {k + 1}/{repeats})", flush=True)
                comps.append(_child(["compress-one", family, method, json.dumps(opts), out_dir]))
                if with_peer:
                    print(f"[{name}] llm-compressor {peer_method} {peer_opts} (run {k + 1}/{repeats})", flush=True)
                    # the peer evaluates its model once: on its first run that works
                    evaluated = any("error" not in p for p in peers)
                    peers.append(_peer(peer_method, peer_opts, work, evaluate=not evaluated))
            comp = _merge_repeats(comps, "peak_rss_mb")
            # unstructured and N:M sparse weights run as dense ones on CPU: speed is measured where it can change
            speed = family == "quantize" or method == "structured"
            ev = _child(["eval-one", out_dir, str(P.QUICK_WINDOWS), "--reference", P.MODEL, "--ref-cache", str(work)])
            # the evaluating process's own peak is not the compression's: keep both, under different names
            ev["eval_peak_rss_mb"] = ev.pop("peak_rss_mb")
            row = {"tool": "slimlm", "run": run, "machine": here, "method": method, "options": opts, **comp, **ev,
                   "resident_vs_fp32": ev["resident_bytes"] / fp32["resident_bytes"],
                   "file_vs_fp32": comp["file_bytes"] / fp32["disk_bytes"]}
            if speed:
                row.update(_child(["speed-pair", out_dir, P.MODEL, str(args.speed_runs)]))
        except RuntimeError as e:
            row = {"tool": "slimlm", "method": method, "options": opts, "error": str(e)[-2000:]}
        shutil.rmtree(out_dir, ignore_errors=True)
        _keep_earlier(rows, name, run)
        rows[name] = row
        if with_peer and peers:
            peer = _merge_repeats(peers, "peak_rss_mb_after_compress")
            _keep_earlier(rows, f"{name}__llmcompressor", run)
            rows[f"{name}__llmcompressor"] = {"tool": "llm-compressor", "run": run, "machine": here, **peer}
            pairs = [(c["wall_s"], p["wall_s"]) for c, p in zip(comps, peers) if "wall_s" in c and "wall_s" in p]
            if pairs and "error" not in row:
                ratios = [a / b for a, b in pairs]
                row["wall_vs_llmcompressor"] = statistics.median(ratios)
                row["wall_vs_llmcompressor_runs"] = ratios
                if row.get("peak_rss_mb") and peer.get("peak_rss_mb_after_compress"):
                    row["peak_vs_llmcompressor"] = row["peak_rss_mb"] / peer["peak_rss_mb_after_compress"]
        P.write_result(result_name, {"cases": selected}, {"rows": rows})


def _merge_repeats(runs: list[dict], peak_key: str) -> dict:
    """One row from repeated compressions of the same settings: the first run's fields (its perplexities,
    report, settings), wall_s and the peak as medians over the runs that worked, each run's values listed."""
    ok = [r for r in runs if "error" not in r and "wall_s" in r]
    if not ok:
        return runs[0]
    row = {**ok[0]}
    if len(runs) > 1:
        row["repeats"] = len(ok)
        row["wall_s_runs"] = [r["wall_s"] for r in ok]
        row["wall_s"] = statistics.median(row["wall_s_runs"])
        peaks = [r[peak_key] for r in ok if r.get(peak_key) is not None]
        if peaks:
            row[f"{peak_key}_runs"] = peaks
            row[peak_key] = statistics.median(peaks)
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            row["repeat_errors"] = errors
    return row


def _keep_earlier(rows: dict, key: str, run: str) -> None:
    """A row about to be replaced by this run's stays in the file as `key@its run`: nothing measured is lost."""
    if key in rows and rows[key].get("run") != run:
        earlier = rows.pop(key)
        rows[f"{key}@{earlier.get('run', 'earlier')}"] = earlier


def suite_baseline(args) -> None:
    quick = _child(["eval-one", P.MODEL, str(P.QUICK_WINDOWS), "--speed"])
    full = _child(["eval-one", P.MODEL, "all"])
    figures = {"quick": quick, "full": {k: v for k, v in full.items() if k.startswith(("ppl_", "tokens_"))}}
    path = P.write_result("baseline_fp32", {"dtype": "float32"}, figures)
    print(f"wrote {path}")
    print(json.dumps({k: quick[k] for k in quick if k.startswith(("ppl_", "decode", "prefill", "load", "peak"))}, indent=1))


def _peer_ppl(row: dict, key: str) -> float | None:
    for name, v in (row.get("ppl") or {}).items():
        if key in name.replace("_", ""):
            return v["ppl"] if isinstance(v, dict) else v
    return None


def _at(name: str) -> str:
    """A kept earlier row's run stamp, as the table shows it (the peer's key carries it after its suffix)."""
    return f" (@{name.split('@', 1)[1]})" if "@" in name and "__" in name else ""


def _cpu(row: dict, default: dict | None = None) -> str:
    """avx512_bf16 or avx2: which kind of CPU a row was measured on (they differ 2-7x in bf16 speed)."""
    m = row.get("machine") or default or {}
    return "avx512_bf16" if m.get("avx512_bf16") else ("avx2" if m.get("avx2") else ("other" if m else "-"))


def table(result_name: str, latest: bool = False) -> str:
    """A markdown table of a results file (the README's figures are pasted from it).

    latest: only each case's newest row per tool (rows kept from earlier runs carry "@" and their run stamp)."""
    doc = json.loads((P.RESULTS / f"{result_name}.json").read_text())
    rows = doc["figures"]["rows"]
    if latest:
        rows = {k: v for k, v in rows.items() if "@" not in k}
        rows = dict(sorted(rows.items(), key=lambda kv: (kv[1].get("tool") != "reference", kv[0].split("__")[0],
                                                         kv[1].get("tool") != "slimlm")))
    head = ("| case | tool | ppl persuasion | ppl northanger | KL | top-1 | wall s | peak MB | file x | "
            "resident x | ready MB | decode x | prefill x | run | cpu |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def f(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    for name, r in rows.items():
        if r.get("tool") == "llm-compressor":
            lines.append(f"| {name.split('__')[0]}{_at(name)} | llm-compressor | {f(_peer_ppl(r, 'persuasion'))} | "
                         f"{f(_peer_ppl(r, 'northanger'))} | - | - | {f(r.get('wall_s'), 1)} | "
                         f"{f(r.get('peak_rss_mb_after_compress'), 0)} | - | - | - | - | - | {r.get('run', '-')} | {_cpu(r, doc.get('machine'))} |"
                         if "error" not in r else
                         f"| {name.split('__')[0]}{_at(name)} | llm-compressor | error: {r['error'][:80]} |")
            continue
        if "error" in r:
            lines.append(f"| {name} | slimlm | error (see the json) |")
            continue
        lines.append(f"| {name} | {r.get('tool')} | {f(r.get('ppl_persuasion'))} | {f(r.get('ppl_northangerabbey'))} | "
                     f"{f(r.get('kl_persuasion'), 3)} | {f(r.get('top1_persuasion'), 3)} | {f(r.get('wall_s'), 1)} | "
                     f"{f(r.get('peak_rss_mb'), 0)} | {f(r.get('file_vs_fp32'), 3)} | {f(r.get('resident_vs_fp32'), 3)} | "
                     f"{f(r.get('peak_rss_ready_mb'), 0)} | "
                     f"{f(r.get('decode_vs_fp32'))} | {f(r.get('prefill_vs_fp32'))} | {r.get('run', '-')} | "
                     f"{_cpu(r, doc.get('machine'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("baseline", help="the fp32 default model")
    q = sub.add_parser("quant", help="quantization methods against fp32 and llm-compressor")
    pr = sub.add_parser("prune", help="pruning methods against fp32 and llm-compressor")
    for sp in (q, pr):
        sp.add_argument("--only", default="", help="comma-separated case names")
        sp.add_argument("--no-peer", action="store_true", help="skip the llm-compressor rows")
        sp.add_argument("--peer-only", action="store_true",
                        help="run only the llm-compressor rows of the cases (slimlm's rows stay as they are; "
                             "wall-time ratios need both tools in one run, so none is written)")
        sp.add_argument("--peers", default=None, help="comma-separated cases whose llm-compressor rows run "
                        "(default: every case that has one); an earlier run's peer rows stay in the file")
        sp.add_argument("--fresh", action="store_true", help="start a new results file instead of merging")
        sp.add_argument("--repeats", type=int, default=3,
                        help="compressions of each case that has an llm-compressor row, alternating with the "
                             "peer's; wall time and peak are medians over them (BENCHMARKS.md: at least 3)")
        sp.add_argument("--speed-runs", type=int, default=9,
                        help="alternating model/fp32 runs behind each speed ratio (median)")
    t = sub.add_parser("table", help="print a results file as a markdown table")
    t.add_argument("result", help="quantization or pruning")
    t.add_argument("--latest", action="store_true", help="only each case's newest rows, not those kept from earlier runs")
    c = sub.add_parser("compress-one", help="(internal) one compression in this process")
    c.add_argument("family")
    c.add_argument("method")
    c.add_argument("options")
    c.add_argument("out_dir")
    one = sub.add_parser("eval-one", help="(internal) one evaluation in this process")
    one.add_argument("model")
    one.add_argument("windows")
    one.add_argument("--speed", action="store_true")
    one.add_argument("--reference")
    one.add_argument("--ref-cache", help="folder holding the reference's log-probabilities (reference-one)")
    rc = sub.add_parser("reference-one", help="(internal) write the reference's log-probabilities")
    rc.add_argument("model")
    rc.add_argument("windows")
    rc.add_argument("work")
    sp1 = sub.add_parser("speed-pair", help="(internal) a model's speed against the reference's, alternating")
    sp1.add_argument("model")
    sp1.add_argument("reference")
    sp1.add_argument("runs", type=int)
    args = ap.parse_args()
    if args.cmd == "eval-one":
        print(json.dumps(measure_eval(args.model, args.windows, args.speed, args.reference, args.ref_cache)))
    elif args.cmd == "reference-one":
        print(json.dumps(write_reference(args.model, args.windows, args.work)))
    elif args.cmd == "speed-pair":
        print(json.dumps(measure_speed_pair(args.model, args.reference, args.runs)))
    elif args.cmd == "compress-one":
        print(json.dumps(measure_compress(args.family, args.method, json.loads(args.options), args.out_dir)))
    elif args.cmd == "baseline":
        suite_baseline(args)
    elif args.cmd == "quant":
        suite_compress(args, "quantize", QUANT_CASES, "quantization")
    elif args.cmd == "table":
        print(table(args.result, latest=args.latest))
    elif args.cmd == "prune":
        suite_compress(args, "prune", PRUNE_CASES, "pruning")


if __name__ == "__main__":
    main()
