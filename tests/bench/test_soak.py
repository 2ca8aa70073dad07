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
    assert report["mismatches_unexplained"] == 0, report["mismatch_examples"]
    assert report["payload_mismatches_after_dedupe"] == report["mismatches_after_state_loss"]
    assert report["kills"] == 1 and report["kills_survived"] == 1
    assert report["redis_pauses"] == 1
    assert report["records_processed"] == report["records_produced"]
    assert report["final_exit_code"] == 0 and report["logs_with_traceback"] == 0
    assert report["peak_rss_mb"] > 0
    written = json.loads((tmp_path / "bench_soak.json").read_text())
    assert written["inputs_lost"] == 0 and (tmp_path / "bench_soak.png").stat().st_size > 0


def test_mismatches_are_explained_only_inside_a_state_loss_range():
    """The audit counts a non-identical copy as "after state loss" only for offsets an incarnation re-scored
    without state: from the committed offset it resumed from after `state.lost` to its first checkpoint."""
    import json as _json

    from pipeline.bench.soak import _after_state_loss, _state_lost_from

    class Log:
        def __init__(self, *events):
            self.text = "\n".join(_json.dumps(e) for e in events)

        def log_text(self):
            return self.text

    lost = _state_lost_from([
        Log({"event": "state.lost", "partition": "t:0", "committed_offset": 16},
            {"event": "checkpoint.done", "partition": "t:1", "offset": 40},
            {"event": "checkpoint.done", "partition": "t:0", "offset": 19}),
        Log({"event": "state.lost", "partition": "t:2", "committed_offset": 5}),  # killed before a checkpoint
    ])
    assert lost == {0: [(16, 19.0)], 2: [(5, float("inf"))]}
    assert [_after_state_loss(f"t/0/{o}/score", "t", lost) for o in (15, 16, 18, 19)] == [False, True, True, False]
    assert not _after_state_loss("t/1/20/score", "t", lost) and _after_state_loss("t/2/900/score", "t", lost)
    assert not _after_state_loss("u/0/17/score", "t", lost)
