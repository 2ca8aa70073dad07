"""The kafka-python names `connectors.kafka.compat` relies on: this fails, by name, when an upgrade moves one."""

from __future__ import annotations

import time

import pytest

from connectors.kafka import compat
from connectors.kafka.source import KafkaSource


def test_checksum_and_listener_names_exist():
    import crc32c
    from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener  # noqa: F401 - the name itself
    from kafka.net.selector import KernelEvent  # noqa: F401
    from kafka.record import util

    assert util.crc32c_c is crc32c.crc32c  # the C extension, found by kafka-python itself
    assert compat.crc32c_accelerated()


@pytest.mark.integration
def test_fetch_rate_metric_exists_and_follows_fetch_responses(kafka_stack):
    from kafka import KafkaConsumer

    topic = kafka_stack.make_topic("compat", partitions=1)
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=None,
                             **compat.METRICS_CONFIG)
    try:
        deadline = time.monotonic() + 30
        rate = None
        while time.monotonic() < deadline and not rate:
            consumer.poll(timeout_ms=300)
            metrics = consumer.metrics()
            assert compat.FETCH_RATE in metrics[compat.FETCH_METRIC_GROUP], sorted(metrics)
            rate = compat.fetch_rate(consumer)
        assert rate and rate > 0  # empty fetches answered by the broker count
    finally:
        consumer.close()
    source = KafkaSource(topic, bootstrap_servers=kafka_stack.bootstrap, group_id=kafka_stack.group(),
                         session_timeout_ms=3000, group_instance_id=None)
    try:
        deadline = time.monotonic() + 30
        silent = None
        while time.monotonic() < deadline and silent is None:
            source.poll(10, 0.3)
            silent = source.silent_s()
        assert silent is not None and silent < 2.5
    finally:
        source.close()
