"""GUM (Globally Unique Movement) on the training loop: the redundancy measure and its gradient against a
plain per-neuron reference, the neuron movement score against the down projection's -W * dL/dW, the
regularizer lowering the scores of duplicated neurons, a run that removes its share of neurons (global and
per layer), saves a smaller model that reloads with the same logits and resumes exactly after an
interruption; bad input in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm import api
from slimlm.adapt.methods import TrainContext
from slimlm.cli import main
from slimlm.core.structured import neuron_redundancy, uniqueness_penalty
from slimlm.errors import ConfigError
from slimlm.pruning.gum import GumConfig, prepare_gum
from slimlm.pruning.structured import find_layers, find_parts, model_dims
from slimlm.training import data as TD
from slimlm.training.config import TrainConfig

from conftest import TEXT, assert_resumes_exactly, random_windows, tiny_model


def windows_data(steps: int, batch: int = 2, seqlen: int = 32):
    return TD.text_windows(random_windows(200, 64, 0).reshape(-1), seqlen=seqlen, batch_size=batch, batches=steps,
                           seed=0)


def _reference_redundancy(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """cos(h_j, sum_{k != j} m_k h_k), one neuron at a time."""
    out = []
    for j in range(h.shape[1]):
        others = sum(m[k] * h[:, k] for k in range(h.shape[1]) if k != j)
        out.append(F.cosine_similarity(h[:, j], others, dim=0, eps=1e-12))
    return torch.stack(out)


def test_redundancy_and_its_gradient_match_a_per_neuron_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 9, generator=g, dtype=torch.float64)
    h[:, 3] = 2.5 * h[:, 1]                                      # neuron 3 copies neuron 1
    m = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float64)
    h1, m1 = h.clone().requires_grad_(), m.clone().requires_grad_()
    h2, m2 = h.clone().requires_grad_(), m.clone().requires_grad_()
    fast, ref = neuron_redundancy(h1, m1), _reference_redundancy(h2, m2)
    torch.testing.assert_close(fast, ref.to(fast.dtype), atol=1e-5, rtol=1e-5)
    w = torch.randn(9, generator=g, dtype=torch.float64)
    (fast * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-5, rtol=1e-4)
    # the penalty is the kept neurons' mean redundancy
    torch.testing.assert_close(uniqueness_penalty(h, m), (m * ref).sum().float() / m.sum().float())


def test_redundancy_is_high_for_a_neuron_the_others_reproduce():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(200, 6, generator=g)
    h[:, 5] = h[:, :5].sum(1)                                   # exactly the sum of the others
    r = neuron_redundancy(h, torch.ones(6))
    assert r[5] > 0.9 and r[:5].abs().max() < 0.9


def _down(model, layer: int = 0):
    d = model_dims(model)
    p = find_parts(model, find_layers(model), d)[layer]
    return getattr(p.mlp, p.mlp_out), p


def test_the_score_is_the_neurons_movement():
    """Without the regularizer, one backward gives S_j = -sum_i W_ij dL/dW_ij over the down projection's column
    j (the block movement of the neuron's output weights), since dL/dm_j = sum_t h_tj dL/dh'_tj."""
    model = tiny_model("llama")
    prepare_gum(model, GumConfig(uniqueness=0.0), TrainContext(total_steps=10))
    model.train()
    x = random_windows(2, 16, seed=3)
    model(input_ids=x, labels=x).loss.backward()
    down, _ = _down(model)
    want = -(down.weight.detach() * down.weight.grad).sum(0)
    torch.testing.assert_close(model.slimlm_gum.scores[0], want, atol=1e-7, rtol=1e-4)


def test_uniqueness_lowers_the_scores_of_duplicated_neurons():
    def scores(weight: float):
        model = tiny_model("llama")
        _, p = _down(model)
        with torch.no_grad():                                   # neurons 0 and 1 of layer 0 are the same neuron
            for name, _kind in p.mlp_in:
                w = getattr(p.mlp, name).weight
                w[1] = w[0]
        plan = prepare_gum(model, GumConfig(uniqueness=weight), TrainContext(total_steps=10))
        model.train()
        x = random_windows(2, 16, seed=3)
        total, count = plan.loss(model, {"input_ids": x, "labels": x})
        (total / count).backward()
        return model.slimlm_gum.scores[0]

    delta = scores(1.0) - scores(0.0)                           # what the regularizer adds to each score
    assert delta[0] < 0 and delta[1] < 0
    assert max(delta[0], delta[1]) < delta[2:].median()


@pytest.mark.parametrize("selection", ["global", "layer"])
def test_gum_removes_its_share_saves_a_smaller_model_and_resumes(tmp_path, selection):
    cfg = TrainConfig(steps=8, seqlen=32, batch_size=2, lr=1e-3, save_every=4)
    config = GumConfig(ratio=0.5, selection=selection, min_keep=0.2, prune_start=0.1, prune_end=0.5)

    def run(data, output, resume):
        model = tiny_model("llama")
        return model, api.train(model, config, data, cfg, output=output, resume=resume, progress=False)
    model, report = assert_resumes_exactly(run, lambda: windows_data(8), 6, tmp_path)
    inter, layers = tiny_model("llama").config.intermediate_size, model.config.num_hidden_layers
    widths = report["intermediate_per_layer"]
    assert sum(widths) == inter * layers - round(0.5 * inter * layers)
    assert min(widths) >= round(0.2 * inter)
    if selection == "layer":
        assert set(widths) == {inter // 2}
    loaded = slimlm.load_model(str(tmp_path / "a"))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    x = random_windows(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    if selection == "layer":                                    # uniform widths: a plain transformers checkpoint
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)



def test_bad_input(model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        GumConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="global or layer"):
        GumConfig(selection="random")
    with pytest.raises(ConfigError, match="after the last step"):
        GumConfig(prune_end=1.2)
    with pytest.raises(ConfigError, match=">= 0"):
        GumConfig(uniqueness=-1)
    (model_dir / "text.txt").write_text(TEXT * 5)
    (tmp_path / "outs").mkdir()
    assert main(["train", "--model", str(model_dir), "--method", "gum", "--ratio", "1.5", "--data",
                 str(model_dir / "text.txt"), "--seqlen", "32", "--steps", "2",
                 "--output", str(tmp_path / "outs" / "o")]) == 2
    err = capsys.readouterr().err
    assert "fraction of MLP neurons" in err and err.count("\n") == 1
    assert not list((tmp_path / "outs").iterdir())
