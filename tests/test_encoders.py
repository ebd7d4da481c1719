"""Encoders: a masked LM is scored by pseudo-perplexity, an embedding model (no LM head) only by agreement with
a reference's embeddings. Tiny random BERTs built from configs; the real all-MiniLM-L6-v2 only under `slow`."""
import json
import math

import pytest
import torch

import slimlm
from slimlm import data as D
from slimlm import metrics as E
from slimlm.cli import main
from slimlm.core.mlm import mean_pool, sample_positions
from slimlm.errors import SlimlmError

from conftest import TEXT, tiny_model, tiny_tokenizer

CLS, SEP, MASK = 2, 3, 4


def bert_tokenizer():
    """A character-level WordLevel tokenizer with BERT's specials ([PAD] [UNK] [CLS] [SEP] [MASK] = 0..4)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}
    for c in [*range(32, 127), 10]:
        vocab[chr(c)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS),
                                                                                                ("[SEP]", SEP)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_bert(head: str = "mlm", seed: int = 0, layers: int = 2):
    """A tiny random BertForMaskedLM ("mlm") or bare BertModel ("none"), eval mode, weights widened so the
    predictions are far from uniform."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    model = (BertForMaskedLM if head == "mlm" else BertModel)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def save(model, tmp_path, name):
    d = tmp_path / name
    model.save_pretrained(str(d), safe_serialization=True)
    bert_tokenizer().save_pretrained(str(d))
    return d


def text_ids():
    return torch.tensor(bert_tokenizer()(TEXT, add_special_tokens=False)["input_ids"])


def wrapped(n: int, seqlen: int) -> torch.Tensor:
    """n windows [CLS] + (seqlen - 2) text tokens + [SEP], built here by hand."""
    text = text_ids()[: n * (seqlen - 2)].view(n, seqlen - 2)
    return torch.cat([torch.full((n, 1), CLS), text, torch.full((n, 1), SEP)], 1)


def plain_masked(model, windows, positions, reference=None):
    """Mask one position at a time, one full forward each: sum of log p(w_t | W without t), and (with a
    reference) the summed KL(P_ref || P_model) and top-1 agreements, in float64."""
    pll, kl, agree = 0.0, 0.0, 0
    with torch.no_grad():
        for w, pos in zip(windows, positions):
            for t in pos.tolist():
                x = w.clone()
                x[t] = MASK
                lp = torch.log_softmax(model(x[None]).logits[0, t].double(), -1)
                pll += float(lp[w[t]])
                if reference is not None:
                    lq = torch.log_softmax(reference(x[None]).logits[0, t].double(), -1)
                    kl += float((lq.exp() * (lq - lp)).sum())
                    agree += int(lp.argmax() == lq.argmax())
    return pll, kl, agree


def plain_cosines(model, reference, windows):
    """Cosine of the plain token-mean of each model's last hidden states, per window (no padding)."""
    with torch.no_grad():
        e = model(windows).last_hidden_state.double().mean(1)
        r = reference(windows).last_hidden_state.double().mean(1)
    return (e * r).sum(-1) / (e.norm(dim=-1) * r.norm(dim=-1))


def test_masked_lm_folder_loads_with_its_head_and_a_bare_encoder_without(tmp_path):
    mlm, bare = tiny_bert("mlm"), tiny_bert("none")
    m = slimlm.load_model(str(save(mlm, tmp_path, "mlm")))
    assert type(m).__name__ == "BertForMaskedLM" and E.lm_kind(m) == "masked"
    x = wrapped(2, 16)
    with torch.no_grad():
        assert torch.equal(m(x).logits, mlm(x).logits)
    b = slimlm.load_model(str(save(bare, tmp_path, "bare")))
    assert type(b).__name__ == "BertModel" and E.lm_kind(b) == "none"
    assert E.lm_kind(tiny_model("llama")) == "causal"


def test_encoder_windows_wrap_the_text_in_cls_and_sep():
    win, scorable = D.encoder_windows(text_ids(), 24, 3, bert_tokenizer())
    assert torch.equal(win, wrapped(3, 24))
    assert scorable.tolist() == [False] + [True] * 22 + [False]
    with pytest.raises(SlimlmError, match="at least 3"):
        D.encoder_windows(text_ids(), 2, 3, bert_tokenizer())


