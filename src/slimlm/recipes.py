"""Recipes: one YAML file that chains slimlm's commands (prune, distill, train, merge, quantize, eval, export)
on one model, validated whole before the first stage runs, resumable stage by stage.

    name: qlora-recover                      # identifies the run folder's recipe (default: the file's stem)
    model: smollm2-135m                      # the model the first stage reads
    data:                                    # named data sources; a stage option naming one gets its value
      calibration: python-docs
      train: ../shared/corpora/austen_emma.txt
    stages:
      - quantize: {method: gptq, bits: 3, group_size: 64, data: calibration}
      - train: {method: lora, data: train, steps: 50}
      - merge: {}
      - eval: {data: calibration}

Each stage takes the options of the command of its name (`slimlm quantize --help`, ...; dashes or
underscores), except the ones the recipe wires: the model a stage reads is the previous stage's output (the
recipe's model for the first), and its output is a numbered folder of the run folder (`01-quantize/`, ...).
`train` writes an adapter (LoRA, prompts, ...) or a model (full, qat, movement, ...); an adapter is applied
by the next `eval` and folded in by `merge`. `distill` trains the current model as the student of the
recipe's model, or, with `student: layers:...` (or a model), distils the current model into that student.
`eval` writes `eval.json` into its folder; `export` writes `model.<suffix>` (a file format) or a folder.

State lives in RUN/recipe-state.json: each completed stage with the fingerprint of everything it read (its
settings, the fingerprint of the stage before it, the content of the data files it names). `--resume` skips
a completed stage whose fingerprint is unchanged and runs again any stage whose inputs or settings changed
(and every stage after it); a training stage cut short continues from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SlimlmError

STAGES = ("prune", "distill", "train", "merge", "quantize", "eval", "export")
STATE = "recipe-state.json"
# options a stage may not set: the recipe wires them (model in, output out, and the run's own flags)
WIRED = {
    "prune": {"model_ref", "output", "overwrite"},
    "quantize": {"model_ref", "output", "overwrite"},
    "train": {"model_ref", "output", "overwrite", "resume"},
    "distill": {"output", "overwrite", "resume"},
    "merge": {"model_ref", "adapter", "output", "overwrite"},
    "eval": {"model_ref", "adapter", "output", "as_json"},
    "export": {"model_ref", "output", "overwrite"},
}
MODEL_CHANGING = {"prune", "distill", "train", "merge", "quantize"}
# training methods whose output is an adapter beside the model (the rest write a model); merge folds in LoRA
ADAPTER_METHODS = {"lora", "prompt", "ptuning", "prefix", "ptuning-v2", "adapter"}
MERGEABLE = {"lora"}
# every stage's model evaluated for report.md (perplexity, KL and top-1 against the recipe's model, size,
# speed); `report: false` in a recipe turns it off
REPORT_DEFAULTS = {"data": "python-docs", "windows": 8, "seqlen": 512, "speed": True}


@dataclass
class Stage:
    index: int                       # 0-based position in the recipe
    kind: str
    options: dict[str, Any]          # field name (underscores) -> value from the YAML
    line: int                        # 1-based line of the stage in the recipe file

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.kind}, line {self.line})"

    @property
    def folder(self) -> str:
        return f"{self.index + 1:02d}-{self.kind}"


@dataclass
class Recipe:
    name: str
    model: str
    data: dict[str, str]
    stages: list[Stage]
    path: Path
    report: dict | None = None       # evaluation of every stage for report.md: data, windows, seqlen, speed


def _fail(path: Path, msg: str) -> SlimlmError:
    return SlimlmError(f"{path}: {msg}")


def load(path: str | os.PathLike) -> Recipe:
    """Parse and shape-check a recipe file (YAML errors with their line and column)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimlmError(f"recipe {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise _fail(p, f"not valid YAML at {where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise _fail(p, f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise _fail(p, "a recipe is a mapping with model, stages and optionally name and data")
    unknown = set(doc) - {"name", "model", "data", "stages", "report"}
    if unknown:
        raise _fail(p, f"unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; a recipe has name, model, "
                       "data, stages and report")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise _fail(p, "name the model the first stage reads: model: smollm2-135m (or a folder)")
    data = doc.get("data") or {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise _fail(p, "data maps names to sources: data: {train: corpus.txt, calibration: python-docs}")
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise _fail(p, "stages is a list of stages like - quantize: {method: gptq, bits: 4}")
    lines = _stage_lines(node)
    stages = []
    for i, entry in enumerate(raw_stages):
        line = lines[i] if i < len(lines) else 0
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise _fail(p, f"stage {i + 1} (line {line}) is one mapping like - eval: {{data: python-docs}}")
        (kind, opts), = entry.items()
        if kind not in STAGES:
            raise _fail(p, f"stage {i + 1} (line {line}): unknown stage {kind!r}; the stages are {', '.join(STAGES)}")
        opts = opts or {}
        if not isinstance(opts, dict):
            raise _fail(p, f"stage {i + 1} ({kind}, line {line}): its options are a mapping like {{method: gptq}}")
        stages.append(Stage(i, kind, {str(k).replace("-", "_"): v for k, v in opts.items()}, line))
    name = doc.get("name") or p.stem
    rep = doc.get("report", {})
    if rep is False:
        report = None
    else:
        rep = rep or {}
        if not isinstance(rep, dict) or set(rep) - set(REPORT_DEFAULTS):
            raise _fail(p, f"report is false or a mapping with {', '.join(REPORT_DEFAULTS)}")
        report = {**REPORT_DEFAULTS, "data": "eval" if "eval" in data else REPORT_DEFAULTS["data"], **rep}
    return Recipe(str(name), model, dict(data), stages, p, report)


def _stage_lines(node) -> list[int]:
    """1-based line of each entry of the top-level `stages` sequence."""
    try:
        for k, v in node.value:
            if k.value == "stages":
                return [item.start_mark.line + 1 for item in v.value]
    except (AttributeError, TypeError):
        pass
    return []


# ---------------------------------------------------------------------------------------------------- checks

def _command(kind: str):
    import click

    from .cli import cli

    ctx = click.Context(cli)
    return cli.get_command(ctx, kind)


def _param_names(cmd) -> dict[str, Any]:
    return {p.name: p for p in cmd.params}


def _normalize(recipe: Recipe, st: Stage, cmd) -> dict[str, Any]:
    """The stage's options keyed by the command's parameter names: a YAML key may be the option's name
    (format, model, group-size / group_size) or the parameter's."""
    lookup: dict[str, str] = {}
    for p in cmd.params:
        lookup[p.name] = p.name
        for opt in p.opts:
            lookup[opt.lstrip("-").replace("-", "_")] = p.name
    out: dict[str, Any] = {}
    for k, v in st.options.items():
        name = lookup.get(k)
        if name is None:
            settable = sorted({o.lstrip("-").replace("-", "_") for p in cmd.params if p.name not in WIRED[st.kind]
                               for o in p.opts if o.startswith("--")})
            raise SlimlmError(f"{recipe.path}: {st.label}: unknown field {k!r}; its fields are: {', '.join(settable)}")
        if name in WIRED[st.kind]:
            raise SlimlmError(f"{recipe.path}: {st.label}: {k} is set by the recipe (each stage reads the previous "
                              "stage's output and writes its own folder); remove it")
        out[name] = v
    return out


def _as_arg(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _args(cmd, options: dict[str, Any]) -> list[str]:
    """Command-line arguments for `options` (parameter name -> value) of `cmd`."""
    params = _param_names(cmd)
    out: list[str] = []
    for k, v in options.items():
        p = params[k]
        flag = max(p.opts, key=len)
        if getattr(p, "is_flag", False):
            if v:
                out.append(flag)
        elif getattr(p, "multiple", False):
            for item in (v if isinstance(v, list) else [v]):
                out += [flag, _as_arg(item)]
        else:
            out += [flag, _as_arg(v)]
    return out


def _resolve_data(recipe: Recipe, options: dict[str, Any]) -> dict[str, Any]:
    """A string option equal to a name of the recipe's data section becomes that source."""
    return {k: (recipe.data[v] if isinstance(v, str) and v in recipe.data else v) for k, v in options.items()}


def check(recipe: Recipe) -> list[dict[str, Any]]:
    """Everything that can be checked without running: stage names and fields, their values (the commands'
    own option types, and the methods' config dataclasses and TrainConfig as the commands build them), and an
    order of stages that can work. Returns each stage's options keyed by parameter name."""
    import dataclasses

    import click

    from . import registry
    from .configs import build_config

    exported = False
    adapter_pending: str | None = None               # the method of a train stage whose adapter is not merged
    changed = False                                  # has a stage before this one changed the recipe's model
    normalized = []
    for st in recipe.stages:
        cmd = _command(st.kind)
        params = _param_names(cmd)
        opts = _normalize(recipe, st, cmd)
        normalized.append(opts)
        stand_in = {"model_ref": recipe.model, "output": "out.json" if st.kind == "eval" else "out",
                    "adapter": "adapter"}
        wired = {k: v for k, v in stand_in.items() if k in params and k in WIRED[st.kind]}
        if st.kind == "distill" and "student" not in opts:
            wired["student"] = recipe.model
        try:
            ctx = cmd.make_context(st.kind, _args(cmd, {**_resolve_data(recipe, opts), **wired}))
        except click.ClickException as e:
            raise SlimlmError(f"{recipe.path}: {st.label}: {e.format_message()}") from None
        fam = registry.families().get(st.kind)
        if fam is not None:                          # the method's config and TrainConfig, as the command builds them
            method = registry.get(st.kind, "distill" if fam.command == "distill" else ctx.params["method"])
            own = set(fam.reserved) | {"model_ref"}
            try:
                config = build_config(method.config_cls, {k: v for k, v in ctx.params.items() if k not in own},
                                      method.name)
                if any(ctx.params.get(k) is not None for k in ("budget_bits", "budget_mb", "budget_sparsity")):
                    from . import budget
                    budget.check(st.kind, config, ctx.params)
                if fam.command in ("train", "distill"):
                    from .training.config import TrainConfig
                    build_config(TrainConfig, {f.name: ctx.params.get(f.name) for f in dataclasses.fields(TrainConfig)},
                                 "train")
            except (SlimlmError, ValueError) as e:
                raise SlimlmError(f"{recipe.path}: {st.label}: {' '.join(str(e).split())}") from None
        where = f"{recipe.path}: {st.label}"
        if exported and st.kind in MODEL_CHANGING:
            raise SlimlmError(f"{where}: {st.kind} cannot follow an export (an export writes a file for other tools "
                              "and ends the chain); move the export to the end")
        if st.kind == "merge" and adapter_pending not in MERGEABLE:
            raise SlimlmError(f"{where}: merge folds in the LoRA adapter of a train stage before it; " + (
                "there is none" if adapter_pending is None else f"a {adapter_pending} adapter cannot be merged"))
        if st.kind in ("prune", "quantize", "distill") and adapter_pending:
            raise SlimlmError(f"{where}: the {adapter_pending} adapter of the train stage before it would be dropped; "
                              + ("fold it in with a merge stage first" if adapter_pending in MERGEABLE else
                                 "put that train stage after the stages that change the weights"))
        if st.kind == "distill" and "student" not in opts and not changed:
            raise SlimlmError(f"{where}: nothing before it changed the model, so the student would be the teacher "
                              "itself; give student: layers:every-2 (or a model), or prune first")
        exported = exported or st.kind == "export"
        if st.kind == "train":
            adapter_pending = ctx.params["method"] if ctx.params["method"] in ADAPTER_METHODS else None
        elif st.kind in MODEL_CHANGING:
            adapter_pending = None
        changed = changed or st.kind in MODEL_CHANGING
    return normalized


# ------------------------------------------------------------------------------------------------ running

def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _source_ids(value: Any) -> list[str]:
    """Content digests of the local files an option value names (comma-separated lists too)."""
    if not isinstance(value, str):
        return []
    out = []
    for part in value.split(","):
        p = Path(part.strip()).expanduser()
        if part.strip() and p.is_file():
            out.append(f"{part.strip()}={_file_digest(p)}")
    return out


def _model_id(ref: str) -> str:
    p = Path(ref).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return ref + ":" + hashlib.sha256("".join(f"{f.relative_to(p)}:{f.stat().st_size}:{f.stat().st_mtime_ns};"
                                                  for f in files).encode()).hexdigest()[:16]
    if p.is_file():
        return f"{ref}={_file_digest(p)}"
    return ref


def fingerprint(previous: str, stage: Stage, options: dict[str, Any]) -> str:
    """What a stage read: the fingerprint of the stage before it (or of the recipe's model), its settings, and
    the content of the local files its settings name (data, prompts; not its own output)."""
    body = {"previous": previous, "kind": stage.kind, "options": {k: _as_arg(v) for k, v in sorted(options.items())},
            "files": sorted(x for k, v in options.items() if k != "output" for x in _source_ids(v))}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def _read_state(run: Path) -> dict | None:
    f = run / STATE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise SlimlmError(f"{f} is not readable JSON; remove the run folder {run} to start over") from None


def _write_state(run: Path, state: dict) -> None:
    tmp = run / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, run / STATE)


class _Evaluator:
    """The report's evaluation of a stage's model: api.evaluate against the recipe's model (loaded once),
    stored in RUN/report/<folder>.json with the fingerprint it belongs to (reused when that is unchanged)."""

    def __init__(self, recipe: Recipe, out: Path) -> None:
        self.recipe, self.dir, self._ref = recipe, out / "report", None

    def __call__(self, key: str, fp: str, model_ref: str, adapter: str | None) -> dict | None:
        if self.recipe.report is None:
            return None
        st = self.recipe.report
        fp = hashlib.sha256(json.dumps([fp, st, self.recipe.data.get(st["data"], st["data"])],
                                       sort_keys=True).encode()).hexdigest()[:20]   # the evaluation's settings too
        f = self.dir / f"{key}.json"
        if f.is_file():
            old = json.loads(f.read_text())
            if old.get("fingerprint") == fp:
                return old["eval"]
        from . import api, models
        from . import data as D
        source = self.recipe.data.get(st["data"], st["data"])
        model = models.load_model(model_ref)
        if adapter:
            from .adapt.loading import load_adapter
            load_adapter(model, adapter)
        model.eval()
        tok = models.load_tokenizer(model_ref)
        seqlen = min(int(st["seqlen"]), D.context_length(model) or int(st["seqlen"]))
        if self._ref is None:
            self._ref = models.load_model(self.recipe.model).eval()
        ev = api.evaluate(model, tok, source, windows=int(st["windows"]), seqlen=seqlen, speed=bool(st["speed"]),
                          reference=self._ref, disk_bytes=models.files_bytes(model_ref), progress=False)
        ev = {k: v for k, v in ev.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self.dir.mkdir(exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "model": model_ref, "adapter": adapter, "eval": ev}, indent=1))
        os.replace(tmp, f)
        return ev


def _write_report(out: Path, recipe: Recipe, state: dict, start_eval: dict | None) -> None:
    from . import report as R
    rows = [R.row_from_eval("start: " + Path(recipe.model).name, start_eval)]
    curves, alloc = {}, {}
    for s in state["stages"]:
        folder = out / s["folder"]
        ev, name, extra = None, s["folder"], {}
        f = out / "report" / f"{s['folder']}.json"
        if f.is_file():
            ev = json.loads(f.read_text()).get("eval")
        if s["kind"] == "eval" and Path(s["output"]).is_file():       # its own data: not on the report's plot
            ev = json.loads(Path(s["output"]).read_text())
            name, extra = f"{s['folder']} (its data)", {"in_plot": False}
        if s["kind"] == "export" and Path(s["output"]).exists():
            extra["disk_mb"] = R.folder_bytes(Path(s["output"])) / 1e6
        rows.append(R.row_from_eval(name, ev, seconds=s.get("seconds"), peak_rss_mb=s.get("peak_rss_mb"), **extra))
        if s["kind"] in ("train", "distill"):
            curves[s["folder"]] = R.loss_curve(folder)
        a = folder / "allocation.json"
        if a.is_file():
            alloc[s["folder"]] = json.loads(a.read_text())
    notes = [f"- recipe {recipe.name} ({recipe.path}) on {recipe.model}; a stage reused by --resume shows the "
             "wall time and peak memory of the run that made it; peak MB is the run process's peak resident memory "
             "during the stage (what earlier stages left resident counts too)"]
    if recipe.report is not None:
        notes.append(f"- every stage's model evaluated on {recipe.report['data']}: {recipe.report['windows']} windows "
                     f"x {recipe.report['seqlen']} tokens; KL and top-1 against {recipe.model}")
    R.write(out, f"slimlm run: {recipe.name}", rows, curves=curves, allocation=alloc, notes=notes)


def run(recipe_path: str | os.PathLike, output: str | os.PathLike | None = None, resume: bool = False,
        echo=print, model: str | None = None, data: dict[str, str] | None = None) -> dict:
    """Run a recipe into `output` (default: runs/<name>); `model` and `data` ({name: source}) replace the
    recipe's model and named data sources. Returns the state (each stage's fingerprint, folder, seconds, and
    whether it ran or was reused)."""
    import click

    from . import registry

    recipe = load(recipe_path)
    unknown = sorted(set(data or {}) - set(recipe.data))
    if unknown:
        raise SlimlmError(f"--data {unknown[0]}=...: the recipe's data sources are "
                          f"{', '.join(recipe.data) or 'none'}")
    recipe.data.update(data or {})
    recipe.model = model or recipe.model
    normalized = check(recipe)
    out = Path(output or Path("runs") / recipe.name).expanduser()
    if output is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    state = _read_state(out) if out.is_dir() else None
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise SlimlmError(f"{out} exists; pass --resume to continue that run, or choose another --output")
        if state is None:
            raise SlimlmError(f"{out} holds no {STATE}, so it is not a recipe's run folder; choose another --output")
        if state.get("recipe") != recipe.name or state.get("model") != recipe.model:
            raise SlimlmError(f"{out} was made by recipe {state.get('recipe')!r} on {state.get('model')!r}, not "
                              f"{recipe.name!r} on {recipe.model!r}; choose another --output")
    elif not out.parent.exists():
        raise SlimlmError(f"the parent folder of {out} does not exist; create it first")
    out.mkdir(exist_ok=True)
    old = {s["folder"]: s for s in (state or {}).get("stages", [])}
    state = {"recipe": recipe.name, "model": recipe.model, "file": str(recipe.path), "stages": []}
    _write_state(out, state)
    from . import report as R

    current, adapter, previous = recipe.model, None, _model_id(recipe.model)
    evaluate = _Evaluator(recipe, out)
    start_eval = evaluate("00-start", previous, recipe.model, None)
    for st, raw in zip(recipe.stages, normalized):
        cmd = _command(st.kind)
        folder = out / st.folder
        opts = _resolve_data(recipe, raw)
        target = folder
        wired: dict[str, Any] = {}
        if st.kind == "distill":
            if "student" in opts:
                opts.setdefault("teacher", current)
            else:
                opts["student"] = current
                opts.setdefault("teacher", recipe.model)
        else:
            wired["model_ref"] = current
        if st.kind in ("merge", "eval") and adapter is not None:
            wired["adapter"] = adapter
        if st.kind == "eval":
            target = folder / "eval.json"
        elif st.kind == "export":
            suffix = registry.get_format(str(opts["fmt"])).suffix
            if suffix is not None:
                target = folder / f"model{suffix}"
        wired["output"] = str(target)
        fp = fingerprint(previous, st, {**opts, **wired})
        prev = old.get(st.folder)
        record = {"folder": st.folder, "kind": st.kind, "fingerprint": fp, "output": str(target)}
        if prev is not None and prev.get("fingerprint") == fp and prev.get("done") and target.exists():
            state["stages"].append({**record, "done": True, "seconds": prev.get("seconds"), "reused": True,
                                    "peak_rss_mb": prev.get("peak_rss_mb")})
            _write_state(out, state)
            echo(f"slimlm run: {st.label}: done before with the same inputs and settings; reused {target}")
        else:
            partial = Path(str(folder) + ".partial")
            same = prev is not None and prev.get("fingerprint") == fp
            if folder.exists():
                shutil.rmtree(folder)
            if partial.exists() and not (resume and same and st.kind in ("train", "distill")):
                shutil.rmtree(partial)
            if target != folder:
                folder.mkdir()
            flags = dict(wired)
            if st.kind in ("train", "distill") and partial.exists():
                flags["resume"] = True
            state["stages"].append({**record, "done": False})
            _write_state(out, state)
            echo(f"slimlm run: {st.label} -> {target}" + (" (continuing its checkpoint)" if "resume" in flags else ""))
            R.reset_peak_rss()
            t0 = time.perf_counter()
            try:
                try:
                    ctx = cmd.make_context(st.kind, _args(cmd, {**opts, **flags}))
                    with ctx:
                        cmd.invoke(ctx)
                except click.ClickException as e:
                    raise SlimlmError(f"{st.label}: {e.format_message()}") from None
                except SlimlmError as e:
                    raise SlimlmError(f"{st.label}: {e}") from None
            except BaseException:
                if target != folder and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()                        # the folder made for a file that was never written
                raise
            state["stages"][-1].update(done=True, seconds=round(time.perf_counter() - t0, 1), reused=False,
                                       peak_rss_mb=round(R.peak_rss_mb(), 1))
            _write_state(out, state)
        previous = fp
        if st.kind == "train":
            if (folder / "adapter_config.json").is_file():
                adapter = str(folder)
            else:
                current, adapter = str(folder), None
        elif st.kind in MODEL_CHANGING:
            current, adapter = str(folder), None
        if st.kind in MODEL_CHANGING:
            evaluate(st.folder, fp, current, adapter)
        _write_report(out, recipe, state, start_eval)
    state["model_out"], state["adapter_out"] = current, adapter
    _write_state(out, state)
    return state
