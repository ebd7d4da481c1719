"""Checkpoints of a training run, kept in `OUTPUT.partial/` while the run is in progress.

    OUTPUT.partial/
        metrics.jsonl          one JSON object per optimizer step (appended as the run goes)
        checkpoint/            the last checkpoint, replaced atomically (written beside, then renamed):
            run.json           step, what was trained (model, method and its settings, data), format version
            trainable.safetensors   the method's tensors (TrainPlan.state_tensors)
            optimizer.safetensors + optimizer.json   the optimizer's tensors and its other state
            rng.safetensors    the random generators' states (dropout)

Nothing is pickled: tensors go to safetensors, everything else to JSON. The learning-rate schedule is a
function of the step and the data a function of the batch index, so the step number restores both.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SlimlmError

VERSION = 1
FOLDER = "checkpoint"


def partial_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.partial"


def _split(d: dict, prefix: str, tensors: dict[str, Tensor], seen: set[int]) -> dict:
    """Move every tensor of `d`, at any depth of nested dicts, into `tensors` under prefix + its path ("/"
    between levels); return what is left (JSON-able), nested the same way. A tensor whose memory another
    one already uses (bitsandbytes shares its quantization maps between parameters) is copied: safetensors
    stores no shared memory."""
    rest = {}
    for k, v in d.items():
        if isinstance(v, Tensor):
            t = v.detach().contiguous().cpu()
            ptr = t.untyped_storage().data_ptr()
            tensors[f"{prefix}{k}"] = t.clone() if ptr in seen else t
            seen.add(ptr)
        elif isinstance(v, dict):                # e.g. bitsandbytes' __bnb_optimizer_quant_state__
            rest[k] = _split(v, f"{prefix}{k}/", tensors, seen)
        else:
            rest[k] = v
    return rest


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """The optimizer's state dict as safetensors (key "PID.NAME", "PID.NAME/SUB" in nested dicts) + JSON."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    state = {str(pid): _split(st, f"{pid}.", tensors, seen) for pid, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): rest for pid, rest in meta["state"].items()}
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        *path, leaf = name.split("/")
        d = state.setdefault(int(pid), {})
        for part in path:
            d = d.setdefault(part, {})
        d[leaf] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def save(partial: Path, step: int, run: dict, trainable: dict[str, Tensor], opt: torch.optim.Optimizer) -> Path:
    """Write the checkpoint of `step` into partial/checkpoint, replacing the previous one only once complete."""
    from safetensors.torch import save_file

    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f".{FOLDER}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        o_tensors, o_meta = _flatten_optimizer(opt)
        save_file(o_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(o_meta))
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "run.json").write_text(json.dumps({**run, "step": step, "version": VERSION}, indent=1))
        for f in tmp.iterdir():                     # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = partial / FOLDER
    old = None
    if final.exists():
        old = partial / f".{FOLDER}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_run(partial: Path) -> dict | None:
    f = partial / FOLDER / "run.json"
    return json.loads(f.read_text()) if f.is_file() else None


def check_same_run(saved: dict, run: dict, partial: Path) -> None:
    """Refuse to resume a checkpoint of another model, method, method setting or data."""
    for key in ("model", "method", "method_config", "data", "world", "batch_size", "grad_accum", "seqlen", "seed"):
        if saved.get(key) != run.get(key):
            raise SlimlmError(f"{partial} holds a checkpoint of another run ({key} was {saved.get(key)!r}, now "
                              f"{run.get(key)!r}); resume with the same settings, or remove {partial} to start over")


def load(partial: Path, opt: torch.optim.Optimizer) -> tuple[int, dict[str, Tensor]]:
    """Restore the optimizer and the random generators; return (step, trainable tensors)."""
    from safetensors.torch import load_file

    ck = partial / FOLDER
    run = json.loads((ck / "run.json").read_text())
    if run.get("version", 0) > VERSION:
        raise SlimlmError(f"{ck} was written by a newer slimlm (checkpoint version {run['version']}); upgrade")
    opt.load_state_dict(_unflatten_optimizer(load_file(str(ck / "optimizer.safetensors")),
                                             json.loads((ck / "optimizer.json").read_text())))
    rng = load_file(str(ck / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return int(run["step"]), load_file(str(ck / "trainable.safetensors"))


def truncate_metrics(partial: Path, step: int) -> None:
    """Keep the metrics of steps up to `step` (a killed run may have logged steps after its checkpoint)."""
    f = partial / "metrics.jsonl"
    if not f.is_file():
        return
    keep = [line for line in f.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    f.write_text("".join(line + "\n" for line in keep))
