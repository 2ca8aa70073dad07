"""A pooled StreamingLLM KV cache: preallocated per-layer storage for many streams, one slot per stream.

Why: one `SinkCache` per stream grows its tensors with `torch.cat` every step and cannot be batched without
copying every stream's buffer. `KVPool` preallocates, per decoder layer, keys and values of shape
(capacity, Hkv, S + R, D) and writes every step's keys in place. A batched step (`model.pool_step`) advances
any subset of slots by different numbers of tokens in one forward pass.

Position contract (identical to `model.sink_cache`, so snapshots move freely between the two)
-----------------------------------------------------------------------------------------------
`sinks` S, `window` W: a token at stream index t attends to the first S tokens of the stream plus the W most
recent tokens, itself included, and attends as if it sat at position p(t) = min(t, S + W - 1).

- Sinks: stream index t < S lives in column t forever; for RoPE its key is rotated at position t.
- Window: stream index t >= S lives in ring column S + (t - S) % R with R = W + max_chunk - 1. A chunk of
  n <= max_chunk tokens starting at t0 needs window keys t0-W+1 .. t0+n-1 (W + n - 1 <= R of them), so a
  ring of R columns never overwrites a key that a query of the same chunk still needs. Columns whose token is
  evicted, not yet written, or in a query's future are hidden by the attention mask.
- RoPE: a window key is stored rotated at `t - base`, where `base` is the slot's frame offset; queries are
  rotated by the model at `t - base` too (position_ids), so query-to-window distances are the true ones.
  When `t - base` would pass `S + W - 1 + max(W, n)` (or the model's position limit) the frame moves:
  `base` jumps so that the oldest kept window token sits at position S, and the kept window keys are
  re-rotated in place by the jump with cos/sin from the model's own rotary module (`lm.rotation`), about once
  every W tokens. For the sink part the attention re-rotates each query to `p(t)` (see `model.attention`).
- Absolute positions (GPT-2): a token enters at position p(t); `S + W` must fit the model's table.
- ALiBi / own attention code (Falcon, MPT): refused; they keep the one-stream `SinkCache` path.

Per slot the pool keeps only `seen` (tokens fed) and `base`; everything else follows from them. The counters
and the frame-move rule are exactly `SinkCache.begin`'s, so a slot and a `SinkCache` fed the same chunks hold
bit-identical keys and values (in a different column order).

Sizing
------
One slot costs `bytes_per_slot(lm, S, W, max_chunk, dtype)` =
`layers * 2 * Hkv * (S + W + max_chunk - 1) * head_dim * itemsize`. SmolLM2-135M (30 layers, 3 KV heads,
head_dim 64) with S=4, W=1020, max_chunk=64 in fp32: 30*2*3*1087*64*4 = 50 MB per slot; in bf16 25 MB. Pick
`capacity` = the number of resident streams (`service.max_resident_streams`) plus one scratch slot per
concurrent note generation, and check `capacity * bytes_per_slot` against the device memory left after the
weights and activations (a forward of N tokens needs about N * vocab * 4 bytes of logits per slice plus the
per-stream attention masks). A smaller `max_chunk` shrinks the ring; log lines are 20-40 tokens.

Snapshots of a slot use the `model.snapshot` format unchanged: the slot is dumped as [sinks | window in
stream order], exactly what a `SinkCache` snapshot holds, so either restores into the other bit-exactly.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, cast

import structlog
import torch

from model.loader import LoadedModel
from model.rotary import Rotation
from model.sink_cache import SinkCache

log = structlog.get_logger(__name__)


def kv_geometry(lm: LoadedModel) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache, from its config."""
    cfg = lm.model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if getattr(cfg, "multi_query", False):
        kv_heads = 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, int(kv_heads), int(head_dim)


def bytes_per_slot(
    lm: LoadedModel, sinks: int, window: int, max_chunk: int, dtype: torch.dtype | None = None
) -> int:
    """Bytes one pool slot occupies: keys and values of every layer for S + W + max_chunk - 1 columns."""
    layers, kv_heads, head_dim = kv_geometry(lm)
    itemsize = torch.empty(0, dtype=dtype or lm.dtype).element_size()
    return layers * 2 * kv_heads * (sinks + window + max_chunk - 1) * head_dim * itemsize


def check_poolable(lm: LoadedModel) -> None:
    """Raise ValueError if the model cannot use the pooled cache (it keeps the one-stream SinkCache path)."""
    if not lm.arch.exact_chunks:
        raise ValueError(
            f"the pooled KV cache needs a model whose attention runs through transformers' AttentionInterface "
            f"(RoPE or GPT-2 style), got {lm.arch.model_type!r} ({lm.arch.positions} positions), which computes "
            f"attention in its own code; use the one-stream SinkCache path (SinkModel) for it"
        )
    cfg = lm.model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise ValueError(f"the pooled step computes logits with the bare lm_head; expected no {name}, got "
                             f"{getattr(cfg, name)!r}")


