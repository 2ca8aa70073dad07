"""One forward pass that advances many pool slots by different numbers of tokens (a ragged batch).

`PoolStepper.step(slots, ids)` feeds `ids[b]` (1 <= len <= pool.max_chunk) into slot `slots[b]` for every b in
a single forward pass and returns, per stream, the NLL of each fed token and the logits row that predicts the
next one. Exact StreamingLLM attention per stream (see `model.pool` for the position contract):

- All tokens are packed as one sequence (1, N), streams in slot order, with per-token `position_ids` from each
  stream's own plan, so the linear layers see no padding at all.
- Frame moves (see `model.pool`) are done before the forward, one slot at a time: the kept window of every
  layer is re-rotated out of place, then written back, and the slot's `base` moves. A move is an exact
  re-expression of the same keys in a new frame, so it is committed whether or not the forward succeeds.
- A transient `PoolCache` goes in as `past_key_values`; each layer's `update()` scatters the chunk's
  keys/values into their slots' columns in place and returns the whole pool layer.
- The `sinkstream` attention function receives `pool_plan` (registered through `AttentionInterface`, no
  patching) and attends each stream's queries over its own slot's [sinks | ring] columns with an exact mask:
  causal, a band of W ending at each query, sinks with the query re-rotated to min(t, S + W - 1). The math is
  `model.attention._chunk` / `_decode`'s, on views of the pool (no gather copies):
  * "loop": one SDPA call per stream (CPU default for chunks);
  * "batched": one SDPA call over a contiguous range of slots with queries padded to the longest chunk
    (default for decode steps and on CUDA; non-contiguous slots are gathered). Its additive mask is built once
    per forward; for chunks with sinks it is (P, H, n_max, L), only its sink columns rewritten per layer;
  * "flex": FlexAttention with a block mask built once per forward and the sink scores substituted through
    `score_mod`, so no dense per-head mask exists (compiled on CUDA). Opt-in: on CPU it runs eagerly (a slow
    reference, used by the tests to check its semantics); it has not yet run on a GPU.
- Logits are computed from the last hidden states in slices of `slice_rows` (a slice that would leave fewer
  than `min_rows` rows after it takes them too), so memory stays bounded for any N. A slice is scored (float32
  log-softmax, the target's log-probability) in pieces of `score_rows` = 32 rows: the same bits as one piece
  per slice (log-softmax is computed row by row), but a 6 MB float32 piece stays in cache and reuses freed
  memory, where a 1,024 x 49,152 float32 slice is 200 MB of fresh pages twice (the upcast, then the
  log-softmax): 292 -> 75 ms per 1,024 rows of SmolLM2 logits on one thread (2026-12-06).

Failures keep no undo log. A step that raises leaves every slot's stream where it was: `seen` moves only
after a step's results exist, and the columns it wrote are, by the ring's size (R = W + max_chunk - 1), the
columns of tokens older than the kept window (or sink columns not reached yet), which no query sees and no
snapshot holds; a retry writes them again. A retry of the same chunks gives bit-identical results to a
forward that never failed (tested). The only transient memory the failure model needs is one slot's re-rotated
kept window during a frame move: (W - 1) * layers * Hkv * D * itemsize bytes (SmolLM2-135M bf16, W = 1020:
11.7 MB), whatever the batch size, computed in full before anything is written, so an out-of-memory error
inside a move leaves that slot untouched too.

A stream's results do not depend on which other streams share its batch (fp32 CPU: max |dNLL| <= 1e-5,
`tests/model/test_pool.py`). Falcon and MPT compute attention in their own code: the pool refuses them and
they keep the one-stream `SinkCache` path (`model.stepper.SinkModel`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from model.attention import AttentionPlan, _chunk, _sdpa, sink_scores
from model.pool import KVPool
from model.rotary import Rotation

Mode = Literal["auto", "loop", "batched", "flex"]
SCORE_ROWS = 32  # rows of a logits slice scored (upcast, log-softmax) at once; see the module docstring


@dataclass
class StreamResult:
    """Per-stream output of a batched step."""

    nll: torch.Tensor  # (n,) float32 CPU, nats; nll[0] is NaN without prev_logits
    last_logits: torch.Tensor  # (vocab,) float32 on the model device: predicts the stream's next token
    logits: torch.Tensor | None = None  # (n, vocab) float32, only with `full_logits=True`


@dataclass
class _Stream:
    slot: int
    offset: int  # first packed token
    length: int
    attention: AttentionPlan


@dataclass
class PoolPlan:
    """Everything one packed forward needs, computed from the slots' counters before it runs."""

    pool: KVPool
    streams: list[_Stream]
    mode: str
    write_slot: torch.Tensor  # (N,) slot of each packed token
    write_col: torch.Tensor  # (N,) column of each packed token
    row_j: torch.Tensor  # (N,) index of each token inside its stream's chunk
    visible: torch.Tensor  # (N, S + R) bool: token may attend to its slot's column
    sink_cos: torch.Tensor | None  # (N, rotary_dims) query re-rotation for the sink part, None if not needed
    sink_sin: torch.Tensor | None
    shifts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]  # (slot, cols, cos, sin) frame moves
    new_bases: list[int]  # frame offset of each stream after the step
    has_next: torch.Tensor  # (N,) bool: the next packed token belongs to the same stream
    _memo: dict = field(default_factory=dict, repr=False)

    # ---- frame moves ----------------------------------------------------------------------------------------
    def move_frames(self) -> None:
        """Re-rotate the kept window of every slot whose frame moves and move its `base` (before the forward).

        One slot at a time, all layers computed out of place before any is written: an error while computing
        (out of memory) leaves that slot as it was; slots moved before it stay moved (an exact re-expression).
        """
        pool = self.pool
        bases = {s.slot: base for s, base in zip(self.streams, self.new_bases)}
        for slot, cols, cos, sin in self.shifts:
            rotated = [Rotation.apply(keys[slot].index_select(1, cols), cos, sin) for keys in pool.keys]
            for keys, new in zip(pool.keys, rotated):
                keys[slot].index_copy_(1, cols, new)
            pool.base[slot] = bases[slot]
        self.shifts = []

    # ---- attention ------------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (1, H, N, D), key/value a pool layer (slots, Hkv, S + R, D) -> (1, N, H, D)."""
        gqa = query.shape[1] != key.shape[1]
        if self.mode == "loop":
            return self._attend_loop(query, key, value, scaling, gqa)
        if self.mode == "flex":
            return self._attend_flex(query, key, value, scaling, gqa)
        return self._attend_batched(query, key, value, scaling, gqa)

    def _attend_loop(self, query, key, value, scaling, gqa):
        _, heads, total, dim = query.shape
        out = query.new_empty(1, total, heads, dim)  # (1, N, H, D)
        for s in self.streams:
            q = query[:, :, s.offset : s.offset + s.length]  # (1, H, n, D)
            k = key[s.slot : s.slot + 1]  # (1, Hkv, S + R, D), a view of the pool
            v = value[s.slot : s.slot + 1]
            out[:, s.offset : s.offset + s.length] = _chunk(q, k, v, scaling, s.attention, gqa)
        return out

    def _rows(self, key: torch.Tensor):
        """How the batched path addresses slots: a contiguous view [lo, hi] (gaps allowed up to 2x) or a gather."""
        memo = self._memo.get("rows")
        if memo is None:
            slots = [s.slot for s in self.streams]
            lo, hi = slots[0], slots[-1]
            if hi - lo + 1 <= 2 * len(slots):
                row_of = torch.tensor([s - lo for s in slots], device=key.device)
                memo = ("view", lo, hi + 1, row_of, hi - lo + 1)
            else:
                memo = ("gather", torch.tensor(slots, device=key.device), None,
                        torch.arange(len(slots), device=key.device), len(slots))
            self._memo["rows"] = memo
        return memo

    def _attend_batched(self, query, key, value, scaling, gqa):
        heads = query.shape[1]
        q, k, v, tok_row, rows, n_max = self._padded_rows(query, key, value)
        mask = self._batched_mask(tok_row, rows, n_max)  # (P, 1, n_max, L) bool
        S = self.pool.sinks
        if self.sink_cos is None or not S:
            out = _sdpa(q, k, v, scaling, gqa, self._base(mask, query.dtype))
        elif n_max == 1:  # decode: rotate each row's sink keys back by its delta instead of the query forward
            cos, sin = self._padded_cos_sin(tok_row, rows, n_max)  # (P, 1, 1, rot)
            sink_keys = Rotation.apply(k[:, :, :S], cos, -sin)  # (P, Hkv, S, D)
            out = _sdpa(q, k, v, scaling, gqa, self._base(mask, query.dtype), sink_keys=sink_keys)
        else:
            cos, sin = self._padded_cos_sin(tok_row, rows, n_max)  # (P, 1, n_max, rot)
            scores = sink_scores(q, cos, sin, k[:, :, :S], scaling)  # (P, H, n_max, S) float32
            base, bias = self._bias(mask, heads, query.dtype)  # (P, 1, n_max, L), (P, H, n_max, L)
            bias[..., :S] = scores + base[..., :S]
            out = _sdpa(q, k, v, scaling, gqa, bias, sink_keys=torch.zeros_like(k[:, :, :S]))
        return out[tok_row, self.row_j][None]  # (P, n_max, H, D) -> (1, N, H, D)

    def _attend_flex(self, query, key, value, scaling, gqa):
        """FlexAttention over the slot rows: a block mask built once per forward from the visibility table, and
        the sink scores (re-rotated queries) substituted through `score_mod`; no dense (P, H, n, L) bias.
        Compiled on CUDA; eager (a slow reference) elsewhere, which is how the CPU tests check it."""
        from torch.nn.attention.flex_attention import create_block_mask

        q, k, v, tok_row, rows, n_max = self._padded_rows(query, key, value)
        q = q.contiguous()
        visible = self._batched_mask(tok_row, rows, n_max)[:, 0]  # (P, n_max, L) bool
        block = self._memo.get("block_mask")
        if block is None:
            block = self._memo["block_mask"] = create_block_mask(
                lambda b_, h_, q_, kv_: visible[b_, q_, kv_], rows, None, n_max, visible.shape[-1], device=q.device)
        S = self.pool.sinks
        score_mod = None
        if self.sink_cos is not None and S:
            cos, sin = self._padded_cos_sin(tok_row, rows, n_max)  # (P, 1, n_max, rot)
            sink = sink_scores(q, cos, sin, k[:, :, :S], scaling)  # (P, H, n_max, S) float32

            def score_mod(score, b_, h_, q_, kv_):
                return torch.where(kv_ < S, sink[b_, h_, q_, kv_.clamp(max=S - 1)].to(score.dtype), score)

        out = _flex_attention(q.device)(q, k, v, score_mod=score_mod, block_mask=block, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2)[tok_row, self.row_j][None]  # (P, n_max, H, D) -> (1, N, H, D)

    def _padded_rows(self, query, key, value):
        """The batched paths' inputs: the packed queries (1, H, N, D) as one row per stream padded to the longest
        chunk, (P, H, n_max, D), and the streams' slot rows of the pool layer, (P, Hkv, S + R, D) (views of a
        contiguous slot range, else gathered copies). Returns (q, k, v, tok_row (N,), P, n_max)."""
        _, heads, _, dim = query.shape
        kind, a, b, row_of, rows = self._rows(key)
        if kind == "view":
            k, v = key[a:b], value[a:b]  # (P, Hkv, S + R, D) views
        else:
            k, v = key.index_select(0, a), value.index_select(0, a)  # gathered copies
        n_max = max(s.length for s in self.streams)
        tok_row = self._memo.get("tok_row")
        if tok_row is None:
            tok_row = self._memo["tok_row"] = row_of.repeat_interleave(
                torch.tensor([s.length for s in self.streams], device=row_of.device))
        q = query.new_zeros(rows, n_max, heads, dim)
        q[tok_row, self.row_j] = query[0].transpose(0, 1)  # (N, H, D) into (P, n_max, H, D)
        return q.transpose(1, 2), k, v, tok_row, rows, n_max  # q: (P, H, n_max, D)

    def _batched_mask(self, tok_row, rows, n_max):
        mask = self._memo.get("mask")
        if mask is None:
            mask = torch.zeros(rows, n_max, self.visible.shape[1], dtype=torch.bool, device=self.visible.device)
            mask[..., 0] = True  # padding rows attend somewhere finite; their output is dropped
            mask[tok_row, self.row_j] = self.visible
            mask = self._memo["mask"] = mask[:, None]  # (P, 1, n_max, L)
        return mask

    def _padded_cos_sin(self, tok_row, rows, n_max):
        memo = self._memo.get("cos_sin")
        if memo is None:
            rot = self.sink_cos.shape[-1]
            cos = self.sink_cos.new_ones(rows, n_max, rot)
            sin = self.sink_sin.new_zeros(rows, n_max, rot)
            cos[tok_row, self.row_j] = self.sink_cos
            sin[tok_row, self.row_j] = self.sink_sin
            memo = self._memo["cos_sin"] = (cos[:, None], sin[:, None])  # (P, 1, n_max, rot)
        return memo

    def _base(self, mask, dtype):
        """(P, 1, n_max, L) additive mask, 0 where visible and -inf where hidden; built once per forward."""
        key = ("base", dtype)
        if key not in self._memo:
            self._memo[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        return self._memo[key]

    def _bias(self, mask, heads, dtype):
        """The additive mask and a (P, H, n_max, L) copy whose sink columns each layer overwrites."""
        key = ("bias", dtype)
        if key not in self._memo:
            base = self._base(mask, dtype)
            rows, _, n_max, length = mask.shape
            self._memo[key] = (base, base.expand(rows, heads, n_max, length).clone())
        return self._memo[key]


_FLEX: dict[str, Callable] = {}


def _flex_attention(device: torch.device) -> Callable:
    """flex_attention, compiled (dynamic shapes) on CUDA; eager elsewhere."""
    fn = _FLEX.get(device.type)
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=True) if device.type == "cuda" else flex_attention
        _FLEX[device.type] = fn
    return fn


