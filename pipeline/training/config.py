"""The study's settings (persisted with every run as `study.json`) and the Llama-style model built from them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VARIANTS = ("vanilla", "sink")
Variant = Literal["vanilla", "sink"]


class StudyConfig(BaseModel):
    """Everything that defines a study: model shape, data, optimisation budget and evaluation.

    Both variants use the same config; the sink variant's samples are the same text windows with the sink
    token prepended (one more input position, the same L-1 scored targets).
    """

    model_config = ConfigDict(extra="forbid")

    # model (Llama-style: RMSNorm, SwiGLU, RoPE, tied embeddings)
    vocab_size: int = Field(2048, ge=260)
    hidden_size: int = Field(192, ge=16)
    intermediate_size: int = Field(512, ge=16)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    # Positions RoPE may be asked for: the dense evaluation streams the whole held-out text without eviction.
    max_positions: int = Field(16384, ge=64)
    # data
    holdout: float = Field(0.1, gt=0.0, lt=1.0)
    max_chars: int | None = None  # truncate every source file first (quick harness test only)
    seq_len: int = Field(256, ge=8)  # text tokens per training sample (the sink variant adds one input position)
    batch_size: int = Field(16, ge=1)
    # optimisation: AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`
    steps: int = Field(450, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    warmup: int = Field(45, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    seed: int = 0
    # bookkeeping: checkpoint every `save_every` steps; validation loss and attention share `probes` times
    save_every: int = Field(50, ge=1)
    probes: int = Field(8, ge=1)
    probe_samples: int = Field(16, ge=1)
    # evaluation: total cache W (sinks + window = W), tokens per held-out stream, chunk per forward pass
    eval_cache: int = Field(128, ge=8)
    eval_tokens: int = Field(4096, ge=64)
    eval_chunk: int = Field(64, ge=1)
    eval_sinks: tuple[int, ...] = (0, 1, 2, 4)
    eval_kinds: tuple[str, ...] = ("prose", "logs")


FULL = StudyConfig()
QUICK = StudyConfig(
    vocab_size=384, hidden_size=64, intermediate_size=128, layers=2, heads=4, max_positions=2048,
    max_chars=20_000, seq_len=64, batch_size=8, steps=24, warmup=4, save_every=12, probes=3, probe_samples=4,
    eval_cache=32, eval_tokens=256, eval_chunk=16,
)


def lr_at(config: StudyConfig, step: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up, then cosine to min_lr_ratio * lr."""
    import math

    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    progress = min(1.0, max(0.0, progress))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_model(config: StudyConfig, tokenizer) -> PreTrainedModel:
    """A randomly initialised LlamaForCausalLM of the study's shape (float32, SDPA attention for training)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer holds {len(tokenizer)} tokens, more than vocab_size={config.vocab_size}")
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama)
    model.set_attn_implementation("sdpa")
    return model
