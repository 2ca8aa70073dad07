"""An assigned input partition: its owner epoch, its stream sessions, and what its next checkpoint holds.

Sessions are created on demand when a record of a new stream arrives, restored lazily from the partition's
manifest when a known stream shows up again, and spilled to the state store when the KV backend has no stream
slot left for another one (`service.max_resident_streams` across all partitions; least recently used first).

Offsets: `next_offset` is the offset after the last record whose annotations were accepted by the sink. It is
the only offset a checkpoint may claim, and it moves only in `published()`.

Broken state never stops a partition: a stored blob that is missing, damaged, foreign (another model) or of
another dtype is refused with a log line and a metric, the stream starts afresh, and `context_resets` holds
the reason until the stream's next record carries it in an `error` annotation. Pending notices are part of
the checkpoint manifest (`context_resets`), so a restart still delivers them, at the same records.

Lost state is not fencing: when the store forgot the partition (its epoch key missing, `StateLostError`; or a
blob a checkpoint reuses is gone) `lost` is set, the service claims a fresh epoch and calls `recover`: the
sessions in memory are whole (they hold every published record), so they are all written by the next
checkpoint, which is due at once; the streams that were only in the store lost their context and get a
`context_reset` notice on their next record.

A partition-wide notice (`context_resets["*"]`: the manifest was unreadable, or missing while the consumer group
had a committed offset) is given to every stream that starts without stored state in this partition from then
on: which streams had context before is unknown.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from connectors.errors import FencedError, MissingSnapshotError, StateLostError, StateStoreError
from connectors.protocols import CheckpointStore
from model.device_errors import raise_if_fatal
from pipeline.service import metrics
from pipeline.service.backend import CacheFull, KVSlots
from pipeline.service.engine import Engine
from pipeline.service.session import SessionCapture, StreamSession
from pipeline.service.templates import TemplateMemory
from pipeline.service.verdict import Verdict

log = structlog.get_logger(__name__)


@dataclass
class PendingSpill:
    """A spilled session on its way to the store: captured on the model thread (its KV slot is free again),
    serialized and written by the checkpoint writer thread (`Checkpointer.spill`)."""

    key: str
    capture: SessionCapture
    change: int | None  # the stream's dirty change number at capture time (None: it was clean)
    blob: bytes | None = None  # serialized, once (by the writer, or by the model thread taking it back)
    failed: BaseException | None = None  # the last write failed: written again at `retry_at`
    retry_at: float = 0.0
    cancelled: bool = False  # the stream came back before its spill was confirmed: the capture was restored

    def serialized(self) -> bytes:
        if self.blob is None:
            self.blob = self.capture.serialize()
        return self.blob


class Spiller(Protocol):
    """Who writes spilled sessions off the model thread (the service's `Checkpointer`)."""

    def spill(self, part: PartitionState, pending: PendingSpill) -> bool:
        """Queue `pending` for the writer thread; False when too many spills are unconfirmed (store down)."""


class GroupFull(RuntimeError):
    """Every resident session has records in the group being prepared: run the group before this record."""


class StoreUnavailable(RuntimeError):
    """The state store did not answer while a session had to be read or written; retry later."""


@dataclass
class CheckpointTicket:
    """What an in-flight checkpoint covers, so that its completion clears exactly that (see `checkpointed`)."""

    offset: int
    records: int  # records_since_checkpoint at capture time
    changes: dict[str, int]  # stream -> change number captured
    started: float  # monotonic time of the capture
    idle: bool = False  # nothing new: rewrites the same checkpoint to see that the store still has it


class Residency:
    """Process-wide LRU of resident sessions, shared by all partitions. How many fit is not kept here: the KV
    backend's `KVSlots` answers (`room`), and a stream becomes resident only when it says yes."""

    def __init__(self, slots: KVSlots):
        self.slots = slots
        self._lru: OrderedDict[tuple[str, str], PartitionState] = OrderedDict()
        # Sessions with records in the group being prepared: never spilled before the group ran.
        self.pinned: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, part: PartitionState, key: str) -> None:
        self._lru[(part.id, key)] = part
        self._lru.move_to_end((part.id, key))

    def make_room(self, part: PartitionState, key: str) -> bool:
        """Before a stream becomes resident: spill the coldest sessions until `slots` has a stream slot for it.
        False when none could be spilled (the store is down: they stay resident); raises `GroupFull` when every
        resident session has records in the group being prepared."""
        for (pid, cold_key), owner in list(self._lru.items()):
            if self.slots.room("stream") > 0:
                break
            if (pid, cold_key) != (part.id, key) and (pid, cold_key) not in self.pinned and owner.spill(cold_key):
                del self._lru[(pid, cold_key)]
        if self.slots.room("stream") <= 0 and self.pinned >= set(self._lru):
            raise GroupFull(f"all {len(self._lru)} resident sessions have records in the group being prepared")
        return self.slots.room("stream") > 0

    def drop(self, part_id: str, key: str) -> None:
        """One session left memory for good (its stream was closed)."""
        self._lru.pop((part_id, key), None)
        self.pinned.discard((part_id, key))

    def forget(self, part_id: str) -> None:
        for entry in [e for e in self._lru if e[0] == part_id]:
            del self._lru[entry]


