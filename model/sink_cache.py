"""StreamingLLM's KV cache (attention sinks + rolling window) on transformers' public Cache API.

Contract
--------
`sinks` S and `window` W. Every new token attends to the first S tokens of the stream plus the W most recent
tokens, itself included: mit-han-lab's `start_size=S, recent_size=W`, attention_sinks'
`attention_sink_size=S, attention_sink_window_size=W-1`. `window=None` never evicts (the `dense` policy);
`sinks=0` is plain window attention (the `window` policy).

Position contract
-----------------
Positions are indices inside the cache, as in the paper: a token at stream index t attends as if it sat at
position p(t) = min(t, S + W - 1), the sinks at 0..S-1 and the window right behind them. How each position
encoding gets there:

- RoPE. Keys are stored *rotated*. Sink i is rotated at position i, forever. A window token t is rotated at
  `t - base`, where `base` is a per-stream frame offset. Queries are rotated by the model at `t - base` too,
  so query-to-window distances are the true `t - t_k`. When `t - base` would outgrow
  `S + W - 1 + max(W, C)` (and always before it reaches the model's position limit), the frame is moved:
  `base` jumps forward so that the oldest kept window token sits at position S, and the kept window keys are
  re-rotated by the jump, using cos/sin from the model's own rotary module (`model.rotary`). This happens
  about once every W tokens, so keys are re-rotated a bounded number of times in their life and no
  rounding accumulates. For the sinks, the attention function re-rotates each query to `p(t)`.
- ALiBi. The model biases by distance in the key buffer, which is [sinks | window] in stream order: nothing
  to shift. MPT and Falcon use their own attention code, so chunks fall back to evict-for-space.
- Absolute positions (GPT-2). A token is embedded at position `p(t)` when it enters; `S + W` must fit the
  model's table.

Buffer layout (every layer, shape (B, Hkv, T, D)): `[sinks (min(S, seen)) | window (stream order)]`. Updates
never modify a tensor in place, so `state()`/`restore()` (generation with rollback) are reference copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from model.attention import AttentionPlan
from model.rotary import Rotation


@dataclass
class StepPlan:
    """Everything one forward pass over `length` tokens needs, computed from the counters before it runs."""

    start: int  # stream index of the first token of the chunk
    length: int  # tokens in the chunk (C)
    keep_sinks: int  # sink tokens in the buffer before the chunk
    keep_window: int  # window tokens kept from before the chunk (the rest are evicted now)
    new_base: int  # frame offset after this step
    position_ids: torch.Tensor  # (C,) positions handed to the model
    shift_cos: torch.Tensor | None  # (1, rotary_dims) rotation moving kept window keys into the new frame
    shift_sin: torch.Tensor | None
    attention: AttentionPlan | None  # None for architectures without the exact attention path


@dataclass(frozen=True)
class CacheState:
    """Counters plus references to every layer's tensors: enough to roll a cache back exactly."""

    seen: int
    base: int
    tensors: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]


