"""Perplexity over length under the cache policies, and the paper's ablations (the harness behind `sinkstream eval`).

Three experiments, each a JSON-able dict plus a Markdown table shaped like the paper's:

- `length_experiment` (Xiao et al. 2023, Table 1 and Figure 3): dense, window, StreamingLLM, StreamingLLM
  with newline sinks, and sliding window with re-computation on one long text, with per-segment perplexity.
- `sinks_ablation` (Table 2): a fixed cache split as 0+C, 1+(C-1), 2+(C-2), 4+(C-4), 8+(C-8).
- `cache_ablation` (Table 6): 4+(C-4) for several cache sizes C.

Cache configurations are written as the paper does, `sinks+recent`. All policies of one experiment hold the
same number of keys: window attention gets `0+(S+W)`, re-computation a `S+W`-token window. Every scored
record is `(i, nll)` with `nll = -log p(ids[i+1] | context)` in nats; perplexity is `exp(mean nll)`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from model.loader import LoadedModel
from model.policies import score_ids
from pipeline.evaluation.tables import markdown_table

# Runs and the labels they carry in tables, plots and JSON.
DENSE, WINDOW, SINK, NEWLINE, RECOMPUTE = "dense", "window", "sink", "sink-newline", "recompute"
RUNS = (DENSE, WINDOW, SINK, NEWLINE, RECOMPUTE)


@dataclass
class Scored:
    """Per-target NLLs of one run: `nlls[k]` is -log p(ids[indices[k] + 1] | context) in nats."""

    name: str
    config: str  # the paper's `sinks+recent` notation, e.g. "4+1020"
    indices: list[int] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)
    seconds: float = 0.0
    consumed: int = 0  # tokens fed through the model (for ms/token)
    stride: int = 1

    def perplexity(self, lo: int = 0, hi: int | None = None, only: set[int] | None = None) -> float:
        """exp(mean NLL) over targets i with lo <= i < hi (and i in `only`); NaN when there are none."""
        picked = [n for i, n in zip(self.indices, self.nlls)
                  if i >= lo and (hi is None or i < hi) and (only is None or i in only)]
        return perplexity(picked)

    @property
    def label(self) -> str:
        return self.name if self.config == self.name else f"{self.name} {self.config}"

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "config": self.config,
            "targets": len(self.nlls),
            "last_target": self.indices[-1] if self.indices else None,
            "stride": self.stride,
            "mean_nll": mean(self.nlls),
            "perplexity": perplexity(self.nlls),
            "seconds": self.seconds,
            "ms_per_token": 1000.0 * self.seconds / max(self.consumed, 1),
        }


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean in float64; NaN for an empty sequence."""
    return math.fsum(values) / len(values) if values else float("nan")


def perplexity(nlls: Sequence[float]) -> float:
    """exp(mean NLL) of NLLs in nats; NaN for an empty sequence."""
    return math.exp(mean(nlls)) if nlls else float("nan")


def segments(indices: Sequence[int], nlls: Sequence[float], size: int, total: int) -> list[dict[str, Any]]:
    """Split targets 0..total-1 into consecutive segments [k*size, min((k+1)*size, total)).

    Every target index lands in exactly one segment (`i // size`); a segment lists how many of its targets were
    scored (fewer than its width with a stride, none past the end of a truncated run) and their perplexity.
    """
    if size < 1:
        raise ValueError(f"segment size must be >= 1, got {size}")
    count = math.ceil(total / size) if total > 0 else 0
    buckets: list[list[float]] = [[] for _ in range(count)]
    for i, n in zip(indices, nlls):
        if not 0 <= i < total:
            raise ValueError(f"target index {i} outside 0..{total - 1}")
        buckets[i // size].append(n)
    return [
        {"start": k * size, "end": min((k + 1) * size, total), "targets": len(b), "mean_nll": mean(b),
         "perplexity": perplexity(b)}
        for k, b in enumerate(buckets)
    ]


def newline_id(lm: LoadedModel) -> int:
    """Token id of "\\n" in the model's tokenizer (the paper's 4"\\n"+1020 sinks)."""
    ids = lm.tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"expected the tokenizer to encode '\\n' as one token, got {ids}")
    return int(ids[0])


