"""An assigned input partition: its owner epoch, its stream sessions, and what its next checkpoint holds.

Sessions are created on demand when a record of a new stream arrives, restored lazily from the partition's
manifest when a known stream shows up again, and spilled to the state store when more than
`service.max_resident_streams` sessions are in memory across all partitions (least recently used first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import structlog

from connectors.protocols import Record
from pipeline.service.session import Engine, StreamSession, stream_key

log = structlog.get_logger(__name__)


class Residency:
    """Process-wide LRU of resident sessions, shared by all partitions."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lru: OrderedDict[tuple[str, str], PartitionState] = OrderedDict()

    def touch(self, part: PartitionState, key: str) -> None:
        self._lru[(part.id, key)] = part
        self._lru.move_to_end((part.id, key))
        while len(self._lru) > self.limit:
            (pid, cold_key), owner = next(iter(self._lru.items()))
            if (pid, cold_key) == (part.id, key):
                break
            del self._lru[(pid, cold_key)]
            owner.spill(cold_key)

    def forget(self, part_id: str) -> None:
        for entry in [e for e in self._lru if e[0] == part_id]:
            del self._lru[entry]


class PartitionState:
    """One input partition owned by this process under `epoch`."""

    def __init__(
        self, topic: str, partition: int, epoch: int, engine: Engine, store, residency: Residency,
        manifest: dict[str, Any] | None,
    ):
        self.topic, self.partition, self.epoch = topic, partition, epoch
        self.id = f"{topic}:{partition}"
        self.engine, self.store, self.residency = engine, store, residency
        self.sessions: dict[str, StreamSession] = {}
        # Streams with a stored blob (previous manifest or spilled in this epoch) that are not in memory.
        self.stored: dict[str, str] = dict((manifest or {}).get("snapshots", {}))
        self.spilled: set[str] = set()
        self.dirty: set[str] = set()
        user = (manifest or {}).get("manifest", {})
        self.restored_offset: int | None = user.get("next_offset")
        self.next_offset: int | None = self.restored_offset
        self.records_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.fenced = False

    def session(self, key: str) -> StreamSession:
        """The session of stream `key`: resident, else reloaded (spill, then manifest), else a new one."""
        session = self.sessions.get(key)
        if session is None:
            blob = self.store.load_spilled(self.id, key) if key in self.spilled else None
            if blob is None and key in self.stored:
                blob = self.store.read_snapshot(self.stored[key])
            session = StreamSession.restore(self.engine, blob) if blob is not None else StreamSession(self.engine, key)
            self.sessions[key] = session
        self.residency.touch(self, key)
        return session

    def process(self, record: Record) -> list[tuple[str, dict[str, Any]]]:
        """Fold a record into its stream; return (stream key, annotation) pairs to publish."""
        key = stream_key(record)
        session = self.session(key)
        annotations = session.process(record)
        self.dirty.add(key)
        self.next_offset = record.offset + 1
        self.records_since_checkpoint += 1
        return [(key, a) for a in annotations]

    def spill(self, key: str) -> None:
        """Move a cold session out of memory. Clean sessions are dropped (their stored blob is current)."""
        session = self.sessions.pop(key, None)
        if session is None:
            return
        if key in self.dirty or key not in self.stored and key not in self.spilled:
            self.store.spill(self.id, self.epoch, key, session.snapshot())
            self.spilled.add(key)
        log.debug("session.spilled", partition=self.id, stream=key)

    def due(self, every_records: int, every_seconds: float) -> bool:
        if self.fenced or not self.records_since_checkpoint:
            return False
        return (
            self.records_since_checkpoint >= every_records
            or time.monotonic() - self.last_checkpoint >= every_seconds
        )

    def checkpoint_payload(self) -> tuple[dict[str, bytes], list[str], dict[str, Any]]:
        """(snapshots of resident dirty sessions, streams whose stored blob is reused, user manifest)."""
        snapshots = {k: s.snapshot() for k, s in self.sessions.items() if k in self.dirty}
        known = set(self.stored) | self.spilled | set(self.sessions)
        reuse = sorted(k for k in known if k not in snapshots)
        manifest = {"next_offset": self.next_offset, "topic": self.topic, "partition": self.partition}
        return snapshots, reuse, manifest

    def checkpointed(self, doc: dict[str, Any]) -> None:
        """Bookkeeping after the manifest switched to `doc`."""
        self.stored = dict(doc["snapshots"])
        self.dirty.clear()
        self.records_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
