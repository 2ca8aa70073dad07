"""A stream session: everything one stream owns, and the types a record travels in on its way through the model.

Data path (decide, execute, apply, one way): Kafka record -> `Engine.prepare` (the `Mode` turns the record into
a `RecordWork`: limits, `LineChunker`, tokenizer) -> `Engine.run` (the mode's model step over a group, many
streams per step; it fills each record's `StepOutput`) -> `Engine.finish` (annotations from the step's output;
the session's counters move). `pipeline.service.engine` holds that flow and picks the mode once.

A session is plain per-stream state: its KV handle (a slot of the shared backend), counters, running statistics,
pending bytes, the logits that predict its next token, its verdict and, in dialogue mode, its conversation
state. The model is shared and stateless. `snapshot()` captures all of it, with `next_offset`: a snapshot means
"resume after the last record it has seen".

Failure contract: `mark()` takes a cheap, exact copy of everything `prepare`/`finish` and the model step
change (cache tensors are never written in place, so the cache part is a set of references); `rollback(mark)`
returns the session to it bit for bit. The service marks every session a group of records touches and rolls
them back when the group fails part-way, so a checkpoint never holds half a record.

Imports point one way: this module knows the engine and the modes only through the `Shared` and `Mode`
protocols below; `engine`, `score_mode`, `dialogue_mode` and `batcher` import it, never the reverse.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from connectors.protocols import Record
from model.snapshot import SnapshotError
from pipeline.dialogue import ConversationState, Reply
from pipeline.service import metrics
from pipeline.service.annotations import Problem
from pipeline.service.backend import Capture, KVBackend, KVHandle
from pipeline.service.chunker import LineChunker
from pipeline.service.scoring import RunningStats
from pipeline.service.templates import TemplateMemory
from pipeline.service.verdict import StreamJudge
from pipeline.settings import Settings

RESET_HEADER = "sinkstream-reset"


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


def too_large(size: int, limit: int, outcome: str) -> Problem:
    """The `record_too_large` problem of a record of `size` bytes over `limit` (`outcome`: what was done)."""
    return Problem(reason="record_too_large", skipped_bytes=size - limit,
                   message=f"expected at most {limit} bytes per record, got {size}; {outcome}")


def quarantined(session: StreamSession, noun: str, what: str) -> Problem:
    """The `quarantined` problem of a record of a stream that failed `service.quarantine_after` steps in a row."""
    return Problem(reason="quarantined", message=f"{noun} {session.key!r} is quarantined after {session.failures} "
                                                 f"failed model steps in a row; {what} until the service restarts")


@dataclass
class Counters:
    lines_seen: int = 0
    next_offset: int = 0  # offset after the last record folded into this session
    next_note_at: int = 0  # tokens_seen at which the next note is due (0 = notes off)


@dataclass
class StepOutput:
    """What the model step (`Mode.run`) produced for one record; read by `Engine.finish`."""

    nll: torch.Tensor | None = None  # (tokens,) score mode: the record's per-token NLLs
    error: str | None = None  # the model step failed for this record's stream (rolled back)
    tokens_seen: int | None = None  # the stream's token count right after this record
    note: dict[str, Any] | None = None  # score mode: a note generated right after this record, if one was due
    reply: Reply | None = None  # dialogue mode: the reply to the record's user turn
    turn: int | None = None  # dialogue mode: the reply's index in its conversation


@dataclass
class RecordWork:
    """One record on its way through the model: what `Mode.prepare` decided (its lines and tokens, what was
    skipped and why), and in `step` what the model step produced."""

    record: Record
    session: StreamSession
    lines: list[str]  # score mode: the complete lines; dialogue mode: the user turn's text
    token_lists: list[list[int]]
    # Why part of the record was not scored (limits), or why the stream's context was reset; error annotations.
    problems: list[Problem] = field(default_factory=list)
    replay: bool = False  # already folded into the session (a replay after restore): publish nothing
    skip_score: bool = False  # nothing of the record is fed to the model (quarantine, unreadable input, limits)
    reset: bool = False  # the record starts the stream afresh (`sinkstream-reset`): applied in order
    step: StepOutput = field(default_factory=StepOutput)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_lists)


def by_stream(works: Sequence[RecordWork]) -> list[list[RecordWork]]:
    """The records of a group that go to the model, one list per stream in order of first appearance."""
    groups: OrderedDict[int, list[RecordWork]] = OrderedDict()
    for work in works:
        if not work.replay and work.step.error is None:
            groups.setdefault(id(work.session), []).append(work)
    return list(groups.values())


class Mode(Protocol):
    """What differs between `service.mode: score` and `dialogue` (`ScoreMode`, `DialogueMode`), picked once by
    `Engine`. Called on the model thread, in this order for every group of records."""

    uses_templates: bool  # the mode scores lines (template memory, reference of normal)
    pooled: bool  # the mode can run on the pooled KV backend (many streams per forward pass)

    def prepare(self, session: StreamSession, record: Record) -> RecordWork:
        """Decide what of a new record goes to the model (limits, chunker, tokenizer); never touches the cache.
        Raising rolls the session back (`mark`) and answers the record with a `bad_input` error."""

    def run(self, groups: list[list[RecordWork]]) -> None:
        """The model step over a group's records (one list per stream, each in order): fill `work.step`. A
        failure of one stream is isolated to it (`step.error`, its cache where it was); a failure of the device
        raises `DeviceFailure`."""

    def annotate(self, session: StreamSession, work: RecordWork) -> list[dict[str, Any]]:
        """The annotations of a record whose step succeeded (`score` and `note`, or `reply`)."""

    def save(self, session: StreamSession, extra: dict[str, Any]) -> None:
        """Put the mode's per-stream state into a snapshot's `extra`."""

    def load(self, session: StreamSession, extra: dict[str, Any]) -> None:
        """Take it back from a snapshot's `extra` (raise ValueError for a damaged one)."""


