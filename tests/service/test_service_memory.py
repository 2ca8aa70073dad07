"""The service runs on any connectors that keep the protocols: here the in-memory ones, no broker or Redis."""

from __future__ import annotations

import ast
from pathlib import Path

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings

SERVICE = Path(__file__).resolve().parents[2] / "pipeline" / "service" / "service.py"


def _settings():
    return load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                         kafka={"output_topic": "out"}, checkpoint={"every_records": 2})


def _topic():
    topic = MemoryTopic("in", partitions=2)
    for i in range(6):
        topic.append(i % 2, f"s{i % 3}".encode(), f"line {i} of the stream\nanother line {i}\n".encode())
    return topic


def test_service_processes_publishes_and_checkpoints_through_injected_connectors(text_lm):
    settings, topic, sink, store = _settings(), _topic(), MemorySink(), MemoryStore()
    service = Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), sink, store)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    published = sink.values("out")
    assert {a["kind"] for a in published} == {"score"}
    assert len(published) == 6 and all(a["score"]["tokens"] > 0 for a in published)  # one per record
    assert sum(len(a["score"]["lines"]) for a in published) == 12  # two lines per record
    for partition in (0, 1):
        doc = store.read_manifest(f"in:{partition}")
        assert doc["manifest"]["next_offset"] == 3, doc
    assert service.source.committed == {("in", 0): 3, ("in", 1): 3}


def test_a_second_service_resumes_from_the_checkpoint_and_fences_the_first(text_lm):
    settings, topic, store = _settings(), _topic(), MemoryStore()
    first = Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), MemorySink(), store)
    first.run(idle_exit_s=0.2, install_signals=False)
    topic.append(0, b"s0", b"one more line\n")
    sink = MemorySink()
    second = Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), sink, store)
    second.run(idle_exit_s=0.2, install_signals=False)
    assert len(sink.values("out")) == 1  # only the new record: the others were checkpointed by the first
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == 4 and store.epochs["in:0"] == 2


def test_service_module_imports_no_concrete_connector_and_no_devstack():
    imported = set()
    for node in ast.walk(ast.parse(SERVICE.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {m for m in imported if m.startswith(("connectors.kafka", "connectors.redis", "connectors.memory",
                                                      "pipeline.devstack", "kafka", "redis"))}, imported


def _memory_topic():
    """Two partitions, two streams each, lines of a few templates and some rare ones (issue 18)."""
    topic = MemoryTopic("in", partitions=2)
    shapes = ["INFO request {i} served in {ms} ms", "DEBUG heartbeat {i} ok", "WARN disk {ms}% full on sda{i}",
              "ERROR worker {i} died with code {ms}", "INFO user u{i} logged in from 10.0.0.{ms}"]
    for i in range(48):
        lines = [shapes[(i * 7 + j * 3) % (5 if i % 6 else 3)].format(i=i + j, ms=(i * 13 + j) % 97) for j in range(4)]
        if i % 11 == 5:
            lines.append(f"PANIC kernel oops number {i} in module zz{i % 3}")
        topic.append(i % 2, f"k{i % 4}".encode(), ("\n".join(lines) + "\n").encode())
    return topic


def _memory_settings(reference):
    return load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                         kafka={"output_topic": "out", "max_poll_records": 4},
                         checkpoint={"every_records": 3, "every_seconds": 3600},
                         service={"max_resident_streams": 2, "batch_tokens": 64},
                         score={"alert_rate": 0.1, "alert_warmup_lines": 8, "warmup_lines": 4},
                         templates={"reference": str(reference), "partition_max_clusters": 4,
                                    "stream_max_clusters": 3})


def test_a_service_crashed_mid_way_and_resumed_by_a_fresh_one_publishes_the_same_bytes(text_lm, one_thread, tmp_path):
    """Issue 18: templates (both scopes, a reference, LRU eviction), combined scores, alerts and verdicts on:
    a service that dies mid-way (no final checkpoint, unflushed annotations lost) and a fresh Service resuming
    from the store publish, after duplicates are dropped by id, exactly the bytes of an uninterrupted run."""
    import json

    reference = tmp_path / "normal.txt"
    reference.write_text("INFO request 1 served in 2 ms\nDEBUG heartbeat 3 ok\n")
    settings = _memory_settings(reference)
    topic = _memory_topic()
    straight = MemorySink()
    Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), straight, MemoryStore()).run(
        idle_exit_s=0.2, install_signals=False)
    expected = {json.loads(r.value)["id"]: r.value for r in straight.sent}
    assert len(expected) == 48
    lines = [x for r in straight.sent for x in json.loads(r.value)["score"]["lines"]]
    assert any(x["alert"] for x in lines) and any(x["template"]["seen_partition"] > 0 for x in lines)
    for crash_at in (5, 19, 37):
        store, first = MemoryStore(), MemorySink()
        crashing = Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), first, store)
        real, calls = first.send, []

        def send(topic_, key, value, headers=None, real=real, calls=calls, crash_at=crash_at):
            calls.append(key)
            if len(calls) == crash_at:
                raise RuntimeError("crash")
            real(topic_, key, value, headers)

        first.send = send  # type: ignore[method-assign]
        try:
            crashing.run(idle_exit_s=0.2, install_signals=False)
        except RuntimeError as exc:
            assert str(exc) == "crash"
        finally:
            crashing.checkpointer.close()
        saved = store.read_manifest("in:0")
        if crash_at > 5:  # (the first crash comes before any checkpoint)
            assert saved["manifest"]["templates"]["lines"] > 0  # the partition's memory is in its checkpoint
        second = MemorySink()
        Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), second, store).run(
            idle_exit_s=0.2, install_signals=False)
        got: dict[str, bytes] = {}
        for r in first.sent + second.sent:
            doc_id = json.loads(r.value)["id"]
            assert got.setdefault(doc_id, r.value) == r.value, doc_id  # a replay repeats the same bytes
        assert got == expected, crash_at
        assert len(first.sent) < 48 and second.sent
