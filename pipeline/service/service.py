"""The service: a poll loop from the input topic through stream sessions to the output topic, with checkpoints.

One process owns some partitions of the input topic (consumer group, cooperative sticky assignment, static
membership from the pod name). The loop, once per poll:

1. Poll up to `kafka.max_poll_records` records.
2. Cut them, in input order, into groups of about `service.batch_tokens` tokens. For each record of a group:
   find its partition and stream session, fold the record's bytes into the session's chunker and tokenize its
   complete lines within the record limits (`Engine.prepare`: the mode decides what goes to the model).
3. Run the model over the group (`Engine.run`): every stream's tokens, in order, through its own cache; a
   stream whose step fails is rolled back and only its records get `error` annotations.
4. Publish each record's annotations (`Engine.finish`) in input order (so per partition in offset order), and
   only then move the partition's `next_offset` past the record. A checkpoint can therefore never claim a record whose
   results were not handed to the producer (and step 1 of the commit order makes sure they were delivered).
5. Between groups: finish and start checkpoints (every N records or T seconds per partition, in the
   background, see `pipeline.service.checkpoint`), pause partitions that hold too many un-checkpointed
   records while the store is down, and stop early on SIGTERM or when the poll is getting old; records not
   processed yet are sought back and come again with the next poll.

Faults: a Redis that lost its state (FLUSHALL, an empty replica, eviction) is not fencing: the partition is claimed
afresh and the sessions in memory re-checkpointed at once (`pipeline.service.partition`); a partition found fenced
by a newer owner is dropped and paused, and if Kafka still assigns it to this member after
`kafka.max_poll_interval_ms` the process exits non-zero rather than hold it idle; so it does when the source stops
delivering the records of a partition the service lets run for that long (`_check_starved`). A Redis outage never
stops the process (checkpoints are retried with backoff, partitions pause at a bound, readiness turns false); a
record that cannot be handled gets an `error` annotation (or also a dead-letter record) and the partition goes on;
broken state resets the stream with an `error` annotation. An exception that is none of these is a bug: the
partitions of the group it hit are not checkpointed (their sessions may be ahead of their offsets), the others are,
and the process exits with the traceback. A failure of the accelerator itself other than out of memory
(`model.device_errors`: an illegal memory access, a device-side assert) leaves nothing on the device trustworthy:
no partition is checkpointed, `DeviceFailure` propagates and `sinkstream run` exits 3 so that the orchestrator
restarts it from the last checkpoints.

Shutdown (SIGTERM or SIGINT): the current group is finished, every partition is checkpointed, offsets are
committed, the consumer leaves the group and the process exits 0.

The service only knows the protocols of `connectors.protocols`: it receives its sink and state store, and a
`SourceFactory` that it calls with its own rebalance callbacks (`on_assign`, `on_revoke`, `on_lost`), so the
source can report ownership changes back. `pipeline.service.wiring.build_service` builds the production
Kafka/Redis set from the settings; tests pass the in-memory connectors of `connectors.memory`.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from typing import Any

import structlog

from connectors.errors import ConnectorError, CorruptStateError, StateStoreError
from connectors.protocols import CheckpointStore, PartitionCallbacks, Record, Sink, SourceFactory
from model.device_errors import DeviceFailure, fatal_device_error, raise_if_fatal
from pipeline.service import annotations as ann
from pipeline.service import metrics
from pipeline.service.annotations import Problem
from pipeline.service.checkpoint import Checkpointer
from pipeline.service.engine import Engine
from pipeline.service.partition import GroupFull, PartitionState, Residency, StoreUnavailable
from pipeline.service.session import RecordWork, StreamSession, stream_key
from pipeline.settings import Settings

log = structlog.get_logger(__name__)

TopicPartition = tuple[str, int]
# An idle service pings the state store this often (seconds), so readiness and redis_up follow an outage.
STORE_PROBE_EVERY_S = 5.0
# Kafka counts as unreachable after this many seconds of polling without a fetch response (a healthy broker
# answers every fetch within fetch.max.wait, 0.5 s, even when there is nothing to read).
KAFKA_SILENT_S = 10.0


class PartitionHeldIdle(RuntimeError):
    """A partition assigned by Kafka could be neither processed nor given up (fenced, yet still assigned)."""


class Service:
    """The streaming service; `run()` blocks until stopped."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        source_factory: SourceFactory,
        sink: Sink,
        store: CheckpointStore,
    ) -> None:
        """Take the connectors; the source is built last, with this service's rebalance callbacks."""
        self.settings = settings
        self.engine = engine
        self.store = store
        self.sink = sink
        self.parts: dict[TopicPartition, PartitionState] = {}
        self.residency = Residency(engine.backend.slots)
        self.health = metrics.Health(stall_after_s=settings.kafka.max_poll_interval_ms / 1000.0)
        self.stop_requested = False
        # Records and tokens handled, with the monotonic times of the first and the last (for throughput).
        self.progress: dict[str, float] = {"records": 0, "tokens": 0, "first": 0.0, "last": 0.0}
        # Assigned partitions whose claim failed (store down): paused, claimed again later.
        self.unclaimed: dict[TopicPartition, float] = {}
        # Partitions blocked because a session could not be read (store down): retry time and delay.
        self.blocked: dict[TopicPartition, tuple[float, float]] = {}
        # Partitions dropped because a newer owner fenced us, still assigned by Kafka: since when.
        self.fenced_since: dict[TopicPartition, float] = {}
        # Partitions whose state the store lost and whose fresh claim failed: when to try again.
        self._reclaim_at: dict[TopicPartition, float] = {}
        self._rewind_to: dict[TopicPartition, int] = {}
        # Starvation watchdog (`_check_starved`): partitions sought back to a record they delivered, that record's
        # offset, and since when each has waited for it.
        self._sought: dict[TopicPartition, int] = {}
        self._fed_at: dict[TopicPartition, float] = {}
        self._waiting_since: float | None = None  # first poll after the last fetch response seen
        self._last_poll = 0.0
        self.joined = False  # the group gave this member its first assignment (possibly empty)
        self.source = source_factory(
            PartitionCallbacks(on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost)
        )
        self.checkpointer = Checkpointer(self.source, self.sink, self.store, settings.checkpoint)
        metrics.describe_build(engine.lm, settings)
        metrics.KAFKA_UP.set(1)
        metrics.REDIS_UP.set(1)
        self._update_readiness()
        log.info("service.started", model=settings.model.name, fingerprint=self.engine.lm.fingerprint,
                 device=str(engine.lm.device), dtype=str(engine.lm.dtype).replace("torch.", ""),
                 dtype_reason=getattr(engine.lm, "dtype_reason", "requested"), batch_tokens=engine.batch_tokens,
                 kv_pool=engine.backend.pooled)

    # ---- rebalance callbacks (run inside poll) ---------------------------------------------------------------
    def _assign(self, tps: list[TopicPartition]) -> None:
        self.joined = True
        for tp in tps:
            tp = (tp[0], tp[1])  # a plain tuple (Kafka hands over named tuples)
            self.fenced_since.pop(tp, None)
            if not self._claim(tp):
                self.unclaimed[tp] = time.monotonic() + self.settings.checkpoint.retry_initial_s
                self.source.pause([tp])
            else:
                # Fetch it: this process may have paused it before (fenced, blocked, flow control) and Kafka can
                # hand a partition back with the consumer's pause still set (a fenced zombie that rejoins).
                self.source.resume([tp])
        metrics.PARTITIONS.set(len(self.parts))
        self._update_readiness()

    def _claim(self, tp: TopicPartition) -> bool:
        topic, partition = tp
        pid = f"{topic}:{partition}"
        try:
            epoch = self.store.claim(pid)
            problem = None
            try:
                doc = self.store.read_manifest(pid)
            except CorruptStateError as exc:
                doc, problem = (
                    None,
                    f"manifest_unreadable: the partition's manifest was refused ({exc}); "
                    "its streams' context was reset",
                )
                log.error("partition.manifest_refused", partition=pid, error=str(exc))
                metrics.ERRORS.labels("snapshot_refused").inc()
        except StateStoreError as exc:
            log.error("partition.claim_failed", partition=pid, error=str(exc))
            metrics.ERRORS.labels("redis").inc()
            metrics.REDIS_UP.set(0)
            return False
        if doc is None and problem is None:
            problem = self._history_lost(tp)
        try:
            part = PartitionState(topic, partition, epoch, self.engine, self.store, self.residency, doc,
                                  manifest_problem=problem)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a stored document of the wrong shape
            problem = (f"manifest_unreadable: the partition's manifest was refused ({type(exc).__name__}: {exc}); "
                       "its streams' context was reset")
            log.error("partition.manifest_refused", partition=pid, error=f"{type(exc).__name__}: {exc}")
            metrics.ERRORS.labels("snapshot_refused").inc()
            part = PartitionState(topic, partition, epoch, self.engine, self.store, self.residency, None,
                                  manifest_problem=problem)
        part.spiller = self.checkpointer  # spills are written on the checkpoint writer thread
        self.parts[tp] = part
        if part.restored_offset is not None:
            self.source.seek(topic, partition, part.restored_offset)
        log.info("partition.assigned", partition=pid, epoch=epoch, resume_offset=part.restored_offset,
                 streams=len(part.stored))
        return True

    def _history_lost(self, tp: TopicPartition) -> str | None:
        """No checkpoint in the store: if the consumer group committed an offset, records were processed before
        and their context is gone (the store lost it); the partition's streams are told so."""
        try:
            committed = self.source.committed_offset(*tp)
        except Exception as exc:  # noqa: BLE001 - unknown: assume a first start
            log.warning("partition.committed_unknown", partition=f"{tp[0]}:{tp[1]}", error=str(exc))
            return None
        if committed is None:
            return None
        log.error("state.lost", partition=f"{tp[0]}:{tp[1]}", committed_offset=committed,
                  error="no checkpoint in the state store, but the consumer group committed an offset")
        metrics.STATE_LOSSES.inc()
        metrics.ERRORS.labels("state_lost").inc()
        return (f"state_lost: the partition's checkpoint is missing from the state store while its consumer group "
                f"had committed offset {committed}; the context of its streams was reset")

    def _revoke(self, tps: list[TopicPartition]) -> None:
        self._release(tps, lost=False)

    def _lost(self, tps: list[TopicPartition]) -> None:
        self._release(tps, lost=True)

    def _release(self, tps: list[TopicPartition], lost: bool) -> None:
        """Partitions leave this process: a revoked one is checkpointed first, a lost one (its membership is
        gone, another owner may already write) is dropped without writing."""
        for tp in tps:
            tp = (tp[0], tp[1])
            self.fenced_since.pop(tp, None)
            self.unclaimed.pop(tp, None)
            self.blocked.pop(tp, None)
            self._sought.pop(tp, None)
            self._fed_at.pop(tp, None)
            part = self.parts.pop(tp, None)
            if part is None:
                continue
            if not lost:
                self._final_checkpoint(part, "revoke")
            part.close()
            if lost:
                log.warning("partition.lost", partition=part.id, unsaved_records=part.records_since_checkpoint)
            else:
                log.info("partition.revoked", partition=part.id)
        metrics.PARTITIONS.set(len(self.parts))

    # ---- main loop ----------------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self.stop_requested = True

    def run(self, idle_exit_s: float | None = None, install_signals: bool = True) -> int:
        """Poll, process and checkpoint until SIGTERM/SIGINT (or `idle_exit_s` without records)."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        last_record = time.monotonic()
        try:
            while not self.stop_requested:
                self.health.beat()
                self._housekeeping()
                records = self._poll()
                self._check_starved(records)
                if records:
                    self._process(records)
                if records or not self.parts or self._busy():  # idle only with partitions and nothing owed
                    last_record = time.monotonic()
                if idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    log.info("service.idle_exit", idle_s=idle_exit_s)
                    break
        except BaseException as exc:
            if fatal_device_error(exc):
                self._device_failed(exc)
            raise
        finally:
            self.shutdown()
        return 0

    def _device_failed(self, exc: BaseException) -> None:
        """The accelerator failed (not out of memory): every stream's state on it may be damaged, so no
        partition is checkpointed again; the process exits and resumes from the last checkpoints."""
        for part in self.parts.values():
            part.tainted = True
        cause = exc.__cause__ if isinstance(exc, DeviceFailure) and exc.__cause__ is not None else exc
        log.critical("service.device_failed", error=f"{type(cause).__name__}: {cause}",
                     partitions=sorted(p.id for p in self.parts.values()),
                     action="exiting without a checkpoint; a restart resumes from the last one")
        if not isinstance(exc, DeviceFailure):
            raise DeviceFailure(f"the accelerator failed: {type(exc).__name__}: {exc}") from exc

    def _busy(self) -> bool:
        """Work is still owed: an unclaimed or blocked partition, a checkpoint or spill in flight, or a store
        outage (idle time does not count then: `--exit-when-idle` waits until the state is safe again)."""
        return bool(self.unclaimed or self.blocked or self.checkpointer.store_down_since is not None) or any(
            (p.in_flight is not None and not p.in_flight.idle) or p.lost or p.force_checkpoint or p.spilling
            for p in self.parts.values()
        )

    def _poll(self) -> list[Record]:
        try:
            records = self.source.poll(self.settings.kafka.max_poll_records, 0.5)
        except ConnectorError as exc:
            if self.health.kafka_down_since is None:
                self.health.kafka_down_since = time.monotonic()
                log.error("kafka.unavailable", error=str(exc))
            metrics.KAFKA_UP.set(0)
            metrics.ERRORS.labels("kafka").inc()
            self._update_readiness()
            time.sleep(1.0)
            return []
        if self._kafka_silent():
            if self.health.kafka_down_since is None:
                self.health.kafka_down_since = time.monotonic()
                log.error("kafka.unavailable", error=f"no fetch response for {KAFKA_SILENT_S:.0f} s of polling")
            metrics.KAFKA_UP.set(0)
            self._update_readiness()
            return records
        if self.health.kafka_down_since is not None:
            log.warning("kafka.available", down_s=round(time.monotonic() - self.health.kafka_down_since, 1))
            self.health.kafka_down_since = None
            metrics.KAFKA_UP.set(1)
        return records

    def _kafka_silent(self) -> bool:
        """The service kept polling for `KAFKA_SILENT_S` with fetchable partitions and no fetch response came
        (a poll gap, e.g. a long model step, starts the wait anew)."""
        now = time.monotonic()
        gap, self._last_poll = now - self._last_poll, now
        silent = self.source.silent_s()
        if silent is None or not any(not p.paused for p in self.parts.values()):
            self._waiting_since = None
            return False
        if self._waiting_since is None or gap > 2.0 or now - silent >= self._waiting_since:
            self._waiting_since = now
            return False
        return now - self._waiting_since > KAFKA_SILENT_S

    def _process(self, records: list[Record]) -> None:
        """Steps 2-5 of the loop for one poll's records (see the module docstring)."""
        pending = deque(records)
        polled = time.monotonic()
        budget_s = self.settings.kafka.max_poll_interval_ms / 1000.0 / 2
        try:
            while pending:
                if self.stop_requested or time.monotonic() - polled > budget_s:
                    for record in pending:
                        self._rewind_to.setdefault(record.tp, record.offset)
                    log.info("service.poll_cut", unprocessed=len(pending), stop=self.stop_requested)
                    return
                works = self._take_group(pending)
                if works:
                    self._run_group(works)
                self._housekeeping()
        finally:
            for (topic, partition), offset in self._rewind_to.items():
                if (topic, partition) in self.parts:
                    self.source.seek(topic, partition, offset)
                    self._sought[(topic, partition)] = offset
                    self._fed_at.pop((topic, partition), None)
            self._rewind_to.clear()

    def _take_group(self, pending: deque[Record]) -> list[RecordWork]:
        """Pop records from `pending` and prepare them until the group holds `service.batch_tokens` tokens."""
        works: list[RecordWork] = []
        tokens = 0
        while pending and tokens < self.engine.batch_tokens:
            record = pending.popleft()
            tp = record.tp
            part = self.parts.get(tp)
            if part is None or part.fenced:
                continue
            if part.paused or tp in self._rewind_to:
                self._rewind_to.setdefault(tp, record.offset)
                continue
            if part.next_offset is not None and record.offset < part.next_offset:
                continue  # delivered again before the offset the partition resumed from
            key = stream_key(record)
            due = part.advance(record)  # session_gap: streams idle that long in input time close at this record
            if due and works and any((part.id, k) in self.residency.pinned for k, _ in due):
                pending.appendleft(record)  # a stream to close has records in this group: close it after them
                break
            if any(k == key for k, _ in due):  # the record's own stream was idle too long: closed, then afresh
                self._close_streams(part, record, [d for d in due if d[0] == key])
                due = [d for d in due if d[0] != key]
            try:
                session = part.session(key)
            except GroupFull:
                if not works:  # cannot happen with max_resident_streams >= 1; never loop without progress
                    raise
                pending.appendleft(record)  # it starts the next group, once this one's sessions may be spilled
                break
            except StoreUnavailable as exc:
                self._block(part, record, str(exc))
                continue
            if due:
                self._close_streams(part, record, due)
            part.opened(key, record.offset)
            self.residency.pinned.add((part.id, key))
            work = self._prepare(part, session, record)
            works.append(work)
            tokens += work.tokens
        return works

    def _prepare(self, part: PartitionState, session: StreamSession, record: Record) -> RecordWork:
        """`engine.prepare(session, record)`, with broken-state notices; a record that makes it raise (a bug
        triggered by input) is rolled back out of the session and answered with an `error` annotation."""
        mark = session.mark()
        try:
            work = self.engine.prepare(session, record)
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the partition
            raise_if_fatal(exc)  # unless the device itself failed
            session.rollback(mark)
            log.error("record.bad_input", partition=part.id, offset=record.offset, error=f"{type(exc).__name__}: {exc}")
            metrics.ERRORS.labels("bad_input").inc()
            work = RecordWork(record, session, [], [], skip_score=True, problems=[Problem(
                reason="bad_input", message=f"the record could not be read: {type(exc).__name__}: {exc}")])
        notice = part.take_reset_notice(session.key)
        if notice is not None:
            work.problems.insert(0, Problem(reason="context_reset", message=notice))
        return work

    def _run_group(self, works: list[RecordWork]) -> None:
        """Model step for the group, then publish in input order and move offsets (steps 3 and 4)."""
        started = time.perf_counter()
        try:
            self.engine.run(works)
            for work in works:
                part = self.parts[work.record.tp]
                for closed in part.closing.pop(work.record.offset, []):  # streams closed at this record, first
                    self._send(closed)
                if work.replay:
                    part.published(None, work.record.offset)
                    continue
                annotations = self.engine.finish(work)
                for annotation in annotations:
                    self._publish(work, annotation)
                part.scored(work.session.key, annotations, work.session.judge.verdict)
                part.published(work.session.key, work.record.offset)
        except BaseException:
            for tp in {w.record.tp for w in works}:
                if tp in self.parts:
                    self.parts[tp].tainted = True
            raise
        finally:
            self.residency.pinned.clear()
        tokens = sum(w.tokens for w in works)
        seconds = time.perf_counter() - started
        metrics.RECORDS.inc(len(works))
        metrics.TOKENS.inc(tokens)
        metrics.GROUP_SECONDS.observe(seconds)
        now = time.monotonic()
        self.progress["first"] = self.progress["first"] or now - seconds
        self.progress["last"] = now
        self.progress["records"] += len(works)
        self.progress["tokens"] += tokens
        metrics.RESIDENT.set(len(self.residency))

    def _close_streams(self, part: PartitionState, record: Record, due: list[tuple[str, int]]) -> None:
        """Close the streams in `due` (idle for `service.session_gap`) at `record`: their state leaves memory and
        the next checkpoint, their `closed` annotations go out right before the record's own (and no checkpoint
        starts before they did: `PartitionState.closing`)."""
        rid = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        for key, idle in due:
            verdict, tokens = part.close_stream(key)
            tokens = int(verdict.pop("tokens_seen", tokens))
            doc = ann.closed_annotation(rid, key, ann.Verdict(**verdict), idle, part.gap_unit, tokens,
                                        self.engine.meta)
            part.closing.setdefault(record.offset, []).append(doc)
            metrics.STREAMS_CLOSED.inc()
            log.debug("session.closed", partition=part.id, stream=key, offset=record.offset, idle=idle)

    def _send(self, annotation: dict[str, Any]) -> None:
        """Publish an annotation that belongs to no record of its own stream (`closed`)."""
        self.sink.send(
            self.settings.kafka.output_topic, annotation["stream"].encode(), ann.encode(annotation),
            headers={"sinkstream-id": annotation["id"].encode(), "sinkstream-schema": ann.SCHEMA_VERSION.encode()},
        )
        metrics.ANNOTATIONS.labels(annotation["kind"]).inc()

    def _publish(self, work: RecordWork, annotation: dict[str, Any]) -> None:
        value = ann.encode_bounded(annotation, self.settings.service.max_annotation_bytes)
        key = work.session.key.encode()
        self.sink.send(
            self.settings.kafka.output_topic, key, value,
            headers={"sinkstream-id": annotation["id"].encode(), "sinkstream-schema": ann.SCHEMA_VERSION.encode()},
        )
        metrics.ANNOTATIONS.labels(annotation["kind"]).inc()
        if annotation["kind"] == "score":
            metrics.ANOMALIES.inc(sum(1 for line in annotation["score"]["lines"] if line["anomaly"]))
            metrics.STATUS.observe(work.session.key, annotation)
        elif annotation["kind"] == "error":
            dead_letter = self.settings.kafka.dead_letter_topic
            if dead_letter:
                record = work.record
                reasons = ",".join(p["reason"] for p in annotation["error"]["problems"])
                self.sink.send(
                    dead_letter,
                    record.key or b"",
                    record.value[: self.settings.service.max_annotation_bytes],
                    headers={
                        "sinkstream-id": annotation["id"].encode(),
                        "sinkstream-reason": reasons.encode(),
                        "sinkstream-source": f"{record.topic}/{record.partition}/{record.offset}".encode(),
                    },
                )

    # ---- between groups ------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        """Finish and start checkpoints, retry claims and blocked partitions, flow control, gauges."""
        cp = self.settings.checkpoint
        self.checkpointer.probe_store(STORE_PROBE_EVERY_S)
        self.checkpointer.collect()
        for part in [p for p in self.parts.values() if p.fenced and p.in_flight is None]:
            self._drop(part, "fenced")  # fenced by a checkpoint or a spill
            tp = (part.topic, part.partition)
            self.fenced_since[tp] = time.monotonic()
            self.blocked.pop(tp, None)
            self.source.pause([tp])
        now = time.monotonic()
        self._check_fenced(now)
        for part in list(self.parts.values()):
            if part.lost and part.in_flight is None and now >= self._reclaim_at.get((part.topic, part.partition), 0.0):
                self._reclaim(part)
        for tp, at in list(self.unclaimed.items()):
            if now >= at:
                if self._claim(tp):
                    del self.unclaimed[tp]
                    self.source.resume([tp])
                else:
                    self.unclaimed[tp] = now + cp.retry_max_s
        for tp, (at, _) in list(self.blocked.items()):
            if now >= at and tp in self.parts:
                del self.blocked[tp]
                self.parts[tp].paused = False
                self.source.resume([tp])
        for part in list(self.parts.values()):
            self.checkpointer.retry_spills(part)
            if part.due(cp.every_records, cp.every_seconds) and self.checkpointer.ready_to_retry(part):
                try:
                    self.checkpointer.start(part, "cadence" if part.records_since_checkpoint else "idle")
                except ConnectorError as exc:  # the flush failed: annotations after the checkpoint may be lost
                    self._replay(part, str(exc))
                    continue
            self._flow_control(part)
            age = now - part.last_checkpoint
            metrics.CHECKPOINT_AGE.labels(part.id).set(age)
            high = self.source.highwater(part.topic, part.partition)
            lag = max(0, high - part.next_offset) if high is not None and part.next_offset is not None else None
            if lag is not None:
                metrics.LAG.labels(part.id).set(lag)
            metrics.STATUS.partitions[part.id] = {
                "lag": lag, "checkpoint_age_s": age, "next_offset": part.next_offset, "resident": len(part.sessions),
            }
        self._update_readiness()

    def _reclaim(self, part: PartitionState) -> None:
        """The store lost `part`'s state while Kafka still assigns it to us: claim a fresh epoch (above the old
        one) and re-checkpoint the sessions in memory at once; streams that were only in the store are reset."""
        tp = (part.topic, part.partition)
        try:
            epoch = self.store.claim(part.id, after=part.epoch)
        except StateStoreError as exc:
            log.warning("state.reclaim_failed", partition=part.id, error=str(exc))
            metrics.ERRORS.labels("redis").inc()
            self._reclaim_at[tp] = time.monotonic() + self.settings.checkpoint.retry_max_s
            return
        self._reclaim_at.pop(tp, None)
        old = part.epoch
        kept, reset = part.recover(epoch)
        log.warning("state.reclaimed", partition=part.id, old_epoch=old, epoch=epoch, streams_kept=kept,
                    streams_reset=reset, next_offset=part.next_offset)

    def _check_fenced(self, now: float) -> None:
        """Invariant: a partition Kafka assigns to this member is processed, or the process exits non-zero. A
        fenced partition is normally revoked or lost soon (its new owner joined the group); one still assigned
        after `kafka.max_poll_interval_ms` means the group and the store disagree: exit, so a restart rejoins."""
        grace = self.settings.kafka.max_poll_interval_ms / 1000.0
        for tp, since in self.fenced_since.items():
            if now - since > grace:
                log.error("partition.fenced_but_assigned", partition=f"{tp[0]}:{tp[1]}", waited_s=round(now - since, 1))
                raise PartitionHeldIdle(
                    f"partition {tp[0]}:{tp[1]} was fenced by a newer owner in the state store, but Kafka still "
                    f"assigns it to this member after {grace:.0f} s; exiting rather than holding it idle"
                )

    def _check_starved(self, records: list[Record]) -> None:
        """Invariant (issue 19): a partition Kafka assigns to this member is processed, or the process exits
        non-zero. A partition sought back to a record it had delivered (blocked on a session, a poll cut short)
        waits for that record to come again; once the service lets it run (not paused, blocked, unclaimed or
        fenced), a source that delivers none of its records for `kafka.max_poll_interval_ms` starves it, and the
        process exits (`PartitionHeldIdle`) so that a restart rejoins the group and resumes from the
        checkpoints. The soak saw this: after two partitions were paused on "no KV slot", sought back and
        resumed, kafka-python delivered none of their records for 1.5 minutes while a third partition kept
        flowing (docs/robustness.md). Only a partition with such a known record is watched (an idle partition,
        or one whose end offset counts transaction markers, is not), and only time spent polling counts."""
        now = time.monotonic()
        grace = self.settings.kafka.max_poll_interval_ms / 1000.0
        for record in records:
            self._sought.pop(record.tp, None)  # it delivers again
        for tp, offset in list(self._sought.items()):
            part = self.parts.get(tp)
            if part is None:
                del self._sought[tp]
                continue
            held = part.paused or part.fenced or tp in self.blocked or tp in self.unclaimed
            if held or self.health.kafka_down_since is not None:
                self._fed_at[tp] = now  # held back on purpose, or the broker is away: the wait starts after
                continue
            starved = now - self._fed_at.setdefault(tp, now)
            if starved > grace:
                log.error("partition.starved", partition=part.id, offset=offset, waited_s=round(starved, 1),
                          action="exiting; a restart rejoins the group")
                metrics.ERRORS.labels("kafka").inc()
                raise PartitionHeldIdle(
                    f"partition {part.id} is assigned to this member and was sought back to offset {offset}, but "
                    f"the source delivered none of its records for {starved:.0f} s; exiting rather than holding it "
                    "idle"
                )

    def _flow_control(self, part: PartitionState) -> None:
        """Pause a partition that holds too many un-checkpointed records (store down); resume it after."""
        tp = (part.topic, part.partition)
        if tp in self.blocked:
            return
        over = part.records_since_checkpoint >= self.settings.checkpoint.max_uncheckpointed_records
        if over and not part.paused:
            part.paused = True
            self.source.pause([tp])
            log.warning("partition.paused", partition=part.id, uncheckpointed_records=part.records_since_checkpoint)
        elif part.paused and not over:
            part.paused = False
            self.source.resume([tp])
            log.info("partition.resumed", partition=part.id)

    def _block(self, part: PartitionState, record: Record, error: str) -> None:
        """A session of `part` could not be read: pause the partition and come back to `record` later."""
        tp = (part.topic, part.partition)
        _, delay = self.blocked.get(tp, (0.0, self.settings.checkpoint.retry_initial_s / 2))
        delay = min(self.settings.checkpoint.retry_max_s, delay * 2)
        self.blocked[tp] = (time.monotonic() + delay, delay)
        self._rewind_to.setdefault(tp, record.offset)
        part.paused = True
        self.source.pause([tp])
        metrics.ERRORS.labels("redis").inc()
        metrics.REDIS_UP.set(0)
        log.warning(
            "partition.blocked", partition=part.id, offset=record.offset, retry_in_s=round(delay, 2), error=error
        )

    def _replay(self, part: PartitionState, error: str) -> None:
        """Annotations after the last checkpoint may be lost: re-process the partition from that checkpoint."""
        tp = (part.topic, part.partition)
        log.error("partition.replay", partition=part.id, error=error, resume_offset=part.restored_offset)
        metrics.ERRORS.labels("kafka").inc()
        self.parts.pop(tp, None)
        part.close()
        if not self._claim(tp):
            self.unclaimed[tp] = time.monotonic() + self.settings.checkpoint.retry_initial_s
            self.source.pause([tp])

    def _drop(self, part: PartitionState, why: str) -> None:
        self.parts.pop((part.topic, part.partition), None)
        metrics.STATUS.partitions.pop(part.id, None)
        part.close()
        log.warning("partition.dropped", partition=part.id, why=why)
        metrics.PARTITIONS.set(len(self.parts))

    def _update_readiness(self) -> None:
        self.health.ready = (
            self.joined
            and self.checkpointer.store_down_since is None
            and not self.blocked
            and not self.unclaimed
            and self.health.kafka_down_since is None
        ) if hasattr(self, "checkpointer") else False
        metrics.READY.set(1 if self.health.ready else 0)

    # ---- shutdown -----------------------------------------------------------------------------------------
    def _final_checkpoint(self, part: PartitionState, reason: str) -> None:
        if part.tainted:
            log.error(
                "checkpoint.skipped",
                partition=part.id,
                reason=reason,
                why="a group of records failed part-way; the last checkpoint stays",
                resume_offset=part.restored_offset,
            )
            return
        done = self.checkpointer.checkpoint_now(part, reason, self.settings.service.shutdown_checkpoint_s)
        if not done and part.lost:  # the store forgot the partition: claim it afresh and write what we hold
            self._reclaim(part)
            done = not part.lost and self.checkpointer.checkpoint_now(
                part, reason, self.settings.service.shutdown_checkpoint_s)
        if not done:
            log.error("checkpoint.not_written", partition=part.id, reason=reason,
                      why="the store or the producer did not answer; the partition resumes from its last checkpoint")

    def shutdown(self) -> None:
        """Checkpoint every partition, commit, leave the group, close the producer."""
        parts, self.parts = list(self.parts.values()), {}
        for part in parts:
            self._final_checkpoint(part, "shutdown")
            part.close()
        self.health.ready = False
        metrics.READY.set(0)
        self.checkpointer.close()
        self.source.close()
        self.sink.close()
        log.info("service.stopped")
