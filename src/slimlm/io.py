"""Output folders and files that appear only when complete, and safe reading of weight files."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import SlimlmError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) when the output folder exists and --overwrite was not given."""
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise SlimlmError(f"output {p} already exists; choose another --output or pass --overwrite")
    if p.exists() and not p.is_dir():
        raise SlimlmError(f"output {p} exists and is not a folder; remove it or choose another --output")
    if not p.parent.exists():
        raise SlimlmError(f"the parent folder of {p} does not exist; create it first")
    return p


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; move it into place only if the block completes.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary folder is removed, so an
    interrupted run leaves no partial output behind.
    """
    target = check_output_dir(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | os.PathLike, suffix: str, overwrite: bool) -> Path:
    """Fail early (before any work) for a single-file output: it must end with `suffix`, its folder must exist,
    and an existing file is replaced only with overwrite."""
    p = Path(path).expanduser()
    if p.suffix != suffix:
        raise SlimlmError(f"output {p} must be a file name ending with {suffix}")
    if not p.parent.is_dir():
        raise SlimlmError(f"the folder of {p} ({p.parent}) does not exist; create it first")
    if p.is_dir():
        raise SlimlmError(f"output {p} is a folder; give a file name ending with {suffix}")
    if p.exists() and not overwrite:
        raise SlimlmError(f"output {p} already exists; choose another --output or pass --overwrite")
    return p


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, suffix: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `target` (checked by check_output_file); rename it onto the target
    only if the block completes, remove it otherwise (KeyboardInterrupt and SystemExit included)."""
    target = check_output_file(target, suffix, overwrite)
    tmp = target.parent / f".{target.stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not tmp.is_file():
        raise SlimlmError(f"the writer left no file for {target}")
    os.replace(tmp, target)


def refuse_pickles(folder: Path) -> None:
    """Refuse a folder whose weights exist only as pickles (never unpickle users' files)."""
    names = [p.name for p in folder.iterdir()]
    has_st = any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not has_st:
        raise SlimlmError(
            f"{folder} holds only pickled weights ({pickles[0]}); slimlm never loads pickles: "
            "convert the checkpoint to safetensors first")


def check_safetensors(folder: Path) -> None:
    """Open every safetensors file's header so a corrupted file fails with one clear line."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
                if keys:
                    h.get_slice(keys[-1])
        except Exception as e:  # safetensors raises its own error types
            raise SlimlmError(f"{f} is not a valid safetensors file ({str(e).splitlines()[0]}); "
                              "re-create or re-download it") from None
        size = f.stat().st_size
        _check_data_length(f, size)


def _check_data_length(f: Path, size: int) -> None:
    """A truncated file has a valid header but too few bytes for the tensors it declares."""
    import json
    import struct

    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SlimlmError(f"{f} is truncated ({size} bytes, header declares {8 + n + end}); "
                          "re-create or re-download it")
