"""Checkpointing a partition: the commit order that makes "resume exactly where it stopped" true.

A checkpoint of partition P at offset N means: every record of P before N is folded into the snapshots the
manifest references, and every annotation of those records is in the output topic. Restoring it and
seeking to N replays nothing twice into state; annotations of records after the last checkpoint are
published again with the same ids and the same values, and subscribers drop them by id.

The commit order (each step only starts once the one before it succeeded):

1. Flush the producer: all annotations of records before N are acknowledged by the broker.
2. Write the snapshots of streams that changed since the last checkpoint, under new keys (the last good
   checkpoint stays intact if we die here).
3. Write the manifest: a compare-and-set on the owner epoch switches the pointer to the new snapshots and
   offset N. A zombie that lost the partition is refused here (`FencedError`).
4. Commit N to Kafka. For monitoring only: the manifest in Redis is the source of truth (as in Flink and
   Bytewax), which also sidesteps tansu's dropped commit metadata.
"""

from __future__ import annotations

import time

import structlog

from connectors.errors import FencedError
from pipeline.service import metrics
from pipeline.service.partition import PartitionState

log = structlog.get_logger(__name__)


class Checkpointer:
    """Runs the commit order for partitions; one per service process."""

    def __init__(self, source, sink, store, flush_timeout_s: float = 30.0):
        self.source, self.sink, self.store = source, sink, store
        self.flush_timeout_s = flush_timeout_s

    def checkpoint(self, part: PartitionState, reason: str) -> bool:
        """Checkpoint `part`; returns False when it was fenced (the caller must drop the partition).

        Raises on producer or store failures other than fencing: nothing is lost then (the previous
        checkpoint stays valid), and the runner stops so that a restart replays from it.
        """
        if part.fenced or part.next_offset is None or not part.records_since_checkpoint:
            return not part.fenced
        start = time.perf_counter()
        # Step 1: flush the producer.
        self.sink.flush(self.flush_timeout_s)
        # Step 2: write the snapshots (inside write_checkpoint, under new keys, before the pointer switch).
        snapshots, reuse, manifest = part.checkpoint_payload()
        try:
            # Step 3: write the manifest (compare-and-set on the owner epoch).
            doc = self.store.write_checkpoint(part.id, part.epoch, snapshots, manifest, reuse=reuse)
        except FencedError as exc:
            part.fenced = True
            log.error("checkpoint.fenced", partition=part.id, epoch=part.epoch, error=str(exc))
            metrics.FENCED.inc()
            return False
        part.checkpointed(doc)
        # Step 4: commit offsets to Kafka (monitoring only).
        try:
            self.source.commit({(part.topic, part.partition): part.next_offset})
        except Exception as exc:  # a failed commit loses nothing: the manifest already holds the offset
            log.warning("checkpoint.commit_failed", partition=part.id, error=str(exc))
        seconds = time.perf_counter() - start
        metrics.CHECKPOINT_SECONDS.observe(seconds)
        metrics.CHECKPOINT_BYTES.inc(sum(len(b) for b in snapshots.values()))
        log.info(
            "checkpoint.done", partition=part.id, reason=reason, offset=part.next_offset,
            streams_written=len(snapshots), streams_reused=len(reuse), ms=round(1000 * seconds, 1),
        )
        return True
