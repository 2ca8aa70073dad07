"""Issue 19 items 1-2 on the in-memory connectors: the state store losing a partition's state (FLUSHALL, an empty
replica, eviction) is not fencing. The service claims a fresh epoch, re-checkpoints the sessions it holds and
goes on; streams whose context is gone say so with a `context_reset` error before their next score; a partition
Kafka still assigns after a genuine fence makes the process exit instead of idling.

The same FLUSHALL runs against the real broker and Redis in `test_state_loss_integration.py`.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service import annotations as ann
from pipeline.service import metrics
from pipeline.service.engine import Engine
from pipeline.service.service import PartitionHeldIdle, Service
from pipeline.settings import load_settings


def _settings(**over):
    base = {"cache": {"sinks": 4, "window": 32, "chunk": 16},
            "kafka": {"output_topic": "out", "max_poll_records": 64},
            "service": {"batch_tokens": 8, "max_resident_streams": 2},  # about one record a group; 3 streams spill
            "checkpoint": {"every_records": 4, "every_seconds": 3600, "retry_initial_s": 0.01, "retry_max_s": 0.05}}
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return load_settings(None, **base)


def _fill(topic, n, start=0):
    for i in range(start, start + n):
        topic.append(0, f"k{i % 3}".encode(), f"INFO request {i} served in {i % 7} ms\n".encode())


def _service(lm, settings, topic, sink, store, committed=None):
    factory = MemorySource.factory(topic)

    def build(callbacks):
        source = factory(callbacks)
        source.committed.update(committed or {})
        return source

    return Service(settings, Engine(lm, settings), build, sink, store)


def _flush_after(service, store, published, sink):
    """Flush the store once `published` annotations are out (between two groups, as FLUSHALL would land)."""
    original = service._run_group
    done = []

    def run_group(works):
        original(works)
        if not done and len(sink.pending) + len(sink.sent) >= published:
            store.flush_all()
            done.append(True)

    service._run_group = run_group
    return done


def _losses() -> float:
    return metrics.STATE_LOSSES._value.get()


def test_flushall_mid_run_reclaims_recheckpoints_and_tells_streams_that_lost_context(text_lm):
    settings = _settings()
    topic, store = MemoryTopic("in"), MemoryStore()
    _fill(topic, 30)
    straight = MemorySink()
    _service(text_lm, settings, topic, straight, MemoryStore()).run(idle_exit_s=0.2, install_signals=False)
    sink = MemorySink()
    service = _service(text_lm, settings, topic, sink, store)
    flushed = _flush_after(service, store, 10, sink)
    before = _losses()
    with capture_logs() as logs:  # whatever logging an earlier test configured (stdout or stderr)
        assert service.run(idle_exit_s=0.3, install_signals=False) == 0
    assert flushed
    values = sink.values("out")
    for a in values:
        ann.validate(a)
    scores = [a["source"]["offset"] for a in values if a["kind"] == "score"]
    assert scores == list(range(30))  # every offset annotated once, in order: nothing lost, nothing held
    assert _losses() - before == 1
    assert "state.lost" in [entry["event"] for entry in logs]
    resets = [a for a in values if a["kind"] == "error"]
    # The streams that were only in the store (one of three: two stay resident) start afresh and say so with
    # their next record, before its score; resident streams keep their context and never get a notice.
    assert len(resets) == 1
    notice = resets[0]
    assert notice["error"]["problems"][0]["reason"] == "context_reset"
    assert notice["error"]["problems"][0]["message"].startswith(("state_lost:", "snapshot_missing:"))
    offset = notice["source"]["offset"]
    score = next(a for a in values if a["kind"] == "score" and a["source"]["offset"] == offset)
    assert score["tokens_seen"] == score["score"]["tokens"]  # its context was reset
    assert offset >= 10 and all(a["stream"] != notice["stream"] or a["source"]["offset"] < 10 or
                                a["source"]["offset"] >= offset for a in values)
    # Every other annotation is the uninterrupted run's, byte for byte (the other streams kept their context).
    reset_stream = notice["stream"]
    same = [ann.encode(a) for a in values if a["kind"] == "score" and
            (a["stream"] != reset_stream or a["source"]["offset"] < offset)]
    expected = [ann.encode(a) for a in straight.values("out") if
                a["stream"] != reset_stream or a["source"]["offset"] < offset]
    assert same == expected
    # The re-claimed partition was checkpointed again, at its end, under an epoch above the lost one.
    doc = store.read_manifest("in:0")
    assert doc["manifest"]["next_offset"] == 30 and doc["epoch"] >= 2
    assert "context_resets" not in doc["manifest"]


def test_flushall_while_every_stream_is_resident_changes_not_one_byte(text_lm):
    """FLUSHALL while the service is idle and holds every stream: the next checkpoint finds the epoch gone, the
    partition is claimed afresh and its sessions written again; no stream lost context, so the output is the
    uninterrupted run's, byte for byte, and the manifest ends at the last offset."""
    settings = _settings(service={"max_resident_streams": 3})
    whole, straight = MemoryTopic("in"), MemorySink()
    _fill(whole, 24)
    _service(text_lm, settings, whole, straight, MemoryStore()).run(idle_exit_s=0.2, install_signals=False)
    topic, store, sink = MemoryTopic("in"), MemoryStore(), MemorySink()
    _fill(topic, 12)
    service = _service(text_lm, settings, topic, sink, store)
    original = service._poll
    state = {"flushed": False}

    def poll():
        records = original()
        part = service.parts.get(("in", 0))
        if not records and not state["flushed"] and part is not None and part.next_offset == 12 \
                and part.in_flight is None and not part.records_since_checkpoint:
            store.flush_all()  # idle, everything checkpointed: then Redis forgets it all
            state["flushed"] = True
            _fill(topic, 12, start=12)
        return records

    service._poll = poll
    before = _losses()
    assert service.run(idle_exit_s=0.3, install_signals=False) == 0
    assert state["flushed"] and _losses() - before == 1
    assert [ann.encode(a) for a in sink.values("out")] == [ann.encode(a) for a in straight.values("out")]
    doc = store.read_manifest("in:0")
    assert doc["manifest"]["next_offset"] == 24 and sorted(doc["snapshots"]) == ["k0", "k1", "k2"]


