"""Names and choices shared by the configs of every family: layer-name patterns and option lists.

Layer names are the qualified module names (`model.layers.3.self_attn.q_proj`). A name PATTERN is a glob
(`*`, `?`, `[...]`) over whole dotted parts: it matches a layer when it matches the full name, a dotted tail
of it, or a module containing the layer. So `q_proj`, `mlp`, `layers.3`, `self_attn.*_proj` and
`model.layers.1*` all work; `proj` alone matches nothing (it is not a whole part).

Pure string logic with no imports from the rest of slimlm, so that every layer (configs, methods, the
calibration runner, formats) can use it.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

PATTERN_HELP = ("patterns are globs over whole dotted name parts: 'mlp', 'q_proj', 'layers.3', "
                "'self_attn.*_proj'")

# How the calibration runner feeds each next block (calibration.RunnerOptions.propagate): the outputs of the
# block just compressed, or the statistics pass's own (dense) outputs.
PROPAGATE = ("compressed", "dense")


def split_list(text: str | list | tuple) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (lists and tuples from the Python API pass through)."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return [s.strip() for s in items if str(s).strip()]


def name_matches(name: str, pattern: str) -> bool:
    """Whether the qualified module `name` matches `pattern` on whole dotted parts (see module docstring)."""
    return any(fnmatchcase(name, p) for p in (pattern, "*." + pattern, pattern + ".*", "*." + pattern + ".*"))
