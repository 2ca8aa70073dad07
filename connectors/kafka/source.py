"""`KafkaSource`: the pipeline's `Source` on kafka-python 3 (`KafkaConsumer`).

Group semantics:
  * manual commits only (`enable_auto_commit=False`): offsets are committed by the pipeline after its
    checkpoint is durable;
  * KIP-429 incremental cooperative rebalancing (`CooperativeStickyAssignor`, shipped by kafka-python 3):
    a rebalance revokes only the partitions that move, the others keep being processed;
  * KIP-345 static membership: `group_instance_id` defaults to `$POD_NAME` when set, so a pod restart
    within the session timeout gets its partitions back without a rebalance.

Rebalance callbacks: kafka-python 3 runs listeners on its IO thread, where a blocking consumer call (commit)
would dead-lock. `KafkaSource` therefore runs `on_assign` / `on_revoke` / `on_lost` on a short-lived helper
thread while the IO loop keeps serving the network, and waits for them to finish. They run only inside
`poll()` or `close()` (the calling thread is blocked meanwhile), so they never race with the caller's own
processing, and they may call `seek()` and `commit()`. An exception in a callback makes that `poll()` raise.
Why not the plain `ConsumerRebalanceListener`: kafka-python 3 calls it on the IO thread too, where it blocks
heartbeats for as long as the final checkpoint of a revoke takes and where `commit()` raises; why not
confluent-kafka (its callbacks run inside `poll()` on the caller's thread): it means moving the Source and the
Sink to another client and re-proving the rebalance, SIGKILL and outage tests against tansu, which issue 17
left for later. The wait on the helper thread uses kafka-python's own loop sleep (`KernelEvent`), the one
awaitable its loop offers to a listener.

Fetch buffer: kafka-python 3.0.12 parks the unread rest of a fetch when its partition is paused (its port of
KAFKA-7548) and puts it back only while no other partition's fetch sits in its in-line slot, which with any other
partition flowing is never: the partition is then never fetched again (a paused-then-resumed partition starved
for good; `tests/connectors/test_kafka_source_sink.py` reproduces it). `KafkaSource` therefore drains every
fetch the consumer holds into its own per-partition buffer at each `poll()`, so nothing is ever parked
half-read, and hands out `max_records` from that buffer, round-robin over partitions. A paused partition keeps
its buffer (delivered after `resume`); `seek` and a partition leaving drop it. A partition whose buffer holds
`max_poll_records` or more is paused in the consumer until the buffer drains, which bounds the memory.

Record checksums use the `crc32c` C extension when it is importable (kafka-python picks it up by itself);
`CRC32C_ACCELERATED` tells whether it did, and a warning is logged once when it did not. Fetch health and the
checksum choice are read through public kafka-python names only, gathered in `connectors.kafka.compat`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from kafka import KafkaConsumer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.net.selector import KernelEvent
from kafka.structs import OffsetAndMetadata, TopicPartition

from connectors.errors import SourceError
from connectors.kafka import compat
from connectors.kafka.config import KafkaClientConfig, client_config
from connectors.protocols import PartitionCallback, PartitionCallbacks, Record, TopicPartitionKey

log = structlog.get_logger(__name__)


CRC32C_ACCELERATED = compat.crc32c_accelerated()
if not CRC32C_ACCELERATED:  # pragma: no cover
    log.warning("kafka.crc32c_pure_python", hint="pip install crc32c; record CRC checks are much slower without it")

_FROM_ENV: Any = object()  # sentinel: group_instance_id defaults to $POD_NAME
# `poll()` takes every record the consumer holds (see "Fetch buffer"): far above what its fetches can carry.
_DRAIN_ALL = 1 << 30




def _loop_sleep(delay_s: float) -> Any:
    """An awaitable that suspends the calling coroutine on kafka-python's own IO loop (not asyncio)."""
    return KernelEvent("_sleep", delay_s)


