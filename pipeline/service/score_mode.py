"""Score mode (`service.mode: score`, the default): records are text, every complete line is scored.

Per group of records, on the model thread (`pipeline.service.engine.Engine` calls these in this order):

- `prepare`: the record's bytes go through the stream's `LineChunker` (a line split across records belongs to
  the record that completes it) and each complete line is tokenized, within the record limits
  (`service.max_record_bytes`: bytes beyond are not read; `service.max_record_tokens`: lines beyond the budget
  are not scored). What was skipped becomes a `Problem` of the record's `error` annotation; nothing is skipped
  silently. A quarantined stream's bytes still go through the chunker (the stream stays aligned), unscored.
  The `sinkstream-reset` header empties the pending bytes here; the cache is reset when the record's turn comes
  in the model step and the statistics when it is finished, so earlier records of the stream in the same group
  are not affected.
- `run`: `pipeline.service.batcher.Batcher`, every stream's tokens through the shared model, many streams per
  forward pass; per-token NLLs and notes go into each record's `StepOutput`.
- `annotate`: `LineScorer` and the stream's `StreamJudge` turn the NLLs into the `score` annotation (and a due
  `note`).

Score mode has no per-stream state of its own beyond the session's (`save`/`load` write nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from connectors.protocols import Record
from pipeline.service import annotations as ann
from pipeline.service.annotations import Problem
from pipeline.service.batcher import Batcher
from pipeline.service.scoring import LineScore, LineScorer
from pipeline.service.session import RESET_HEADER, RecordWork, StreamSession, quarantined, too_large
from pipeline.settings import Settings


class ScoreMode:
    """The per-record logic of score mode; one per `Engine`."""

    pooled = True  # many streams per forward pass
    uses_templates = True

    def __init__(self, settings: Settings, tokenize: Callable[[str], list[int]], scorer: LineScorer,
                 meta: dict[str, Any]):
        self.limits = settings.service
        self.tokenize, self.scorer, self.meta = tokenize, scorer, meta
        self.batcher = Batcher()

    def prepare(self, session: StreamSession, record: Record) -> RecordWork:
        limits = self.limits
        if session.quarantined:
            session.chunker.feed(record.value[: limits.max_record_bytes])
            return RecordWork(record, session, [], [], skip_score=True, problems=[
                quarantined(session, "stream", "its records are not scored")])
        problems: list[Problem] = []
        reset = RESET_HEADER in record.headers
        if reset:
            session.chunker.reset()  # the rest of the reset happens when the record's turn comes
        value = record.value
        if len(value) > limits.max_record_bytes:
            problems.append(too_large(len(value), limits.max_record_bytes, "the bytes after them were not read"))
            value = value[: limits.max_record_bytes]
        lines = session.chunker.feed(value)
        budget = limits.max_record_tokens
        kept_lines: list[str] = []
        token_lists: list[list[int]] = []
        skipped_lines = skipped_tokens = 0
        for line in lines:
            if budget <= 0:
                skipped_lines += 1
                continue
            ids = self.tokenize(line)
            if len(ids) > budget:  # the line that crosses the budget is scored up to it
                skipped_tokens += len(ids) - budget
                ids = ids[:budget]
            budget -= len(ids)
            kept_lines.append(line)
            token_lists.append(ids)
        if skipped_lines or skipped_tokens:
            problems.append(Problem(
                reason="record_too_many_tokens", skipped_lines=skipped_lines, skipped_tokens=skipped_tokens,
                message=f"expected at most {limits.max_record_tokens} tokens per record; {skipped_lines} line(s) "
                        f"after the budget were not scored and {skipped_tokens} token(s) of the line that crossed "
                        "it were cut",
            ))
        return RecordWork(record, session, kept_lines, token_lists, problems, reset=reset)

    def run(self, groups: list[list[RecordWork]]) -> None:
        self.batcher.run(groups)

    def annotate(self, session: StreamSession, work: RecordWork) -> list[dict[str, Any]]:
        record, step = work.record, work.step
        rid = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        scores: list[LineScore] = []
        pos = 0
        for line, ids in zip(work.lines, work.token_lists):
            nll = step.nll[pos : pos + len(ids)] if step.nll is not None else torch.empty(0)
            score = LineScore(session.counters.lines_seen, line.rstrip("\n"), ids, nll)
            scores.append(self.scorer.score(score, session.stats))
            session.judge.judge(score, session.partition_templates)
            session.counters.lines_seen += 1
            pos += len(ids)
        if scores:
            session.judge.settle(session.partition_templates)
        seen = step.tokens_seen if step.tokens_seen is not None else session.tokens_seen
        out = [ann.score_annotation(rid, session.key, scores, seen, self.meta, session.judge.verdict)]
        if step.note is not None:
            out.append(ann.note_annotation(rid, session.key, **step.note))
        return out

    def save(self, session: StreamSession, extra: dict[str, Any]) -> None:
        pass  # everything score mode keeps is the session's own (cache, statistics, verdict)

    def load(self, session: StreamSession, extra: dict[str, Any]) -> None:
        pass
