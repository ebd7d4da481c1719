"""Movement pruning on the training loop: the cubic schedule and the score masks against plain references,
a run that reaches its sparsity, resumes exactly after an interruption and saves a sparse model that
reloads with the same logits; fine-tuning a pruned model keeps its zeros."""
from __future__ import annotations

import pytest
import torch

import slimlm
from slimlm import api
from slimlm.adapt.methods import FullConfig
from slimlm.calibration.common import find_blocks, is_linear
from slimlm.cli import main
from slimlm.core.prune import cubic_sparsity, score_masks
from slimlm.errors import ConfigError
from slimlm.pruning.movement import MovementConfig
from slimlm.training import data as TD
from slimlm.training.config import TrainConfig

from conftest import TEXT, assert_resumes_exactly, random_windows, tiny_model


def windows_data(steps: int, batch: int = 2, seqlen: int = 32):
    return TD.text_windows(random_windows(200, 64, 0).reshape(-1), seqlen=seqlen, batch_size=batch, batches=steps,
                           seed=0)


def test_cubic_schedule_matches_the_formula():
    for t in range(0, 30):
        if t < 5:
            want = 0.0
        elif t >= 25:
            want = 0.8
        else:
            want = 0.8 * (1 - (1 - (t - 5) / 20) ** 3)
        assert cubic_sparsity(t, 0.8, 5, 25) == pytest.approx(want)
    assert cubic_sparsity(6, 0.8, 5, 25) > 0.8 * (1 / 20)      # fast at first (cubic, not linear)


def test_score_masks_keep_the_highest_scores():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g) * 3]
    per_layer = score_masks(scores, 0.25, "layer")
    for s, k in zip(scores, per_layer):                         # plain reference: sort the scores
        order = s.flatten().argsort(descending=True)
        ref = torch.zeros(s.numel(), dtype=torch.bool)
        ref[order[: s.numel() - round(0.25 * s.numel())]] = True
        assert torch.equal(k.flatten(), ref)
    glob = score_masks(scores, 0.25, "global")
    flat = torch.cat([s.flatten() for s in scores])
    thr = flat.sort().values[round(0.25 * flat.numel()) - 1]
    assert torch.equal(torch.cat([k.flatten() for k in glob]), flat > thr)
    assert glob[0].float().mean() != glob[1].float().mean()    # layers end at different sparsities
    nm = score_masks(scores, "2:4", "layer")[0]
    assert (nm.reshape(6, 2, 4).sum(-1) == 2).all()
    assert torch.equal(nm.reshape(6, 2, 4), scores[0].reshape(6, 2, 4) >=
                       scores[0].reshape(6, 2, 4).topk(2, dim=-1).values[..., -1:])


def _block_linears(model):
    return [m for m in find_blocks(model)[1].modules() if is_linear(m)]


def _run(config, cfg):
    """A run(data, output, resume) for assert_resumes_exactly, returning (model, report)."""
    def run(data, output, resume):
        model = tiny_model("llama")
        return model, api.train(model, config, data, cfg, output=output, resume=resume, progress=False)
    return run


