"""Endless dialogue on a sink cache: chat-template turns appended to one cache, replies kept in it.

Service-facing API (see `conversation.py`):

    Conversation(model: SinkModel, cache: SinkCache, settings: GenerationSettings | None = None,
                 state: ConversationState | None = None)
        .turn(user_text) -> Reply(text, token_ids, prompt_tokens, stopped)
"""

from pipeline.dialogue.conversation import Conversation, ConversationState, ConversationStats, Reply, TextStream
from pipeline.dialogue.generation import GenerationSettings, pick_token
from pipeline.dialogue.template import ChatTurns, TemplateError

__all__ = [
    "ChatTurns",
    "Conversation",
    "ConversationState",
    "ConversationStats",
    "GenerationSettings",
    "Reply",
    "TemplateError",
    "TextStream",
    "pick_token",
]
