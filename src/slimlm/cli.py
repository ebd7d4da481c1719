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
from .errors import SlimlmError

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


def _setup(threads: int | None) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads or int(os.environ.get("SLIMLM_THREADS", "2")))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimlm")
@click.option("-v", "--verbose", is_flag=True, help="log progress details")
def cli(verbose: bool) -> None:
    """slimlm: quantize, prune, adapt and distill language models on the hardware you have."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _eval_table(rows: list[tuple[str, dict]]) -> str:
    keys = [("perplexity", "perplexity", "{:.3f}"), ("kl_divergence", "KL vs ref", "{:.4f}"),
            ("top1_agreement", "top-1 agree", "{:.2%}"), ("parameters", "parameters", "{:,}"),
            ("resident_bytes", "memory MB", None), ("disk_bytes", "disk MB", None),
            ("bits_per_weight", "bits/weight", "{:.2f}"), ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
            ("decode_tokens_per_s", "decode tok/s", "{:.1f}")]
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
@click.option("--reference", default=None, help="a reference model for KL divergence and top-1 agreement")
@click.option("--speed/--no-speed", default=True, show_default=True, help="measure prefill/decode tokens/s")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--threads", type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)")
@click.option("--trust-remote-code", is_flag=True, help="allow a model folder's own Python code to run")
def eval_cmd(model_ref, data, field, windows, seqlen, reference, speed, as_json, threads, trust_remote_code):
    """Perplexity, agreement with a reference, size and speed of a model."""
    from . import api, models

    _setup(threads)
    n = _windows(windows)
    if seqlen < 2:
        raise SlimlmError(f"--seqlen must be at least 2 (got {seqlen})")
    t0 = time.perf_counter()
    model = models.load_model(model_ref, trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - t0
    tok = models.load_tokenizer(model_ref, trust_remote_code=trust_remote_code)
    ref = models.load_model(reference, trust_remote_code=trust_remote_code) if reference else None
    res = api.evaluate(model, tok, data, windows=n, seqlen=seqlen, reference=ref, speed=speed,
                       disk_bytes=models.files_bytes(model_ref), field=field, progress=not as_json)
    res.update(model=model_ref, load_seconds=load_s)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"{model_ref} on {data}: {res['windows']} windows x {seqlen} tokens ({res['tokens']} scored)")
        click.echo(_eval_table([(model_ref, res)]))


EXPORT_FORMATS = ("gptq", "gptq_v2", "compressed-tensors")


@cli.command("export")
@click.option("--model", "model_ref", required=True, help="a model quantized by slimlm (or any format it loads)")
@click.option("--format", "fmt", required=True, type=click.Choice(EXPORT_FORMATS),
              help="gptq/gptq_v2: the GPTQ layout transformers and vLLM load; compressed-tensors: pack-quantized")
@click.option("--output", required=True, help="output folder (written only when complete)")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
def export_cmd(model_ref, fmt, output, overwrite):
    """Write a quantized model in a format other tools load."""
    from . import io, models
    from .quant import formats

    _setup(None)
    io.check_output_dir(output, overwrite)
    model = models.load_model(model_ref)
    tok = models.load_tokenizer(model_ref)
    if fmt.startswith("gptq"):
        path = formats.export_gptq(model, tok, output, checkpoint_format=fmt, overwrite=overwrite)
    else:
        path = formats.export_compressed_tensors(model, tok, output, overwrite=overwrite)
    click.echo(f"exported {model_ref} as {fmt} -> {path}")


@cli.command("demo")
@click.option("--output", default="out/smollm2-135m-gptq-w4g64", show_default=True, help="where the quantized model goes")
@click.option("--samples", default=128, show_default=True, type=int, help="calibration windows of 512 tokens")
@click.option("--windows", default=32, show_default=True, type=int, help="evaluation windows of 512 tokens")
@click.option("--threads", type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)")
def demo_cmd(output, samples, windows, threads):
    """The main job on the embedded default: GPTQ 4-bit (group 64) SmolLM2-135M, then before/after."""
    from pathlib import Path

    from . import api, io, models, registry
    from .calibration import RunnerOptions

    _setup(threads)
    # the demo's own output folder: its parent (out/ by default, absent in a fresh clone) is made here, and
    # the output is checked before any work rather than after the quantization
    Path(output).expanduser().parent.mkdir(parents=True, exist_ok=True)
    io.check_output_dir(output, overwrite=True)
    corpora = Path(__file__).resolve().parents[3] / "shared" / "corpora"
    calib = str(corpora / "austen_prideprejudice.txt") if corpora.is_dir() else "python-docs"
    evald = str(corpora / "austen_persuasion.txt") if corpora.is_dir() else "python-docs"
    click.echo(f"loading the embedded default (smollm2-135m); calibration: {calib}; evaluation: {evald}")
    fp32 = models.load_model("smollm2-135m")
    tok = models.load_tokenizer("smollm2-135m")
    method = registry.get("quantize", "gptq")
    config = method.config_cls(bits=4, group_size=64)
    windows_t = api.calibration_data(tok, calib, samples=samples, seqlen=512)
    work = models.load_model("smollm2-135m")
    t0 = time.perf_counter()
    api.quantize(work, config, data=windows_t, runner=RunnerOptions())
    seconds = time.perf_counter() - t0
    with io.atomic_dir(output, overwrite=True) as tmp:
        models.save_model(work, tok, tmp)
    del work
    click.echo(f"GPTQ 4-bit g64 took {seconds:.0f} s; saved to {output}; evaluating both models")
    quant = models.load_model(output)
    before = api.evaluate(fp32, tok, evald, windows=windows, speed=True, disk_bytes=models.files_bytes("smollm2-135m"))
    after = api.evaluate(quant, tok, evald, windows=windows, speed=True, reference=fp32,
                         disk_bytes=models.files_bytes(output))
    click.echo(_eval_table([("fp32", before), ("gptq w4 g64", after)]))


def _family_command(family: str, verb: str):
    """`slimlm quantize` / `slimlm prune`: options are the union of every registered config's fields."""
    from . import registry
    from .calibration import RunnerOptions
    from .configs import field_help, option_name

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
        click.Option(["--threads"], type=int, default=None, help="torch threads (default 2 or $SLIMLM_THREADS)"),
        click.Option(["--trust-remote-code"], is_flag=True, help="allow a model folder's own Python code to run"),
    ]
    taken = {p.name for p in params}
    for fname, (help_, users) in sorted(fields.items()):
        if fname in taken:
            continue
        scope = "" if len(users) == len(table) else f" [{', '.join(users)}]"
        params.append(click.Option([option_name(fname), fname], default=None, help=help_ + scope))
    return click.Command(verb, callback=run, params=params,
                         help=f"{family.capitalize()} a model: " + ", ".join(
                             f"{n} ({m.help})" if m.help else n for n, m in sorted(table.items())))