class _PoolLayer(CacheLayerMixin):
    """One decoder layer seen by the packed forward: writes the chunk into the pool, returns the pool layer."""

    is_sliding = False

    def __init__(self, cache: PoolCache, index: int):
        super().__init__()
        self.cache = cache
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value states (1, Hkv, N, D) -> the pool's (slots, Hkv, S + R, D) keys and values."""
        plan, i = self.cache.plan, self.index
        pool = plan.pool
        keys, values = pool.keys[i], pool.values[i]
        if key_states.shape[1] != pool.kv_heads or key_states.shape[-1] != pool.head_dim:
            raise ValueError(
                f"pool layer {i} holds (Hkv={pool.kv_heads}, D={pool.head_dim}), the model produced "
                f"(Hkv={key_states.shape[1]}, D={key_states.shape[-1]})"
            )
        ws, wc = plan.write_slot, plan.write_col  # columns no query of the stream sees before this forward
        keys[ws, :, wc] = key_states[0].transpose(0, 1).to(keys.dtype)  # (N, Hkv, D)
        values[ws, :, wc] = value_states[0].transpose(0, 1).to(values.dtype)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class PoolCache(Cache):
    """A transient Cache over a `KVPool`; lives for exactly one packed forward pass."""

    def __init__(self, plan: PoolPlan):
        self.plan = plan
        super().__init__(layers=[_PoolLayer(self, i) for i in range(plan.pool.n_layers)])


