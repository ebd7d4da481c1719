"""report.md and PNG plots beside an output: what a command or a recipe did to the model and what it cost.

Rows (one per stage, and one for the model a recipe started from): perplexity, KL and top-1 agreement with
the starting model, size on disk and in memory, prefill and decode speed (where measured), wall time and peak
memory of the stage. Plots: size against perplexity (every row), training loss curves (metrics.jsonl of the
training stages), per-layer sensitivity and allocation (allocation.json of a budgeted stage), wall time and
peak memory per stage. matplotlib is optional (`pip install 'slimlm[report]'`): without it the report is text
and says so.

Every figure comes from files the run wrote (eval JSON, metrics.jsonl, allocation.json, train_report.json),
so `slimlm report DIR...` redraws a report, or compares runs, without running anything.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

PLOTS_MISSING = "plots: matplotlib is not installed; `pip install 'slimlm[report]'` (or matplotlib) draws them"


# ------------------------------------------------------------------------------------------- peak memory

def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux: VmHWM, by writing 5 to /proc/self/clear_refs), so the
    next peak_rss_mb() is the peak of what runs after. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ reading

def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def loss_curve(folder: Path) -> list[tuple[int, float]]:
    f = folder / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            r = json.loads(line)
            out.append((int(r["step"]), float(r["loss"])))
        except (ValueError, KeyError):
            continue
    return out


def folder_bytes(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.endswith(".png")
                   and f.name != "report.md")
    return None


# ------------------------------------------------------------------------------------------------ writing

COLUMNS = [("seconds", "wall s", "{:.1f}"), ("peak_rss_mb", "peak MB", "{:.0f}"),
           ("perplexity", "perplexity", "{:.3f}"), ("kl_divergence", "KL vs start", "{:.4f}"),
           ("top1_agreement", "top-1 vs start", "{:.2%}"), ("disk_mb", "disk MB", "{:.1f}"),
           ("memory_mb", "memory MB", "{:.1f}"), ("bits_per_weight", "bits/weight", "{:.2f}"),
           ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"), ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
           ("final_loss", "final loss", "{:.4f}")]


def row_from_eval(name: str, ev: dict | None, **extra) -> dict:
    """A report row from an api.evaluate result (or None) and the stage's own figures."""
    row = {"name": name, **{k: v for k, v in extra.items() if v is not None}}
    if ev:
        for k in ("perplexity", "kl_divergence", "top1_agreement", "bits_per_weight", "prefill_tokens_per_s",
                  "decode_tokens_per_s", "pseudo_perplexity", "embedding_cosine_mean"):
            if ev.get(k) is not None:
                row[k] = ev[k]
        if ev.get("resident_bytes"):
            row["memory_mb"] = ev["resident_bytes"] / 1e6
        if ev.get("disk_bytes") and "disk_mb" not in row:
            row["disk_mb"] = ev["disk_bytes"] / 1e6
    return row