class Shared(Protocol):
    """What a session uses of the process-wide `pipeline.service.engine.Engine`."""

    settings: Settings
    mode: Mode
    tokenizer: Any
    batch_tokens: int
    meta: dict[str, Any]  # model and cache identity, copied into every annotation

    @property
    def backend(self) -> KVBackend: ...

    def new_cache(self) -> KVHandle: ...

    def new_template_memory(self) -> TemplateMemory | None: ...

    def process(self, session: StreamSession, record: Record) -> list[dict[str, Any]]: ...


@dataclass
class SessionMark:
    """Everything a rollback restores (see the module docstring)."""

    pending: bytes
    stats: RunningStats
    counters: Counters
    last_logits: torch.Tensor | None
    failures: int


class StreamSession:
    """The state of one stream (see the module docstring); `Engine` and its `Mode` process its records."""

    def __init__(self, engine: Shared, key: str, cache: KVHandle | None = None,
                 templates: TemplateMemory | None = None):
        self.engine = engine
        self.key = key
        # The partition's template memory (shared by its streams, checkpointed beside its manifest); a session
        # made without one (tools, tests) owns a private one and keeps it in its own snapshot.
        self.owns_templates = templates is None
        self.partition_templates = engine.new_template_memory() if templates is None else templates
        # The stream's template counts, alert threshold and verdict (`pipeline.service.verdict`; snapshotted).
        self.judge = StreamJudge(engine.settings.score, engine.settings.templates)
        # A KV handle of `engine.backend` (a pool slot or a SinkCache); a new, primed one unless given.
        self.cache: KVHandle | None = engine.new_cache() if cache is None else cache
        self.primed = engine.backend.seen(self.cache)  # the sink token, if any: in the cache, not counted
        self.chunker = LineChunker(engine.settings.service.max_pending_bytes)
        self.stats = RunningStats()
        self.counters = Counters(next_note_at=engine.settings.note.every_tokens)
        self.last_logits: torch.Tensor | None = None
        self.failures = 0  # consecutive failed model steps (in memory only: a restart forgives)
        c = engine.settings.cache
        self.evicted = max(0, engine.backend.seen(self.cache) - c.sinks - c.window)  # for the evictions metric
        # Dialogue mode: the conversation's `ConversationState` (None before its first reply; snapshotted).
        self.dialogue: ConversationState | None = None

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
        not affected (`restart_scoring`)."""
        offset = self.counters.next_offset
        templates = None if self.owns_templates else self.partition_templates
        self.release()
        self.__init__(self.engine, self.key, templates=templates)  # type: ignore[misc]
        self.counters.next_offset = offset

    def restart_scoring(self) -> None:
        """The statistics part of a `sinkstream-reset` (see `reset`), when the record is finished."""
        self.stats = RunningStats()
        self.counters.lines_seen = 0
        self.judge = StreamJudge(self.engine.settings.score, self.engine.settings.templates)

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

    # ---- processing ---------------------------------------------------------------------------------------
    def process(self, record: Record) -> list[dict[str, Any]]:
        """One record on its own, as the service handles a group of one: `Engine.process`. For tools and tests
        (and the offline baseline of the integration tests); the service batches groups."""
        return self.engine.process(self, record)

    def after_step(self, work: RecordWork) -> None:
        """Right after the record's tokens entered the cache (before the stream's next record): remember the
        token count and generate a note if one is due, so both describe exactly this point of the stream."""
        work.step.tokens_seen = self.tokens_seen
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
        work.step.note = {"prompt": cfg.prompt, "text": text, "generated": len(generated),
                          "tokens_seen": self.tokens_seen, "meta": self.engine.meta}

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
        self.engine.mode.save(self, extra)
        tensors = {"last_logits": self.last_logits} if self.last_logits is not None else {}
        return SessionCapture(self.engine.backend.capture(self.cache), extra, tensors)

    def snapshot(self) -> bytes:
        return self.capture().serialize()

    @classmethod
    def restore(cls, engine: Shared, blob: bytes, templates: TemplateMemory | None = None) -> StreamSession:
        """Rebuild a session from `snapshot()` bytes; raises `SnapshotError` for a foreign or damaged blob
        (its KV state, or the session fields beside it), never another error, and never keeps a KV slot then.
        `templates`: the partition's template memory (else the session's own, from the snapshot)."""
        cache: KVHandle
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
            engine.mode.load(session, extra)
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
