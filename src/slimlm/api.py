"""The Python API: the same operations as the CLI, on models in memory.

    model = slimlm.load_model("smollm2-135m")
    tok = slimlm.load_tokenizer("smollm2-135m")
    slimlm.quantize(model, GPTQConfig(bits=4, group_size=64), data=slimlm.calibration_data(tok))
    print(slimlm.evaluate(model, tok, data="python-docs"))
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import data as D
from . import metrics as E
from . import registry
from .calibration import RunnerOptions
from .errors import ConfigError, SlimlmError

log = logging.getLogger(__name__)


def calibration_data(tokenizer, source: str = D.DEFAULT_SOURCE, *, samples: int = 128, seqlen: int = 512,
                     seed: int = 0, field: str = "text") -> Tensor:
    """(samples, seqlen) token windows at seeded random offsets of a text source."""
    return D.calibration_windows(D.tokenize(tokenizer, D.load_text(source, field=field)), samples, seqlen, seed)


def _method_for(family: str, config: Any) -> registry.Method:
    for m in registry.methods(family).values():
        if type(config) is m.config_cls:
            return m
    raise SlimlmError(f"{type(config).__name__} is not a {family} config; use one of: "
                      + ", ".join(m.config_cls.__name__ for m in registry.methods(family).values()))


def _apply(family: str, model: nn.Module, config: Any, data: Tensor | None,
           runner: RunnerOptions | None) -> dict:
    method = _method_for(family, config)
    if method.data_needed(config) and data is None:
        raise SlimlmError(f"{method.name} needs calibration data: pass data=calibration_data(tokenizer, ...) "
                          "(CLI: --data SOURCE)")
    check_finite(model)
    with torch.no_grad():
        return method.apply(model, config, data, runner or RunnerOptions())


def quantize(model: nn.Module, config: Any, data: Tensor | None = None,
             runner: RunnerOptions | None = None) -> dict:
    """Quantize `model` in place with the method whose config this is; returns the method's report."""
    report = _apply("quantize", model, config, data, runner)
    embed = getattr(config, "embed_dtype", "float32")
    if embed != "float32":
        from .quant.embeddings import EMBED_DTYPES, cast_embeddings

        report["embed_dtype"] = embed
        report["embed_bytes_saved"] = cast_embeddings(model, EMBED_DTYPES[embed])
    return report


def prune(model: nn.Module, config: Any, data: Tensor | None = None, runner: RunnerOptions | None = None) -> dict:
    """Prune `model` in place with the method whose config this is; returns the method's report."""
    return _apply("prune", model, config, data, runner)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the evaluation's inputs go there)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
            raise SlimlmError(f"weight {name} holds NaN or infinite values; the model is broken, fix it first")


def _check_heads(kind: str, model: nn.Module, tokenizer, reference, masked_positions: int | None) -> None:
    """One-line errors for what `evaluate` cannot score, before any text is read."""
    name = type(model).__name__
    if kind == "none" and reference is None:
        raise SlimlmError(f"perplexity needs a language-model head and {name} has none (an embedding model); "
                          "measure agreement with a reference model's embeddings instead: reference=MODEL "
                          "(CLI: --reference MODEL)")
    if kind == "masked":
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise SlimlmError(f"{name} is a masked LM but its tokenizer has no mask token; give the model's own tokenizer")
        if masked_positions is not None and masked_positions < 1:
            raise SlimlmError(f"--masked-positions must be at least 1 or 'all' (got {masked_positions})")
    if isinstance(reference, nn.Module):
        ref_kind = E.lm_kind(reference)
        if kind != "none" and ref_kind != kind:
            raise SlimlmError(f"the reference {type(reference).__name__} has a {ref_kind} head and {name} a {kind} "
                              "one; compare a model with a reference of the same kind")
        v, rv = (getattr(getattr(m, "config", None), "vocab_size", None) for m in (model, reference))
        if v is not None and rv is not None and v != rv:
            raise SlimlmError(f"the reference's vocabulary ({rv} tokens) is not the model's ({v}); "
                              "compare models that share a tokenizer")


