"""`sinkstream bench soak`, short: the real service (subprocess, SmolLM2) against its own embedded broker and
Redis, one SIGKILL + restart and one Redis pause (3-20 s) while keyed Loghub streams flow; every input offset must
end up with a score or error annotation and every duplicate must be byte-identical (issue 10 item 6)."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.soak import soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_short_soak_loses_nothing_and_replays_identical_bytes(tmp_path):
    report = soak(1.25, 3, tmp_path, kills=1, redis_pauses=1, broker_pauses=0, flushes=0, ooms=0, churn=0.0,
                  rate=0.5, max_redis_pause_s=20.0, drain_timeout_s=240.0)
    assert report["records_produced"] >= 15 and report["produce_errors"] == 0
    assert report["drained"] and report["inputs_lost"] == 0, report["lost_examples"]
    assert report["payload_mismatches_after_dedupe"] == 0, report["mismatch_examples"]
    assert report["kills"] == 1 and report["kills_survived"] == 1
    assert report["redis_pauses"] == 1
    assert report["records_processed"] == report["records_produced"]
    assert report["final_exit_code"] == 0 and report["logs_with_traceback"] == 0
    assert report["peak_rss_mb"] > 0
    written = json.loads((tmp_path / "bench_soak.json").read_text())
    assert written["inputs_lost"] == 0 and (tmp_path / "bench_soak.png").stat().st_size > 0
