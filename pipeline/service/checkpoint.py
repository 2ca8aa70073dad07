"""Checkpointing a partition: the commit order that makes "resume exactly where it stopped" true.

A checkpoint of partition P at offset N means: every record of P before N is folded into the snapshots the
manifest references, and every annotation of those records is in the output topic. Restoring it and
seeking to N replays nothing twice into state; annotations of records after the last checkpoint are
published again with the same ids and the same values, and subscribers drop them by id.

The commit order (each step only starts once the one before it succeeded):

1. Flush the producer: all annotations of records before N are acknowledged by the broker. (Model thread.)
2. Write the snapshots of streams that changed since the last checkpoint, under new keys (the last good
   checkpoint stays intact if we die here). The model thread captures each session (a copy of its pool slot,
   or references to a SinkCache's tensors, which are never written in place) and hands the captures to the
   writer thread through a queue of `checkpoint.max_inflight_snapshots`; the writer serializes and writes
   them one at a time. So at most that many captures plus one serialized snapshot (plus the store's bounded
   write pipeline) are in host memory at once, whatever the number of streams; the model thread waits for
   the writer only when the queue is full.
3. Write the manifest: a compare-and-set on the owner epoch switches the pointer to the new snapshots and
   offset N. The manifest also holds the partition's template memory (`pipeline.service.templates`) as of
   N, copied on the model thread when step 2 captured the sessions, so it switches with them atomically.
   A zombie that lost the partition is refused here (`FencedError`). (Writer thread.)
4. Commit N to Kafka. For monitoring only: the manifest in Redis is the source of truth (as in Flink and
   Bytewax), which also sidesteps tansu's dropped commit metadata. (Model thread: the consumer is not
   thread-safe, so the writer hands the result back and `collect()` commits.)

A checkpoint refused because the store lost the partition's state (`StateLostError`: the epoch key is
gone; or a reused blob is missing) is not fencing: the partition is marked `lost` and the service claims a
fresh epoch and re-checkpoints the sessions it holds (see `pipeline.service.partition`).

A failed checkpoint changes nothing durable: the previous manifest stays, the partition keeps its dirty
streams, and the next attempt waits a capped exponential backoff (`checkpoint.retry_initial_s` doubling up
to `checkpoint.retry_max_s`). While the store is down the service keeps processing until a partition holds
`checkpoint.max_uncheckpointed_records`, then pauses that partition (see `pipeline.service.service`).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from connectors.errors import ConnectorError, FencedError, MissingSnapshotError, StateLostError
from connectors.protocols import CheckpointStore, Sink, Source
from pipeline.service import metrics
from pipeline.service.partition import CheckpointTicket, PartitionState, PendingSpill
from pipeline.service.session import SessionCapture
from pipeline.settings import CheckpointSettings

log = structlog.get_logger(__name__)

_PROBE = object()  # a writer-queue item: ping the store (an idle service still sees Redis go and come back)


@dataclass
class _Job:
    part: PartitionState
    reason: str
    captures: queue.Queue[tuple[str, SessionCapture] | None]
    reuse: list[str]
    manifest: dict[str, Any]
    ticket: CheckpointTicket
    done: threading.Event = field(default_factory=threading.Event)
    doc: dict[str, Any] | None = None
    error: BaseException | None = None
    written_bytes: int = 0
    written_streams: int = 0
    drained: bool = False  # the end marker of `captures` was taken


@dataclass
class _SpillJob:
    part: PartitionState
    pending: PendingSpill
    epoch: int
    error: BaseException | None = None


class Checkpointer:
    """Runs the commit order for partitions; one per service process, with one background writer thread.

    The writer thread also writes spilled sessions (`spill`): the model thread only captures a cold session and
    frees its KV slot; the writer serializes and writes it, in queue order with the checkpoints, and `collect()`
    confirms it to its partition. A checkpoint of a partition starts only once its spills are confirmed (its
    manifest must know where every stream is); a spill that failed stays pending (the capture in host memory)
    and is written again after the checkpoint backoff. At most `checkpoint.max_inflight_snapshots` spills are
    unconfirmed at once (queued, being written, or failed and waiting): beyond that a session stays resident, as
    when the store is down.
    """

    def __init__(self, source: Source, sink: Sink, store: CheckpointStore, settings: CheckpointSettings,
                 flush_timeout_s: float = 30.0):
        self.source, self.sink, self.store = source, sink, store
        self.settings = settings
        self.flush_timeout_s = flush_timeout_s
        self._jobs: queue.Queue[_Job | _SpillJob | None] = queue.Queue()
        self._finished: queue.Queue[_Job | _SpillJob] = queue.Queue()
        self._spills: dict[int, _SpillJob] = {}  # id(pending) -> its job, written or being written
        # Partitions that spilled through this writer: their `spilling` are the unconfirmed spills.
        self._spill_parts: weakref.WeakSet[PartitionState] = weakref.WeakSet()
        self._backoff: dict[str, tuple[float, float]] = {}  # partition -> (retry at, current delay)
        self.store_down_since: float | None = None
        self._probes: queue.Queue[BaseException | None] = queue.Queue()
        self._last_contact = time.monotonic()
        self._thread = threading.Thread(target=self._writer, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # ---- model thread -------------------------------------------------------------------------------------
    def ready_to_retry(self, part: PartitionState) -> bool:
        at = self._backoff.get(part.id)
        return at is None or time.monotonic() >= at[0]

    def start(self, part: PartitionState, reason: str) -> bool:
        """Begin a checkpoint of `part` (steps 1 and the capture of 2); False when there was nothing to start.

        Raises `SinkError` (a `ConnectorError`) when the flush failed: the caller must re-process the
        partition from its last checkpoint, since annotations after it may be lost.
        """
        if part.fenced or part.tainted or part.lost or part.in_flight is not None or part.next_offset is None:
            return False
        idle = not part.records_since_checkpoint and not part.force_checkpoint
        if idle and reason != "idle":
            return False
        if not self.wait_spills(part, self.flush_timeout_s):  # a spill failed: the store is down, retry later
            return False
        part.force_checkpoint = False
        # Step 1: flush the producer.
        self.sink.flush(self.flush_timeout_s)
        # Step 2 (capture): the dirty sessions' state as of now, handed over through a bounded queue.
        dirty, reuse, manifest, ticket = part.capture()
        ticket.idle = idle
        part.in_flight = ticket
        job = _Job(part, reason, queue.Queue(maxsize=self.settings.max_inflight_snapshots), reuse, manifest, ticket)
        self._jobs.put(job)
        for key, session in dirty:
            job.captures.put((key, session.capture()))  # waits while the writer is that many behind
        job.captures.put(None)
        return True

    def spill(self, part: PartitionState, pending: PendingSpill) -> bool:
        """Queue a spilled session for the writer thread (`PartitionState.spill`); False when
        `checkpoint.max_inflight_snapshots` spills are unconfirmed (the session then stays resident)."""
        # Unconfirmed spills hold their captures in host memory (also while a failed one waits to be written again).
        if sum(len(p.spilling) for p in self._spill_parts) >= self.settings.max_inflight_snapshots:
            return False
        self._spill_parts.add(part)
        job = _SpillJob(part, pending, part.epoch)
        self._spills[id(pending)] = job
        self._jobs.put(job)
        return True

    def retry_spills(self, part: PartitionState) -> None:
        """Queue again the spills of `part` whose write failed, once their backoff passed."""
        now = time.monotonic()
        for pending in list(part.spilling.values()):
            if pending.failed is not None and now >= pending.retry_at and id(pending) not in self._spills:
                pending.failed = None
                job = _SpillJob(part, pending, part.epoch)
                self._spills[id(pending)] = job
                self._jobs.put(job)

    def wait_spills(self, part: PartitionState, timeout_s: float) -> bool:
        """Block until every spill of `part` the writer holds is written or failed; True when none is left
        unconfirmed (failed ones are retried by `retry_spills`)."""
        deadline = time.monotonic() + timeout_s
        while any(job.part is part for job in self._spills.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self._complete(self._finished.get(timeout=left), [])
            except queue.Empty:
                break
        return not part.spilling

    def probe_store(self, every_s: float) -> None:
        """Ping the store on the writer thread when nothing touched it for `every_s` and no checkpoint is
        queued: without records there are no checkpoints, and an outage would go unseen (readiness, redis_up).
        The answer is taken by `collect()`."""
        if self._jobs.unfinished_tasks or time.monotonic() - self._last_contact < every_s:
            return
        self._last_contact = time.monotonic()
        self._jobs.put(_PROBE)  # type: ignore[arg-type]

    def _take_probes(self) -> None:
        while True:
            try:
                error = self._probes.get_nowait()
            except queue.Empty:
                return
            if error is None:
                if self.store_down_since is not None and not self._backoff:  # failed checkpoints retry on their own
                    log.warning("redis.available", down_s=round(time.monotonic() - self.store_down_since, 1))
                    self.store_down_since = None
                if not self._backoff:
                    metrics.REDIS_UP.set(1)
            else:
                metrics.ERRORS.labels("redis").inc()
                metrics.REDIS_UP.set(0)
                if self.store_down_since is None:
                    self.store_down_since = time.monotonic()
                    log.error("redis.unavailable", probe=True, error=f"{type(error).__name__}: {error}")

    def collect(self, wait_for: PartitionState | None = None, timeout_s: float | None = None) -> list[PartitionState]:
        """Finish completed checkpoints (step 4 and bookkeeping); return the partitions found fenced.

        With `wait_for`, block until that partition's in-flight checkpoint is done (or `timeout_s` passed).
        """
        fenced: list[PartitionState] = []
        self._take_probes()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                waiting = wait_for is not None and wait_for.in_flight is not None
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                job = self._finished.get(block=waiting, timeout=left if waiting else None)
            except queue.Empty:
                return fenced
            self._complete(job, fenced)

    def wait_idle(self, timeout_s: float | None = None) -> list[PartitionState]:
        """Block until every queued checkpoint finished, then `collect()`."""
        fenced: list[PartitionState] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._jobs.unfinished_tasks:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                self._complete(self._finished.get(timeout=left if left is not None else 1.0), fenced)
            except queue.Empty:
                continue
        fenced += self.collect()
        return fenced

    def checkpoint_now(self, part: PartitionState, reason: str, timeout_s: float) -> bool:
        """Start and wait for a checkpoint of `part` (revoke, shutdown); True when its manifest was written
        (or there was nothing to write). Never raises for store or sink failures: they are logged."""
        try:
            self.collect(wait_for=part, timeout_s=timeout_s)
            if part.in_flight is None:
                self.start(part, reason)
            self.collect(wait_for=part, timeout_s=timeout_s)
        except ConnectorError as exc:
            log.error("checkpoint.failed", partition=part.id, reason=reason, error=str(exc),
                      resume_offset=part.restored_offset)
            metrics.CHECKPOINT_FAILURES.labels("sink" if "flush" in str(exc) else "store").inc()
            return False
        return part.in_flight is None and not part.records_since_checkpoint and not part.fenced

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _complete(self, job: _Job | _SpillJob, fenced: list[PartitionState]) -> None:
        if isinstance(job, _SpillJob):
            self._spilled(job, fenced)
            return
        part = job.part
        part.in_flight = None
        if isinstance(job.error, FencedError):
            part.fenced = True
            log.error("checkpoint.fenced", partition=part.id, epoch=part.epoch, error=str(job.error))
            metrics.ERRORS.labels("fenced").inc()
            metrics.CHECKPOINT_FAILURES.labels("fenced").inc()
            fenced.append(part)
            return
        if isinstance(job.error, (StateLostError, MissingSnapshotError)):
            # Not fencing: nobody newer owns the partition, the store forgot (part of) its state. The service
            # claims a fresh epoch and re-checkpoints what is in memory (`PartitionState.recover`).
            part.mark_lost(job.error)
            metrics.CHECKPOINT_FAILURES.labels("state_lost").inc()
            return
        if job.error is not None:
            self._failed(job)
            return
        assert job.doc is not None
        part.checkpointed(job.ticket, job.doc)
        self._backoff.pop(part.id, None)
        if self.store_down_since is not None:
            log.warning("redis.available", down_s=round(time.monotonic() - self.store_down_since, 1))
            self.store_down_since = None
        metrics.REDIS_UP.set(1)
        # Step 4: commit offsets to Kafka (monitoring only). An idle re-check moved no offset, so it commits
        # nothing: a synchronous commit to a broker that is down would block the loop, which must keep polling
        # to see the outage (`_kafka_silent`).
        if not job.ticket.idle:
            try:
                self.source.commit({(part.topic, part.partition): job.ticket.offset})
            except Exception as exc:  # noqa: BLE001 - a failed commit loses nothing: the manifest holds the offset
                log.warning("checkpoint.commit_failed", partition=part.id, error=str(exc))
        seconds = time.monotonic() - job.ticket.started
        metrics.CHECKPOINT_SECONDS.observe(seconds)
        metrics.CHECKPOINT_SIZE.observe(job.written_bytes)
        metrics.CHECKPOINT_AGE.labels(part.id).set(0)
        (log.debug if job.ticket.idle else log.info)(
            "checkpoint.done", partition=part.id, reason=job.reason, offset=job.ticket.offset,
            streams_written=job.written_streams, streams_reused=len(job.reuse), bytes=job.written_bytes,
            ms=round(1000 * seconds, 1),
        )

    def _spilled(self, job: _SpillJob, fenced: list[PartitionState]) -> None:
        """A spill write finished (model thread): confirm it, or keep it pending for a retry."""
        self._spills.pop(id(job.pending), None)
        part, pending = job.part, job.pending
        if pending.cancelled:
            return
        if job.error is None:
            part.spilled_ok(pending)
            return
        part.spill_failed(pending.key, job.error)
        if part.fenced:
            fenced.append(part)
        _, delay = self._backoff.get(part.id, (0.0, self.settings.retry_initial_s))
        pending.failed, pending.retry_at = job.error, time.monotonic() + delay

    def _failed(self, job: _Job) -> None:
        part, exc = job.part, job.error
        _, delay = self._backoff.get(part.id, (0.0, self.settings.retry_initial_s / 2))
        delay = min(self.settings.retry_max_s, delay * 2)
        self._backoff[part.id] = (time.monotonic() + delay, delay)
        metrics.CHECKPOINT_FAILURES.labels("store").inc()
        metrics.ERRORS.labels("redis").inc()
        metrics.REDIS_UP.set(0)
        if self.store_down_since is None:
            self.store_down_since = time.monotonic()
            log.error("redis.unavailable", partition=part.id, error=f"{type(exc).__name__}: {exc}")
        log.warning("checkpoint.failed", partition=part.id, reason=job.reason, retry_in_s=round(delay, 2),
                    uncheckpointed_records=part.records_since_checkpoint, error=f"{type(exc).__name__}: {exc}")

    # ---- writer thread ------------------------------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            if isinstance(job, _SpillJob):
                try:
                    if not job.pending.cancelled:
                        self.store.spill(job.part.id, job.epoch, job.pending.key, job.pending.serialized())
                except BaseException as exc:  # noqa: BLE001 - handed back to the model thread
                    job.error = exc
                finally:
                    self._last_contact = time.monotonic()
                    self._finished.put(job)
                    self._jobs.task_done()
                continue
            if job is _PROBE:
                try:
                    self.store.ping()
                    self._probes.put(None)
                except BaseException as exc:  # noqa: BLE001 - handed back to the model thread
                    self._probes.put(exc)
                finally:
                    self._last_contact = time.monotonic()
                    self._jobs.task_done()
                continue
            try:
                # Step 2 (write) and Step 3 (manifest compare-and-set), inside write_checkpoint.
                job.doc = self.store.write_checkpoint(
                    job.part.id, job.part.epoch, self._serialized(job), job.manifest, reuse=job.reuse
                )
            except BaseException as exc:  # noqa: BLE001 - handed back to the model thread
                job.error = exc
            finally:
                self._last_contact = time.monotonic()
                while self._drain(job):  # a failed write leaves captures queued: free them, unblock the model thread
                    pass
                self._finished.put(job)
                self._jobs.task_done()

    @staticmethod
    def _drain(job: _Job) -> bool:
        """Take one capture off a failed job's queue; False after the end marker (or if it was consumed)."""
        if job.drained:
            return False
        item = job.captures.get()
        if item is None:
            job.drained = True
        return item is not None

    @staticmethod
    def _serialized(job: _Job) -> Iterator[tuple[str, bytes]]:
        while (item := job.captures.get()) is not None:
            key, capture = item
            blob = capture.serialize()
            del item, capture  # only the serialized blob stays alive while it is written
            job.written_bytes += len(blob)
            job.written_streams += 1
            yield key, blob
        job.drained = True