def score_run(
    lm: LoadedModel,
    ids: Sequence[int],
    name: str,
    sinks: int,
    window: int,
    chunk: int = 256,
    stride: int = 1,
    newline: int | None = None,
    progress: bool = True,
) -> Scored:
    """Score `ids` under one run of RUNS, all holding `sinks + window` keys, with a tqdm bar on stderr.

    `dense` stops at the model's position limit; `sink-newline` streams `sinks` newline tokens before the text
    in place of its first tokens; `recompute` scores every `stride`-th target only.
    """
    cache = sinks + window
    if name == DENSE:
        limit = lm.arch.max_positions
        ids = ids[:limit] if limit else ids
        policy, s, w, config, step = "dense", 0, window, "dense", chunk
    elif name == WINDOW:
        policy, s, w, config, step = "window", 0, cache, f"0+{cache}", chunk
    elif name == SINK:
        policy, s, w, config, step = "sink", sinks, window, f"{sinks}+{window}", chunk
    elif name == NEWLINE:
        if newline is None:
            raise ValueError("sink-newline needs the newline token id, got None")
        policy, s, w, config, step = "sink", sinks, window, f'{sinks}"\\n"+{window}', chunk
    elif name == RECOMPUTE:
        policy, s, w, config, step = "recompute", sinks, window, f"{cache}, every {ordinal(stride)}", 8
    else:
        raise ValueError(f"run must be one of {RUNS}, got {name!r}")
    offset = sinks if name == NEWLINE else 0
    stream = [newline] * sinks + list(ids) if name == NEWLINE and newline is not None else list(ids)
    out = Scored(name, config, stride=stride if name == RECOMPUTE else 1)
    started = time.perf_counter()
    with tqdm(total=max(len(stream) - 1, 0), desc=f"{name} {config}", unit="tok", file=sys.stderr,
              disable=not progress) as bar:
        advance = lambda n: bar.update(min(n, bar.total - bar.n))  # noqa: E731 (strided progress may overshoot)
        for i, _, nll in score_ids(lm, stream, policy, s, w, step, out.stride, progress=advance):
            if i >= offset:
                out.indices.append(i - offset)
                out.nlls.append(nll)
    out.seconds = time.perf_counter() - started
    out.consumed = max(len(stream) - 1, 0)
    return out


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st, 103rd."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def auto_stride(targets: int, span: int, budget: int) -> int:
    """Smallest stride at which re-computation forwards at most ~`budget` tokens (`span` per target)."""
    return max(1, math.ceil(targets * span / max(budget, 1)))


def length_experiment(
    lm: LoadedModel,
    ids: Sequence[int],
    sinks: int = 4,
    window: int = 1020,
    chunk: int = 256,
    stride: int = 0,
    segment: int = 512,
    runs: Sequence[str] = RUNS,
    recompute_budget: int = 100_000,
    newline: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Table 1 / Figure 3: perplexity of every run over the whole text and per `segment` tokens.

    `stride=0` picks the recompute stride with `auto_stride` so it forwards about `recompute_budget` tokens.
    `newline` is the sink-newline run's token id (default: the tokenizer's "\n").
    """
    total = len(ids) - 1  # targets
    if total < 1:
        raise ValueError(f"expected a text of at least 2 tokens, got {len(ids)}")
    stride = stride or auto_stride(total, sinks + window, recompute_budget)
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"runs must be among {RUNS}, got {unknown}")
    nl = newline if newline is not None or NEWLINE not in runs else newline_id(lm)
    scored = [score_run(lm, ids, name, sinks, window, chunk, stride, nl, progress) for name in runs]
    limit = lm.arch.max_positions
    # Dense scores the targets inside the model's positions: the first `limit` tokens hold `limit - 1` targets.
    # Rows: (title, last target, only these targets or None for all).
    ranges: list[tuple[str, int, set[int] | None]] = (
        [(f"first {limit} tokens", limit - 1, None)] if limit and limit - 1 < total else [])
    ranges.append((f"all {len(ids)} tokens", total, None))
    by_name = {s.name: s for s in scored}
    if RECOMPUTE in by_name and stride > 1:  # also compare every run on exactly the targets re-computation scored
        ranges.append(
            (f"all {len(ids)} tokens, every {ordinal(stride)} target", total, set(by_name[RECOMPUTE].indices))
        )
    header = ["Text", *[s.label for s in scored]]
    rows = []
    for title, hi, only in ranges:
        cells: list[Any] = [title]
        for s in scored:
            covered = s.indices and s.indices[-1] >= hi - max(s.stride, 1)
            cells.append(s.perplexity(0, hi, only) if covered else None)
        rows.append(cells)
    comparisons = _comparisons(by_name)
    return {
        "experiment": "length",
        "tokens": len(ids),
        "sinks": sinks,
        "window": window,
        "cache": sinks + window,
        "chunk": chunk,
        "stride": stride,
        "segment": segment,
        "model_positions": limit,
        "runs": [s.summary() for s in scored],
        "segments": {s.name: segments(s.indices, s.nlls, segment, total) for s in scored},
        "comparisons": comparisons,
        "table": markdown_table(header, rows),
        "nll": {s.name: {"indices": s.indices, "nlls": s.nlls} for s in scored},
    }


def _comparisons(by_name: dict[str, Scored]) -> dict[str, float]:
    """The acceptance ratios: window/sink perplexity, and sink vs recompute on recompute's own targets."""
    out: dict[str, float] = {}
    if SINK in by_name and WINDOW in by_name:
        out["window_over_sink"] = by_name[WINDOW].perplexity() / by_name[SINK].perplexity()
    if SINK in by_name and RECOMPUTE in by_name:
        targets = set(by_name[RECOMPUTE].indices)
        sink_matched = by_name[SINK].perplexity(only=targets)
        out["sink_on_recompute_targets"] = sink_matched
        out["recompute"] = by_name[RECOMPUTE].perplexity()
        out["sink_over_recompute"] = sink_matched / out["recompute"]
    if SINK in by_name and DENSE in by_name:
        hi = by_name[DENSE].indices[-1] + 1 if by_name[DENSE].indices else 0
        out["sink_over_dense_within_positions"] = by_name[SINK].perplexity(0, hi) / by_name[DENSE].perplexity()
    return out