def _table(rows: list[dict]) -> list[str]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    out = ["| stage | " + " | ".join(c[1] for c in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for r in rows:
        cells = ["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return out


def _plots(folder: Path, rows: list[dict], curves: dict[str, list], allocation: dict[str, dict]) -> list[str]:
    """Draw the PNGs into `folder`; returns their file names (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []

    def save(fig, name):
        tmp = folder / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, folder / name)
        files.append(name)

    pts = [r for r in rows if r.get("disk_mb") and r.get("perplexity") and r.get("in_plot", True)]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, r in enumerate(pts):
            ax.scatter(r["disk_mb"], r["perplexity"], s=36)
            ax.annotate(r["name"], (r["disk_mb"], r["perplexity"]), textcoords="offset points",
                        xytext=(5, 4 - 10 * (i % 3)), fontsize=8)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("perplexity")
        if max(r["perplexity"] for r in pts) / min(r["perplexity"] for r in pts) > 10:
            ax.set_yscale("log")
        ax.set_title("size against quality")
        ax.grid(alpha=0.3)
        save(fig, "size_quality.png")
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for name, pts_ in curves.items():
            if pts_:
                ax.plot([p[0] for p in pts_], [p[1] for p in pts_], label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("training loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "loss_curves.png")
    for stage, alloc in allocation.items():
        per = alloc.get("per_layer") or {}
        if not per:
            continue
        names = list(per)
        cost = [per[n]["cost"][per[n]["setting"]] for n in names]
        kl = [per[n]["kl_reference"] for n in names]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True)
        a1.bar(range(len(names)), kl, color="tab:red")
        a1.set_yscale("log")
        a1.set_ylabel(f"KL, layer alone at {alloc.get('reference_setting', 'ref')}")
        a1.set_title(f"{stage}: per-layer sensitivity and allocation")
        a2.bar(range(len(names)), cost, color="tab:blue")
        a2.set_ylabel("bits/weight" if alloc.get("family") == "quantize" else "kept fraction")
        a2.set_xlabel("layer (model order)")
        ticks = list(range(0, len(names), max(1, len(names) // 12)))
        a2.set_xticks(ticks, [names[i].replace("model.layers.", "") for i in ticks], rotation=60, fontsize=7)
        save(fig, "allocation_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) + ".png")
    timed = [r for r in rows if r.get("seconds") is not None or r.get("peak_rss_mb") is not None]
    if timed:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        a1.barh([r["name"] for r in timed], [r.get("seconds") or 0 for r in timed], color="tab:gray")
        a1.set_xlabel("wall seconds")
        a2.barh([r["name"] for r in timed], [r.get("peak_rss_mb") or 0 for r in timed], color="tab:green")
        a2.set_xlabel("peak MB")
        a2.set_yticks([])
        save(fig, "cost.png")
    return files


def write(folder: str | os.PathLike, title: str, rows: list[dict], *, curves: dict[str, list] | None = None,
          allocation: dict[str, dict] | None = None, notes: list[str] | None = None) -> Path:
    """report.md (and PNGs) in `folder`, each file written whole or not at all."""
    folder = Path(folder)
    curves, allocation = curves or {}, allocation or {}
    plots = _plots(folder, rows, curves, allocation)
    lines = [f"# {title}", "", *([*notes, ""] if notes else []), *_table(rows), ""]
    for name, pts in curves.items():
        if pts:
            lines.append(f"- {name}: loss {pts[0][1]:.4f} at step {pts[0][0]} -> {pts[-1][1]:.4f} at step {pts[-1][0]}")
    for stage, alloc in allocation.items():
        s = alloc.get("summary", {})
        budget = alloc.get("budget_bits_per_weight", alloc.get("budget_sparsity"))
        lines.append(f"- {stage}: allocation under {budget:.4g} ({alloc.get('family')}): average "
                     f"{s.get('average_cost', float('nan')):.4g}; settings {s.get('settings')}; "
                     f"predicted loss {s.get('predicted_loss', float('nan')):.4g}"
                     + (f"; proxy vs measured KL: Spearman {alloc['validation']['spearman']:.3f} over "
                        f"{alloc['validation']['pairs']} pairs" if alloc.get("validation") else ""))
    lines.append("")
    if plots:
        lines += [f"![{p[:-4]}]({p})" for p in plots]
    else:
        lines.append(PLOTS_MISSING)
    data = {"title": title, "rows": rows, "curves": curves, "allocation": allocation, "notes": notes or []}
    for name, text in (("report.json", json.dumps(data, indent=1, default=str) + "\n"),
                       ("report.md", "\n".join(lines) + "\n")):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    return folder / "report.md"


def redraw(folders: list[str | os.PathLike], output: str | os.PathLike | None = None) -> Path:
    """Redraw the report of one folder from its report.json, or compare several in `output`: every row,
    curve and allocation, named after its folder."""
    from .errors import SlimlmError

    datas = []
    for f in folders:
        d = _json(Path(f) / "report.json")
        if d is None:
            raise SlimlmError(f"{f} holds no report.json: give folders written by slimlm (a command's output or "
                              "a recipe's run folder)")
        datas.append((Path(f), d))
    if len(datas) == 1 and output is None:
        folder, d = datas[0]
        return write(folder, d["title"], d["rows"], curves=d.get("curves"), allocation=d.get("allocation"),
                     notes=d.get("notes"))
    if output is None:
        raise SlimlmError("comparing several runs writes a new report: add --output DIR")
    out = Path(output).expanduser()
    if not out.parent.is_dir():
        raise SlimlmError(f"the parent folder of {out} does not exist; create it first")
    out.mkdir(exist_ok=True)
    rows, curves, alloc = [], {}, {}
    for folder, d in datas:
        rows += [{**r, "name": f"{folder.name}: {r['name']}"} for r in d["rows"]]
        curves.update({f"{folder.name}: {k}": v for k, v in (d.get("curves") or {}).items()})
        alloc.update({f"{folder.name}: {k}": v for k, v in (d.get("allocation") or {}).items()})
    return write(out, "slimlm: " + " against ".join(f.name for f, _ in datas), rows, curves=curves, allocation=alloc,
                 notes=[f"- {f}: {d['title']}" for f, d in datas])


def for_output(folder: Path, command: str, summary: dict, seconds: float, peak_mb: float, name: str | None = None) -> Path:
    """The report of one command's output folder (quantize, prune, train, distill, merge): its own figures,
    its loss curve, its allocation; no evaluation of its own (`slimlm eval`, or a recipe's report, adds it)."""
    rep = _json(folder / "train_report.json") or {}
    row = row_from_eval(command, None, seconds=seconds, peak_rss_mb=peak_mb, disk_mb=(folder_bytes(folder) or 0) / 1e6,
                        bits_per_weight=summary.get("bits_per_weight"), final_loss=rep.get("final_loss"))
    if rep.get("eval_perplexity_after") is not None:
        row["perplexity"] = rep["eval_perplexity_after"]
    alloc = _json(folder / "allocation.json")
    notes = [f"- {k}: {v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and k != "model"]
    return write(folder, f"slimlm {command}: {name or folder.name}", [row], curves={command: loss_curve(folder)},
                 allocation={command: alloc} if alloc else None, notes=notes)
