"""Conversation mode of the service (`service.mode: dialogue`): records are user turns, replies are annotations.

Every input record is one user turn of the conversation named by its key (the stream key, see
`pipeline.service.session.stream_key`). Per record, on the model thread:

- `prepare`: the record's bytes, decoded as UTF-8 (invalid bytes become
  U+FFFD), are the turn's text; the record limits apply (`service.max_record_bytes` cuts the value,
  `service.max_record_tokens` refuses a turn whose text is longer: it is not fed, and an `error` annotation says
  so). Nothing here touches the conversation: the `sinkstream-reset` header (start the conversation afresh)
  is only noted, and `run` applies it when the turn's place in the conversation comes, so turns of the same
  conversation earlier in the group still go to the old conversation whatever the grouping.
- `run` (for a group): each conversation's turns in input order, one after another,
  through `pipeline.dialogue.Conversation.turn`: the chat template's text for the turn is appended to the
  conversation's `SinkCache`, the reply is generated into the same cache (it is part of the conversation, unlike
  a `note`), and the conversation state moves on. A turn whose model step fails leaves the cache and the state
  as they were (the conversation goes on without it; the record gets an `error` annotation).
- `annotate`: the `reply` annotation (`Engine.finish` adds an `error` one for problems).

A turn that arrives while the previous reply of its conversation is being generated waits: the service
handles one group at a time and a conversation's records in offset order, so turns of one conversation never
overlap (other conversations' turns in the same group wait for the model thread too; there is no batching of
replies across conversations).

Exactness: a reply depends only on the conversation's cache, its state (`ConversationState`: turn number,
whether the system prompt was sent, the closing tokens still pending) and the `dialogue` settings. Generation
is greedy by default; with `dialogue.temperature > 0` each turn draws from a generator seeded with
(`dialogue.seed`, turn number), and the turn number is part of the checkpointed state, so a record replayed
after a SIGKILL is the same turn of the same conversation and gets the same reply, byte for byte. How a poll
grouped the records never matters: turns are fed one by one, each in forward passes cut by its own content.

Checkpoints: the conversation state goes into the session snapshot's `extra["dialogue"]` (`save` / `load`);
the cache and the last logits are the session's own.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from connectors.protocols import Record
from model.device_errors import raise_if_fatal
from model.loader import LoadedModel
from model.sink_cache import SinkCache
from model.tokens import encode_text
from pipeline.dialogue import Conversation, ConversationState, GenerationSettings, TemplateError
from pipeline.dialogue.conversation import STATE_FORMAT
from pipeline.dialogue.template import ChatTurns
from pipeline.errors import UserError
from pipeline.service import annotations as ann
from pipeline.service import metrics
from pipeline.service.annotations import Problem
from pipeline.service.backend import SinkBackend
from pipeline.service.session import RESET_HEADER, RecordWork, StreamSession, quarantined, too_large
from pipeline.settings import Settings

log = structlog.get_logger(__name__)

EXTRA_KEY = "dialogue"  # key of the conversation state in a session snapshot's `extra`


class DialogueModelError(UserError):
    """Dialogue mode was asked of a model without a usable chat template."""


class DialogueMode:
    """The per-record logic of dialogue mode; one per `Engine` (it holds the chat template's pieces)."""

    def __init__(self, lm: LoadedModel, settings: Settings, meta: dict[str, Any]):
        self.settings, self.meta = settings, meta
        self.generation = GenerationSettings(**settings.dialogue.model_dump())
        try:
            self.chat = ChatTurns.from_tokenizer(lm.tokenizer)
        except TemplateError as exc:
            raise DialogueModelError(
                f"service.mode: dialogue expected a model with a chat template (an instruct model), got "
                f"{settings.model.name!r}: {exc}"
            ) from exc

    pooled = False  # replies are generated into one SinkCache per conversation
    uses_templates = False  # a turn is not scored: no template memory, no reference of normal

    # ---- record -> work ---------------------------------------------------------------------------------
    def prepare(self, session: StreamSession, record: Record) -> RecordWork:
        """The record as a user turn (`lines` = [its text]), within the record limits (module docstring)."""
        limits = self.settings.service
        if session.quarantined:
            return RecordWork(record, session, [], [], skip_score=True, problems=[
                quarantined(session, "conversation", "its turns are not answered")])
        reset = RESET_HEADER in record.headers
        problems: list[Problem] = []
        value = record.value
        if len(value) > limits.max_record_bytes:
            problems.append(too_large(len(value), limits.max_record_bytes, "the turn is the first ones"))
            value = value[: limits.max_record_bytes]
        text = value.decode("utf-8", errors="replace")
        ids = encode_text(session.engine.tokenizer, text)  # as ChatTurns.user_ids will feed it
        if len(ids) > limits.max_record_tokens:
            return RecordWork(record, session, [], [], skip_score=True, reset=reset, problems=[*problems, Problem(
                reason="record_too_many_tokens", skipped_lines=1, skipped_tokens=len(ids),
                message=f"expected a user turn of at most {limits.max_record_tokens} tokens, got {len(ids)}; "
                        "the turn was not fed to the conversation and has no reply",
            )])
        return RecordWork(record, session, [text], [ids], problems, reset=reset)

    # ---- the model step -----------------------------------------------------------------------------------
    def conversation(self, session: StreamSession) -> Conversation:
        """The session's conversation over its cache (the current `dialogue` settings replace stored ones)."""
        backend, cache = session.engine.backend, session.cache
        # Dialogue mode always runs one SinkCache each (make_backend).
        assert isinstance(backend, SinkBackend) and isinstance(cache, SinkCache)
        return Conversation(backend.runner, cache, settings=self.generation,
                            state=session.dialogue, turns=self.chat, last_logits=session.last_logits)

    def run(self, groups: list[list[RecordWork]]) -> None:
        """Each conversation's turns of a group, in order (see the module docstring)."""
        for works in groups:
            self._answer(works[0].session, works)

    def _answer(self, session: StreamSession, works: list[RecordWork]) -> None:
        start = time.perf_counter()
        for w in works:
            if w.reset:
                session.reset()
            if w.skip_score:
                w.step.tokens_seen = session.tokens_seen
                continue
            conv = self.conversation(session)
            try:
                reply = conv.turn(w.lines[0])
            except Exception as exc:  # noqa: BLE001 - a failed turn is isolated to its record (cache restored)
                raise_if_fatal(exc)  # unless the device itself failed
                reason = (f"model step failed for conversation {session.key!r} (turn of {w.tokens} tokens): "
                          f"{type(exc).__name__}: {exc}")
                log.error(
                    "model.step_failed", stream=session.key, tokens=w.tokens, error=f"{type(exc).__name__}: {exc}"
                )
                metrics.ERRORS.labels("model_step").inc()
                w.step.error, w.step.tokens_seen = reason, None
                continue
            w.step.reply, w.step.turn = reply, conv.state.turns - 1
            session.dialogue, session.last_logits = conv.state, conv.last_logits
            w.step.tokens_seen = session.tokens_seen
        metrics.MODEL_STEP_SECONDS.observe(time.perf_counter() - start)
        metrics.BATCH_TOKENS.observe(sum(w.tokens for w in works))
        metrics.BATCH_STREAMS.observe(1)

    # ---- work -> annotations ------------------------------------------------------------------------------
    def annotate(self, session: StreamSession, work: RecordWork) -> list[dict[str, Any]]:
        """The record's `reply` annotation."""
        record, step = work.record, work.step
        rid = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        assert step.reply is not None and step.turn is not None
        reply = step.reply
        seen = step.tokens_seen if step.tokens_seen is not None else session.tokens_seen
        return [ann.reply_annotation(rid, session.key, reply.text, len(reply.token_ids), reply.prompt_tokens,
                                     reply.stopped, step.turn, seen, self.meta)]

    # ---- snapshot -----------------------------------------------------------------------------------------
    def save(self, session: StreamSession, extra: dict[str, Any]) -> None:
        """Put the conversation state into a snapshot's `extra` (nothing before the first turn)."""
        if session.dialogue is not None:
            extra[EXTRA_KEY] = session.dialogue.model_dump(mode="json")

    def load(self, session: StreamSession, extra: dict[str, Any]) -> None:
        """Take the conversation state back from a snapshot's `extra` (raises pydantic's ValidationError,
        a ValueError, for a damaged one: the partition then starts the conversation afresh)."""
        if EXTRA_KEY in extra:
            state = ConversationState.model_validate(extra[EXTRA_KEY])
            if state.format != STATE_FORMAT:
                raise ValueError(f"expected conversation state format {STATE_FORMAT}, got {state.format}")
            session.dialogue = state
