"""The command line: parse, build a config, call the API, print a result. No logic the API lacks."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

import click

from . import __version__
from .errors import Interrupted, SlimlmError

log = logging.getLogger("slimlm")

MODEL_HELP = "model: smollm2-135m (default, embedded), a local folder, a .gguf file, or a hub id (online only)"
DATA_HELP = "text: python-docs (default), a .txt/.jsonl/.parquet file, or wikitext2/c4 (online only)"


def _windows(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise SlimlmError(f"--windows takes a positive integer or 'all', not {value!r}") from None
    if n < 1:
        raise SlimlmError(f"--windows must be at least 1 or 'all' (got {n})")
    return n


DEVICE_HELP = "{what}: cpu, cuda or cuda:N"
DTYPE_HELP = ("load the model's float weights as float32, bfloat16 or float16 (default: as a slimlm folder "
              "stores them, float32 otherwise)")
DTYPES = ("float32", "bfloat16", "float16")


def _device(value: str) -> str:
    """A checked --device: cpu, cuda, cuda:N, with a GPU PyTorch can see."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise SlimlmError(f"--device takes cpu, cuda or cuda:N, not {value!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimlmError(f"--device {value}: PyTorch sees no CUDA GPU (a CPU-only torch, or no driver); "
                              "use --device cpu, or install a CUDA build of torch (see README)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SlimlmError(f"--device {value}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise SlimlmError(f"--device takes cpu, cuda or cuda:N, not {value!r}")
    return str(dev)


def _dtype(value: str | None):
    import torch

    if value is None:
        return None
    if value not in DTYPES:
        raise SlimlmError(f"--dtype takes one of {', '.join(DTYPES)}, not {value!r}")
    return getattr(torch, value)


def _setup(threads: int | None) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads or int(os.environ.get("SLIMLM_THREADS", "2")))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:                                   # save_pretrained's "Writing model shards" bar
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimlm")
@click.option("-v", "--verbose", is_flag=True, help="log progress details")
def cli(verbose: bool) -> None:
    """slimlm: quantize, prune, adapt and distill language models on the hardware you have."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _eval_table(rows: list[tuple[str, dict]]) -> str:
    keys = [("perplexity", "perplexity", "{:.3f}"), ("kl_divergence", "KL vs ref", "{:.4f}"),
            ("top1_agreement", "top-1 agree", "{:.2%}"), ("pseudo_perplexity", "pseudo-perplexity", "{:.3f}"),
            ("masked_kl_divergence", "masked KL vs ref", "{:.4f}"),
            ("masked_top1_agreement", "masked top-1 agree", "{:.2%}"),
            ("embedding_cosine_mean", "cosine vs ref (mean)", "{:.4f}"),
            ("embedding_cosine_min", "cosine vs ref (min)", "{:.4f}"), ("parameters", "parameters", "{:,}"),
            ("resident_bytes", "memory MB", None), ("disk_bytes", "disk MB", None),
            ("bits_per_weight", "bits/weight", "{:.2f}"), ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
            ("decode_tokens_per_s", "decode tok/s", "{:.1f}"), ("encode_tokens_per_s", "encode tok/s", "{:.1f}")]
    header = ["", *[r[0] for r in rows]]
    lines = [header]
    for key, label, fmt in keys:
        if not any(r[1].get(key) is not None for r in rows):
            continue
        cells = [label]
        for _, r in rows:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif fmt is None:
                cells.append(f"{v / 1e6:.1f}")
            else:
                cells.append(fmt.format(v))
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


@cli.command("eval")
@click.option("--model", "model_ref", default="smollm2-135m", show_default=True, help=MODEL_HELP)
@click.option("--data", default="python-docs", show_default=True, help=DATA_HELP)
@click.option("--field", default="text", show_default=True, help="text field of a .jsonl / column of a .parquet")
@click.option("--windows", default="32", show_default=True, help="evaluation windows: a number or 'all'")
@click.option("--seqlen", default=512, show_default=True, type=int, help="tokens per window")
@click.option("--adapter", default=None, help="an adapter folder applied to --model first: PEFT LoRA/DoRA, prompt "
              "tuning, P-tuning, prefix tuning (as slimlm train writes them) or slimlm's bottleneck adapters")
@click.option("--reference", default=None,
              help="a reference model: KL divergence and top-1 agreement for a causal or masked LM (at the masked "
              "positions), cosine of mean-pooled embeddings for an embedding model (which needs one)")
@click.option("--masked-positions", default="32", show_default=True,
              help="masked LM: positions masked and scored per window for pseudo-perplexity (seeded), or 'all'")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="measure prefill/decode tokens/s (encode tokens/s for an encoder)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--output", default=None, help="also write the results as JSON to this .json file (when complete)")
@click.option("--device", default="cpu", show_default=True,
              help=DEVICE_HELP.format(what="where the model (and the reference) run"))
@click.option("--dtype", default=None, help=DTYPE_HELP)
@click.option("--threads", type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)")
@click.option("--trust-remote-code", is_flag=True, help="allow a model folder's own Python code to run")
@click.option("--tasks", default=None,
              help="run EleutherAI's lm-evaluation-harness on the model instead of the perplexity protocol: lm-eval "
              "task, group or tag names (comma-separated; the hub's tasks need a connection), task YAML files or "
              "task folders (needs pip install 'slimlm[eval]')")
@click.option("--tasks-dir", multiple=True, help="--tasks: a folder of lm-eval task YAMLs to find names in (repeatable)")
@click.option("--limit", type=float, default=None,
              help="--tasks: examples per task (below 1: a fraction of each task), as lm-eval's --limit")
@click.option("--num-fewshot", type=int, default=None,
              help="--tasks: few-shot examples per prompt (default: each task's own), as lm-eval's --num_fewshot")
@click.option("--engine", default="torch", show_default=True, type=click.Choice(["torch", "llama.cpp"]),
              help="what runs the model: slimlm on PyTorch, or llama.cpp (llama-cpp-python) for a .gguf file, fed "
                   "the same token ids and windows (threads: --threads)")
def eval_cmd(model_ref, data, field, windows, seqlen, adapter, reference, masked_positions, speed, as_json, output,
             device, dtype, threads, trust_remote_code, tasks, tasks_dir, limit, num_fewshot, engine):
    """Perplexity (pseudo-perplexity for a masked LM), agreement with a reference, size and speed of a model;
    with --tasks, lm-eval's tasks instead (the numbers `lm-eval run --model hf` gives on the same weights)."""
    from . import api, io, models

    _setup(threads)
    if output is not None:
        io.check_output_file(output, ".json", overwrite=True)
    selection = None
    if tasks is None and (tasks_dir or limit is not None or num_fewshot is not None):
        raise SlimlmError("--tasks-dir, --limit and --num-fewshot go with --tasks; add --tasks NAME")
    if tasks is not None:
        from click.core import ParameterSource

        from . import lmeval

        ctx = click.get_current_context()
        clash = [f"--{n.replace('_', '-')}" for n in ("data", "field", "windows", "seqlen", "reference",
                                                        "masked_positions", "speed")
                 if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]
        if clash:
            raise SlimlmError(f"{', '.join(clash)} set the perplexity protocol, which --tasks replaces; "
                              "run it in a separate slimlm eval without --tasks")
        logging.getLogger("lm_eval").setLevel(logging.INFO if log.isEnabledFor(logging.INFO) else logging.ERROR)
        selection = lmeval.resolve_tasks(tasks, include_path=list(tasks_dir))
    n = _windows(windows)
    if engine == "llama.cpp":
        if selection is not None:
            raise SlimlmError("--tasks runs with --engine torch only")
        _eval_llamacpp(model_ref, data, field, n, seqlen, adapter, reference, speed, as_json, device, threads, output)
        return
    try:
        positions = None if masked_positions == "all" else int(masked_positions)
    except ValueError:
        raise SlimlmError(f"--masked-positions takes a positive integer or 'all', not {masked_positions!r}") from None
    if seqlen < 2:
        raise SlimlmError(f"--seqlen must be at least 2 (got {seqlen})")
    device, dtype = _device(device), _dtype(dtype)
    t0 = time.perf_counter()
    model = models.load_model(model_ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if adapter:
        from .adapt.loading import load_adapter
        load_adapter(model, adapter)
        model.eval()
    load_s = time.perf_counter() - t0
    tok = models.load_tokenizer(model_ref, trust_remote_code=trust_remote_code)
    if selection is not None:
        results = lmeval.run_tasks(model, tok, selection, limit=limit, num_fewshot=num_fewshot)
        if output is not None:
            _write_json(output, json.loads(lmeval.to_json({"model": model_ref, **results})))
        if as_json:
            click.echo(lmeval.to_json({"model": model_ref, **results}))
        else:
            shots = ", ".join(f"{t} {n}" for t, n in (results.get("n-shot") or {}).items())
            click.echo(f"{model_ref} on lm-eval tasks (n-shot: {shots}; limit: {'none' if limit is None else f'{limit:g}'})")
            click.echo(lmeval.format_table(results))
        return
    ref = models.load_model(reference, dtype=dtype, device=device, trust_remote_code=trust_remote_code) \
        if reference else None
    res = api.evaluate(model, tok, data, windows=n, seqlen=seqlen, reference=ref, speed=speed,
                       disk_bytes=models.files_bytes(model_ref), field=field, progress=not as_json,
                       masked_positions=positions)
    res.update(model=model_ref, load_seconds=load_s)
    if output is not None:
        _write_json(output, res)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        what = ("masked and scored" if "pseudo_perplexity" in res else
                "embedded" if "embedding_cosine_mean" in res else "scored")
        click.echo(f"{model_ref} on {data}: {res['windows']} windows x {seqlen} tokens ({res['tokens']} {what})")
        click.echo(_eval_table([(model_ref, res)]))


def _write_json(path: str, obj) -> None:
    from . import io
    with io.atomic_file(path, ".json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _eval_llamacpp(model_ref, data, field, windows, seqlen, adapter, reference, speed, as_json, device,
                   threads, output=None) -> None:
    """`slimlm eval --engine llama.cpp`: a .gguf file through llama.cpp, tokenized by slimlm's tokenizer."""
    from . import llamacpp, models

    if not str(model_ref).endswith(".gguf"):
        raise SlimlmError(f"--engine llama.cpp runs a .gguf file, not {model_ref!r} (slimlm export --format gguf "
                          "writes one)")
    for flag, value in (("--adapter", adapter), ("--reference", reference)):
        if value:
            raise SlimlmError(f"{flag} is not available with --engine llama.cpp")
    if device != "cpu":
        raise SlimlmError("--engine llama.cpp runs on the CPU here (--device cpu)")
    if seqlen < 2:
        raise SlimlmError(f"--seqlen must be at least 2 (got {seqlen})")
    llamacpp.require()
    _, where = models.resolve(model_ref)
    tok = models.load_tokenizer(model_ref)
    res = llamacpp.evaluate(where, tok, data, windows=windows, seqlen=seqlen, with_speed=speed, field=field,
                            threads=threads or int(os.environ.get("SLIMLM_THREADS", "2")))
    res.update(model=model_ref)
    if output is not None:
        _write_json(output, res)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"{model_ref} (llama.cpp) on {data}: {res['windows']} windows x {seqlen} tokens "
                   f"({res['tokens']} scored)")
        click.echo(_eval_table([(f"{model_ref} (llama.cpp)", res)]))


class _FormatChoice(click.ParamType):
    """--format: a name of the format registry (read on use, so `slimlm --help` stays fast)."""
    name = "format"

    def get_metavar(self, param, ctx=None):
        return "FORMAT"

    def convert(self, value, param, ctx):
        from . import registry

        names = registry.savable_formats()
        if value not in names:
            self.fail(f"{value!r} is not a format; choose one of: {', '.join(names)}", param, ctx)
        return value


class _ExportCommand(click.Command):
    def format_help_text(self, ctx, formatter):
        from . import registry

        super().format_help_text(ctx, formatter)
        with formatter.section("Formats"):
            formatter.write_dl([(n, f.help) for n, f in registry.formats().items() if f.save is not None])


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    """--option KEY=VALUE pairs as a dict (the format's writer converts and checks the values)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise SlimlmError(f"--option takes KEY=VALUE, not {p!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@cli.command("export", cls=_ExportCommand)
@click.option("--model", "model_ref", required=True, help="a model slimlm loads (quantized, pruned, or plain)")
@click.option("--format", "fmt", required=True, type=_FormatChoice(), help="the format to write (listed below)")
@click.option("--output", required=True,
              help="output folder, or file for a single-file format (gguf: FILE.gguf); written only when complete")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="an option of the format's writer, repeatable (gguf: float_type=f16|f32|bf16|q8_0, "
                   "accept_requantize=true, tokenizer_pre=NAME)")
def export_cmd(model_ref, fmt, output, overwrite, options):
    """Write a model in a format other tools load."""
    from . import api, io, models, registry

    _setup(None)
    opts = _options(options)
    spec = registry.get_format(fmt)
    models.check_format_options(spec, opts)
    if spec.suffix is not None:
        io.check_output_file(output, spec.suffix, overwrite)
    else:
        io.check_output_dir(output, overwrite)
    model = models.load_model(model_ref)
    tok = models.load_tokenizer(model_ref)
    path = api.export(model, tok, output, fmt, overwrite=overwrite, **opts)
    click.echo(f"exported {model_ref} as {fmt} -> {path}")


@cli.command("merge")
@click.option("--model", "model_ref", required=True, help="the base the adapter was trained on: " + MODEL_HELP)
@click.option("--adapter", required=True, help="a PEFT LoRA/DoRA adapter folder (slimlm train writes one)")
@click.option("--output", required=True, help="output folder (written only when complete)")
@click.option("--into", default="base", show_default=True, type=click.Choice(["base", "float"]),
              help="base: into the base's own layers (packed layers are re-quantized onto their stored grid); "
                   "float: the adapted layers become full-precision copies")
@click.option("--requantize", default="rtn", show_default=True, type=click.Choice(["rtn", "gptq"]),
              help="packed base layers: round the merged weight to the nearest point of the layer's grid, or "
                   "choose the points by GPTQ's error feedback (needs --data)")
@click.option("--data", default=None, help="calibration " + DATA_HELP + " (for --requantize gptq)")
@click.option("--samples", default=128, show_default=True, type=int, help="calibration windows")
@click.option("--seqlen", default=512, show_default=True, type=int, help="tokens per window")
@click.option("--eval-data", default="python-docs", show_default=True,
              help="text on which the merge's error (KL against the unmerged model, perplexity) is measured")
@click.option("--windows", default=8, show_default=True, type=int, help="evaluation windows")
@click.option("--max-kl", default=0.05, show_default=True, type=float,
              help="refuse a merge that adds more KL divergence per token than this")
@click.option("--force", is_flag=True, help="write the merged model whatever its error")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--device", default="cpu", show_default=True,
              help=DEVICE_HELP.format(what="where the merge, its re-quantization and its evaluation run"))
@click.option("--dtype", default=None, help=DTYPE_HELP)
@click.option("--threads", type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)")
def merge_cmd(model_ref, adapter, output, into, requantize, data, samples, seqlen, eval_data, windows, max_kl,
              force, overwrite, device, dtype, threads):
    """Merge a LoRA adapter into its base (quantized bases included) and write the merged model."""
    from . import api, io, models
    from . import data as D

    _setup(threads)
    t0 = time.perf_counter()
    out = io.check_output_dir(output, overwrite)
    if requantize == "gptq" and not data:
        raise SlimlmError("--requantize gptq needs calibration data: add --data SOURCE")
    device, dtype = _device(device), _dtype(dtype)
    model = models.load_model(model_ref, dtype=dtype, device=device)
    tok = models.load_tokenizer(model_ref)
    calib = api.calibration_data(tok, data, samples=samples, seqlen=seqlen) if data else None
    evalw = D.eval_windows(D.tokenize(tok, D.load_text(eval_data)), seqlen, windows) if windows else None
    report = api.merge(model, adapter, into=into, requantize=requantize, calibration=calib, eval_data=evalw,
                       max_kl=None if force else max_kl)
    from . import report as R
    with io.atomic_dir(out, overwrite) as tmp:
        written = models.save_model(model, tok, tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=1) + "\n")
        R.for_output(tmp, "merge", report, time.perf_counter() - t0, R.peak_rss_mb(), name=out.name)
    click.echo(f"merged {adapter} into {model_ref} -> {out} ({written} format)")
    for k, v in report.items():
        click.echo(f"  {k}: {v}")


@cli.command("generate")
@click.option("--teacher", default="smollm2-135m", show_default=True,
              help="the teacher: " + MODEL_HELP + ", or the URL of an OpenAI-compatible server (http://host:port)")
@click.option("--endpoint-model", default="default", show_default=True, help="the model name sent to an endpoint")
@click.option("--prompts", required=True, help="prompts: a .txt (one per line) or a .jsonl with --field")
@click.option("--field", default="prompt", show_default=True, help="the prompt field of a .jsonl")
@click.option("--output", required=True, help="the .jsonl of {prompt, response, origin} rows to write")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option("--n", "n", default=2, show_default=True, type=int, help="responses per prompt (duplicates dropped)")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.8, show_default=True, type=float)
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int,
              help="prompts a local teacher generates for at once (left-padded)")
@click.option("--evolve", "evolve_rounds", default=0, show_default=True, type=int,
              help="rounds of Evol-Instruct-style rewriting of every prompt into a harder or broader one")
@click.option("--self-instruct", "self_instruct_count", default=0, show_default=True, type=int,
              help="new prompts grown from the set, Self-Instruct style")
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP.format(what="where a local teacher runs"))
@click.option("--threads", type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)")
def generate_cmd(teacher, endpoint_model, prompts, field, output, overwrite, n, max_new_tokens, temperature, top_p,
                 seed, batch_size, evolve_rounds, self_instruct_count, device, threads):
    """A teacher's responses to prompts, for black-box distillation (then: slimlm train --data OUTPUT)."""
    from pathlib import Path

    from .distill import blackbox as BB

    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SlimlmError(f"the folder of {out} does not exist")
    if evolve_rounds < 0 or self_instruct_count < 0:
        raise SlimlmError("--evolve and --self-instruct must be >= 0")
    sampling = BB.Sampling(n, max_new_tokens, temperature, top_p, seed)
    given = BB.read_prompts(prompts, field)
    if teacher.startswith(("http://", "https://")):
        t = BB.EndpointTeacher(teacher, endpoint_model)
    else:
        from . import models
        _setup(threads)
        t = BB.LocalTeacher(models.load_model(teacher, device=_device(device)), models.load_tokenizer(teacher),
                            name=teacher, batch_size=batch_size)
    t0 = time.perf_counter()
    rep = BB.generate(t, given, sampling, out, evolve_rounds=evolve_rounds, self_instruct_count=self_instruct_count)
    click.echo(f"{rep['rows']} responses to {rep['prompts']} prompts ({rep['given']} given, {rep['evolved']} evolved, "
               f"{rep['self_instruct']} self-instruct; {rep['duplicates_dropped']} duplicates dropped) in "
               f"{time.perf_counter() - t0:.1f} s -> {out}")


@cli.command("run")
@click.argument("recipe")
@click.option("--output", default=None, help="the run folder (default: runs/<recipe name>)")
@click.option("--resume", is_flag=True, help="continue a run: completed stages whose inputs and settings did not "
              "change are reused, a training stage continues from its checkpoint")
@click.option("--model", "model_ref", default=None, help="run on this model instead of the recipe's")
@click.option("--data", "data", multiple=True, metavar="NAME=SOURCE",
              help="replace the recipe's data source NAME (repeatable), e.g. --data train=my_text.txt")
def run_cmd(recipe, output, resume, model_ref, data):
    """Run a recipe: a YAML file of stages (prune, distill, train, merge, quantize, eval, export), each with
    the options of the command of that name, checked whole before the first stage starts."""
    from . import recipes

    t0 = time.perf_counter()
    sources = {}
    for item in data:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise SlimlmError(f"--data takes NAME=SOURCE (a name of the recipe's data section), not {item!r}")
        sources[name] = source
    state = recipes.run(recipe, output, resume, echo=click.echo, model=model_ref, data=sources)
    ran = sum(not s.get("reused") for s in state["stages"])
    click.echo(f"slimlm run: {state['recipe']}: {len(state['stages'])} stages ({ran} run, "
               f"{len(state['stages']) - ran} reused) in {time.perf_counter() - t0:.1f} s -> {state['model_out']}")


@cli.command("report")
@click.argument("folders", nargs=-1, required=True)
@click.option("--output", default=None, help="where a comparison of several folders goes (a folder)")
def report_cmd(folders, output):
    """Redraw report.md and its plots from a folder slimlm wrote (a command's output or a recipe's run), or
    compare several runs in one report (--output)."""
    from . import report as R

    path = R.redraw(list(folders), output)
    click.echo(f"report -> {path}")


@cli.command("demo")
@click.option("--output", default="out/smollm2-135m-gptq-w4g64", show_default=True, help="where the quantized model goes")
@click.option("--calibration-data", default="python-docs", show_default=True, help="calibration " + DATA_HELP)
@click.option("--eval-data", default="python-docs", show_default=True, help="evaluation " + DATA_HELP)
@click.option("--samples", default=128, show_default=True, type=int, help="calibration windows of 512 tokens")
@click.option("--windows", default=32, show_default=True, type=int, help="evaluation windows of 512 tokens")
@click.option("--device", default="cpu", show_default=True,
              help=DEVICE_HELP.format(what="where calibration and evaluation run"))
@click.option("--threads", type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)")
def demo_cmd(output, calibration_data, eval_data, samples, windows, device, threads):
    """The main job on the embedded default: GPTQ 4-bit (group 64) SmolLM2-135M, then before/after.
    (`make demo` passes the benchmark's texts when ../shared/corpora is there.)"""
    from pathlib import Path

    from . import api, io, models, registry
    from .calibration import RunnerOptions

    _setup(threads)
    device = _device(device)
    # the demo's own output folder: its parent (out/ by default, absent in a fresh clone) is made here, and
    # the output is checked before any work rather than after the quantization
    Path(output).expanduser().parent.mkdir(parents=True, exist_ok=True)
    io.check_output_dir(output, overwrite=True)
    click.echo(f"loading the embedded default (smollm2-135m); calibration: {calibration_data}; "
               f"evaluation: {eval_data}")
    fp32 = models.load_model("smollm2-135m", device=device)
    tok = models.load_tokenizer("smollm2-135m")
    method = registry.get("quantize", "gptq")
    config = method.config_cls(bits=4, group_size=64)
    windows_t = api.calibration_data(tok, calibration_data, samples=samples, seqlen=512)
    work = models.load_model("smollm2-135m")
    t0 = time.perf_counter()
    api.quantize(work, config, data=windows_t, runner=RunnerOptions(device=device))
    seconds = time.perf_counter() - t0
    with io.atomic_dir(output, overwrite=True) as tmp:
        models.save_model(work, tok, tmp)
    del work
    click.echo(f"GPTQ 4-bit g64 took {seconds:.0f} s; saved to {output}; evaluating both models")
    quant = models.load_model(output, device=device)
    before = api.evaluate(fp32, tok, eval_data, windows=windows, speed=True,
                          disk_bytes=models.files_bytes("smollm2-135m"))
    after = api.evaluate(quant, tok, eval_data, windows=windows, speed=True, reference=fp32,
                         disk_bytes=models.files_bytes(output))
    click.echo(_eval_table([("fp32", before), ("gptq w4 g64", after)]))


def _family_command(family: str):
    """`slimlm quantize` / `slimlm prune`: the command's own options (registry.COMPRESSION_OPTIONS), then the
    union of every registered config's fields (registry.register refuses a field named like an own option)."""
    from . import registry
    from .calibration import RunnerOptions
    from .configs import field_help, option_name

    fam = registry.families()[family]
    table = registry.methods(family)
    fields: dict[str, tuple[str, list[str]]] = {}
    for name, m in table.items():
        for f in dataclasses.fields(m.config_cls):
            if f.init:
                help_, users = fields.get(f.name, (field_help(f), []))
                users.append(name)
                fields[f.name] = (help_, users)

    def run(**kw):
        _run_family(family, kw, sorted(fields))

    params = [
        click.Option(["--model", "model_ref"], default="smollm2-135m", show_default=True, help=MODEL_HELP),
        click.Option(["--method"], required=True, type=click.Choice(sorted(table)) if table else str,
                     help="the method"),
        click.Option(["--data"], default=None, help=DATA_HELP + "; needed by calibrated methods"),
        click.Option(["--field"], default="text", show_default=True, help="text field of .jsonl/.parquet"),
        click.Option(["--samples"], default=128, show_default=True, type=int, help="calibration windows"),
        click.Option(["--seqlen"], default=512, show_default=True, type=int, help="tokens per calibration window"),
        click.Option(["--output"], required=True, help="output folder (written only when complete)"),
        click.Option(["--overwrite"], is_flag=True, help="replace an existing output folder"),
        click.Option(["--batch-size"], default=RunnerOptions.batch_size, show_default=True, type=int,
                     help="windows per calibration pass"),
        click.Option(["--precise"], is_flag=True,
                     help="fp32 calibration passes and activations kept in fp32 between the stages of a block "
                     "(default: bf16 passes with fp32 statistics where the CPU or GPU computes bf16 natively, fp32 "
                     "elsewhere; down_proj inputs kept in bf16)"),
        click.Option(["--device"], default="cpu", show_default=True, help=DEVICE_HELP.format(
            what="where the calibration passes run (the model is loaded on the CPU and each block visits "
                 "the device in turn)")),
        click.Option(["--dtype"], default=None, help=DTYPE_HELP),
        click.Option(["--threads"], type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)"),
        click.Option(["--trust-remote-code"], is_flag=True, help="allow a model folder's own Python code to run"),
    ]
    if family == "quantize":
        params += [
            click.Option(["--budget-bits"], type=float, default=None, help="choose each layer's bit width and group "
                         "size (from --budget-candidates) to minimise the predicted loss at this average of storage "
                         "bits per quantized weight, scales and zero points counted (rtn, gptq, awq; needs --data)"),
            click.Option(["--budget-mb"], type=float, default=None, help="the same under a model size in MiB "
                         "(everything not quantized counted as it is stored)"),
            click.Option(["--budget-candidates"], default=None, help="the settings a budget chooses from, bits/group "
                         "(-1: per channel) [default: 2/G,3/G,4/G,8/G,3/-1,4/-1 with G the --group-size]")]
    elif family == "prune":
        params += [
            click.Option(["--budget-sparsity"], type=float, default=None, help="choose each layer's sparsity (from "
                         "--budget-candidates) to minimise the predicted loss at this average sparsity (magnitude, "
                         "wanda, sparsegpt; needs --data)"),
            click.Option(["--budget-candidates"], default=None, help="the sparsities a budget chooses from "
                         "[default: 0.2,0.3,...,0.9]")]
    assert {p.name for p in params} <= fam.reserved | {"model_ref"}, "an own option missing from the registry"
    for fname, (help_, users) in sorted(fields.items()):
        scope = "" if len(users) == len(table) else f" [{', '.join(users)}]"
        params.append(click.Option([option_name(fname), fname], default=None, help=help_ + scope))
    return click.Command(family, callback=run, params=params,
                         help=f"{fam.help}: " + ", ".join(
                             f"{n} ({m.help})" if m.help else n for n, m in sorted(table.items())))


def _run_family(family: str, kw: dict, field_names: list[str]) -> None:
    from . import api, io, models, registry
    from . import report as R
    from .calibration import RunnerOptions
    from .configs import build_config

    _setup(kw["threads"])
    R.reset_peak_rss()
    device, dtype = _device(kw["device"]), _dtype(kw["dtype"])
    out = io.check_output_dir(kw["output"], kw["overwrite"])
    fam = registry.families()[family]
    method = registry.get(family, kw["method"])
    config = build_config(method.config_cls, {f: kw.get(f) for f in field_names}, method.name)
    if any(kw.get(k) is not None for k in ("budget_bits", "budget_mb", "budget_sparsity")):
        from . import budget
        budget.check(family, config, kw)
    if method.data_needed(config) and not kw["data"]:
        raise SlimlmError(f"{method.name} needs calibration data: add --data SOURCE (e.g. --data python-docs)")
    model = models.load_model(kw["model_ref"], dtype=dtype, trust_remote_code=kw["trust_remote_code"])
    tok = models.load_tokenizer(kw["model_ref"], trust_remote_code=kw["trust_remote_code"])
    windows = None
    if kw["data"]:
        from . import data as D
        D.check_context(model, kw["seqlen"])
        windows = api.calibration_data(tok, kw["data"], samples=kw["samples"], seqlen=kw["seqlen"], field=kw["field"])
    runner = RunnerOptions(batch_size=kw["batch_size"], fast=False if kw["precise"] else None,
                           stash_bf16=not kw["precise"], device=device)
    t0 = time.perf_counter()
    allocation = None
    if any(kw.get(k) is not None for k in ("budget_bits", "budget_mb", "budget_sparsity")):
        from . import budget
        config, allocation = budget.apply(family, model, config, windows, kw)
    report = getattr(api, fam.api)(model, config, data=windows, runner=runner)
    seconds = time.perf_counter() - t0
    with io.atomic_dir(out, kw["overwrite"]) as tmp:
        written = models.save_model(model, tok, tmp)
        if allocation is not None:
            (tmp / "allocation.json").write_text(json.dumps(allocation, indent=1) + "\n")
        R.for_output(tmp, family, {"method": method.name, **(report or {})}, seconds, R.peak_rss_mb(), name=out.name)
    click.echo(f"{fam.done} {kw['model_ref']} with {method.name} in {seconds:.1f} s -> {out} ({written} format)")
    for k, v in (report or {}).items():
        click.echo(f"  {k}: {v}")


def _train_command(family: str):
    """`slimlm train`: TrainConfig's fields, the command's own data and output options, then the union of
    every training method's config fields (registry.register refuses a name that clashes)."""
    from . import registry
    from .configs import field_help, option_name
    from .training.config import TrainConfig

    fam = registry.families()[family]
    table = registry.methods(family)
    fields: dict[str, tuple[str, list[str]]] = {}
    for name, m in table.items():
        for f in dataclasses.fields(m.config_cls):
            if f.init:
                help_, users = fields.get(f.name, (field_help(f), []))
                users.append(name)
                fields[f.name] = (help_, users)
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]

    def run(**kw):
        _run_train(family, kw, sorted(fields), train_fields)

    distilling = fam.command == "distill"
    if distilling:
        lead = [click.Option(["--teacher"], default="smollm2-135m", show_default=True,
                             help="the teacher: " + MODEL_HELP + " (quantized models too)"),
                click.Option(["--student"], required=True, help="the student: layers:every-K, layers:first-N, "
                             "layers:last-N or layers:i,j,... (built from the teacher), or a model reference with "
                             "the teacher's tokenizer (a structured-pruned folder, a smaller model)"),
                click.Option(["--student-init"], default="pretrained", show_default=True,
                             help="a student built from the teacher starts from its weights (pretrained) or from "
                             "the architecture's random initialisation (random)"),
                click.Option(["--teacher-cache"], default=None, help="a folder of cached teacher logits (top-k per "
                             "position): built from the teacher and this run's data when it does not exist, then "
                             "training reads it instead of running the teacher (logit losses only)"),
                click.Option(["--cache-k"], type=int, default=64, show_default=True,
                             help="tokens kept per position in a new cache (4 bytes each)"),
                click.Option(["--cache-kind"], default="topk", show_default=True,
                             type=click.Choice(["topk", "sampled"]),
                             help="a new cache keeps the teacher's top k tokens, or k draws from its distribution "
                             "(an unbiased estimate: the student's tail is taught too)"),
                click.Option(["--assistant"], default=None, help="a teacher assistant built from the teacher "
                             "(layers:...), distilled first (saved to OUTPUT.assistant); the student is then "
                             "distilled from it, a --student spec applying to the assistant's layers")]
    else:
        lead = [click.Option(["--model", "model_ref"], default="smollm2-135m", show_default=True, help=MODEL_HELP),
                click.Option(["--method"], required=True, type=click.Choice(sorted(table)), help="the method")]
    params = [
        *lead,
        click.Option(["--data"], required=True, help="training data: text sources joined in order (comma-"
                     "separated: a .txt, .jsonl with --field, .parquet, python-docs), or an instruction .jsonl "
                     "({prompt, response} or chat {messages}; loss on the responses only)"),
        click.Option(["--field"], default=None, help="text field of a .jsonl text source (without it a .jsonl "
                     "is instruction data)"),
        click.Option(["--prompt-field"], default="prompt", show_default=True, help="instruction .jsonl: prompt field"),
        click.Option(["--response-field"], default="response", show_default=True,
                     help="instruction .jsonl: response field"),
        click.Option(["--messages-field"], default="messages", show_default=True,
                     help="instruction .jsonl: chat messages field (rendered with the tokenizer's chat template)"),
        click.Option(["--truncate"], is_flag=True, help="cut examples longer than --seqlen instead of refusing them"),
        click.Option(["--eval-data"], default=None, help="text whose perplexity is measured before and after "
                     "(and every --eval-every steps)"),
        click.Option(["--output"], required=True, help="output folder (written when the run completes; "
                     "checkpoints meanwhile in OUTPUT.partial)"),
        click.Option(["--overwrite"], is_flag=True, help="replace an existing output folder"),
        click.Option(["--resume"], is_flag=True, help="continue the run whose checkpoint is in OUTPUT.partial"),
        click.Option(["--device"], default="cpu", show_default=True, help=DEVICE_HELP.format(what="where to train")),
        click.Option(["--dtype"], default=None, help=DTYPE_HELP),
        click.Option(["--threads"], type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)"),
        click.Option(["--trust-remote-code"], is_flag=True, help="allow a model folder's own Python code to run"),
    ]
    for f in dataclasses.fields(TrainConfig):
        params.append(click.Option([option_name(f.name), f.name], default=None, help=field_help(f)))
    assert {p.name for p in params} <= fam.reserved | {"model_ref"}, "an own option missing from the registry"
    for fname, (help_, users) in sorted(fields.items()):
        scope = "" if len(users) == len(table) else f" [{', '.join(users)}]"
        params.append(click.Option([option_name(fname), fname], default=None, help=help_ + scope))
    methods = ", ".join(f"{n} ({m.help})" if m.help else n for n, m in sorted(table.items()))
    if distilling:
        methods = table["distill"].help
    return click.Command(family, callback=run, params=params, help=f"{fam.help}: {methods}. Several processes: "
                         f"`torchrun --nproc-per-node N -m slimlm {family} ...` or `accelerate launch -m slimlm "
                         f"{family} ...`")


