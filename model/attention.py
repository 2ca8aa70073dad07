"""The `sinkstream` attention function, registered through transformers' public `AttentionInterface`.

For a chunk of C queries it computes, in one pass, exactly what each query would compute if the stream were
fed one token at a time through a StreamingLLM cache (see `model.sink_cache` for the position contract):

- band part: keys of the query's own window (the W most recent tokens, itself included). Queries and keys are
  rotated in one shared frame, so their relative distances are the true ones;
- sink part: the first S tokens. The query is re-rotated to the position it would hold in a cache streamed
  alone, `min(t, S + W - 1)`, so its distance to every sink is right.

Both parts share one softmax: sink columns of the score matrix are recomputed with the re-rotated query, then
one mask selects, per query, its sinks and its band. Without a plan (a plain forward, e.g. the `recompute`
baseline) it falls through to transformers' SDPA implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.rotary import Rotation

ATTENTION_NAME = "sinkstream"
_registered = False


@dataclass
class AttentionPlan:
    """What the attention function needs for one forward pass; built by `SinkCache.begin` from counters only."""

    # Number of leading buffer columns that are sinks.
    sink_cols: int
    # (C, L) bool, True where query j may attend to buffer column k; None when every column is visible.
    mask: torch.Tensor | None
    # (C, rotary_dims) float32 cos/sin moving each query to its sink-relative position; None if not needed.
    sink_cos: torch.Tensor | None
    sink_sin: torch.Tensor | None


def sink_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sink_plan: AttentionPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a sink cache buffer; query (B, H, C, D), key/value (B, Hkv, L, D) -> (B, C, H, D)."""
    if sink_plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, chunk, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if scaling is None:
        scaling = dim**-0.5
    if chunk == 1 and sink_plan.mask is None and not kwargs.get("softcap"):
        return _decode(query, key, value, scaling, sink_plan, group > 1), None
    # Grouped-query attention without repeating keys: fold the query group into the row axis.
    q = query.reshape(batch, kv_heads, group * chunk, dim)  # (B, Hkv, G*C, D)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # (B, Hkv, G*C, L)
    if sink_plan.sink_cols and sink_plan.sink_cos is not None:
        q_sink = Rotation.apply(query, sink_plan.sink_cos, sink_plan.sink_sin)  # (B, H, C, D)
        q_sink = q_sink.reshape(batch, kv_heads, group * chunk, dim)  # (B, Hkv, G*C, D)
        sink_keys = key[:, :, : sink_plan.sink_cols]  # (B, Hkv, S, D)
        scores[..., : sink_plan.sink_cols] = torch.matmul(q_sink, sink_keys.transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if sink_plan.mask is not None:
        scores = scores.view(batch, kv_heads, group, chunk, length)  # (B, Hkv, G, C, L)
        scores = scores.masked_fill(~sink_plan.mask, float("-inf"))
        scores = scores.view(batch, kv_heads, group * chunk, length)  # (B, Hkv, G*C, L)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, G*C, D)
    out = out.view(batch, heads, chunk, dim).transpose(1, 2).contiguous()  # (B, C, H, D)
    return out, None


def _decode(query, key, value, scaling, plan: AttentionPlan, gqa: bool) -> torch.Tensor:
    """One query over the whole buffer: a single fused SDPA call.

    With one query, rotating the query forward by d for the sink part equals rotating the S sink keys back
    by d (rotations are orthogonal), so the sink keys are moved in place for the call and restored right
    after. The buffer is left exactly as it was; nothing else reads it in between.
    """
    n = plan.sink_cols if plan.sink_cos is not None else 0
    saved = key[:, :, :n].clone() if n else None
    if n:
        key[:, :, :n] = Rotation.apply(saved, plan.sink_cos, -plan.sink_sin)
    try:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    finally:
        if n:
            key[:, :, :n] = saved
    return out.transpose(1, 2).contiguous()  # (B, 1, H, D)


def register_attention() -> None:
    """Register `sink_attention` under the name `sinkstream` (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, sink_attention)
        _registered = True
