"""Small models built in-process for tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model.loader import LoadedModel, resolve_model_dir, wrap_model


def build_text_lm(seed: int = 0) -> LoadedModel:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer: real text in, fast forward passes."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return wrap_model(LlamaForCausalLM(config), tokenizer)
