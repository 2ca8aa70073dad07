"""Issue 19 item 5: `service.session_gap` gives keys a lifecycle. A stream idle that long in the input's own time
(partition offsets here) is closed: its `closed` verdict is published once, its state leaves memory and the store,
and a later record of the key starts afresh with a `context_reset` notice. Closing is decided by the input and the
checkpointed state only, so a crash and replay publishes the same bytes."""

from __future__ import annotations

import pytest

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service import annotations as ann
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


def _settings(**over):
    base = {"cache": {"sinks": 4, "window": 32, "chunk": 16},
            "kafka": {"output_topic": "out", "max_poll_records": 64},
            "service": {"batch_tokens": 8, "session_gap": 5},
            "checkpoint": {"every_records": 4, "every_seconds": 3600}}
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return load_settings(None, **base)


def _service(lm, settings, topic, sink, store):
    return Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, store)


def _churn(topic, keys, per_key=2, start=0):
    """`keys` short sessions one after the other (each key's records together), then nothing more of them."""
    for k in range(start, start + keys):
        for i in range(per_key):
            topic.append(0, f"key{k}".encode(), f"GET /item/{k}/{i} 200 in {k % 7} ms\n".encode())


def test_idle_streams_close_once_with_their_verdict_and_leave_no_state(text_lm):
    settings = _settings()
    topic, sink, store = MemoryTopic("in"), MemorySink(), MemoryStore()
    _churn(topic, 8)  # offsets 0..15: key k at 2k, 2k+1
    assert _service(text_lm, settings, topic, sink, store).run(idle_exit_s=0.2, install_signals=False) == 0
    values = sink.values("out")
    for a in values:
        ann.validate(a)
    closed = [a for a in values if a["kind"] == "closed"]
    # key k's last record is at 2k+1; the partition reaches 2k+1+5 = 2k+6 at key k+3's first record: closed there.
    assert [(a["stream"], a["source"]["offset"]) for a in closed] == [(f"key{k}", 2 * k + 6) for k in range(5)]
    scores = {a["source"]["offset"]: a for a in values if a["kind"] == "score"}
    for a in closed:
        k = int(a["stream"][3:])
        v = a["closed"]["verdict"]
        assert a["id"] == f"in/0/{2 * k + 6}/closed/key{k}" and a["closed"]["idle"] == 5
        assert (v["records"], v["first_offset"], v["last_offset"]) == (2, 2 * k, 2 * k + 1)
        mine = [scores[2 * k], scores[2 * k + 1]]
        assert v["lines"] == 2 and v["tokens"] == sum(s["score"]["tokens"] for s in mine)
        assert a["tokens_seen"] == scores[2 * k + 1]["tokens_seen"]
        zs = [line["z"] for s in mine for line in s["score"]["lines"] if line["z"] is not None]
        assert v["max_z"] == (max(zs) if zs else None)
        assert v["max_line_nll"] == max(line["mean_nll"] for s in mine for line in s["score"]["lines"])
    # Closed keys' state is gone from the store; the three still open are checkpointed.
    doc = store.read_manifest("in:0")
    assert sorted(doc["snapshots"]) == ["key5", "key6", "key7"]
    assert len(store.blobs) == 3 and not any(store.spilled.values())
    assert [k for k, _ in doc["manifest"]["closed"]] == [f"key{k}" for k in range(5)]


def test_a_closed_key_that_comes_back_starts_afresh_with_a_notice(text_lm):
    settings = _settings()
    topic, sink, store = MemoryTopic("in"), MemorySink(), MemoryStore()
    _churn(topic, 5)  # key0 closed at offset 6
    topic.append(0, b"key0", b"GET /item/0/again 200\n")  # offset 10: key0 again
    assert _service(text_lm, settings, topic, sink, store).run(idle_exit_s=0.2, install_signals=False) == 0
    back = [a for a in sink.values("out") if a["source"]["offset"] == 10 and a["stream"] == "key0"]
    assert [a["kind"] for a in back] == ["score", "error"]
    problem = back[1]["error"]["problems"][0]
    assert problem["reason"] == "context_reset" and problem["message"].startswith("session_closed:")
    assert back[0]["tokens_seen"] == back[0]["score"]["tokens"]  # afresh


def test_its_own_late_record_closes_a_stream_first(text_lm):
    """A key whose next record comes after the gap: `closed` (its old session) before that record's score."""
    settings = _settings()
    topic, sink = MemoryTopic("in"), MemorySink()
    topic.append(0, b"a", b"first line\n")
    for i in range(4):
        topic.append(0, b"b", f"b line {i}\n".encode())
    topic.append(0, b"a", b"late line\n")  # offset 5: a was idle 5 records
    _service(text_lm, settings, topic, sink, MemoryStore()).run(idle_exit_s=0.2, install_signals=False)
    at5 = [(a["stream"], a["kind"]) for a in sink.values("out") if a["source"]["offset"] == 5]
    assert at5 == [("a", "closed"), ("a", "score"), ("a", "error")]


@pytest.mark.parametrize("crash_after", [7, 13])
def test_a_crash_and_replay_closes_the_same_sessions_at_the_same_records(text_lm, one_thread, crash_after):
    settings = _settings(service={"max_resident_streams": 2})
    topic = MemoryTopic("in")
    _churn(topic, 10, per_key=2)
    straight = MemorySink()
    _service(text_lm, settings, topic, straight, MemoryStore()).run(idle_exit_s=0.2, install_signals=False)
    store, first = MemoryStore(), MemorySink()
    service = _service(text_lm, settings, topic, first, store)
    original = service._run_group

    def crash(works):
        original(works)
        if works[-1].record.offset >= crash_after:
            raise KeyboardInterrupt("killed")  # like SIGKILL: no final checkpoint below

    service._run_group = crash
    service._final_checkpoint = lambda part, reason: None
    with pytest.raises(KeyboardInterrupt):
        service.run(install_signals=False)
    resumed = store.read_manifest("in:0")["manifest"]["next_offset"]
    assert resumed <= crash_after  # something is replayed
    second = MemorySink()
    _service(text_lm, settings, topic, second, store).run(idle_exit_s=0.2, install_signals=False)
    want = {a["id"]: ann.encode(a) for a in straight.values("out")}
    got: dict[str, set[bytes]] = {}
    for a in first.values("out") + second.values("out"):
        got.setdefault(a["id"], set()).add(ann.encode(a))
    assert set(got) == set(want)
    assert all(copies == {want[i]} for i, copies in got.items())  # replayed copies are byte-identical
    assert sum(1 for i in want if "/closed/" in i) == 7  # every closed key once (key7..key9 still open)
