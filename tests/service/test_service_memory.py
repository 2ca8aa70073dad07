"""The service runs on any connectors that keep the protocols: here the in-memory ones, no broker or Redis."""

from __future__ import annotations

import ast
from pathlib import Path

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service.service import Service
from pipeline.service.session import Engine
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
