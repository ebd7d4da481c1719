"""Unstructured / N:M pruning methods (magnitude, Wanda, SparseGPT and SparseGPT + GPTQ) on tiny random models:
exact sparsity and N:M patterns on every target layer, everything else untouched, SparseGPT closer to the dense
model than magnitude, joint quantization keeping pruned weights at exactly zero, schedules and patterns,
input errors before any work, and the CLI end to end."""
from __future__ import annotations

import copy

import pytest
import torch

from slimlm import api, models, registry
from slimlm.calibration import LinearInfo, RunnerOptions, find_blocks, is_linear
from slimlm.cli import main
from slimlm.core.gptq import prepare_hessian
from slimlm.core.sparsegpt import sparsegpt_prune
from slimlm.errors import ConfigError, SlimlmError
from slimlm.pruning.methods import (
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    apply_masks,
    apply_sparsegpt,
    plan_targets,
)
from slimlm.quant.linear import QuantLinear

from conftest import random_windows, tiny_model

ARCHS = ["llama", "qwen2", "gpt2", "opt"]
CONFIGS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
# every (method, architecture) pair once; each method and each architecture sees both kinds of sparsity
CASES = [(method, arch, ("0.5", "2:4")[(i + j) % 2]) for i, method in enumerate(CONFIGS)
         for j, arch in enumerate(ARCHS)]
QUIET = RunnerOptions(fast=False, progress=False)   # fp32 passes: the same on every CPU


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prune(model, config, data="calib"):
    data = random_windows(8, 32) if data == "calib" else data
    return api.prune(model, config, data=data, runner=QUIET)


