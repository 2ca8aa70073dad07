"""The benchmark harness on tiny models: right baselines, right arithmetic, right shapes (no timing asserts)."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.bench import batch, common, ingest, latency, memory, overhead
from tests.helpers.models import VOCAB


def test_median_time_is_median_of_per_repeat_means(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 11.0, 20.0, 29.0])  # repeats of 2 steps taking 2 s, 1 s and 9 s
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []
    t = common.median_time(lambda: calls.append(1), steps=2, repeats=3, reset=lambda: calls.append(0))
    assert t["repeats_s"] == [1.0, 0.5, 4.5] and t["median_s"] == 1.0
    assert calls == [0, 1, 1] * 3
    with pytest.raises(ValueError, match="steps >= 1"):
        common.median_time(lambda: None, steps=0, repeats=1)


def test_dynamic_decoder_baseline_is_a_correct_causal_forward(tiny_lm):
    """The raw baseline must compute real attention over prefix + chunk (a wrong mask would be faster)."""
    lm = tiny_lm("llama")
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = lm.model(input_ids=ids[None]).logits[0]
    dec = common.DynamicDecoder(lm, ids[:30])
    for _ in range(2):  # the decoder forgets each chunk: the same call gives the same answer
        torch.testing.assert_close(dec.forward(ids[30:])[0], full[30:], atol=1e-4, rtol=0)
        torch.testing.assert_close(dec.forward(ids[30:31])[0], full[30:31], atol=1e-4, rtol=0)


def test_latency_shapes_and_speedup(tiny_lm):
    lm = tiny_lm("llama")
    r = latency.latency(lm, sizes=(16, 32), steps=2, repeats=1)
    assert set(r["ms_per_token"]) == set(latency.LATENCY_POLICIES)
    for policy, per_size in r["ms_per_token"].items():
        assert set(per_size) == {16, 32} and all(v > 0 for v in per_size.values())
    for size in (16, 32):
        assert r["speedup_sink_over_recompute"][size] == r["ms_per_token"]["recompute"][size] / r["ms_per_token"]["sink"][size]
        assert r["cpu_speedup_sink_over_recompute"][size] == r["cpu_ms_per_token"]["recompute"][size] / r["cpu_ms_per_token"]["sink"][size]
    with pytest.raises(ValueError, match="policies among"):
        latency.latency(lm, sizes=(16,), policies=("sinks",))


def test_overhead_and_ingest_ratios(tiny_lm):
    lm = tiny_lm("llama")
    o = overhead.overhead(lm, keys=(16, 32), steps=2, repeats=1)
    assert [row["keys"] for row in o["rows"]] == [16, 32]
    assert all(row["ratio"] == pytest.approx(row["sink_ms"] / row["dynamic_ms"]) for row in o["rows"])
    g = ingest.ingest(lm, chunks=(1, 8), sinks=4, window=28, repeats=1)
    assert g["span"] == 32 and [row["chunk"] for row in g["rows"]] == [1, 8]
    assert all(row["ratio"] == pytest.approx(row["sink_tokens_per_s"] / row["raw_tokens_per_s"]) for row in g["rows"])


def test_batch_benchmark_checks_equality(tiny_lm):
    r = batch.batch(tiny_lm("llama"), sizes=(1, 3), sinks=4, window=28, steps=2, repeats=1)
    assert [row["streams"] for row in r["rows"]] == [1, 3]
    assert r["rows"][1]["lengths"] == [96, 99, 102]  # staggered streams, all past eviction
    assert all(row["max_abs_logit_diff"] < 1e-4 for row in r["rows"])


def test_stream_memory_reports_each_checkpoint(tiny_lm):
    readings = []
    memory.stream_memory(tiny_lm("llama"), [100, 250], sinks=4, window=28, chunk=64, report=readings.append)
    assert [x["tokens"] for x in readings] == [0, 100, 250]
    assert all(x["buffered"] <= 4 + 28 + 64 for x in readings)
    assert all(x["peak_rss_mb"] >= x["rss_mb"] * 0.5 > 0 for x in readings)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_rss_is_reset_to_cover_streaming_only():
    big = torch.ones(300 * 2**20 // 4)  # 300 MiB touched, then freed
    del big
    before = memory._peak_mb()
    assert memory._reset_peak()
    after = memory._peak_mb()
    assert after <= memory._rss_mb() + 1 and before - after > 250


def test_memory_worker_subprocess(monkeypatch):
    r = memory.memory(memory.TINY, [300, 600], sinks=4, window=60, chunk=64, timeout_s=120, threads=1)
    assert [x["tokens"] for x in r["readings"]] == [0, 300, 600]
    first, last = r["readings"][1], r["readings"][2]
    assert r["peak_ratio_last_over_first"] == last["peak_rss_mb"] / first["peak_rss_mb"]
    start = r["readings"][0]
    if start["peak_reset_after_load"]:  # the worker's peak is its own, not the parent's (ru_maxrss survives exec)
        assert abs(start["peak_rss_mb"] - start["rss_mb"]) < 2 and start["peak_rss_mb"] <= start["load_peak_rss_mb"] + 1
    monkeypatch.setattr(memory.sys, "executable", "false")  # a worker that dies at once
    with pytest.raises(RuntimeError, match="memory worker"):
        memory.memory(memory.TINY, [10], timeout_s=120)


def test_machine_description():
    info = common.machine()
    assert info["cores"] >= 1 and info["torch_threads"] >= 1 and info["torch"] == torch.__version__ and info["cpu"]
