"""Unit tests of RedisStateStore on fakeredis (Lua scripts run through lupa)."""

from __future__ import annotations

import json

import pytest

from connectors import redis_store
from connectors.protocols import SnapshotStore, StateStore
from connectors.redis_store import FencedError, MissingSnapshotError, RedisStateStore, StateStoreError

P = "input-0"


@pytest.fixture
def r(fake_redis):
    return fake_redis()


@pytest.fixture
def store(r):
    return RedisStateStore(r, "t")


def test_implements_protocols(store):
    assert isinstance(store, StateStore)
    assert isinstance(store, SnapshotStore)


def test_claim_increments_per_partition(store):
    assert [store.claim(P), store.claim(P), store.claim("other-1")] == [1, 2, 1]
    assert store.current_epoch(P) == 2
    assert store.current_epoch("never") is None


def test_checkpoint_roundtrip_uses_versioned_persistent_keys(store, r):
    epoch = store.claim(P)
    doc = store.write_checkpoint(P, epoch, {"s1": b"\x00kv1", "s2": b"kv2"}, {"offsets": {"in:0": 42}})
    read = store.read_manifest(P)
    assert read == doc
    assert read["manifest"] == {"offsets": {"in:0": 42}}
    assert read["epoch"] == epoch and read["format"] == 1
    assert set(read["snapshots"]) == {"s1", "s2"}
    key = read["snapshots"]["s1"]
    assert key == f"t:snap:{{{P}}}:s1:{epoch}:{read['seq']}"
    assert store.read_snapshot(key) == b"\x00kv1"
    assert r.ttl(key) == -1  # committed blobs do not expire
    assert json.loads(r.get(f"t:manifest:{{{P}}}"))["snapshots"] == read["snapshots"]


def test_read_manifest_none_before_first_checkpoint(store):
    assert store.read_manifest(P) is None


def test_stale_epoch_is_fenced_and_manifest_untouched(store):
    old = store.claim(P)
    first = store.write_checkpoint(P, old, {"s": b"v1"}, {"offset": 1})
    new = store.claim(P)  # another consumer takes over
    with pytest.raises(FencedError) as err:
        store.write_checkpoint(P, old, {"s": b"zombie"}, {"offset": 99})
    assert err.value.epoch == old and err.value.current == new
    assert f"expected owner epoch {old}" in str(err.value) and f"current epoch is {new}" in str(err.value)
    assert store.read_manifest(P) == first
    assert store.read_snapshot(first["snapshots"]["s"]) == b"v1"
    # the new owner still writes fine
    assert store.write_checkpoint(P, new, {"s": b"v2"}, {"offset": 2})["epoch"] == new


def test_claim_between_blob_writes_and_switch_is_fenced_by_the_script(store, r, monkeypatch):
    """The Lua compare-and-set, not the early check, must catch a claim that lands mid-checkpoint."""
    old = store.claim(P)
    first = store.write_checkpoint(P, old, {"s": b"v1"}, {"n": 1})
    real_write = store._write_blobs

    def write_then_lose_ownership(blobs, written):
        real_write(blobs, written)
        store.claim(P)

    monkeypatch.setattr(store, "_write_blobs", write_then_lose_ownership)
    with pytest.raises(FencedError):
        store.write_checkpoint(P, old, {"s": b"half", "t": b"half"}, {"n": 2})
    assert store.read_manifest(P) == first
    assert sorted(k.decode() for k in r.keys("t:snap:*")) == [first["snapshots"]["s"]]  # attempt's blobs discarded


def test_unreferenced_blobs_of_a_crashed_writer_expire(store, r, monkeypatch):
    epoch = store.claim(P)

    def crash(*args, **kwargs):
        raise ConnectionError("writer died before the manifest switch")

    monkeypatch.setattr(store, "_commit", crash)
    with pytest.raises(ConnectionError):
        store.write_checkpoint(P, epoch, {"s": b"x"}, {})
    keys = r.keys("t:snap:*")
    assert len(keys) == 1 and 0 < r.pttl(keys[0]) <= 3600 * 1000
    assert store.read_manifest(P) is None


