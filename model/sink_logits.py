"""Learned per-head sink logits (gpt-oss `sinks`, transformers' `s_aux`) in sinkstream's attention.

gpt-oss gives every attention head one learned logit s_h that joins the softmax as an extra column with no
value: p = softmax([q.k_1 * scale, ..., q.k_L * scale, s_h]) and the output is sum_j p_j v_j (the sink's
share of the probability mass is simply dropped). It is a sink that needs no token and no KV entry, so it
survives any eviction by construction.

sinkstream honours it exactly on both of its paths by appending one column per head to the keys (a zero key,
so SDPA's q.k term is exactly 0 there), the values (a zero value) and the additive mask (s_h). That copies the
key/value buffer once per layer and forward (`torch.cat`); gpt-oss is not the default model, so simplicity
wins over the in-place tricks of the Llama path.
"""

from __future__ import annotations

import torch


def _additive(mask: torch.Tensor | None, chunk: int, length: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """An additive (b, h, C, L) float mask from None (all visible), a bool mask (True = visible) or a float one."""
    if mask is None:
        return torch.zeros(1, 1, chunk, length, dtype=dtype, device=device)
    while mask.dim() < 4:
        mask = mask[None]  # (C, L) -> (1, 1, C, L)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def sdpa_with_sink_logits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, gqa: bool,
                          mask: torch.Tensor | None, s_aux: torch.Tensor) -> torch.Tensor:
    """SDPA over query (B, H, C, D), key/value (B, Hkv, L, D) plus one sink-logit column per head -> (B, C, H, D).

    `mask` is None, a bool (.., C, L) mask (True = visible) or an additive float one, broadcastable to
    (B, H, C, L); `s_aux` (H,) holds the heads' sink logits.
    """
    batch, heads, chunk, _ = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if s_aux.numel() != heads:
        raise ValueError(f"expected one sink logit per attention head ({heads}), got {s_aux.numel()}")
    add = _additive(mask, chunk, length, query.dtype, query.device)
    add = add.expand(add.shape[0], heads, chunk, length)  # (b, H, C, L), b in {1, B}
    sink_col = s_aux.to(query.dtype).view(1, heads, 1, 1).expand(add.shape[0], heads, chunk, 1)  # (b, H, C, 1)
    add = torch.cat([add, sink_col], dim=-1)  # (b, H, C, L + 1)
    key = torch.cat([key, key.new_zeros(batch, kv_heads, 1, key.shape[-1])], dim=-2)  # (B, Hkv, L + 1, D)
    value = torch.cat([value, value.new_zeros(batch, kv_heads, 1, value.shape[-1])], dim=-2)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=add, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous()  # (B, C, H, D)


def plain_with_sink_logits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float, s_aux: torch.Tensor) -> torch.Tensor:
    """A plain causal forward (no sink plan: the `recompute` baseline, a first prompt) with sink logits.

    transformers passes the layer's mask (bool or additive, (B, 1, C, L)) or None for a causal pass that SDPA
    would run with `is_causal`; None is turned into that causal mask here (queries are the last C positions).
    """
    chunk, length = query.shape[2], key.shape[2]
    if attention_mask is None and chunk > 1:
        q_index = torch.arange(length - chunk, length, device=query.device)[:, None]  # (C, 1)
        attention_mask = torch.arange(length, device=query.device)[None, :] <= q_index  # (C, L) bool
    elif attention_mask is not None:
        attention_mask = attention_mask[..., -length:]
    return sdpa_with_sink_logits(query, key, value, scaling, query.shape[1] != key.shape[1], attention_mask, s_aux)