class PartitionState:
    """One input partition owned by this process under `epoch`."""

    def __init__(
        self, topic: str, partition: int, epoch: int, engine: Engine, store: CheckpointStore,
        residency: Residency, manifest: dict[str, Any] | None, *, manifest_problem: str | None = None,
    ):
        self.topic, self.partition, self.epoch = topic, partition, epoch
        self.id = f"{topic}:{partition}"
        self.engine, self.store, self.residency = engine, store, residency
        self.sessions: dict[str, StreamSession] = {}
        # Streams with a stored blob (previous manifest) that are not in memory, and those spilled this epoch.
        self.stored: dict[str, str] = dict((manifest or {}).get("snapshots", {}))
        self.spilled: set[str] = set()
        # Spilled sessions the writer has not confirmed yet (`spill`); no checkpoint starts while there are any.
        self.spilling: dict[str, PendingSpill] = {}
        # Writes spills on the checkpoint writer thread; None: written synchronously (tools and tests).
        self.spiller: Spiller | None = None
        # Stream -> change number of its last change not yet covered by a completed checkpoint.
        self.dirty: dict[str, int] = {}
        self._changes = 0
        user = (manifest or {}).get("manifest", {})
        self.restored_offset: int | None = user.get("next_offset")
        self.next_offset: int | None = self.restored_offset
        self.records_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.fenced = False
        # A group of records failed part-way: sessions and offset may disagree, so never checkpoint this state.
        self.tainted = False
        self.in_flight: CheckpointTicket | None = None
        self.paused = False
        # Why streams lost their context (broken state); reported on their next record. "*": the whole partition
        # (every stream that starts without stored state gets it). Kept in the checkpoint manifest.
        self.context_resets: dict[str, str] = dict(user.get("context_resets", {}))
        if manifest_problem:
            self.context_resets["*"] = manifest_problem
        # Session lifecycle (`service.session_gap`), in the partition's input time (offsets or record timestamps):
        # the clock, each open stream's last input time (oldest first) and running verdict, recently closed keys.
        svc = engine.settings.service
        self.gap, self.gap_unit, self.closed_limit = svc.session_gap, svc.session_gap_unit, svc.closed_keys_remembered
        self.clock: int | None = user.get("clock")
        self.open: OrderedDict[str, int] = OrderedDict((k, int(t)) for k, t in user.get("open", []))
        self.verdicts: dict[str, dict[str, Any]] = dict(user.get("verdicts", {}))
        self.closed_keys: OrderedDict[str, int] = OrderedDict((k, int(t)) for k, t in user.get("closed", []))
        # `closed` annotations decided at a record (offset) and published with it; no checkpoint meanwhile.
        self.closing: dict[int, list[dict[str, Any]]] = {}
        # The store lost this partition's state (why): the service claims a fresh epoch and calls `recover`.
        self.lost: str | None = None
        # Checkpoint as soon as possible, even without new records (after `recover`).
        self.force_checkpoint = False
        # The partition's template memory (issue 18), saved in its manifest at every checkpoint.
        self.templates = self._templates(user.get("templates"))

    def _templates(self, saved: dict[str, Any] | None) -> TemplateMemory | None:
        """The template memory the manifest saved, else a new one (a copy of the reference, or empty)."""
        fresh = self.engine.new_template_memory()
        if fresh is None or saved is None:
            return fresh
        try:
            return TemplateMemory.from_state(self.engine.settings.templates, saved)
        except Exception as exc:  # noqa: BLE001 - a damaged memory must not stop the partition
            log.error("partition.templates_refused", partition=self.id, error=f"{type(exc).__name__}: {exc}")
            metrics.ERRORS.labels("snapshot_refused").inc()
            return fresh

    # ---- sessions ---------------------------------------------------------------------------------------
    def session(self, key: str) -> StreamSession:
        """The session of stream `key`: resident, else reloaded (spill, then manifest), else a new one.

        Raises `StoreUnavailable` when the store does not answer (the record must wait: never process a
        record against an empty session because Redis was down).
        """
        session = self.sessions.get(key)
        if session is None:
            if not self.residency.make_room(self, key):  # spills failed (store down): no KV slot for it yet
                raise StoreUnavailable(f"no KV slot for stream {key!r} of {self.id}: no cold stream could be "
                                       f"spilled ({self.residency.slots.describe()})")
            pending = self.spilling.pop(key, None)
            session = self._load(key) if pending is None else self._take_back(pending)
            self.sessions[key] = session
        self.residency.touch(self, key)
        return session

    def _load(self, key: str) -> StreamSession:
        try:
            blob = self.store.load_spilled(self.id, key) if key in self.spilled else None
            if blob is None and key in self.stored:
                blob = self.store.read_snapshot(self.stored[key])
            if blob is None and key in self.spilled:  # the spill index forgot it (state lost)
                raise MissingSnapshotError(key, f" (spilled session of partition {self.id!r}: its index entry is gone)")
        except MissingSnapshotError as exc:
            return self._fresh(key, "snapshot_missing", str(exc))
        except StateStoreError as exc:
            raise StoreUnavailable(f"reading the state of stream {key!r} of {self.id}: {exc}") from exc
        if blob is None and key in self.closed_keys:
            closed_at = self.closed_keys.pop(key)
            self.context_resets.setdefault(
                key, f"session_closed: the stream was closed after {self.gap} {self.gap_unit} without a record "
                f"(at input time {closed_at}); it starts afresh")
        if blob is None:
            partition_notice = self.context_resets.get("*")
            if partition_notice is not None:
                self.context_resets.setdefault(key, partition_notice)
            return StreamSession(self.engine, key, templates=self.templates)
        try:
            session = StreamSession.restore(self.engine, blob, templates=self.templates)
        except CacheFull:  # a bug (`make_room` said yes), not a damaged blob
            raise
        except Exception as exc:  # noqa: BLE001 - SnapshotError, or anything a damaged blob provokes: never a crash loop
            raise_if_fatal(exc)  # a failed device is not a damaged blob: never reset a stream for it
            return self._fresh(key, "snapshot_refused", f"{type(exc).__name__}: {exc}")
        metrics.STREAMS_RELOADED.inc()
        return session

    def _take_back(self, pending: PendingSpill) -> StreamSession:
        """A stream whose spill is not confirmed yet came back: its session again, from the capture (exact)."""
        pending.cancelled = True  # the writer's result, if any, is ignored; the session is dirty again
        session = StreamSession.restore(self.engine, pending.serialized(), templates=self.templates)
        self.changed(pending.key)
        metrics.STREAMS_RELOADED.inc()
        return session

    def _fresh(self, key: str, reason: str, detail: str) -> StreamSession:
        log.error("session.state_refused", partition=self.id, stream=key, reason=reason, error=detail)
        metrics.ERRORS.labels("snapshot_refused").inc()
        self.context_resets[key] = f"{reason}: the stream's stored state was refused ({detail}); its context was reset"
        self.stored.pop(key, None)
        self.spilled.discard(key)
        self.changed(key)  # the fresh session must replace the refused blob at the next checkpoint
        return StreamSession(self.engine, key, templates=self.templates)

    def close(self) -> None:
        """The partition leaves this process: give every resident session's KV slot back."""
        for session in self.sessions.values():
            session.release()
        self.sessions.clear()
        for pending in self.spilling.values():
            pending.cancelled = True
        self.spilling.clear()
        self.residency.forget(self.id)

    def take_reset_notice(self, key: str) -> str | None:
        """The reason this stream's context was reset, once; None when it was not."""
        return self.context_resets.pop(key, None)

    def mark_lost(self, error: BaseException) -> None:
        """The store lost this partition's state (`StateLostError`, or a blob a checkpoint reuses is gone): log and
        count it once; the service claims a fresh epoch and calls `recover`."""
        if self.lost is not None:
            return
        self.lost = f"{type(error).__name__}: {error}"
        log.error("state.lost", partition=self.id, epoch=self.epoch, error=self.lost,
                  resident_streams=len(self.sessions), uncheckpointed_records=self.records_since_checkpoint)
        metrics.STATE_LOSSES.inc()
        metrics.ERRORS.labels("state_lost").inc()

    def recover(self, epoch: int) -> tuple[int, int]:
        """After the store lost this partition's state and a fresh `epoch` was claimed: every resident session
        is written by the next checkpoint (forced now); streams that lived only in the store start afresh with a
        `context_reset` notice. Returns (streams kept, streams reset)."""
        why = self.lost or "the state store lost the partition's state"
        self.epoch = epoch
        lost = sorted((set(self.stored) | self.spilled) - set(self.sessions) - set(self.spilling))
        for key in lost:
            self.context_resets[key] = (f"state_lost: the state store lost this stream's stored context ({why}); "
                                        "its context was reset")
        self.stored.clear()
        self.spilled.clear()
        for key in sorted(self.sessions):
            self.changed(key)
        self.lost = None
        self.force_checkpoint = True
        return len(self.sessions), len(lost)

    def spill(self, key: str) -> bool:
        """Move a cold session out of memory; False when it must stay (store down, checkpoint in flight).

        Clean sessions are dropped (their stored blob is current). A dirty one is captured here and written by
        the checkpoint writer thread (`spiller`): its KV slot is free at once, and until the writer confirms
        the write the stream is in `spilling` (a record of it takes the capture back; no checkpoint starts).
        """
        session = self.sessions.get(key)
        if session is None:
            return True
        if self.in_flight is not None:  # the in-flight checkpoint may still read this stream's spill slot
            return False
        if key in self.dirty or (key not in self.stored and key not in self.spilled):
            if self.spiller is None:
                if not self._write_spill(key, session.snapshot()):
                    return False
                self.spilled.add(key)
                self.dirty.pop(key, None)
            else:
                pending = PendingSpill(key, session.capture(), self.dirty.get(key))
                if not self.spiller.spill(self, pending):
                    return False
                self.spilling[key] = pending
        del self.sessions[key]
        session.release()
        metrics.STREAMS_SPILLED.inc()
        log.debug("session.spilled", partition=self.id, stream=key)
        return True

    def _write_spill(self, key: str, blob: bytes) -> bool:
        """`spill` without a writer thread (tools and tests): write here; False when the store refused."""
        try:
            self.store.spill(self.id, self.epoch, key, blob)
        except StateStoreError as exc:
            self.spill_failed(key, exc)
            return False
        return True

    def spilled_ok(self, pending: PendingSpill) -> None:
        """The writer wrote `pending` (model thread, `Checkpointer.collect`)."""
        if self.spilling.get(pending.key) is not pending:
            return  # taken back meanwhile, or the partition moved on
        del self.spilling[pending.key]
        self.spilled.add(pending.key)
        if pending.change is not None and self.dirty.get(pending.key) == pending.change:
            del self.dirty[pending.key]

    def spill_failed(self, key: str, exc: BaseException) -> None:
        """A spill write failed: a lost state or a newer owner is handled as for a checkpoint; a pending spill
        stays pending (the capture is kept) and is written again later (`Checkpointer.retry_spills`)."""
        log.warning("session.spill_failed", partition=self.id, stream=key, error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, StateLostError):
            self.mark_lost(exc)
        elif isinstance(exc, FencedError):  # a newer owner: the service drops the partition
            self.fenced = True

    # ---- session lifecycle (service.session_gap) -----------------------------------------------------------
    def advance(self, record: Any) -> list[tuple[str, int]]:
        """Move the partition's input clock to `record` and return the open streams idle for the gap by then,
        oldest first, with how long they were idle. Deterministic: only the input and the checkpointed state
        decide (a replay closes the same streams at the same records)."""
        if not self.gap:
            return []
        t = record.offset if self.gap_unit == "records" else record.timestamp_ms
        if t is not None and t >= 0:
            self.clock = t if self.clock is None else max(self.clock, t)
        if self.clock is None:
            return []
        due = []
        for key, last in self.open.items():
            if self.clock - last < self.gap:
                break
            due.append((key, self.clock - last))
        return due

    def opened(self, key: str, offset: int) -> None:
        """A record of `key` is about to be processed: it is the stream's latest input."""
        if not self.gap:
            return
        self.open[key] = self.clock if self.clock is not None else 0
        self.open.move_to_end(key)
        self.verdicts.setdefault(key, {"first_offset": offset})

    def scored(self, key: str, annotations: list[dict[str, Any]], verdict: Verdict) -> None:
        """After a record of `key` was published: keep a copy of the stream's running verdict (the session's,
        `pipeline.service.verdict.Verdict`) and its tokens seen, for its `closed` annotation."""
        if not self.gap:
            return
        v = {**verdict.model_dump(mode="json"), "tokens_seen": self.verdicts.get(key, {}).get("tokens_seen", 0)}
        for a in annotations:
            v["tokens_seen"] = a["tokens_seen"]
        self.verdicts[key] = v

    def close_stream(self, key: str) -> tuple[dict[str, Any], int]:
        """Close `key`'s session: drop it from memory and from the next checkpoint (whose commit deletes its
        blobs), remember the key as closed. Returns (its running verdict, its tokens seen)."""
        session = self.sessions.pop(key, None)
        tokens = 0
        if session is not None:
            tokens = session.tokens_seen
            session.release()
        self.residency.drop(self.id, key)
        pending = self.spilling.pop(key, None)
        if pending is not None:
            pending.cancelled = True
        self.stored.pop(key, None)
        self.spilled.discard(key)
        self.dirty.pop(key, None)
        self.context_resets.pop(key, None)
        self.open.pop(key, None)
        verdict = self.verdicts.pop(key, {})
        if self.closed_limit:
            self.closed_keys[key] = self.clock if self.clock is not None else 0
            self.closed_keys.move_to_end(key)
            while len(self.closed_keys) > self.closed_limit:
                self.closed_keys.popitem(last=False)
        self._changes += 1  # the next checkpoint must drop it even when nothing else changed
        return verdict, tokens

    # ---- offsets and checkpoints --------------------------------------------------------------------------
    def changed(self, key: str) -> None:
        self._changes += 1
        self.dirty[key] = self._changes

    def published(self, key: str | None, offset: int) -> None:
        """The record at `offset` is done: its annotations were accepted by the sink (or it was a replay)."""
        if key is not None:
            self.changed(key)
        self.next_offset = offset + 1
        self.records_since_checkpoint += 1

    def due(self, every_records: int, every_seconds: float) -> bool:
        if self.fenced or self.tainted or self.lost or self.in_flight is not None or self.closing:
            return False
        if self.force_checkpoint and self.next_offset is not None:
            return True
        if not self.records_since_checkpoint:  # idle: every `every_seconds`, check the store still has our state
            return self.next_offset is not None and time.monotonic() - self.last_checkpoint >= every_seconds
        return (
            self.records_since_checkpoint >= every_records
            or time.monotonic() - self.last_checkpoint >= every_seconds
        )

    def capture(self) -> tuple[list[tuple[str, StreamSession]], list[str], dict[str, Any], CheckpointTicket]:
        """On the model thread: (resident dirty sessions to capture now, streams whose stored blob is reused,
        user manifest, ticket). The caller captures the sessions before the model thread moves on; every spill
        is confirmed by then (`Checkpointer.start`)."""
        assert not self.spilling, "a checkpoint started while spills were unconfirmed"
        dirty = [(k, s) for k, s in sorted(self.sessions.items()) if k in self.dirty]
        captured = {k for k, _ in dirty}
        known = set(self.stored) | self.spilled | set(self.sessions)
        reuse = sorted(k for k in known if k not in captured)
        assert self.next_offset is not None
        manifest: dict[str, Any] = {"next_offset": self.next_offset, "topic": self.topic, "partition": self.partition}
        if self.context_resets:
            manifest["context_resets"] = dict(sorted(self.context_resets.items()))
        if self.gap:
            manifest.update({"clock": self.clock, "open": [[k, t] for k, t in self.open.items()],
                             "verdicts": {k: dict(v) for k, v in self.verdicts.items()},
                             "closed": [[k, t] for k, t in self.closed_keys.items()]})
        if self.templates is not None:  # a copy as of now: the model thread moves on while the writer writes
            manifest["templates"] = self.templates.to_json()
        ticket = CheckpointTicket(
            self.next_offset, self.records_since_checkpoint, {k: self.dirty[k] for k in captured}, time.monotonic()
        )
        return dirty, reuse, manifest, ticket

    def checkpointed(self, ticket: CheckpointTicket, doc: dict[str, Any]) -> None:
        """Bookkeeping after the manifest switched to `doc` (covering what `ticket` captured)."""
        # Streams closed while the checkpoint was in flight stay out (its next checkpoint drops their blobs).
        known = set(self.stored) | set(self.sessions) | self.spilled
        self.stored = {k: v for k, v in doc["snapshots"].items() if k in known}
        for key, change in ticket.changes.items():
            if self.dirty.get(key) == change:  # not changed again while the checkpoint was written
                del self.dirty[key]
        self.records_since_checkpoint -= ticket.records
        self.last_checkpoint = ticket.started
