"""Handles on the real broker and Redis that the session fixtures of tests/conftest.py start."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from connectors.kafka.admin import create_topics
from pipeline.devstack.processes import ManagedProcess


def unique_name(prefix: str) -> str:
    """`prefix-<10 hex chars>`: a name no other test (or earlier run against the same server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class KafkaStack:
    """A running tansu broker (in-memory storage)."""

    bootstrap: str
    process: ManagedProcess
    topics: list[str] = field(default_factory=list)

    def make_topic(self, prefix: str = "topic", partitions: int = 1) -> str:
        """Create a fresh topic with `partitions` partitions and return its unique name."""
        name = unique_name(prefix)
        create_topics(self.bootstrap, {name: partitions})
        self.topics.append(name)
        return name

    def group(self, prefix: str = "group") -> str:
        """A fresh consumer-group id."""
        return unique_name(prefix)


@dataclass
class RedisServer:
    """A running redis-server."""

    url: str
    process: ManagedProcess
    _clients: list[redis.Redis] = field(default_factory=list)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new `redis.Redis` on this server (closed at the end of the session)."""
        c = redis.Redis.from_url(self.url, **kwargs)
        self._clients.append(c)
        return c

    def unique_prefix(self, prefix: str = "test") -> str:
        """A key prefix no other test uses."""
        return unique_name(prefix)