def evaluate(model: nn.Module, tokenizer, data: str = D.DEFAULT_SOURCE, *, windows: int | None = 32,
             seqlen: int = 512, reference: nn.Module | None = None, speed: bool = False,
             disk_bytes: int | None = None, field: str = "text", progress: bool = True,
             masked_positions: int | None = 32, seed: int = 0) -> dict:
    """Quality (and size, speed) by the benchmark protocol; returns a flat dict.

    What quality means follows the model's head (metrics.lm_kind):
    - causal LM: perplexity; with a reference, kl_divergence and top1_agreement per predicted token.
    - masked LM (a ...ForMaskedLM): pseudo_perplexity (metrics.pseudo_perplexity) over `masked_positions`
      positions per window drawn with `seed` (None: every position), the windows wrapped [CLS] ... [SEP] with
      seqlen counting those; with a reference masked LM, masked_kl_divergence and masked_top1_agreement.
    - no LM head (an embedding model such as all-MiniLM-L6-v2): no perplexity exists, so a reference is
      required and the result is embedding_cosine_mean / embedding_cosine_min of the windows' mean-pooled
      embeddings (metrics.embedding_agreement).
    speed: prefill and decode tokens/s for a causal LM; encode tokens/s of one window for an encoder.
    """
    D.check_context(model, seqlen)
    kind = E.lm_kind(model)
    _check_heads(kind, model, tokenizer, reference, masked_positions)
    ids = D.tokenize(tokenizer, D.load_text(data, field=field))
    dev = model_device(model)
    if kind == "causal":
        win = D.eval_windows(ids, seqlen, windows).to(dev)
        quality = E.score(model, win, reference, progress=progress)
    else:
        win, scorable = D.encoder_windows(ids, seqlen, windows, tokenizer)
        win = win.to(dev)
        if kind == "masked":
            quality = E.pseudo_perplexity(model, win, scorable, tokenizer.mask_token_id, positions=masked_positions,
                                          seed=seed, reference=reference, progress=progress)
        else:
            quality = E.embedding_agreement(model, reference, win, progress=progress)
    result: dict[str, Any] = {"data": data, "windows": int(win.shape[0]), "seqlen": seqlen, **quality}
    result.update(E.as_dict(E.size(model, disk_bytes)))
    if speed:
        result.update(E.speed(model, ids[:128].to(dev)) if kind == "causal" else E.encode_speed(model, win[0]))
    return result


def export(model: nn.Module, tokenizer, output: str | os.PathLike, format: str | None = None, *,
           overwrite: bool = False, **options) -> Path:
    """Write `model` (with its tokenizer, may be None) to the folder `output` in `format`, a name of the format
    registry (`slimlm export --help` lists them; None: the best-suited one, as save_model), or to the file
    `output` for a single-file format (gguf: a name ending with .gguf in an existing folder). The output
    appears only when complete; an existing one is replaced only with overwrite=True. `options` go to the
    format's writer (gguf: float_type, accept_requantize, tokenizer_pre)."""
    from . import io, models

    fmt = registry.get_format(format) if format else registry.default_format(model)
    if fmt.suffix is not None:
        with io.atomic_file(output, fmt.suffix, overwrite=overwrite) as tmp:
            models.save_model(model, tokenizer, tmp, format=fmt.name, **options)
        return Path(output).expanduser()
    with io.atomic_dir(output, overwrite=overwrite) as tmp:
        models.save_model(model, tokenizer, tmp, format=fmt.name, **options)
    return Path(output)


def train(model: nn.Module, config: Any, data, train_config: Any = None, *, tokenizer=None,
          output: str | os.PathLike | None = None, eval_data: Tensor | None = None, resume: bool = False,
          progress: bool = True, model_ref: str | None = None) -> dict:
    """Train `model` with the method whose config this is (LoRAConfig, FullConfig, ...) on `data` (a
    slimlm.training.data TrainData: batch(i) -> {"input_ids", "labels"[, "attention_mask"]}) as `train_config`
    (a TrainConfig; default TrainConfig()) says. With `output`, the method's result (a PEFT adapter folder for
    LoRA, a model folder for full fine-tuning) and metrics.jsonl are written there when the run completes;
    checkpoints live in OUTPUT.partial/ meanwhile, and resume=True continues from the last one. `eval_data`:
    (n, L) token windows whose perplexity is measured before and after (and every eval_every steps).
    Returns the run's report. Runs data-parallel when launched by torchrun or accelerate."""
    return _train("train", model, config, data, train_config, tokenizer=tokenizer, output=output, eval_data=eval_data,
                  resume=resume, progress=progress, model_ref=model_ref)


