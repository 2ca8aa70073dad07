"""The checkpoint commit order and fencing, with recording fakes for the producer and the consumer."""

from __future__ import annotations

import threading

import pytest

from connectors.protocols import Record
from connectors.redis_store import RedisStateStore
from pipeline.service.checkpoint import Checkpointer
from pipeline.service.engine import Engine
from pipeline.service.partition import PartitionState, Residency
from pipeline.settings import load_settings


class Journal(list):
    """Shared, ordered log of what the fakes and the store were asked to do."""


class FakeSink:
    def __init__(self, journal):
        self.journal = journal

    def flush(self, timeout_s):
        self.journal.append("flush")


class FakeSource:
    def __init__(self, journal):
        self.journal = journal

    def commit(self, offsets):
        self.journal.append(("commit", dict(offsets)))


class JournalStore(RedisStateStore):
    def __init__(self, client, journal):
        super().__init__(client, key_prefix="t")
        self.journal = journal

    def write_checkpoint(self, partition_id, epoch, snapshots, manifest, *, reuse=()):
        assert not isinstance(snapshots, dict), "snapshots must arrive lazily, one blob at a time"
        pairs = []
        for key, blob in snapshots:  # serialized one by one, as the store asks for them
            self.journal.append(("serialized", key))
            pairs.append((key, blob))
        self.journal.append(("write", sorted(k for k, _ in pairs), sorted(reuse), manifest["next_offset"]))
        return super().write_checkpoint(partition_id, epoch, pairs, manifest, reuse=reuse)


@pytest.fixture
def setup(text_lm, fake_redis):
    def make(max_resident=8):
        journal = Journal()
        store = JournalStore(fake_redis(), journal)
        settings = load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                                 service={"max_resident_streams": max_resident})
        engine = Engine(text_lm, settings)
        epoch = store.claim("in:0")
        part = PartitionState("in", 0, epoch, engine, store, Residency(engine.backend.slots),
                              store.read_manifest("in:0"))
        return (
            journal,
            store,
            engine,
            part,
            Checkpointer(FakeSource(journal), FakeSink(journal), store, settings.checkpoint),
        )

    return make


def _feed(part, start, keys):
    for i, key in enumerate(keys):
        record = Record("in", 0, start + i, key.encode(), f"line {start + i} of {key}\n".encode(), {}, 0)
        part.session(key).process(record)
        part.published(key, record.offset)


def _checkpoint(cp, part):
    return cp.checkpoint_now(part, "test", timeout_s=30)


def test_commit_order_and_only_changed_streams_are_rewritten(setup):
    journal, store, engine, part, cp = setup()
    _feed(part, 0, ["a", "b", "a"])
    assert _checkpoint(cp, part)
    assert journal == ["flush", ("serialized", "a"), ("serialized", "b"), ("write", ["a", "b"], [], 3),
                       ("commit", {("in", 0): 3})]
    journal.clear()
    _feed(part, 3, ["b"])
    assert _checkpoint(cp, part)
    assert journal == ["flush", ("serialized", "b"), ("write", ["b"], ["a"], 4), ("commit", {("in", 0): 4})]
    doc = store.read_manifest("in:0")
    assert doc["manifest"]["next_offset"] == 4 and sorted(doc["snapshots"]) == ["a", "b"]


def test_nothing_new_means_no_checkpoint(setup):
    journal, _, _, part, cp = setup()
    assert _checkpoint(cp, part) and journal == []


def test_fenced_owner_is_told_to_drop_the_partition(setup):
    journal, store, engine, part, cp = setup()
    _feed(part, 0, ["a"])
    store.claim("in:0")  # another process took the partition over
    assert _checkpoint(cp, part) is False and part.fenced
    assert store.read_manifest("in:0") is None  # nothing of the zombie's became visible
    assert ("commit", {("in", 0): 1}) not in journal


def test_spilled_sessions_come_back_and_are_checkpointed(setup):
    journal, store, engine, part, cp = setup(max_resident=1)
    _feed(part, 0, ["a", "b", "c", "a"])  # residency 1: every switch spills the previous stream
    assert set(part.sessions) == {"a"} and part.spilled == {"a", "b", "c"}
    assert part.sessions["a"].counters.lines_seen == 2  # "a" came back from its spill with its history
    assert _checkpoint(cp, part)
    assert journal[2] == ("write", ["a"], ["b", "c"], 4)
    assert sorted(store.read_manifest("in:0")["snapshots"]) == ["a", "b", "c"]


def test_the_snapshot_is_the_state_at_capture_while_the_session_moves_on(setup):
    """Step 2 runs on the writer thread: what it writes is the session as of the capture, not as of the write."""
    journal, store, engine, part, cp = setup()
    _feed(part, 0, ["a", "a"])
    expected = part.sessions["a"].snapshot()
    gate, entered = threading.Event(), threading.Event()
    write = store.write_checkpoint

    def slow_write(*args, **kwargs):
        entered.set()
        assert gate.wait(30)
        return write(*args, **kwargs)

    store.write_checkpoint = slow_write
    assert cp.start(part, "test")
    assert entered.wait(30)
    _feed(part, 2, ["a"])  # the model thread goes on while the writer is busy
    gate.set()
    cp.collect(wait_for=part, timeout_s=30)
    doc = store.read_manifest("in:0")
    assert doc["manifest"]["next_offset"] == 2
    assert store.read_snapshot(doc["snapshots"]["a"]) == expected
    assert "a" in part.dirty and part.records_since_checkpoint == 1  # the third record still needs a checkpoint


def test_a_checkpoint_holds_a_bounded_number_of_captures(text_lm, monkeypatch):
    """Captures go to the writer through a queue of checkpoint.max_inflight_snapshots: with 6 changed streams and
    a bound of 1, never more than 1 queued + 1 waiting to be queued + 1 being serialized exist at once."""
    from connectors.memory import MemoryStore
    from pipeline.service import session as session_module

    settings = load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                             checkpoint={"max_inflight_snapshots": 1}, service={"max_resident_streams": 8})
    engine = Engine(text_lm, settings)
    store = MemoryStore()
    part = PartitionState("in", 0, store.claim("in:0"), engine, store, Residency(engine.backend.slots), None)
    _feed(part, 0, ["a", "b", "c", "d", "e", "f"])
    import threading

    alive, peak, done = [0], [0], [0]
    changed = threading.Condition()
    real_capture, real_serialize = session_module.StreamSession.capture, session_module.SessionCapture.serialize

    def capture(self):
        with changed:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            changed.notify_all()
        return real_capture(self)

    def serialize(self):
        # A slow writer: it starts only once the model thread got as far as the bound lets it (1 being
        # serialized, 1 queued, 1 captured and waiting to be queued), or as far as the streams left allow.
        with changed:
            assert changed.wait_for(lambda: alive[0] >= min(3, 6 - done[0]), timeout=30), (alive, done)
        blob = real_serialize(self)
        with changed:
            alive[0] -= 1
            done[0] += 1
        return blob

    monkeypatch.setattr(session_module.StreamSession, "capture", capture)
    monkeypatch.setattr(session_module.SessionCapture, "serialize", serialize)
    journal = Journal()
    cp = Checkpointer(FakeSource(journal), FakeSink(journal), store, settings.checkpoint)
    assert cp.checkpoint_now(part, "test", timeout_s=30)
    assert sorted(store.read_manifest("in:0")["snapshots"]) == ["a", "b", "c", "d", "e", "f"]
    assert 2 <= peak[0] <= 3, peak[0]
