"""Fixtures for the dialogue tests: a tiny random Llama that speaks through the real SmolLM2 tokenizer.

The tokenizer (and its chat template) is the default model's own; the weights are random and tiny, so a turn
takes milliseconds. `tiny_chat_dir` is the same model saved as a Hugging Face directory for `--model DIR`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from model.loader import LoadedModel, resolve_model_dir, wrap_model


@pytest.fixture(scope="session")
def chat_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))


def build_tiny_chat_model(tokenizer, seed: int = 0, favour_end_of_turn: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if favour_end_of_turn:
        # Every embedding carries a large constant on feature 0, which only the end-of-turn row reads:
        # the model answers every turn with the end-of-turn token straight away.
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 50.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>"), 0] = 50.0
    return model


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
