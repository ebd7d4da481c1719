"""Per-layer bit widths or sparsities under a budget (`slimlm quantize --budget-bits 3.5`, `--budget-mb 60`,
`slimlm prune --budget-sparsity 0.6`).

Sensitivity. For layer l and candidate setting c (a bit width and group size, or a sparsity), the predicted
loss is

    D_l(c) = a_l * E_l(c),     E_l(c) = tr(dW H_l dW^T),   dW = W_l - C_c(W_l),   H_l = X_l^T X_l / n

E_l(c) is the energy the compressed layer adds to its own output on the calibration inputs X_l (round to
nearest at c's grid, or Wanda's |w| * ||x|| mask at c's sparsity), and a_l turns that into the model's loss:
a_l = KL(p || p_l) / E_l(r), measured once per layer with the layer alone compressed at a reference setting r
(KL of the model's next-token distributions, on `kl_tokens` positions of the calibration windows). So one
forward per layer, not one per layer and candidate; `validate` measures KL(p || p_l(c)) for other candidates
on a sample of layers and reports how well D predicts it (Spearman rank correlation, and the ratio).

Allocation. minimise sum_l D_l(c_l) subject to sum_l n_l cost(c_l) <= budget (n_l: the layer's weights;
cost: storage bits per weight with scales and zero points, or the kept fraction): a multiple-choice
knapsack, solved by dynamic programming over the budget in small units (costs rounded up, so the answer
fits), then a greedy pass that spends what the rounding left on the best loss drop per unit of cost.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One candidate: a label as an override value takes it ("3/64", "4/-1", "0.6"), its cost per weight
    (storage bits, or the kept fraction) and the function compressing a weight (W, H) -> W_hat."""
    label: str
    cost: float
    compress: Callable[[Tensor, Tensor], Tensor]


def quant_bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Storage bits per weight as slimlm saves a layer: the codes (5-7 bits in 8-bit containers), one fp32
    scale and one zero point (bits wide) per group (group_size -1: per output channel, 0: per tensor)."""
    from .quant.targets import storage_bits
    groups = 1 if group_size == -1 else (in_features // group_size if group_size > 0 else 0)
    per_row = groups * (32 + bits) if group_size != 0 else 0
    return storage_bits(bits) + per_row / in_features


def quant_settings(spec: str, symmetric: bool, in_features: int) -> list[Setting]:
    """Candidates "bits/group,..." (e.g. "2/64,3/64,3/-1,4/64,4/-1,8/64") for a layer with in_features
    inputs; those whose group does not divide in_features are left out."""
    from .core.quant import default_g_idx, dequantize_grouped, rtn_quantize

    out = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        b, _, g = item.partition("/")
        try:
            bits, group = int(b), int(g)
        except ValueError:
            raise ConfigError(f"--budget-candidates items are bits/group like 3/64 or 4/-1, not {item!r}") from None
        if not 2 <= bits <= 8 or group < -1 or group == 0:
            raise ConfigError(f"--budget-candidates item {item!r}: bits 2..8 and a group size > 0 or -1")
        if group > 0 and in_features % group:
            continue

        def compress(W: Tensor, H: Tensor, bits=bits, group=group) -> Tensor:
            codes, scale, zero = rtn_quantize(W, bits, symmetric, group)
            return dequantize_grouped(codes, scale, zero, default_g_idx(W.shape[1], group, W.device))
        out.append(Setting(f"{bits}/{group}", quant_bits_per_weight(bits, group, in_features), compress))
    return out


def sparsity_settings(spec: str) -> list[Setting]:
    """Candidate sparsities "0.3,0.4,..." with Wanda's mask: per output row, drop the weights of smallest
    |w_ij| * ||x_j|| (||x_j||^2 = H_jj * n)."""
    out = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        try:
            s = float(item)
        except ValueError:
            raise ConfigError(f"--budget-candidates items are sparsities like 0.5, not {item!r}") from None
        if not 0 <= s < 1:
            raise ConfigError(f"--budget-candidates sparsity {s} is outside [0, 1)")

        def compress(W: Tensor, H: Tensor, s=s) -> Tensor:
            k = int(W.shape[1] * s)
            if k == 0:
                return W.clone()
            score = W.abs() * H.diagonal().clamp(min=0).sqrt()[None]
            drop = score.topk(k, dim=1, largest=False).indices
            return W.scatter(1, drop, 0.0)
        out.append(Setting(f"{s:g}", 1.0 - s, compress))
    return out


def _error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    d = (W - W_hat).float()
    return float(((d @ H) * d).sum())


def _logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def _kl(ref: Tensor, model: nn.Module, ids: Tensor) -> float:
    lp = _logprobs(model, ids)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


@contextlib.contextmanager
def _swap(mod: nn.Module, W_hat: Tensor):
    """The layer's weight replaced by W_hat inside the block, restored after."""
    old = mod.weight.data
    mod.weight.data = W_hat.to(old.dtype)
    try:
        yield
    finally:
        mod.weight.data = old