class _Listener(AsyncConsumerRebalanceListener):
    """Runs the user's callbacks on a helper thread so they may block and call consumer methods."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._run("assign", self._source._on_assign, assigned)

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._run("revoke", self._source._on_revoke, revoked)

    async def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        await self._run("lost", self._source._on_lost or self._source._on_revoke, lost)

    async def _run(self, what: str, callback: PartitionCallback | None, tps: Iterable[TopicPartition]) -> None:
        partitions = sorted((tp.topic, tp.partition) for tp in tps)
        # Records buffered before a rebalance are not this owner's any more; a partition that leaves also loses
        # its pause (as kafka-python's own pause state does).
        self._source._forget(partitions, unpause=what != "assign")
        log.info("kafka.rebalance", change=what, partitions=partitions, group=self._source.group_id)
        if callback is None or (not partitions and what != "assign"):
            return  # an empty assignment still reaches the service: it tells that the member joined
        done = threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            self._source._in_callback.active = True
            try:
                callback(partitions)
            except BaseException as exc:  # noqa: BLE001 - handed back to the IO loop below
                failure.append(exc)
            finally:
                self._source._in_callback.active = False
                done.set()

        threading.Thread(target=work, name=f"sinkstream-rebalance-{what}", daemon=True).start()
        while not done.is_set():
            await _loop_sleep(0.005)
        if failure:
            log.error("kafka.rebalance_callback_failed", change=what, partitions=partitions, error=repr(failure[0]))
            raise failure[0]


class KafkaSource:
    """Consumer-group reader of one or more topics; see the module docstring for the group semantics.

    Args:
        topics: topic name(s) to subscribe to.
        bootstrap_servers: a `KafkaClientConfig` (brokers + security), or a plain `host:port[,host:port]`.
        group_id: consumer group shared by all replicas.
        callbacks: `PartitionCallbacks` with `on_assign` / `on_revoke` / `on_lost`, each called with sorted
            `[(topic, partition)]` when partitions are added / taken away (revocation happens before another
            member gets them). `on_lost` is called instead of `on_revoke` when the membership was lost
            (commits will fail then); defaults to `on_revoke`. The service hands its callbacks over through
            a `SourceFactory` (see `connectors.protocols`), so it never names this class.
        on_assign / on_revoke / on_lost: the same callbacks one by one (used when `callbacks` is None).
        group_instance_id: static member id; defaults to `$POD_NAME` when set, else dynamic membership.
            Pass None to force dynamic membership.
        consumer_config: extra `KafkaConsumer` options (override the ones set here).
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        *,
        bootstrap_servers: KafkaClientConfig | str,
        group_id: str,
        callbacks: PartitionCallbacks | None = None,
        on_assign: PartitionCallback | None = None,
        on_revoke: PartitionCallback | None = None,
        on_lost: PartitionCallback | None = None,
        group_instance_id: str | None = _FROM_ENV,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 500,
        session_timeout_ms: int = 30000,
        max_poll_interval_ms: int = 300000,
        **consumer_config: Any,
    ) -> None:
        raw = [topics] if isinstance(topics, str) else list(topics)
        topic_list = [part.strip() for t in raw for part in t.split(",") if part.strip()]
        if not topic_list:
            raise ValueError(f"expected at least one topic name, got {topics!r}")
        if not group_id:
            raise ValueError("expected a consumer group id, got an empty one (manual commits need a group)")
        if group_instance_id is _FROM_ENV:
            group_instance_id = os.environ.get("POD_NAME") or None
        self.group_id = group_id
        self.group_instance_id: str | None = group_instance_id
        self.topics = topic_list
        if callbacks is not None:
            on_assign, on_revoke, on_lost = callbacks.on_assign, callbacks.on_revoke, callbacks.on_lost
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        client = client_config(bootstrap_servers)
        self._in_callback = threading.local()
        self._closed = False
        self._last_fetch_seen: float | None = None  # monotonic time a fetch response was last seen
        # The fetch buffer (module docstring): records the consumer handed over and `poll()` did not return yet,
        # per partition in offset order; the partitions the caller paused; the partitions paused because full.
        self._buffer: dict[TopicPartition, deque[Record]] = {}
        self._paused: set[TopicPartition] = set()
        self._full: set[TopicPartition] = set()
        self._buffer_limit = max_poll_records
        config: dict[str, Any] = {
            **client.options(),
            "group_id": group_id,
            "group_instance_id": group_instance_id,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "partition_assignment_strategy": [CooperativeStickyAssignor],
            "isolation_level": "read_committed",
            "max_poll_records": max_poll_records,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": max(100, min(3000, session_timeout_ms // 3)),
            "max_poll_interval_ms": max_poll_interval_ms,
            **compat.METRICS_CONFIG,
            **consumer_config,
        }
        try:
            self._consumer = KafkaConsumer(**config)
        except KafkaTimeoutError as exc:  # raised by kafka-python 3 when bootstrap fails
            raise SourceError(
                f"expected a Kafka broker at {client.bootstrap_servers}, none answered within "
                f"{config.get('bootstrap_timeout_ms', 30000)} ms: {exc}"
            ) from exc
        self._consumer.subscribe(topics=topic_list, listener=_Listener(self))
        log.info("kafka.source_started", topics=topic_list, group=group_id, instance=group_instance_id)


    # ---- Source ------------------------------------------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to `max_records` records, in offset order per partition; [] after `timeout_s` without data."""
        self._check_open("poll")
        if getattr(self._in_callback, "active", False):
            raise SourceError("poll() was called from inside a rebalance callback; expected it from the main loop only")
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"expected max_records >= 1, got {max_records!r}")
        if timeout_s < 0:
            raise ValueError(f"expected timeout_s >= 0, got {timeout_s!r}")
        try:  # every record the consumer holds (nothing is left parked in it); no wait when some are buffered
            wait_ms = 0 if self._deliverable() else int(timeout_s * 1000)
            batches = self._consumer.poll(timeout_ms=wait_ms, max_records=_DRAIN_ALL)
        except KafkaError as exc:
            if exc.__cause__ is not None and "rebalance callback" in str(exc):
                raise SourceError(f"poll: a rebalance callback raised {exc.__cause__!r}") from exc.__cause__
            raise SourceError(f"poll: expected records or an empty batch from the broker, got {exc!r}") from exc
        for tp, recs in batches.items():
            queue = self._buffer.setdefault(tp, deque())
            last = queue[-1].offset if queue else -1
            for r in recs:
                if r.offset <= last:
                    raise SourceError(
                        f"{tp.topic}[{tp.partition}]: expected offsets to increase, got {r.offset} after {last}"
                    )
                last = r.offset
                queue.append(
                    Record(
                        topic=r.topic,
                        partition=r.partition,
                        offset=r.offset,
                        key=r.key,
                        value=r.value if r.value is not None else b"",
                        headers={k: (v if v is not None else b"") for k, v in (r.headers or [])},
                        timestamp_ms=r.timestamp if r.timestamp is not None else -1,
                    )
                )
        return self._take(max_records)

    def _deliverable(self) -> bool:
        """The buffer holds records of a partition the caller has not paused."""
        return any(q for tp, q in self._buffer.items() if tp not in self._paused)

    def _take(self, max_records: int) -> list[Record]:
        """Up to `max_records` buffered records of unpaused partitions, round-robin: a partition that still has
        some after its turn goes to the back."""
        out: list[Record] = []
        for tp in [tp for tp in self._buffer if tp not in self._paused]:
            if len(out) >= max_records:
                break
            queue = self._buffer.pop(tp)
            while queue and len(out) < max_records:
                out.append(queue.popleft())
            if queue:
                self._buffer[tp] = queue  # to the back of the order
        self._apply_pauses()
        return out

    def _apply_pauses(self) -> None:
        """The consumer fetches a partition unless the caller paused it or its buffer is full."""
        full = {tp for tp, q in self._buffer.items() if len(q) >= self._buffer_limit}
        drained = self._full - full
        if full - self._full:
            self._consumer.pause(*(full - self._full))
        if drained - self._paused:
            self._consumer.resume(*(drained - self._paused))
        self._full = full

    def _forget(self, partitions: Iterable[TopicPartitionKey], unpause: bool = False) -> None:
        """Drop what is buffered for `partitions` (sought, revoked, lost or newly assigned)."""
        for t, p in partitions:
            tp = TopicPartition(t, p)
            self._buffer.pop(tp, None)
            if unpause:
                self._paused.discard(tp)
            if tp in self._full:
                self._full.discard(tp)
                if tp not in self._paused:
                    self._consumer.resume(tp)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Next `poll` returns `(topic, partition)` from `offset`; the partition must be assigned."""
        self._check_open("seek")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"seek {topic}[{partition}]: expected an offset int >= 0, got {offset!r}")
        tp = TopicPartition(topic, partition)
        assigned = self._consumer.assignment()
        if tp not in assigned:
            raise ValueError(
                f"seek: expected {topic}[{partition}] to be assigned to this consumer; assigned are "
                f"{sorted((t.topic, t.partition) for t in assigned)}"
            )
        self._forget([(topic, partition)])
        self._consumer.seek(tp, offset)

    def pause(self, partitions: list[TopicPartitionKey]) -> None:
        """Stop delivering `partitions` (still assigned, still in the group) until `resume`; what is already
        buffered for them is delivered after `resume`."""
        self._check_open("pause")
        tps = [TopicPartition(t, p) for t, p in partitions]
        self._paused.update(tps)
        self._consumer.pause(*tps)

    def resume(self, partitions: list[TopicPartitionKey]) -> None:
        """Deliver and fetch `partitions` again after `pause` (a full buffer still holds its fetches back)."""
        self._check_open("resume")
        tps = [TopicPartition(t, p) for t, p in partitions]
        self._paused.difference_update(tps)
        self._consumer.resume(*[tp for tp in tps if tp not in self._full])

    def silent_s(self) -> float | None:
        """Seconds since a fetch response from any broker was last seen, from the consumer's public `fetch-rate`
        metric (`connectors.kafka.compat`: above zero when one arrived in the last 1-2 s, so this reads up to
        2 s late); 0 while the fetch buffer still holds records to deliver (its partitions are not fetched until it
        drains); None before the first fetch or without metrics."""
        rate = compat.fetch_rate(self._consumer)
        now = time.monotonic()
        if rate or self._deliverable():
            self._last_fetch_seen = now  # a fetch arrived, or records still flow from the buffer (no fetch needed)
        return None if rate is None or self._last_fetch_seen is None else now - self._last_fetch_seen

    def highwater(self, topic: str, partition: int) -> int | None:
        """The partition's end offset as of the last fetch response (None before one arrived)."""
        self._check_open("highwater")
        return self._consumer.highwater(TopicPartition(topic, partition))

    def committed_offset(self, topic: str, partition: int) -> int | None:
        """The group's committed next offset for a partition (`Source` protocol), None when none was committed."""
        return self.committed(topic, partition)

    def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Synchronously commit `{(topic, partition): next_offset}`; raises SourceError when the broker refuses."""
        self._check_open("commit")
        payload: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp_key, offset in offsets.items():
            if not (isinstance(tp_key, tuple) and len(tp_key) == 2):
                raise TypeError(f"commit: expected (topic, partition) keys, got {tp_key!r}")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"commit {tp_key}: expected a next offset int >= 0, got {offset!r}")
            payload[TopicPartition(*tp_key)] = OffsetAndMetadata(offset, "", -1)
        if not payload:
            return
        try:
            self._consumer.commit(offsets=payload)
        except KafkaError as exc:
            raise SourceError(f"commit of {dict(offsets)} for group {self.group_id!r} failed: {exc!r}") from exc
        log.debug("kafka.committed", offsets={f"{t}[{p}]": o for (t, p), o in offsets.items()})

    def close(self) -> None:
        """Leave the group (fires `on_revoke` for owned partitions) and close sockets. Idempotent."""
        if self._closed:
            return
        try:
            self._consumer.close(autocommit=False)  # on_revoke runs in here and may still commit
        except Exception as exc:  # noqa: BLE001 - closing must not mask the caller's own error
            log.warning("kafka.source_close_failed", error=repr(exc.__cause__ or exc))
        finally:
            self._closed = True
        log.info("kafka.source_closed", group=self.group_id)

    # ---- extras ------------------------------------------------------------------------------------------
    def assignment(self) -> list[TopicPartitionKey]:
        """The partitions currently assigned to this consumer, sorted."""
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed next offset for a partition, None when nothing was committed."""
        self._check_open("committed")
        return self._consumer.committed(TopicPartition(topic, partition))

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise SourceError(f"{op}: expected an open KafkaSource, got a closed one")

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
