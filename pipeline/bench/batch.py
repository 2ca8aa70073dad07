"""`batch`: B independent streams at different lengths advanced one token each, by `model.batch.step_many` in
one forward pass vs by `SinkModel.step` one stream after the other; tokens/s of both and the largest logit
difference between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from model.batch import step_many
from model.loader import LoadedModel
from model.sink_cache import CacheState, SinkCache
from model.stepper import SinkModel
from pipeline.bench.common import Tokens, filled_cache, interleaved, vocab_size


def batch(
    lm: LoadedModel,
    sizes: Sequence[int] = (1, 4, 16),
    sinks: int = 4,
    window: int = 1020,
    steps: int = 8,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s of B streams stepped in one batched forward vs one by one, at staggered stream lengths."""
    runner, tokens = SinkModel(lm), Tokens(vocab_size(lm), seed=4)
    base = filled_cache(runner, sinks, window, sinks + window + 64, tokens).state()
    rows = []
    for size in sizes:
        if progress:
            progress(f"batch B={size}")
        caches = []
        for b in range(size):  # same history, then 0, 3, 6, ... more tokens: every stream at its own length
            cache = runner.new_cache(sinks, window)
            cache.restore(base)  # updates never write in place, so streams may share the prefix tensors
            if b:
                runner.step(cache, tokens(3 * b))
            caches.append(cache)
        states = [c.state() for c in caches]
        ids = tokens(size)

        def reset(caches: list[SinkCache] = caches, states: list[CacheState] = states) -> None:
            for c, s in zip(caches, states):
                c.restore(s)

        reset()
        batched_logits = step_many(lm, caches, ids)
        reset()
        one_logits = torch.stack([runner.step(c, [int(t)])[0] for c, t in zip(caches, ids)])
        diff = float((batched_logits - one_logits).abs().max())
        def one_by_one(cs: list[SinkCache] = caches, xs: torch.Tensor = ids) -> list[torch.Tensor]:
            return [runner.step(c, [int(x)]) for c, x in zip(cs, xs)]

        t = interleaved(partial(step_many, lm, caches, ids), one_by_one, steps, repeats, reset)
        rows.append({"streams": size, "lengths": [s.seen for s in states], "batched_tokens_per_s": size / t["a_s"],
                     "sequential_tokens_per_s": size / t["b_s"], "speedup": t["b_s"] / t["a_s"],
                     "cpu_speedup": t["b_cpu_s"] / t["a_cpu_s"], "max_abs_logit_diff": diff})
    return {"benchmark": "batch", "sinks": sinks, "window": window, "steps": steps, "repeats": repeats, "rows": rows}