class PoolStepper:
    """Runs a LoadedModel over a `KVPool`: batched ragged steps, scoring and generation with rollback."""

    def __init__(self, pool: KVPool, mode: Mode = "auto", slice_rows: int = 256, min_rows: int = 1,
                 score_rows: int = SCORE_ROWS):
        if slice_rows < 1 or min_rows < 1 or score_rows < 1:
            raise ValueError(f"expected slice_rows, min_rows and score_rows >= 1, got {slice_rows}, {min_rows} and "
                             f"{score_rows}")
        self.pool = pool
        self.lm = pool.lm
        self.base_model = self.lm.model.base_model
        self.lm_head = self.lm.model.get_output_embeddings()
        self.mode = mode
        self.slice_rows = slice_rows
        # No logits slice is cut shorter than this unless the whole forward is (see `pipeline.service.backend`:
        # a matrix product's rows are bit-identical whatever its row count only from some row count on).
        self.min_rows = min_rows
        self.score_rows = score_rows  # rows per float32 log-softmax while scoring a logits slice

    # ---- planning -------------------------------------------------------------------------------------------
    def plan(self, slots: Sequence[int], lengths: Sequence[int]) -> tuple[PoolPlan, torch.Tensor]:
        """Plan one packed forward (streams already in ascending slot order); returns (plan, position_ids (N,))."""
        pool = self.pool
        S, W, R = pool.sinks, pool.window, pool.ring
        dev = pool.device
        t0s, bases, shifts = [], [], []
        for slot, n in zip(slots, lengths):
            t0, base = pool.seen[slot], pool.base[slot]
            keep = min(max(0, t0 - S), W - 1)
            new_base = pool.frame_base(t0, base, n)  # SinkCache.begin's frame-move rule, unchanged
            if pool.rope and new_base != base and keep:
                assert pool.rotation is not None  # pool.rope
                cos, sin = pool.rotation.cos_sin(torch.tensor([base - new_base], device=dev))
                cols = pool.column(torch.arange(t0 - keep, t0, device=dev))
                shifts.append((slot, cols, cos, sin))
            t0s.append(t0)
            bases.append(new_base)
        B = len(slots)
        n_t = torch.tensor(lengths)
        offsets = torch.cumsum(n_t, 0) - n_t  # (B,)
        sid = torch.repeat_interleave(torch.arange(B), n_t)  # (N,) stream of each packed token
        j = torch.arange(int(n_t.sum())) - offsets[sid]  # (N,) index inside the chunk
        tq = torch.tensor(t0s)[sid] + j  # (N,) stream index of each token
        if pool.rope:
            positions = torch.where(tq < S, tq, tq - torch.tensor(bases)[sid])
        else:  # absolute positions (GPT-2)
            positions = tq.clamp(max=S + W - 1)
        if pool.position_limit is not None and int(positions.max()) > pool.position_limit:
            raise ValueError(
                f"position {int(positions.max())} exceeds the model's limit {pool.position_limit} "
                f"(window={W} cannot stream past the model's positions)"
            )
        delta = None
        if pool.rope and S:
            delta = tq.clamp(max=S + W - 1) - positions  # (N,) sink-relative minus frame position
            has_delta = torch.zeros(B, dtype=torch.long).index_add_(0, sid, (delta != 0).long()).tolist()
        # Visibility of every slot column for every token, built on the device.
        t_end = (torch.tensor(t0s) + n_t - 1).to(dev)  # (B,) last stream index of each chunk
        cols = torch.arange(pool.columns, device=dev)  # (L,)
        ring_t = t_end[:, None] - (t_end[:, None] - cols[None, :]).remainder(R)  # (B, L) newest t in column
        kidx = torch.where(cols[None, :] < S, cols[None, :], ring_t)  # (B, L) stream index held by column
        sid_d, tq_d = sid.to(dev), tq.to(dev)
        k_tok = kidx[sid_d]  # (N, L)
        in_band = (k_tok >= S) & (tq_d[:, None] - k_tok <= W - 1)
        visible = (k_tok <= tq_d[:, None]) & ((cols[None, :] < S) | in_band)  # (N, L)
        sink_cos: torch.Tensor | None = None
        sink_sin: torch.Tensor | None = None
        if delta is not None and any(has_delta):
            assert pool.rotation is not None  # a delta exists for RoPE models only
            sink_cos, sink_sin = pool.rotation.cos_sin(delta.to(dev))
        streams = []
        for b, (slot, n) in enumerate(zip(slots, lengths)):
            off = int(offsets[b])
            cos_b = sin_b = None
            if sink_cos is not None and sink_sin is not None and has_delta[b]:
                cos_b, sin_b = sink_cos[off : off + n], sink_sin[off : off + n]
            streams.append(_Stream(slot, off, n, AttentionPlan(
                min(S, t0s[b] + n), visible[off : off + n], cos_b, sin_b)))
        mode = self.mode
        if mode == "auto":  # CPU: batch decode steps over a (nearly) contiguous slot range, loop otherwise
            dense = slots[-1] - slots[0] + 1 <= 2 * len(slots)
            mode = "batched" if (dev.type == "cuda" or (max(lengths) == 1 and dense)) else "loop"
        slots_t = torch.tensor(list(slots))
        has_next = (j < n_t[sid] - 1).to(dev)
        plan = PoolPlan(pool, streams, mode, slots_t[sid].to(dev), pool.column(tq).to(dev), j.to(dev), visible,
                        sink_cos, sink_sin, shifts, bases, has_next)
        return plan, positions.to(dev)

    # ---- one forward pass -----------------------------------------------------------------------------------
    def _check(self, slots, ids) -> None:
        if len(slots) != len(ids):
            raise ValueError(f"expected one id list per slot, got {len(ids)} lists for {len(slots)} slots")
        if not slots:
            raise ValueError("expected at least one stream, got none")
        if len(set(slots)) != len(slots):
            raise ValueError(f"expected distinct slots in one batch, got {list(slots)}")
        for slot, chunk in zip(slots, ids):
            self.pool._check(slot)
            if not 1 <= len(chunk) <= self.pool.max_chunk:
                raise ValueError(f"slot {slot}: chunk length must be in 1..{self.pool.max_chunk}, got {len(chunk)}")

    @torch.inference_mode()
    def _forward(self, slots: Sequence[int], ids: Sequence[Sequence[int]]):
        """Run the packed forward; returns (order, plan, packed ids (N,), hidden (N, hidden)). Commits nothing:
        `step` moves the slots' `seen` once their results exist."""
        slots = [int(s) for s in slots]
        ids = [[int(t) for t in chunk] for chunk in ids]
        self._check(slots, ids)
        order = sorted(range(len(slots)), key=lambda b: slots[b])
        s_sorted = [slots[b] for b in order]
        packed = torch.tensor([t for b in order for t in ids[b]], dtype=torch.long, device=self.pool.device)
        plan, positions = self.plan(s_sorted, [len(ids[b]) for b in order])
        plan.move_frames()
        # Nothing to undo if this raises: `seen` moves only in `step` (see the module docstring, "Failures").
        out = self.base_model(input_ids=packed[None], position_ids=positions[None],
                              past_key_values=PoolCache(plan), use_cache=True, pool_plan=plan)
        return order, plan, packed, out.last_hidden_state[0]

    @torch.inference_mode()
    def step(
        self,
        slots: Sequence[int],
        ids: Sequence[Sequence[int]],
        prev_logits: Sequence[torch.Tensor | None] | None = None,
        full_logits: bool = False,
    ) -> list[StreamResult]:
        """Feed `ids[b]` into slot `slots[b]` for every b in one forward pass; results in the callers' order.

        `nll[j] = -log p(ids[b][j] | stream so far)`; `prev_logits[b]` (vocab,) predicts `ids[b][0]` (else NaN).
        `full_logits=True` also returns every row's logits (n_b, vocab) (tests, generation); otherwise only
        slices of `slice_rows` rows exist at once. If the forward raises, every stream is left where it was
        (see the module docstring, "Failures").
        """
        order, plan, packed, hidden = self._forward(slots, ids)
        total = packed.numel()
        offsets = [s.offset for s in plan.streams]
        last_rows = torch.tensor([o + s.length - 1 for o, s in zip(offsets, plan.streams)], device=packed.device)
        has_next = plan.has_next
        target = torch.roll(packed, -1)  # (N,) the next token of the same stream where has_next
        nll = torch.full((total,), float("nan"), device=packed.device)
        last = torch.empty(len(offsets), self.lm_head.out_features, device=packed.device)  # (B, vocab)
        rows_all: list[torch.Tensor] | None = [] if full_logits else None
        a = 0
        while a < total:
            b = min(total, a + self.slice_rows)
            if total - b < self.min_rows:  # no short tail slice
                b = total
            logits = self.lm_head(hidden[a:b])  # (rows, vocab), the model's dtype
            picked = torch.empty(b - a, device=packed.device)  # (rows,)
            for c in range(0, b - a, self.score_rows):  # small float32 pieces stay in cache (module docstring)
                part = torch.log_softmax(logits[c : c + self.score_rows].float(), dim=-1)  # (<= score_rows, vocab)
                picked[c : c + self.score_rows] = -part.gather(1, target[a + c : a + c + part.shape[0], None])[:, 0]
            keep = has_next[a:b]
            idx = torch.arange(a, b, device=packed.device)[keep] + 1
            nll[idx] = picked[keep]
            in_slice = (last_rows >= a) & (last_rows < b)
            if bool(in_slice.any()):
                last[in_slice] = logits[last_rows[in_slice] - a].float()
            if rows_all is not None:
                rows_all.append(logits.float())
            a = b
        logits_all = torch.cat(rows_all) if rows_all is not None else None
        carried = [(k, p) for k, b in enumerate(order) if prev_logits is not None and (p := prev_logits[b]) is not None]
        if carried:  # first tokens, scored by the logits each stream carried over (one batched op)
            prev = torch.stack([p.float().to(nll.device) for _, p in carried])  # (k, vocab)
            firsts = torch.tensor([offsets[k] for k, _ in carried], device=nll.device)
            nll[firsts] = -torch.log_softmax(prev, -1).gather(1, packed[firsts][:, None])[:, 0]
        nll_cpu = nll.cpu()
        for s in plan.streams:  # the results exist: the slots' streams move past the chunk
            self.pool.seen[s.slot] += s.length
        results: list[StreamResult | None] = [None] * len(order)
        for k, b in enumerate(order):
            off, n = offsets[k], plan.streams[k].length
            stream_nll = nll_cpu[off : off + n].clone()
            results[b] = StreamResult(stream_nll, last[k].clone(),
                                      logits_all[off : off + n] if logits_all is not None else None)
        return cast("list[StreamResult]", results)  # `order` is a permutation: every entry was set

    def feed(self, slot: int, ids: Sequence[int], prev_logits: torch.Tensor | None = None) -> StreamResult:
        """Feed any number of tokens into one slot, in forward passes of at most `max_chunk` (committed per pass)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("expected at least one token to feed, got none")
        nlls, prev = [], prev_logits
        for a in range(0, len(ids), self.pool.max_chunk):
            (res,) = self.step([slot], [ids[a : a + self.pool.max_chunk]], [prev])
            nlls.append(res.nll)
            prev = res.last_logits
        assert prev is not None  # ids is not empty: at least one pass ran
        return StreamResult(torch.cat(nlls), prev)

    @torch.inference_mode()
    def generate(
        self,
        slot: int,
        prompt: Sequence[int],
        max_new_tokens: int,
        stop: Callable[[int], bool] | None = None,
        last_logits: torch.Tensor | None = None,
    ) -> list[int]:
        """Greedy continuation of the slot's stream + prompt in a scratch slot; the slot itself is never written.

        Needs one free slot. With an empty prompt, `last_logits` (the stream's prediction of its next token)
        seeds the first generated token.
        """
        scratch = self.pool.fork(slot)
        generated: list[int] = []
        try:
            logits = last_logits
            if prompt:
                logits = self.feed(scratch, prompt).last_logits
            if logits is None:
                raise ValueError("expected a non-empty prompt or the stream's last_logits, got neither")
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                generated.append(token)
                if stop is not None and stop(token):
                    break
                logits = self.step([scratch], [[token]])[0].last_logits
        finally:
            self.pool.free(scratch)
        return generated