def test_gc_removes_blobs_only_the_previous_manifest_referenced(store, r):
    epoch = store.claim(P)
    c1 = store.write_checkpoint(P, epoch, {"a": b"a1", "b": b"b1"}, {})
    c2 = store.write_checkpoint(P, epoch, {"a": b"a2", "c": b"c2"}, {})
    assert not r.exists(c1["snapshots"]["a"], c1["snapshots"]["b"])
    assert {k.decode() for k in r.keys("t:snap:*")} == set(c2["snapshots"].values())
    c3 = store.write_checkpoint(P, epoch, {"c": b"c3"}, {}, reuse=["a"])
    assert c3["snapshots"]["a"] == c2["snapshots"]["a"]
    assert store.read_snapshot(c3["snapshots"]["a"]) == b"a2"
    assert not r.exists(c2["snapshots"]["c"])
    assert {k.decode() for k in r.smembers(f"t:refs:{{{P}}}")} == set(c3["snapshots"].values())


def test_missing_snapshot_error_names_the_key(store):
    with pytest.raises(MissingSnapshotError, match=r"expected a snapshot blob under key 't:snap:nope'"):
        store.read_snapshot("t:snap:nope")


def test_reuse_of_unknown_stream_is_rejected(store):
    epoch = store.claim(P)
    with pytest.raises(ValueError, match="reuse: expected stream 'ghost'"):
        store.write_checkpoint(P, epoch, {}, {}, reuse=["ghost"])
    with pytest.raises(ValueError, match="both in snapshots and in reuse"):
        store.write_checkpoint(P, epoch, {"x": b"1"}, {}, reuse=["x"])


def test_spill_load_and_replace(store, r):
    epoch = store.claim(P)
    assert store.load_spilled(P, "s") is None
    k1 = store.spill(P, epoch, "s", b"cold-1")
    assert store.load_spilled(P, "s") == b"cold-1" and r.ttl(k1) == -1
    k2 = store.spill(P, epoch, "s", b"cold-2")
    assert store.load_spilled(P, "s") == b"cold-2"
    assert k1 != k2 and not r.exists(k1)


def test_spill_is_fenced_and_claim_drops_previous_owner_spills(store, r):
    old = store.claim(P)
    key = store.spill(P, old, "s", b"cold")
    new = store.claim(P)
    assert store.load_spilled(P, "s") is None and not r.exists(key)
    with pytest.raises(FencedError, match="spill for partition"):
        store.spill(P, old, "s", b"zombie")
    assert store.load_spilled(P, "s") is None
    store.spill(P, new, "s", b"mine")
    assert store.load_spilled(P, "s") == b"mine"


def test_checkpoint_reuses_spilled_blob_and_fresh_write_supersedes_it(store, r):
    epoch = store.claim(P)
    spilled = store.spill(P, epoch, "s", b"cold")
    c1 = store.write_checkpoint(P, epoch, {"hot": b"h"}, {}, reuse=["s"])
    assert c1["snapshots"]["s"] == spilled
    store.spill(P, epoch, "s", b"colder")  # re-spill: the checkpointed blob must survive
    assert store.read_snapshot(spilled) == b"cold"
    c2 = store.write_checkpoint(P, epoch, {"s": b"fresh", "hot": b"h2"}, {})
    assert store.load_spilled(P, "s") is None  # superseded by the fresh snapshot
    assert store.read_snapshot(c2["snapshots"]["s"]) == b"fresh"
    assert not r.exists(spilled)
    assert {k.decode() for k in r.keys("t:spill:*")} == set()


