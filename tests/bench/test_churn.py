"""`sinkstream bench churn` on a tiny model and a real redis-server: the arithmetic and the lifecycle it reports
(every closed key once, closed keys' state gone from Redis), no timing asserts."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.churn import BUSY_KEYS, bench_churn, plot_churn

pytestmark = pytest.mark.integration


def test_churn_bench_closes_each_key_once_and_keeps_only_open_keys_in_redis(text_lm, tmp_path):
    r = bench_churn(text_lm, keys=40, lines_per_key=2, gap=20, window=32, threads=1)
    busy, churn = r["busy"], r["churn"]
    assert busy["records"] == churn["records"] == 80 and (busy["keys"], churn["keys"]) == (BUSY_KEYS, 40)
    assert busy["closed_keys"] == 0 and busy["open_keys_at_end"] == BUSY_KEYS
    # key k's records are 2k and 2k+1; it closes at 2k+1+20: keys 30..39 are within the gap of the end (79).
    # The busy keys come back every 15 records, within the gap: none closes.
    assert churn["closed_more_than_once"] == 0
    assert churn["closed_keys"] + churn["open_keys_at_end"] == 40 and churn["open_keys_at_end"] == 10
    assert churn["annotations"]["closed"] == churn["closed_keys"] and churn["annotations"]["score"] == 80
    # Redis holds the open keys' snapshots only (plus the manifest, epoch and sequence counters, refs set).
    assert churn["redis_keys"] <= churn["open_keys_at_end"] + 5 and busy["redis_keys"] <= BUSY_KEYS + 5
    assert r["redis_memory_ratio"] == churn["redis_used_bytes"] / busy["redis_used_bytes"]
    assert churn["manifest_bytes_per_closed_key"] > 0 and churn["snapshot_bytes_per_open_stream"] > 0
    plot_churn(r, tmp_path / "churn.png")
    assert (tmp_path / "churn.png").stat().st_size > 0
    json.dumps(r)


def test_soak_schedules_flushall_and_redis_full_one_at_a_time():
    import random

    from pipeline.bench.soak import _schedule

    plan = _schedule(random.Random(3), 2, 1, 1, 10.0, 200.0, 20.0, 10.0, flushes=2, ooms=1)
    kinds = sorted(k for _, k, _ in plan)
    assert kinds == ["broker", "flushall", "flushall", "kill", "kill", "oom", "redis"]
    ends = [t + d for t, _, d in plan]
    assert all(plan[i + 1][0] >= ends[i] for i in range(len(plan) - 1))  # one fault at a time
    assert all(d == 12.0 for _, k, d in plan if k == "flushall") and all(5.0 <= d <= 20.0 for _, k, d in plan
                                                                         if k == "oom")
