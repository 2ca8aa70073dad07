"""`latency` (Xiao et al. 2023, Fig. 10): per-token decode latency at cache sizes C for `sink` (4+(C-4)),
`window` (0+C), `dense` (C keys, no eviction) and `recompute` (a fresh forward over the last C tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from model.loader import LoadedModel
from model.stepper import SinkModel
from pipeline.bench.common import Tokens, filled_cache, median_time, vocab_size

LATENCY_POLICIES = ("sink", "window", "dense", "recompute")



def latency(
    lm: LoadedModel,
    sizes: Sequence[int] = (256, 512, 1024, 2048, 4096),
    policies: Sequence[str] = LATENCY_POLICIES,
    sinks: int = 4,
    steps: int = 8,
    repeats: int = 3,
    recompute_steps: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-token decode latency (ms) per policy and cache size, and the speedup of sink over recompute."""
    unknown = set(policies) - set(LATENCY_POLICIES)
    if unknown:
        raise ValueError(f"expected policies among {LATENCY_POLICIES}, got {sorted(unknown)}")
    runner, tokens = SinkModel(lm), Tokens(vocab_size(lm))
    ms: dict[str, dict[int, float]] = {p: {} for p in policies}
    raw: dict[str, dict[int, list[float]]] = {p: {} for p in policies}
    cpu: dict[str, dict[int, float]] = {p: {} for p in policies}
    for size in sizes:
        for policy in policies:
            if progress:
                progress(f"latency {policy} cache {size}")
            if policy == "recompute":
                context = tokens(size)[None].to(lm.device)

                def call(context=context):
                    with torch.inference_mode():
                        lm.model(input_ids=context, logits_to_keep=1)

                t = median_time(call, recompute_steps, repeats)
            else:
                s, w, fill = {"sink": (sinks, size - sinks, size + 64), "window": (0, size, size + 64),
                              "dense": (0, None, size - 1)}[policy]
                cache = filled_cache(runner, s, w, fill, tokens)
                state = cache.state()
                one = tokens(1)
                reset = partial(cache.restore, state) if policy == "dense" else None
                t = median_time(partial(runner.step, cache, one), steps, repeats, reset)
                del cache, state
            ms[policy][size] = 1000.0 * t["median_s"]
            cpu[policy][size] = 1000.0 * t["median_cpu_s"]
            raw[policy][size] = [1000.0 * x for x in t["repeats_s"]]
    speedup, cpu_speedup = {}, {}
    if "sink" in ms and "recompute" in ms:
        speedup = {size: ms["recompute"][size] / ms["sink"][size] for size in sizes}
        cpu_speedup = {size: cpu["recompute"][size] / cpu["sink"][size] for size in sizes}
    return {"benchmark": "latency", "sizes": list(sizes), "sinks": sinks, "steps": steps, "repeats": repeats,
            "ms_per_token": ms, "cpu_ms_per_token": cpu, "repeats_ms": raw, "speedup_sink_over_recompute": speedup,
            "cpu_speedup_sink_over_recompute": cpu_speedup, "paper_speedup": 22.2}

