"""Small models built in-process for tests (no downloads)."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model.loader import LoadedModel, resolve_model_dir, wrap_model


def build_text_lm(seed: int = 0) -> LoadedModel:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer: real text in, fast forward passes."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return wrap_model(LlamaForCausalLM(config), tokenizer)


VOCAB = 97

# name -> (config class, kwargs). Tiny, but each keeps its architecture's position handling.
TINY = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
    ),
    "llama3-scaled": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-yarn": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.25,
            max_position_embeddings=512,
        ),
    ),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "falcon": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            parallel_attn=True,
            bias=False,
            max_position_embeddings=512,
        ),
    ),
    "mpt": ("MptConfig", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, expansion_ratio=2)),
}
EXACT = ["llama", "llama3-scaled", "llama-yarn", "mistral", "qwen2", "gemma", "gpt_neox", "gpt2"]
FALLBACK = ["falcon", "mpt"]


def build_tiny(name: str, seed: int = 0) -> LoadedModel:
    cls_name, kwargs = TINY[name]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform attention; sharpen it so positions and sinks actually matter.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name_ and "wte" not in name_ and "wpe" not in name_:
                p.mul_(3.0)
    return wrap_model(model)
