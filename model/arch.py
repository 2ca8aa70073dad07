"""Which architectures sinkstream streams, how each encodes positions, and whether chunked feeds are exact.

Three ways a model can encode position, three consequences for a sink cache (Xiao et al. 2023, section 3.2):

- RoPE: positions live in the keys' rotation. Kept keys must sit at positions inside the cache; sinkstream
  keeps each key rotated at `stream_index - base` and re-rotates the window when `base` moves.
- ALiBi: a linear bias on the distance between query and key index in the cache; nothing to shift.
- Absolute (learned table): the position is baked into the hidden state at input, so a token's position is
  `min(stream_index, sinks + window - 1)` and `sinks + window` must fit the model's table.

`exact_chunks` is True where the model calls attention through transformers' public `AttentionInterface`,
which lets sinkstream run each query of a chunk against exactly the keys it would see if streamed alone.
Models with their own attention code (Falcon, MPT) stream exactly one token at a time; for larger chunks
they fall back to evict-for-space (every token of a chunk of C sees up to C-1 fewer window tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Positions = Literal["rope", "alibi", "absolute"]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    positions: Positions
    # Chunked feeds give the same per-token results as one token at a time.
    exact_chunks: bool
    # Largest position index + 1 the model accepts (None: unbounded, e.g. ALiBi).
    max_positions: int | None

    def check_span(self, sinks: int, window: int | None) -> None:
        """Raise ValueError when `sinks + window` cannot be represented by this model's positions."""
        if window is None:
            return
        span = sinks + window
        if self.max_positions is not None and span > self.max_positions:
            raise ValueError(
                f"{self.model_type}: sinks + window must be at most {self.max_positions} (the model's position "
                f"table), got {sinks} + {window} = {span}"
            )


# model_type -> (positions, exact_chunks, config key holding the position limit)
_SUPPORTED: dict[str, tuple[Positions, bool, str | None]] = {
    "llama": ("rope", True, "max_position_embeddings"),
    "mistral": ("rope", True, "max_position_embeddings"),
    "qwen2": ("rope", True, "max_position_embeddings"),
    "qwen3": ("rope", True, "max_position_embeddings"),
    "gemma": ("rope", True, "max_position_embeddings"),
    "gpt_neox": ("rope", True, "max_position_embeddings"),
    "gpt2": ("absolute", True, "n_positions"),
    "falcon": ("rope", False, "max_position_embeddings"),
    "mpt": ("alibi", False, "max_seq_len"),
    # Learned per-head sink logits (`sinks`, passed to attention as `s_aux`): honoured by model.sink_logits.
    # Only configs whose layers are all full attention; see _refuse_mixed_layers.
    "gpt_oss": ("rope", True, "max_position_embeddings"),
}

_REFUSED: dict[str, str] = {
    "gemma2": "alternates sliding-window and global layers with their own windows; a single sink window "
    "would silently change what its local layers see",
    "gemma3": "alternates sliding-window and global layers with separate rotary bases",
    "bloom": "builds its ALiBi bias from the padding mask inside its own attention code; not tested",
    "mamba": "is a state-space model: it has no attention KV cache to keep sinks in",
    "t5": "is an encoder-decoder model; streaming needs a decoder-only causal LM",
    "bart": "is an encoder-decoder model; streaming needs a decoder-only causal LM",
}


def architecture_of(model_type: str, config: dict[str, Any]) -> Architecture:
    """Return the Architecture for a config, or raise ValueError naming why the model is refused."""
    if model_type in _REFUSED:
        raise ValueError(f"model_type {model_type!r} is not supported: it {_REFUSED[model_type]}")
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"model_type {model_type!r} is not supported: expected one of {sorted(_SUPPORTED)} "
            "(architectures whose position handling sinkstream knows and tests)"
        )
    _refuse_mixed_layers(model_type, config)
    positions, exact, limit_key = _SUPPORTED[model_type]
    if model_type == "falcon" and config.get("alibi"):
        positions = "alibi"
    limit = config.get(limit_key) if limit_key else None
    if positions == "alibi" and model_type != "mpt":
        limit = None
    return Architecture(model_type, positions, exact, int(limit) if limit else None)


def _refuse_mixed_layers(model_type: str, config: dict[str, Any]) -> None:
    """gpt-oss alternates sliding-window layers (their own 128-token window) with full-attention layers.

    One sink cache per stream gives every layer the same sinks + window; a sliding layer would then see
    `window` tokens instead of its trained 128 (and keep sinks it was never trained with), silently changing
    the model. Only a config whose `layer_types` are all `full_attention` streams (released gpt-oss checkpoints
    alternate, so they are refused here).
    """
    layer_types = config.get("layer_types") or []
    mixed = sorted({t for t in layer_types if t != "full_attention"})
    if model_type == "gpt_oss" and mixed:
        raise ValueError(
            f"model_type 'gpt_oss' is supported only with every layer full attention: this config has "
            f"{sum(t != 'full_attention' for t in layer_types)} of {len(layer_types)} layers of type {mixed} with "
            f"their own sliding_window={config.get('sliding_window')}, which one sink window per stream would "
            "silently change"
        )
