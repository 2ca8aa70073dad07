"""The benchmark harness on tiny models: right baselines, right arithmetic, right shapes (no timing asserts)."""

from __future__ import annotations

import os
import timeit

import pytest
import torch

from pipeline.bench import batch, common, ingest, latency, memory, overhead
from tests.helpers.models import VOCAB


def test_median_time_is_median_of_per_repeat_means(monkeypatch):
    """A fake clock advanced by the timed function: repeats cost 1 s, 0.5 s and 4.5 s per call."""
    now, resets, costs, seen = [0.0], [0], [1.0, 0.5, 4.5], []

    def fn():
        now[0] += costs[(resets[0] - 1) // 2]  # two resets per repeat: before the warm-up and before timing
        seen.append(("call", torch.get_num_threads()))

    def reset():
        resets[0] += 1
        seen.append(("reset", None))

    monkeypatch.setattr(timeit, "default_timer", lambda: now[0])  # the clock torch.utils.benchmark reads
    monkeypatch.setattr(common.time, "process_time", lambda: now[0])
    torch.set_num_threads(2)  # the caller's thread count is what is timed (the Timer's own default is 1)
    t = common.median_time(fn, steps=2, repeats=3, reset=reset)
    assert t["repeats_s"] == [1.0, 0.5, 4.5] and t["median_s"] == 1.0 and t["median_cpu_s"] == 1.0
    assert {threads for what, threads in seen if what == "call"} == {2}
    # every repeat: reset, untimed warm-up calls, reset, then exactly `steps` timed calls
    repeats = [i for i, (what, _) in enumerate(seen) if what == "reset"][1::2]
    assert len(repeats) == 3 and all(seen[i + 1 : i + 3] == [("call", 2)] * 2 for i in repeats)
    assert all(what == "reset" for what, _ in seen[repeats[-1] + 3 :]) and len(seen) == repeats[-1] + 3
    with pytest.raises(ValueError, match="steps >= 1"):
        common.median_time(lambda: None, steps=0, repeats=1)


def test_interleaved_alternates_the_two_functions():
    """Load drift must hit both sides alike: a's and b's timed repeats alternate, a first."""
    order = []
    t = common.interleaved(lambda: order.append("a"), lambda: order.append("b"), steps=3, repeats=2)
    runs = [k for i, k in enumerate(order) if i == 0 or order[i - 1] != k]  # a, b, a, b (warm-up calls merge in)
    assert runs == ["a", "b", "a", "b"] and len(t["a_repeats_s"]) == len(t["b_repeats_s"]) == 2


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


def _recording(monkeypatch, module):
    """Record the sink caches and DynamicCache baselines a benchmark module builds."""
    caches, decoders = [], []
    fill, decoder = common.filled_cache, common.DynamicDecoder

    def filled_cache(*args, **kwargs):
        caches.append(fill(*args, **kwargs))
        return caches[-1]

    class Recorded(decoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append(self)

    monkeypatch.setattr(module, "filled_cache", filled_cache)
    if hasattr(module, "DynamicDecoder"):
        monkeypatch.setattr(module, "DynamicDecoder", Recorded)
    return caches, decoders


def test_latency_times_each_policy_at_its_cache_size(tiny_lm, monkeypatch):
    lm = tiny_lm("llama")
    caches, _ = _recording(monkeypatch, latency)
    forwards = []
    hook = lm.model.register_forward_pre_hook(
        lambda m, args, kw: forwards.append((kw["input_ids"].shape[-1], kw.get("past_key_values") is None)),
        with_kwargs=True)
    try:
        r = latency.latency(lm, sizes=(16, 32), steps=2, repeats=3)
    finally:
        hook.remove()
    assert set(r["ms_per_token"]) == set(latency.LATENCY_POLICIES)
    for policy, per_size in r["ms_per_token"].items():
        assert set(per_size) == {16, 32} and all(v > 0 for v in per_size.values())
        assert all(len(r["repeats_ms"][policy][size]) == 3 for size in (16, 32))
    # sink (4 + 12 / 4 + 28) and window (0 + 16 / 0 + 32) hold exactly `size` keys after eviction
    held = {(c.sinks, c.window): c.buffered() for c in caches}
    assert held[(4, 12)] == held[(0, 16)] == 16 and held[(4, 28)] == held[(0, 32)] == 32
    # dense starts at size - 1 and is restored before every repeat: after the last one it holds size - 1 + steps
    assert [c.buffered() for c in caches if c.window is None] == [17, 33]
    # recompute: a fresh forward (no cache) over the last `size` tokens
    assert {n for n, fresh in forwards if fresh} == {16, 32}
    with pytest.raises(ValueError, match="policies among"):
        latency.latency(lm, sizes=(16,), policies=("sinks",))


def test_overhead_and_ingest_compare_equal_attention_spans(tiny_lm, monkeypatch):
    """The ratios are fair only if the sink cache and the DynamicCache baseline attend to the same keys."""
    lm = tiny_lm("llama")
    caches, decoders = _recording(monkeypatch, overhead)
    o = overhead.overhead(lm, keys=(16, 32), steps=2, repeats=1)
    assert [row["keys"] for row in o["rows"]] == [16, 32]
    # past keys the next sink step attends to (its sinks + the window it keeps) = the baseline's prefix
    assert [c.sinks + c.kept_after(1) for c in caches] == [d.past for d in decoders] == [15, 31]
    caches, decoders = _recording(monkeypatch, ingest)
    g = ingest.ingest(lm, chunks=(1, 8), sinks=4, window=28, repeats=1)
    assert g["span"] == 32 and [row["chunk"] for row in g["rows"]] == [1, 8]
    assert [d.past for d in decoders] == [31]
    assert [c.sinks + c.kept_after(chunk) for c, chunk in zip(caches, (1, 8))] == [31, 31]
    assert all(row["forwards"] >= 2 for row in g["rows"])


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
    # a high-water mark: never below the current RSS, never lower at a later reading (no reset while streaming)
    assert all(x["peak_rss_mb"] >= x["rss_mb"] - 1 for x in r["readings"])
    peaks = [x["peak_rss_mb"] for x in r["readings"][1:]]
    assert peaks == sorted(peaks)
    start = r["readings"][0]
    if start["peak_reset_after_load"]:  # the worker's peak is its own, not the parent's (ru_maxrss survives exec)
        assert abs(start["peak_rss_mb"] - start["rss_mb"]) < 2 and start["peak_rss_mb"] <= start["load_peak_rss_mb"] + 1
    monkeypatch.setattr(memory.sys, "executable", "false")  # a worker that dies at once
    with pytest.raises(RuntimeError, match="memory worker"):
        memory.memory(memory.TINY, [10], timeout_s=120)


def test_machine_description():
    info = common.machine()
    assert info["cores"] >= 1 and info["torch_threads"] >= 1 and info["torch"] == torch.__version__ and info["cpu"]


def test_streams_benchmark_feeds_the_service_and_the_raw_forward_the_same_tokens(text_lm, tmp_path):
    """`sinkstream bench streams` on a tiny model: the service (pooled and one cache per stream) and the raw
    padded forward count the same tokens; the raw batch counts its padding; the service's share outside the
    model forward is a fraction; the plot is written."""
    from pipeline.bench.streams import bench_streams, plot_streams

    r = bench_streams(text_lm, [3], sinks=4, window=28, chunk=16, lines_per_stream=2, decode_sizes=[1, 2], repeats=1)
    (row,) = r["rows"]
    pooled, per_stream, raw = row["service_pool"], row["service_per_stream"], row["raw_padded"]
    assert pooled["records"] == per_stream["records"] == 3 * 2
    assert pooled["tokens"] == per_stream["tokens"] == raw["tokens"] > 0
    assert raw["padded_tokens"] >= raw["tokens"]
    assert 0 < pooled["model_seconds"] < pooled["seconds"] and 0 < pooled["outside_model_fraction"] < 1
    assert "model_seconds" not in per_stream
    assert [d["streams"] for d in r["decode"]["rows"]] == [1, 2]
    plot_streams(r, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_streams_benchmark_runs_templates_on_and_off_side_by_side(text_lm):
    """`--templates both`: the service runs with the issue-18 template memory on and off over the same records;
    both count the same tokens, and the ratio is on / off tokens per second."""
    from pipeline.bench.streams import bench_streams

    r = bench_streams(text_lm, [2], sinks=4, window=28, chunk=16, lines_per_stream=2, per_stream_max=0, raw_max=0,
                      repeats=1, templates="both")
    (row,) = r["rows"]
    on, off = row["service_pool"], row["service_pool_templates_off"]
    assert r["templates"] == "both" and on["tokens"] == off["tokens"] > 0 and on["records"] == off["records"] == 4
    assert row["templates_on_vs_off"] == on["tokens_per_s"] / off["tokens_per_s"]
    with pytest.raises(ValueError, match="on, off or both"):
        bench_streams(text_lm, [2], templates="maybe")
