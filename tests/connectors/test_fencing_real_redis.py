"""Integration tests of RedisStateStore on the real redis-server (Lua, TTLs, large values)."""

from __future__ import annotations

import pytest

from connectors.redis_store import FencedError, RedisStateStore, connect_redis

pytestmark = pytest.mark.integration


@pytest.fixture
def real(redis_server):
    client = redis_server.client(socket_timeout=10)
    prefix = redis_server.unique_prefix("fence")
    return client, prefix, RedisStateStore(client, prefix)


def test_zombie_is_fenced_on_real_redis(real):
    client, prefix, store = real
    zombie_store = RedisStateStore(client, prefix)  # the old owner, as a separate instance
    old = zombie_store.claim("in-0")
    good = zombie_store.write_checkpoint("in-0", old, {"s": b"v1"}, {"offsets": {"in:0": 10}})
    new = store.claim("in-0")
    with pytest.raises(FencedError):
        zombie_store.write_checkpoint("in-0", old, {"s": b"zombie"}, {"offsets": {"in:0": 99}})
    with pytest.raises(FencedError):
        zombie_store.spill("in-0", old, "s", b"zombie")
    assert store.read_manifest("in-0") == good
    assert store.read_snapshot(good["snapshots"]["s"]) == b"v1"
    later = store.write_checkpoint("in-0", new, {"s": b"v2"}, {"offsets": {"in:0": 20}})
    assert store.read_manifest("in-0")["manifest"] == {"offsets": {"in:0": 20}}
    assert not client.exists(good["snapshots"]["s"])  # garbage-collected
    assert client.ttl(later["snapshots"]["s"]) == -1
    assert {k.decode() for k in client.keys(f"{prefix}:snap:*")} == {later["snapshots"]["s"]}


def test_large_snapshots_roundtrip_on_real_redis(real):
    _, _, store = real
    blobs = {f"s{i}": bytes([i]) * (24 * 1024 * 1024) for i in range(3)}  # ~ a SmolLM2 KV window each
    epoch = store.claim("in-1")
    doc = store.write_checkpoint("in-1", epoch, blobs, {"n": 3})
    assert all(store.read_snapshot(doc["snapshots"][s]) == b for s, b in blobs.items())
    key = store.spill("in-1", epoch, "cold", blobs["s0"])
    assert store.load_spilled("in-1", "cold") == blobs["s0"] and key.startswith(f"{store._prefix}:spill:")



def test_connect_redis_refuses_an_empty_url_and_connects_to_a_given_one(redis_server):
    with pytest.raises(ValueError, match="expected a Redis URL"):
        connect_redis("")
    client = connect_redis(redis_server.url, socket_timeout_s=5)
    assert client.ping()
    client.close()
