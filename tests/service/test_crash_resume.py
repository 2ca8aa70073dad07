"""In-process crash tests in the bytewax style: hypothesis picks the poll at which the source aborts (a crash:
nothing reaches the store or the output topic after it), a fresh `Service` resumes on the same `MemoryStore`,
and the output of both, replayed copies included, is compared byte for byte with an uninterrupted run.

The real-process counterpart (SIGKILL of `sinkstream run` on the real broker and Redis) is
`tests/service/test_service_integration.py`.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from connectors.protocols import PartitionCallbacks, Source
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


class Crash(BaseException):
    """The process dies here (a BaseException: no handler of the service takes it for an ordinary error)."""


def _settings(every_records: int = 4, max_poll_records: int = 5, batch_tokens: int = 2048, resident: int = 64):
    return load_settings(None, **{
        "cache": {"sinks": 4, "window": 32, "chunk": 16},
        "kafka": {"output_topic": "out", "max_poll_records": max_poll_records},
        "checkpoint": {"every_records": every_records, "every_seconds": 3600},
        "service": {"batch_tokens": batch_tokens, "max_resident_streams": resident},
    })


def _topic() -> MemoryTopic:
    topic = MemoryTopic("in", partitions=2)
    for i in range(20):  # three streams over two partitions; every record ends mid-line, the next one ends it
        key = (b"a", b"b", b"c")[i % 3]
        topic.append(i % 2, key, f" {i * 7} bytes\nGET /item/{i} 200".encode())
    return topic


def _run(lm, settings, topic, store, sink, crash_at: int | None = None) -> None:
    """One service process; with `crash_at`, it dies at that poll: the store and the output topic see nothing
    more (annotations not yet flushed are lost, as a killed producer loses them)."""
    memory = MemorySource.factory(topic)

    def factory(callbacks: PartitionCallbacks) -> Source:
        source = memory(callbacks)
        polls = [0]
        real_poll = source.poll

        def poll(max_records: int, timeout_s: float):
            polls[0] += 1
            if crash_at is not None and polls[0] == crash_at:
                store.down = True  # nothing durable happens after the crash
                sink.pending.clear()  # what the producer had not delivered is gone
                raise Crash(f"killed at poll {crash_at}")
            return real_poll(max_records, timeout_s)

        source.poll = poll  # type: ignore[method-assign]
        return source

    service = Service(settings, Engine(lm, settings), factory, sink, store)
    try:
        service.run(idle_exit_s=0.2, install_signals=False)
    except Crash:
        pass
    store.down = False


_EXPECTED: dict[int, list[bytes]] = {}


def _expected(lm) -> list[bytes]:
    """The uninterrupted run, every stream resident throughout (no snapshot is ever read back)."""
    if id(lm) not in _EXPECTED:
        sink = MemorySink()
        _run(lm, _settings(), _topic(), MemoryStore(), sink)
        _EXPECTED[id(lm)] = [r.value for r in sink.sent]
    return _EXPECTED[id(lm)]


@hsettings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(crash_at=st.integers(1, 14), every_records=st.sampled_from([2, 3, 7]), max_poll_records=st.integers(1, 8),
       batch_tokens=st.sampled_from([16, 64, 2048]), resident=st.sampled_from([1, 2, 64]))
def test_a_crash_at_any_poll_resumes_byte_identically(text_lm, one_thread, crash_at, every_records, max_poll_records,
                                                      batch_tokens, resident):
    expected = _expected(text_lm)
    by_id = {json.loads(v)["id"]: v for v in expected}
    assert len(by_id) == len(expected) >= 20
    settings = _settings(every_records, max_poll_records, batch_tokens, resident)
    topic, store = _topic(), MemoryStore()
    first, second = MemorySink(), MemorySink()
    _run(text_lm, settings, topic, store, first, crash_at=crash_at)
    assert all(json.loads(r.value)["id"] in by_id for r in first.sent)
    resume = {p: (store.read_manifest(f"in:{p}") or {"manifest": {"next_offset": 0}})["manifest"]["next_offset"]
              for p in (0, 1)}
    _run(text_lm, settings, topic, store, second)
    got = [r.value for r in first.sent + second.sent]
    assert {json.loads(v)["id"] for v in got} == set(by_id)  # nothing lost
    for value in got:  # every copy, replayed ones included, is the uninterrupted run's byte for byte
        assert value == by_id[json.loads(value)["id"]]
    # the second process resumed from the checkpoints, not from the start
    assert all(a["source"]["offset"] >= resume[a["source"]["partition"]] for a in second.values("out"))
