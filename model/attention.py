"""The `sinkstream` attention function, registered through transformers' public `AttentionInterface`.

For a chunk of C queries it computes, in one pass, exactly what each query would compute if the stream were
fed one token at a time through a StreamingLLM cache (see `model.sink_cache` for the position contract):

- band part: keys of the query's own window (the W most recent tokens, itself included). Queries and keys are
  rotated in one shared frame, so their relative distances are the true ones;
- sink part: the first S tokens. The query is re-rotated to the position it would hold in a cache streamed
  alone, `min(t, S + W - 1)`, so its distance to every sink is right.

Both parts share one softmax. The chunk path makes that one fused SDPA call: the sink keys are zeroed for the
call, and their true scores (re-rotated query against sink key) enter through the additive mask, whose other
columns are 0 (visible) or -inf (evicted for this query, or in its future). The decode path (one query) rotates
the sink keys instead of the query, which needs no mask at all. Logit soft-capping (Gemma-2) is refused.
Without a plan (a plain forward, e.g. the `recompute` baseline) the function falls through to transformers'
SDPA implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.rotary import Rotation
from model.sink_logits import plain_with_sink_logits, sdpa_with_sink_logits

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
    # What every layer of this forward would otherwise recompute: additive masks by (dtype, B, H), -sink_sin.
    _memo: dict = field(default_factory=dict, repr=False)

    def back_sin(self) -> torch.Tensor:
        """`-sink_sin`: the decode path rotates the sink keys back instead of the query forward."""
        if "back_sin" not in self._memo:
            assert self.sink_sin is not None, "back_sin() of a plan without sink rotation"
            self._memo["back_sin"] = -self.sink_sin
        return self._memo["back_sin"]

    def bias(self, query: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, L) and (B, H, C, L) additive masks for `query` (B, H, C, D): 0 where visible, -inf where hidden.

        Every layer of a forward shares one (B, H, C, L) buffer; the caller overwrites only the sink columns,
        which differ per layer and head. The columns after them never change, so they are written once.
        """
        batch, heads, chunk, _ = query.shape
        key = (query.dtype, batch, heads)
        if key not in self._memo:
            base = torch.zeros(chunk, length, dtype=query.dtype, device=query.device)  # (C, L)
            if self.mask is not None:
                base = base.masked_fill(~self.mask, float("-inf"))
            self._memo[key] = (base, base.expand(batch, heads, chunk, length).clone())
        return self._memo[key]


