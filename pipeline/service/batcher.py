"""The model step of a group of records in score mode: every stream's tokens through the shared model, failures
isolated.

A group holds the prepared records (`RecordWork`) of many streams, in input order. Each stream's records enter
its cache in order, each record in forward passes of at most `cache.chunk` tokens cut by the record's own
content (so results never depend on how a poll grouped the records), with the stream's own `prev_logits`; the
per-token NLLs go onto the records. Right after each record, `StreamSession.after_step` notes the token count
and generates a due note, so both describe exactly that point of the stream.

- Pooled backend (`PoolBackend`): round after round, every stream with tokens left contributes its next chunk
  and the chunks go through ONE packed forward pass, up to `service.batch_tokens` tokens per pass.
- One cache per stream (`SinkBackend`): streams are stepped one after another.

Failure isolation. A pooled forward that raises leaves every stream where it was (`model.pool_step`,
"Failures"); its streams are then retried one by one (on CUDA out-of-memory this is the retry with a smaller
batch), and a stream that fails alone is rolled back to the start of its failing record and its records left in
the group get `step.error` set; the other streams go on. A record longer than one pass is fed only with a
backup taken before it (`PoolBackend.take_backup`: the kept-window columns it will overwrite, or a whole slot
from `KVSlots` when a frame move falls inside it): when no slot is free such a record waits within the group
until another stream's backup is given back; it never runs without one. With one cache per stream a
failing stream is rolled back to before the group. An exception that is not an ordinary failure of the step
(KeyboardInterrupt, SystemExit) propagates, and so does a failure of the device itself (an illegal memory access,
a device-side assert: `model.device_errors`), as `DeviceFailure`: the service then exits without a checkpoint
and restarts from the last one.
"""

from __future__ import annotations

import time

import structlog
import torch

from model.device_errors import raise_if_fatal
from model.sink_cache import SinkCache
from pipeline.service import metrics
from pipeline.service.backend import Backup, PoolBackend, SinkBackend
from pipeline.service.session import RecordWork, StreamSession

log = structlog.get_logger(__name__)


