"""The shipped recipes (recipes/*.yaml) on the default model with the benchmark's texts (../shared/BENCHMARKS.md):
calibration on Pride and Prejudice, training on the three training novels, every stage evaluated on the
quick protocol's persuasion windows (32 x 512, KL and top-1 against the fp32 model, speed). One run folder per
recipe under --work; the rows of each run's report go to bench/results/recipes.json.

    python bench/recipes.py [--only qlora-recover,minitron,...] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

TRAIN_TEXTS = ("austen_sensesensibility.txt", "austen_emma.txt", "austen_mansfieldpark.txt")
RECIPES = ("qlora-recover", "minitron", "compress-then-prompt", "fit-budget")


def run_recipe(name: str, work: Path) -> dict:
    import yaml

    doc = yaml.safe_load((P.ROOT / "recipes" / f"{name}.yaml").read_text())
    doc["report"] = {"data": "eval", "windows": P.QUICK_WINDOWS, "seqlen": P.SEQLEN, "speed": True}
    for stage in doc["stages"]:                       # the protocol's calibration size and window
        (kind, opts), = stage.items()
        if kind in ("quantize", "prune") or (kind == "merge" and opts.get("requantize") == "gptq"):
            opts.setdefault("samples", P.CALIB_SAMPLES)
            opts.setdefault("seqlen", P.SEQLEN)
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    sources = {"calibration": P.corpus(P.CALIB_TEXT), "train": ",".join(P.corpus(t) for t in TRAIN_TEXTS),
               "eval": P.corpus(P.EVAL_TEXTS["persuasion"])}
    args = [sys.executable, "-m", "slimlm", "run", str(recipe), "--output", str(work / name), "--resume"]
    for k in doc["data"]:
        args += ["--data", f"{k}={sources[k]}"]
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {"recipe": name, "error": done.stderr[-2000:]}
    report = json.loads((work / name / "report.json").read_text())
    state = json.loads((work / name / "recipe-state.json").read_text())
    return {"recipe": name, "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": P.machine(),
            "wall_s": time.perf_counter() - t0, "rows": report["rows"], "stages": state["stages"],
            "allocation": {k: {x: v[x] for x in ("summary", "validation", "budget_bits_per_weight",
                                                 "budget_sparsity") if x in v}
                           for k, v in (report.get("allocation") or {}).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(RECIPES))
    ap.add_argument("--work", default=None, help="run folders (default: a temporary folder)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="slimlm-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    path = P.RESULTS / "recipes.json"
    figures = json.loads(path.read_text())["figures"] if path.is_file() else {}
    for name in a.only.split(","):
        res = run_recipe(name, work)
        figures[name] = res
        P.write_result("recipes", {"work": str(work), "train": TRAIN_TEXTS, "calibration": P.CALIB_TEXT,
                                   "eval": P.EVAL_TEXTS["persuasion"]}, figures)
        if "error" in res:
            print(f"bench: {name} failed: {res['error']}", flush=True)
            continue
        last = [r for r in res["rows"] if r.get("perplexity")][-1]
        print(f"bench: {name}: {len(res['stages'])} stages in {res['wall_s']:.0f} s; last evaluated {last['name']}: "
              f"perplexity {last['perplexity']:.2f}", flush=True)


if __name__ == "__main__":
    main()