@dataclass(frozen=True)
class SlotTensors:
    """CPU copies of what a snapshot of one slot needs, in `SinkCache` snapshot layout.

    `layers[i]` = (keys, values), each (1, Hkv, min(S, seen) + kept, D): [sinks | window in stream order], where
    kept = min(max(0, seen - S), W - 1) window tokens (what the next token keeps). Taken on the model thread
    (`KVPool.slot_tensors`); `serialize_slot` turns it into bytes anywhere.
    """

    sinks: int
    window: int
    max_chunk: int
    seen: int
    base: int
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def serialize_slot(
    lm: LoadedModel,
    state: SlotTensors,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """`model.snapshot` bytes of a slot (pure: safe on a background thread; `lm` is only read)."""
    from model.snapshot import dump_cache

    cache = SinkCache(lm, sinks=state.sinks, window=state.window, max_chunk=state.max_chunk)
    cache.seen, cache.base = state.seen, state.base
    for layer, (k, v) in zip(cache.sink_layers(), state.layers):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return dump_cache(cache, extra=extra, tensors=tensors)


class KVPool:
    """Preallocated sink + ring KV storage for `capacity` streams. See the module docstring for the contract.

    The pool holds state only; `model.pool_step.PoolStepper` runs forward passes against it. Not thread-safe:
    use it from the model thread (take `slot_tensors` there, serialise elsewhere).
    """

    def __init__(
        self,
        lm: LoadedModel,
        capacity: int,
        sinks: int = 4,
        window: int = 1020,
        max_chunk: int = 64,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        check_poolable(lm)
        if window is None or window < 1 or sinks < 0:
            raise ValueError(f"the pool needs sinks >= 0 and a bounded window >= 1, got sinks={sinks}, window={window}")
        if capacity < 1:
            raise ValueError(f"expected capacity >= 1 slots, got {capacity}")
        lm.arch.check_span(sinks, window)
        self.lm = lm
        self.capacity = capacity
        self.sinks, self.window = sinks, window
        limit = lm.arch.max_positions
        span = sinks + window
        self.max_chunk = max(1, min(max_chunk, (limit - span + 1) if limit else max_chunk))
        self.position_limit = (limit - 1) if limit else None
        self.rope = lm.arch.positions == "rope"
        self.rotation: Rotation | None = lm.rotation if self.rope else None
        self.ring = window + self.max_chunk - 1
        self.columns = sinks + self.ring
        self.dtype = dtype or lm.dtype
        if self.dtype != lm.dtype:
            raise ValueError(f"the pool stores keys in the model's dtype: expected {lm.dtype}, got {self.dtype}")
        self.device = torch.device(device) if device is not None else lm.device
        self.n_layers, self.kv_heads, self.head_dim = kv_geometry(lm)
        shape = (capacity, self.kv_heads, self.columns, self.head_dim)  # (slots, Hkv, S + R, D)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.seen = [0] * capacity
        self.base = [0] * capacity
        self.in_use = [False] * capacity
        self._free = list(range(capacity))  # min-heap: the lowest free slot first keeps batches contiguous
        log.info("kv_pool", capacity=capacity, sinks=sinks, window=window, max_chunk=self.max_chunk,
                 dtype=str(self.dtype), device=str(self.device),
                 bytes_per_slot=bytes_per_slot(lm, sinks, window, self.max_chunk, self.dtype))

    # ---- slots ----------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take the lowest free slot, reset to an empty stream; raise RuntimeError when the pool is full."""
        if not self._free:
            raise RuntimeError(f"KV pool is full: all {self.capacity} slots are in use; free or spill a stream first")
        slot = heapq.heappop(self._free)
        self.in_use[slot] = True
        self.seen[slot] = self.base[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return a slot to the pool (its tensors are left as they are; masks never show stale columns)."""
        self._check(slot)
        self.in_use[slot] = False
        heapq.heappush(self._free, slot)

    def reset(self, slot: int) -> None:
        """Start the slot's stream afresh (e.g. the `sinkstream-reset` header)."""
        self._check(slot)
        self.seen[slot] = self.base[slot] = 0

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.capacity or not self.in_use[slot]:
            raise ValueError(f"expected an allocated slot in 0..{self.capacity - 1}, got {slot}")

    # ---- stream index -> column ----------------------------------------------------------------------------
    def column(self, t: torch.Tensor) -> torch.Tensor:
        """Column of stream indices t (any shape): t for sinks, S + (t - S) % R for the window ring."""
        S = self.sinks
        return torch.where(t < S, t, S + (t - S).remainder(self.ring))

    def frame_base(self, t0: int, base: int, n: int) -> int:
        """The position base of a forward of `n` tokens from stream index `t0` of a slot whose base is `base`:
        `base`, or a new one when its last position would pass the bound (a frame move: the kept window is then
        re-rotated to the new base). `SinkCache.begin`'s rule, for the pool's rope models."""
        S, W = self.sinks, self.window
        if self.rope and t0 >= S:
            last = t0 + n - 1 - base
            natural = S + W - 1 + max(W, n)
            bound = min(natural, self.position_limit) if self.position_limit is not None else natural
            if last > bound:
                return t0 - min(max(0, t0 - S), W - 1) - S
        return base

    def kept(self, slot: int) -> int:
        """Window tokens the slot's next single-token step keeps (what a snapshot holds)."""
        return min(max(0, self.seen[slot] - self.sinks), self.window - 1)

    def _layout(self, slot: int) -> tuple[int, torch.Tensor]:
        """(sinks held, columns of the kept window in stream order) of a slot."""
        seen, keep = self.seen[slot], self.kept(slot)
        cols = self.column(torch.arange(seen - keep, seen, device=self.device))
        return min(self.sinks, seen), cols

    # ---- snapshots ------------------------------------------------------------------------------------------
    def slot_tensors(self, slot: int) -> SlotTensors:
        """CPU copies of the slot in snapshot layout (call on the model thread; cheap next to serialising)."""
        self._check(slot)
        n_s, cols = self._layout(slot)
        layers = []
        for keys, values in zip(self.keys, self.values):
            k = torch.cat([keys[slot, :, :n_s], keys[slot].index_select(1, cols)], dim=1)  # (Hkv, n_s + keep, D)
            v = torch.cat([values[slot, :, :n_s], values[slot].index_select(1, cols)], dim=1)
            layers.append((k[None].to("cpu", copy=True), v[None].to("cpu", copy=True)))
        return SlotTensors(self.sinks, self.window, self.max_chunk, self.seen[slot], self.base[slot], tuple(layers))

    def snapshot(
        self, slot: int, extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None
    ) -> bytes:
        """`model.snapshot` bytes of a slot (a `SinkCache` snapshot: `load_cache` restores it too)."""
        return serialize_slot(self.lm, self.slot_tensors(slot), extra, tensors)

    def load_tensors(self, slot: int, state: SlotTensors) -> None:
        """Write snapshot-layout tensors into an allocated slot (counters included)."""
        self._check(slot)
        if (state.sinks, state.window) != (self.sinks, self.window):
            raise ValueError(
                f"snapshot was taken with sinks={state.sinks}, window={state.window}; this pool has "
                f"sinks={self.sinks}, window={self.window}"
            )
        n_s = min(self.sinks, state.seen)
        keep = min(max(0, state.seen - self.sinks), self.window - 1)
        if len(state.layers) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers in the snapshot, got {len(state.layers)}")
        want = (1, self.kv_heads, n_s + keep, self.head_dim)
        for k, v in state.layers:
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(
                    f"expected snapshot layer tensors of shape {want}, got {tuple(k.shape)} / {tuple(v.shape)}"
                )
        self.seen[slot], self.base[slot] = state.seen, state.base
        _, cols = self._layout(slot)
        for keys, values, (k, v) in zip(self.keys, self.values, state.layers):
            k, v = k[0].to(self.device, self.dtype), v[0].to(self.device, self.dtype)  # (Hkv, n_s + keep, D)
            keys[slot, :, :n_s] = k[:, :n_s]
            values[slot, :, :n_s] = v[:, :n_s]
            keys[slot].index_copy_(1, cols, k[:, n_s:])
            values[slot].index_copy_(1, cols, v[:, n_s:])

    def restore(self, blob: bytes) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
        """Load `model.snapshot` bytes into a free slot; returns (slot, extra, named tensors).

        Fingerprint, dtype and checksums are verified by `model.snapshot.load_cache` (SnapshotError).
        """
        from model.snapshot import SnapshotError, load_cache

        cache, extra, tensors = load_cache(self.lm, blob)
        if (cache.sinks, cache.window) != (self.sinks, self.window):
            raise SnapshotError(
                f"snapshot was taken with sinks={cache.sinks}, window={cache.window}; this pool has "
                f"sinks={self.sinks}, window={self.window}"
            )
        layers = tuple((layer.keys, layer.values) for layer in cache.sink_layers())
        if any(k is None for k, _ in layers):  # an empty stream
            layers = tuple(
                (torch.zeros(1, self.kv_heads, 0, self.head_dim), torch.zeros(1, self.kv_heads, 0, self.head_dim))
                for _ in range(self.n_layers)
            )
        # window equals self.window (checked above); a None key only in an empty stream, replaced above
        state = SlotTensors(cache.sinks, self.window, cache.max_chunk, cache.seen, cache.base,
                            cast("tuple[tuple[torch.Tensor, torch.Tensor], ...]", layers))
        slot = self.allocate()
        try:
            self.load_tensors(slot, state)
        except BaseException:
            self.free(slot)
            raise
        return slot, extra, tensors

    def fork(self, slot: int) -> int:
        """A new slot holding an exact copy of `slot` (a scratch stream for generation with rollback)."""
        self._check(slot)
        new = self.allocate()
        for keys, values in zip(self.keys, self.values):
            keys[new].copy_(keys[slot])
            values[new].copy_(values[slot])
        self.seen[new], self.base[new] = self.seen[slot], self.base[slot]
        return new
