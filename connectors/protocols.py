"""The seams between sinkstream's pipeline and the outside world: where records come from (`Source`), where
annotations go (`Sink`) and where per-partition state survives a restart (`StateStore`, `SnapshotStore`).

The pipeline is written against these protocols only; `connectors.kafka.source.KafkaSource`,
`connectors.kafka.sink.KafkaSink` and `connectors.redis_store.RedisStateStore` are the production
implementations, `connectors.memory` holds in-memory ones for tests and examples. Errors are the classes of
`connectors.errors`, shared by every implementation.

Rebalance callbacks: a `Source` reports partition ownership changes to the service that consumes it, but the
service is built after (or with) its source. The service therefore receives a `SourceFactory`: a callable that
takes the service's `PartitionCallbacks` and returns a subscribed `Source`. `pipeline.service.wiring` builds
the factory for Kafka from the settings; tests pass `connectors.memory.MemorySource.factory(...)`.

Every method docstring says *when* the pipeline calls it and *what happens on failure*, in the manner of
quix-streams' `BaseSink.flush`: a failure is always an exception, never a silently dropped record, and the
caller's recovery is "do not commit, let the partition be re-processed from the last checkpoint".

Delivery model, in one paragraph: records are processed at least once, state is checkpointed at most once
per owner epoch, and the pair (Redis manifest, Kafka offsets stored *inside* that manifest) is the source of
truth for "where a partition resumes". Committing offsets to Kafka is a courtesy for lag monitoring and for
partitions that have no checkpoint yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

TopicPartitionKey = tuple[str, int]
"""`(topic, partition)`: how partitions are named everywhere in sinkstream (no client-specific structs)."""

PartitionCallback = Callable[[list[TopicPartitionKey]], None]
"""Called with the sorted `[(topic, partition)]` whose ownership changed."""


@dataclass(frozen=True, slots=True)
class PartitionCallbacks:
    """What a `Source` calls when partition ownership changes (all optional).

    `on_assign`: partitions were added; runs before `poll` returns any of their records (the consumer may
    `seek` in it). `on_revoke`: partitions are taken away; runs before another member gets them (the consumer
    may checkpoint and `commit` in it). `on_lost`: the membership was lost (commits will fail); when None,
    `on_revoke` is called instead.
    """

    on_assign: PartitionCallback | None = None
    on_revoke: PartitionCallback | None = None
    on_lost: PartitionCallback | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, detached from any client library.

    `value` is never None: a tombstone (null value) arrives as `b""`. `headers` keeps the *last* value of a
    header name that occurs more than once. `timestamp_ms` is the record's own timestamp (create or log-append
    time, whichever the topic uses), `-1` when the broker sent none.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = -1

    @property
    def tp(self) -> TopicPartitionKey:
        """`(topic, partition)` of this record."""
        return (self.topic, self.partition)


@runtime_checkable
class Source(Protocol):
    """A partitioned, replayable stream of records with consumer-group semantics.

    Partition ownership changes are reported through the `PartitionCallbacks` given when the source is built
    (see `SourceFactory`); they run *before* `poll` returns records of a newly assigned partition and
    *before* a revoked partition is handed to another member.
    """

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Fetch up to `max_records` records, waiting at most `timeout_s` seconds for the first one.

        When: in the pipeline's main loop, from one thread only. Rebalance callbacks fire inside this call.
        Records of one partition come in strictly increasing offset order, continuing from the last record
        returned (or from the position set by `seek`); partitions may interleave.

        On failure: raises (broker unreachable past the client's retries, corrupt batch, a rebalance callback
        that raised). Nothing has been consumed from the caller's point of view: positions are unchanged, so
        the caller may poll again or close and let the partitions be re-processed from the last checkpoint.
        """
        ...

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Make the next `poll` return records of `(topic, partition)` starting at `offset`.

        When: in `on_assign` (resume from the checkpoint's next offset) or after a failed batch (replay).

        On failure: raises ValueError when the partition is not currently assigned to this consumer, naming
        the partition and the current assignment; the position is unchanged.
        """
        ...

    def pause(self, partitions: list[TopicPartitionKey]) -> None:
        """Stop returning records of `partitions` from `poll` (they stay assigned) until `resume`.

        When: flow control — a partition whose state cannot be checkpointed (store down) or read waits while
        the others go on. A `seek` on a paused partition takes effect when it is resumed.
        On failure: raises like `seek` for a partition that is not assigned.
        """
        ...

    def resume(self, partitions: list[TopicPartitionKey]) -> None:
        """Return records of `partitions` again, from their current position. When/failure: as `pause`."""
        ...

    def silent_s(self) -> float | None:
        """Seconds since the brokers last answered a fetch; None when the source cannot tell.

        When: after each poll, to see a broker that stopped answering (polls themselves return nothing then)."""
        ...

    def highwater(self, topic: str, partition: int) -> int | None:
        """The partition's end offset as this consumer last saw it, None when it has not seen one yet.

        When: for the lag metric, between groups. On failure: None (monitoring never stops processing).
        """
        ...

    def committed_offset(self, topic: str, partition: int) -> int | None:
        """The group's committed next offset of `(topic, partition)`, None when nothing was committed.

        When: in `on_assign`, when the state store has no checkpoint of the partition: a committed offset then
        means the group processed records before, whose context is gone (the streams are told so).
        On failure: raises (broker unreachable); the caller treats that as "unknown".
        """
        ...

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Synchronously commit `{(topic, partition): next_offset}` for the consumer group.

        `next_offset` is the offset of the next record to process (last processed + 1), as in Kafka.
        When: after a checkpoint covering those offsets is durable in the state store, and in `on_revoke`.

        On failure: raises (rebalance in progress, member fenced, broker unreachable). Nothing is lost: the
        committed offset stays at its previous value and the partition's records after it are re-delivered,
        which the pipeline de-duplicates against the offsets in its checkpoint manifest.
        """
        ...

    def close(self) -> None:
        """Leave the group (firing `on_revoke` for owned partitions) and release sockets. Idempotent.

        When: at shutdown, after the last checkpoint. On failure: logs and still releases local resources;
        the broker expires the membership after the session timeout.
        """
        ...


@runtime_checkable
class Sink(Protocol):
    """An asynchronous, keyed output channel (annotations topic)."""

    def send(self, topic: str, key: bytes, value: bytes, headers: Mapping[str, bytes] | None = None) -> None:
        """Queue one record for delivery; returns without waiting for the broker.

        When: for every annotation the model produces, in input order per stream key.

        On failure: raises immediately only for local problems (closed sink, record larger than the
        client's limit, unknown topic after the metadata timeout). Delivery failures surface in `flush`.
        """
        ...

    def flush(self, timeout_s: float) -> None:
        """Block until every record queued by `send` is acknowledged by the broker (acks=all).

        When: before each checkpoint, so that a checkpoint never claims input whose output was lost.

        On failure: raises an exception that lists each failed record (topic, key, error) and how many
        succeeded. The caller must NOT write the checkpoint or commit offsets; it should re-process from the
        previous checkpoint, so outputs are delivered at least once and downstream readers must tolerate
        duplicates. A flush that times out raises as well.
        """
        ...

    def close(self) -> None:
        """Flush what can be flushed within a short timeout and release the producer. Idempotent.

        When: at shutdown, after the final `flush`. On failure: logs; records not yet acknowledged are lost
        from this process and are re-produced by whoever re-processes the partition.
        """
        ...


@runtime_checkable
class StateStore(Protocol):
    """Durable per-partition checkpoints with zombie fencing."""

    def ping(self) -> None:
        """Return when the store answers; raise when it does not. When: the service probes an idle store so
        readiness follows an outage without records (see `Checkpointer.probe_store`)."""
        ...

    def claim(self, partition_id: str, *, after: int = 0) -> int:
        """Take ownership of `partition_id` and return the new owner epoch (strictly increasing, and above
        `after`: a caller re-claiming after `StateLostError` passes its old epoch, so epochs keep increasing
        even though the store forgot them).

        When: in `on_assign`, before reading the manifest. Every later write passes this epoch; a previous
        owner that still runs (a zombie after a network partition or a long GC pause) is fenced from then on.
        Scratch state the previous owner left (spilled sessions) is discarded, because it may be newer than
        the last checkpoint.

        On failure: raises (store unreachable). The caller must not process the partition without an epoch.
        """
        ...

    def write_checkpoint(
        self,
        partition_id: str,
        epoch: int,
        snapshots: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
        manifest: Mapping[str, Any],
        *,
        reuse: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Atomically replace the partition's checkpoint with `snapshots` + `manifest`; return the stored manifest.

        `snapshots` maps stream key -> blob, or yields (key, blob) pairs lazily, so that a caller serializing
        many streams need not hold every blob at once.

        When: every N records or T seconds, after `Sink.flush` succeeded, and in `on_revoke`. `reuse` names
        streams whose state did not change since it was last stored (spilled, or in the previous manifest):
        the checkpoint then references that stored blob instead of rewriting it.

        On failure: raises `FencedError` when a newer epoch was claimed (another owner: stop processing the
        partition), `StateLostError` when the epoch is missing or went back below `epoch` (the store lost the
        partition's state; nobody else claimed it: claim again and re-checkpoint), `MissingSnapshotError` when a
        blob named by `reuse` is gone, or another exception when the store failed. In
        every failure case the previous checkpoint stays readable and intact; nothing half-written is ever
        visible through `read_manifest`.
        """
        ...

    def read_manifest(self, partition_id: str) -> dict[str, Any] | None:
        """Return the last committed manifest of `partition_id`, or None when it has never been checkpointed.

        When: in `on_assign`, right after `claim`. On failure: raises (store unreachable, or a manifest that
        is not valid JSON — the error names the key and the first bytes that arrived).
        """
        ...


@runtime_checkable
class SnapshotStore(Protocol):
    """Blob access that complements `StateStore`: restore snapshots and spill cold sessions."""

    def read_snapshot(self, key: str) -> bytes:
        """Return the blob stored under `key` (a value from a manifest's `snapshots` mapping).

        When: while restoring a partition after `read_manifest`. On failure: raises `MissingSnapshotError`
        naming the key when it does not exist (which means the manifest and the blobs disagree).
        """
        ...

    def spill(self, partition_id: str, epoch: int, stream_key: str, blob: bytes) -> str:
        """Persist the serialized session of an evicted stream; return the blob's key.

        When: when a session is evicted from memory. On failure: raises `FencedError` like
        `write_checkpoint` (keep the session in memory, stop processing the partition), or a store error
        (keep the session in memory and retry later).
        """
        ...

    def load_spilled(self, partition_id: str, stream_key: str) -> bytes | None:
        """Return the last spilled blob of `stream_key` in this owner epoch, or None when there is none.

        When: when a record arrives for a stream that is not resident. On failure: raises (store
        unreachable); the record must not be processed against an empty session.
        """
        ...


@runtime_checkable
class CheckpointStore(StateStore, SnapshotStore, Protocol):
    """A store that keeps both checkpoints and snapshot blobs: what the service needs (`RedisStateStore`,
    `connectors.memory.MemoryStore`)."""


SourceFactory = Callable[[PartitionCallbacks], Source]
"""Builds a subscribed `Source` that reports ownership changes to the given callbacks.

When: once, in the service's constructor, after the service has its sink, store and engine (the callbacks
need them). On failure: raises (broker unreachable); the service is then not started.
"""
