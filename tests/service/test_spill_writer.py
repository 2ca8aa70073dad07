"""Spills go through the checkpoint writer thread, off the model thread (issue 17): the model thread captures a cold
session and frees its KV slot; the writer serializes and writes it. A stream that comes back before its spill is
confirmed takes the capture back, a failed spill is written again later, and none of it changes a byte of output."""

from __future__ import annotations

import threading

from connectors.errors import StateStoreError
from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service import annotations as ann
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


class _GatedStore(MemoryStore):
    """A MemoryStore whose `spill` records the calling thread, can be held, and can fail its first calls."""

    def __init__(self, fail_first: int = 0):
        super().__init__()
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_first = fail_first

    def spill(self, partition_id, epoch, stream_key, blob):
        self.threads.append(threading.current_thread().name)
        self.gate.wait(30)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise StateStoreError("injected: the store did not answer")
        return super().spill(partition_id, epoch, stream_key, blob)


def _settings():
    return load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                         kafka={"output_topic": "out", "max_poll_records": 64},
                         service={"max_resident_streams": 2, "batch_tokens": 8},  # about a record a group
                         checkpoint={"every_records": 6, "every_seconds": 3600, "retry_initial_s": 0.01,
                                     "retry_max_s": 0.05})


def _topic():
    topic = MemoryTopic("in")
    for i in range(24):
        topic.append(0, f"k{i % 4}".encode(), f"GET /item/{i} 200\n".encode())
    return topic


def _run(lm, store, topic, before_run=None):
    settings = _settings()
    sink = MemorySink()
    service = Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, store)
    if before_run is not None:
        before_run(service)
    assert service.run(idle_exit_s=0.3, install_signals=False) == 0
    return [ann.encode(a) for a in sink.values("out")], service


def test_spills_are_written_by_the_writer_thread_and_change_no_byte(text_lm, one_thread):
    reference, _ = _run(text_lm, MemoryStore(), _topic())
    store = _GatedStore()
    got, _ = _run(text_lm, store, _topic())
    assert got == reference
    assert store.threads and set(store.threads) == {"checkpoint-writer"}


def test_a_stream_back_before_its_spill_is_written_takes_the_capture_back(text_lm, one_thread, monkeypatch):
    """The writer is held for a second after its first spill: spills stay unconfirmed, streams come back and are
    taken back from their captures (no store read); output identical, and the first checkpoint waits for the
    writer to confirm them."""
    from pipeline.service.partition import PartitionState

    reference, _ = _run(text_lm, MemoryStore(), _topic())
    store = _GatedStore()
    store.gate.clear()
    real_spill, real_take_back, taken_back = store.spill, PartitionState._take_back, []

    def spill(*args):
        if len(store.threads) == 0:
            threading.Timer(1.0, store.gate.set).start()
        return real_spill(*args)

    def take_back(self, pending):
        taken_back.append(pending.key)
        return real_take_back(self, pending)

    store.spill = spill  # type: ignore[method-assign]
    monkeypatch.setattr(PartitionState, "_take_back", take_back)
    got, service = _run(text_lm, store, _topic())
    assert got == reference
    assert taken_back, "no stream came back while its spill was unconfirmed"
    assert all(not p.spilling for p in service.parts.values())


def test_a_failed_spill_is_written_again_and_nothing_is_lost(text_lm, one_thread):
    reference, _ = _run(text_lm, MemoryStore(), _topic())
    store = _GatedStore(fail_first=3)
    got, _ = _run(text_lm, store, _topic())
    assert got == reference
    assert store.fail_first == 0 and len(store.threads) > 3
    # The final checkpoint covers every record: a restart replays nothing.
    again, _ = _run(text_lm, store, _topic())
    assert again == []


class _Capture:
    def serialize(self) -> bytes:
        return b"blob"


class _Part:
    """What `Checkpointer.spill` reads of a partition: its id, epoch and unconfirmed spills."""

    def __init__(self, name: str):
        self.id, self.epoch, self.spilling = name, 1, {}


def test_at_most_max_inflight_snapshots_spills_are_unconfirmed():
    """Unconfirmed spills hold their captures in host memory: past `checkpoint.max_inflight_snapshots` of them
    (over all partitions) a spill is refused and the session stays resident; one taken back frees its place."""
    from pipeline.service.checkpoint import Checkpointer
    from pipeline.service.partition import PendingSpill
    from pipeline.settings import CheckpointSettings

    store = _GatedStore()
    store.gate.clear()  # the writer holds the first write: nothing is confirmed
    checkpointer = Checkpointer(None, MemorySink(), store,  # type: ignore[arg-type]  # spills read no source
                                CheckpointSettings(max_inflight_snapshots=2))
    a, b = _Part("in:0"), _Part("in:1")

    def spill(part: _Part, key: str) -> bool:
        pending = PendingSpill(key, _Capture(), None)  # type: ignore[arg-type]
        ok = checkpointer.spill(part, pending)  # type: ignore[arg-type]
        if ok:  # as PartitionState.spill does
            part.spilling[key] = pending
        return ok

    try:
        assert spill(a, "k1") and spill(b, "k2")
        assert not spill(a, "k3")  # two unconfirmed, over both partitions
        a.spilling.pop("k1").cancelled = True  # the stream came back (PartitionState._take_back)
        assert spill(a, "k3")
        assert not spill(b, "k4")
    finally:
        store.gate.set()
        checkpointer.close()
