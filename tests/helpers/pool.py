"""Helpers for the pooled-step tests (`tests/model/test_pool.py`, and the same checks on CUDA in
`tests/model/test_cuda.py`)."""

from __future__ import annotations

import torch

from model.loader import LoadedModel
from model.pool import KVPool
from model.pool_step import PoolStepper
from tests.helpers.models import VOCAB


def random_ids(n: int, seed: int = 1) -> list[int]:
    """`n` token ids of the tiny models' vocabulary, the same for the same seed."""
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ragged_results_by_mode(
    lm: LoadedModel, sinks: int, window: int, chunk: int, modes: tuple[str, ...] = ("loop", "batched", "flex")
) -> dict[str, torch.Tensor]:
    """Per attention mode: 4 streams with histories of 0, 3, 14 and 30 tokens, then six rounds of one packed
    step each with random chunk lengths (round 2: one token each, a decode step), so that eviction and frame
    moves happen inside batches. Returns every NLL after a stream's first token and every last-logits row,
    concatenated, as float32 on the CPU."""
    results = {}
    for mode in modes:
        pool = KVPool(lm, 4, sinks, window, max_chunk=chunk)
        stepper = PoolStepper(pool, mode=mode)  # type: ignore[arg-type]
        slots = [pool.allocate() for _ in range(4)]
        for s, n in zip(slots, (0, 3, 14, 30)):
            if n:
                stepper.feed(s, random_ids(n, seed=s))
        g = torch.Generator().manual_seed(11)
        out = []
        for rnd in range(6):
            lengths = [1] * 4 if rnd == 2 else torch.randint(1, chunk + 1, (4,), generator=g).tolist()
            res = stepper.step(slots, [random_ids(n, seed=10 * rnd + b) for b, n in enumerate(lengths)])
            out.append(torch.cat([torch.cat([r.nll[1:], r.last_logits.float().cpu()]) for r in res]))
        results[mode] = torch.cat(out)
    return results


def batch_vs_alone(lm: LoadedModel, sinks: int, window: int, chunk: int, mode: str, rounds: int) -> tuple[float, int]:
    """Six streams (histories of 0, 2, 9, 15, 26 and 40 tokens: before the sinks fill, before and after eviction)
    each kept twice, in interleaved slots (the batch's slots have gaps); `rounds` rounds of random ragged chunks
    (round 4: one token each) go to one copy of every stream in one batched step, callers' order differing from
    slot order, and to the other copy alone. Checks that counters and NaN positions agree; returns (the largest
    |difference| of NLLs and last logits between the two copies, the number of frame moves inside batches)."""
    histories = [0, 2, 9, 15, 26, 40]
    pool = KVPool(lm, 2 * len(histories) + 1, sinks, window, max_chunk=chunk)
    stepper = PoolStepper(pool, mode=mode)  # type: ignore[arg-type]
    batch_slots, alone_slots, prev_b, prev_a = [], [], [], []
    for k, n in enumerate(histories):
        a, b = pool.allocate(), pool.allocate()
        pa = pb = None
        if n:
            pa = stepper.feed(a, random_ids(n, seed=10 + k)).last_logits
            pb = stepper.feed(b, random_ids(n, seed=10 + k)).last_logits
        batch_slots.append(a)
        alone_slots.append(b)
        prev_b.append(pa)
        prev_a.append(pb)
    order = [3, 0, 5, 1, 4, 2]
    g = torch.Generator().manual_seed(7)
    worst, moved = 0.0, 0
    for rnd in range(rounds):
        lengths = [1] * len(order) if rnd == 4 else torch.randint(1, chunk + 1, (len(order),), generator=g).tolist()
        chunks = [random_ids(n, seed=100 * rnd + k) for k, n in zip(order, lengths)]
        bases = [pool.base[batch_slots[k]] for k in order]
        batched = stepper.step([batch_slots[k] for k in order], chunks, [prev_b[k] for k in order])
        moved += sum(pool.base[batch_slots[k]] != b0 for k, b0 in zip(order, bases))
        for k, piece, res in zip(order, chunks, batched):
            (alone,) = stepper.step([alone_slots[k]], [piece], [prev_a[k]])
            assert (pool.seen[batch_slots[k]], pool.base[batch_slots[k]]) == (
                pool.seen[alone_slots[k]], pool.base[alone_slots[k]])
            both = ~torch.isnan(alone.nll)
            assert torch.equal(both, ~torch.isnan(res.nll))
            if both.any():
                worst = max(worst, float((res.nll[both] - alone.nll[both]).abs().max()))
            worst = max(worst, float((res.last_logits - alone.last_logits).abs().max()))
            prev_b[k], prev_a[k] = res.last_logits, alone.last_logits
    return worst, moved