def test_pseudo_perplexity_equals_masking_one_position_at_a_time():
    """Every text position (not [CLS]/[SEP]) masked in turn, several copies per forward (batch 5 over 22
    positions: ragged last batch), against one forward per position here."""
    model = tiny_bert("mlm")
    win, scorable = D.encoder_windows(text_ids(), 24, 3, bert_tokenizer())
    r = E.pseudo_perplexity(model, win, scorable, MASK, batch_size=5, progress=False)
    pll, _, _ = plain_masked(model, win, [torch.arange(1, 23)] * 3)
    assert r["tokens"] == 3 * 22 and r["masked_positions"] is None
    assert r["pseudo_nll_sum"] == pytest.approx(-pll, rel=1e-6)
    assert r["pseudo_perplexity"] == pytest.approx(math.exp(-pll / 66), rel=1e-6)
    assert r["pseudo_perplexity"] > 1


def test_pseudo_perplexity_on_a_seeded_subset_of_positions():
    model = tiny_bert("mlm")
    win, scorable = D.encoder_windows(text_ids(), 24, 3, bert_tokenizer())
    r = E.pseudo_perplexity(model, win, scorable, MASK, positions=5, seed=3, batch_size=4, progress=False)
    g = torch.Generator().manual_seed(3)
    drawn = [sample_positions(scorable, 5, g) for _ in range(3)]
    for pos in drawn:
        assert pos.numel() == 5 and pos.unique().numel() == 5 and scorable[pos].all()
    assert not all(torch.equal(drawn[0], p) for p in drawn[1:])          # a fresh draw per window
    pll, _, _ = plain_masked(model, win, drawn)
    assert r["tokens"] == 15 and r["masked_positions"] == 5
    assert r["pseudo_nll_sum"] == pytest.approx(-pll, rel=1e-6)
    again = E.pseudo_perplexity(model, win, scorable, MASK, positions=5, seed=3, progress=False)
    assert again["pseudo_perplexity"] == pytest.approx(r["pseudo_perplexity"], rel=1e-6)
    other = E.pseudo_perplexity(model, win, scorable, MASK, positions=5, seed=4, progress=False)
    assert other["pseudo_perplexity"] != pytest.approx(r["pseudo_perplexity"], rel=1e-3)


def test_masked_agreement_with_itself_and_with_another_masked_lm():
    a, b = tiny_bert("mlm", seed=0), tiny_bert("mlm", seed=1)
    win, scorable = D.encoder_windows(text_ids(), 16, 2, bert_tokenizer())
    same = E.pseudo_perplexity(a, win, scorable, MASK, reference=a, progress=False)
    assert abs(same["masked_kl_divergence"]) < 1e-6 and same["masked_top1_agreement"] == 1.0
    r = E.pseudo_perplexity(a, win, scorable, MASK, reference=b, batch_size=7, progress=False)
    _, kl, agree = plain_masked(a, win, [torch.arange(1, 15)] * 2, reference=b)
    assert kl > 0.01 and agree < 28
    assert r["masked_kl_divergence"] == pytest.approx(kl / 28, rel=1e-4)
    assert r["masked_top1_agreement"] == agree / 28


def test_mean_pool_weights_by_the_attention_mask():
    h = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    e = mean_pool(h, m)
    assert torch.allclose(e[0], h[0, :3].mean(0)) and torch.allclose(e[1], h[1].mean(0))