def _ablation(lm, ids, configs, chunk, progress) -> tuple[list[Scored], int]:
    total = len(ids) - 1
    if total < 1:
        raise ValueError(f"expected a text of at least 2 tokens, got {len(ids)}")
    scored = [score_run(lm, ids, SINK, s, w, chunk, progress=progress) for s, w in configs]
    return scored, total


def sinks_ablation(
    lm: LoadedModel,
    ids: Sequence[int],
    cache: int = 2048,
    counts: Sequence[int] = (0, 1, 2, 4, 8),
    chunk: int = 256,
    segment: int = 512,
    label: str = "model",
    progress: bool = True,
) -> dict[str, Any]:
    """Table 2: StreamingLLM with `n` sinks and `cache - n` recent tokens, for every n in `counts`."""
    if any(n < 0 or n >= cache for n in counts):
        raise ValueError(f"expected sink counts in 0..{cache - 1}, got {list(counts)}")
    scored, total = _ablation(lm, ids, [(n, cache - n) for n in counts], chunk, progress)
    rows = [[label, *[s.perplexity() for s in scored]]]
    return _ablation_result("sinks", {"cache": cache, "counts": list(counts)}, scored, rows, len(ids), total, segment)


def cache_ablation(
    lm: LoadedModel,
    ids: Sequence[int],
    sizes: Sequence[int] = (256, 512, 1024, 2048),
    sinks: int = 4,
    chunk: int = 256,
    segment: int = 512,
    label: str = "model",
    progress: bool = True,
) -> dict[str, Any]:
    """Table 6: StreamingLLM with `sinks` sinks and `size - sinks` recent tokens, for every cache size."""
    if any(c <= sinks for c in sizes):
        raise ValueError(f"expected cache sizes larger than sinks={sinks}, got {list(sizes)}")
    scored, total = _ablation(lm, ids, [(sinks, c - sinks) for c in sizes], chunk, progress)
    rows = [[label, *[s.perplexity() for s in scored]], ["ms/token", *[s.summary()["ms_per_token"] for s in scored]]]
    return _ablation_result("cache", {"sinks": sinks, "sizes": list(sizes)}, scored, rows, len(ids), total, segment)


def _ablation_result(
    experiment: str, settings: dict[str, Any], scored: Sequence[Scored], rows: list[list[Any]], tokens: int,
    total: int, segment: int,
) -> dict[str, Any]:
    """The JSON of an ablation: its settings, per-run summaries and segments, the Markdown table, raw NLLs."""
    return {
        "experiment": experiment,
        "tokens": tokens,
        **settings,
        "segment": segment,
        "runs": [s.summary() for s in scored],
        "segments": {s.config: segments(s.indices, s.nlls, segment, total) for s in scored},
        "table": markdown_table(["Cache config", *[s.config for s in scored]], rows),
        "nll": {s.config: {"indices": s.indices, "nlls": s.nlls} for s in scored},
    }