def _run_train(family: str, kw: dict, field_names: list[str], train_fields: list[str]) -> None:
    from pathlib import Path

    from . import api, io, models, registry
    from .configs import build_config
    from .training import data as TD
    from .training.config import TrainConfig

    _setup(kw["threads"])
    device, dtype = _device(kw["device"]), _dtype(kw["dtype"])
    out = Path(kw["output"]).expanduser()
    if not kw["resume"]:
        io.check_output_dir(out, kw["overwrite"])
    elif not out.parent.exists():
        raise SlimlmError(f"the parent folder of {out} does not exist")
    distilling = family == "distill"
    method = registry.get(family, "distill" if distilling else kw["method"])
    config = build_config(method.config_cls, {f: kw.get(f) for f in field_names}, method.name)
    cfg = build_config(TrainConfig, {f: kw.get(f) for f in train_fields}, "train")
    trc = kw["trust_remote_code"]
    if distilling:
        from .distill.students import is_spec
        kw["model_ref"] = kw["teacher"]
        if kw["student_init"] not in ("pretrained", "random"):
            raise SlimlmError(f"--student-init takes pretrained or random, not {kw['student_init']!r}")
        if not is_spec(kw["student"]) and kw["student_init"] != "pretrained":
            raise SlimlmError("--student-init random applies to a student built from the teacher (layers:...)")
    model = models.load_model(kw["model_ref"], dtype=dtype, device=device, trust_remote_code=trc)
    tok = models.load_tokenizer(kw["model_ref"], trust_remote_code=trc)
    teacher = None
    if distilling:
        teacher = model
        if is_spec(kw["student"]) and kw["assistant"]:
            pass                                          # built from the assistant once it is trained (api.distill)
        elif is_spec(kw["student"]):
            from .distill.students import build_student
            model = build_student(teacher, kw["student"], kw["student_init"], seed=cfg.seed)
        else:
            model = models.load_model(kw["student"], dtype=dtype, device=device, trust_remote_code=trc)
            s_tok = models.load_tokenizer(kw["student"], trust_remote_code=trc)
            if s_tok.get_vocab() != tok.get_vocab():
                raise SlimlmError(f"the teacher's tokenizer ({kw['teacher']}: {len(tok)} tokens) and the student's "
                                  f"({kw['student']}: {len(s_tok)} tokens) differ; white-box distillation needs the "
                                  "same vocabulary: use black-box distillation (slimlm generate, then slimlm train "
                                  "on the generations)")
    world = int(os.environ.get("WORLD_SIZE", "1"))        # torchrun / accelerate launch
    steps = cfg.total_steps(world)
    data = _train_data(TD, tok, kw, cfg, steps * cfg.grad_accum * world)
    eval_windows = None
    if kw["eval_data"]:
        from . import data as D
        eval_windows = D.eval_windows(D.tokenize(tok, D.load_text(kw["eval_data"])), cfg.seqlen, cfg.eval_windows)
    t0 = time.perf_counter()
    if distilling and kw["teacher_cache"]:
        from pathlib import Path as _P

        from .distill import cache as C
        folder = _P(kw["teacher_cache"]).expanduser()
        if not folder.exists():
            meta = C.build_cache(teacher, data, folder, k=kw["cache_k"], temperature=config.temperature,
                                 kind=kw["cache_kind"], seed=cfg.seed)
            what = f"top {meta['k']}" if meta["kind"] == "topk" else f"distribution in {meta['k']} draws"
            click.echo(f"cached the teacher's {what} per position for {meta['batches']} batches: "
                       f"{meta['bytes_per_token']} bytes per token, {meta['bytes_on_disk'] / 2**20:.1f} MiB -> {folder}")
        data = C.CachedTeacherData(data, folder, teacher=teacher, temperature=config.temperature,
                                   kind=kw["cache_kind"])
        teacher = None                                         # training never runs it again
        import gc
        gc.collect()
    if distilling:
        if kw["assistant"] and is_spec(kw["student"]):
            model = kw["student"]
        if kw["assistant"] and kw["teacher_cache"]:
            raise SlimlmError("--assistant distills from the teacher itself: drop --teacher-cache")
        report = api.distill(teacher, model, config, data, cfg, tokenizer=tok, output=out, eval_data=eval_windows,
                             resume=kw["resume"], teacher_ref=kw["teacher"], assistant=kw["assistant"],
                             student_init=kw["student_init"] if kw["assistant"] and is_spec(kw["student"])
                             else "pretrained")
        what = f"distilled {kw['teacher']} into {kw['student']}"
    else:
        report = api.train(model, config, data, cfg, tokenizer=tok, output=out, eval_data=eval_windows,
                           resume=kw["resume"], model_ref=kw["model_ref"])
        what = f"trained {kw['model_ref']} with {method.name}"
    if int(os.environ.get("RANK", "0")) == 0:
        from . import report as R
        R.for_output(out, family, {k: v for k, v in report.items() if k in ("method", "steps", "trainable_parameters",
                     "final_loss", "step_seconds_median", "tokens_per_s")}, time.perf_counter() - t0,
                     report.get("peak_rss_mb") or R.peak_rss_mb())
        click.echo(f"{what} for {report['steps']} steps in {time.perf_counter() - t0:.1f} s -> {out}")
        for k in ("trainable_parameters", "final_loss", "eval_perplexity_before", "eval_perplexity_after",
                  "step_seconds_median", "tokens_per_s", "peak_rss_mb"):
            if report.get(k) is not None:
                click.echo(f"  {k}: {report[k]}")


