"""Configs of the unstructured and N:M pruning methods (magnitude, Wanda, SparseGPT), the per-layer sparsity
schedule syntax. Pure string logic: nothing here touches a model. Layer-name patterns: slimlm.selection.

Schedule syntax (`layer_sparsity`), comma-separated items, empty = uniform (`sparsity` everywhere):
    linear:A:B        fraction rising linearly with depth, A in the first decoder block, B in the last
    PATTERN=VALUE     VALUE (a fraction or N:M) for the layers matching PATTERN; the first matching item wins
                      and overrides `linear`; VALUE 0 leaves the layers dense
e.g. "linear:0.3:0.7,down_proj=0.4,layers.0=0".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.prune import parse_sparsity
from ..errors import ConfigError
from ..selection import PATTERN_HELP, PROPAGATE, name_matches, split_list

Spec = float | tuple[int, int]   # a fraction to remove, or (N, M): N kept of every M inputs

SPARSITY_HELP = ("fraction of each target layer's weights to remove, in [0, 1) (e.g. 0.5), or an N:M pattern "
                 "keeping N of every M consecutive input weights (e.g. 2:4, 4:8; M must divide the layers' "
                 "input size); default 0.5")
SCHEDULE_HELP = ("per-layer sparsity, empty = uniform. Comma-separated items: 'linear:A:B' rises from A in the "
                 "first block to B in the last; 'PATTERN=VALUE' gives layers matching PATTERN the VALUE "
                 "(a fraction or N:M, 0 = dense; first match wins, overrides linear). "
                 "E.g. 'linear:0.3:0.7,down_proj=0.4,layers.0=0'")
def spec_str(spec: Spec) -> str:
    return f"{spec[0]}:{spec[1]}" if isinstance(spec, tuple) else f"{spec:g}"


@dataclass(frozen=True)
class Schedule:
    """A parsed `layer_sparsity`: an optional linear ramp over blocks and (pattern, spec) overrides."""
    linear: tuple[float, float] | None = None
    rules: tuple[tuple[str, Spec], ...] = ()

    @property
    def uniform(self) -> bool:
        return self.linear is None and not self.rules

    def spec_for(self, name: str, block: int, n_blocks: int, default: Spec) -> Spec:
        """Sparsity of layer `name` in block `block` of `n_blocks`."""
        for pattern, spec in self.rules:
            if name_matches(name, pattern):
                return spec
        if self.linear is not None:
            a, b = self.linear
            return a + (b - a) * block / (n_blocks - 1) if n_blocks > 1 else a
        return default


def parse_schedule(text: str) -> Schedule:
    """Parse the `layer_sparsity` syntax; errors say what a valid item looks like."""
    linear, rules = None, []
    for item in split_list(text):
        if item == "uniform":
            continue
        if item.startswith("linear:"):
            parts = item.split(":")
            try:
                if len(parts) != 3:
                    raise ValueError
                a, b = float(parts[1]), float(parts[2])
            except ValueError:
                raise ConfigError(f"bad schedule item {item!r}; write it like 'linear:0.3:0.7'") from None
            if not (0 <= a < 1 and 0 <= b < 1):
                raise ConfigError(f"{item!r}: both ends of a linear schedule must be fractions in [0, 1)")
            if linear is not None:
                raise ConfigError("the schedule has two 'linear:' items; keep one")
            linear = (a, b)
        elif "=" in item:
            pattern, _, value = (s.strip() for s in item.partition("="))
            if not pattern:
                raise ConfigError(f"schedule item {item!r} has no layer pattern before '='")
            try:
                rules.append((pattern, parse_sparsity(value)))
            except ConfigError as e:
                raise ConfigError(f"schedule item {item!r}: {e}") from None
        else:
            raise ConfigError(f"bad schedule item {item!r}; use 'linear:A:B' or 'PATTERN=VALUE' "
                              "(e.g. 'mlp=0.6' or 'q_proj=2:4'), items separated by commas")
    return Schedule(linear, tuple(rules))


def _canonical_sparsity(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return str(value).strip()


@dataclass
class PruneConfig:
    """Fields shared by every unstructured / N:M pruning method (not registered itself)."""
    sparsity: str = field(default="0.5", metadata={"help": SPARSITY_HELP})
    layer_sparsity: str = field(default="", metadata={"help": SCHEDULE_HELP})
    targets: str = field(default="*", metadata={
        "help": "comma-separated name patterns of the linear layers to prune (default: every linear layer of "
                "the decoder blocks); " + PATTERN_HELP})
    ignore: str = field(default="", metadata={
        "help": "comma-separated name patterns of layers to leave dense; lm_head and the embeddings are never "
                "pruned"})

    def __post_init__(self) -> None:
        self.sparsity = _canonical_sparsity(self.sparsity)
        self.targets = ",".join(split_list(self.targets)) or "*"
        self.ignore = ",".join(split_list(self.ignore))
        self.spec()
        sched = self.schedule()
        if sched.linear is not None and isinstance(self.spec(), tuple):
            raise ConfigError(f"a linear schedule gives each layer a fraction, but sparsity is the N:M pattern "
                              f"{self.sparsity}; give N:M per layer with 'PATTERN=N:M' items instead")

    def spec(self) -> Spec:
        """The parsed `sparsity`: a fraction or (N, M)."""
        return parse_sparsity(self.sparsity)

    def schedule(self) -> Schedule:
        return parse_schedule(self.layer_sparsity)

    def describe(self) -> str:
        return self.sparsity + (f" ({self.layer_sparsity})" if not self.schedule().uniform else "")


SCOPES = ("layer", "global")


@dataclass
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: remove the weights of smallest |w| (no calibration data)."""
    scope: str = field(default="layer", metadata={
        "help": "layer: each layer loses its own fraction; global: one |w| threshold across all target layers "
                "(a fraction, uniform schedule); default layer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be 'layer' or 'global', not {self.scope!r}")
        if self.scope == "global":
            if isinstance(self.spec(), tuple):
                raise ConfigError(f"scope=global compares magnitudes across layers and takes a fraction, not "
                                  f"the N:M pattern {self.sparsity}; use scope=layer for N:M")
            if not self.schedule().uniform:
                raise ConfigError("scope=global sets one threshold for all layers; drop layer_sparsity or use "
                                  "scope=layer")


PROPAGATE_HELP = ("inputs of each next block: 'compressed' = outputs of the block just pruned (a second forward "
                  "per block, as llm-compressor by default), 'dense' = the statistics pass's own outputs (one "
                  "forward per block: each block calibrated on the dense model's activations, like "
                  "llm-compressor's propagate_error=False); default dense for Wanda (measured better and "
                  "faster for it: it updates no weights), compressed for SparseGPT")


@dataclass
class CalibratedPruneConfig(PruneConfig):
    """Fields of the pruning methods that run the calibration runner (not registered itself)."""
    propagate: str = field(default="compressed", metadata={"help": PROPAGATE_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.propagate not in PROPAGATE:
            raise ConfigError(f"propagate must be 'compressed' or 'dense', got {self.propagate!r}")


@dataclass
class WandaConfig(CalibratedPruneConfig):
    """Wanda (Sun et al. 2023): remove the smallest |W_ij| * ||X_j|| per output row (needs data).

    Its default propagation is 'dense' (one forward per block, every block scored on the dense model's
    activations), not the reference's 'compressed': Wanda updates no weights, so it has no reconstruction
    that scoring on the pruned model's activations would serve. On SmolLM2-135M (128 x 512 calibration
    windows, README's benchmark) dense gave lower perplexity at 50% (66.70 against 69.37) and 2:4 (163.55
    against 179.42-187.57) with one forward per block instead of two. The dense figures are from the AVX2
    CPU with fp32 passes, the compressed ones from the AVX512-BF16 CPU with bf16 and fp32 passes: the two
    have not been compared on one machine.
    """
    propagate: str = field(default="dense", metadata={"help": PROPAGATE_HELP})


QUANT_BITS = (2, 3, 4, 8)


@dataclass
class SparseGPTConfig(CalibratedPruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with reconstruction, optionally joint with GPTQ."""
    block_size: int = field(default=128, metadata={"help": "columns per lazy-update block (speed only); default 128"})
    damp: float = field(default=0.01, metadata={
        "help": "Hessian damping, as a fraction of its mean diagonal; default 0.01 (raised automatically when "
                "the Cholesky factorisation fails)"})
    bits: int | None = field(default=None, metadata={
        "help": "also quantize the kept weights jointly (GPTQ) to 2, 3, 4 or 8 bits; none = keep floats"})
    group_size: int = field(default=128, metadata={
        "help": "with bits: input columns per quantization group (must divide the layers' inputs, e.g. 32, 64, "
                "128; default 128), -1 = per output channel"})
    symmetric: bool = field(default=False, metadata={"help": "with bits: symmetric grid (zero point 2^(b-1)); default false"})
    true_sequential: bool | None = field(default=None, metadata={
        "help": "prune the layers of a block in order, each on the outputs of the layers already pruned (q/k/v, "
                "o, gate/up, down): on Llama-like blocks in about one forward pass per block (staged), elsewhere "
                "one partial pass per group; false: one statistics pass per block, as llm-compressor, and a "
                "second pass to propagate; default: true, false with propagate=dense"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {self.block_size}; 128 is usual")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"damp must be in [0, 1), got {self.damp}; 0.01 is usual")
        if self.bits is not None and self.bits not in QUANT_BITS:
            raise ConfigError(f"bits must be one of {', '.join(map(str, QUANT_BITS))} (what the quantized "
                              f"linear layer stores) or none, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"group_size must be positive (e.g. 64) or -1 for per channel, got {self.group_size}")
        if self.true_sequential is None:
            self.true_sequential = self.propagate != "dense"
        if self.propagate == "dense" and self.true_sequential:
            raise ConfigError("propagate=dense collects each block's statistics in one pass and cannot combine "
                              "with true_sequential; add true_sequential=false")

    def quant(self) -> tuple[int, int, bool] | None:
        """(bits, group_size, symmetric) for core.sparsegpt, or None without joint quantization."""
        return None if self.bits is None else (self.bits, self.group_size, self.symmetric)
