"""Building method configs from strings (CLI options, recipe files), generically from the dataclass fields.

A config field documents itself with `field(metadata={"help": "..."})`; the CLI turns every field of every
registered config into an option `--field-name`, so help text lives in one place.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import ConfigError


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _convert(raw: Any, tp: Any, name: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            try:
                return _convert(raw, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{option_name(name)}: cannot read {raw!r}")
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{option_name(name)} takes true or false, not {raw!r}")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise ConfigError(f"{option_name(name)} takes {'an integer' if tp is int else 'a number'}, "
                              f"not {raw!r}") from None
    if origin in (tuple, list):
        return tp(x.strip() for x in raw.split(",") if x.strip()) if origin is list else tuple(
            x.strip() for x in raw.split(",") if x.strip())
    return raw


def build_config(config_cls: type, values: dict[str, Any], method: str = "") -> Any:
    """Instantiate `config_cls` from {field_name: raw value}; unknown fields are an error naming the method."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kwargs = {}
    for k, v in values.items():
        if v is None:
            continue
        if k not in names:
            valid = ", ".join(sorted(option_name(n) for n in names))
            raise ConfigError(f"{option_name(k)} does not apply to method {method or config_cls.__name__}; "
                              f"its options are: {valid}")
        kwargs[k] = _convert(v, hints[k], k)
    try:
        return config_cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad options for {method or config_cls.__name__}: {e}") from None
