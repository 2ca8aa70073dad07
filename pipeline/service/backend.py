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
In bfloat16 on a CPU no padding is enough (AMX kernels round some elements of calls of 33 to some hundreds of
rows differently): there the model's linear layers call the kernel only with row counts that give every row the
bits it gets alone, at most 32 rows or a row count calibrated per shape at load (`model.row_stable`), so such a
model needs no padding at all: `PoolBackend` pads only a model whose linear layers are not all row-stable
(`min_rows`; a one-token decode step of a bf16 model is then one row, not 16).
`tests/service/test_backend_invariance.py` checks the row property on the machine that runs the suite, so a CPU
that needs more rows fails there first, by name. With more threads the BLAS splits rows across threads by row
count and results differ by float rounding (about 1e-5 in NLL; equivalence for that case: ids, keys, lines,
token counts and flags identical, numbers within 1e-4; `tests/helpers/service.py::assert_equivalent`, checked on
two threads in `tests/service/test_faults.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

import torch

from model.loader import LoadedModel
from model.pool import KVPool, SlotTensors, check_poolable, serialize_slot
from model.pool_step import PoolStepper
from model.row_stable import head_slice_rows, rows_stable
from model.sink_cache import CacheState, SinkCache
from model.snapshot import dump_cache, load_cache
from model.stepper import SinkModel
from pipeline.service.sink_token import prime_sink_token

MIN_ROWS = 16  # see the module docstring
LOGIT_SLICE_ROWS = 1024  # rows of logits (x vocab floats) alive at once


class CacheFull(RuntimeError):
    """No KV capacity left for another resident stream (the partition spills a cold one first, or waits)."""


Purpose = Literal["stream", "pad", "scratch", "backup"]


class KVSlots:
    """The one owner of KV capacity: how many slots exist, what each is for, and whether one more can be had.

    Named reservations (`quota`):
    - `stream`: one per resident stream (`service.max_resident_streams`); `Residency` asks `room()` before a
      stream becomes resident and spills cold streams while the answer is no.
    - `pad` (pooled only): the slot that takes the extra tokens of a forward shorter than `MIN_ROWS`.
    - `scratch` (pooled only): the fork in which a `note` is generated (the stream's own slot is never written).
    - `backup` (pooled only, `service.backup_slots`): a copy of a stream taken before a record longer than one
      forward, so that a failure half-way rolls the stream back to the record's start. A backup may also borrow
      a `stream` slot that no resident stream holds (only between admissions: every backup is given back
      before the group's records are published). When the answer is no, the stream's record waits for a
      backup to be given back; it never runs without one.

    `take` answers yes (a slot number, or a count for the one-cache backend) or no (None); nothing here
    allocates behind the caller's back. With a pool, the physical slots come from `KVPool.allocate`; the pool's
    capacity is exactly the sum of the quotas.
    """

    def __init__(self, quota: dict[Purpose, int], pool: KVPool | None = None):
        self.quota: dict[Purpose, int] = dict(quota)
        self.used: dict[Purpose, int] = {purpose: 0 for purpose in self.quota}
        self.borrowed = 0  # backups held in stream slots that no resident stream holds
        self.pool = pool
        if pool is not None and pool.capacity != self.capacity:
            raise ValueError(f"expected a pool of {self.capacity} slots (the sum of {self.quota}), got {pool.capacity}")

    @property
    def capacity(self) -> int:
        return sum(self.quota.values())

    def room(self, purpose: Purpose = "stream") -> int:
        """How many more slots of `purpose` can be had now (for `backup`: reserved plus borrowable)."""
        free = self.quota.get(purpose, 0) - self.used.get(purpose, 0)
        if purpose == "stream":
            return free - self.borrowed
        if purpose == "backup":
            return free + self.room("stream")
        return free

    def take(self, purpose: Purpose) -> int | None:
        """A slot for `purpose`, or None when its reservation (and, for a backup, the idle stream slots) is
        used up. Without a pool the answer is a count (the handle is made by the caller)."""
        if self.room(purpose) <= 0:
            return None
        if purpose == "backup" and self.used["backup"] >= self.quota["backup"]:
            self.borrowed += 1
        else:
            self.used[purpose] += 1
        return self.pool.allocate() if self.pool is not None else self.used[purpose]

    def give(self, purpose: Purpose, slot: int | None = None) -> None:
        """Give back a slot taken for `purpose` (the slot number with a pool)."""
        if purpose == "backup" and self.borrowed:
            self.borrowed -= 1
        elif self.used.get(purpose, 0) > 0:
            self.used[purpose] -= 1
        else:
            raise ValueError(f"expected a {purpose} slot in use, got none to give back")
        if self.pool is not None and slot is not None:
            self.pool.free(slot)

    def take_stream(self) -> int:
        """`take("stream")`, raising `CacheFull` when every resident stream slot is in use (the partition spills a
        cold stream first: `Residency.make_room`)."""
        slot = self.take("stream")
        if slot is None:
            raise CacheFull(f"all {self.quota['stream']} resident KV slots are in use")
        return slot

    @contextmanager
    def hold(self, purpose: Purpose) -> Iterator[None]:
        """Count one slot of `purpose` as used while the block runs, for code that takes the physical slot itself
        (`PoolStepper.generate` forks its scratch slot); raises `CacheFull` when the reservation is used up."""
        if self.room(purpose) <= 0:
            raise CacheFull(f"no {purpose} KV slot is free ({self.describe()})")
        self.used[purpose] += 1
        try:
            yield
        finally:
            self.used[purpose] -= 1

    def describe(self) -> str:
        return ", ".join(f"{p} {self.used[p] + (self.borrowed if p == 'backup' else 0)}/{q}"
                         for p, q in self.quota.items())


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


@dataclass
class Backup:
    """A stream's state before a record longer than one forward (`PoolBackend.take_backup`): a copy of its slot
    (`slot`), or the kept-window columns the record will overwrite (`cols`, `saved` per layer), with the counters."""

    seen: int
    base: int
    slot: int | None = None
    cols: torch.Tensor | None = None
    saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class SinkBackend:
    """One `SinkCache` per stream; handles are the caches themselves (counted by `slots`, quota `stream`)."""

    pooled = False

    def __init__(self, lm: LoadedModel, sinks: int, window: int, chunk: int, resident: int):
        self.lm, self.runner = lm, SinkModel(lm)
        self.sinks, self.window, self.chunk = sinks, window, chunk
        self.slots = KVSlots({"stream": resident})

    def new(self) -> SinkCache:
        self.slots.take_stream()
        return self.runner.new_cache(self.sinks, self.window, max_chunk=self.chunk)

    def seen(self, handle: SinkCache) -> int:
        return handle.seen

    def release(self, handle: SinkCache) -> None:
        self.slots.give("stream")

    def prime(self, handle: SinkCache, token: int) -> None:
        prime_sink_token(self.runner, handle, token)

    def capture(self, handle: SinkCache) -> Capture:
        return _SinkCapture(handle.state(), handle)

    def restore(self, blob: bytes) -> tuple[SinkCache, dict[str, Any], dict[str, torch.Tensor]]:
        self.slots.take_stream()
        try:
            return load_cache(self.lm, blob)
        except BaseException:
            self.slots.give("stream")
            raise

    def generate(self, handle: SinkCache, prompt: list[int], max_new: int, stop: Callable[[int], bool],
                 last_logits: torch.Tensor | None) -> list[int]:
        return self.runner.generate(handle, prompt, max_new, stop=stop)


class PoolBackend:
    """Slots of one `KVPool`; handles are slot numbers. Capacity (`slots`): resident streams, backups, a pad and
    a scratch slot."""

    pooled = True

    def __init__(self, lm: LoadedModel, sinks: int, window: int, chunk: int, resident: int, backups: int = 1):
        check_poolable(lm)
        self.lm = lm
        quota: dict[Purpose, int] = {"stream": resident, "backup": backups, "pad": 1, "scratch": 1}
        self.pool = KVPool(lm, capacity=sum(quota.values()), sinks=sinks, window=window, max_chunk=chunk)
        self.slots = KVSlots(quota, self.pool)
        mode: Literal["loop", "auto"] = "loop" if lm.device.type == "cpu" else "auto"
        # Fewest rows a forward may have (module docstring): none to pad for a row-stable (bf16 CPU) model.
        self.min_rows = 1 if rows_stable(lm.model) else MIN_ROWS
        # A row-stable head computes its logits slices in single verified calls (model.row_stable.head_slice_rows).
        slice_rows = head_slice_rows(lm.model.get_output_embeddings(), LOGIT_SLICE_ROWS)
        self.stepper = PoolStepper(self.pool, mode=mode, slice_rows=slice_rows, min_rows=self.min_rows)
        pad = self.slots.take("pad")  # takes the extra tokens of a forward shorter than min_rows
        assert pad is not None
        self.pad_slot = pad
        self.chunk = self.pool.max_chunk  # the pool lowers `chunk` where the model's positions run out

    def new(self) -> int:
        return self.slots.take_stream()

    def seen(self, handle: int) -> int:
        return self.pool.seen[handle]

    def release(self, handle: int) -> None:
        self.slots.give("stream", handle)

    def prime(self, handle: int, token: int) -> None:
        if self.pool.seen[handle]:
            raise ValueError(f"the sink token only works as position 0 of a stream; slot {handle} has seen tokens")
        self.step([handle], [[token]], [None])

    def capture(self, handle: int) -> Capture:
        return _SlotCapture(self.lm, self.pool.slot_tensors(handle))

    def restore(self, blob: bytes) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
        if self.slots.room("stream") <= 0:
            raise CacheFull(f"all {self.slots.quota['stream']} resident KV slots are in use")
        slot, extra, tensors = self.pool.restore(blob)  # the pool takes the slot itself, and frees it on failure
        self.slots.used["stream"] += 1
        return slot, extra, tensors

    def generate(self, handle: int, prompt: list[int], max_new: int, stop: Callable[[int], bool],
                 last_logits: torch.Tensor | None) -> list[int]:
        with self.slots.hold("scratch"):  # the stepper forks the stream into the scratch slot
            return self.stepper.generate(handle, prompt, max_new, stop=stop, last_logits=last_logits)

    def step(self, slots: list[int], chunks: list[list[int]], prev: list[torch.Tensor | None]):
        """One packed forward, padded to `min_rows` tokens with the pad slot (see the module docstring)."""
        total = sum(len(c) for c in chunks)
        padded = total < self.min_rows
        if padded:  # one pad chunk, at most the pool's chunk (with `cache.chunk` < MIN_ROWS a forward may stay short)
            self.pool.reset(self.pad_slot)
            pad = [0] * min(self.min_rows - total, self.pool.max_chunk)
            slots, chunks, prev = [*slots, self.pad_slot], [*chunks, pad], [*prev, None]
        try:
            results = self.stepper.step(slots, chunks, prev)
        finally:
            self.pool.reset(self.pad_slot)
        return results[: len(results) - (1 if padded else 0)]

    def take_backup(self, handle: int, tokens: int) -> Backup | None:
        """What a rollback of stream `handle` to now needs, before a record of `tokens` tokens fed in forwards of
        `chunk`; None when it needs a backup slot and `slots` has none to give (the record waits).

        Usually a few columns, not a slot: a forward writes the ring columns of its tokens, which held tokens no
        later query needs; of the stream's state now, only the kept-window tokens whose columns the record's
        forwards will write are lost, so those columns (all layers) and `seen`/`base` are copied aside. A frame
        move inside the record re-rotates the whole kept window in place (committed even when its forward fails):
        then, and for a record that would overwrite the whole ring, the backup is a copy of the slot."""
        pool = self.pool
        S, W, R = pool.sinks, pool.window, pool.ring
        t0, base = pool.seen[handle], pool.base[handle]
        keep = min(max(0, t0 - S), W - 1)
        whole = tokens >= R
        u = t0
        while u < t0 + tokens and not whole:  # the stepper's frame moves, forward by forward
            n = min(self.chunk, t0 + tokens - u)
            moved = pool.frame_base(u, base, n)
            whole = moved != base and min(max(0, u - S), W - 1) > 0  # a move with a kept window to re-rotate
            base, u = moved, u + n
        if whole:
            slot = self.slots.take("backup")
            if slot is None:
                return None
            self.copy_slot(handle, slot)
            return Backup(t0, pool.base[handle], slot=slot)
        kept = pool.column(torch.arange(t0 - keep, t0, device=pool.device))  # (keep,) columns of the kept window
        written = pool.column(torch.arange(t0, t0 + tokens, device=pool.device))
        cols = kept[torch.isin(kept, written)]  # kept tokens the record overwrites
        saved = [(keys[handle].index_select(1, cols), values[handle].index_select(1, cols))  # (Hkv, cols, D)
                 for keys, values in zip(pool.keys, pool.values)]
        return Backup(t0, pool.base[handle], cols=cols, saved=saved)

    def roll_back(self, handle: int, backup: Backup) -> None:
        """Put stream `handle` back where `backup` was taken."""
        if backup.slot is not None:
            self.copy_slot(backup.slot, handle)
        else:
            assert backup.cols is not None and backup.saved is not None
            for (keys, values), (k, v) in zip(zip(self.pool.keys, self.pool.values), backup.saved):
                keys[handle].index_copy_(1, backup.cols, k)
                values[handle].index_copy_(1, backup.cols, v)
        self.pool.seen[handle], self.pool.base[handle] = backup.seen, backup.base

    def drop_backup(self, backup: Backup) -> None:
        if backup.slot is not None:
            self.slots.give("backup", backup.slot)

    def copy_slot(self, src: int, dst: int) -> None:
        """Make `dst` an exact copy of `src` (a backup of a stream, or a stream rolled back to its backup)."""
        for keys, values in zip(self.pool.keys, self.pool.values):
            keys[dst].copy_(keys[src])
            values[dst].copy_(values[src])
        self.pool.seen[dst], self.pool.base[dst] = self.pool.seen[src], self.pool.base[src]


KVHandle = Union[int, SinkCache]  # a stream's KV state: a pool slot number, or its own SinkCache


class KVBackend(Protocol):
    """Where every stream's KV state lives (`PoolBackend`, `SinkBackend`): what a session asks of it."""

    pooled: bool
    slots: KVSlots
    chunk: int

    def new(self) -> Any:
        """A new, empty stream handle; raises `CacheFull` when `slots` has no stream slot left."""

    def seen(self, handle: Any) -> int:
        """Tokens the stream has fed (the sink token included)."""

    def release(self, handle: Any) -> None:
        """Give the stream's slot back (the stream left memory)."""

    def prime(self, handle: Any, token: int) -> None:
        """Feed the sink token as position 0 of a new stream."""

    def capture(self, handle: Any) -> Capture:
        """The stream's KV state frozen now, to serialize later on another thread."""

    def restore(self, blob: bytes) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
        """A handle rebuilt from a snapshot, with its extra fields and tensors; raises `SnapshotError`."""

    def generate(self, handle: Any, prompt: list[int], max_new: int, stop: Callable[[int], bool],
                 last_logits: torch.Tensor | None) -> list[int]:
        """Greedy tokens after the stream + `prompt`, without changing the stream."""


def make_backend(lm: LoadedModel, settings: Any, pooled: bool = True) -> SinkBackend | PoolBackend:
    """The pooled backend where the architecture allows it, `service.kv_pool` is on and the mode can use it
    (`pooled`: dialogue mode generates each reply token by token into its conversation's own `SinkCache`,
    `pipeline.service.dialogue_mode`), else one cache each."""
    c, s = settings.cache, settings.service
    if s.kv_pool and pooled:
        try:
            check_poolable(lm)
        except ValueError:
            pass
        else:
            return PoolBackend(lm, c.sinks, c.window, c.chunk, s.max_resident_streams, s.backup_slots)
    return SinkBackend(lm, c.sinks, c.window, c.chunk, s.max_resident_streams)