def block_linears(model) -> dict[str, LinearInfo]:
    """Every linear layer of the decoder blocks, found independently of the code under test."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": LinearInfo(f"{prefix}.{i}.{n}", m)
            for i, b in enumerate(blocks) for n, m in b.named_modules() if is_linear(m)}


def other_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter except the weights of block linears (lm_head, embeddings, norms, biases)."""
    targets = {f"{n}.weight" for n in block_linears(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in targets}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def check_pattern(W: torch.Tensor, mask: torch.Tensor, method: str, sparsity: str) -> None:
    out_f, in_f = W.shape
    assert mask.shape == W.shape and mask.dtype == torch.bool
    assert torch.equal(W[~mask], torch.zeros_like(W[~mask]))          # pruned positions hold exact zeros
    if ":" in sparsity:
        n, m = map(int, sparsity.split(":"))
        assert (mask.reshape(out_f, in_f // m, m).sum(-1) == n).all()
        assert ((W != 0).reshape(out_f, in_f // m, m).sum(-1) <= n).all()
    elif method == "wanda":                                             # per output row
        assert (mask.sum(1) == in_f - round(float(sparsity) * in_f)).all()
    else:                                                               # over the whole layer
        assert int((~mask).sum()) == round(float(sparsity) * W.numel())


def logits_mse(model, ref_logits, windows) -> float:
    with torch.no_grad():
        return float(((model(input_ids=windows).logits - ref_logits) ** 2).mean())


# ------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method,arch,sparsity", CASES)
def test_exact_sparsity_on_every_target(method, arch, sparsity):
    model = tiny_model(arch)
    before = other_tensors(model)
    report = prune(model, CONFIGS[method](sparsity=sparsity))
    layers = block_linears(model)
    assert set(model.slimlm_masks) == set(layers)
    for name, info in layers.items():
        check_pattern(info.weight(), model.slimlm_masks[name], method, sparsity)
    assert_same(other_tensors(model), before)                         # lm_head, embeddings, norms, biases
    assert report["method"] == method and report["sparsity"] == 0.5 and report["layers"] == len(layers)
    assert report["pruned_weights"] * 2 == report["target_weights"]
    assert registry.default_format(model).name == "slimlm"         # written compactly, not dense


@pytest.mark.parametrize("arch,sparsity", [("llama", "2:4"), ("qwen2", "0.5"), ("gpt2", "0.5"), ("opt", "2:4")])
def test_sparsegpt_closer_to_dense_than_magnitude(arch, sparsity):
    dense = tiny_model(arch)
    held_out = random_windows(4, 32, seed=1)
    with torch.no_grad():
        ref = dense(input_ids=held_out).logits
    mse = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        prune(model, CONFIGS[method](sparsity=sparsity), data=random_windows(32, 32))
        mse[method] = logits_mse(model, ref, held_out)
    assert mse["sparsegpt"] < 0.9 * mse["magnitude"], mse


@pytest.mark.parametrize("sequential", [False, True])
def test_sparsegpt_sequential_or_one_pass_both_prune_exactly(sequential):
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    rep = prune(model, SparseGPTConfig(sparsity="0.5", true_sequential=sequential), data=random_windows(16, 32))
    for name, info in block_linears(model).items():
        check_pattern(info.weight(), model.slimlm_masks[name], "sparsegpt", "0.5")
    # true-sequential runs staged on Llama's blocks; the one-pass order has no stages
    assert rep["true_sequential"] is sequential
    assert rep["staged_blocks"] == (model.config.num_hidden_layers if sequential else 0)


def test_sparsegpt_is_true_sequential_by_default_except_with_dense_propagation():
    assert SparseGPTConfig(sparsity="0.5").true_sequential is True
    assert SparseGPTConfig(sparsity="0.5", propagate="dense").true_sequential is False


def test_wanda_propagates_dense_by_default_and_the_shared_help_names_both_defaults():
    from dataclasses import fields
    assert WandaConfig(sparsity="0.5").propagate == "dense"
    assert SparseGPTConfig(sparsity="0.5").propagate == "compressed"
    # the CLI shows one --propagate for both methods: its help must be right for each
    helps = {next(f for f in fields(c) if f.name == "propagate").metadata["help"] for c in (WandaConfig, SparseGPTConfig)}
    assert len(helps) == 1
    assert "default dense for Wanda" in helps.pop()


@pytest.mark.parametrize("method,sparsity", [("wanda", "2:4"), ("sparsegpt", "0.5")])
def test_dense_propagation_prunes_exactly_and_close_to_compressed(method, sparsity):
    """propagate=dense (one forward per block) gives the same exact pattern, reports itself, and on a tiny
    model lands near the default propagation's logits error (the choice changes only the activations the
    later blocks are calibrated on)."""
    dense = tiny_model("llama")
    held_out = random_windows(4, 32, seed=1)
    with torch.no_grad():
        ref = dense(input_ids=held_out).logits
    mse, reports = {}, {}
    for propagate in ("compressed", "dense"):
        model = copy.deepcopy(dense)
        reports[propagate] = prune(model, CONFIGS[method](sparsity=sparsity, propagate=propagate),
                                   data=random_windows(16, 32))
        for name, info in block_linears(model).items():
            check_pattern(info.weight(), model.slimlm_masks[name], method, sparsity)
        mse[propagate] = logits_mse(model, ref, held_out)
    assert reports["dense"]["propagate"] == "dense" and reports["compressed"]["propagate"] == "compressed"
    assert mse["dense"] != mse["compressed"]                 # the later blocks did see other activations
    assert mse["dense"] < 1.5 * mse["compressed"], mse


def test_shared_factorisation_gives_the_same_solve():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    H = 2 / 256 * X.T @ X
    W = torch.randn(32, 64, generator=g)
    for kw in ({"sparsity": 0.5}, {"sparsity": None, "prune_n": 2, "prune_m": 4}):
        alone = sparsegpt_prune(W, H, **kw)
        shared = sparsegpt_prune(W, H, prep=prepare_hessian(H, 0.01), **kw)
        assert torch.equal(alone.mask, shared.mask) and torch.equal(alone.weight, shared.weight)


# ------------------------------------------------------------------------------------------ joint GPTQ
@pytest.mark.parametrize("arch,sparsity,bits,group_size,symmetric",
                         [("llama", "2:4", 4, 32, False), ("gpt2", "0.5", 4, 32, False),
                          ("opt", "2:4", 3, -1, True), ("qwen2", "0.5", 8, 64, False)])
def test_joint_quantization_keeps_pruned_at_zero(arch, sparsity, bits, group_size, symmetric):
    model = tiny_model(arch)
    names = list(block_linears(model))
    before = other_tensors(model)
    held_out = random_windows(4, 32, seed=1)
    with torch.no_grad():
        ref = model(input_ids=held_out).logits
    report = prune(model, SparseGPTConfig(sparsity=sparsity, bits=bits, group_size=group_size,
                                          symmetric=symmetric), data=random_windows(32, 32))
    assert report["bits"] == bits and report["sparsity"] == 0.5
    for name in names:
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.bits == bits and q.method == "sparsegpt"
        mask = model.slimlm_masks[name]
        codes, zero = q.codes(), q.zero.long()[:, q.g_idx.long()]
        assert torch.equal(codes[~mask].long(), zero[~mask])        # pruned codes sit on the zero point
        W = q.dequantize_weight()
        check_pattern(W, mask, "sparsegpt", sparsity)
    # biases, norms, embeddings, lm_head unchanged (block linear biases now live in the QuantLinear)
    after = {n: p for n, p in model.named_parameters()}
    for n, t in before.items():
        assert torch.equal(after[n], t), n
    assert registry.default_format(model).name == "slimlm"         # packed and sparse layers together
    if bits >= 4:  # 4- and 8-bit noise is small next to the pruning error: still closer than float magnitude
        magnitude_model = tiny_model(arch)
        prune(magnitude_model, MagnitudeConfig(sparsity=sparsity), data=None)
        assert logits_mse(model, ref, held_out) < logits_mse(magnitude_model, ref, held_out)
    else:
        assert torch.isfinite(model(input_ids=held_out).logits).all()


@pytest.mark.parametrize("bits", [None, 4])
def test_staged_sparsegpt_equals_the_generic_true_sequential_passes(bits):
    """Regression: joint SparseGPT swaps quantized layers into the block while it runs; the staged passes must
    propagate through the layers now in place (they once called the replaced float o_proj and down_proj)."""
    models_ = {}
    for staged in (True, False):
        model = tiny_model("llama")
        api.prune(model, SparseGPTConfig(sparsity="0.5", bits=bits, group_size=32), data=random_windows(16, 32),
                  runner=RunnerOptions(progress=False, fast=False, staged=staged, stash_bf16=False))
        models_[staged] = model
    held_out = random_windows(4, 32, seed=1)
    with torch.no_grad():
        a, b = (models_[k](input_ids=held_out).logits for k in (True, False))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, mask in models_[False].slimlm_masks.items():
        assert torch.equal(models_[True].slimlm_masks[name], mask), name


# ------------------------------------------------------------------------------------------ schedules
def test_linear_schedule_rises_with_depth():
    model = tiny_model("llama")
    report = prune(model, MagnitudeConfig(layer_sparsity="linear:0.25:0.75"), data=None)
    assert report["block_sparsity"] == [0.25, 0.75]
    for name, mask in model.slimlm_masks.items():
        frac = 0.25 if ".layers.0." in name else 0.75
        assert int((~mask).sum()) == round(frac * mask.numel()), name


def test_pattern_schedule_targets_and_ignore():
    model = tiny_model("llama")
    dense_attn0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    prune(model, WandaConfig(sparsity="0.5", layer_sparsity="mlp=2:4,layers.0.self_attn=0", ignore="down_proj"))
    masks = model.slimlm_masks
    assert not any("down_proj" in n for n in masks)
    assert not any(n.startswith("model.layers.0.self_attn") for n in masks)   # sparsity 0: left dense
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, dense_attn0)
    for name, mask in masks.items():
        check_pattern(block_linears(model)[name].weight(), mask, "wanda", "2:4" if ".mlp." in name else "0.5")
    assert {n.rsplit(".", 1)[1] for n in masks} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}


def test_targets_restrict_the_layers():
    model = tiny_model("gpt2")
    plan = plan_targets(model, MagnitudeConfig(targets="mlp", ignore="mlp.c_proj"))
    assert sorted(plan) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def test_global_magnitude_uses_one_threshold():
    model = tiny_model("opt")
    weights = {n: i.weight() for n, i in block_linears(model).items()}
    report = prune(model, MagnitudeConfig(sparsity="0.6", scope="global"), data=None)
    total = sum(w.numel() for w in weights.values())
    assert report["pruned_weights"] == round(0.6 * total)
    kept = torch.cat([w[m].abs() for n, w in weights.items() for m in [model.slimlm_masks[n]]])
    gone = torch.cat([w[~m].abs() for n, w in weights.items() for m in [model.slimlm_masks[n]]])
    assert kept.min() >= gone.max()
    per_layer = [float((~m).float().mean()) for m in model.slimlm_masks.values()]
    assert max(per_layer) - min(per_layer) > 0.01                      # the layers differ, unlike scope=layer


def test_apply_masks_restores_zeros_after_an_update():
    model = tiny_model("gpt2")                                         # Conv1D: weights stored transposed
    prune(model, MagnitudeConfig(sparsity="2:4"), data=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    apply_masks(model)
    for name, info in block_linears(model).items():
        check_pattern(info.weight(), model.slimlm_masks[name], "magnitude", "2:4")


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("sparsity,words", [("1.0", "[0, 1)"), ("-0.1", "[0, 1)"), ("4:4", "N < M"),
                                            ("0:4", "N < M"), ("half", "like 0.5")])
@pytest.mark.parametrize("cls", list(CONFIGS.values()))
def test_bad_sparsity(cls, sparsity, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(")", r"\)")):
        cls(sparsity=sparsity)


@pytest.mark.parametrize("kwargs,words", [
    (dict(layer_sparsity="linear:0.3"), "linear:0.3:0.7"),
    (dict(layer_sparsity="mlp"), "PATTERN=VALUE"),
    (dict(layer_sparsity="mlp=1.2"), "mlp=1.2"),
    (dict(layer_sparsity="=0.3"), "no layer pattern"),
    (dict(sparsity="2:4", layer_sparsity="linear:0.2:0.6"), "PATTERN=N:M"),
    (dict(scope="global", sparsity="2:4"), "scope=layer"),
    (dict(scope="global", layer_sparsity="mlp=0.3"), "drop layer_sparsity"),
    (dict(scope="row"), "'layer' or 'global'"),
])
def test_bad_magnitude_options(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        MagnitudeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,words", [(dict(bits=5), "2, 3, 4, 8"), (dict(bits=4, group_size=0), "-1"),
                                          (dict(damp=-1.0), "damp"), (dict(block_size=0), "block_size"),
                                          (dict(propagate="dense", true_sequential=True), "add true_sequential=false"),
                                          (dict(propagate="pruned"), "'compressed' or 'dense'")])
def test_bad_sparsegpt_options(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        SparseGPTConfig(**kwargs)


@pytest.mark.parametrize("config,words", [
    (SparseGPTConfig(sparsity="3:5"), r"model\.layers\.0\.self_attn\.q_proj has 64 inputs"),
    (WandaConfig(layer_sparsity="mlp=0.5,attention=0.3"), "'attention' matches none"),
    (MagnitudeConfig(targets="attn"), "'attn' matches no linear layer"),
    (MagnitudeConfig(ignore="lm_hed"), "'lm_hed' matches no module"),
    (MagnitudeConfig(targets="mlp", ignore="mlp"), "no layer left"),
    (SparseGPTConfig(bits=4, group_size=48), "model.layers.0.self_attn.q_proj"),
])
def test_errors_come_before_any_work(config, words):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=words):
        prune(model, config)
    assert_same(model.state_dict(), before)
    assert not hasattr(model, "slimlm_masks")


def test_calibrated_methods_need_data():
    model = tiny_model("llama")
    for config in (WandaConfig(), SparseGPTConfig()):
        with pytest.raises(SlimlmError, match="needs calibration data"):
            api.prune(model, config)
    with pytest.raises(SlimlmError, match="needs calibration data"):
        apply_sparsegpt(model, SparseGPTConfig(), None, QUIET)
    with pytest.raises(SlimlmError, match="token ids"):
        apply_sparsegpt(model, SparseGPTConfig(), torch.randn(4, 8), QUIET)


def test_python_values_are_accepted():
    assert MagnitudeConfig(sparsity=0.5).spec() == 0.5
    assert WandaConfig(sparsity=(2, 4)).sparsity == "2:4"
    assert SparseGPTConfig(ignore=["q_proj", " k_proj"]).ignore == "q_proj,k_proj"


# ------------------------------------------------------------------------------------------ CLI
def test_cli_prune_saves_a_compact_model(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "2:4",
               "--ignore", "lm_head", "--data", str(text_file), "--samples", "4", "--seqlen", "32",
               "--output", str(out), "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "sparsity: 0.5" in capsys.readouterr().out
    source, pruned = models.load_model(str(model_dir)), models.load_model(str(out))
    assert torch.equal(pruned.lm_head.weight, source.lm_head.weight)
    for name, info in block_linears(pruned).items():
        W = info.weight()
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name
    dense_bytes = (model_dir / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.85 * dense_bytes
    assert models.load_tokenizer(str(out))("ab")["input_ids"] == models.load_tokenizer(str(model_dir))("ab")["input_ids"]


@pytest.mark.parametrize("args,words", [(["--method", "wanda"], "needs calibration data"),
                                        (["--method", "magnitude", "--sparsity", "1.0"], "[0, 1)"),
                                        (["--method", "magnitude", "--sparsity", "3:5"], "has 64 inputs")])
def test_cli_errors(model_dir, tmp_path, capsys, args, words):
    out = tmp_path / "never"
    assert main(["prune", "--model", str(model_dir), *args, "--output", str(out), "--threads", "1"]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_dense_propagation_asked_on_the_runner_holds():
    # the config asks compressed (Wanda's default is dense, which would make this pass whatever the runner says)
    model = tiny_model("llama")
    report = api.prune(model, WandaConfig(sparsity="0.5", propagate="compressed"), data=random_windows(8, 32),
                       runner=RunnerOptions(fast=False, progress=False, propagate="dense"))
    assert report["propagate"] == "dense"


def test_wanda_runs_dense_by_default():
    model = tiny_model("llama")
    report = api.prune(model, WandaConfig(sparsity="0.5"), data=random_windows(8, 32),
                       runner=RunnerOptions(fast=False, progress=False))
    assert report["propagate"] == "dense"