def sensitivities(model: nn.Module, names: list[str], settings: dict[str, list[Setting]], reference: str,
                  windows: Tensor, kl_ids: Tensor, validate_every: int = 0, progress: bool = False) -> dict:
    """Predicted loss D_l(c) for every layer and candidate (see the module docstring), with the measured KL at
    the reference setting; with validate_every k > 0, measured KL at every candidate for every k-th layer."""
    from tqdm import tqdm

    mods = dict(model.named_modules())
    bad = [n for n in names if type(mods[n]) is not nn.Linear]
    if bad:
        raise ConfigError(f"budget allocation reads and swaps nn.Linear weights; {bad[0]} is a "
                          f"{type(mods[bad[0]]).__name__}")
    from .calibration import input_grams
    H = input_grams(model, {n: mods[n] for n in names}, windows)
    ref = _logprobs(model, kl_ids)
    table: dict[str, dict] = {}
    checks = []
    for i, n in enumerate(tqdm(names, desc="sensitivity", disable=not progress)):
        W = mods[n].weight.data.float()
        errs = {s.label: _error(W, s.compress(W, H[n]), H[n]) for s in settings[n]}
        r = next((s for s in settings[n] if s.label == reference), None)
        if r is None:                                  # the reference does not fit this layer: its middle setting
            r = sorted(settings[n], key=lambda s: s.cost)[len(settings[n]) // 2]
        with _swap(mods[n], r.compress(W, H[n])):
            kl_ref = _kl(ref, model, kl_ids)
        a = kl_ref / errs[r.label] if errs[r.label] > 0 else 0.0
        table[n] = {"weights": W.numel(), "kl_reference": kl_ref, "reference": r.label, "scale": a,
                    "predicted": {lab: a * e for lab, e in errs.items()},
                    "cost": {s.label: s.cost for s in settings[n]}}
        if validate_every and i % validate_every == 0:
            for s in settings[n]:
                if s.label == r.label:
                    continue
                with _swap(mods[n], s.compress(W, H[n])):
                    checks.append((n, s.label, a * errs[s.label], _kl(ref, model, kl_ids)))
    out = {"layers": table}
    if checks:
        out["validation"] = _validation(checks)
    return out


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def _validation(checks: list[tuple[str, str, float, float]]) -> dict:
    pred, meas = [c[2] for c in checks], [c[3] for c in checks]
    rp, rm = _ranks(pred), _ranks(meas)
    n = len(checks)
    mp, mm = sum(rp) / n, sum(rm) / n
    cov = sum((a - mp) * (b - mm) for a, b in zip(rp, rm))
    den = math.sqrt(sum((a - mp) ** 2 for a in rp) * sum((b - mm) ** 2 for b in rm)) or 1.0
    ratios = sorted(p / m for p, m in zip(pred, meas) if m > 0)
    return {"pairs": n, "spearman": cov / den, "predicted_over_measured_median": ratios[len(ratios) // 2] if ratios
            else None, "checks": [{"layer": c[0], "setting": c[1], "predicted": c[2], "measured_kl": c[3]}
                                  for c in checks]}


def allocate(table: dict[str, dict], budget: float, bins: int = 20000) -> dict[str, str]:
    """The setting of each layer minimising the summed predicted loss with sum_l n_l cost_l <= budget *
    sum_l n_l (budget: average cost per weight). ConfigError when even the cheapest settings exceed it.

    Dynamic programming over the budget cut into `bins` units (each setting's cost rounded up to whole units,
    so the answer always fits; at most one unit per layer is lost to the rounding), then a greedy pass that
    spends what the rounding left on the best loss drop per unit of exact cost."""
    import numpy as np

    names = list(table)
    n = {k: table[k]["weights"] for k in names}
    total = sum(n.values())
    cap = budget * total
    spend = lambda choice: sum(n[k] * table[k]["cost"][choice[k]] for k in names)   # noqa: E731
    cheapest = {k: min(table[k]["cost"], key=table[k]["cost"].get) for k in names}
    if spend(cheapest) > cap * (1 + 1e-9):
        raise ConfigError(f"the budget of {budget:g} per weight is below what the cheapest settings reach "
                          f"({spend(cheapest) / total:.4g}); raise it or add cheaper candidates")
    unit = cap / bins
    dp = np.full(bins + 1, np.inf)
    dp[0] = 0.0
    picks = []
    for k in names:
        labels = list(table[k]["cost"])
        new = np.full(bins + 1, np.inf)
        arg = np.zeros(bins + 1, dtype=np.int16)
        for i, c in enumerate(labels):
            w = int(math.ceil(n[k] * table[k]["cost"][c] / unit - 1e-9))
            if w > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[w:] = dp[:bins + 1 - w] + table[k]["predicted"][c]
            better = cand < new
            new[better], arg[better] = cand[better], i
        dp = new
        picks.append((labels, arg))
    b = int(np.argmin(dp))
    if not np.isfinite(dp[b]):                     # the rounding up lost the cheapest fit: take it
        return cheapest
    choice = {}
    for k, (labels, arg) in zip(reversed(names), reversed(picks)):
        c = labels[int(arg[b])]
        choice[k] = c
        b -= int(math.ceil(n[k] * table[k]["cost"][c] / unit - 1e-9))
    left = cap - spend(choice)
    while True:                                 # spend what is left: the best loss drop per unit of cost
        best, gain = None, 0.0
        for k in names:
            cur = choice[k]
            for c, cost in table[k]["cost"].items():
                extra = n[k] * (cost - table[k]["cost"][cur])
                drop = table[k]["predicted"][cur] - table[k]["predicted"][c]
                if drop > 0 and extra <= left and (extra <= 0 or drop / extra > gain):
                    best, gain = (k, c, extra), (math.inf if extra <= 0 else drop / extra)
        if best is None:
            break
        choice[best[0]] = best[1]
        left -= best[2]
    return {k: choice[k] for k in names}


def summary(table: dict[str, dict], choice: dict[str, str]) -> dict:
    total = sum(t["weights"] for t in table.values())
    used = sum(t["weights"] * t["cost"][choice[k]] for k, t in table.items())
    counts: dict[str, int] = {}
    for c in choice.values():
        counts[c] = counts.get(c, 0) + 1
    return {"average_cost": used / total, "weights": total, "predicted_loss": sum(
        table[k]["predicted"][c] for k, c in choice.items()), "settings": dict(sorted(counts.items())),
        "layers": {k: c for k, c in choice.items()}}
