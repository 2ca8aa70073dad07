"""A tiny random Llama that speaks through the real SmolLM2 tokenizer (shared by the dialogue and recall tests)."""

from __future__ import annotations

import torch
import transformers


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
