"""The standard benchmark of ../shared/BENCHMARKS.md: fixed inputs, and a results file per run."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CORPORA = Path(os.environ.get("SLIMLM_CORPORA", ROOT.parent / "shared" / "corpora"))

MODEL = "smollm2-135m"
EVAL_TEXTS = {"persuasion": "austen_persuasion.txt", "northangerabbey": "austen_northangerabbey.txt"}
CALIB_TEXT = "austen_prideprejudice.txt"
SEQLEN = 512
QUICK_WINDOWS = 32
CALIB_SAMPLES = 128
THREADS = int(os.environ.get("SLIMLM_BENCH_THREADS", "2"))   # the protocol: 2; fewer only for side experiments


def corpus(name: str) -> str:
    p = CORPORA / name
    if not p.is_file():
        sys.exit(f"bench: {p} not found; the benchmark needs ../shared/corpora (or set SLIMLM_CORPORA)")
    return str(p)


def machine() -> dict:
    load = os.getloadavg()
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_1_5_15": [round(x, 2) for x in load]}
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["avx2"] = "avx2" in flags
        info["cpu_model"] = Path("/proc/cpuinfo").read_text().split("model name", 1)[1].split(":", 1)[1].split("\n")[0].strip()
    except (OSError, IndexError):
        pass
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("slimlm", "torch", "transformers", "safetensors", "gguf", "compressed-tensors", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_result(name: str, settings: dict, figures: dict | list) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
           "machine": machine(), "versions": versions(), "protocol": {
               "model": MODEL, "seqlen": SEQLEN, "quick_windows": QUICK_WINDOWS, "calibration": CALIB_TEXT,
               "calibration_samples": CALIB_SAMPLES, "threads": THREADS, "eval_texts": EVAL_TEXTS},
           "settings": settings, "figures": figures}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path
