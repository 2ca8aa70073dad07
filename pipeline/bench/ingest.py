"""`ingest`: tokens/s of chunked feeding at a full S+W cache vs a raw forward of the same chunk against a
`DynamicCache` of S+W-1 past tokens (the same attention span).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from model.loader import LoadedModel
from model.stepper import SinkModel
from pipeline.bench.common import DynamicDecoder, Tokens, filled_cache, interleaved, vocab_size


def ingest(
    lm: LoadedModel,
    chunks: Sequence[int] = (1, 16, 64, 256, 512),
    sinks: int = 4,
    window: int = 1020,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s of chunked feeding into a full sink cache vs a raw forward at the same span (goal >= 0.9x)."""
    runner, tokens = SinkModel(lm), Tokens(vocab_size(lm), seed=2)
    span = sinks + window - 1  # past keys every chunk sees in a full cache
    dyn = DynamicDecoder(lm, tokens(span))
    rows = []
    for chunk in chunks:
        if progress:
            progress(f"ingest chunk {chunk}")
        forwards = max(2, min(32, 1024 // chunk))
        cache = filled_cache(runner, sinks, window, sinks + window + chunk, tokens, chunk=max(256, chunk))
        ids = tokens(chunk)
        t = interleaved(partial(runner.step, cache, ids), partial(dyn.forward, ids), forwards, repeats)
        rows.append({"chunk": chunk, "forwards": forwards, "sink_tokens_per_s": chunk / t["a_s"],
                     "raw_tokens_per_s": chunk / t["b_s"],
                     "ratio": t["b_s"] / t["a_s"], "cpu_ratio": t["b_cpu_s"] / t["a_cpu_s"]})
        del cache
    return {"benchmark": "ingest", "sinks": sinks, "window": window, "span": span + 1, "repeats": repeats,
            "rows": rows, "goal_ratio_min": 0.9}

