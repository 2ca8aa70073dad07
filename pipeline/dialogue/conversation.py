"""An endless conversation on one SinkCache: each turn appends the user's text and the reply, never resets.

    conv = Conversation(SinkModel(lm), cache)          # a fresh cache, or a stream session's cache
    reply = conv.turn("What is a sink token?")          # Reply(text, token_ids, prompt_tokens, stopped)
    blob = conv.snapshot()                              # bytes (model/snapshot.py codec)
    conv = Conversation.restore(SinkModel(lm), blob)    # continues bit-exactly

Per turn, only the template text the turn adds is encoded (`ChatTurns`); the history stays in the cache as
keys and values and leaves it as the window rolls on. The reply's tokens stay in the cache: they are part of
the conversation. The last generated token (the end-of-turn token, or the last token of a reply cut at
`max_reply_tokens`) and the template's closing text after it are *pending*: they are fed together with the
next user turn in one forward pass, so a turn costs one chunked prompt pass plus one pass per reply token.

A reply depends only on the cache, the pending tokens, the settings and the turn number (`ConversationState`),
so the same conversation replayed, or resumed from a snapshot, gives identical tokens and cache tensors.
A turn that raises (including KeyboardInterrupt) leaves the cache and the state as they were before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field

from model.sink_cache import SinkCache
from model.snapshot import SnapshotError, dump_cache, load_cache
from model.stepper import SinkModel
from pipeline.dialogue.generation import GenerationSettings, pick_token
from pipeline.dialogue.template import ChatTurns

log = structlog.get_logger(__name__)

STATE_FORMAT = 1


class ConversationState(BaseModel):
    """Everything about a conversation that is not in its cache. Stored in snapshots (`extra.dialogue`)."""

    model_config = ConfigDict(extra="forbid")

    format: int = STATE_FORMAT
    # Replies generated so far (also the per-turn sampling seed offset).
    turns: int = 0
    # Whether the first turn (with the system prompt) has been sent.
    started: bool = False
    # Tokens already decided but not yet in the cache: the last reply's final token and the template's closing.
    pending_ids: list[int] = Field(default_factory=list)
    settings: GenerationSettings = Field(default_factory=GenerationSettings)


@dataclass(frozen=True)
class Reply:
    """One assistant reply. `token_ids` are the generated tokens, the end-of-turn token included if reached."""

    text: str
    token_ids: list[int]
    prompt_tokens: int  # tokens fed before generating: pending closing of the last reply + this user turn
    stopped: Literal["end_of_turn", "max_tokens"]


@dataclass(frozen=True)
class ConversationStats:
    turns: int
    tokens_seen: int  # tokens fed into the cache since the conversation (or the stream) began
    buffered: int  # tokens held per layer right now
    capacity: int | None  # sinks + window (None: dense, unbounded)
    fill: float  # buffered / capacity (0 for dense)
    evicted: int  # tokens no longer visible to the next token
    pending: int  # decided tokens not yet fed


def feed(model: SinkModel, cache: SinkCache, ids: list[int]) -> torch.Tensor:
    """Feed `ids` in forward passes of `cache.max_chunk` (the split `SinkModel.step` makes) and return only the
    last token's logits (V,), so a long user turn never holds a (tokens, vocab) logits tensor."""
    if not ids:
        raise ValueError("expected at least one token to feed, got none")
    logits: torch.Tensor | None = None
    for start in range(0, len(ids), cache.max_chunk):
        logits = model.step(cache, ids[start : start + cache.max_chunk])[-1]
    assert logits is not None  # ids is not empty
    return logits