def sink_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sink_plan: AttentionPlan | None = None,
    pool_plan=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a sink cache buffer; query (B, H, C, D), key/value (B, Hkv, L, D) -> (B, C, H, D).

    With `pool_plan` (a `model.pool_step.PoolPlan`), query is a packed ragged batch (1, H, N, D) and key/value
    are a `model.pool.KVPool` layer (slots, Hkv, S + R, D); the plan attends each stream over its own slot.
    """
    s_aux = kwargs.get("s_aux")  # gpt-oss: one learned sink logit per head, an extra softmax column (model.sink_logits)
    if pool_plan is not None and s_aux is not None:
        raise ValueError(
            "sinkstream's pooled batch step does not apply gpt-oss sink logits (s_aux); stream this model per session"
        )
    if pool_plan is not None:
        if kwargs.get("softcap"):
            raise ValueError(
                f"sinkstream attention supports no logit soft-capping: expected softcap=None, got {kwargs['softcap']}"
            )
        dim = query.shape[-1]
        return pool_plan.attend(query, key, value, dim**-0.5 if scaling is None else scaling), None
    if sink_plan is None and s_aux is not None:
        return plain_with_sink_logits(
            query, key, value, attention_mask, scaling or query.shape[-1] ** -0.5, s_aux
        ), None
    if sink_plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    softcap = kwargs.get("softcap")
    if softcap:  # the architecture table refuses Gemma-2/3; this guards any other soft-capped model
        raise ValueError(f"sinkstream attention supports no logit soft-capping: expected softcap=None, got {softcap}")
    dim = query.shape[-1]
    gqa = query.shape[1] != key.shape[1]
    if scaling is None:
        scaling = dim**-0.5
    if query.shape[2] == 1 and sink_plan.mask is None:
        return _decode(query, key, value, scaling, sink_plan, gqa, s_aux), None
    return _chunk(query, key, value, scaling, sink_plan, gqa, s_aux), None


def _chunk(query, key, value, scaling, plan: AttentionPlan, gqa: bool, s_aux=None) -> torch.Tensor:
    """C queries over the buffer in one fused SDPA call; sink scores enter through the additive mask.

    Query j's sink scores need the query re-rotated by its own delta, so they cannot come from the shared keys.
    They are computed apart (C x S per head, small, in float32: `sink_scores`), written into the sink columns of
    a per-head additive mask, and the sink keys are zeroed for the call so that SDPA's own q.k term is exactly 0
    there.
    """
    length = key.shape[2]
    n = plan.sink_cols if plan.sink_cos is not None else 0
    if not n:
        mask = None if plan.mask is None else plan.mask[None, None]  # (1, 1, C, L), broadcast over heads
        return _sdpa(query, key, value, scaling, gqa, mask, s_aux=s_aux)
    assert plan.sink_cos is not None and plan.sink_sin is not None  # set together (n > 0 needs sink_cos)
    scores = sink_scores(query, plan.sink_cos, plan.sink_sin, key[:, :, :n], scaling)  # (B, H, C, S) float32
    base, bias = plan.bias(query, length)  # (C, L), (B, H, C, L) shared by the layers of this forward
    bias[..., :n] = scores + base[:, :n]  # keeps -inf on sinks a query cannot see yet
    return _sdpa(query, key, value, scaling, gqa, bias, sink_keys=torch.zeros_like(key[:, :, :n]), s_aux=s_aux)


def sink_scores(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sink_keys: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """Scaled scores of the queries (B, H, C, D), each re-rotated by its cos/sin (C, rot) or (B, 1, C, rot) to its
    sink-relative position, against the sink keys (B, Hkv, S, D) -> (B, H, C, S), in float32 whatever the
    model's dtype: the sink columns get the precision SDPA gives the others (it accumulates in float32), and on
    a CPU a float32 product this small is faster than a bf16 one."""
    batch, heads, chunk, dim = query.shape
    kv_heads, n = sink_keys.shape[1], sink_keys.shape[2]
    q_sink = Rotation.apply(query.float(), cos, sin)  # (B, H, C, D) float32, not rounded to the model's dtype
    q_sink = q_sink.reshape(batch, kv_heads, heads // kv_heads * chunk, dim)  # (B, Hkv, G*C, D)
    scores = torch.matmul(q_sink, sink_keys.float().transpose(-1, -2)) * scaling  # (B, Hkv, G*C, S)
    return scores.view(batch, heads, chunk, n)  # (B, H, C, S)


def _decode(query, key, value, scaling, plan: AttentionPlan, gqa: bool, s_aux=None) -> torch.Tensor:
    """One query over the whole buffer: a single fused SDPA call.

    With one query, rotating the query forward by d for the sink part equals rotating the S sink keys back
    by d (rotations are orthogonal), so the sink keys are replaced by their rotated copy for the call.
    """
    if not plan.sink_cols or plan.sink_cos is None:
        return _sdpa(query, key, value, scaling, gqa, s_aux=s_aux)
    sink_keys = Rotation.apply(key[:, :, : plan.sink_cols], plan.sink_cos, plan.back_sin())  # (B, Hkv, S, D)
    return _sdpa(query, key, value, scaling, gqa, sink_keys=sink_keys, s_aux=s_aux)


def _sdpa(query, key, value, scaling, gqa, mask=None, sink_keys=None, s_aux=None) -> torch.Tensor:
    """One fused SDPA call -> (B, C, H, D). With `sink_keys` (B, Hkv, S, D), the first S columns of the key
    buffer hold them for the call only: the buffer is restored right after (nothing else reads it in between)."""
    n = 0 if sink_keys is None else sink_keys.shape[-2]
    saved = key[:, :, :n].clone() if n else None
    if n:
        key[:, :, :n] = sink_keys
    try:
        if s_aux is not None:  # gpt-oss sink logits: one more softmax column per head, no KV entry
            return sdpa_with_sink_logits(query, key, value, scaling, gqa, mask, s_aux)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )
    finally:
        if n:
            key[:, :, :n] = saved
    return out.transpose(1, 2).contiguous()  # (B, C, H, D)


def register_attention() -> None:
    """Register `sink_attention` under the name `sinkstream` (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, sink_attention)
        _registered = True
