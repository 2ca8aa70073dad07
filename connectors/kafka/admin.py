"""Kafka administration that the service and the dev stack need: a metadata probe and idempotent topic creation.

Both take a `KafkaClientConfig` (or a plain bootstrap string), so they work against a secured cluster too.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import structlog
from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from connectors.errors import ConnectorError
from connectors.kafka.config import KafkaClientConfig, client_config

log = structlog.get_logger(__name__)


class TopicMismatchError(ConnectorError):
    """A topic exists with another partition count than the one asked for."""


def _admin(client: KafkaClientConfig, timeout_s: float, **admin_config: Any) -> KafkaAdminClient:
    ms = int(timeout_s * 1000)
    return KafkaAdminClient(
        **{**client.options(), "request_timeout_ms": ms, "bootstrap_timeout_ms": ms, **admin_config}
    )


def kafka_metadata(bootstrap: KafkaClientConfig | str, timeout_s: float = 5.0) -> dict[str, Any]:
    """One metadata round trip (describe cluster); raises when the broker does not answer.

    A plain TCP connect to the first bootstrap address comes first, so an address where nothing listens
    fails within `timeout_s` instead of after kafka-python's retries.
    """
    client = client_config(bootstrap)
    host, _, port = client.servers[0].rpartition(":")
    socket.create_connection((host, int(port)), timeout=timeout_s).close()
    admin = _admin(client, timeout_s)
    try:
        return dict(admin.describe_cluster())
    finally:
        admin.close()


def create_topics(
    bootstrap: KafkaClientConfig | str, topics: Mapping[str, int], timeout_s: float = 15.0, **admin_config: Any
) -> list[str]:
    """Create topics `{name: partitions}` that do not exist yet (replication factor 1); return the names created.

    Idempotent. Raises `TopicMismatchError` when an existing topic has a different partition count.
    `admin_config` goes to `KafkaAdminClient`.
    """
    ms = int(timeout_s * 1000)
    admin = _admin(client_config(bootstrap), timeout_s, **admin_config)
    created: list[str] = []
    try:
        existing = {t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics()}
        for name, partitions in topics.items():
            if name in existing:
                if existing[name] != partitions:
                    raise TopicMismatchError(
                        f"topic {name!r}: expected {partitions} partitions, the broker has {existing[name]}"
                    )
                continue
            try:
                admin.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}}, timeout_ms=ms)
                created.append(name)
            except TopicAlreadyExistsError:  # created concurrently
                pass
        if created:
            admin.wait_for_topics(created, timeout_ms=ms)
    finally:
        admin.close()
    log.info("kafka.topics", created=created, requested=dict(topics))
    return created
