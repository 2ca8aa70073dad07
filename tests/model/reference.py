"""An independent, slow StreamingLLM for the tests: one token per forward through a stock DynamicCache.

It shares no code with `model.sink_cache`: after every step it evicts the oldest window token and, for RoPE
models, re-rotates the remaining window keys one position back with its own rotate-half arithmetic from
the rotary module's `inv_freq` (as HF's old SinkCache did). The new token's position is always the cache
length, so positions are 0..len-1 inside the cache, as in the paper.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from model.loader import LoadedModel


def _rotate_back(keys: torch.Tensor, inv_freq: torch.Tensor, steps: int) -> torch.Tensor:
    angle = -steps * inv_freq.double()
    cos = torch.cat([angle.cos(), angle.cos()]).to(keys.dtype)
    sin = torch.cat([angle.sin(), angle.sin()]).to(keys.dtype)
    rot = cos.numel()
    k_rot, k_pass = keys[..., :rot], keys[..., rot:]
    half = rot // 2
    rotated = k_rot * cos + torch.cat([-k_rot[..., half:], k_rot[..., :half]], -1) * sin
    return torch.cat([rotated, k_pass], -1)


@torch.inference_mode()
def reference_logits(lm: LoadedModel, ids: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Logits (len(ids), vocab) of StreamingLLM with `sinks` + `window` (each token sees sinks + window keys)."""
    model = lm.model
    rotary = [m for n, m in model.named_modules() if n.endswith("rotary_emb")]
    inv_freq = rotary[0].inv_freq if (rotary and lm.arch.positions == "rope") else None
    cache = DynamicCache(config=model.config)
    out = []
    for t in range(ids.numel()):
        length = cache.get_seq_length()
        kwargs = {} if lm.arch.positions == "alibi" else {"position_ids": torch.tensor([[length]])}
        logits = model(input_ids=ids[None, t : t + 1], past_key_values=cache, use_cache=True, **kwargs).logits
        out.append(logits[0, -1].float())
        if cache.get_seq_length() > sinks + window - 1:
            for layer in cache.layers:
                k, v = layer.keys, layer.values
                kept = k[..., sinks + 1 :, :]
                if inv_freq is not None:
                    kept = _rotate_back(kept, inv_freq, 1)
                layer.keys = torch.cat([k[..., :sinks, :], kept], -2)
                layer.values = torch.cat([v[..., :sinks, :], v[..., sinks + 1 :, :]], -2)
    return torch.stack(out)
