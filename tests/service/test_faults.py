"""Faults and hostile input through the whole service, on the in-memory connectors (no broker, no Redis).

The same scenarios run against the real broker and Redis in `test_faults_integration.py`; here each one is
small and deterministic: an oversized record, a record of newlines, a failing model step, a store outage, a
broken snapshot or manifest, SIGTERM in the middle of a poll, a bug in the middle of a group, an out-of-memory
retry and a failed device (exit, then an exact replay).
"""

from __future__ import annotations

import json
import threading

import pytest
import structlog

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service import annotations as ann
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


def _settings(**over):
    base = {"cache": {"sinks": 4, "window": 32, "chunk": 16}, "kafka": {"output_topic": "out", "max_poll_records": 64},
            "checkpoint": {"every_records": 4, "every_seconds": 3600, "retry_initial_s": 0.01, "retry_max_s": 0.05}}
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return load_settings(None, **base)


def _service(lm, settings, topic, sink=None, store=None):
    sink = MemorySink() if sink is None else sink
    store = MemoryStore() if store is None else store
    return Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, store)


def _by_offset(values, kind=None):
    out = {}
    for a in values:
        if kind is None or a["kind"] == kind:
            out.setdefault(a["source"]["offset"], []).append(a)
    return out


def _normal(topic, n, start=0, key=b"s"):
    for i in range(start, start + n):
        topic.append(0, key, f"INFO request {i} served in {i % 7} ms\n".encode())


def test_hostile_records_get_annotations_within_limits_and_normal_lines_keep_flowing(text_lm):
    settings = _settings(service={"max_record_bytes": 16384, "max_record_tokens": 300, "max_annotation_bytes": 8192,
                                  "max_pending_bytes": 1024})
    topic, sink = MemoryTopic("in"), MemorySink()
    _normal(topic, 2)
    topic.append(0, b"s", b"\n" * 10_000)  # 10,000 empty lines: token budget, then a cut line list
    topic.append(0, b"s", b"x" * 20_000)  # over the byte limit, no newline
    topic.append(0, b"s", b"\xff\xfe bad utf-8 \x00\x01\x02 control\n")
    topic.append(0, None, b"")  # tombstone / empty value
    topic.append(0, b"\xc3\x28", b"invalid-utf-8 key\n", {"x-unknown": b"\x00"})
    _normal(topic, 3, start=7)
    service = _service(text_lm, settings, topic, sink)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    values = sink.values("out")
    for a in values:
        ann.validate(a)
    assert all(len(ann.encode(a)) <= 8192 for a in values)
    scores, errors = _by_offset(values, "score"), _by_offset(values, "error")
    assert sorted(scores) == list(range(10))  # every record has its score annotation
    newlines = scores[2][0]["score"]
    assert newlines["tokens"] <= 300 and newlines["lines_omitted"] > 0
    assert len(newlines["lines"]) + newlines["lines_omitted"] == newlines["tokens"]  # one token per empty line
    problem = errors[2][0]["error"]["problems"][0]
    assert problem["reason"] == "record_too_many_tokens" and problem["skipped_lines"] == 10_000 - newlines["tokens"]
    big = errors[3][0]["error"]["problems"][0]
    assert big["reason"] == "record_too_large" and big["skipped_bytes"] == 20_000 - 16384
    assert sorted(errors) == [2, 3]
    assert scores[5][0]["stream"] == "partition-0" and scores[6][0]["stream"] == "hex:c328"
    assert all(scores[i][0]["score"]["lines"] for i in (7, 8, 9))  # normal lines after the hostile ones
    assert service.store.read_manifest("in:0")["manifest"]["next_offset"] == 10


