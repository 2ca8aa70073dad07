"""Integration tests of KafkaSource / KafkaSink against the real tansu broker, cross-checked with confluent-kafka.

tansu holds a JoinGroup for about half the session timeout, so the consumers here use a 3 s session timeout
and dynamic membership (static membership adds a fixed ~6 s per join; one test covers it). Known tansu gaps
(wrong end offsets for batched records, read_committed showing aborted records, dropped commit metadata)
are not asserted on.
"""

from __future__ import annotations

import threading
import time

import confluent_kafka as ck
import pytest

from connectors.kafka.sink import KafkaSink, SinkError
from connectors.kafka.source import CRC32C_ACCELERATED, KafkaSource, SourceError
from connectors.protocols import Record, Sink, Source
from pipeline.devstack.processes import start_tansu

pytestmark = pytest.mark.integration

FAST = {"session_timeout_ms": 3000, "group_instance_id": None}


def produce(bootstrap: str, topic: str, records: list[tuple[int, bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    """Produce `(partition, key, value, headers)` with confluent-kafka, an independent client."""
    producer = ck.Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[object] = []
    for partition, key, value, headers in records:
        producer.produce(topic, key=key, value=value, partition=partition, headers=headers,
                         on_delivery=lambda err, _msg: err and errors.append(err))
    assert producer.flush(15) == 0, "confluent producer could not deliver within 15 s"
    assert errors == []


def poll_until(source: KafkaSource, n: int, deadline_s: float = 20.0) -> list[Record]:
    got: list[Record] = []
    end = time.monotonic() + deadline_s
    while len(got) < n and time.monotonic() < end:
        got += source.poll(500, 0.2)
    assert len(got) >= n, f"expected {n} records within {deadline_s}s, got {len(got)}"
    return got


def test_crc32c_extension_is_used():
    assert CRC32C_ACCELERATED


def test_source_reads_order_keys_headers_and_seeks(kafka_stack):
    topic = kafka_stack.make_topic("src", partitions=3)
    sent = [
        (i % 3, f"k{i}".encode(), f"v{i}".encode(), [("seq", str(i).encode()), ("origin", b"ck")]) for i in range(30)
    ]
    produce(kafka_stack.bootstrap, topic, sent)
    assigned: list[list[tuple[str, int]]] = []
    t0 = time.time() * 1000
    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=kafka_stack.group(),
                     on_assign=assigned.append, **FAST) as src:
        assert isinstance(src, Source)
        got = poll_until(src, 30)
        assert len(got) == 30
        assert assigned == [[(topic, 0), (topic, 1), (topic, 2)]]
        for p in range(3):
            mine = [r for r in got if r.partition == p]
            assert [r.value for r in mine] == [v for q, _, v, _ in sent if q == p]  # production order
            assert [r.key for r in mine] == [k for q, k, _, _ in sent if q == p]
            offsets = [r.offset for r in mine]
            assert offsets == sorted(set(offsets)) and offsets[0] == 0
        r5 = next(r for r in got if r.value == b"v5")
        assert r5.headers == {"seq": b"5", "origin": b"ck"} and r5.topic == topic
        assert abs(r5.timestamp_ms - t0) < 60_000

        p0 = [r for r in got if r.partition == 0]
        src.seek(topic, 0, p0[2].offset)
        replay = [r for r in poll_until(src, 1) if r.partition == 0]
        assert replay[0].offset == p0[2].offset and replay[0].value == p0[2].value

        with pytest.raises(ValueError, match=r"expected \('?.*'?, 7\)|expected .*\[7\] to be assigned"):
            src.seek(topic, 7, 0)


def test_commit_then_new_member_resumes_from_committed_offset(kafka_stack):
    topic = kafka_stack.make_topic("resume", partitions=1)
    produce(kafka_stack.bootstrap, topic, [(0, b"k", f"v{i}".encode(), []) for i in range(10)])
    group = kafka_stack.group()
    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=group, **FAST) as first:
        got = poll_until(first, 10)
        first.commit({(topic, 0): got[4].offset + 1})
        assert first.committed(topic, 0) == got[4].offset + 1
    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=group, **FAST) as second:
        again = poll_until(second, 5)
        assert [r.value for r in again] == [f"v{i}".encode() for i in range(5, 10)]