def test_embedding_cosine_against_another_model_and_itself():
    a, b = tiny_bert("none", seed=0), tiny_bert("none", seed=1)
    win = wrapped(5, 20)
    r = E.embedding_agreement(a, b, win, batch_size=2, progress=False)
    plain = plain_cosines(a, b, win)
    assert plain.max() < 0.999                                      # the two models differ here
    assert r["embedding_cosine_mean"] == pytest.approx(float(plain.mean()), abs=1e-6)
    assert r["embedding_cosine_min"] == pytest.approx(float(plain.min()), abs=1e-6)
    assert r["tokens"] == 5 * 20
    same = E.embedding_agreement(a, a, win, progress=False)
    assert same["embedding_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-6)


def test_evaluate_dispatches_on_the_head(text_file):
    causal = slimlm.evaluate(tiny_model("llama"), tiny_tokenizer(), str(text_file), windows=2, seqlen=32,
                             progress=False)
    assert "perplexity" in causal and "pseudo_perplexity" not in causal
    model, tok = tiny_bert("mlm"), bert_tokenizer()
    r = slimlm.evaluate(model, tok, str(text_file), windows=2, seqlen=24, masked_positions=None, progress=False)
    assert "pseudo_perplexity" in r and "perplexity" not in r and "kl_divergence" not in r
    by_hand = E.pseudo_perplexity(model, wrapped(2, 24), torch.arange(24).clamp(1, 22) == torch.arange(24), MASK,
                                  progress=False)
    assert r["pseudo_perplexity"] == pytest.approx(by_hand["pseudo_perplexity"], rel=1e-6)
    assert r["windows"] == 2 and r["tokens"] == 2 * 22
    with pytest.raises(SlimlmError, match=r"language-model head.*--reference") as e:
        slimlm.evaluate(tiny_bert("none"), tok, str(text_file), windows=2, seqlen=24, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(SlimlmError, match="same kind"):
        slimlm.evaluate(model, tok, str(text_file), windows=2, seqlen=24, reference=tiny_bert("none"),
                        progress=False)
    with pytest.raises(SlimlmError, match="masked-positions"):
        slimlm.evaluate(model, tok, str(text_file), windows=2, seqlen=24, masked_positions=0, progress=False)


def test_speed_of_an_encoder_is_encode_throughput(text_file):
    tok = bert_tokenizer()
    for head, ref in (("mlm", None), ("none", tiny_bert("none", seed=1))):
        r = slimlm.evaluate(tiny_bert(head), tok, str(text_file), windows=1, seqlen=24, masked_positions=2,
                            reference=ref, speed=True, progress=False)
        assert r["encode_tokens_per_s"] > 0 and r["encode_tokens"] == 24 and "decode_tokens_per_s" not in r
    s = E.speed(tiny_bert("none"), wrapped(1, 16)[0], runs=2)
    assert s["encode_tokens_per_s"] > 0 and s["runs"] == 2


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_on_encoders(capsys, tmp_path, text_file):
    bare, other = save(tiny_bert("none"), tmp_path, "bare"), save(tiny_bert("none", seed=1), tmp_path, "other")
    mlm = save(tiny_bert("mlm"), tmp_path, "mlm")
    capsys.readouterr()                                            # save_pretrained's progress bars
    common = ("--data", str(text_file), "--windows", "2", "--seqlen", "24", "--no-speed")
    code, out, err = run(capsys, "eval", "--model", str(bare), *common)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "language-model head" in err and "--reference" in err
    code, out, err = run(capsys, "eval", "--model", str(bare), *common, "--reference", str(other))
    assert code == 0, err
    assert "cosine vs ref (mean)" in out and "perplexity" not in out
    code, out, err = run(capsys, "eval", "--model", str(mlm), *common, "--masked-positions", "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert "perplexity" not in r and r["pseudo_perplexity"] > 1 and r["tokens"] == 2 * 3
    code, out, err = run(capsys, "eval", "--model", str(mlm), *common, "--masked-positions", "some")
    assert code == 2 and "--masked-positions" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_minilm_refuses_perplexity_and_agrees_with_itself(text_file):
    model = slimlm.load_model("all-minilm-l6-v2")
    tok = slimlm.load_tokenizer("all-minilm-l6-v2")
    assert E.lm_kind(model) == "none"
    with pytest.raises(SlimlmError, match="language-model head"):
        slimlm.evaluate(model, tok, str(text_file), windows=4, seqlen=64, progress=False)
    same = slimlm.evaluate(model, tok, str(text_file), windows=4, seqlen=64, reference=model, progress=False)
    assert same["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-5)
    perturbed = slimlm.load_model("all-minilm-l6-v2")
    with torch.no_grad():
        w = perturbed.encoder.layer[0].attention.output.dense.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std())
    r = slimlm.evaluate(perturbed, tok, str(text_file), windows=4, seqlen=64, reference=model, progress=False)
    assert 0 < r["embedding_cosine_mean"] < 0.9999
