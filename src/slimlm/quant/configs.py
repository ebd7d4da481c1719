"""One config dataclass per quantization method; every field documents itself (the CLI's --help reads it).

Layer selection is shared by all methods. By default every linear layer of the transformer blocks is
quantized; the output layer (lm_head) and anything else outside the blocks stay in full precision, and
embeddings always do. Two options change that, with the layer-name patterns pruning uses
(slimlm.selection: globs over whole dotted parts, so `down_proj`, `mlp`, `layers.0`, `self_attn.*_proj`
and `lm_head` all work):

    overrides = "down_proj=8,lm_head=4,layers.0=none"     PATTERN=VALUE pairs, the first matching pair wins;
                                                          VALUE is a bit width or none (full precision)
    ignore    = "o_proj,layers.0"                         layers kept in full precision

A pattern that matches no linear layer is an error (a typo would otherwise be silently ignored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from slimlm.core.nf4 import QUANT_TYPES
from slimlm.errors import ConfigError
from slimlm.selection import PATTERN_HELP, split_list

FULL_PRECISION = ("none", "fp", "full")
GROUP_FALLBACKS = ("error", "per-channel")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bitsandbytes can load

OVERRIDES_HELP = ("per-layer bit widths: comma-separated PATTERN=VALUE pairs, VALUE bits, bits/group size (a "
                  "group-size method: 4/128, 3/-1 per channel) or 'none' (full precision), the first matching "
                  "pair wins; layers outside the transformer blocks (lm_head) are quantized only when a pair "
                  "names them. E.g. 'down_proj=8,lm_head=4,layers.0=none'; "
                  + PATTERN_HELP)
IGNORE_HELP = ("comma-separated patterns of layers kept in full precision, e.g. 'o_proj,layers.0'; "
               + PATTERN_HELP)


class Rule(NamedTuple):
    """One override: layers matching `pattern` get `bits` (None = full precision) and, when given, their own
    group size (-1: per output channel) instead of the config's."""
    pattern: str
    bits: int | None
    group_size: int | None = None


def parse_overrides(spec: str | dict, allowed_bits: tuple[int, ...]) -> tuple[Rule, ...]:
    """Rules from 'PATTERN=VALUE,...' (or a dict {pattern: bits or None}); see the module docstring."""
    if isinstance(spec, dict):
        pairs = [(str(k).strip(), "none" if v is None else str(v).strip()) for k, v in spec.items()]
    else:
        pairs = []
        for item in split_list(spec):
            pattern, sep, value = (x.strip() for x in item.partition("="))
            if not sep or not pattern:
                raise ConfigError(f"overrides item {item!r} is not PATTERN=VALUE; write e.g. 'down_proj=8' "
                                  "or 'lm_head=none', items separated by commas")
            pairs.append((pattern, value))
    rules = []
    for pattern, value in pairs:
        if value.lower() in FULL_PRECISION:
            rules.append(Rule(pattern, None))
            continue
        width, slash, group = value.partition("/")
        try:
            bits = int(width)
            group_size = int(group) if slash else None
        except ValueError:
            bits = group_size = None
        if bits not in allowed_bits or (slash and (group_size is None or group_size < -1)):
            raise ConfigError(f"overrides item {pattern}={value}: the value must be 'none', one of the bit "
                              f"widths {', '.join(map(str, allowed_bits))}, or bits/group size like 4/128 or "
                              "3/-1 (per channel)")
        rules.append(Rule(pattern, bits, group_size))
    return tuple(rules)


def _check_bits(bits: int, allowed: tuple[int, ...]) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise ConfigError(f"bits must be one of {', '.join(map(str, allowed))}, got {bits!r}")


