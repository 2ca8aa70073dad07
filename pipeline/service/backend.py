"""Where a stream's KV state lives and how groups of streams are stepped: the two cache backends.

- `PoolBackend` (default where the architecture allows it): every resident stream owns one slot of a shared,
  preallocated `model.pool.KVPool`; a group's streams advance together in packed ragged forward passes
  (`model.pool_step.PoolStepper`), up to `service.batch_tokens` tokens per pass.
- `SinkBackend`: one `model.sink_cache.SinkCache` per stream, stepped one stream at a time. For Falcon and
  MPT (their attention code rules out the pooled step) and for `service.kv_pool: false`.

Both keep the position contract of `model.sink_cache` and use the same snapshot format, so a stream moves
between them through a snapshot.

Batch invariance. A stream's results must not depend on which other streams share its forward pass. The pooled
step computes attention per stream; what can differ is the matrix multiplications of the linear layers, whose
rounding can depend on how many rows a call has. Measured on one torch thread (torch 2.13 CPU, the five SmolLM2
matrix shapes, random row windows): every row is bit-identical whatever the call's row count as long as the call
has at least 4 rows on an AMD EPYC and at least 16 rows on an Intel Xeon with AVX-512 (there every call of 1-15
rows differed). So every packed forward is padded to at least `MIN_ROWS` = 16 tokens (a reserved pad slot takes
the extra tokens and is reset after), no logits slice is shorter than that, and attention runs in the per-stream
"loop" mode on CPU: on one thread the service's output is then bit-identical to feeding each stream alone, and
the crash/restart tests compare bytes (with `cache.chunk` below 16 the single pad chunk cannot fill a forward up
to 16 rows, so that guarantee needs `cache.chunk` >= 16 on such CPUs; the default is 64).
In bfloat16 on a CPU no padding is enough (AMX kernels round some rows of 33+-row calls differently): there the
model's linear layers compute in calls of at most 32 rows (`model.row_stable`, installed at load), and the
padding is kept only because it is harmless.
`tests/service/test_backend_invariance.py` checks the row property on the machine that runs the suite, so a CPU
that needs more rows fails there first, by name. With more threads the BLAS splits rows across threads by row
count and results differ by float rounding (about 1e-5 in NLL; equivalence for that case: ids, keys, lines,
token counts and flags identical, numbers within 1e-4; `tests/helpers/service.py::assert_equivalent`, checked on
two threads in `tests/service/test_faults.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from model.loader import LoadedModel
from model.pool import KVPool, SlotTensors, check_poolable, serialize_slot
from model.pool_step import PoolStepper
from model.sink_cache import CacheState, SinkCache
from model.snapshot import dump_cache, load_cache
from model.stepper import SinkModel
from pipeline.service.sink_token import prime_sink_token

MIN_ROWS = 16  # see the module docstring
LOGIT_SLICE_ROWS = 1024  # rows of logits (x vocab floats) alive at once


class CacheFull(RuntimeError):
    """No free KV slot for another resident stream (the partition waits until one is spilled)."""


class Capture(Protocol):
    """A stream's KV state frozen on the model thread; `serialize` may run on another thread."""

    def serialize(self, extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes: ...


@dataclass
class _SinkCapture:
    state: CacheState
    cache: SinkCache

    def serialize(self, extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
        # Sound because SinkCache updates never write a tensor in place: the captured references keep the
        # tensors of that instant alive; they go into a fresh cache of the same shape for dumping.
        frozen = SinkCache(self.cache.lm, sinks=self.cache.sinks, window=self.cache.window,
                           max_chunk=self.cache.max_chunk)
        frozen.restore(self.state)
        return dump_cache(frozen, extra=extra, tensors=tensors)


@dataclass
class _SlotCapture:
    lm: LoadedModel
    tensors: SlotTensors  # CPU copies taken on the model thread

    def serialize(self, extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
        return serialize_slot(self.lm, self.tensors, extra, tensors)


class SinkBackend:
    """One `SinkCache` per stream; handles are the caches themselves."""

    pooled = False

    def __init__(self, lm: LoadedModel, sinks: int, window: int, chunk: int):
        self.lm, self.runner = lm, SinkModel(lm)
        self.sinks, self.window, self.chunk = sinks, window, chunk

    def new(self) -> SinkCache:
        return self.runner.new_cache(self.sinks, self.window, max_chunk=self.chunk)

    def seen(self, handle: SinkCache) -> int:
        return handle.seen

    def release(self, handle: SinkCache) -> None:
        pass

    def prime(self, handle: SinkCache, token: int) -> None:
        prime_sink_token(self.runner, handle, token)

    def capture(self, handle: SinkCache) -> Capture:
        return _SinkCapture(handle.state(), handle)

    def restore(self, blob: bytes) -> tuple[SinkCache, dict[str, Any], dict[str, torch.Tensor]]:
        return load_cache(self.lm, blob)

    def generate(self, handle: SinkCache, prompt: list[int], max_new: int, stop: Any, last_logits: Any) -> list[int]:
        return self.runner.generate(handle, prompt, max_new, stop=stop)


class PoolBackend:
    """Slots of one `KVPool`; handles are slot numbers. Capacity: resident streams + a pad and a scratch slot."""

    pooled = True

    def __init__(self, lm: LoadedModel, sinks: int, window: int, chunk: int, resident: int):
        check_poolable(lm)
        self.lm = lm
        self.pool = KVPool(lm, capacity=resident + 2, sinks=sinks, window=window, max_chunk=chunk)
        mode: Literal["loop", "auto"] = "loop" if lm.device.type == "cpu" else "auto"
        self.stepper = PoolStepper(self.pool, mode=mode, slice_rows=LOGIT_SLICE_ROWS, min_rows=MIN_ROWS)
        self.pad_slot = self.pool.allocate()  # takes the extra tokens of a forward shorter than MIN_ROWS
        self.chunk = self.pool.max_chunk  # the pool lowers `chunk` where the model's positions run out

    def new(self) -> int:
        if self.pool.free_slots <= 1:  # one slot stays free for note generation (scratch fork)
            raise CacheFull(f"all {self.pool.capacity - 2} resident KV slots are in use")
        return self.pool.allocate()

    def seen(self, handle: int) -> int:
        return self.pool.seen[handle]

    def release(self, handle: int) -> None:
        self.pool.free(handle)

    def prime(self, handle: int, token: int) -> None:
        if self.pool.seen[handle]:
            raise ValueError(f"the sink token only works as position 0 of a stream; slot {handle} has seen tokens")
        self.step([handle], [[token]], [None])

    def capture(self, handle: int) -> Capture:
        return _SlotCapture(self.lm, self.pool.slot_tensors(handle))

    def restore(self, blob: bytes) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
        if self.pool.free_slots <= 1:
            raise CacheFull(f"all {self.pool.capacity - 2} resident KV slots are in use")
        return self.pool.restore(blob)

    def generate(self, handle: int, prompt: list[int], max_new: int, stop: Any, last_logits: Any) -> list[int]:
        return self.stepper.generate(handle, prompt, max_new, stop=stop, last_logits=last_logits)

    def step(self, slots: list[int], chunks: list[list[int]], prev: list[torch.Tensor | None]):
        """One packed forward, padded to MIN_ROWS tokens with the pad slot (see the module docstring)."""
        total = sum(len(c) for c in chunks)
        padded = total < MIN_ROWS
        if padded:  # one pad chunk, at most the pool's chunk (with `cache.chunk` < MIN_ROWS a forward may stay short)
            self.pool.reset(self.pad_slot)
            pad = [0] * min(MIN_ROWS - total, self.pool.max_chunk)
            slots, chunks, prev = [*slots, self.pad_slot], [*chunks, pad], [*prev, None]
        try:
            results = self.stepper.step(slots, chunks, prev)
        finally:
            self.pool.reset(self.pad_slot)
        return results[: len(results) - (1 if padded else 0)]

    def copy_slot(self, src: int, dst: int) -> None:
        """Make `dst` an exact copy of `src` (a backup of a stream before a multi-pass record)."""
        for keys, values in zip(self.pool.keys, self.pool.values):
            keys[dst].copy_(keys[src])
            values[dst].copy_(values[src])
        self.pool.seen[dst], self.pool.base[dst] = self.pool.seen[src], self.pool.base[src]


def make_backend(lm: LoadedModel, settings: Any) -> SinkBackend | PoolBackend:
    """The pooled backend where the architecture allows it and `service.kv_pool` is on, else one cache each.
    Dialogue mode (`service.mode: dialogue`) always uses one cache each: a reply is generated token by token
    into its conversation's own `SinkCache` (`pipeline.service.dialogue_mode`)."""
    c, s = settings.cache, settings.service
    if s.kv_pool and getattr(s, "mode", "score") != "dialogue":
        try:
            check_poolable(lm)
        except ValueError:
            pass
        else:
            return PoolBackend(lm, c.sinks, c.window, c.chunk, s.max_resident_streams)
    return SinkBackend(lm, c.sinks, c.window, c.chunk)