def test_on_revoke_at_close_can_commit(kafka_stack):
    topic = kafka_stack.make_topic("closing", partitions=1)
    produce(kafka_stack.bootstrap, topic, [(0, b"k", f"v{i}".encode(), []) for i in range(6)])
    group = kafka_stack.group()
    revoked: list[list[tuple[str, int]]] = []

    def commit_on_revoke(tps):
        first.commit({tp: 4 for tp in tps})  # e.g. the offsets of the final checkpoint
        revoked.append(tps)

    first = KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=group, on_revoke=commit_on_revoke,
                        **FAST)
    poll_until(first, 6)
    first.close()
    assert revoked == [[(topic, 0)]]
    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=group, **FAST) as second:
        assert second.committed(topic, 0) == 4
        assert [r.value for r in poll_until(second, 2)] == [b"v4", b"v5"]


def test_static_membership_defaults_to_pod_name(kafka_stack, monkeypatch):
    monkeypatch.setenv("POD_NAME", "sinkstream-7")
    topic = kafka_stack.make_topic("static", partitions=1)
    produce(kafka_stack.bootstrap, topic, [(0, b"k", b"v", [])])
    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=kafka_stack.group(),
                     session_timeout_ms=3000) as src:
        assert src.group_instance_id == "sinkstream-7"
        assert [r.value for r in poll_until(src, 1, deadline_s=25)] == [b"v"]


def test_cooperative_rebalance_moves_one_partition_and_revoke_may_commit(kafka_stack):
    topic = kafka_stack.make_topic("coop", partitions=2)
    produce(kafka_stack.bootstrap, topic, [(i % 2, b"k", f"v{i}".encode(), []) for i in range(20)])
    group = kafka_stack.group()
    next_offset: dict[tuple[str, int], int] = {}
    revoked: list[list[tuple[str, int]]] = []

    def a_revoke(tps):
        a.commit({tp: next_offset[tp] for tp in tps})  # blocking consumer call inside the callback
        revoked.append(tps)

    a = KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=group, on_revoke=a_revoke, **FAST)
    b_assigned: list[list[tuple[str, int]]] = []
    b = KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=group, on_assign=b_assigned.append, **FAST)
    try:
        for r in poll_until(a, 20):
            next_offset[r.tp] = r.offset + 1
        stop = threading.Event()
        b_records: list[Record] = []
        b_errors: list[BaseException] = []

        def b_loop():
            try:
                while not stop.is_set():
                    b_records.extend(b.poll(100, 0.2))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                b_errors.append(exc)

        worker = threading.Thread(target=b_loop, daemon=True)
        worker.start()
        end = time.monotonic() + 25
        while not b_assigned and time.monotonic() < end and not b_errors:
            a.poll(100, 0.2)
        stop.set()
        worker.join(10)
        assert not b_errors, b_errors
        assert len(b_assigned) == 1 and len(b_assigned[0]) == 1, f"B got {b_assigned}"
        moved = b_assigned[0][0]
        assert revoked == [[moved]]  # cooperative: only the moving partition was revoked from A
        assert a.assignment() == [tp for tp in [(topic, 0), (topic, 1)] if tp != moved]
        assert b.committed(*moved) == next_offset[moved]  # the commit made inside on_revoke landed
        assert b_records == []  # B resumed at the committed offset: nothing left to read
    finally:
        b.close()
        a.close()


def test_failing_assign_callback_surfaces_in_poll(kafka_stack):
    topic = kafka_stack.make_topic("boom", partitions=1)

    def explode(tps):
        raise RuntimeError(f"cannot restore {tps}")

    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=kafka_stack.group(),
                     on_assign=explode, **FAST) as src:
        with pytest.raises(SourceError, match="rebalance callback raised RuntimeError"):
            end = time.monotonic() + 20
            while time.monotonic() < end:
                src.poll(10, 0.2)


