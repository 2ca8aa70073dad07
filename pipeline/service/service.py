"""The service: a poll loop from the input topic through stream sessions to the output topic, with checkpoints.

One process owns some partitions of the input topic (consumer group, cooperative sticky assignment, static
membership from the pod name). For each record: find the partition, the stream session, fold the record in,
publish its annotations. Checkpoints (see `pipeline.service.checkpoint`) run every N records or T seconds per
partition, when a partition is revoked, and on shutdown.

Shutdown (SIGTERM or SIGINT): the current batch is finished, every partition is checkpointed, offsets are
committed, the consumer leaves the group and the process exits 0.

The service only knows the protocols of `connectors.protocols`: it receives its sink and state store, and a
`SourceFactory` that it calls with its own rebalance callbacks (`on_assign`, `on_revoke`, `on_lost`), so the
source can report ownership changes back. `pipeline.service.wiring.build_service` builds the production
Kafka/Redis set from the settings; tests pass the in-memory connectors of `connectors.memory`.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import structlog

from connectors.protocols import CheckpointStore, PartitionCallbacks, Record, Sink, SourceFactory
from pipeline.service import metrics
from pipeline.service.scoring import encode
from pipeline.service.checkpoint import Checkpointer
from pipeline.service.partition import PartitionState, Residency
from pipeline.service.session import Engine
from pipeline.settings import Settings

log = structlog.get_logger(__name__)


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
        self.parts: dict[tuple[str, int], PartitionState] = {}
        self.residency = Residency(settings.service.max_resident_streams)
        self.health = metrics.Health(stall_after_s=settings.kafka.max_poll_interval_ms / 1000.0)
        self.stop_requested = False
        # Records and tokens handled, with the monotonic times of the first and the last (for throughput).
        self.progress: dict[str, float] = {"records": 0, "tokens": 0, "first": 0.0, "last": 0.0}
        self.source = source_factory(PartitionCallbacks(on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost))
        self.checkpointer = Checkpointer(self.source, self.sink, self.store)
        self.health.ready = True
        log.info("service.started", model=settings.model.name, fingerprint=self.engine.lm.fingerprint)

    # ---- rebalance callbacks (run inside poll) ---------------------------------------------------------------
    def _assign(self, tps: list[tuple[str, int]]) -> None:
        for topic, partition in tps:
            pid = f"{topic}:{partition}"
            epoch = self.store.claim(pid)
            doc = self.store.read_manifest(pid)
            part = PartitionState(topic, partition, epoch, self.engine, self.store, self.residency, doc)
            self.parts[(topic, partition)] = part
            if part.restored_offset is not None:
                self.source.seek(topic, partition, part.restored_offset)
            log.info("partition.assigned", partition=pid, epoch=epoch, resume_offset=part.restored_offset,
                     streams=len(part.stored))
        metrics.PARTITIONS.set(len(self.parts))

    def _revoke(self, tps: list[tuple[str, int]]) -> None:
        for tp in tps:
            part = self.parts.pop(tuple(tp), None)
            if part is not None:
                self.checkpointer.checkpoint(part, "revoke")
                self.residency.forget(part.id)
                log.info("partition.revoked", partition=part.id)
        metrics.PARTITIONS.set(len(self.parts))

    def _lost(self, tps: list[tuple[str, int]]) -> None:
        for tp in tps:
            part = self.parts.pop(tuple(tp), None)
            if part is not None:
                self.residency.forget(part.id)
                log.warning("partition.lost", partition=part.id, unsaved_records=part.records_since_checkpoint)
        metrics.PARTITIONS.set(len(self.parts))

    # ---- main loop ----------------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self.stop_requested = True

    def run(self, idle_exit_s: float | None = None, install_signals: bool = True) -> int:
        """Poll, process and checkpoint until SIGTERM/SIGINT (or `idle_exit_s` without records)."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        cp = self.settings.checkpoint
        last_record = time.monotonic()
        try:
            while not self.stop_requested:
                self.health.beat()
                records = self.source.poll(self.settings.kafka.max_poll_records, 0.5)
                for record in records:
                    self._handle(record)
                if records or not self.parts:  # idle time counts only while partitions are assigned
                    last_record = time.monotonic()
                for part in list(self.parts.values()):
                    if part.due(cp.every_records, cp.every_seconds):
                        self._checkpoint_or_drop(part, "cadence")
                if idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    log.info("service.idle_exit", idle_s=idle_exit_s)
                    break
        finally:
            self.shutdown()
        return 0

    def _handle(self, record: Record) -> None:
        part = self.parts.get((record.topic, record.partition))
        if part is None or part.fenced:
            return
        start, began = time.perf_counter(), time.monotonic()
        for key, annotation in part.process(record):
            self.sink.send(
                self.settings.kafka.output_topic, key.encode(), encode(annotation),
                headers={"sinkstream-id": annotation["id"].encode(), "sinkstream-schema": b"v1"},
            )
            metrics.ANNOTATIONS.labels(annotation["kind"]).inc()
            if annotation["kind"] == "score":
                metrics.TOKENS.inc(annotation["score"]["tokens"])
                self.progress["tokens"] += annotation["score"]["tokens"]
                metrics.ANOMALIES.inc(sum(1 for line in annotation["score"]["lines"] if line["anomaly"]))
        metrics.RECORDS.inc()
        self.progress["first"] = self.progress["first"] or began
        self.progress["last"] = time.monotonic()
        self.progress["records"] += 1
        metrics.RESIDENT.set(sum(len(p.sessions) for p in self.parts.values()))
        metrics.STEP_SECONDS.observe(time.perf_counter() - start)

    def _checkpoint_or_drop(self, part: PartitionState, reason: str) -> None:
        if not self.checkpointer.checkpoint(part, reason):
            self.parts.pop((part.topic, part.partition), None)
            self.residency.forget(part.id)

    def shutdown(self) -> None:
        """Checkpoint every partition, commit, leave the group, close the producer."""
        for part in list(self.parts.values()):
            try:
                self._checkpoint_or_drop(part, "shutdown")
            except Exception as exc:
                log.error("shutdown.checkpoint_failed", partition=part.id, error=str(exc))
        self.health.ready = False
        self.source.close()
        self.sink.close()
        log.info("service.stopped")