def test_movement_reaches_its_sparsity_resumes_exactly_and_saves_a_sparse_model(tmp_path):
    cfg = TrainConfig(steps=8, seqlen=32, batch_size=2, lr=1e-3, save_every=4)
    run = _run(MovementConfig(sparsity="0.6", prune_start=0.1, prune_end=0.5), cfg)
    model, report = assert_resumes_exactly(run, lambda: windows_data(8), 6, tmp_path)
    assert report["method"] == "movement"
    for m in _block_linears(model):                             # hard: every layer at 60%
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3)
    loaded = slimlm.load_model(str(tmp_path / "a"))
    x = random_windows(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_movement_ranks_by_movement_not_magnitude():
    """A weight that training pushes away from zero outranks a larger one it pulls towards zero."""
    from slimlm.adapt.methods import TrainContext
    from slimlm.pruning.movement import prepare_movement

    model = tiny_model("llama")
    plan = prepare_movement(model, MovementConfig(sparsity="0.5", prune_start=0.0, prune_end=0.1),
                            TrainContext(total_steps=10))
    mv = model.slimlm_movement
    name, layer = next(iter(mv.layers.items()))
    w = layer.parametrizations.weight.original
    x = random_windows(1, 8, seed=2)
    model(input_ids=x, labels=x).loss.backward()
    g = w.grad.clone()
    expected = -(w.detach() * g)                                 # the first step's movement scores
    torch.testing.assert_close(mv.masks[name].scores, expected)
    plan.after_step(5)
    keep = mv.masks[name].mask
    assert torch.equal(keep, score_masks([expected], 0.5)[0])
    assert not torch.equal(keep, w.detach().abs() >= w.detach().abs().flatten().median())


def test_fine_tuning_a_pruned_model_keeps_its_zeros():
    model = tiny_model("llama")
    slimlm.prune(model, slimlm.MagnitudeConfig(sparsity="0.5"))
    zeros = [m.weight == 0 for m in _block_linears(model)]
    report = api.train(model, FullConfig(), windows_data(3), TrainConfig(steps=3, seqlen=32, batch_size=2, lr=1e-2),
                       progress=False)
    assert report["sparse_layers_kept"] == len(zeros)
    assert all(torch.equal(m.weight == 0, z) for m, z in zip(_block_linears(model), zeros))


def test_bad_input(model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="fraction in"):
        MovementConfig(sparsity="1.0")
    with pytest.raises(ConfigError, match="after the last step"):
        MovementConfig(prune_end=1.5)
    (model_dir / "text.txt").write_text(TEXT * 5)
    (tmp_path / "outs").mkdir()
    assert main(["train", "--model", str(model_dir), "--method", "movement", "--sparsity", "1.2", "--data",
                 str(model_dir / "text.txt"), "--seqlen", "32", "--steps", "2",
                 "--output", str(tmp_path / "outs" / "o")]) == 2
    err = capsys.readouterr().err
    assert "sparsity must be a fraction" in err and err.count("\n") == 1
    assert not list((tmp_path / "outs").iterdir())


def test_learned_scores_train_through_the_straight_through_mask_at_their_own_rate(tmp_path):
    """--scores adam: S is a parameter; one backward gives dL/dS = dL/dW' * W; the optimizer runs it at
    score_lr (the group's lr_scale times the schedule); a run reaches its sparsity and resumes exactly."""
    from slimlm.adapt.methods import TrainContext
    from slimlm.pruning.movement import prepare_movement

    model = tiny_model("llama")
    config = MovementConfig(sparsity="0.5", scores="adam", score_lr=1e-2, prune_start=0.0, prune_end=0.5)
    plan = prepare_movement(model, config, TrainContext(total_steps=8, lr=1e-3))
    mv = model.slimlm_movement
    name, layer = next(iter(mv.layers.items()))
    w = layer.parametrizations.weight.original
    x = random_windows(1, 8, seed=2)
    model(input_ids=x, labels=x).loss.backward()
    s = mv.masks[name].scores
    assert isinstance(s, torch.nn.Parameter) and s.grad is not None
    torch.testing.assert_close(s.grad, (w.grad * w.detach()).float())          # mask is all ones at step 0
    assert all(v == pytest.approx(10.0) for v in plan.lr_scale.values())
    assert len(plan.lr_scale) == len(mv.layers)

    run = _run(config, TrainConfig(steps=8, seqlen=32, batch_size=2, lr=1e-3, save_every=4))
    trained, report = assert_resumes_exactly(run, lambda: windows_data(8), 6, tmp_path)
    assert report["score_parameters"] == sum(m.weight.numel() for m in _block_linears(trained))
    for m in _block_linears(trained):
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_optimizer_groups_carry_their_lr_scale():
    from slimlm.training.optim import make_optimizer

    a, b, c = (torch.nn.Parameter(torch.zeros(3, 3)) for _ in range(3))
    opt = make_optimizer([a, b, c], lr=1e-3, lr_scale=lambda p: 5.0 if p is b else 1.0)
    groups = {g["lr_scale"]: [id(p) for p in g["params"]] for g in opt.param_groups}
    assert groups == {1.0: [id(a), id(c)], 5.0: [id(b)]}
