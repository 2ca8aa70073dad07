"""Fixtures for the dialogue tests: a tiny random Llama that speaks through the real SmolLM2 tokenizer.

The tokenizer (and its chat template) is the default model's own; the weights are random and tiny, so a turn
takes milliseconds. `tiny_chat_dir` is the same model saved as a Hugging Face directory for `--model DIR`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from model.loader import LoadedModel, resolve_model_dir, wrap_model
from tests.dialogue.tiny import build_tiny_chat_model


@pytest.fixture(scope="session")
def chat_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_chat_lm(chat_tokenizer) -> LoadedModel:
    return wrap_model(build_tiny_chat_model(chat_tokenizer), chat_tokenizer)


@pytest.fixture(scope="session")
def terse_chat_lm(chat_tokenizer) -> LoadedModel:
    """A tiny model that always ends its turn at once."""
    return wrap_model(build_tiny_chat_model(chat_tokenizer, favour_end_of_turn=True), chat_tokenizer)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, chat_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat-model")
    build_tiny_chat_model(chat_tokenizer).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path
