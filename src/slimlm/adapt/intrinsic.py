"""Intrinsic-dimension training as a method of the loop: theta = theta_0 + P theta_d (core.intrinsic).

Every float parameter of the decoder blocks (or of the whole model with --intrinsic-targets all) becomes
theta_0,i + lambda_i P_i theta_d through a parametrization: theta_d (d numbers) is shared by all tensors,
P_i is tensor i's own Fastfood projection (or a dense Gaussian one, the check for small models), and
lambda_i is one trained scalar per tensor in the structure-aware variant (SAID, Aghajanyan et al. 2020;
without it lambda_i = 1). Only theta_d (and the lambdas) train; the projections are regenerated from the
seed, so a run's whole result is d + (number of tensors) numbers. Saved as the full model (theta_0 + P theta_d,
loadable anywhere) plus intrinsic.safetensors with theta_d, the lambdas and the seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.intrinsic import Fastfood, dense_projection
from ..errors import ConfigError

DENSE_LIMIT = 2_000_000          # entries of a dense P (D x d) beyond which --projection dense is refused


@dataclass
class IntrinsicConfig:
    dim: int = field(default=1000, metadata={"help": "intrinsic: d, the dimension of the trained subspace"})
    projection: str = field(default="fastfood", metadata={
        "help": "intrinsic: fastfood (O(D log D), any size) or dense (a D x d Gaussian, small models only)"})
    said: bool = field(default=True, metadata={
        "help": "intrinsic: one trained scalar per tensor (structure-aware intrinsic dimension, SAID)"})
    intrinsic_targets: str = field(default="blocks", metadata={
        "help": "intrinsic: the parameters that move: blocks (those of the decoder layers) or all"})

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"--dim must be at least 1 (got {self.dim})")
        if self.projection not in ("fastfood", "dense"):
            raise ConfigError(f"--projection takes fastfood or dense, not {self.projection!r}")
        if self.intrinsic_targets not in ("blocks", "all"):
            raise ConfigError(f"--intrinsic-targets takes blocks or all, not {self.intrinsic_targets!r}")


class _Shift(nn.Module):
    """theta_0 -> theta_0 + lambda_i P_i theta_d (theta_d and lambda held by reference, not registered)."""

    def __init__(self, proj, index: int, shared: dict) -> None:
        super().__init__()
        self.proj, self.index = proj, index
        self.__dict__["shared"] = shared

    def forward(self, theta0: Tensor) -> Tensor:
        theta_d, lam = self.shared["theta_d"], self.shared["lam"]
        if isinstance(self.proj, Tensor):
            delta = self.proj @ theta_d
        else:
            delta = self.proj(theta_d)
        return theta0 + (lam[self.index] * delta).view_as(theta0).to(theta0.dtype)


def _targets(model: nn.Module, which: str) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, qualified name) of each float parameter that moves; tied weights once."""
    from .prefix_cache import layer_list

    root_name, blocks = ("", model) if which == "all" else layer_list(model)
    seen, out = set(), []
    for mname, m in blocks.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                out.append((m, pname, ".".join(x for x in (root_name, mname, pname) if x)))
    return out


class Intrinsic:
    def __init__(self, model: nn.Module, config: IntrinsicConfig, seed: int) -> None:
        self.model, self.config, self.seed = model, config, seed
        targets = _targets(model, config.intrinsic_targets)
        total = sum(getattr(m, a).numel() for m, a, _ in targets)
        if config.dim > total:
            raise ConfigError(f"--dim {config.dim} is larger than the {total} parameters it would move; use at "
                              f"most {total}")
        if config.projection == "dense" and total * config.dim > DENSE_LIMIT:
            raise ConfigError(f"a dense projection would be {total} x {config.dim} numbers; use --projection "
                              "fastfood (the same subspace method at O(D) memory)")
        dev = next(model.parameters()).device
        self.theta_d = nn.Parameter(torch.zeros(config.dim, device=dev))
        self.lam = nn.Parameter(torch.ones(len(targets), device=dev), requires_grad=config.said)
        shared = {"theta_d": self.theta_d, "lam": self.lam}
        g = torch.Generator().manual_seed(seed)
        self.names = []
        for i, (m, attr, name) in enumerate(targets):
            n = getattr(m, attr).numel()
            proj = (dense_projection(config.dim, n, g).to(dev) if config.projection == "dense"
                    else Fastfood(config.dim, n, g, dev))
            getattr(m, attr).requires_grad_(False)
            parametrize.register_parametrization(m, attr, _Shift(proj, i, shared), unsafe=True)
            self.names.append(name)
        self.targets = targets
        self.total = total

    def params(self) -> dict[str, nn.Parameter]:
        out = {"intrinsic.theta_d": self.theta_d}
        if self.config.said:
            out["intrinsic.lambda"] = self.lam
        return out

    def finish(self) -> None:
        """theta_0 + P theta_d into the weights; the parametrizations go."""
        with torch.no_grad():
            for m, attr, _ in self.targets:
                parametrize.remove_parametrizations(m, attr, leave_parametrized=True)


def prepare(model: nn.Module, config: IntrinsicConfig, ctx):
    from ..training.plan import TrainPlan
    from .methods import _check_float, _save_model

    _check_float(model, "intrinsic-dimension")
    for p in model.parameters():
        p.requires_grad_(False)
    it = Intrinsic(model, config, ctx.seed)

    def save(model: nn.Module, tokenizer, folder: Path) -> None:
        vec = {"theta_d": it.theta_d.detach().cpu().clone(), "lambda": it.lam.detach().cpu().clone()}
        it.finish()
        _save_model(model, tokenizer, folder)
        save_file(vec, str(folder / "intrinsic.safetensors"),
                  metadata={"seed": str(it.seed), "projection": config.projection, "said": str(config.said),
                            "targets": config.intrinsic_targets, "moved_parameters": str(it.total)})

    return TrainPlan(params=it.params(), save=save, info={"method": "intrinsic", **asdict(config),
                                                          "moved_parameters": it.total,
                                                          "projected_tensors": len(it.targets)})
