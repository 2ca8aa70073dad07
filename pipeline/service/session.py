"""A stream session: everything one stream owns, and the step from an input record to its annotations.

Data path: Kafka record -> `StreamSession.process` -> `LineChunker` (complete lines) -> tokenizer ->
`SinkModel.nll` (the shared model over this session's `SinkCache`) -> `LineScorer` -> annotations.

The model is shared and stateless (`Engine`); the session owns its cache, counters, running statistics,
pending bytes and the logits that predict its next token. `snapshot()` captures all of it, with
`next_offset`: a snapshot means "resume after the last record it has seen". Restoring it and replaying the
records from `next_offset` on reproduces the uninterrupted annotations bit for bit on CPU, because forward
passes are cut by content alone (a record's complete lines, in pieces of `cache.chunk` tokens).
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass
from typing import Any

import torch

from connectors.protocols import Record
from model.loader import LoadedModel
from model.snapshot import dump_cache, load_cache
from model.stepper import SinkModel
from pipeline.service.scoring import LineScore, LineScorer, RunningStats, note_annotation, score_annotation
from pipeline.service.chunker import LineChunker
from pipeline.service.normalizer import normalize_line
from pipeline.settings import Settings

RESET_HEADER = "sinkstream-reset"


class Engine:
    """What all sessions of a process share: the model, its tokenizer and the scoring settings."""

    def __init__(self, lm: LoadedModel, settings: Settings):
        self.lm = lm
        self.runner = SinkModel(lm)
        self.settings = settings
        self.tokenizer = lm.tokenizer
        sc = settings.score
        self.scorer = LineScorer(lm.tokenizer, sc.top_tokens, sc.anomaly_z, sc.warmup_lines)
        self.meta = {
            "model": {"name": settings.model.name, "fingerprint": lm.fingerprint},
            "cache": {"sinks": settings.cache.sinks, "window": settings.cache.window},
        }

    def new_cache(self):
        c = self.settings.cache
        return self.runner.new_cache(c.sinks, c.window, max_chunk=c.chunk)

    def tokenize(self, line: str) -> list[int]:
        text = normalize_line(line) if self.settings.score.normalize else line
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def stream_key(record: Record) -> str:
    """The stream a record belongs to: its key (UTF-8, else hex), or its partition when it has none."""
    if record.key is None:
        return f"partition-{record.partition}"
    try:
        return record.key.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + record.key.hex()


@dataclass
class Counters:
    lines_seen: int = 0
    next_offset: int = 0  # offset after the last record folded into this session
    next_note_at: int = 0  # tokens_seen at which the next note is due (0 = notes off)


class StreamSession:
    """State and processing of one stream."""

    def __init__(self, engine: Engine, key: str):
        self.engine = engine
        self.key = key
        self.cache = engine.new_cache()
        self.chunker = LineChunker(engine.settings.service.max_pending_bytes)
        self.stats = RunningStats()
        self.counters = Counters(next_note_at=engine.settings.note.every_tokens)
        self.last_logits: torch.Tensor | None = None

    @property
    def tokens_seen(self) -> int:
        return self.cache.seen

    def reset(self) -> None:
        """Start the stream afresh (the `sinkstream-reset` header): new cache, statistics and pending input."""
        offset = self.counters.next_offset
        self.__init__(self.engine, self.key)
        self.counters.next_offset = offset

    def process(self, record: Record) -> list[dict[str, Any]]:
        """Fold one record into the stream; return its annotations (a `score`, maybe a `note`).

        Records at offsets before `next_offset` are already part of the state (a replay after restore) and
        return nothing. If the model step raises, the session is unchanged except for pending bytes, and
        the exception propagates (the runner stops rather than skip data).
        """
        if record.offset < self.counters.next_offset:
            return []
        if RESET_HEADER in record.headers:
            self.reset()
        lines = self.chunker.feed(record.value)
        token_lists = [self.engine.tokenize(line) for line in lines]
        flat = [t for ids in token_lists for t in ids]
        scores: list[LineScore] = []
        if flat:
            nll, logits = self.engine.runner.nll(self.cache, flat, prev_logits=self.last_logits)
            self.last_logits = logits[-1].detach().clone()
            pos = 0
            for line, ids in zip(lines, token_lists):
                score = LineScore(self.counters.lines_seen, line.rstrip("\n"), ids, nll[pos : pos + len(ids)])
                scores.append(self.engine.scorer.score(score, self.stats))
                self.counters.lines_seen += 1
                pos += len(ids)
        rid = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        out = [score_annotation(rid, self.key, scores, self.tokens_seen, self.engine.meta)]
        note = self._maybe_note(rid)
        if note is not None:
            out.append(note)
        self.counters.next_offset = record.offset + 1
        return out

    def _maybe_note(self, rid: dict[str, Any]) -> dict[str, Any] | None:
        cfg = self.engine.settings.note
        if not cfg.every_tokens or self.tokens_seen < self.counters.next_note_at:
            return None
        while self.counters.next_note_at <= self.tokens_seen:
            self.counters.next_note_at += cfg.every_tokens
        tok = self.engine.tokenizer
        prompt = tok(cfg.prompt, add_special_tokens=False)["input_ids"]
        eos = getattr(tok, "eos_token_id", None)
        generated = self.engine.runner.generate(
            self.cache, prompt, cfg.max_new_tokens, stop=lambda t: t == eos or "\n" in tok.decode([t])
        )
        text = tok.decode(generated, skip_special_tokens=True).strip()
        return note_annotation(rid, self.key, cfg.prompt, text, len(generated), self.tokens_seen, self.engine.meta)

    # ---- snapshot / restore -------------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        extra = {
            "stream": self.key,
            "counters": asdict(self.counters),
            "stats": asdict(self.stats),
            "pending": base64.b64encode(self.chunker.pending).decode(),
        }
        tensors = {"last_logits": self.last_logits} if self.last_logits is not None else {}
        return dump_cache(self.cache, extra=extra, tensors=tensors)

    @classmethod
    def restore(cls, engine: Engine, blob: bytes) -> StreamSession:
        """Rebuild a session from `snapshot()` bytes; raises `SnapshotError` for a foreign or damaged blob."""
        cache, extra, tensors = load_cache(engine.lm, blob)
        session = cls(engine, extra["stream"])
        session.cache = cache
        session.counters = Counters(**extra["counters"])
        session.stats = RunningStats(**extra["stats"])
        session.chunker.pending = base64.b64decode(extra["pending"])
        session.last_logits = tensors.get("last_logits")
        return session
