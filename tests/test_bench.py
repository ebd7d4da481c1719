"""The benchmark harness's bookkeeping (no model runs here)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def run():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_repeats_give_medians_and_keep_every_run(run):
    runs = [{"wall_s": 10.0, "peak_rss_mb": 900.0, "ppl": {"a": 1}},
            {"wall_s": 30.0, "peak_rss_mb": 800.0},
            {"wall_s": 20.0, "peak_rss_mb": 1000.0}]
    row = run._merge_repeats(runs, "peak_rss_mb")
    assert row["wall_s"] == 20.0 and row["peak_rss_mb"] == 900.0
    assert row["wall_s_runs"] == [10.0, 30.0, 20.0] and row["peak_rss_mb_runs"] == [900.0, 800.0, 1000.0]
    assert row["ppl"] == {"a": 1} and row["repeats"] == 3


def test_failed_repeats_are_left_out_and_reported(run):
    runs = [{"error": "killed"}, {"wall_s": 5.0, "peak_rss_mb_after_compress": 7.0},
            {"wall_s": 9.0, "peak_rss_mb_after_compress": 3.0}]
    row = run._merge_repeats(runs, "peak_rss_mb_after_compress")
    assert row["repeats"] == 2 and row["wall_s"] == 7.0 and row["peak_rss_mb_after_compress"] == 5.0
    assert row["repeat_errors"] == ["killed"]
    assert run._merge_repeats([{"error": "x"}], "peak_rss_mb") == {"error": "x"}


def test_one_run_stays_as_it_was(run):
    one = {"wall_s": 3.0, "peak_rss_mb": 2.0}
    assert run._merge_repeats([one], "peak_rss_mb") == one


def test_the_peer_evaluates_on_its_first_run_that_works(run, monkeypatch, tmp_path):
    """A failed first peer run must not leave the merged peer row without perplexities."""
    import argparse

    calls = []

    def child(argv):
        if argv[0] == "compress-one":
            return {"wall_s": 10.0, "peak_rss_mb": 100.0, "file_bytes": 5}
        if argv[0] == "eval-one":
            return {"peak_rss_mb": 50.0, "resident_bytes": 8, "disk_bytes": 10}
        return {}

    def peer(method, opts, work, evaluate=True):
        calls.append(evaluate)
        if len(calls) == 1:
            return {"error": "killed"}
        out = {"wall_s": 20.0, "peak_rss_mb_after_compress": 200.0}
        return {**out, "ppl": {"persuasion": 50.0}} if evaluate else out

    monkeypatch.setattr(run, "_child", child)
    monkeypatch.setattr(run, "_peer", peer)
    monkeypatch.setattr(run.P, "write_result", lambda *a, **k: None)
    args = argparse.Namespace(peer_only=False, no_peer=False, peers=None, repeats=3, speed_runs=1)
    cases = {"sg": ("sparsegpt", {"sparsity": "0.5"}, "sparsegpt", {"sparsity": 0.5})}
    rows = {}
    run._run_cases(args, "prune", cases, "pruning", ["sg"], tmp_path, rows)
    assert calls == [True, True, False]
    peer_row = rows["sg__llmcompressor"]
    assert peer_row["ppl"] == {"persuasion": 50.0} and peer_row["repeats"] == 2
    assert peer_row["repeat_errors"] == ["killed"]
    assert rows["sg"]["wall_vs_llmcompressor"] == 0.5 and rows["sg"]["peak_vs_llmcompressor"] == 0.5


def test_the_latest_table_keeps_each_cases_newest_rows_in_case_order(run, monkeypatch, tmp_path):
    import json

    rows = {
        "gptq_w4g64@2026-12-01T00:00:00": {"tool": "slimlm", "ppl_persuasion": 41.0, "run": "old"},
        "gptq_w4g64": {"tool": "slimlm", "ppl_persuasion": 39.21, "run": "new"},
        "gptq_w4g64__llmcompressor@2026-12-01T00:00:00": {"tool": "llm-compressor", "ppl": {"persuasion": 41.5}},
        "gptq_w4g64__llmcompressor": {"tool": "llm-compressor", "ppl": {"persuasion": 40.75}},
        "awq_w4g64": {"tool": "slimlm", "ppl_persuasion": 40.13},
        "fp32": {"tool": "reference", "ppl_persuasion": 37.03},
    }
    (tmp_path / "quantization.json").write_text(json.dumps({"figures": {"rows": rows}}))
    monkeypatch.setattr(run.P, "RESULTS", tmp_path)
    body = run.table("quantization", latest=True).splitlines()[2:]
    assert [line.split(" | ")[:3] for line in body] == [
        ["| fp32", "reference", "37.03"], ["| awq_w4g64", "slimlm", "40.13"],
        ["| gptq_w4g64", "slimlm", "39.21"], ["| gptq_w4g64", "llm-compressor", "40.75"]]
    assert len(run.table("quantization").splitlines()) == 2 + len(rows)
