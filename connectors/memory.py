"""In-memory connectors: a `Source`, a `Sink` and a `CheckpointStore` that live in one process.

They implement the protocols of `connectors.protocols` with the same contracts as the Kafka and Redis
connectors (offset order per partition, fencing by owner epoch, atomic checkpoints, errors from
`connectors.errors`), so unit tests and examples can run the service without a broker or Redis, in the
manner of bytewax's `TestingSource` / `TestingSink`::

    topic = MemoryTopic("in", partitions=2)
    topic.append(0, b"stream-a", b"line 1\\n")
    sink, store = MemorySink(), MemoryStore()
    service = Service(settings, engine, MemorySource.factory(topic), sink, store)

Nothing is thread-safe beyond what the service needs (one polling thread).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.errors import (
    FencedError,
    MissingSnapshotError,
    SinkError,
    SourceError,
    StateLostError,
    StateStoreError,
    UnknownReuseError,
)
from connectors.protocols import PartitionCallbacks, Record, Source, SourceFactory, TopicPartitionKey


class MemoryTopic:
    """An append-only, partitioned log of `Record`s (a stand-in for one Kafka topic)."""

    def __init__(self, name: str, partitions: int = 1) -> None:
        if partitions < 1:
            raise ValueError(f"expected partitions >= 1, got {partitions}")
        self.name = name
        self.partitions: list[list[Record]] = [[] for _ in range(partitions)]

    def append(
        self, partition: int, key: bytes | None, value: bytes, headers: Mapping[str, bytes] | None = None
    ) -> Record:
        """Append one record to `partition`; returns it (with its offset)."""
        if not 0 <= partition < len(self.partitions):
            raise ValueError(f"{self.name}: expected a partition in 0..{len(self.partitions) - 1}, got {partition}")
        log = self.partitions[partition]
        record = Record(self.name, partition, len(log), key, value, dict(headers or {}), len(log))
        log.append(record)
        return record


class MemorySource:
    """A `Source` over `MemoryTopic`s that owns every partition of them (one consumer, no group).

    The partitions are assigned on the first `poll` (the callbacks' `on_assign` runs then, and may `seek`),
    revoked by `revoke()` (tests of rebalancing) and by `close()`. Committed offsets are kept in
    `committed`; a partition without a seek starts at its committed offset, else at 0.
    """

    def __init__(self, *topics: MemoryTopic, callbacks: PartitionCallbacks | None = None) -> None:
        if not topics:
            raise ValueError("expected at least one MemoryTopic, got none")
        self.topics = {t.name: t for t in topics}
        self.callbacks = callbacks or PartitionCallbacks()
        self.committed: dict[TopicPartitionKey, int] = {}
        self.positions: dict[TopicPartitionKey, int] = {}
        self.paused: set[TopicPartitionKey] = set()
        self._closed = False
        self._assigned = False

    @classmethod
    def factory(cls, *topics: MemoryTopic) -> SourceFactory:
        """A `SourceFactory` for `Service`: builds a `MemorySource` with the service's callbacks."""

        def build(callbacks: PartitionCallbacks) -> Source:
            return cls(*topics, callbacks=callbacks)

        return build

    def _all(self) -> list[TopicPartitionKey]:
        return sorted((t.name, p) for t in self.topics.values() for p in range(len(t.partitions)))

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to `max_records` records, partitions in turn, each in offset order; never waits."""
        self._check_open("poll")
        if max_records < 1:
            raise ValueError(f"expected max_records >= 1, got {max_records!r}")
        if not self._assigned:
            self._assigned = True
            for tp in self._all():
                self.positions[tp] = self.committed.get(tp, 0)
            if self.callbacks.on_assign is not None:
                self.callbacks.on_assign(self._all())
        out: list[Record] = []
        for tp in sorted(self.positions):
            if tp in self.paused:
                continue
            log = self.topics[tp[0]].partitions[tp[1]]
            take = log[self.positions[tp] : self.positions[tp] + max_records - len(out)]
            out.extend(take)
            self.positions[tp] += len(take)
            if len(out) >= max_records:
                break
        return out

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Next `poll` returns `(topic, partition)` from `offset`; the partition must be assigned."""
        self._check_open("seek")
        if (topic, partition) not in self.positions:
            raise ValueError(
                f"seek: expected {topic}[{partition}] to be assigned to this consumer; assigned are "
                f"{sorted(self.positions)}"
            )
        if offset < 0:
            raise ValueError(f"seek {topic}[{partition}]: expected an offset >= 0, got {offset}")
        self.positions[(topic, partition)] = offset

    def pause(self, partitions: list[TopicPartitionKey]) -> None:
        """`poll` skips `partitions` until `resume`."""
        self._check_open("pause")
        self.paused.update(partitions)

    def resume(self, partitions: list[TopicPartitionKey]) -> None:
        self._check_open("resume")
        self.paused.difference_update(partitions)

    def silent_s(self) -> float | None:
        """Always 0: the in-memory log always answers."""
        return 0.0

    def highwater(self, topic: str, partition: int) -> int | None:
        """The partition's end offset (the log length)."""
        return len(self.topics[topic].partitions[partition])

    def committed_offset(self, topic: str, partition: int) -> int | None:
        """The offset `commit` recorded for `(topic, partition)`, None before the first."""
        return self.committed.get((topic, partition))

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Record `{(topic, partition): next_offset}` in `committed`."""
        self._check_open("commit")
        self.committed.update(offsets)

    def revoke(self) -> None:
        """Take every partition away (runs `on_revoke`); the next `poll` assigns them again."""
        if self._assigned and self.callbacks.on_revoke is not None:
            self.callbacks.on_revoke(sorted(self.positions))
        self.positions.clear()
        self.paused.clear()
        self._assigned = False

    def close(self) -> None:
        """Revoke the partitions (the service checkpoints them) and refuse further calls. Idempotent."""
        if self._closed:
            return
        self.revoke()
        self._closed = True

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise SourceError(f"{op}: expected an open MemorySource, got a closed one")


@dataclass(frozen=True)
class SentRecord:
    """One record a `MemorySink` acknowledged."""

    topic: str
    key: bytes
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)


class MemorySink:
    """A `Sink` that keeps acknowledged records in `sent`, in send order.

    `fail_next_flush` makes the next `flush` raise `SinkError` and drop the pending records (a broker that
    refused them), so tests can check that no checkpoint follows a failed flush.
    """

    def __init__(self) -> None:
        self.sent: list[SentRecord] = []
        self.pending: list[SentRecord] = []
        self.fail_next_flush = False
        self._closed = False

    def send(self, topic: str, key: bytes, value: bytes, headers: Mapping[str, bytes] | None = None) -> None:
        """Queue one record until the next `flush`."""
        if self._closed:
            raise SinkError(f"send to {topic!r}: expected an open MemorySink, got a closed one")
        if not isinstance(key, bytes | bytearray) or not isinstance(value, bytes | bytearray):
            raise TypeError(
                f"send to {topic!r}: expected bytes key and value, got {type(key).__name__} and {type(value).__name__}"
            )
        self.pending.append(SentRecord(topic, bytes(key), bytes(value), dict(headers or {})))

    def flush(self, timeout_s: float) -> None:
        """Acknowledge every pending record (or fail them all when `fail_next_flush` is set)."""
        if self._closed:
            raise SinkError("flush: expected an open MemorySink, got a closed one")
        pending, self.pending = self.pending, []
        if self.fail_next_flush:
            self.fail_next_flush = False
            raise SinkError(f"flush: expected {len(pending)} records acknowledged, all failed (fail_next_flush)")
        self.sent.extend(pending)

    def close(self) -> None:
        """Flush and refuse further calls. Idempotent."""
        if not self._closed:
            self.flush(0.0)
            self._closed = True

    def values(self, topic: str | None = None) -> list[dict[str, Any]]:
        """The JSON documents sent (to `topic`, or to any topic), in order."""
        return [json.loads(r.value) for r in self.sent if topic is None or r.topic == topic]


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a store method under the store's lock, refusing it while the store is `down`."""

    @functools.wraps(method)
    def wrapped(self: MemoryStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._check_up(method.__name__)
            return method(self, *args, **kwargs)

    return wrapped


class MemoryStore:
    """A `CheckpointStore` (`StateStore` + `SnapshotStore`) in dictionaries, with the Redis store's contracts:
    increasing owner epochs, fencing of stale epochs, blobs written once under fresh keys, atomic manifest switch,
    spilled sessions of a previous owner dropped by `claim`, a lost epoch (`flush_all`) told from a newer one.
    Thread-safe (the service writes checkpoints from a
    background thread). Set `down = True` to make every call raise `StateStoreError`, as an unreachable Redis
    does (tests of outages). `keep_checkpoint_blobs=False` counts the bytes of checkpoint blobs instead of keeping
    them (benchmarks of the service's own cost with many large streams; such a store cannot resume: reading one
    of those blobs raises `MissingSnapshotError`); spilled blobs are always kept."""

    def __init__(self, keep_checkpoint_blobs: bool = True) -> None:
        self.keep_checkpoint_blobs = keep_checkpoint_blobs
        self.dropped_bytes = 0  # bytes of checkpoint blobs not kept (keep_checkpoint_blobs=False)
        self.down = False
        self._lock = threading.RLock()
        self.epochs: dict[str, int] = {}
        self.manifests: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}
        self.spilled: dict[str, dict[str, str]] = {}
        self._seq = 0

    @_guarded
    def ping(self) -> None:
        """Answer (raise `StateStoreError` while `down`)."""

    def flush_all(self) -> None:
        """Forget everything, as Redis' FLUSHALL (or a failover to an empty replica) does: epochs, manifests,
        blobs and spill indexes. Owners that still hold partitions find their epoch missing (`StateLostError`)."""
        with self._lock:
            self.epochs.clear()
            self.manifests.clear()
            self.blobs.clear()
            self.spilled.clear()

    @_guarded
    def claim(self, partition_id: str, *, after: int = 0) -> int:
        """Increment and return the partition's owner epoch (at least `after + 1`); drop the previous owner's
        spilled sessions."""
        self.epochs[partition_id] = max(self.epochs.get(partition_id, 0), after) + 1
        referenced = set((self.manifests.get(partition_id) or {}).get("snapshots", {}).values())
        for key in self.spilled.pop(partition_id, {}).values():
            if key not in referenced:
                self.blobs.pop(key, None)
        return self.epochs[partition_id]

    @_guarded
    def read_manifest(self, partition_id: str) -> dict[str, Any] | None:
        """A copy of the last committed manifest document, or None."""
        doc = self.manifests.get(partition_id)
        return json.loads(json.dumps(doc)) if doc is not None else None

    @_guarded
    def write_checkpoint(
        self,
        partition_id: str,
        epoch: int,
        snapshots: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
        manifest: Mapping[str, Any],
        *,
        reuse: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Store `snapshots` (a mapping or `(stream, blob)` pairs) under fresh keys and switch the manifest if
        `epoch` is current (else `FencedError`)."""
        self._fence(partition_id, epoch, "checkpoint")
        reuse = list(reuse)
        pairs = snapshots.items() if isinstance(snapshots, Mapping) else snapshots  # consumed one blob at a time
        old = self.manifests.get(partition_id)
        spilled = self.spilled.setdefault(partition_id, {})
        refs: dict[str, str] = {}
        for stream in reuse:
            found = spilled.get(stream) or (old or {}).get("snapshots", {}).get(stream)
            if found is None:
                raise UnknownReuseError(partition_id, stream, epoch)
            if found not in self.blobs and (self.keep_checkpoint_blobs or found.startswith("spill:")):
                raise MissingSnapshotError(found, f" when committing the checkpoint of partition {partition_id!r}")
            refs[stream] = found
        self._seq += 1
        written: list[str] = []
        for stream, blob in pairs:
            if stream in reuse or stream in written:
                raise ValueError(
                    f"stream {stream!r} is both in snapshots and in reuse (or twice in snapshots); expected it once"
                )
            written.append(stream)
            key = f"snap:{partition_id}:{stream}:{epoch}:{self._seq}"
            if self.keep_checkpoint_blobs:
                self.blobs[key] = bytes(blob)
            else:
                self.dropped_bytes += len(blob)
            refs[stream] = key
        for stream in written:
            spilled.pop(stream, None)
        doc = {
            "format": 1, "partition": partition_id, "epoch": epoch, "seq": self._seq, "written_at_ms": 0,
            "snapshots": dict(sorted(refs.items())), "manifest": json.loads(json.dumps(dict(manifest))),
        }
        for stream in [s for s in spilled if s not in refs]:  # a stream the caller dropped (closed): its spill goes
            key = spilled.pop(stream)
            if key not in set(refs.values()):
                self.blobs.pop(key, None)
        live = set(refs.values()) | set(spilled.values())
        for key in set((old or {}).get("snapshots", {}).values()) - live:
            self.blobs.pop(key, None)
        self.manifests[partition_id] = doc
        return json.loads(json.dumps(doc))

    @_guarded
    def read_snapshot(self, key: str) -> bytes:
        """The blob under `key`; `MissingSnapshotError` when there is none."""
        try:
            return self.blobs[key]
        except KeyError:
            raise MissingSnapshotError(key) from None

    @_guarded
    def spill(self, partition_id: str, epoch: int, stream_key: str, blob: bytes) -> str:
        """Store an evicted session's blob for this epoch; fenced like `write_checkpoint`."""
        self._fence(partition_id, epoch, "spill")
        self._seq += 1
        key = f"spill:{partition_id}:{stream_key}:{epoch}:{self._seq}"
        self.blobs[key] = bytes(blob)
        self.spilled.setdefault(partition_id, {})[stream_key] = key
        return key

    @_guarded
    def load_spilled(self, partition_id: str, stream_key: str) -> bytes | None:
        """The blob last spilled for `stream_key` in the current epoch, or None."""
        key = self.spilled.get(partition_id, {}).get(stream_key)
        if key is None:
            return None
        if key not in self.blobs:
            raise MissingSnapshotError(key, f" (spill index of partition {partition_id!r}, stream {stream_key!r})")
        return self.blobs[key]

    def _check_up(self, op: str) -> None:
        if self.down:
            raise StateStoreError(f"{op}: expected the store to answer, it is down")

    def _fence(self, partition_id: str, epoch: int, action: str) -> None:
        current = self.epochs.get(partition_id)
        if current is None or current < epoch:
            raise StateLostError(partition_id, epoch, current, action)
        if current != epoch:
            raise FencedError(partition_id, epoch, current, action)
