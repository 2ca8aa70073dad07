"""One forward pass that advances many independent streams by one token each.

`step_many(lm, caches, tokens)` feeds `tokens[b]` into `caches[b]` for every stream b in a single batched
forward pass and returns logits (B, vocab) equal (to float rounding) to stepping each stream alone with
`SinkModel.step`. Streams may be at different lengths, before or after eviction, with different sink/window
sizes; they only have to share the model.

How it stays exact without touching `model.sink_cache`:

- Every stream plans its own step with `SinkCache.begin(1)` (evictions, frame moves, positions), and every
  layer's keys and values go through that stream's own `SinkLayer.update`, so each stream's buffer ends up
  exactly as a lone step would leave it. `SinkCache.end()` commits the counters afterwards.
- The per-stream buffers `[sinks | window | new]` have different lengths L_b: they are right-padded to the
  longest one, and a (B, 1, 1, L_max) boolean mask hides the padding (and whatever the stream's own
  `AttentionPlan.mask` hides).
- The sink correction of the exact attention path re-rotates the *query* by `delta` before it meets the sink
  keys (see `model.attention`). RoPE scores depend only on the relative rotation, <R(d)q, k> = <q, R(-d)k>,
  so here the *sink keys* of the padded copy are rotated by `-delta` instead. The stream's stored keys are
  untouched. With the correction folded into the keys, the batch runs through the model's standard SDPA path
  (the `sinkstream` attention function falls through to it when no `sink_plan` is given).

Only architectures with exact chunked feeds (`Architecture.exact_chunks`: RoPE models and GPT-2) are batched;
ALiBi/Falcon/MPT use their own attention code, where left-aligned padding would shift their biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from model.loader import LoadedModel
from model.rotary import Rotation
from model.sink_cache import SinkCache, StepPlan


class _BatchLayer(CacheLayerMixin):
    """One decoder layer seen by the batched forward: fans the update out to every stream's own layer."""

    is_sliding = False

    def __init__(self, batch: BatchCache, layer_idx: int):
        super().__init__()
        self.batch = batch
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value states (B, Hkv, 1, D) -> padded buffers (B, Hkv, L_max, D) of every stream."""
        streams = self.batch.caches
        keys, values = [], []
        for b, cache in enumerate(streams):
            k, v = cache.sink_layers()[self.layer_idx].update(key_states[b : b + 1], value_states[b : b + 1])
            keys.append(self.batch.sink_corrected(b, k))
            values.append(v)
        length = self.batch.length
        if all(k.shape[-2] == length for k in keys):
            return torch.cat(keys), torch.cat(values)
        shape = (len(streams), key_states.shape[1], length, key_states.shape[-1])
        k_out = key_states.new_zeros(shape)
        v_out = value_states.new_zeros(shape[:-1] + (value_states.shape[-1],))
        for b, (k, v) in enumerate(zip(keys, values)):
            k_out[b, :, : k.shape[-2]] = k[0]
            v_out[b, :, : v.shape[-2]] = v[0]
        return k_out, v_out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.batch.length, 0

    def get_seq_length(self) -> int:
        return self.batch.length - 1

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """A transient Cache over B planned `SinkCache`s; lives for exactly one batched forward pass."""

    def __init__(self, caches: Sequence[SinkCache], plans: Sequence[StepPlan], rotation: Rotation | None):
        self.caches = list(caches)
        self.plans = list(plans)
        self.rotation = rotation
        # Buffer length of each stream after this step: its sinks, the window it keeps, the new token.
        self.lengths = [p.keep_sinks + p.keep_window + p.length for p in self.plans]
        self.length = max(self.lengths)
        n_layers = len(self.caches[0].layers)
        super().__init__(layers=[_BatchLayer(self, i) for i in range(n_layers)])

    def sink_corrected(self, b: int, keys: torch.Tensor) -> torch.Tensor:
        """Stream b's buffer keys with its sink columns rotated by -delta (a copy; the stream keeps its own)."""
        plan = self.plans[b].attention
        if plan is None or plan.sink_cos is None or not plan.sink_cols:
            return keys
        sinks = Rotation.apply(keys[..., : plan.sink_cols, :], plan.sink_cos, plan.back_sin())
        return torch.cat([sinks, keys[..., plan.sink_cols :, :]], dim=-2)

    def attention_mask(self, device: torch.device) -> torch.Tensor:
        """(B, 1, 1, L_max) bool: True where the stream's query may attend to the buffer column."""
        mask = torch.zeros(len(self.caches), 1, 1, self.length, dtype=torch.bool, device=device)
        for b, (plan, n) in enumerate(zip(self.plans, self.lengths)):
            visible = plan.attention.mask if plan.attention is not None else None
            mask[b, 0, 0, :n] = True if visible is None else visible[-1]
        return mask


def _check(lm: LoadedModel, caches: Sequence[SinkCache], tokens: Sequence[int]) -> None:
    if len(caches) != len(tokens):
        raise ValueError(f"expected one token per cache, got {len(tokens)} tokens for {len(caches)} caches")
    if not caches:
        raise ValueError("expected at least one cache, got none")
    if not lm.arch.exact_chunks:
        raise ValueError(
            f"step_many needs an architecture with exact chunked feeds (RoPE or GPT-2 style), got "
            f"{lm.arch.model_type!r} with {lm.arch.positions} positions and its own attention code"
        )
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("expected distinct caches, got the same SinkCache more than once")
    for b, cache in enumerate(caches):
        if cache.lm is not lm and cache.lm.model is not lm.model:
            raise ValueError(f"cache {b} belongs to another model ({cache.lm.fingerprint}, expected {lm.fingerprint})")


@torch.inference_mode()
def step_many(lm: LoadedModel, caches: Sequence[SinkCache], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Feed `tokens[b]` into `caches[b]` for every b in one forward pass; return float32 logits (B, vocab).

    Equal to `torch.stack([SinkModel(lm).step(c, [t])[0] for c, t in zip(caches, tokens)])` up to float
    rounding. If the forward pass raises, every cache is restored to its state before the call.
    """
    tokens_t = torch.as_tensor(tokens, dtype=torch.long, device=lm.device).view(-1)
    _check(lm, caches, tokens_t.tolist())
    states = [c.state() for c in caches]
    plans: list[StepPlan] = []
    try:
        for cache in caches:
            plans.append(cache.begin(1, lm.device))
        batch = BatchCache(caches, plans, lm.rotation)
        kwargs = {"attention_mask": batch.attention_mask(lm.device)}
        if lm.arch.positions != "alibi":
            kwargs["position_ids"] = torch.stack([p.position_ids for p in plans])  # (B, 1)
        out = lm.model(input_ids=tokens_t[:, None], past_key_values=batch, use_cache=True, **kwargs)
    except BaseException:
        for cache, state in zip(caches, states):
            cache.abort()
            cache.restore(state)
        raise
    for cache in caches:
        cache.end()
    return out.logits[:, -1].float()
