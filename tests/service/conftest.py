"""Fixtures for the service tests: factories that produce to and read from the real broker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

import pytest


@pytest.fixture
def produce():
    """Factory: produce(bootstrap, topic, [(key, value, headers)], partition=None) with confluent-kafka."""
    from confluent_kafka import Producer

    def send(bootstrap: str, topic: str, items: Iterable[tuple], partition: int | None = None) -> int:
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        n = 0
        for key, value, headers in items:
            kwargs = {"partition": partition} if partition is not None else {}
            producer.produce(topic, key=key, value=value, headers=list((headers or {}).items()), **kwargs)
            n += 1
        assert producer.flush(30) == 0, "confluent-kafka could not deliver every record"
        return n

    return send


@pytest.fixture
def read_topic():
    """Factory: read_topic(bootstrap, topic, partitions, until=callable(list)->bool, timeout_s) -> [messages].

    Reads with an independent client (confluent-kafka, librdkafka) by partition assignment (no group),
    returning dicts with key, value (parsed JSON), headers, partition and offset.
    """
    from confluent_kafka import Consumer, TopicPartition

    def read(bootstrap: str, topic: str, partitions: int, until: Callable[[list], bool], timeout_s: float = 60.0):
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        got: list[dict] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not until(got):
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                got.append({"key": msg.key(), "raw": msg.value(), "value": json.loads(msg.value()),
                            "headers": dict(msg.headers() or []), "partition": msg.partition(), "offset": msg.offset()})
        finally:
            consumer.close()
        return got

    return read