class TextStream:
    """Incremental detokenizer: push token ids, get the newly completed text (holds back split UTF-8)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new


class Conversation:
    """A dialogue over `cache` with the shared model. Not thread-safe: one turn at a time per conversation."""

    def __init__(
        self,
        model: SinkModel,
        cache: SinkCache,
        settings: GenerationSettings | None = None,
        state: ConversationState | None = None,
        turns: ChatTurns | None = None,
        last_logits: torch.Tensor | None = None,
    ):
        if state is not None and settings is not None:
            state = state.model_copy(update={"settings": settings})
        self.model = model
        self.cache = cache
        self.state = state or ConversationState(settings=settings or GenerationSettings())
        self.chat = turns or ChatTurns.from_tokenizer(model.lm.tokenizer)
        self.tokenizer = model.lm.tokenizer
        # (vocab,) float32 logits after the last token fed (None before the first turn).
        self.last_logits = last_logits

    @property
    def settings(self) -> GenerationSettings:
        return self.state.settings

    def turn(self, user_text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Append the user's turn, generate the reply into the same cache, return it.

        `on_text` receives the reply's text piece by piece as tokens are generated (for streaming output).
        """
        state, settings = self.state, self.state.settings
        user_ids = self.chat.user_ids(user_text, first=not state.started, system=settings.system_prompt)
        prompt = [*state.pending_ids, *user_ids]
        generator = settings.generator(state.turns)
        stream = TextStream(self.tokenizer)
        before = self.cache.state()
        generated: list[int] = []
        stopped: Literal["end_of_turn", "max_tokens"] = "max_tokens"
        try:
            logits = feed(self.model, self.cache, prompt)  # (V,) predicts the reply's first token
            for i in range(settings.max_reply_tokens):
                token = pick_token(logits, settings, generator)
                generated.append(token)
                if token == self.chat.end_of_turn_id:
                    stopped = "end_of_turn"
                    break
                if on_text is not None:
                    piece = stream.push(token)
                    if piece:
                        on_text(piece)
                if i + 1 == settings.max_reply_tokens:
                    break
                logits = self.model.step(self.cache, [token])[-1]
        except BaseException:
            self.cache.restore(before)
            raise
        pending = [generated[-1], *self.chat.closing_ids(stopped == "end_of_turn")]
        self.state = state.model_copy(update={"turns": state.turns + 1, "started": True, "pending_ids": pending})
        self.last_logits = logits
        content = generated[:-1] if stopped == "end_of_turn" else generated
        text = self.tokenizer.decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        log.debug(
            "dialogue turn", turn=state.turns, prompt_tokens=len(prompt), reply_tokens=len(generated), stopped=stopped
        )
        return Reply(text=text, token_ids=generated, prompt_tokens=len(prompt), stopped=stopped)

    def stats(self) -> ConversationStats:
        c = self.cache
        visible = min(c.sinks, c.seen) + c.kept_after(1)
        capacity = None if c.window is None else c.sinks + c.window
        fill = 0.0 if capacity is None else c.buffered() / capacity
        return ConversationStats(
            self.state.turns, c.seen, c.buffered(), capacity, fill, c.seen - visible, len(self.state.pending_ids)
        )

    # ---- snapshots ------------------------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The cache plus the conversation state and last logits, in the snapshot codec (model/snapshot.py)."""
        tensors = {"last_logits": self.last_logits} if self.last_logits is not None else None
        return dump_cache(self.cache, extra={"dialogue": self.state.model_dump(mode="json")}, tensors=tensors)

    @classmethod
    def restore(cls, model: SinkModel, blob: bytes, settings: GenerationSettings | None = None) -> Conversation:
        """Resume a conversation from `snapshot()` bytes; `settings` replaces the stored generation settings."""
        cache, extra, tensors = load_cache(model.lm, blob)
        if "dialogue" not in extra:
            raise SnapshotError(
                "expected a conversation snapshot (extra key 'dialogue'), "
                f"got a cache snapshot with extra keys {sorted(extra)}"
            )
        state = ConversationState.model_validate(extra["dialogue"])
        if state.format != STATE_FORMAT:
            raise SnapshotError(f"expected conversation state format {STATE_FORMAT}, got {state.format}")
        return cls(model, cache, settings=settings, state=state, last_logits=tensors.get("last_logits"))
