"""The pool micro-benchmark runs end to end on a tiny model and reports what it measured (no timing asserts)."""

from __future__ import annotations

import dataclasses

from model import pool_bench
from pipeline.evaluation.datasets import loghub_dir
from tests.helpers.models import VOCAB


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, split_special_tokens=False):  # no markers: both ignored
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_pool_bench_decode_and_ingest_report_every_variant(tiny_lm):
    lm = dataclasses.replace(tiny_lm("llama"), tokenizer=_CharTokenizer())
    dec = pool_bench.decode(lm, loghub_dir(), sizes=(1, 3), sinks=4, window=60, max_chunk=8, repeats=1)
    assert [r["streams"] for r in dec["rows"]] == [1, 3] and dec["keys_per_stream"] == 64
    assert dec["pool_columns"] == 4 + 60 + 8 - 1
    for row in dec["rows"]:
        assert set(row["tokens_per_s"]) == {
            "pool_batched",
            "pool_one_by_one",
            "dynamic_batched",
            "sinkcache_one_by_one",
        }
        assert all(v > 0 for v in row["tokens_per_s"].values())
    ing = pool_bench.ingest(lm, loghub_dir(), counts=(2, 4), sinks=4, window=60, max_chunk=32, repeats=1)
    for row in ing["rows"]:
        lo, mean, hi = row["line_tokens_min_mean_max"]
        assert 1 <= lo <= mean <= hi <= 32 and row["padded_tokens"] == row["streams"] * hi
        assert row["tokens"] == round(mean * row["streams"])
        assert all(v > 0 for v in row["tokens_per_s"].values())
    assert lm.model.config._attn_implementation == "sinkstream"  # the raw baseline switched it back