def _run_family(family: str, kw: dict, field_names: list[str]) -> None:
    from . import api, io, models, registry
    from .calibration import RunnerOptions
    from .configs import build_config

    _setup(kw["threads"])
    out = io.check_output_dir(kw["output"], kw["overwrite"])
    method = registry.get(family, kw["method"])
    values = {f: kw.get(f) for f in field_names if f not in ("seqlen",)}
    config = build_config(method.config_cls, {k: v for k, v in values.items() if k in kw}, method.name)
    if method.data_needed(config) and not kw["data"]:
        raise SlimlmError(f"{method.name} needs calibration data: add --data SOURCE (e.g. --data python-docs)")
    model = models.load_model(kw["model_ref"], trust_remote_code=kw["trust_remote_code"])
    tok = models.load_tokenizer(kw["model_ref"], trust_remote_code=kw["trust_remote_code"])
    windows = None
    if kw["data"]:
        from . import data as D
        D.check_context(model, kw["seqlen"])
        windows = api.calibration_data(tok, kw["data"], samples=kw["samples"], seqlen=kw["seqlen"], field=kw["field"])
    runner = RunnerOptions(batch_size=kw["batch_size"], fast=False if kw["precise"] else None,
                           stash_bf16=not kw["precise"])
    t0 = time.perf_counter()
    report = getattr(api, family)(model, config, data=windows, runner=runner)
    seconds = time.perf_counter() - t0
    with io.atomic_dir(out, kw["overwrite"]) as tmp:
        models.save_model(model, tok, tmp)
    click.echo(f"{family}d {kw['model_ref']} with {method.name} in {seconds:.1f} s -> {out}")
    for k, v in (report or {}).items():
        click.echo(f"  {k}: {v}")


class _LazyGroup(click.Group):
    """Builds `quantize` and `prune` on first use, so `slimlm --help` stays fast."""
    FAMILIES = {"quantize": "quantize", "prune": "prune"}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.FAMILIES))

    def get_command(self, ctx, name):
        if name in self.FAMILIES:
            return _family_command(self.FAMILIES[name], name)
        return super().get_command(ctx, name)


cli.__class__ = _LazyGroup


def _on_term(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, non-zero exits, no tracebacks for input problems."""
    signal.signal(signal.SIGTERM, _on_term)  # kill -> cleanup of temporary outputs, like Ctrl-C
    try:
        cli.main(args=argv, prog_name="slimlm", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("slimlm: interrupted; no output was written", err=True)
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
    except KeyboardInterrupt:
        click.echo("slimlm: interrupted; no output was written", err=True)
        return 130
    except MemoryError:
        click.echo("slimlm: error: out of memory; use fewer --samples, a smaller --batch-size or --seqlen", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