def distill(teacher: nn.Module, student: nn.Module | str, config: Any = None, data=None, train_config: Any = None, *,
            tokenizer=None, output: str | os.PathLike | None = None, eval_data: Tensor | None = None,
            resume: bool = False, progress: bool = True, teacher_ref: str | None = None,
            student_init: str = "pretrained", assistant: str | None = None) -> dict:
    """Distill `teacher` into `student` (a model, or a spec built from the teacher: "layers:every-2",
    "layers:first-N", "layers:last-N", "layers:0,3,5") with a DistillConfig (default DistillConfig()) on
    `data` (as train() takes it); the student trains, the teacher stays frozen. With `output`, the student is
    saved there as a model folder (with metrics.jsonl) when the run completes; `resume` continues from
    OUTPUT.partial. Returns the run's report; the trained student is report["student"] as well when it was
    built from a spec.

    assistant: a teacher assistant (Mirzadeh et al. 2020; MiniLM's mid-size step), a spec built from the
    teacher ("layers:every-..."), distilled from the teacher first with the same settings (saved to
    OUTPUT.assistant, reused by a resumed run); the student (a spec then applies to the assistant's layers)
    is then distilled from the assistant."""
    from .distill.cache import CachedTeacherData
    from .distill.method import DistillConfig
    from .distill.students import build_student, is_spec

    config = config if config is not None else DistillConfig()
    cache = data.meta if isinstance(data, CachedTeacherData) else None
    stage: dict | None = None
    if assistant is not None:
        if cache is not None or teacher is None:
            raise SlimlmError("a teacher assistant is distilled from the teacher itself: pass the teacher, not a cache")
        from .calibration.common import find_blocks
        from .distill.students import parse_layers
        from .models import load_model
        if not is_spec(assistant):
            raise SlimlmError(f"assistant {assistant!r}: a spec built from the teacher, like layers:every-2")
        mid_layers = len(parse_layers(assistant, len(find_blocks(teacher)[1])))
        if isinstance(student, str) and is_spec(student):
            parse_layers(student, mid_layers)                 # a bad student spec fails before any training
        folder = Path(f"{output}.assistant") if output is not None else None
        if folder is not None and resume and (folder / "config.json").is_file():
            mid = load_model(str(folder), device=str(model_device(teacher)))
            stage = {"assistant": assistant, "reused": str(folder)}
        else:
            mid = build_student(teacher, assistant, "pretrained", seed=getattr(train_config, "seed", 0))
            r = _train("distill", mid, config, data, train_config, tokenizer=tokenizer, output=folder,
                       eval_data=eval_data, resume=resume, progress=progress, model_ref=None, teacher=teacher,
                       teacher_ref=teacher_ref)
            stage = {"assistant": assistant, **{k: r.get(k) for k in ("steps", "final_loss", "eval_perplexity_after")}}
        teacher, teacher_ref = mid, f"{teacher_ref or 'teacher'} -> assistant {assistant}"
    if teacher is None and (cache is None or isinstance(student, str)):
        raise SlimlmError("distill needs the teacher (a model), unless the data is a CachedTeacherData and the "
                          "student a model")
    built = isinstance(student, str)
    if built:
        if not is_spec(student):
            raise SlimlmError(f"student {student!r}: pass a model, or a spec like layers:every-2")
        student = build_student(teacher, student, student_init, seed=getattr(train_config, "seed", 0))
    elif student_init != "pretrained":
        raise SlimlmError("student_init applies to a student built from the teacher (a layers:... spec)")
    if teacher_ref is None:
        teacher_ref = getattr(teacher, "slimlm_ref", None)
    report = _train("distill", student, config, data, train_config, tokenizer=tokenizer, output=output,
                    eval_data=eval_data, resume=resume, progress=progress, model_ref=getattr(student, "slimlm_ref", None),
                    teacher=None if cache is not None else teacher, teacher_ref=teacher_ref, teacher_cache=cache)
    if cache is not None:
        report["teacher_cache"] = {k: cache[k] for k in ("k", "temperature", "bytes_per_token", "bytes_on_disk",
                                                         "batches", "tokens")}
    if stage is not None:
        report["assistant_stage"] = stage
    if built:
        report["student"] = student
    return report


