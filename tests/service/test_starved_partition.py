"""Issue 19's invariant under KV-slot pressure: a partition that Kafka assigns to this member is processed, or the
process exits non-zero; it is never held idle.

The soak (docs/robustness.md) ran 3 resident KV slots for 3 partitions plus churn keys with checkpoints in
flight: partitions were blocked on "no KV slot" (paused, sought back, resumed after the retry delay), and after
that the Kafka client (kafka-python 3) fetched two of them no more while the third kept flowing. The service
itself retried correctly, but nothing noticed that a resumed partition with records waiting got none. This test
drives the same pressure through the in-memory connectors, with a source that starves a partition after its
resume the way the client did: the service must exit non-zero (a restart rejoins the group and resumes from the
checkpoints) instead of idling with the partition assigned.
"""

from __future__ import annotations

import time

import pytest

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service.engine import Engine
from pipeline.service.service import PartitionHeldIdle, Service
from pipeline.settings import load_settings


class StarvingSource(MemorySource):
    """A `MemorySource` that, like the Kafka client in the soak, delivers nothing more of a partition once it was
    paused and resumed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starved: set = set()
        self.resumes = 0

    def resume(self, partitions):
        was_paused = [tp for tp in partitions if tp in self.paused]  # resuming a fetching partition changes nothing
        super().resume(partitions)
        self.starved.update(was_paused)
        self.resumes += bool(was_paused)

    def poll(self, max_records, timeout_s):
        paused = set(self.paused)
        self.paused |= self.starved
        try:
            return super().poll(max_records, timeout_s)
        finally:
            self.paused = paused


class SlowStore(MemoryStore):
    """Checkpoint writes take a while, so a checkpoint is in flight when a partition needs a KV slot (a session
    of a partition whose checkpoint is in flight cannot be spilled)."""

    def write_checkpoint(self, *args, **kwargs):
        time.sleep(0.02)
        return super().write_checkpoint(*args, **kwargs)


def _settings():
    return load_settings(None, **{
        "cache": {"sinks": 4, "window": 32, "chunk": 16},
        "kafka": {"output_topic": "out", "max_poll_records": 4, "max_poll_interval_ms": 1000},
        "service": {"batch_tokens": 8, "max_resident_streams": 3},
        "checkpoint": {"every_records": 2, "every_seconds": 3600, "retry_initial_s": 0.01, "retry_max_s": 0.05}})


def _topic(per_partition=12):
    """3 partitions, each with its own stream and a fresh churn key every third record: more live streams than
    the 3 resident KV slots."""
    topic = MemoryTopic("in", partitions=3)
    for i in range(per_partition):
        for p in range(3):
            key = f"p{p}" if i % 3 else f"churn{p}-{i}"
            topic.append(p, key.encode(), f"INFO request {i} served in {i % 7} ms\n".encode())
    return topic


def _run(lm):
    settings = _settings()
    topic, sink = _topic(), MemorySink()
    sources = []

    def build(callbacks):
        source = StarvingSource(topic, callbacks=callbacks)
        sources.append(source)
        return source

    service = Service(settings, Engine(lm, settings), build, sink, SlowStore())
    return service, sources[0], sink, topic


def _annotated(sink):
    return {(a["source"]["partition"], a["source"]["offset"]) for a in sink.values("out") if a["kind"] != "closed"}


def test_a_partition_the_source_never_delivers_again_makes_the_process_exit(text_lm):
    service, source, sink, topic = _run(text_lm)
    with pytest.raises(PartitionHeldIdle, match=r"the source delivered none of its records"):
        service.run(idle_exit_s=5.0, install_signals=False)
    assert source.resumes
    assert len(_annotated(sink)) < sum(len(p) for p in topic.partitions)