class SinkLayer(CacheLayerMixin):
    """One decoder layer's keys and values, laid out as [sinks | window]."""

    is_sliding = False

    def __init__(self, cache: SinkCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Evict, move the kept window into the new frame, append the chunk; return the whole buffer."""
        plan = self.cache.plan
        if plan is None:
            raise RuntimeError("SinkCache was used outside SinkCache.begin()/end(); call SinkModel.step()")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_s, keep = plan.keep_sinks, plan.keep_window
        keys, values = self.keys, self.values
        assert keys is not None and values is not None  # set by lazy_initialization
        end = keys.shape[-2]
        window_k = keys[..., end - keep :, :]  # (B, Hkv, keep, D)
        window_v = values[..., end - keep :, :]
        if plan.shift_cos is not None and plan.shift_sin is not None and keep:
            window_k = Rotation.apply(window_k, plan.shift_cos, plan.shift_sin)
        self.keys = keys = torch.cat([keys[..., :n_s, :], window_k, key_states], dim=-2)
        self.values = values = torch.cat([values[..., :n_s, :], window_v, value_states], dim=-2)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        plan = self.cache.plan
        if plan is not None:
            return plan.keep_sinks + plan.keep_window
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1 if self.cache.window is None else self.cache.sinks + self.cache.window

    def trimmed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values without what the next step would evict anyway (for snapshots)."""
        keep = self.cache.kept_after()
        n_s = min(self.cache.sinks, self.cache.seen)
        idx = lambda t: torch.cat([t[..., :n_s, :], t[..., t.shape[-2] - keep :, :]], dim=-2)  # noqa: E731
        assert self.keys is not None and self.values is not None, "trimmed() of a layer that holds nothing"
        return idx(self.keys), idx(self.values)


class SinkCache(Cache):
    """A StreamingLLM cache for one stream. See the module docstring for the position contract."""

    def __init__(self, lm, sinks: int = 4, window: int | None = 1020, max_chunk: int = 256):
        if sinks < 0 or (window is not None and window < 1):
            raise ValueError(f"expected sinks >= 0 and window >= 1 (or None), got sinks={sinks}, window={window}")
        lm.arch.check_span(sinks, window)
        self.lm = lm
        self.sinks, self.window = sinks, window
        self.exact = lm.arch.exact_chunks
        self.rope = lm.arch.positions == "rope"
        self.rotation: Rotation | None = lm.rotation if self.rope else None
        limit = lm.arch.max_positions
        span = sinks + (window or 0)
        if window is None:
            self.max_chunk = max_chunk
        elif not self.exact:
            self.max_chunk = max(1, min(max_chunk, window))
        else:
            self.max_chunk = max(1, min(max_chunk, (limit - span + 1) if limit else max_chunk))
        self.position_limit = (limit - 1) if limit else None
        self.seen = 0
        self.base = 0
        self.plan: StepPlan | None = None
        n_layers = lm.model.config.get_text_config().num_hidden_layers
        super().__init__(layers=[SinkLayer(self) for _ in range(n_layers)])

    def sink_layers(self) -> list[SinkLayer]:
        """The layers as what they are (transformers types `Cache.layers` as any kind of layer)."""
        return cast("list[SinkLayer]", self.layers)

    def _rot(self) -> Rotation:
        """The model's RoPE rotation; callers only ask when `self.rope`."""
        assert self.rotation is not None, "rotation asked for by a cache of a model without RoPE"
        return self.rotation

    # ---- counters -------------------------------------------------------------------------------------------
    def buffered(self) -> int:
        """Tokens currently held per layer (before the next step's eviction)."""
        layer = self.sink_layers()[0]
        return 0 if layer.keys is None else layer.keys.shape[-2]

    def kept_after(self, chunk: int = 1) -> int:
        """Window tokens the next step of `chunk` tokens keeps."""
        n_w = self.buffered() - min(self.sinks, self.seen)
        if self.window is None:
            return n_w
        room = self.window - 1 if self.exact else self.window - chunk
        return max(0, min(n_w, room))

    # ---- one forward pass -----------------------------------------------------------------------------------
    def begin(self, length: int, device: torch.device) -> StepPlan:
        """Plan a forward pass over the next `length` tokens; the model must run before `end()`."""
        if self.plan is not None:
            raise RuntimeError("SinkCache.begin() called twice without end()")
        if not 1 <= length <= self.max_chunk:
            raise ValueError(f"chunk length must be in 1..{self.max_chunk}, got {length}")
        S, W, t0 = self.sinks, self.window, self.seen
        n_s = min(S, t0)
        keep = self.kept_after(length)
        base = self.base
        if self.rope and t0 >= S and W is not None:
            last = t0 + length - 1 - base
            natural = S + W - 1 + max(W, length)
            bound = min(natural, self.position_limit) if self.position_limit is not None else natural
            if not self.exact or last > bound:
                base = t0 - keep - S
        t = torch.arange(t0, t0 + length, device=device)
        if self.lm.arch.positions == "absolute" and W is not None:
            positions = t.clamp(max=S + W - 1)
        else:
            positions = torch.where(t < S, t, t - base)
        if self.position_limit is not None and int(positions.max()) > self.position_limit:
            raise ValueError(
                f"position {int(positions.max())} exceeds the model's limit {self.position_limit} "
                f"(policy with window={W} cannot stream past the model's positions)"
            )
        shift_cos = shift_sin = None
        if self.rope and base != self.base and keep:
            shift_cos, shift_sin = self._rot().cos_sin(torch.tensor([self.base - base], device=device))
        attention = self._attention_plan(t0, length, n_s, keep, positions, base, device) if self.exact else None
        self.plan = StepPlan(t0, length, n_s, keep, base, positions, shift_cos, shift_sin, attention)
        return self.plan

    def _attention_plan(self, t0, length, n_s, keep, positions, base, device) -> AttentionPlan:
        S, W = self.sinks, self.window
        if length == 1:  # decode: the trimmed buffer is exactly sinks + window, all visible
            sink_cols = min(S, t0 + 1)
            position = t0 if t0 < S else t0 - base  # what `positions` holds, without a device sync
            delta = min(t0, S + W - 1) - position if (W is not None and self.rope) else 0
            if sink_cols and delta:
                return AttentionPlan(sink_cols, None, *self._rot().cos_sin_at(delta, device))
            return AttentionPlan(sink_cols, None, None, None)
        kidx = torch.cat(
            [torch.arange(n_s, device=device), torch.arange(t0 - keep, t0 + length, device=device)]
        )  # (L,) stream index of every buffer column
        tq = torch.arange(t0, t0 + length, device=device)[:, None]  # (C, 1)
        visible = kidx[None, :] <= tq  # causal, (C, L)
        if W is not None:
            in_band = (kidx[None, :] >= S) & (tq - kidx[None, :] <= W - 1)
            visible &= in_band | (kidx[None, :] < S)
        sink_cols = min(S, t0 + length)
        cos: torch.Tensor | None = None
        sin: torch.Tensor | None = None
        if self.rope and sink_cols and W is not None:
            delta = tq[:, 0].clamp(max=S + W - 1) - positions  # (C,) sink-relative minus frame position
            if bool((delta != 0).any()):
                cos, sin = self._rot().cos_sin(delta)
        mask = None if bool(visible.all()) else visible
        return AttentionPlan(sink_cols, mask, cos, sin)

    def end(self) -> None:
        """Commit the counters of the planned step (call after the model ran)."""
        plan = self.plan
        if plan is None:
            raise RuntimeError("SinkCache.end() without begin()")
        self.seen += plan.length
        self.base = plan.new_base
        self.plan = None

    def abort(self) -> None:
        """Forget a planned step whose forward failed; layers may be half-updated, so restore a state after."""
        self.plan = None

    # ---- rollback -------------------------------------------------------------------------------------------
    def state(self) -> CacheState:
        return CacheState(self.seen, self.base, tuple((layer.keys, layer.values) for layer in self.sink_layers()))

    def restore(self, state: CacheState) -> None:
        self.seen, self.base, self.plan = state.seen, state.base, None
        for layer, (k, v) in zip(self.sink_layers(), state.tensors):
            layer.keys, layer.values = k, v
            layer.is_initialized = k is not None
            if k is not None:
                layer.dtype, layer.device = k.dtype, k.device
