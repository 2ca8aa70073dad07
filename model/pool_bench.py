"""Micro-benchmarks of the pooled cache and the batched ragged step (pure functions returning dicts; no CLI).

- `decode(lm, loghub, sizes)`: B streams, one token each, after a `prefix`-token history (the window full):
  the pool's batched step vs stepping the same streams one by one (pool slots, and today's `SinkCache` path)
  vs plain transformers' batched `DynamicCache` decode at the same batch and key count (cropped back to
  `prefix` keys after every step, sdpa attention).
- `ingest(lm, loghub, counts)`: N keyed streams each feeding one Loghub line: one packed ragged pool step vs the raw
  transformers forward over the same token lists right-padded into one batch with a `DynamicCache` holding a
  `prefix`-token history per stream (the issue's "raw batched forward") vs one forward per stream with
  today's `SinkCache` path.

Histories are built once (one stream through the pool) and copied into every slot / row, so setting up 64
streams costs one prefix forward, not 64. Times are medians of `repeats` wall-clock runs (after a warm-up),
the variants interleaved within each repeat so machine load hits them alike. Throughput figures live here,
never in timed tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from model.loader import LoadedModel
from model.pool import KVPool, bytes_per_slot
from model.pool_step import PoolStepper
from model.stepper import SinkModel
from model.tokens import encode_text


def loghub_lines(lm: LoadedModel, count: int, max_tokens: int, folder: Path) -> list[list[int]]:
    """`count` tokenised Loghub lines from the `*.log` samples in `folder` (the caller finds it, e.g.
    `pipeline.evaluation.datasets.loghub_dir()`), round-robin over the files, each cut to `max_tokens`."""
    files = sorted(folder.glob("*.log"))
    if not files:
        raise FileNotFoundError(f"expected Loghub samples (*.log) in {folder}, found none")
    per_file = [f.read_text(errors="replace").splitlines() for f in files]
    out: list[list[int]] = []
    row = 0
    while len(out) < count:
        for lines in per_file:
            if row < len(lines) and lines[row].strip() and len(out) < count:
                ids = encode_text(lm.tokenizer, lines[row] + "\n")
                out.append(ids[:max_tokens])
        row += 1
    return out


def padded_batch(lm: LoadedModel, chunks: Sequence[Sequence[int]], prefix: int):
    """The raw baseline's input: token lists right-padded into one batch after a `prefix`-token history.

    Returns (input_ids (B, n_max), attention_mask (B, prefix + n_max), position_ids (B, n_max)).
    """
    count, n_max = len(chunks), max(len(c) for c in chunks)
    padded = torch.zeros(count, n_max, dtype=torch.long, device=lm.device)  # (B, n_max)
    mask = torch.zeros(count, prefix + n_max, dtype=torch.long, device=lm.device)  # (B, prefix + n_max)
    mask[:, :prefix] = 1
    for b, c in enumerate(chunks):
        padded[b, : len(c)] = torch.tensor(list(c))
        mask[b, prefix : prefix + len(c)] = 1
    pos = torch.arange(prefix, prefix + n_max, device=lm.device)[None].expand(count, -1)  # (B, n_max)
    return padded, mask, pos


@contextmanager
def _plain_sdpa(lm: LoadedModel):
    """Run the model with transformers' own sdpa attention (the raw baseline), then switch back."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


