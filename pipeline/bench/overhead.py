"""`overhead`: one `SinkModel.step` decode vs one model forward into a plain transformers `DynamicCache`
holding the same number of keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from model.loader import LoadedModel
from model.stepper import SinkModel
from pipeline.bench.common import DynamicDecoder, Tokens, filled_cache, interleaved, vocab_size


def overhead(
    lm: LoadedModel,
    keys: Sequence[int] = (256, 1024, 4096),
    sinks: int = 4,
    steps: int = 16,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decode-step time of the sink cache vs a plain DynamicCache over the same number of keys (goal <= 1.05x)."""
    runner, tokens = SinkModel(lm), Tokens(vocab_size(lm), seed=1)
    rows = []
    for n in keys:
        if progress:
            progress(f"overhead {n} keys")
        # After eviction a sink cache of S + (n - S) makes every step attend to exactly n keys.
        cache = filled_cache(runner, sinks, n - sinks, n + 64, tokens)
        dyn = DynamicDecoder(lm, tokens(n - 1))
        one = tokens(1)
        t = interleaved(partial(runner.step, cache, one), partial(dyn.forward, one), steps, repeats)
        rows.append({"keys": n, "sink_ms": 1000 * t["a_s"], "dynamic_ms": 1000 * t["b_s"], "ratio": t["a_s"] / t["b_s"],
                     "sink_cpu_ms": 1000 * t["a_cpu_s"], "dynamic_cpu_ms": 1000 * t["b_cpu_s"],
                     "cpu_ratio": t["a_cpu_s"] / t["b_cpu_s"],
                     "sink_repeats_ms": [1000 * x for x in t["a_repeats_s"]],
                     "dynamic_repeats_ms": [1000 * x for x in t["b_repeats_s"]]})
        del cache, dyn
    return {"benchmark": "overhead", "sinks": sinks, "steps": steps, "repeats": repeats, "rows": rows,
            "goal_ratio_max": 1.05}