def _require_positive_int(name: str, value, what: str) -> None:
    """ConfigError unless `value` is an int >= 1; `what` names the unit with an example."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive {what}, got {value!r}")


@dataclass(kw_only=True)
class LayerSelection:
    """Which layers a method quantizes (shared by every quantization config)."""
    overrides: str = field(default="", metadata={"help": OVERRIDES_HELP})
    ignore: str = field(default="", metadata={"help": IGNORE_HELP})
    embed_dtype: str = field(default="float32", metadata={
        "help": "dtype of the token embeddings and an unquantized (e.g. tied) output layer: float32 keeps them "
                "as they are (default); bfloat16 halves their memory and runs the output layer ~4x faster on "
                "CPU, the rest of the model still computing in float32"})

    #: bit widths an override may ask for (a method with one width allows only that one)
    ALLOWED_BITS = tuple(range(2, 9))

    def __post_init__(self) -> None:
        self.ignore = ",".join(split_list(self.ignore or ""))
        self.rules()  # validates
        if self.embed_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"embed_dtype must be float32 or bfloat16, got {self.embed_dtype!r}")

    def rules(self) -> tuple[Rule, ...]:
        return parse_overrides(self.overrides or "", self.ALLOWED_BITS)

    def ignore_patterns(self) -> list[str]:
        return split_list(self.ignore)

    def default_bits(self) -> int:
        raise NotImplementedError


@dataclass
class IntQuantConfig(LayerSelection):
    """Uniform integer weights: q = clamp(round(w / s) + z, 0, 2^b - 1) per group of input columns."""
    bits: int = field(default=4, metadata={
        "help": "bits per weight, 2..8 (default 4; 5-7 bit codes are stored in 8-bit containers)"})
    group_size: int = field(default=64, metadata={
        "help": "input columns sharing one scale (default 64): g > 0 (must divide every layer's input size), "
                "-1 = one scale per output channel, 0 = one scale per tensor"})
    symmetric: bool = field(default=False, metadata={
        "help": "symmetric grid around zero (zero point fixed at 2^(bits-1)) instead of min/max "
                "(asymmetric)"})
    group_fallback: str = field(default="error", kw_only=True, metadata={
        "help": "when group_size does not divide a layer's input size: 'error' (default, lists the sizes "
                "that fit) or 'per-channel' (quantize just those layers per output channel)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bits(self.bits, tuple(range(2, 9)))
        if not isinstance(self.group_size, int) or self.group_size < -1:
            raise ConfigError(f"group_size must be a positive group size (e.g. 64 or 128), -1 (per channel) "
                              f"or 0 (per tensor), got {self.group_size!r}")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise ConfigError(f"group_fallback must be one of {', '.join(GROUP_FALLBACKS)}, "
                              f"got {self.group_fallback!r}")

    def default_bits(self) -> int:
        return self.bits


@dataclass
class RTNConfig(IntQuantConfig):
    """Round-to-nearest: min/max scales per group, no calibration data."""


@dataclass
class GPTQConfig(IntQuantConfig):
    """GPTQ (Frantar et al. 2022): round column by column, spreading each error over the columns left."""
    damp: float = field(default=0.01, metadata={
        "help": "dampening added to the Hessian's diagonal, as a fraction of its mean (raised automatically "
                "if the Hessian is not positive definite)"})
    block_size: int = field(default=128, metadata={
        "help": "columns per lazy-update block (speed only; the result does not depend on it)"})
    act_order: bool = field(default=True, metadata={
        "help": "quantize columns in order of decreasing Hessian diagonal (activation order); default true"})
    static_groups: bool = field(default=True, metadata={
        "help": "compute group scales up front from the original weights, groups contiguous in the original "
                "order (no column permutation at run time; llm-compressor's actorder=static); false: each "
                "group's scale from the error-updated weights when the solver reaches it; default true"})
    range_search: bool = field(default=True, metadata={
        "help": "with static groups or per channel: shrink each group's range by the factor (grid of 20, up to "
                "20 percent) that minimises its Hessian-diagonal-weighted rounding error; default true"})
    true_sequential: bool = field(default=True, metadata={
        "help": "quantize the layers of a block in order, each calibrated on the outputs of the layers "
                "already quantized (q/k/v, then o, then gate/up, then down): on Llama-like blocks in about one "
                "forward pass per block (staged), elsewhere one partial pass per group; default true (false: "
                "one statistics pass per block, as llm-compressor, and a second pass to propagate)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be in [0, 1) (typically 0.01), got {self.damp}")
        _require_positive_int("block_size", self.block_size, "number of columns (e.g. 128)")


AWQ_SEARCH_LOSSES = ("layer", "module")


@dataclass
class AWQConfig(IntQuantConfig):
    """AWQ (Lin et al. 2023): activation-aware per-channel scaling and weight clipping, then rounding."""
    n_grid: int = field(default=20, metadata={
        "help": "points of the grid search over the scaling exponent alpha in [0, 1), per family of scales "
                "(twice as many with duo_scaling, twice again with rms_scales)"})
    clip: bool = field(default=True, metadata={
        "help": "search a clipping range per group minimising the output error (AWQ's weight clipping)"})
    duo_scaling: bool = field(default=True, metadata={
        "help": "search the duo scales a^alpha / m^(1-alpha) too (m: the weights' mean share of their group's "
                "range), keeping whichever of them and the plain a^alpha gives the least error"})
    clip_in_search: bool = field(default=False, metadata={
        "help": "judge each alpha by the error after a clipping search rather than after min-max rounding "
                "(11 candidate ranges rounded per alpha at clip_in_search_grid 10, instead of one; much slower)"})
    clip_in_search_grid: int = field(default=10, metadata={
        "help": "with clip_in_search: the clipping ratios tried for each alpha are 1 - k/n down to 0.5 (10: "
                "1, 0.9, ..., 0.5); the final clipping search of the chosen scales always uses n = 20"})
    true_sequential: bool = field(default=False, metadata={
        "help": "take each group's statistics from inputs the already-quantized groups of its block produce "
                "(one partial pass per group instead of one pass per block)"})
    rms_scales: bool = field(default=False, metadata={
        "help": "search scales built on each input channel's root mean square too (sqrt E[x^2]), beside its "
                "mean |x|, keeping whichever gives the least error (twice the grid points)"})
    clip_refine: bool = field(default=True, metadata={
        "help": "asymmetric clipping: after the search over ranges shrunk alike, try each end of every "
                "group's range on its own (the lower end, then the upper end), keeping a move only when it "
                "lowers the group's output error (default since 2026-12-02: 56.21 against 56.99 at 3-bit g64)"})
    clip_refit: int = field(default=3, metadata={
        "help": "after the clipping search: rounds of a least-squares step size per group (zero point and codes "
                "fixed, the scale minimising the group's output error, codes rounded again; kept only where the "
                "error falls); 0 leaves the searched grid as it is (default 3 since 2026-12-02, with "
                "clip_refit_zero: 55.68 against 56.21 at 3-bit g64)"})
    clip_refit_zero: bool = field(default=True, metadata={
        "help": "asymmetric, with clip_refit: each refit round also tries every group's zero point one step "
                "down and one step up (each with its own least-squares step size), kept only where the error "
                "falls"})
    refit_in_search: bool = field(default=True, metadata={
        "help": "judge each alpha by the error after min-max rounding with clip_refit's least-squares step "
                "sizes (and zero moves) rather than after plain min-max rounding (clip_in_search, when on, "
                "takes precedence; with clip_refit 0 there is nothing to refit and alpha is judged after plain "
                "min-max rounding). The layer loss only: search_loss=module judges on plain min-max rounding. "
                "Default true since 2026-12-02: 3-bit g64 54.86 against 55.68, at 1.6-1.8x the compression "
                "time with groups of 64 and 3.3x per channel"})
    kv_weight: bool = field(default=False, metadata={
        "help": "in a group's scale search, weight each member's output error by how many outputs of the widest "
                "member each of its outputs serves (under grouped-query attention a key/value head serves "
                "num_heads / num_key_value_heads query heads: k_proj and v_proj count that many times); the layer "
                "loss only (search_loss=module judges the module's output as it is)"})
    search_loss: str = field(default="layer", metadata={
        "help": "what each alpha is judged on: layer (the group's own outputs, through E[x x^T] over every "
                "calibration token) or module (the output of the module holding the group, e.g. self_attn "
                "for q/k/v and mlp for gate/up, as the AWQ reference code does; run on search_windows windows "
                "per grid point; groups whose module output is their own output keep the layer loss)"})
    search_windows: int = field(default=32, metadata={
        "help": "with search_loss=module: calibration windows the module is run on per grid point"})
    clip_skip: str = field(default="", metadata={
        "help": "comma-separated patterns of layers rounded on their whole min-max range, without the clipping "
                "search (the AWQ reference code skips q_proj and k_proj: 'q_proj,k_proj')"})
    skip_positions: int = field(default=0, metadata={
        "help": "leave the first k positions of every calibration window out of the statistics that choose "
                "the scales and the clipping (the attention-sink token 0 carries massive activations that "
                "can dominate E[x x^T]); 0 keeps every token. search_loss=module still judges on whole windows"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.skip_positions < 0:
            raise ConfigError(f"skip_positions must be 0 or more, got {self.skip_positions}; e.g. 1")
        if self.group_size == 0:
            raise ConfigError("AWQ needs group_size -1 (per channel) or g > 0 (e.g. 64), not 0 (per tensor)")
        if self.search_loss not in AWQ_SEARCH_LOSSES:
            raise ConfigError(f"search_loss must be one of {', '.join(AWQ_SEARCH_LOSSES)}, "
                              f"got {self.search_loss!r}")
        _require_positive_int("search_windows", self.search_windows, "number of windows (e.g. 32)")
        _require_positive_int("n_grid", self.n_grid, "number of grid points (e.g. 20)")
        _require_positive_int("clip_in_search_grid", self.clip_in_search_grid, "grid size (e.g. 10)")
        if self.clip_refit < 0:
            raise ConfigError(f"clip_refit must be 0 or more rounds, got {self.clip_refit}; e.g. 3")


@dataclass
class NF4Config(LayerSelection):
    """NF4 / FP4 block-wise 4-bit weights with double quantization (QLoRA, bitsandbytes-compatible)."""
    quant_type: str = field(default="nf4", metadata={
        "help": "4-bit code table: nf4 (normal quantiles, for normally distributed weights) or fp4"})
    blocksize: int = field(default=64, metadata={"help": "weights per absmax block (bitsandbytes: 32..4096)"})
    double_quant: bool = field(default=True, metadata={
        "help": "quantize the block absmaxes to 8 bits (about 0.37 bits per weight saved)"})

    ALLOWED_BITS = (4,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise ConfigError(f"blocksize must be one of {', '.join(map(str, BNB_BLOCKSIZES))} (what "
                              f"bitsandbytes loads), got {self.blocksize!r}")

    def default_bits(self) -> int:
        return 4


@dataclass
class Int8Config(LayerSelection):
    """LLM.int8() (Dettmers et al. 2022): int8 weights and activations, outlier features in float."""
    threshold: float = field(default=6.0, metadata={
        "help": "activation magnitude from which a feature is an outlier kept in floating point "
                "(0 = plain vector-wise int8, no decomposition)"})

    ALLOWED_BITS = (8,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0 (6.0 is LLM.int8()'s default), got {self.threshold}")

    def default_bits(self) -> int:
        return 8