def _sync() -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it (kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(
    fns: dict[str, Callable[[], Any]], repeats: int, cpu: dict[str, float] | None = None, warmup: bool = True
) -> dict[str, float]:
    """Median wall seconds per call of each fn; one warm-up each (unless `warmup=False`); variants interleaved
    within every repeat.

    `cpu`, when given, receives the median process CPU seconds per call (less sensitive to a loaded machine).
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu_samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(0 if warmup else 1, repeats + 1):
        for name, fn in fns.items():
            _sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync()
            if r:
                samples[name].append(time.perf_counter() - start)
                cpu_samples[name].append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu.update({name: statistics.median(v) for name, v in cpu_samples.items()})
    return {name: statistics.median(v) for name, v in samples.items()}


def _prefix_ids(lm: LoadedModel, n: int, loghub: Path) -> list[int]:
    lines = loghub_lines(lm, 400, 64, loghub)
    flat = [t for line in lines for t in line]
    if len(flat) < n:
        raise ValueError(f"expected at least {n} prefix tokens from Loghub, got {len(flat)}")
    return flat[:n]


@dataclass
class _Histories:
    """The same (sinks + window)-token Loghub history in `capacity` pool slots and as one SinkCache state."""

    prefix_ids: list[int]
    pool: KVPool
    stepper: PoolStepper
    slots: list[int]
    last: torch.Tensor  # (vocab,) the history's prediction of the next token
    runner: SinkModel
    base_state: Any  # SinkCache state after the history (restored into a fresh cache per stream)


def _histories(lm: LoadedModel, loghub: Path, capacity: int, sinks: int, window: int, max_chunk: int) -> _Histories:
    """One prefix forward through the pool, forked into every slot, and one through a SinkCache."""
    prefix_ids = _prefix_ids(lm, sinks + window, loghub)
    pool = KVPool(lm, capacity, sinks, window, max_chunk=max_chunk)
    stepper = PoolStepper(pool)
    first = pool.allocate()
    last = stepper.feed(first, prefix_ids).last_logits
    slots = [first] + [pool.fork(first) for _ in range(capacity - 1)]
    runner = SinkModel(lm)
    sink_state = runner.new_cache(sinks, window, max_chunk=max_chunk)
    runner.step(sink_state, prefix_ids)
    return _Histories(prefix_ids, pool, stepper, slots, last, runner, sink_state.state())


@torch.inference_mode()
def _dynamic_prefix(lm: LoadedModel, prefix_ids: list[int], batch: int) -> DynamicCache:
    """A DynamicCache holding `prefix_ids` for `batch` identical rows (sdpa attention)."""
    cache = DynamicCache(config=lm.model.config)
    ids = torch.tensor(prefix_ids, device=lm.device)[None]
    lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for layer in _layers(cache):
        keys, values = layer.keys, layer.values
        assert keys is not None and values is not None  # the prefix was fed
        layer.keys = keys.expand(batch, -1, -1, -1).contiguous()
        layer.values = values.expand(batch, -1, -1, -1).contiguous()
    return cache


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The layers of a DynamicCache built from a plain decoder config."""
    return cast("list[DynamicLayer]", cache.layers)


def _crop(cache: DynamicCache, length: int) -> None:
    for layer in _layers(cache):
        keys, values = layer.keys, layer.values
        assert keys is not None and values is not None  # the prefix was fed
        if keys.shape[-2] > length:
            layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]