class Batcher:
    """Runs the model over the records of a group (one list per stream, `session.by_stream`)."""

    def run(self, groups: list[list[RecordWork]]) -> None:
        if not groups:
            return
        engine = groups[0][0].session.engine
        backend = engine.backend
        if isinstance(backend, PoolBackend):
            _PooledRun(backend, groups, engine.batch_tokens).run()
            return
        for stream_works in groups:
            self._run_stream(stream_works[0].session, stream_works)

    def _run_stream(self, session: StreamSession, works: list[RecordWork]) -> None:
        """Feed one stream's records in order, each in forward passes cut by its own content (so results are
        bit-identical however a poll grouped the records); on failure, roll the stream back to before the group."""
        cache = session.cache
        assert isinstance(cache, SinkCache)  # the per-stream path: one SinkCache each (see make_backend)
        before = (cache.state(), session.last_logits, session.counters.next_note_at)
        start = time.perf_counter()
        results: list[torch.Tensor | None] = []
        try:
            for w in works:
                if w.skip_score:  # nothing to feed; its annotations still report the stream at this point
                    w.step.tokens_seen = session.tokens_seen
                    results.append(None)
                    continue
                if w.reset:
                    session.reset_cache()
                ids = [t for line in w.token_lists for t in line]
                nll, last = self._step(session, ids) if ids else (torch.empty(0), None)
                results.append(nll)
                if last is not None:
                    session.last_logits = last
                session.after_step(w)
        except Exception as exc:  # noqa: BLE001 - any failure of one stream's step is isolated to that stream
            raise_if_fatal(exc)  # the device itself failed: nothing on it can be trusted, the process must go
            cache.restore(before[0])
            session.last_logits, session.counters.next_note_at = before[1], before[2]
            tokens = sum(w.tokens for w in works)
            reason = f"model step failed for stream {session.key!r} ({tokens} tokens): {type(exc).__name__}: {exc}"
            log.error("model.step_failed", stream=session.key, tokens=tokens, error=f"{type(exc).__name__}: {exc}")
            metrics.ERRORS.labels("model_step").inc()
            for w in works:
                w.step.tokens_seen, w.step.note = None, None
                if not w.skip_score:
                    w.step.error = reason
            return
        metrics.MODEL_STEP_SECONDS.observe(time.perf_counter() - start)
        metrics.BATCH_TOKENS.observe(sum(w.tokens for w in works))
        metrics.BATCH_STREAMS.observe(1)
        for w, result in zip(works, results):
            if result is not None:
                w.step.nll = result

    def _step(self, session: StreamSession, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        backend = session.engine.backend
        assert isinstance(backend, SinkBackend)  # the per-stream path: one SinkCache each (see make_backend)
        runner, cache = backend.runner, session.cache
        assert isinstance(cache, SinkCache)
        try:
            return runner.nll(cache, ids, prev_logits=session.last_logits)
        except torch.OutOfMemoryError:
            # The cache was rolled back; retry once in forward passes of a quarter of the chunk (exact chunking
            # makes the result independent of the split on architectures that support it).
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            saved = cache.max_chunk
            cache.max_chunk = max(1, saved // 4)
            log.warning("model.oom_retry", stream=session.key, tokens=len(ids), chunk=cache.max_chunk)
            try:
                return runner.nll(cache, ids, prev_logits=session.last_logits)
            finally:
                cache.max_chunk = saved


class _Lane:
    """One stream's place in a pooled group: its records, the record being fed and how far."""

    def __init__(self, works: list[RecordWork]):
        self.session = works[0].session
        self.works = works
        self.index = 0  # record being fed
        self.pos = 0  # tokens of it fed so far
        self.ids: list[int] = []
        self.pieces: list[torch.Tensor] = []
        self.backup: Backup | None = None  # taken before a record longer than one pass
        self.last_before: torch.Tensor | None = None  # the stream's prev_logits when the backup was taken
        self._load()

    def _load(self) -> None:
        w = self.current
        self.ids = [] if w is None else [t for line in w.token_lists for t in line]
        self.pos, self.pieces = 0, []
        if w is not None and w.reset and not w.skip_score:  # `sinkstream-reset`: a fresh cache, in order
            self.session.reset_cache()

    @property
    def current(self) -> RecordWork | None:
        return self.works[self.index] if self.index < len(self.works) else None

    def settle(self) -> None:
        """Finish records with nothing (left) to feed: skipped ones, empty ones, fully fed ones."""
        while (w := self.current) is not None:
            if w.skip_score:
                w.step.tokens_seen = self.session.tokens_seen
            elif self.pos < len(self.ids):
                return
            else:
                w.step.nll = torch.cat(self.pieces) if self.pieces else torch.empty(0)
                self.session.after_step(w)
            self.index += 1
            self._load()

    @property
    def slot(self) -> int:
        assert isinstance(self.session.cache, int)  # the pooled path: handles are slot numbers
        return self.session.cache

    def fail(self, reason: str) -> None:
        for w in self.works[self.index :]:
            w.step.tokens_seen, w.step.note = None, None
            if not w.skip_score:
                w.step.error = reason
        self.index = len(self.works)


class _PooledRun:
    """The rounds of one group on the pooled backend (see the module docstring)."""

    def __init__(self, backend: PoolBackend, groups: list[list[RecordWork]], budget: int):
        self.backend = backend
        self.budget = budget
        self.lanes = [_Lane(works) for works in groups]

    def run(self) -> None:
        try:
            while True:
                for lane in self.lanes:
                    lane.settle()
                active = [lane for lane in self.lanes if lane.current is not None]
                if not active:
                    return
                batch: list[tuple[_Lane, list[int]]] = []
                used = 0
                for lane in active:
                    if not self._ready(lane):  # a multi-pass record waits for a backup slot
                        continue
                    chunk = lane.ids[lane.pos : lane.pos + self.backend.chunk]
                    if batch and used + len(chunk) > self.budget:
                        break
                    batch.append((lane, chunk))
                    used += len(chunk)
                if not batch:  # cannot happen (see `_ready`); never loop without progress
                    raise RuntimeError(f"no stream of the group can go on ({self.backend.slots.describe()})")
                self._forward(batch)
        finally:
            for lane in self.lanes:
                self._drop_backup(lane)

    def _ready(self, lane: _Lane) -> bool:
        """A lane may feed its next chunk: its record fits one pass, or the stream's backup is taken (now, if
        `KVSlots` gives one). There is always a lane ready: a backup reservation is at least one slot, and a lane
        holding a backup keeps feeding until its record is in (then gives it back)."""
        if lane.pos > 0 or len(lane.ids) <= self.backend.chunk or lane.backup is not None:
            return True
        lane.backup = self.backend.take_backup(lane.slot, len(lane.ids))
        lane.last_before = lane.session.last_logits
        return lane.backup is not None

    def _forward(self, batch: list[tuple[_Lane, list[int]]]) -> None:
        start = time.perf_counter()
        try:
            results = self.backend.step([lane.slot for lane, _ in batch], [c for _, c in batch],
                                        [lane.session.last_logits for lane, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every stream is where it was; find the stream(s) that fail alone
            raise_if_fatal(exc)  # the device itself failed: nothing on it can be trusted, the process must go
            if len(batch) == 1:
                self._give_up(batch[0][0], exc)
                return
            log.warning("model.batch_retry", streams=len(batch), error=f"{type(exc).__name__}: {exc}")
            for item in batch:
                self._forward([item])
            return
        metrics.MODEL_STEP_SECONDS.observe(time.perf_counter() - start)
        metrics.BATCH_TOKENS.observe(sum(len(c) for _, c in batch))
        metrics.BATCH_STREAMS.observe(len(batch))
        for (lane, chunk), result in zip(batch, results):
            lane.pieces.append(result.nll)
            lane.session.last_logits = result.last_logits
            lane.pos += len(chunk)
            if lane.pos >= len(lane.ids):
                self._drop_backup(lane)

    def _give_up(self, lane: _Lane, exc: BaseException) -> None:
        session = lane.session
        if lane.pos:  # part of the record went in: back to its start (a multi-pass record always has a backup)
            assert lane.backup is not None
            self.backend.roll_back(lane.slot, lane.backup)
            session.last_logits = lane.last_before
        self._drop_backup(lane)
        reason = (f"model step failed for stream {session.key!r} (record of {len(lane.ids)} tokens): "
                  f"{type(exc).__name__}: {exc}")
        log.error("model.step_failed", stream=session.key, tokens=len(lane.ids), error=f"{type(exc).__name__}: {exc}")
        metrics.ERRORS.labels("model_step").inc()
        lane.fail(reason)

    def _drop_backup(self, lane: _Lane) -> None:
        if lane.backup is not None:
            self.backend.drop_backup(lane.backup)
            lane.backup = None