def test_same_epoch_concurrent_writer_is_detected(store, r, monkeypatch):
    epoch = store.claim(P)
    store.write_checkpoint(P, epoch, {"s": b"1"}, {})
    real_write = store._write_blobs

    def sneak(blobs, written):
        real_write(blobs, written)
        r.set(f"t:manifest:{{{P}}}", json.dumps({"format": 1, "snapshots": {}, "manifest": {"other": True}}))

    monkeypatch.setattr(store, "_write_blobs", sneak)
    with pytest.raises(StateStoreError, match="manifest changed while epoch"):
        store.write_checkpoint(P, epoch, {"s": b"2"}, {})


def test_input_validation_messages(store, fake_redis):
    epoch = store.claim(P)
    with pytest.raises(TypeError, match="expected bytes, got str"):
        store.write_checkpoint(P, epoch, {"s": "text"}, {})
    with pytest.raises(ValueError, match="JSON-serializable"):
        store.write_checkpoint(P, epoch, {}, {"x": {1, 2}})
    with pytest.raises(ValueError, match="JSON-serializable"):
        store.write_checkpoint(P, epoch, {}, {"x": float("nan")})
    with pytest.raises(ValueError, match=r"expected an epoch returned by claim\(\)"):
        store.write_checkpoint(P, 0, {}, {})
    with pytest.raises(ValueError, match="without braces"):
        store.claim("a{b}")
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStateStore(fake_redis(decode_responses=True), "t")


def test_corrupt_manifest_error_shows_what_arrived(store, r):
    r.set(f"t:manifest:{{{P}}}", b"\x80not json")
    with pytest.raises(StateStoreError, match=r"expected JSON, got b'\\x80not json'"):
        store.read_manifest(P)


def test_pacing_sleeps_between_blob_writes(r, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(redis_store.time, "sleep", sleeps.append)
    store = RedisStateStore(r, "t", pace_s=0.25)
    epoch = store.claim(P)
    doc = store.write_checkpoint(P, epoch, {"a": b"1", "b": b"2", "c": b"3"}, {})
    assert sleeps == [0.25, 0.25]
    assert [store.read_snapshot(doc["snapshots"][s]) for s in "abc"] == [b"1", b"2", b"3"]


def test_large_blobs_are_pipelined_in_batches(store, monkeypatch):
    monkeypatch.setattr(redis_store, "_PIPELINE_BYTES", 3 * 1024 * 1024)
    blobs = {f"s{i}": bytes([i]) * (2 * 1024 * 1024 + i) for i in range(5)}
    epoch = store.claim(P)
    doc = store.write_checkpoint(P, epoch, blobs, {"n": 5})
    assert {s: store.read_snapshot(k) for s, k in doc["snapshots"].items()} == blobs


def test_blobs_are_stored_as_lists_of_bounded_parts(store, r, monkeypatch):
    monkeypatch.setattr(redis_store, "BLOB_PART_BYTES", 1000)
    blobs = {"big": bytes(range(256)) * 10, "exact": b"x" * 2000, "empty": b""}  # 2560, 2000 and 0 bytes
    epoch = store.claim(P)
    doc = store.write_checkpoint(P, epoch, blobs, {})
    keys = doc["snapshots"]
    assert [r.llen(keys[s]) for s in ("big", "exact", "empty")] == [3, 2, 1]
    assert all(len(part) <= 1000 for part in r.lrange(keys["big"], 0, -1))
    assert {s: store.read_snapshot(k) for s, k in keys.items()} == blobs



def test_a_checkpoint_drops_the_spill_of_a_stream_it_leaves_out(store, r):
    """A stream the caller no longer knows (a closed session) is simply left out of the next checkpoint: its
    spilled blob and spill index entry go with the commit; spills of streams it reuses stay loadable."""
    epoch = store.claim(P)
    kept = store.spill(P, epoch, "kept", b"k")
    gone = store.spill(P, epoch, "gone", b"g")
    doc = store.write_checkpoint(P, epoch, {"hot": b"h"}, {}, reuse=["kept"])
    assert doc["snapshots"] == {"hot": doc["snapshots"]["hot"], "kept": kept}
    assert not r.exists(gone) and store.load_spilled(P, "gone") is None
    assert store.load_spilled(P, "kept") == b"k"