@torch.inference_mode()
def decode(
    lm: LoadedModel,
    loghub: Path,
    sizes: Sequence[int] = (1, 4, 16, 64),
    sinks: int = 4,
    window: int = 1020,
    max_chunk: int = 64,
    repeats: int = 3,
    sequential_max: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s of one-token-per-stream decode steps at B streams (see the module docstring); the history is
    made of Loghub lines from the `loghub` folder."""
    prefix = sinks + window
    h = _histories(lm, loghub, max(sizes), sinks, window, max_chunk)
    prefix_ids, pool, stepper, slots, last, runner, base_state = (
        h.prefix_ids, h.pool, h.stepper, h.slots, h.last, h.runner, h.base_state)
    vocab = lm.model.get_output_embeddings().out_features
    g = torch.Generator().manual_seed(0)
    rows = []
    for size in sizes:
        if progress:
            progress(f"decode B={size}")
        batch = slots[:size]
        tokens = torch.randint(0, vocab, (size,), generator=g).tolist()
        with _plain_sdpa(lm):
            dyn = _dynamic_prefix(lm, prefix_ids, size)
        pos = torch.full((size, 1), prefix, device=lm.device)
        tok = torch.tensor(tokens, device=lm.device)[:, None]

        # The timed functions bind this size's inputs (default arguments), so nothing depends on the loop variables.
        def dynamic_step(tok=tok, pos=pos, dyn=dyn):
            with _plain_sdpa(lm):
                lm.model(input_ids=tok, position_ids=pos, past_key_values=dyn, use_cache=True)
            _crop(dyn, prefix)

        def sink_one_by_one(tokens=tokens):
            for t in tokens[:sequential_max]:
                cache = runner.new_cache(sinks, window, max_chunk=max_chunk)
                cache.restore(base_state)  # shares the prefix tensors; the step makes new ones
                runner.step(cache, [t])

        def pool_batched(batch: list[int] = batch, tokens: list[int] = tokens) -> Any:
            return stepper.step(batch, [[t] for t in tokens])

        def pool_one_by_one(batch: list[int] = batch, tokens: list[int] = tokens) -> Any:
            return [stepper.step([s], [[t]]) for s, t in zip(batch, tokens)]

        fns: dict[str, Callable[[], Any]] = {
            "pool_batched": pool_batched,
            "pool_one_by_one": pool_one_by_one,
            "dynamic_batched": dynamic_step,
            "sinkcache_one_by_one": sink_one_by_one,
        }
        cpu: dict[str, float] = {}
        t = _timed(fns, repeats, cpu)
        seq_n = min(size, sequential_max)
        tps = {
            "pool_batched": size / t["pool_batched"],
            "pool_one_by_one": size / t["pool_one_by_one"],
            "dynamic_batched": size / t["dynamic_batched"],
            "sinkcache_one_by_one": seq_n / t["sinkcache_one_by_one"],
        }
        rows.append({
            "streams": size,
            "seconds": t,
            "cpu_seconds": cpu,
            "tokens_per_s": tps,
            "pool_vs_dynamic": tps["pool_batched"] / tps["dynamic_batched"],
            "pool_vs_dynamic_cpu": cpu["dynamic_batched"] / cpu["pool_batched"],
            "pool_vs_one_by_one": tps["pool_batched"] / tps["pool_one_by_one"],
            "pool_vs_sinkcache_one_by_one": tps["pool_batched"] / tps["sinkcache_one_by_one"],
        })
        del dyn
    del last
    return {"benchmark": "pool_decode", "sinks": sinks, "window": window, "max_chunk": max_chunk,
            "keys_per_stream": prefix, "pool_columns": pool.columns, "repeats": repeats,
            "bytes_per_slot": bytes_per_slot(lm, sinks, window, pool.max_chunk), "threads": torch.get_num_threads(),
            "rows": rows}


@torch.inference_mode()
def ingest(
    lm: LoadedModel,
    loghub: Path,
    counts: Sequence[int] = (1, 16, 64),
    sinks: int = 4,
    window: int = 1020,
    max_chunk: int = 128,
    repeats: int = 2,
    sequential_max: int = 64,
    progress: Callable[[str], None] | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Tokens/s of N streams each ingesting one Loghub line from the `loghub` folder (see the module docstring).

    `sequential_max` caps how many streams the one-forward-per-stream variant runs (its tokens/s is over those).
    """
    prefix = sinks + window
    h = _histories(lm, loghub, max(counts), sinks, window, max_chunk)
    prefix_ids, stepper, slots, last, runner, base_state = (
        h.prefix_ids, h.stepper, h.slots, h.last, h.runner, h.base_state)
    lines = loghub_lines(lm, max(counts), max_chunk, loghub)  # lines longer than max_chunk are cut (counted below)
    rows = []
    for count in counts:
        if progress:
            progress(f"ingest N={count}")
        batch, chunks = slots[:count], lines[:count]
        tokens = sum(len(c) for c in chunks)
        n_max = max(len(c) for c in chunks)
        with _plain_sdpa(lm):
            dyn = _dynamic_prefix(lm, prefix_ids, count)
        padded, mask, pos = padded_batch(lm, chunks, prefix)

        def raw_padded(padded=padded, mask=mask, pos=pos, dyn=dyn):
            with _plain_sdpa(lm):
                lm.model(input_ids=padded, attention_mask=mask, position_ids=pos, past_key_values=dyn, use_cache=True)
            _crop(dyn, prefix)

        def sink_one_by_one(chunks=chunks):
            for c in chunks[:sequential_max]:
                cache = runner.new_cache(sinks, window, max_chunk=max_chunk)
                cache.restore(base_state)
                runner.nll(cache, c, last)

        def pool_ragged(batch: list[int] = batch, chunks: list[list[int]] = chunks, count: int = count) -> Any:
            return stepper.step(batch, chunks, [last] * count)

        fns: dict[str, Callable[[], Any]] = {
            "pool_ragged": pool_ragged,
            "raw_padded": raw_padded,
            "sinkcache_one_by_one": sink_one_by_one,
        }
        cpu: dict[str, float] = {}
        t = _timed(fns, repeats, cpu, warmup)
        seq_tokens = sum(len(c) for c in chunks[:sequential_max])
        tps = {"pool_ragged": tokens / t["pool_ragged"], "raw_padded": tokens / t["raw_padded"],
               "sinkcache_one_by_one": seq_tokens / t["sinkcache_one_by_one"]}
        rows.append({
            "streams": count,
            "tokens": tokens,
            "padded_tokens": count * n_max,
            "line_tokens_min_mean_max": [min(len(c) for c in chunks), tokens / count, n_max],
            "lines_cut_at_max_chunk": sum(len(c) == max_chunk for c in chunks),
            "seconds": t,
            "cpu_seconds": cpu,
            "tokens_per_s": tps,
            "pool_vs_raw_padded": tps["pool_ragged"] / tps["raw_padded"],
            "pool_vs_raw_padded_cpu": cpu["raw_padded"] / cpu["pool_ragged"],
            "pool_vs_sinkcache_one_by_one": tps["pool_ragged"] / tps["sinkcache_one_by_one"],
        })
        if progress:
            progress(f"ingest N={count} done: {rows[-1]}")
        del dyn
    return {"benchmark": "pool_ingest", "sinks": sinks, "window": window, "max_chunk": max_chunk,
            "prefix_tokens": prefix, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}