def test_restart_without_a_checkpoint_but_with_a_committed_offset_resets_every_stream(text_lm):
    settings = _settings(service={"max_resident_streams": 3})
    topic, store = MemoryTopic("in"), MemoryStore()
    _fill(topic, 9)
    first = _service(text_lm, settings, topic, MemorySink(), store)
    first.run(idle_exit_s=0.2, install_signals=False)
    committed = dict(first.source.committed)
    assert committed == {("in", 0): 9}
    store.flush_all()  # the process is gone and so is Redis' state; the group's offset survives in Kafka
    _fill(topic, 6, start=9)
    sink = MemorySink()
    before = _losses()
    assert _service(text_lm, settings, topic, sink, store, committed).run(idle_exit_s=0.2,
                                                                          install_signals=False) == 0
    values = sink.values("out")
    assert _losses() - before == 1
    assert sorted({a["source"]["offset"] for a in values}) == list(range(9, 15))
    for key in ("k0", "k1", "k2"):  # each stream's first record after the loss carries the notice, then scores
        mine = [a for a in values if a["stream"] == key]
        assert [a["kind"] for a in mine[:2]] == ["score", "error"]
        assert mine[1]["error"]["problems"][0]["reason"] == "context_reset"
        assert "committed offset 9" in mine[1]["error"]["problems"][0]["message"]
        assert all(a["kind"] == "score" for a in mine[2:])


def test_pending_notices_survive_a_restart_in_the_checkpoint(text_lm):
    """A stream reset by a state loss that has no record before the next checkpoint still gets its notice after
    a restart: pending notices are part of the manifest."""
    settings = _settings()
    topic, store = MemoryTopic("in"), MemoryStore()
    for i in range(6):
        topic.append(0, f"k{i % 3}".encode(), f"line {i}\n".encode())  # k0 k1 k2 k0 k1 k2; k0 spilled at the end
    service = _service(text_lm, settings, topic, MemorySink(), store)
    service.run(idle_exit_s=0.2, install_signals=False)
    sink = MemorySink()
    service = _service(text_lm, settings, topic, sink, store)
    for i in range(6, 10):
        topic.append(0, b"k1", f"line {i}\n".encode())  # only k1 comes back before the stop
    flushed = _flush_after(service, store, 1, sink)
    service.run(idle_exit_s=0.3, install_signals=False)
    assert flushed
    pending = store.read_manifest("in:0")["manifest"].get("context_resets", {})
    assert set(pending) == {"k0", "k2"}  # restored lazily in the second run, so both lived only in the store
    topic.append(0, b"k0", b"line 10\n")
    later = MemorySink()
    _service(text_lm, settings, topic, later, store).run(idle_exit_s=0.2, install_signals=False)
    kinds = [(a["stream"], a["kind"]) for a in later.values("out")]
    assert kinds == [("k0", "score"), ("k0", "error")]
    assert later.values("out")[1]["error"]["problems"][0]["message"].startswith("state_lost:")


def test_an_evicted_blob_is_state_loss_not_a_retry_loop(text_lm):
    """allkeys-lru evicted one snapshot that the next checkpoint reuses: the partition is claimed afresh, the
    stream it belonged to is reset with a notice, and nothing stalls."""
    settings = _settings(service={"max_resident_streams": 3})
    topic, store = MemoryTopic("in"), MemoryStore()
    _fill(topic, 9)
    _service(text_lm, settings, topic, MemorySink(), store).run(idle_exit_s=0.2, install_signals=False)
    for i in range(9, 17):
        topic.append(0, b"k1", f"INFO request {i}\n".encode())  # only k1 changes; k0 and k2 are reused
    topic.append(0, b"k0", b"INFO request 17\n")
    sink = MemorySink()
    service = _service(text_lm, settings, topic, sink, store)
    original = service._run_group
    evicted = []

    def run_group(works):
        original(works)
        if not evicted:
            del store.blobs[store.read_manifest("in:0")["snapshots"]["k2"]]
            evicted.append(True)

    service._run_group = run_group
    assert service.run(idle_exit_s=0.3, install_signals=False) == 0
    assert [a["source"]["offset"] for a in sink.values("out") if a["kind"] == "score"] == list(range(9, 18))
    doc = store.read_manifest("in:0")
    assert doc["manifest"]["next_offset"] == 18 and doc["manifest"]["context_resets"] == {
        "k2": doc["manifest"]["context_resets"]["k2"]}
    assert "state_lost" in doc["manifest"]["context_resets"]["k2"]


def test_a_fenced_partition_that_kafka_keeps_assigning_exits_non_zero(text_lm):
    settings = _settings(kafka={"max_poll_interval_ms": 1500})
    topic, store = MemoryTopic("in"), MemoryStore()
    _fill(topic, 12)
    service = _service(text_lm, settings, topic, MemorySink(), store)
    original = service._run_group

    def run_group(works):
        original(works)
        if works[-1].record.offset == 2:
            store.claim("in:0")  # another owner, as far as the store can tell; Kafka never revokes

    service._run_group = run_group
    with pytest.raises(PartitionHeldIdle, match="still assigns it"):
        service.run(idle_exit_s=30, install_signals=False)
