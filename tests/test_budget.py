"""Allocation under a budget: the knapsack against brute force, the cost model against the quantizer's own
accounting, the sensitivity proxy against its written-out definition and against measured KL, per-layer group
sizes in overrides, and the budget options of `slimlm quantize` / `slimlm prune` end to end on a tiny model;
bad budgets refused in one line before anything is written."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from slimlm import allocation as A
from slimlm.cli import main

from conftest import tiny_model


def _table(seed: int, layers: int = 4):
    rng = random.Random(seed)
    table = {}
    for i in range(layers):
        costs = {"2": 2.5, "3": 3.55, "4": 4.56, "8": 8.6}
        base = rng.uniform(0.1, 3.0)
        pred = {k: base * 4.0 ** -(float(k) - 2) * rng.uniform(0.7, 1.3) for k in costs}
        table[f"l{i}"] = {"weights": rng.choice([100, 300, 900]), "cost": costs, "predicted": pred}
    return table


@pytest.mark.parametrize("seed", range(6))
def test_allocation_keeps_the_budget_and_nearly_matches_brute_force(seed):
    table = _table(seed)
    names = list(table)
    total = sum(t["weights"] for t in table.values())
    budget = 3.5
    best = min((sum(table[n]["predicted"][c] for n, c in zip(names, combo)), combo)
               for combo in itertools.product(*(list(table[n]["cost"]) for n in names))
               if sum(table[n]["weights"] * table[n]["cost"][c] for n, c in zip(names, combo)) <= budget * total)
    choice = A.allocate(table, budget)
    s = A.summary(table, choice)
    assert s["average_cost"] <= budget + 1e-12
    assert s["predicted_loss"] <= 1.1 * best[0] + 1e-12, (s, best)


def test_a_budget_below_the_cheapest_settings_is_refused():
    with pytest.raises(A.ConfigError, match="below what the cheapest"):
        A.allocate(_table(0), 2.0)


def test_output_energy_is_the_squared_output_error_and_predicts_measured_kl():
    """E = tr(dW H dW^T) equals ||X dW^T||^2 / n for H = X^T X / n; the predicted D = a E is the measured KL at
    the reference setting by construction, and at the other settings on the validated layers it tracks the
    measured KL (rank correlation over every (layer, setting) pair checked)."""
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(50, 16, generator=g), torch.randn(8, 16, generator=g)
    W_hat = W + 0.1 * torch.randn(8, 16, generator=g)
    H = X.T @ X / 50
    torch.testing.assert_close(torch.tensor(A._error(W, W_hat, H)), ((X @ (W - W_hat).T) ** 2).sum() / 50)

    model = tiny_model("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    ids = torch.randint(0, model.config.vocab_size, (6, 32), generator=g)
    settings = {n: A.quant_settings("2/32,3/32,4/32,3/-1", False, dict(model.named_modules())[n].in_features)
                for n in names}
    out = A.sensitivities(model, names, settings, "3/32", ids, ids[:2], validate_every=3)
    for t in out["layers"].values():
        assert t["predicted"]["3/32"] == pytest.approx(t["kl_reference"], rel=1e-9, abs=1e-12)
        assert t["predicted"]["2/32"] > t["predicted"]["3/32"] > t["predicted"]["4/32"]
    v = out["validation"]
    assert v["pairs"] >= 10 and v["spearman"] > 0.8, v


def test_cost_model_is_the_quantizers_own_accounting(tmp_path):
    """Overrides with per-layer bits/group: each layer gets its group size, and the quantizer's reported bits
    per weight equal the allocation's cost model for the same settings."""
    import slimlm
    from slimlm.quant.configs import RTNConfig
    from slimlm.quant.linear import QuantLinear

    model = tiny_model("llama")
    plan = {"q_proj": "4/32", "k_proj": "3/-1", "v_proj": "2/64", "o_proj": "8/64", "gate_proj": "3/64",
            "up_proj": "4/-1", "down_proj": "3/32"}
    rep = slimlm.quantize(model, RTNConfig(bits=4, group_size=64, overrides=",".join(f"{k}={v}" for k, v in
                                                                                     plan.items())))
    mods = dict(model.named_modules())
    expected = total = 0
    for n, m in mods.items():
        if isinstance(m, QuantLinear):
            b, g = map(int, plan[n.rsplit(".", 1)[1]].split("/"))
            assert (m.bits, m.group_size) == (b, g), n
            expected += A.quant_bits_per_weight(b, g, m.in_features) * m.in_features * m.out_features
            total += m.in_features * m.out_features
    assert rep["bits_per_weight"] == pytest.approx(expected / total, abs=1e-4)


def test_quantize_and_prune_under_a_budget(model_dir, text_file, tmp_path, capsys):
    common = ["--model", str(model_dir), "--data", str(text_file), "--samples", "6", "--seqlen", "32"]
    out = tmp_path / "q"
    assert main(["quantize", *common, "--method", "gptq", "--budget-bits", "3.5", "--output", str(out)]) == 0
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["summary"]["average_cost"] <= 3.5 and len(alloc["summary"]["settings"]) > 1
    assert "bits_per_weight: " in capsys.readouterr().out
    assert set(alloc["per_layer"]) == set(alloc["summary"]["layers"])
    import slimlm
    from slimlm.quant.linear import QuantLinear
    back = {n: f"{m.bits}/{m.group_size}" for n, m in slimlm.load_model(str(out)).named_modules()
            if isinstance(m, QuantLinear)}
    assert back == alloc["summary"]["layers"]                     # each layer reloads with its own setting
    mb = tmp_path / "mb"
    assert main(["quantize", *common, "--method", "rtn", "--budget-mb", "0.12", "--output", str(mb)]) == 0
    assert json.loads((mb / "allocation.json").read_text())["summary"]["predicted_mb"] <= 0.12
    assert sum(f.stat().st_size for f in mb.glob("*.safetensors")) <= 0.12 * 2**20
    p = tmp_path / "p"
    assert main(["prune", *common, "--method", "sparsegpt", "--budget-sparsity", "0.6", "--output", str(p)]) == 0
    a = json.loads((p / "allocation.json").read_text())
    assert 1 - a["summary"]["average_cost"] >= 0.6 - 1e-9
    reported = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("sparsity:")]
    assert reported and float(reported[0].split(":")[1]) >= 0.59          # per-row rounding of each layer's count


@pytest.mark.parametrize("args,msg", [
    (["quantize", "--method", "rtn", "--budget-bits", "1.5"], "below what the cheapest candidates reach"),
    (["quantize", "--method", "rtn", "--budget-bits", "32"], "at or above full precision"),
    (["quantize", "--method", "rtn", "--budget-mb", "5"], "at or above the model at full precision"),
    (["quantize", "--method", "nf4", "--budget-bits", "4"], "use --method rtn, gptq or awq"),
    (["quantize", "--method", "rtn", "--budget-bits", "4", "--budget-mb", "1"], "not both"),
    (["quantize", "--method", "rtn", "--budget-bits", "4", "--overrides", "q_proj=8"], "drop --overrides"),
    (["quantize", "--method", "rtn", "--budget-bits", "4", "--budget-candidates", "4/x"], "bits/group"),
    (["prune", "--method", "wanda", "--budget-sparsity", "1.2"], "in (0, 1)"),
    (["prune", "--method", "structured", "--budget-sparsity", "0.5"], "magnitude, wanda or"),
])
def test_bad_budgets(model_dir, text_file, tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    code = main([*args, "--model", str(model_dir), "--data", str(text_file), "--samples", "4", "--seqlen", "32",
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert not out.exists()
