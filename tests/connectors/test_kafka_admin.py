"""Integration tests of connectors.kafka.admin against the real broker."""

from __future__ import annotations

import pytest

from connectors.kafka.admin import TopicMismatchError, create_topics, kafka_metadata

pytestmark = pytest.mark.integration


def test_create_topics_is_idempotent_and_checks_partitions(kafka_stack):
    name = kafka_stack.make_topic("ct", partitions=2)
    assert create_topics(kafka_stack.bootstrap, {name: 2}) == []
    with pytest.raises(TopicMismatchError, match=rf"topic '{name}': expected 3 partitions, the broker has 2"):
        create_topics(kafka_stack.bootstrap, {name: 3})


def test_metadata_of_an_address_where_nothing_listens_fails_fast():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(ConnectionRefusedError):
            kafka_metadata(f"127.0.0.1:{port}", timeout_s=2.0)
