import json

import pytest
import torch

from slimlm import data as D
from slimlm.errors import SlimlmError

from conftest import tiny_tokenizer


def test_python_docs_is_always_there():
    text = D.load_text("python-docs")
    assert len(text) > 100_000 and "def" in text


def test_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert D.load_text(str(tmp_path / "a.txt")) == "hello world"
    rows = [{"text": "one", "other": 1}, {"text": "two"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert D.load_text(str(tmp_path / "a.jsonl")) == "one\n\ntwo"
    with pytest.raises(SlimlmError, match="field 'body'"):
        D.load_text(str(tmp_path / "a.jsonl"), field="body")
    import pyarrow as pa  # a dev dependency (and the data extra): missing, this fails rather than skips
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["x y", "z"]}), str(tmp_path / "a.parquet"))
    assert D.load_text(str(tmp_path / "a.parquet"), field="content") == "x y\n\nz"
    with pytest.raises(SlimlmError, match="no column 'text'"):
        D.load_text(str(tmp_path / "a.parquet"))


@pytest.mark.parametrize("content,match", [(b"", "holds no text"), (b"   \n", "holds no text"),
                                           (b"caf\xe9 au lait", "not UTF-8")])
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(SlimlmError, match=match):
        D.load_text(str(p))


def test_missing_source_names_the_choices():
    with pytest.raises(SlimlmError, match="does not exist.*python-docs"):
        D.load_text("/no/such/file.txt")


def test_calibration_windows_follow_the_protocol():
    ids = torch.arange(10_000)
    w = D.calibration_windows(ids, 16, 64, seed=0)
    torch.manual_seed(0)
    starts = torch.randint(0, 10_000 - 64, (16,))
    assert torch.equal(w, torch.stack([ids[s:s + 64] for s in starts]))
    assert torch.equal(w, D.calibration_windows(ids, 16, 64, seed=0))
    assert not torch.equal(w, D.calibration_windows(ids, 16, 64, seed=1))


def test_eval_windows_non_overlapping_remainder_dropped():
    ids = torch.arange(1000)
    w = D.eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert D.eval_windows(ids, 128, 3).shape == (3, 128)


@pytest.mark.parametrize("fn", [lambda ids: D.eval_windows(ids, 512), lambda ids: D.calibration_windows(ids, 4, 512)])
def test_text_shorter_than_a_window(fn):
    with pytest.raises(SlimlmError, match="fewer than one window"):
        fn(torch.arange(100))


def test_zero_windows_rejected():
    with pytest.raises(SlimlmError, match="at least 1"):
        D.eval_windows(torch.arange(1000), 10, 0)
    with pytest.raises(SlimlmError, match="at least 1"):
        D.calibration_windows(torch.arange(1000), 0, 10)


def test_tokenize_whole_text_without_special_tokens():
    tok = tiny_tokenizer()
    ids = D.tokenize(tok, "abc")
    assert ids.tolist() == [tok.convert_tokens_to_ids(c) for c in "abc"]