def test_sink_output_is_read_back_by_confluent(kafka_stack):
    topic = kafka_stack.make_topic("out", partitions=2)
    with KafkaSink(bootstrap_servers=kafka_stack.bootstrap) as sink:
        assert isinstance(sink, Sink)
        for i in range(20):
            sink.send(topic, f"stream-{i % 3}".encode(), f"a{i}".encode(), {"seq": str(i).encode()})
        sink.flush(15)
    consumer = ck.Consumer({"bootstrap.servers": kafka_stack.bootstrap, "group.id": kafka_stack.group("ck"),
                            "enable.auto.commit": False})
    consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in range(2)])
    got: list[tuple[int, bytes, bytes, dict[str, bytes]]] = []
    end = time.monotonic() + 20
    try:
        while len(got) < 20 and time.monotonic() < end:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append((msg.partition(), msg.key(), msg.value(), dict(msg.headers() or [])))
    finally:
        consumer.close()
    assert len(got) == 20
    for stream in (b"stream-0", b"stream-1", b"stream-2"):
        mine = [g for g in got if g[1] == stream]
        assert len({g[0] for g in mine}) == 1, "one key must map to one partition"
        seqs = [int(g[3]["seq"]) for g in mine]
        assert seqs == sorted(seqs) and [g[2] for g in mine] == [f"a{s}".encode() for s in seqs]


def test_sink_flush_raises_when_broker_is_gone(tmp_path):
    broker = start_tansu(tmp_path)
    bootstrap = f"127.0.0.1:{broker.port}"
    try:
        sink = KafkaSink(bootstrap_servers=bootstrap, request_timeout_ms=1000, delivery_timeout_ms=2000,
                         retry_backoff_ms=100, max_block_ms=2000)
        sink.send("lost", b"k", b"first")
        sink.flush(10)
        broker.stop()
        for i in range(3):
            sink.send("lost", b"k", f"v{i}".encode())
        start = time.monotonic()
        with pytest.raises(SinkError, match=r"expected 3 records acknowledged|3 queued records") as err:
            sink.flush(10)
        assert time.monotonic() - start < 15
        assert err.value.succeeded == 0
        sink.close(timeout_s=1)
    finally:
        broker.stop()


def test_a_partition_paused_mid_batch_is_fetched_again_after_resume(kafka_stack):
    """kafka-python 3.0.12 parks the rest of a partially consumed fetch when its partition is paused
    (KAFKA-7548 port) and restores it only while no other partition's fetch sits in the consumer's in-line slot;
    until then it never fetches that partition again. With another partition flowing, a paused-then-resumed
    partition starved forever (the rebalance test's partition 1 and the soak's lost records). KafkaSource drains
    every fetch into its own per-partition buffer, so nothing is ever parked half-consumed."""
    topic = kafka_stack.make_topic("park", partitions=2)
    produce(kafka_stack.bootstrap, topic, [(i % 2, b"k", f"v{i}".encode(), []) for i in range(200)])
    with KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=kafka_stack.group(),
                     max_poll_records=3, **FAST) as src:
        first: list[Record] = []
        end = time.monotonic() + 20
        while not first and time.monotonic() < end:
            first = src.poll(3, 0.2)
        assert first, "no records within 20 s"
        paused = (topic, first[0].partition)
        src.pause([paused])
        other: list[Record] = []
        end = time.monotonic() + 20
        while len(other) < 20 and time.monotonic() < end:
            got = src.poll(3, 0.2)
            assert all(r.partition != paused[1] for r in got), "a paused partition delivered records"
            other += got
        assert len(other) >= 20, "the other partition stopped flowing"
        src.resume([paused])
        seen = {r.offset for r in first if r.partition == paused[1]}
        end = time.monotonic() + 20
        while len(seen) < 100 and time.monotonic() < end:
            seen |= {r.offset for r in src.poll(3, 0.2) if r.partition == paused[1]}
        assert seen == set(range(100)), f"the resumed partition delivered {len(seen)} of its 100 records"
