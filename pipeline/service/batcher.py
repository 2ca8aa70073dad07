"""The model step of a group of records: every stream's tokens through the shared model, failures isolated.

A group holds the prepared records (`RecordWork`) of many streams, in input order. The batcher feeds each
stream's records in order (a stream's records must enter its cache in order), with the stream's own
`prev_logits`, and puts the per-token NLLs on the records. This backend steps one stream at a time through its
own `SinkCache`; forward passes are cut by each record's content alone, so a resumed run is bit-identical to
an uninterrupted one on CPU.

Failure isolation: a stream whose model step raises is rolled back (its cache is as before the group; see
`SinkModel.nll`), its records get `error` set, and the other streams go on. On CUDA an out-of-memory error is
retried once with the stream's tokens in smaller forward passes before the stream is given up. An exception
that is not an ordinary failure of the step (KeyboardInterrupt, SystemExit) propagates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import structlog
import torch

from pipeline.service import metrics
from pipeline.service.session import RecordWork, StreamSession

log = structlog.get_logger(__name__)


class Batcher:
    """Runs the model over the records of a group."""

    def run(self, works: Sequence[RecordWork]) -> None:
        by_stream: OrderedDict[int, list[RecordWork]] = OrderedDict()
        for work in works:
            if not work.replay and work.error is None:
                by_stream.setdefault(id(work.session), []).append(work)
        for stream_works in by_stream.values():
            self._run_stream(stream_works[0].session, stream_works)

    def _run_stream(self, session: StreamSession, works: list[RecordWork]) -> None:
        """Feed one stream's records in order, each in forward passes cut by its own content (so results are
        bit-identical however a poll grouped the records); on failure, roll the stream back to before the group."""
        before = (session.cache.state(), session.last_logits, session.counters.next_note_at)
        start = time.perf_counter()
        results: list[torch.Tensor | None] = []
        try:
            for w in works:
                if w.skip_score:  # nothing to feed; its annotations still report the stream at this point
                    w.tokens_seen = session.tokens_seen
                    results.append(None)
                    continue
                ids = [t for line in w.token_lists for t in line]
                nll, last = self._step(session, ids) if ids else (torch.empty(0), None)
                results.append(nll)
                if last is not None:
                    session.last_logits = last
                session.after_step(w)
        except Exception as exc:  # noqa: BLE001 - any failure of one stream's step is isolated to that stream
            session.cache.restore(before[0])
            session.last_logits, session.counters.next_note_at = before[1], before[2]
            tokens = sum(w.tokens for w in works)
            reason = f"model step failed for stream {session.key!r} ({tokens} tokens): {type(exc).__name__}: {exc}"
            log.error("model.step_failed", stream=session.key, tokens=tokens, error=f"{type(exc).__name__}: {exc}")
            metrics.ERRORS.labels("model_step").inc()
            for w in works:
                w.tokens_seen, w.note = None, None
                if not w.skip_score:
                    w.error = reason
            return
        metrics.MODEL_STEP_SECONDS.observe(time.perf_counter() - start)
        metrics.BATCH_TOKENS.observe(sum(w.tokens for w in works))
        metrics.BATCH_STREAMS.observe(1)
        for w, nll in zip(works, results):
            if nll is not None:
                w.nll = nll

    def _step(self, session: StreamSession, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        runner = session.engine.runner
        try:
            return runner.nll(session.cache, ids, prev_logits=session.last_logits)
        except torch.OutOfMemoryError:
            # The cache was rolled back; retry once in forward passes of a quarter of the chunk (exact chunking
            # makes the result independent of the split on architectures that support it).
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            cache = session.cache
            saved = cache.max_chunk
            cache.max_chunk = max(1, saved // 4)
            log.warning("model.oom_retry", stream=session.key, tokens=len(ids), chunk=cache.max_chunk)
            try:
                return runner.nll(cache, ids, prev_logits=session.last_logits)
            finally:
                cache.max_chunk = saved