def _train(family: str, model: nn.Module, config: Any, data, train_config: Any, *, tokenizer, output, eval_data,
           resume: bool, progress: bool, model_ref: str | None, teacher: nn.Module | None = None,
           teacher_ref: str | None = None, teacher_cache: dict | None = None) -> dict:
    from .adapt.methods import TrainContext
    from .training.config import TrainConfig
    from .training.dist import Dist
    from .training.loop import train as run_loop

    cfg = train_config or TrainConfig()
    method = _method_for(family, config)
    if model_ref is None:
        model_ref = getattr(model, "slimlm_ref", None)
    dist = Dist.from_env(str(model_device(model)))
    try:
        plan = method.apply(model, config, TrainContext(tokenizer=tokenizer, model_ref=model_ref, seed=cfg.seed,
                                                       seqlen=cfg.seqlen, total_steps=cfg.total_steps(dist.world),
                                                       teacher=teacher, teacher_cache=teacher_cache, lr=cfg.lr,
                                                       data=data))
        import dataclasses
        run = {"model": model_ref, "method": method.name, "method_config": dataclasses.asdict(config),
               "data": getattr(data, "describe", lambda: None)()}
        if teacher is not None or teacher_cache is not None:
            run["teacher"] = teacher_ref or (teacher_cache or {}).get("teacher_ref")
            run["student_layers_from_teacher"] = getattr(model, "slimlm_teacher_layers", None)
        return run_loop(model, plan, data, cfg, output=Path(output) if output is not None else None,
                        tokenizer=tokenizer, eval_windows=eval_data, resume=resume, run=run, progress=progress,
                        dist=dist)
    finally:
        dist.close()


def merge(model: nn.Module, adapter: str | os.PathLike, *, into: str = "base", requantize: str = "rtn",
          calibration: Tensor | None = None, eval_data: Tensor | None = None, max_kl: float | None = None,
          progress: bool = True) -> dict:
    """Load the PEFT adapter folder `adapter` onto `model` and merge it in place (slimlm.adapt.merge): exactly
    into float layers; into packed layers by re-quantizing onto their stored grid (requantize="rtn", or
    "gptq" with `calibration` windows for the Hessians); into="float" makes the adapted layers full-precision
    copies instead. With `eval_data` windows, reports what the merge changed against the unmerged model (KL
    divergence, top-1 agreement, perplexity of both) and, with `max_kl`, refuses (ConfigError, nothing
    changed) when the KL is above it."""
    import copy
    import tempfile

    from .adapt import merge as M
    from .adapt.peft_io import load_peft

    if requantize not in M.METHODS:
        raise SlimlmError(f"requantize must be one of {', '.join(M.METHODS)} (got {requantize!r})")
    if requantize == "gptq" and calibration is None:
        raise SlimlmError("GPTQ re-quantization needs calibration data: pass calibration= windows (CLI: --data)")
    from .adapt.loading import adapter_kind
    kind = adapter_kind(adapter)
    if kind != "lora":
        raise SlimlmError(f"{adapter} is a {kind} adapter; only LoRA adapters merge into weights (evaluate the "
                          "others on their base with --adapter)")
    layers = load_peft(model, adapter)
    report: dict[str, Any] = {"adapter": str(adapter), "adapted_layers": len(layers), "into": into,
                              "requantize": requantize}
    hessians = M.input_hessians(model, calibration) if requantize == "gptq" else None
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        if eval_data is not None:
            ref = E.ReferenceLogprobs.write(model, eval_data, Path(tmp) / "unmerged.f32", progress=progress)
            report["perplexity_unmerged"] = E.score(model, eval_data, progress=progress)["perplexity"]
        work = copy.deepcopy(model) if max_kl is not None else model
        report.update(M.merge_adapter(work, into=into, hessians=hessians))
        if ref is not None:
            s = E.score(work, eval_data, ref, progress=progress)
            report.update(perplexity_merged=s["perplexity"], merge_kl_divergence=s["kl_divergence"],
                          merge_top1_agreement=s["top1_agreement"])
    if max_kl is not None and report.get("merge_kl_divergence", 0.0) > max_kl:
        from .adapt.lora import remove_lora
        remove_lora(model)                      # the model is back to its base, unmerged
        raise ConfigError(f"merging adds a KL divergence of {report['merge_kl_divergence']:.4f} per token against the "
                          f"unmerged model (perplexity {report['perplexity_unmerged']:.3f} -> "
                          f"{report['perplexity_merged']:.3f}), above {max_kl}; merge into a float copy (--into float), "
                          "use --requantize gptq with --data, or accept it with --force")
    if work is not model:                       # the merged copy's layers replace the adapted ones
        from .modules import set_submodule
        for name in layers:
            set_submodule(model, name, work.get_submodule(name))
    return report
