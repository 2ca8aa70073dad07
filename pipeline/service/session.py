"""A stream session: everything one stream owns, and the path from an input record to its annotations.

Data path: Kafka record -> `StreamSession.prepare` (record limits, `LineChunker`, tokenizer) -> `RecordWork`
-> `pipeline.service.batcher.Batcher` (the shared model over every stream's own cache, many streams per
step) -> `StreamSession.finish` (`LineScorer`, annotations).

The model is shared and stateless (`Engine`); the session owns its cache, counters, running statistics,
pending bytes and the logits that predict its next token. `snapshot()` captures all of it, with
`next_offset`: a snapshot means "resume after the last record it has seen".

Failure contract: `mark()` takes a cheap, exact copy of everything `prepare`/`finish` and the model step
change (cache tensors are never written in place, so the cache part is a set of references); `rollback(mark)`
returns the session to it bit for bit. The service marks every session a group of records touches and rolls
them back when the group fails part-way, so a checkpoint never holds half a record.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from connectors.protocols import Record
from model.loader import LoadedModel
from model.snapshot import SnapshotError
from model.stepper import SinkModel
from model.tokens import encode_text
from pipeline.service import annotations as ann
from pipeline.service import metrics
from pipeline.service.backend import Capture, make_backend
from pipeline.service.chunker import LineChunker
from pipeline.service.normalizer import normalize_line
from pipeline.service.scoring import LineScore, LineScorer, RunningStats
from pipeline.service.sink_token import resolve_sink_token
from pipeline.service.templates import TemplateMemory, load_reference
from pipeline.service.verdict import StreamJudge
from pipeline.settings import Settings

RESET_HEADER = "sinkstream-reset"


class Engine:
    """What all sessions of a process share: the model, its tokenizer, the scoring settings and the limits."""

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
        # `cache.sink_token` (issue 13): fed into every new stream's cache before its text, never scored.
        vocab = lm.model.config.get_text_config().vocab_size
        self.sink_token = resolve_sink_token(lm.tokenizer, settings.cache.sink_token, vocab)
        # Tokens per group of records (`service.batch_tokens`, else the default for the model's device).
        self.batch_tokens = settings.service.batch_tokens_on(lm.device.type)
        # Where every stream's KV state lives: one pooled set of slots, or a SinkCache each (`backend`).
        self.backend = make_backend(lm, settings)
        # `service.mode: dialogue`: records are user turns, answered by `dialogue_mode` (None in score mode).
        self.dialogue = None
        if settings.service.mode == "dialogue":
            from pipeline.service.dialogue_mode import DialogueMode  # it imports this module

            self.dialogue = DialogueMode(lm, settings)
        # Issue 18: the reference of normal (`templates.reference`), mined once; every partition's template
        # memory starts as a copy of it (`new_template_memory`).
        self.reference: TemplateMemory | None = None
        if settings.templates.enabled and settings.templates.reference is not None and self.dialogue is None:
            self.reference = load_reference(settings.templates.reference, settings.templates)

    def new_template_memory(self) -> TemplateMemory | None:
        """A partition's template memory: a copy of the reference, else empty; None when templates are off.

        Code with a reference as lines rather than a file (an evaluation) sets `engine.reference =
        pipeline.service.templates.build_reference(lines, settings.templates)` before making sessions; sessions
        of one partition share one memory (`StreamSession(engine, key, templates=memory)`)."""
        if not self.settings.templates.enabled or self.dialogue is not None:
            return None
        return self.reference.copy() if self.reference is not None else TemplateMemory(self.settings.templates)

    def new_cache(self) -> Any:
        """A new stream's KV handle (a pool slot or a SinkCache, see `backend`); primed with the sink token
        when `cache.sink_token` is set. Raises `CacheFull` when no KV slot is free."""
        handle: Any = self.backend.new()  # a SinkCache or a slot number, depending on the backend
        if self.sink_token is not None:
            self.backend.prime(handle, self.sink_token)
        return handle

    def tokenize(self, line: str) -> list[int]:
        text = normalize_line(line) if self.settings.score.normalize else line
        return encode_text(self.tokenizer, text)  # input is data: special markers are scored as text


MAX_KEY_BYTES = 256  # longer record keys are named by their digest (annotations and output keys stay small)


def stream_key(record: Record) -> str:
    """The stream a record belongs to: its key (UTF-8, else `hex:...`), or `partition-N` when it has none.

    A key longer than `MAX_KEY_BYTES` bytes becomes `sha256:<hex digest>`: the key is copied into every
    annotation and is the output record's key, so a huge key must not make annotations too large to publish.
    """
    if record.key is None:
        return f"partition-{record.partition}"
    if len(record.key) > MAX_KEY_BYTES:
        return "sha256:" + hashlib.sha256(record.key).hexdigest()
    try:
        return record.key.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + record.key.hex()


def too_large(size: int, limit: int, outcome: str) -> dict[str, Any]:
    """The `record_too_large` problem of a record of `size` bytes over `limit` (`outcome`: what was done)."""
    return {
        "reason": "record_too_large",
        "message": f"expected at most {limit} bytes per record, got {size}; {outcome}",
        "skipped_bytes": size - limit,
    }


@dataclass
class Counters:
    lines_seen: int = 0
    next_offset: int = 0  # offset after the last record folded into this session
    next_note_at: int = 0  # tokens_seen at which the next note is due (0 = notes off)


@dataclass
class RecordWork:
    """One record on its way through the model: its lines and tokens, what was skipped, and the results.

    Built by `StreamSession.prepare`, filled by the batcher (`nll`, or `error` when the model step failed),
    turned into annotations by `StreamSession.finish`.
    """

    record: Record
    session: StreamSession
    lines: list[str]
    token_lists: list[list[int]]
    # Why part of the record was not scored (limits), or why the stream's context was reset; error annotations.
    problems: list[dict[str, Any]] = field(default_factory=list)
    nll: torch.Tensor | None = None  # (tokens,) filled by the batcher
    error: str | None = None  # the model step failed for this record's stream (rolled back)
    tokens_seen: int | None = None  # the stream's token count right after this record (set by the batcher)
    note: dict[str, Any] | None = None  # a note generated right after this record's step, if one was due
    replay: bool = False  # already folded into the session (a replay after restore): publish nothing
    skip_score: bool = False  # nothing of the record was fed to the model (quarantine, unreadable input)
    reset: bool = False  # the record starts the stream afresh (`sinkstream-reset`): applied in order
    dialogue: Any = None  # dialogue mode: the user turn and its reply (`pipeline.service.dialogue_mode.Turn`)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_lists)


@dataclass
class SessionMark:
    """Everything a rollback restores (see the module docstring)."""

    pending: bytes
    stats: RunningStats
    counters: Counters
    last_logits: torch.Tensor | None
    failures: int


class StreamSession:
    """State and processing of one stream."""

    def __init__(self, engine: Engine, key: str, cache: Any = None, templates: TemplateMemory | None = None):
        self.engine = engine
        self.key = key
        # The partition's template memory (shared by its streams, checkpointed beside its manifest); a session
        # made without one (tools, tests) owns a private one and keeps it in its own snapshot.
        self.owns_templates = templates is None
        self.partition_templates = engine.new_template_memory() if templates is None else templates
        # The stream's template counts, alert threshold and verdict (`pipeline.service.verdict`; snapshotted).
        self.judge = StreamJudge(engine.settings.score, engine.settings.templates)
        # A KV handle of `engine.backend` (a pool slot or a SinkCache); a new, primed one unless given.
        self.cache = engine.new_cache() if cache is None else cache
        self.primed = engine.backend.seen(self.cache)  # the sink token, if any: in the cache, not counted
        self.chunker = LineChunker(engine.settings.service.max_pending_bytes)
        self.stats = RunningStats()
        self.counters = Counters(next_note_at=engine.settings.note.every_tokens)
        self.last_logits: torch.Tensor | None = None
        self.failures = 0  # consecutive failed model steps (in memory only: a restart forgives)
        c = engine.settings.cache
        self.evicted = max(0, engine.backend.seen(self.cache) - c.sinks - c.window)  # for the evictions metric
        # Dialogue mode: the conversation's `ConversationState` (None before its first reply; snapshotted).
        self.dialogue: Any = None

    @property
    def tokens_seen(self) -> int:
        return self.engine.backend.seen(self.cache) - self.primed

    @property
    def quarantined(self) -> bool:
        return self.failures >= self.engine.settings.service.quarantine_after

    def reset(self) -> None:
        """Start the stream afresh: new cache, statistics and pending input (everything at once; used when the
        stream's context cannot be trusted). The `sinkstream-reset` header resets in three steps instead, each
        when the record's turn comes: pending bytes in `prepare`, the cache in the model step
        (`reset_cache`), the statistics in `finish`, so records of the stream before it in the same group are
        not affected."""
        offset = self.counters.next_offset
        templates = None if self.owns_templates else self.partition_templates
        self.release()
        self.__init__(self.engine, self.key, templates=templates)  # type: ignore[misc]
        self.counters.next_offset = offset

    def reset_cache(self) -> None:
        """The model-step part of a reset: a new (primed) cache, no previous logits, notes counted afresh."""
        self.release()
        self.cache = self.engine.new_cache()
        self.primed = self.engine.backend.seen(self.cache)
        self.last_logits = None
        self.counters.next_note_at = self.engine.settings.note.every_tokens

    def release(self) -> None:
        """Give the stream's KV slot back (the session is dropped: spilled, revoked or reset)."""
        if self.cache is not None:
            self.engine.backend.release(self.cache)
            self.cache = None

    # ---- rollback ---------------------------------------------------------------------------------------------
    def mark(self) -> SessionMark:
        return SessionMark(self.chunker.pending, copy.copy(self.stats), copy.copy(self.counters), self.last_logits,
                           self.failures)

    def rollback(self, mark: SessionMark) -> None:
        """Undo `prepare` (it never touches the KV cache: the model step rolls that back itself)."""
        self.chunker.pending = mark.pending
        self.stats, self.counters = copy.copy(mark.stats), copy.copy(mark.counters)
        self.last_logits, self.failures = mark.last_logits, mark.failures

    # ---- record -> work -> annotations ------------------------------------------------------------------------
    def prepare(self, record: Record) -> RecordWork:
        """Fold a record's bytes into the chunker and tokenize its complete lines, within the record limits.

        A record already folded into this session (a replay after restore) comes back with `replay` set.
        A quarantined stream's record is read past (its bytes still go through the chunker, so the stream
        stays aligned) without touching the model. Limits
        (`service.max_record_bytes`, `service.max_record_tokens`): bytes beyond the first are not read, lines
        beyond the token budget are not scored, and either becomes a `problem` the record's `error`
        annotation reports with counts; nothing is skipped silently.
        """
        if record.offset < self.counters.next_offset:
            return RecordWork(record, self, [], [], replay=True)
        if self.engine.dialogue is not None:  # dialogue mode: the record is a user turn
            return self.engine.dialogue.prepare(self, record)
        limits = self.engine.settings.service
        problems: list[dict[str, Any]] = []
        if self.quarantined:
            self.chunker.feed(record.value[: limits.max_record_bytes])
            return RecordWork(record, self, [], [], skip_score=True, problems=[{
                "reason": "quarantined",
                "message": f"stream {self.key!r} is quarantined after {self.failures} failed model steps in a "
                           "row; its records are not scored until the service restarts",
            }])
        reset = RESET_HEADER in record.headers
        if reset:
            self.chunker.reset()  # the rest of the reset happens when the record's turn comes (see `reset`)
        value = record.value
        if len(value) > limits.max_record_bytes:
            problems.append(too_large(len(value), limits.max_record_bytes, "the bytes after them were not read"))
            value = value[: limits.max_record_bytes]
        lines = self.chunker.feed(value)
        budget = limits.max_record_tokens
        kept_lines: list[str] = []
        token_lists: list[list[int]] = []
        skipped_lines = skipped_tokens = 0
        for line in lines:
            ids = self.engine.tokenize(line) if budget > 0 else []
            if budget <= 0:
                skipped_lines += 1
                continue
            if len(ids) > budget:  # the line that crosses the budget is scored up to it
                skipped_tokens += len(ids) - budget
                ids = ids[:budget]
            budget -= len(ids)
            kept_lines.append(line)
            token_lists.append(ids)
        if skipped_lines or skipped_tokens:
            problems.append({
                "reason": "record_too_many_tokens",
                "message": f"expected at most {limits.max_record_tokens} tokens per record; {skipped_lines} "
                           f"line(s) after the budget were not scored and {skipped_tokens} token(s) of the "
                           "line that crossed it were cut",
                "skipped_lines": skipped_lines,
                "skipped_tokens": skipped_tokens,
            })
        return RecordWork(record, self, kept_lines, token_lists, problems, reset=reset)

    def finish(self, work: RecordWork) -> list[dict[str, Any]]:
        """Score the record's lines from `work.nll` and return its annotations (`score`, maybe `note`/`error`).

        When the model step failed (`work.error`), the record gets an `error` annotation, its lines are not
        scored (the cache was rolled back by the batcher), and the stream counts one more failure.
        """
        if self.engine.dialogue is not None:  # dialogue mode: the `reply` annotation
            self.judge.verdict.record(work.record.offset)
            return self.engine.dialogue.finish(self, work)
        record = work.record
        rid = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        out: list[dict[str, Any]] = []
        problems = list(work.problems)
        if work.reset:  # the statistics part of a `sinkstream-reset` (see `reset`)
            self.stats = RunningStats()
            self.counters.lines_seen = 0
            self.judge = StreamJudge(self.engine.settings.score, self.engine.settings.templates)
        self.judge.verdict.record(record.offset)
        if work.skip_score:
            pass
        elif work.error is not None:
            self.failures += 1
            problems.append({
                "reason": "quarantined" if self.quarantined else "model_step_failed",
                "message": work.error,
                "skipped_lines": len(work.lines),
                "skipped_tokens": work.tokens,
            })
        else:
            self.failures = 0
            scores: list[LineScore] = []
            pos = 0
            for line, ids in zip(work.lines, work.token_lists):
                nll = work.nll[pos : pos + len(ids)] if work.nll is not None else torch.empty(0)
                score = LineScore(self.counters.lines_seen, line.rstrip("\n"), ids, nll)
                scores.append(self.engine.scorer.score(score, self.stats))
                self.judge.judge(score, self.partition_templates)
                self.counters.lines_seen += 1
                pos += len(ids)
            seen = work.tokens_seen if work.tokens_seen is not None else self.tokens_seen
            out.append(ann.score_annotation(rid, self.key, scores, seen, self.engine.meta, self.judge.verdict))
            if work.note is not None:
                out.append(ann.note_annotation(rid, self.key, **work.note))
        if problems:
            seen = work.tokens_seen if work.tokens_seen is not None else self.tokens_seen
            out.append(ann.error_annotation(rid, self.key, problems, seen, self.engine.meta))
        self.counters.next_offset = record.offset + 1
        return out

    def process(self, record: Record) -> list[dict[str, Any]]:
        """One record on its own, as the service handles a group of one: prepare, model step, finish.

        For tools and tests (and the offline baseline of the integration tests); the service batches groups.
        """
        from pipeline.service.batcher import Batcher  # the batcher imports this module

        work = self.prepare(record)
        if work.replay:
            return []
        Batcher().run([work])
        return self.finish(work)

    def after_step(self, work: RecordWork) -> None:
        """Right after the record's tokens entered the cache (before the stream's next record): remember the
        token count and generate a note if one is due, so both describe exactly this point of the stream."""
        work.tokens_seen = self.tokens_seen
        c = self.engine.settings.cache
        evicted = max(0, self.engine.backend.seen(self.cache) - c.sinks - c.window)  # tokens out of the window
        if evicted > self.evicted:
            metrics.EVICTIONS.inc(evicted - self.evicted)
        self.evicted = evicted
        cfg = self.engine.settings.note
        if not cfg.every_tokens or self.tokens_seen < self.counters.next_note_at:
            return
        while self.counters.next_note_at <= self.tokens_seen:
            self.counters.next_note_at += cfg.every_tokens
        tok = self.engine.tokenizer
        prompt = tok(cfg.prompt, add_special_tokens=False)["input_ids"]
        eos = getattr(tok, "eos_token_id", None)
        generated = self.engine.backend.generate(
            self.cache, prompt, cfg.max_new_tokens, lambda t: t == eos or "\n" in tok.decode([t]), self.last_logits
        )
        text = tok.decode(generated, skip_special_tokens=True).strip()
        work.note = {"prompt": cfg.prompt, "text": text, "generated": len(generated), "tokens_seen": self.tokens_seen,
                     "meta": self.engine.meta}

    # ---- snapshot / restore -------------------------------------------------------------------------------
    def capture(self) -> SessionCapture:
        """What a snapshot of this session needs, taken now on the model thread (references, no copies)."""
        extra = {
            "stream": self.key,
            "counters": asdict(self.counters),
            "stats": asdict(self.stats),
            "pending": base64.b64encode(self.chunker.pending).decode(),
            "primed": self.primed,
            "judge": self.judge.to_json(),
        }
        if self.owns_templates and self.partition_templates is not None:
            extra["templates"] = self.partition_templates.to_json()
        if self.engine.dialogue is not None:
            self.engine.dialogue.save(self, extra)
        tensors = {"last_logits": self.last_logits} if self.last_logits is not None else {}
        return SessionCapture(self.engine.backend.capture(self.cache), extra, tensors)

    def snapshot(self) -> bytes:
        return self.capture().serialize()

    @classmethod
    def restore(cls, engine: Engine, blob: bytes, templates: TemplateMemory | None = None) -> StreamSession:
        """Rebuild a session from `snapshot()` bytes; raises `SnapshotError` for a foreign or damaged blob
        (its KV state, or the session fields beside it), never another error, and never keeps a KV slot then.
        `templates`: the partition's template memory (else the session's own, from the snapshot)."""
        cache: Any  # a SinkCache or a slot number, depending on the backend
        cache, extra, tensors = engine.backend.restore(blob)
        try:
            session = cls(engine, extra["stream"], cache=cache, templates=templates)
        except BaseException as exc:
            engine.backend.release(cache)
            if isinstance(exc, Exception):
                raise SnapshotError(f"snapshot session fields: expected 'stream' (str), got {type(exc).__name__}: "
                                    f"{exc}") from exc
            raise
        try:
            primed = extra.get("primed", 0)  # snapshots from before `cache.sink_token` hold none
            if isinstance(primed, bool) or not isinstance(primed, int) or not 0 <= primed <= 1:
                raise ValueError(f"primed: expected 0 or 1, got {primed!r}")
            session.primed = primed
            session.counters = Counters(**extra["counters"])
            session.stats = RunningStats(**extra["stats"])
            for name, value in (*asdict(session.counters).items(), ("n", session.stats.n)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
            for name in ("mean", "m2"):
                value = getattr(session.stats, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"stats.{name}: expected a finite number, got {value!r}")
            session.chunker.pending = base64.b64decode(extra["pending"], validate=True)
            session.last_logits = tensors.get("last_logits")
            if "judge" in extra:  # snapshots from before issue 18 hold none: the stream's memory starts empty
                session.judge = StreamJudge.from_json(engine.settings.score, engine.settings.templates,
                                                      extra["judge"])
            if session.owns_templates and session.partition_templates is not None and "templates" in extra:
                session.partition_templates = TemplateMemory.from_state(engine.settings.templates,
                                                                        extra["templates"])
            if engine.dialogue is not None:
                engine.dialogue.load(session, extra)
        except Exception as exc:
            session.release()
            raise SnapshotError(f"snapshot session fields: {type(exc).__name__}: {exc}") from exc
        return session


@dataclass
class SessionCapture:
    """A session frozen at one instant on the model thread; `serialize` may run later on another thread while
    the session moves on (the backend's capture holds references or copies of that instant)."""

    kv: Capture
    extra: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def serialize(self) -> bytes:
        return self.kv.serialize(self.extra, self.tensors)
