"""Input text is data, never control: how text from outside becomes token ids.

A tokenizer parses its special markers (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...) out of any text by
default, so a log line from an LLM gateway, or a chat user who types `<|im_end|>`, would inject the model's control
tokens into a stream or forge the structure of a conversation. Every piece of text that arrives from outside (a
record's lines, a dialogue turn, a file to score) goes through `encode_text`, which tokenizes special markers as
the characters they are. Only code that means a marker (a chat template's own pieces, the configured sink token)
tokenizes with markers parsed, through `encode_markup`.
"""

from __future__ import annotations

from typing import Any


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of outside text, special markers in it split into ordinary tokens (no BOS/EOS added)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_markup(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text we wrote ourselves, whose special markers are meant (a chat template's pieces)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
