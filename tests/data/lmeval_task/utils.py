"""Data of the slimlm test tasks: next_word.jsonl beside this file, read without a download or a cache.

next_word.jsonl was built from the sentence of tests/conftest.py's TEXT: for each word from the third on,
the words before it are the context and the choices are that word and three others of the sentence
(seeded shuffle); tests/test_lmeval.py checks that every row still reads so.
"""
import json
from pathlib import Path

import datasets

DATA = Path(__file__).with_name("next_word.jsonl")


def load_docs(**_metadata) -> datasets.DatasetDict:
    """The rows as the test split (lm-eval passes its metadata as keyword arguments; none is used)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