def _train_data(TD, tok, kw: dict, cfg, batches: int):
    """Instruction data for a .jsonl without --field; otherwise text windows of the joined sources."""
    sources = [s.strip() for s in kw["data"].split(",") if s.strip()]
    if len(sources) == 1 and sources[0].endswith(".jsonl") and kw["field"] is None:
        return TD.instruction_data(sources[0], tok, seqlen=cfg.seqlen, batch_size=cfg.batch_size, batches=batches,
                                   seed=cfg.seed, prompt_field=kw["prompt_field"], response_field=kw["response_field"],
                                   messages_field=kw["messages_field"], truncate=kw["truncate"])
    if kw["field"] is not None:
        import torch

        from . import data as D
        ids = torch.cat([D.tokenize(tok, D.load_text(s, field=kw["field"])) for s in sources])
    else:
        ids = TD.training_text(tok, sources)
    return TD.text_windows(ids, seqlen=cfg.seqlen, batch_size=cfg.batch_size, batches=batches, seed=cfg.seed)


class _LazyGroup(click.Group):
    """Builds the family commands (quantize, prune, ...) on first use, so `slimlm --help` stays fast."""

    def _families(self):
        from . import registry
        return registry.families()

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._families()))

    def get_command(self, ctx, name):
        fams = self._families()
        if name in fams:
            return (_train_command if fams[name].command in ("train", "distill") else _family_command)(name)
        return super().get_command(ctx, name)