@pytest.mark.parametrize("kv_pool", [True, False])
def test_a_failing_model_step_rolls_the_stream_back_and_quarantines_only_that_stream(text_lm, monkeypatch, kv_pool):
    settings = _settings(service={"quarantine_after": 2, "batch_tokens": 4, "kv_pool": kv_pool})  # ~ a record a group
    topic, sink = MemoryTopic("in"), MemorySink()
    for i in range(6):
        topic.append(0, b"bad", f"poison {i}\n".encode())
        topic.append(0, b"good", f"fine {i}\n".encode())
    service = _service(text_lm, settings, topic, sink)
    poison = service.engine.tokenize("poison")[0]
    calls = {"bad": 0}
    attempted = []
    backend = service.engine.backend
    if kv_pool:
        real = backend.step

        def step(slots, chunks, prev):
            if any(poison in chunk for chunk in chunks):
                calls["bad"] += 1
                attempted.extend(tuple(c) for c in chunks if poison in c)
                raise RuntimeError("injected failure of the model step")  # not a device failure: recoverable
            return real(slots, chunks, prev)

        monkeypatch.setattr(backend, "step", step)
    else:
        real = backend.runner.nll

        def nll(cache, ids, prev_logits=None):
            if poison in ids:
                calls["bad"] += 1
                attempted.append(tuple(ids))
                raise RuntimeError("injected failure of the model step")  # not a device failure: recoverable
            return real(cache, ids, prev_logits=prev_logits)

        monkeypatch.setattr(backend.runner, "nll", nll)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    values = sink.values("out")
    bad = [a for a in values if a["stream"] == "bad"]
    good = [a for a in values if a["stream"] == "good"]
    assert [a["kind"] for a in good] == ["score"] * 6 and all(a["score"]["lines"] for a in good)
    reasons = [a["error"]["problems"][0]["reason"] for a in bad]
    assert reasons == ["model_step_failed", "quarantined"] + ["quarantined"] * 4
    assert all(a["tokens_seen"] == 0 for a in bad)  # rolled back: nothing entered the cache
    # Only the first two poison records ever reached the model; the quarantined ones never did.
    first_two = {tuple(service.engine.tokenize(f"poison {i}\n")) for i in (0, 1)}
    assert set(attempted) == first_two, (set(attempted), first_two)


def test_store_outage_pauses_at_the_bound_and_recovers_exactly(text_lm):
    settings = _settings(checkpoint={"every_records": 2, "max_uncheckpointed_records": 5},
                         service={"batch_tokens": 8})  # about one record per group: flow control between them
    topic, sink, store = MemoryTopic("in"), MemorySink(), MemoryStore()
    _normal(topic, 40)
    service = _service(text_lm, settings, topic, sink, store)
    seen = []
    checkpointed, paused, idle_polls = threading.Event(), threading.Event(), threading.Event()
    real_write, real_pause, real_poll = store.write_checkpoint, service.source.pause, service.source.poll
    polls_since_pause = [0]

    def write_checkpoint(*args, **kwargs):
        doc = real_write(*args, **kwargs)
        checkpointed.set()
        return doc

    def pause(partitions):
        real_pause(partitions)
        if ("in", 0) in partitions:
            paused.set()

    def poll(max_records, timeout_s):
        records = real_poll(max_records, timeout_s)
        if paused.is_set():
            polls_since_pause[0] += 1
            if polls_since_pause[0] >= 5:
                idle_polls.set()
        return records

    store.write_checkpoint, service.source.pause, service.source.poll = write_checkpoint, pause, poll

    def watch():
        # Let the service take the partition and a first checkpoint, then take the store down until the
        # partition has paused at the bound and the service has polled five times since.
        assert checkpointed.wait(60)
        store.down = True
        assert paused.wait(60)
        assert idle_polls.wait(60)  # paused: nothing more may be published while the store is down
        part = service.parts.get(("in", 0))
        seen.extend([service.health.ready, part is not None and part.paused, len(sink.values("out"))])
        store.down = False

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert service.run(idle_exit_s=0.5, install_signals=False) == 0
    thread.join(5)
    ready_during, paused_during, published_during = seen
    assert ready_during is False and paused_during is True
    assert published_during <= 2 + 5 + 1  # at most the bound past the last checkpoint (plus a group in flight)
    offsets = sorted(a["source"]["offset"] for a in sink.values("out"))
    assert offsets == list(range(40))  # every input annotated exactly once: nothing lost, nothing repeated
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == 40


