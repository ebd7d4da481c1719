"""EleutherAI's lm-evaluation-harness on a model in memory (quantized, pruned, or with an adapter on it).

    sel = resolve_tasks(["hellaswag", "my_tasks/next_word.yaml"], include_path=["my_tasks"])
    results = run_tasks(model, tokenizer, sel, limit=100)
    results["results"]["hellaswag"]["acc,none"]

The model goes to lm-eval as its own Hugging Face backend (`HFLM(pretrained=<the module>)`), so every request
(loglikelihood, rolling loglikelihood, generation) is answered by the code `lm-eval run --model hf` runs, and
the numbers are those of lm-eval's command line on the same weights. Tasks are lm-eval's: names from its
registry (the hub's datasets, online), and local task folders (YAML and data) given as a path or as an
include path; offline, only tasks whose data is local can be loaded. lm-eval is an optional dependency:
`pip install 'slimlm[eval]'`.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import SlimlmError

log = logging.getLogger(__name__)

INSTALL = "pip install 'slimlm[eval]'"


def require() -> ModuleType:
    """The lm_eval package, or a one-line error naming the install command."""
    try:
        import lm_eval
    except ImportError:
        raise SlimlmError("--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
                          f"{INSTALL} (or pip install lm_eval)") from None
    return lm_eval


@dataclass
class TaskSelection:
    """Tasks resolved against lm-eval's registry and local folders: `specs` go to lm-eval's TaskManager
    `manager` (task, group and tag names, YAML file paths)."""
    specs: list[str]
    manager: Any
    include_path: list[Path] = field(default_factory=list)


def _split(tasks: str | list[str]) -> list[str]:
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


def _folder_tasks(manager, folder: Path) -> list[str]:
    """Names of the tasks and groups defined by the YAML files under `folder`, less those a group defined there
    already runs (lm-eval refuses a task selected twice)."""
    root = folder.resolve()
    here = {name: e for name, e in manager.task_index.items()
            if e.kind.name in ("TASK", "PY_TASK", "GROUP") and e.yaml_path is not None
            and root in Path(e.yaml_path).resolve().parents}
    children: set[str] = set()
    for e in here.values():
        if e.kind.name == "GROUP":
            members = (e.cfg or {}).get("task") or []
            for m in members if isinstance(members, list) else [members]:
                children.add(m.get("task") if isinstance(m, dict) else m)
    return sorted(n for n in here if n not in children)


def _unknown(name: str, manager, include_path: list[Path]) -> SlimlmError:
    import lm_eval.tasks

    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.8)
    registry = Path(lm_eval.tasks.__file__).parent
    where = f"lm-eval's registry ({len(manager.all_tasks)} tasks, groups and tags under {registry})"
    if include_path:
        where += " and " + ", ".join(str(p) for p in include_path)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return SlimlmError(f"lm-eval knows no task {name!r}: looked in {where}{hint}; `lm-eval ls tasks` lists them, "
                       "and a local task folder goes in --tasks-dir or as a path in --tasks")


def resolve_tasks(tasks: str | list[str], *, include_path: str | Path | list[str | Path] | None = None
                  ) -> TaskSelection:
    """Check and resolve task references before any model is loaded.

    Each reference (a list, or comma-separated names) is a task, group or tag name of lm-eval's registry or
    of `include_path` (folders of task YAMLs), a glob over those names (`arc_*`), a task YAML file, or a task
    folder (every task defined in it; the folder joins the include path). Names found in the local folders
    alone are looked up without indexing lm-eval's ~15,000 built-in ones; otherwise the full registry is
    indexed, as lm-eval does. Raises SlimlmError for a reference lm-eval does not know, saying where it looked.
    """
    require()
    from lm_eval.tasks import TaskManager

    refs = _split(tasks)
    if not refs:
        raise SlimlmError("--tasks names no task; give lm-eval task names or a task folder")
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    local = [Path(p).expanduser() for p in extra]
    for p in local:
        if not p.is_dir():
            raise SlimlmError(f"task folder {p} does not exist; --tasks-dir takes a folder of lm-eval task YAMLs")
    folders, files, names = [], [], []
    for ref in refs:
        p = Path(ref).expanduser()
        if p.is_dir():
            folders.append(p)
        elif p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise SlimlmError(f"task file {p} does not exist")
            files.append(str(p.resolve()))
        else:
            names.append(ref)
    local += [f for f in folders if f not in local]
    local += [p for p in dict.fromkeys(Path(f).parent for f in files) if p not in local]

    def select(manager) -> list[str] | None:
        specs = []
        for f in folders:
            found = _folder_tasks(manager, f)
            if not found:
                raise SlimlmError(f"{f} defines no lm-eval task (no YAML with a task: or group: key)")
            specs += found
        for n in names:
            found = manager.match_tasks([n])
            if not found:
                return None
            specs += found
        return list(dict.fromkeys(specs + files))

    if local:
        manager = TaskManager(include_path=[str(p) for p in local], include_defaults=False)
        specs = select(manager)
        if specs is not None:
            return TaskSelection(specs, manager, local)
    manager = TaskManager(include_path=[str(p) for p in local] or None)
    specs = select(manager)
    if specs is None:
        missing = next(n for n in names if not manager.match_tasks([n]))
        raise _unknown(missing, manager, local)
    return TaskSelection(specs, manager, local)


def _lm(model: nn.Module, tokenizer, batch_size: int):
    """lm-eval's Hugging Face backend over the module itself. HFLM re-ties the input and output embeddings of
    a model it is given, which would hang a float weight on an output layer slimlm replaced (a quantized or
    LoRA-wrapped lm_head); the tie is skipped, so the model is evaluated, and left, as it is."""
    from lm_eval.models.huggingface import HFLM

    model.tie_weights = lambda *a, **k: None        # instance attribute, removed below
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    finally:
        del model.tie_weights


def run_tasks(model: nn.Module, tokenizer, tasks: str | list[str] | TaskSelection, *, limit: int | float | None = None,
              num_fewshot: int | None = None, include_path: str | Path | list[str | Path] | None = None,
              batch_size: int = 1, device: str | None = None, bootstrap_iters: int = 100000) -> dict:
    """Run lm-eval tasks on `model` (a transformers causal LM in memory, whatever slimlm did to its layers)
    with `tokenizer`; returns lm-eval's results dict (`results[task]["acc,none"]`, "groups", "n-shot",
    "configs", ...) as `lm_eval.simple_evaluate` makes it, with lm-eval's defaults for seeds and bootstrap.

    tasks: references as resolve_tasks takes them (or its TaskSelection); limit: examples per task (below 1:
    a fraction), as lm-eval's --limit; num_fewshot: as lm-eval's --num_fewshot (None: each task's own);
    batch_size: requests per forward (1, as lm-eval's default, gives its numbers exactly; padding in larger
    batches can move the last digits); device: where the model runs (None: where it is; otherwise the model
    is moved there). The model is put in eval mode for the run and its training mode restored afterwards.
    """
    lm_eval = require()
    from . import metrics as E
    from .api import model_device

    sel = tasks if isinstance(tasks, TaskSelection) else resolve_tasks(tasks, include_path=include_path)
    if limit is not None and limit <= 0:
        raise SlimlmError(f"--limit must be positive (got {limit})")
    if num_fewshot is not None and num_fewshot < 0:
        raise SlimlmError(f"--num-fewshot must be at least 0 (got {num_fewshot})")
    if batch_size < 1:
        raise SlimlmError(f"batch_size must be at least 1 (got {batch_size})")
    if getattr(model, "config", None) is None or E.lm_kind(model) != "causal":
        raise SlimlmError(f"lm-eval's tasks score next-token predictions and {type(model).__name__} is not a "
                          "causal language model; give a model with a causal LM head")
    if device is not None and model_device(model) != torch.device(device):
        model.to(device)
    if isinstance(limit, float) and limit >= 1:
        limit = int(limit)
    training = model.training
    try:
        lm = _lm(model, tokenizer, batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=sel.specs, task_manager=sel.manager, limit=limit,
                                          num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                          log_samples=False)
    except (ConnectionError, FileNotFoundError) as e:    # a task's data: hub offline, files missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimlmError(f"lm-eval could not load a task's data ({first}); offline, only tasks whose data is "
                          "local work") from None
    finally:
        model.train(training)
    return results


def rows(results: dict) -> list[tuple[str, str, float | str, float | str | None]]:
    """(task, metric, value, stderr) for every metric lm-eval reported, groups first then tasks, in its order;
    a metric computed under a filter other than "none" is named metric/filter."""
    out = []
    for section in ("groups", "results"):
        for task, metrics in (results.get(section) or {}).items():
            if section == "results" and task in (results.get("groups") or {}):
                continue
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else f"{metric}/{filt}"
                out.append((task, name, value, metrics.get(f"{metric}_stderr,{filt}")))
    return out


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v in (None, "N/A") else str(v)


def format_table(results: dict) -> str:
    """lm-eval's metrics as slimlm prints tables: task, metric, value, stderr (4 decimals, as lm-eval's own)."""
    lines = [("task", "metric", "value", "stderr")]
    lines += [(t, m, _cell(v), _cell(s)) for t, m, v, s in rows(results)]
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in lines)


def to_json(results: dict) -> str:
    """The results dict as JSON, non-JSON values (dtypes, numpy numbers) converted as lm-eval's own output."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