cli.__class__ = _LazyGroup


def _on_term(signum, frame):
    raise KeyboardInterrupt


def _switch_allocator(args: list[str]) -> None:
    """A training command started as a process (`slimlm train ...`, `python -m slimlm train ...`) re-executes
    itself once under tcmalloc where one is installed (hardware.training_allocator_env: about half the peak
    memory of glibc's malloc at the same or better step time); SLIMLM_ALLOCATOR=system keeps glibc."""
    command = next((a for a in args if not a.startswith("-")), None)
    from . import registry
    fam = registry.families().get(command or "")
    if fam is None or fam.command not in ("train", "distill") or not sys.executable:
        return
    from .hardware import training_allocator_env
    env = training_allocator_env()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, [sys.executable, "-m", "slimlm", *args], env)
        except OSError as e:                         # cannot re-execute: train on the allocator we have
            logging.getLogger(__name__).warning("could not switch to tcmalloc (%s); training on glibc's malloc", e)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, non-zero exits, no tracebacks for input problems. Called with argv None
    (the process's own command line), a training command may first re-execute itself (_switch_allocator)."""
    signal.signal(signal.SIGTERM, _on_term)  # kill -> cleanup of temporary outputs, like Ctrl-C
    try:
        if argv is None:
            _switch_allocator(sys.argv[1:])
        cli.main(args=argv, prog_name="slimlm", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort as e:     # click turns a KeyboardInterrupt into Abort
        cause = e.__cause__
        click.echo(f"slimlm: {cause}" if isinstance(cause, Interrupted) else "slimlm: interrupted; no output was written",
                   err=True)
        return 130
    except click.ClickException as e:
        hint = " (see slimlm --help)" if isinstance(e, click.UsageError) else ""
        click.echo(f"slimlm: error: {e.format_message()}{hint}", err=True)
        return 2
    except SlimlmError as e:
        click.echo(f"slimlm: error: {' '.join(str(e).split())}", err=True)
        return 2
    except ValueError as e:  # configs' validation
        click.echo(f"slimlm: error: {' '.join(str(e).split())}", err=True)
        return 2
    except KeyboardInterrupt as e:
        click.echo(f"slimlm: {e}" if isinstance(e, Interrupted) else "slimlm: interrupted; no output was written",
                   err=True)
        return 130
    except MemoryError:
        click.echo("slimlm: error: out of memory; use fewer --samples, a smaller --batch-size or --seqlen", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
