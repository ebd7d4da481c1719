import math

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm import metrics as E

from conftest import TEXT, plain_agreement, random_windows, text_windows, tiny_model, tiny_tokenizer


def test_perplexity_is_exp_of_summed_token_loss():
    model = tiny_model("llama")
    w = random_windows(3, 20)
    r = E.perplexity(model, w, progress=False)
    with torch.no_grad():
        logits = model(w).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
    assert r["tokens"] == 3 * 19
    assert math.isclose(r["perplexity"], math.exp(nll / 57), rel_tol=1e-5)


def test_agreement_with_itself_and_with_another_model():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    w = random_windows(2, 16)
    same = E.agreement(a, a, w, progress=False)
    assert abs(same["kl_divergence"]) < 1e-6 and same["top1_agreement"] == 1.0
    other = E.agreement(a, b, w, progress=False)
    kl, top1 = plain_agreement(a, b, w)
    assert other["kl_divergence"] == pytest.approx(kl, rel=1e-4) and other["top1_agreement"] == top1
    assert kl > 0.01 and top1 < 1.0
    assert plain_agreement(b, a, w)[0] != pytest.approx(kl, rel=1e-2)    # the direction of KL is visible here


def test_cached_reference_gives_the_same_agreement_as_the_model(tmp_path):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    w = random_windows(3, 16)
    cache = E.ReferenceLogprobs.write(b, w, tmp_path / "ref.f32", progress=False)
    assert (tmp_path / "ref.f32").stat().st_size == 3 * 15 * cache.shape[2] * 4
    live = E.score(a, w, b, progress=False)
    cached = E.score(a, w, cache, progress=False)
    assert cached == live
    assert live["perplexity"] == E.perplexity(a, w, progress=False)["perplexity"]
    short = E.ReferenceLogprobs(cache.path, (4, *cache.shape[1:]))
    with pytest.raises(ValueError, match="shorter"):
        short(3)


def test_size_counts_parameters_and_bytes():
    model = tiny_model("llama")
    s = E.size(model)
    n = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())   # e.g. the rotary inv_freq
    assert s.parameters == n and s.resident_bytes == 4 * n + buffers
    assert s.bits_per_weight == pytest.approx(8 * (4 * n + buffers) / n)
    half = tiny_model("llama").to(torch.bfloat16)
    assert E.size(half).resident_bytes * 2 == E.size(model).resident_bytes


def test_speed_reports_both_phases():
    r = E.speed(tiny_model("llama"), torch.arange(16) % 128, new_tokens=4, runs=3)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["runs"] == 3


def test_speed_computes_only_the_logits_a_generation_needs():
    """The prefill forward asks for the last position's logits only (as generate() does): the output layer
    never sees more than one position, and the greedy tokens are those of full-logit greedy decoding."""
    model = tiny_model("llama")
    seen = []
    h = model.lm_head.register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[1]))
    prompt = torch.arange(16) % 128
    E.speed(model, prompt, new_tokens=4, runs=1)
    h.remove()
    assert seen and set(seen) == {1}
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    got = []
    h = model.lm_head.register_forward_hook(lambda _m, _a, o: got.append(int(o[0, -1].argmax())))
    E._greedy(model, prompt[None], 2)
    h.remove()
    assert got == ids[0, 16:].tolist()


def test_evaluate_api_end_to_end(text_file):
    """The reference is another model (seed 1): its KL and top-1 agreement over the text's first four
    windows, computed here from log-softmaxes, are what evaluate() reports."""
    model, reference, tok = tiny_model("llama"), tiny_model("llama", seed=1), tiny_tokenizer()
    r = slimlm.evaluate(model, tok, str(text_file), windows=4, seqlen=64, reference=reference, progress=False)
    assert r["windows"] == 4 and r["tokens"] == 4 * 63 and r["perplexity"] > 1
    kl, top1 = plain_agreement(model, reference, text_windows(TEXT, 64, 4))
    assert kl > 0.01 and top1 < 1.0
    assert r["kl_divergence"] == pytest.approx(kl, rel=1e-4) and r["top1_agreement"] == top1


def test_size_of_a_quantized_model_counts_logical_weights():
    from slimlm.core.quant import rtn_quantize
    from slimlm.quant.linear import QuantLinear

    model = tiny_model("llama")
    n = sum(p.numel() for p in model.parameters())
    dense = E.size(model)
    lin = model.model.layers[0].mlp.down_proj
    codes, scale, zero = rtn_quantize(lin.weight.detach(), 4, False, 32)
    from slimlm.core.quant import QuantResult, default_g_idx
    res = QuantResult(codes, scale, zero, default_g_idx(lin.in_features, 32), 4, 32, False)
    model.model.layers[0].mlp.down_proj = QuantLinear.from_result(res, None)
    q = E.size(model)
    assert q.parameters == n
    assert q.resident_bytes < dense.resident_bytes
    assert q.linear_bits_per_weight < dense.linear_bits_per_weight
