"""The in-memory connectors keep the protocols' contracts (the service's unit tests rely on them)."""

from __future__ import annotations

import pytest

from connectors.errors import FencedError, MissingSnapshotError, SinkError, SourceError
from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from connectors.protocols import CheckpointStore, PartitionCallbacks, Sink, SnapshotStore, Source, StateStore


def test_memory_connectors_implement_the_protocols():
    assert isinstance(MemorySource(MemoryTopic("t")), Source)
    assert isinstance(MemorySink(), Sink)
    store = MemoryStore()
    assert isinstance(store, StateStore) and isinstance(store, SnapshotStore) and isinstance(store, CheckpointStore)


def test_source_assigns_on_first_poll_seeks_and_revokes_on_close():
    topic = MemoryTopic("in", partitions=2)
    for i in range(5):
        topic.append(i % 2, b"k", f"v{i}".encode())
    events = []

    def on_assign(tps):
        events.append(("assign", tps))
        source.seek("in", 0, 1)  # skip the first record of partition 0, as a restored checkpoint would

    source = MemorySource.factory(topic)(
        PartitionCallbacks(on_assign=on_assign, on_revoke=lambda tps: events.append(("revoke", tps)))
    )
    got = source.poll(10, 0.0)
    assert [(r.partition, r.offset, r.value) for r in got] == [
        (0, 1, b"v2"),
        (0, 2, b"v4"),
        (1, 0, b"v1"),
        (1, 1, b"v3"),
    ]
    assert source.poll(10, 0.0) == []
    source.commit({("in", 0): 3})
    source.close()
    assert events == [("assign", [("in", 0), ("in", 1)]), ("revoke", [("in", 0), ("in", 1)])]
    assert source.committed == {("in", 0): 3}
    with pytest.raises(SourceError, match="expected an open MemorySource"):
        source.poll(1, 0.0)


def test_source_poll_respects_max_records_and_seek_checks_the_assignment():
    topic = MemoryTopic("in")
    for i in range(5):
        topic.append(0, None, str(i).encode())
    source = MemorySource(topic)
    assert [r.offset for r in source.poll(2, 0.0)] == [0, 1]
    assert [r.offset for r in source.poll(2, 0.0)] == [2, 3]
    with pytest.raises(ValueError, match=r"expected other\[0\] to be assigned"):
        source.seek("other", 0, 0)


def test_sink_publishes_only_what_a_flush_acknowledged():
    sink = MemorySink()
    sink.send("out", b"a", b'{"n": 1}')
    assert sink.sent == []
    sink.flush(1.0)
    assert sink.values("out") == [{"n": 1}]
    sink.send("out", b"a", b'{"n": 2}')
    sink.fail_next_flush = True
    with pytest.raises(SinkError, match="1 records acknowledged, all failed"):
        sink.flush(1.0)
    assert sink.values() == [{"n": 1}]


def test_store_fences_a_stale_owner_and_keeps_the_last_checkpoint():
    store = MemoryStore()
    first = store.claim("p")
    doc = store.write_checkpoint("p", first, {"s": b"one"}, {"next_offset": 3})
    second = store.claim("p")
    with pytest.raises(FencedError, match="expected owner epoch 1, but the current epoch is 2"):
        store.write_checkpoint("p", first, {"s": b"zombie"}, {"next_offset": 9})
    with pytest.raises(FencedError):
        store.spill("p", first, "s", b"zombie")
    assert store.read_manifest("p")["manifest"] == {"next_offset": 3}
    assert store.read_snapshot(doc["snapshots"]["s"]) == b"one"
    again = store.write_checkpoint("p", second, {}, {"next_offset": 4}, reuse=["s"])
    assert again["snapshots"] == doc["snapshots"]


def test_store_spills_reuses_and_collects_unreferenced_blobs():
    store = MemoryStore()
    epoch = store.claim("p")
    old = store.write_checkpoint("p", epoch, {"a": b"a1", "b": b"b1"}, {})
    key = store.spill("p", epoch, "a", b"a2")
    assert store.load_spilled("p", "a") == b"a2"
    new = store.write_checkpoint("p", epoch, {"b": b"b2"}, {}, reuse=["a"])
    assert new["snapshots"]["a"] == key
    assert store.read_snapshot(key) == b"a2"
    for stream in ("a", "b"):  # a1 and b1 are no longer referenced (a2 replaced a1, b2 replaced b1): collected
        with pytest.raises(MissingSnapshotError):
            store.read_snapshot(old["snapshots"][stream])
    store.claim("p")  # a new owner: spills of the previous epoch that no manifest references are dropped
    assert store.load_spilled("p", "a") is None


def test_store_consumes_snapshots_lazily_and_can_count_instead_of_keeping_them():
    """Blobs are taken one at a time from an iterable (bounded memory, as the Redis store); a store that counts
    checkpoint blobs (benchmarks) still switches the manifest, but cannot give them back."""
    store = MemoryStore(keep_checkpoint_blobs=False)
    epoch = store.claim("p")
    taken: list[str] = []

    def blobs():
        for name in ("a", "b"):
            taken.append(name)
            yield name, name.encode() * 10

    doc = store.write_checkpoint("p", epoch, blobs(), {"offset": 3})
    assert taken == ["a", "b"] and store.dropped_bytes == 20 and not store.blobs
    assert store.read_manifest("p")["snapshots"] == doc["snapshots"]
    with pytest.raises(MissingSnapshotError):
        store.read_snapshot(doc["snapshots"]["a"])
    kept = MemoryStore()
    with pytest.raises(ValueError, match="both in snapshots and in reuse"):
        kept.write_checkpoint("p", kept.claim("p"), iter([("x", b"1"), ("x", b"2")]), {})


def test_a_checkpoint_drops_the_spill_of_a_stream_it_leaves_out():
    store = MemoryStore()
    epoch = store.claim("p")
    kept = store.spill("p", epoch, "kept", b"k")
    gone = store.spill("p", epoch, "gone", b"g")
    doc = store.write_checkpoint("p", epoch, {}, {}, reuse=["kept"])
    assert doc["snapshots"] == {"kept": kept}
    assert gone not in store.blobs and store.load_spilled("p", "gone") is None
    assert store.load_spilled("p", "kept") == b"k"
