"""Turn-by-turn rendering of a model's own chat template, for one endless cache.

A chat template renders a whole conversation. An endless conversation on a sink cache never re-encodes its
history, so each turn needs only the text the template would *add* for it. `ChatTurns` derives those pieces
once, from the template itself, by rendering placeholder conversations and taking differences:

- `first_turn(user, system)`: the template's rendering of `[system?, user]` with the generation prompt (the
  template adds its default system prompt when none is given, as SmolLM2's does);
- `next_turn(user)`: what `[..., assistant, user]` + generation prompt adds after a finished assistant turn;
- `reply_suffix`: what the template writes after an assistant message's content (`<|im_end|>\n` for ChatML),
  whose first token is the end-of-turn token generation stops on.

Nothing here is specific to ChatML; a template whose turns are not a pure append (one that rewrites earlier
turns) is refused with the text that did not line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.tokens import encode_markup, encode_text

# Placeholders unlikely to occur in any template's own text.
_SYS = "\x00sys-placeholder\x00"
_USER = "\x00user-placeholder\x00"
_ASSISTANT = "\x00assistant-placeholder\x00"
_NEXT = "\x00next-placeholder\x00"


class TemplateError(ValueError):
    """The tokenizer has no chat template, or its turns cannot be rendered one at a time."""


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise TemplateError(f"chat template: expected the {what} exactly once in {text!r}")
    before, after = text.split(marker)
    return before, after


@dataclass(frozen=True)
class ChatTurns:
    """The pieces of text a chat template adds per turn (see the module docstring)."""

    tokenizer: Any
    # first turn, with and without an explicit system prompt: text around the user's (and system's) content
    first_with_system: tuple[str, str, str]  # (before system, between system and user, after user)
    first_default: tuple[str, str]  # (before user, after user) when no system prompt is given
    next_user: tuple[str, str]  # (before user, after user) following a finished assistant turn
    reply_suffix: str  # what follows an assistant message's content (starts with the end-of-turn marker)
    end_of_turn_id: int  # the token generation stops on

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTurns:
        """Derive the per-turn pieces from `tokenizer.chat_template`; raise TemplateError if impossible."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("expected a tokenizer with a chat template (an instruct model), got none")
        sys_msg = {"role": "system", "content": _SYS}
        user = {"role": "user", "content": _USER}
        assistant = {"role": "assistant", "content": _ASSISTANT}
        nxt = {"role": "user", "content": _NEXT}

        with_sys = _render(tokenizer, [sys_msg, user], True)
        head, rest = _split(with_sys, _SYS, "system placeholder")
        mid, tail = _split(rest, _USER, "user placeholder")
        default = _split(_render(tokenizer, [user], True), _USER, "user placeholder")

        closed = _render(tokenizer, [sys_msg, user, assistant], False)
        prompt = _render(tokenizer, [sys_msg, user], True)
        if not closed.startswith(prompt):
            raise TemplateError(
                f"chat template: expected an assistant turn to extend the generation prompt {prompt!r}, got {closed!r}"
            )
        reply_text, suffix = _split(closed[len(prompt) :], _ASSISTANT, "assistant placeholder")
        if reply_text:
            raise TemplateError(
                f"chat template: expected the assistant's content right after the prompt, got {reply_text!r} first"
            )
        following = _render(tokenizer, [sys_msg, user, assistant, nxt], True)
        if not following.startswith(closed):
            raise TemplateError(
                f"chat template: expected a new user turn to append to {closed!r}, got {following!r}"
            )
        next_user = _split(following[len(closed) :], _NEXT, "next user placeholder")

        suffix_ids = encode_markup(tokenizer, suffix) if suffix else []
        if suffix_ids and suffix_ids[0] in set(tokenizer.all_special_ids):
            end_id = suffix_ids[0]
        elif tokenizer.eos_token_id is not None:
            end_id = tokenizer.eos_token_id
        else:
            raise TemplateError(f"chat template: no end-of-turn token found (reply suffix {suffix!r}, no eos token)")
        return cls(tokenizer, (head, mid, tail), default, next_user, suffix, int(end_id))

    # ---- text of one turn ---------------------------------------------------------------------------------
    def user_text(self, user: str, first: bool, system: str | None = None) -> str:
        """Template text that opens the assistant's reply to `user` (`first`: the conversation's first turn).
        For display and tests: the model is fed `user_ids`, which never parses markers out of `user`."""
        return "".join(text for text, _ in self._user_pieces(user, first, system))

    def _user_pieces(self, user: str, first: bool, system: str | None) -> list[tuple[str, bool]]:
        """The turn's text in pieces, each marked True where it is the template's own (markers meant)."""
        if first and system is not None:
            head, mid, tail = self.first_with_system
            return [(head, True), (system, False), (mid, True), (user, False), (tail, True)]
        before, after = self.first_default if first else self.next_user
        return [(before, True), (user, False), (after, True)]

    def encode(self, text: str) -> list[int]:
        """Token ids of the template's own text; special markers in it become their special tokens."""
        return encode_markup(self.tokenizer, text)

    def user_ids(self, user: str, first: bool, system: str | None = None) -> list[int]:
        """Token ids of a user turn: the template's pieces with their markers, the user's (and system prompt's)
        text as data, so `<|im_end|>` typed by a user is the characters it is and cannot end the turn."""
        ids: list[int] = []
        for text, markup in self._user_pieces(user, first, system):
            if text:
                ids += self.encode(text) if markup else encode_text(self.tokenizer, text)
        return ids

    def closing_ids(self, stopped_on_end: bool) -> list[int]:
        """Tokens that finish a reply in the cache: after the end-of-turn token, or the whole suffix."""
        ids = self.encode(self.reply_suffix)
        if stopped_on_end and ids and ids[0] == self.end_of_turn_id:
            return ids[1:]
        return ids