def test_shutdown_checkpoint_without_the_store_exits_cleanly_and_resumes_from_the_last_one(text_lm):
    settings = _settings(checkpoint={"every_records": 3}, service={"shutdown_checkpoint_s": 1})
    topic, store = MemoryTopic("in"), MemoryStore()
    _normal(topic, 7)
    first = _service(text_lm, settings, topic, MemorySink(), store)
    first.run(idle_exit_s=0.2, install_signals=False)
    _normal(topic, 2, start=7)
    second_sink = MemorySink()
    second = _service(text_lm, settings, topic, second_sink, store)
    original = second._process

    def process_then_fail_store(records):
        original(records)
        store.down = True

    second._process = process_then_fail_store
    assert second.run(idle_exit_s=0.2, install_signals=False) == 0  # no traceback, exit 0
    store.down = False
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == 7  # the last good checkpoint stays
    third_sink = MemorySink()
    _service(text_lm, settings, topic, third_sink, store).run(idle_exit_s=0.2, install_signals=False)
    assert [a["id"] for a in third_sink.values("out")] == [a["id"] for a in second_sink.values("out")]
    assert [ann.encode(a) for a in third_sink.values("out")] == [ann.encode(a) for a in second_sink.values("out")]


@pytest.mark.parametrize("damage", ["missing", "truncated", "bitflip", "foreign"])
def test_broken_snapshot_resets_the_stream_with_an_error_annotation(text_lm, tiny_lm, damage):
    settings = _settings(checkpoint={"every_records": 2})
    topic, store = MemoryTopic("in"), MemoryStore()
    _normal(topic, 4)
    _service(text_lm, settings, topic, MemorySink(), store).run(idle_exit_s=0.2, install_signals=False)
    key = store.read_manifest("in:0")["snapshots"]["s"]
    blob = store.blobs[key]
    if damage == "missing":
        del store.blobs[key]
    elif damage == "truncated":
        store.blobs[key] = blob[: len(blob) // 2]
    elif damage == "bitflip":
        store.blobs[key] = blob[:-100] + bytes([blob[-100] ^ 0x10]) + blob[-99:]
    else:  # a snapshot of another model under the same stream
        from pipeline.service.session import StreamSession

        other = Engine(tiny_lm("llama"), settings)
        store.blobs[key] = StreamSession(other, "s").snapshot()
    _normal(topic, 2, start=4)
    sink = MemorySink()
    assert _service(text_lm, settings, topic, sink, store).run(idle_exit_s=0.2, install_signals=False) == 0
    values = sink.values("out")
    first = _by_offset(values)[4]
    kinds = [a["kind"] for a in first]
    assert kinds == ["score", "error"], kinds
    assert first[1]["error"]["problems"][0]["reason"] == "context_reset"
    assert first[0]["tokens_seen"] == first[0]["score"]["tokens"]  # the stream started afresh
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == 6  # and goes on being checkpointed


def test_unreadable_manifest_restarts_the_partition_with_a_notice(text_lm):
    settings = _settings(checkpoint={"every_records": 2})
    topic, store = MemoryTopic("in"), MemoryStore()
    _normal(topic, 3)
    first = _service(text_lm, settings, topic, MemorySink(), store)
    first.run(idle_exit_s=0.2, install_signals=False)
    committed = first.source.committed

    class BrokenManifestStore(MemoryStore):
        def read_manifest(self, partition_id):
            from connectors.errors import CorruptStateError

            raise CorruptStateError(f"manifest of {partition_id!r}: expected JSON, got b'\\x00garbage'")

    broken = BrokenManifestStore()
    _normal(topic, 1, start=3)
    source_factory = MemorySource.factory(topic)

    def factory(callbacks):
        source = source_factory(callbacks)
        source.committed.update(committed)  # the consumer group's committed offset survives
        return source

    sink = MemorySink()
    service = Service(settings, Engine(text_lm, settings), factory, sink, broken)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    values = sink.values("out")
    assert [a["source"]["offset"] for a in values if a["kind"] == "score"] == [3]  # from the committed offset
    assert any(a["kind"] == "error" and a["error"]["problems"][0]["reason"] == "context_reset" for a in values)


def test_sigterm_mid_poll_stops_between_groups_and_resumes_exactly(text_lm, one_thread):
    settings = _settings(service={"batch_tokens": 8}, kafka={"max_poll_records": 64})
    topic, store = MemoryTopic("in"), MemoryStore()
    _normal(topic, 30)
    straight = MemorySink()
    _service(text_lm, settings, topic, straight, MemoryStore()).run(idle_exit_s=0.2, install_signals=False)
    first_sink = MemorySink()
    first = _service(text_lm, settings, topic, first_sink, store)
    original = first._run_group

    def stop_after_three(works):
        original(works)
        if len(first_sink.values("out")) >= 3:
            first.request_stop()

    first._run_group = stop_after_three
    assert first.run(install_signals=False) == 0
    done = len(first_sink.values("out"))
    assert 3 <= done < 30  # stopped inside one poll of 30 records
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == done
    second_sink = MemorySink()
    _service(text_lm, settings, topic, second_sink, store).run(idle_exit_s=0.2, install_signals=False)
    got = [ann.encode(a) for a in first_sink.values("out") + second_sink.values("out")]
    assert got == [ann.encode(a) for a in straight.values("out")]  # bit-identical to an uninterrupted run


def test_a_bug_mid_group_never_checkpoints_the_partitions_it_touched(text_lm, monkeypatch):
    settings = _settings(checkpoint={"every_records": 2})
    topic, store = MemoryTopic("in", partitions=2), MemoryStore()
    for i in range(4):
        topic.append(0, b"a", f"a line {i}\n".encode())
    service = _service(text_lm, settings, topic, MemorySink(), store)
    service.run(idle_exit_s=0.2, install_signals=False)
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == 4
    topic.append(0, b"a", b"a line 4\n")
    topic.append(0, b"a", b"a line 5\n")
    topic.append(1, b"b", b"b line 0\n")
    service = _service(text_lm, settings, topic, MemorySink(), store)
    calls = []
    real = service.sink.send

    def send(topic_, key, value, headers=None):
        calls.append(key)
        if len(calls) == 2:
            raise RuntimeError("a bug in the middle of a group")
        real(topic_, key, value, headers)

    monkeypatch.setattr(service.sink, "send", send)
    with pytest.raises(RuntimeError, match="a bug"):
        service.run(idle_exit_s=0.2, install_signals=False)
    assert store.read_manifest("in:0")["manifest"]["next_offset"] == 4  # the tainted partition kept its checkpoint


def test_how_records_are_grouped_never_changes_a_byte(text_lm, one_thread):
    """Several records of one stream in one group, several streams in one packed forward pass, and notes due
    inside the group give exactly what feeding each record alone gives: the offline baseline of the
    integration tests relies on it (batch invariance of the pooled step, on one thread)."""
    from connectors.protocols import Record
    from pipeline.service.session import StreamSession

    settings = _settings(note={"every_tokens": 25, "max_new_tokens": 3}, service={"batch_tokens": 100_000})
    topic, sink = MemoryTopic("in"), MemorySink()
    for i in range(12):  # record 7 resets stream "a" after earlier records of "a" in the same group
        headers = {"sinkstream-reset": b"1"} if i == 7 else {}
        topic.append(0, b"a" if i % 3 else b"b", f"GET /item/{i} 200 {i * 7} bytes\npart".encode(), headers)
    _service(text_lm, settings, topic, sink).run(idle_exit_s=0.2, install_signals=False)
    engine, sessions, expected = Engine(text_lm, settings), {}, []
    shared = engine.new_template_memory()  # the partition's template memory, as the service keeps it
    for r in topic.partitions[0]:
        if r.key not in sessions:
            sessions[r.key] = StreamSession(engine, r.key.decode(), templates=shared)
        session = sessions[r.key]
        expected += [
            ann.encode(a) for a in session.process(Record(r.topic, r.partition, r.offset, r.key, r.value, r.headers, 0))
        ]
    got = [ann.encode(a) for a in sink.values("out")]
    assert any(b'"kind":"note"' in x for x in got)
    reset = [x for x in got if b'/7/score' in x][0]
    assert b'"line_no":0' in reset  # the reset took effect at its own record, not earlier in the group
    assert got == expected


def test_metrics_follow_the_stream_evictions_errors_and_checkpoints(text_lm):
    """The counters operators alert on move with what happened: tokens evicted past sinks + window, error
    annotations by type, checkpoint sizes, records and tokens."""
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    settings = _settings(cache={"sinks": 4, "window": 32}, service={"max_record_bytes": 64})
    topic, sink = MemoryTopic("in"), MemorySink()
    _normal(topic, 12)
    topic.append(0, b"s", b"y" * 100 + b"\n")  # over max_record_bytes
    before = {k: value(k) for k in ("sinkstream_cache_evictions_total", "sinkstream_records_total",
                                    "sinkstream_tokens_total", "sinkstream_checkpoint_size_bytes_count")}
    errors_before = value("sinkstream_annotations_total", kind="error")
    _service(text_lm, settings, topic, sink).run(idle_exit_s=0.2, install_signals=False)
    scores = [a for a in sink.values("out") if a["kind"] == "score"]
    seen = scores[-1]["tokens_seen"]
    assert value("sinkstream_cache_evictions_total") - before["sinkstream_cache_evictions_total"] == seen - 4 - 32
    assert value("sinkstream_records_total") - before["sinkstream_records_total"] == 13
    assert value("sinkstream_tokens_total") - before["sinkstream_tokens_total"] == sum(
        a["score"]["tokens"] for a in scores
    )
    assert value("sinkstream_annotations_total", kind="error") - errors_before == 1
    assert value("sinkstream_checkpoint_size_bytes_count") > before["sinkstream_checkpoint_size_bytes_count"]


@pytest.mark.parametrize("kv_pool", [True, False])
def test_more_streams_in_a_group_than_may_stay_resident(text_lm, one_thread, kv_pool):
    """A group never spills a session whose records it still has to run: with 2 resident streams and records of
    5 streams in one poll, the group ends early and the next one spills; every record is scored, and the output
    equals feeding each stream alone."""
    from connectors.protocols import Record
    from pipeline.service.session import StreamSession

    settings = _settings(service={"max_resident_streams": 2, "batch_tokens": 100_000, "kv_pool": kv_pool})
    topic, sink = MemoryTopic("in"), MemorySink()
    for i in range(15):
        topic.append(0, f"k{i % 5}".encode(), f"GET /item/{i} 200\n".encode())
    assert _service(text_lm, settings, topic, sink).run(idle_exit_s=0.2, install_signals=False) == 0
    got = sink.values("out")
    assert [a["kind"] for a in got] == ["score"] * 15
    roomy = _settings(service={"kv_pool": kv_pool})
    engine, sessions, expected = Engine(text_lm, roomy), {}, []
    shared = engine.new_template_memory()  # the partition's template memory, as the service keeps it
    for r in topic.partitions[0]:
        if r.key not in sessions:
            sessions[r.key] = StreamSession(engine, r.key.decode(), templates=shared)
        record = Record(r.topic, r.partition, r.offset, r.key, r.value, r.headers, 0)
        expected += [ann.encode(a) for a in sessions[r.key].process(record)]
    assert [ann.encode(a) for a in got] == expected


def test_on_two_threads_grouping_changes_numbers_only_within_the_stated_tolerance(text_lm):
    """With more than one torch thread rows may round differently by batch: the grouped service and feeding
    each record alone must still agree in ids, keys, lines, token counts and flags, numbers within 1e-4."""
    import torch

    from connectors.protocols import Record
    from pipeline.service.session import StreamSession
    from tests.helpers.service import assert_equivalent

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = _settings(service={"batch_tokens": 100_000})
        topic, sink = MemoryTopic("in"), MemorySink()
        for i in range(16):
            topic.append(0, f"k{i % 5}".encode(), f"GET /item/{i} 200 {i * 7} bytes\nPOST /x/{i} 500\n".encode())
        _service(text_lm, settings, topic, sink).run(idle_exit_s=0.2, install_signals=False)
        engine, sessions, expected = Engine(text_lm, settings), {}, []
        shared = engine.new_template_memory()  # the partition's template memory, as the service keeps it
        for r in topic.partitions[0]:
            session = sessions.setdefault(r.key, StreamSession(engine, r.key.decode(), templates=shared))
            expected += session.process(Record(r.topic, r.partition, r.offset, r.key, r.value, r.headers, 0))
    finally:
        torch.set_num_threads(before)
    got = json.loads(json.dumps(sink.values("out")))
    assert len(got) == len(expected) == 16
    assert_equivalent(got, json.loads(json.dumps(expected)))


def _straight(lm, settings, topic) -> list[bytes]:
    sink = MemorySink()
    _service(lm, settings, topic, sink, MemoryStore()).run(idle_exit_s=0.2, install_signals=False)
    return [ann.encode(a) for a in sink.values("out")]


def _two_streams(n: int = 24) -> MemoryTopic:
    topic = MemoryTopic("in", partitions=2)
    for i in range(n):
        topic.append(i % 2, b"a" if i % 2 else b"b", f"GET /item/{i} 200 {i * 7} bytes\n".encode())
    return topic


def _fail_step_once(monkeypatch, backend, error: BaseException, at_call: int, streams_at_least: int = 1) -> list:
    """Make the pooled step raise `error` once, at its `at_call`-th call with that many streams or more."""
    real, calls, raised = backend.step, [0], []

    def step(slots, chunks, prev):
        if len(slots) >= streams_at_least:
            calls[0] += 1
            if calls[0] == at_call and not raised:
                raised.append(len(slots))
                raise error
        return real(slots, chunks, prev)

    monkeypatch.setattr(backend, "step", step)
    return raised


def test_out_of_memory_in_a_packed_forward_is_retried_stream_by_stream_bit_identically(text_lm, monkeypatch,
                                                                                        one_thread):
    import torch

    settings = _settings(service={"batch_tokens": 100_000})
    topic = _two_streams()
    expected = _straight(text_lm, settings, topic)
    sink = MemorySink()
    service = _service(text_lm, settings, topic, sink)
    raised = _fail_step_once(monkeypatch, service.engine.backend, torch.OutOfMemoryError("CUDA out of memory "
                             "(injected)"), at_call=2, streams_at_least=2)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    assert raised == [2]  # a forward of both streams failed, and was retried
    assert [ann.encode(a) for a in sink.values("out")] == expected


@pytest.mark.parametrize("error", ["accelerator", "device_assert"])
def test_a_failed_device_exits_without_a_checkpoint_and_the_restart_replays_byte_identically(
        text_lm, monkeypatch, one_thread, error):
    """A non-OOM device error (the CUDA context is dead) is not isolated to a stream: the service checkpoints
    nothing more and raises DeviceFailure (`sinkstream run` exits 3); a fresh service on the same store resumes
    from the last checkpoints, and every annotation, replayed copies included, is byte-identical to a run
    without the failure."""
    import torch

    from model.device_errors import DeviceFailure

    settings = _settings(service={"batch_tokens": 40}, kafka={"max_poll_records": 4},
                         checkpoint={"every_records": 3})
    topic, store = _two_streams(), MemoryStore()
    expected = _straight(text_lm, settings, topic)
    first_sink = MemorySink()
    first = _service(text_lm, settings, topic, first_sink, store)
    exc = (torch.AcceleratorError("CUDA error: an illegal memory access was encountered") if error == "accelerator"
           else RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"))
    _fail_step_once(monkeypatch, first.engine.backend, exc, at_call=9)
    manifests: list[dict] = []
    real_shutdown = first.shutdown

    def offsets():
        return {pid: (store.read_manifest(pid) or {"manifest": {"next_offset": 0}})["manifest"]["next_offset"]
                for pid in ("in:0", "in:1")}

    def shutdown():
        manifests.append(offsets())
        real_shutdown()

    first.shutdown = shutdown
    with pytest.raises(DeviceFailure, match="illegal memory access|device-side assert"):
        first.run(install_signals=False)
    after = offsets()
    assert after == manifests[0]  # shutdown wrote no checkpoint
    published = [ann.encode(a) for a in first_sink.values("out")]
    assert 0 < len(published) < len(expected)
    assert sum(after.values()) < len(expected)  # something is replayed
    second_sink = MemorySink()
    assert _service(text_lm, settings, topic, second_sink, store).run(idle_exit_s=0.2, install_signals=False) == 0
    replayed = [ann.encode(a) for a in second_sink.values("out")]
    by_id = {json.loads(b)["id"]: b for b in expected}
    got = published + replayed
    assert {json.loads(b)["id"] for b in got} == set(by_id)  # nothing lost
    for b in got:  # every copy, replayed ones included, is byte-identical to the run without the failure
        assert b == by_id[json.loads(b)["id"]]
    assert len(got) > len(expected)  # the records after the last checkpoint came again


def test_sinkstream_run_exits_3_on_a_device_failure(text_lm, monkeypatch, capsys):
    import torch

    from pipeline.cli.main import main
    from pipeline.cli.run import EXIT_DEVICE_FAILURE

    settings = _settings()
    topic = _two_streams(4)
    service = _service(text_lm, settings, topic)
    _fail_step_once(monkeypatch, service.engine.backend,
                    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), at_call=1)
    monkeypatch.setattr("pipeline.service.wiring.build_service", lambda settings: service)
    logging = structlog.get_config()
    try:
        assert main(["--log-format", "json", "run", "--exit-when-idle", "1"]) == EXIT_DEVICE_FAILURE == 3
    finally:
        structlog.configure(**logging)
    captured = capsys.readouterr()
    events = [json.loads(line) for line in (captured.out + captured.err).splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "service.device_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "critical" and "illegal memory access" in failed[0]["error"]
    assert not [e for e in events if e["event"] == "checkpoint.done" and e.get("reason") == "shutdown"]


@pytest.mark.parametrize("how", ["revoke", "lost"])
def test_a_revoked_partition_is_checkpointed_and_a_lost_one_dropped_unwritten(text_lm, how):
    settings = _settings(checkpoint={"every_records": 100})
    topic, store = MemoryTopic("in"), MemoryStore()
    _normal(topic, 6)
    service = _service(text_lm, settings, topic, MemorySink(), store)
    service._process(service._poll())  # assigned, all six records processed, no cadence checkpoint yet
    assert ("in", 0) in service.parts and store.read_manifest("in:0") is None
    (service._revoke if how == "revoke" else service._lost)([("in", 0)])
    assert service.parts == {}
    manifest = store.read_manifest("in:0")
    if how == "revoke":
        assert manifest is not None and manifest["manifest"]["next_offset"] == 6
    else:
        assert manifest is None  # another owner may already be writing: nothing is written
    service.shutdown()
