"""`sinkstream bench streams`: many keyed streams, one log line per record, through the service (issue 9).

For N streams (default 1, 16, 64, 256), in one run, on the same Loghub lines:

- `service_pool`: the real `Service` loop (sessions, chunker, pooled batched step, scoring, annotations,
  checkpoints) over the in-memory connectors (`connectors.memory`), so the figure is the service's own cost
  without broker and Redis I/O (`sinkstream bench service` measures those). Every stream first gets a warm-up
  record of about `window` tokens, so every timed line attends to a full window, like the raw baseline;
  only groups made of timed records count. A group's time runs from the preparation of its records (byte
  limits, chunker, tokenizer) through the packed forwards, scoring and publishing to the end of the
  housekeeping after it (checkpoint cadence, metrics); polling the in-memory source is not counted.
  `model_seconds` is the time inside the packed forwards of those groups, `outside_model_fraction` the share
  of the service's own work around them. The store counts checkpoint bytes without keeping them.
- `service_per_stream`: the same with `service.kv_pool: false` (one SinkCache per stream, one stream per
  forward: the path before the pooled cache), for N <= `per_stream_max`.
- `raw_padded` (for N <= `raw_max`): plain transformers (plain `nn.Linear`s, also in bf16: `model.row_stable`)
  over the same token lists, right-padded into one batch with a
  `DynamicCache` holding a (sinks + window)-token history per stream (the limit for this model: no service,
  no sink handling), timed per round of one line per stream; `padded_tokens` counts the batch's positions
  including the padding to each round's longest line (the work the packed ragged step does not do).

`templates` (`--templates on|off|both`): the service runs with the template memory, combined score and
verdict of issue 18 on (the default settings) or off (`templates.enabled: false`); `both` runs `service_pool`
both ways in the same run, alternating, `repeats` times each (the best of each is kept, so a busy moment of a
shared machine hurts neither side more), as `service_pool` and `service_pool_templates_off`, with
`templates_on_vs_off` = on / off tokens per second (issue 18 asks >= 0.9).

Plus `model.pool_bench.decode` (B streams, one token each: pooled batched step vs one by one vs transformers'
batched DynamicCache decode) and the memory one resident stream needs (`model.pool.bytes_per_slot`).
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from model.loader import LoadedModel
from model.pool import bytes_per_slot
from model.pool_bench import _crop, _dynamic_prefix, _plain_sdpa, _prefix_ids, decode, padded_batch
from model.row_stable import plain_linears
from model.tokens import encode_text
from pipeline.evaluation.datasets import loghub_dir
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


def _lines(lm: LoadedModel, count: int, per_stream: int, warmup_tokens: int) -> tuple[list[list[str]], list[int]]:
    """Per stream: Loghub lines of about `warmup_tokens` tokens (its history) + `per_stream` more lines, streams
    drawing from the sample files in turn; returns (lines per stream, number of history lines per stream)."""
    files = sorted(loghub_dir().glob("*.log"))
    texts = [f.read_text(errors="replace").splitlines() for f in files]
    out, history = [], []
    for s in range(count):
        text = texts[s % len(texts)]
        start = (s // len(texts)) * 97 % max(1, len(text) // 2)
        lines, tokens = [], 0
        for line in text[start:]:
            lines.append(line + "\n")
            if tokens < warmup_tokens:
                tokens += len(encode_text(lm.tokenizer, line + "\n"))
                history_lines = len(lines)
            elif len(lines) >= history_lines + per_stream:
                break
        out.append(lines)
        history.append(history_lines)
    return out, history


def _service_run(
    lm: LoadedModel, streams: list[list[str]], history: list[int], values: dict[str, Any]
) -> dict[str, Any]:
    settings = load_settings(None, **values)
    topic = MemoryTopic("bench")
    for s, lines in enumerate(streams):  # warm-up: one record of many lines per stream
        topic.append(0, f"s{s}".encode(), "".join(lines[: history[s]]).encode())
    timed_from = len(streams)
    per_stream = min(len(lines) - h for lines, h in zip(streams, history))
    for i in range(per_stream):  # then one line per record, streams interleaved
        for s, lines in enumerate(streams):
            topic.append(0, f"s{s}".encode(), lines[history[s] + i].encode())
    # The store counts checkpoint bytes instead of keeping them: 256 full streams would hold 13 GB twice.
    engine, store = Engine(lm, settings), MemoryStore(keep_checkpoint_blobs=False)
    service = Service(settings, engine, MemorySource.factory(topic), MemorySink(), store)
    timed = {"seconds": 0.0, "model_seconds": 0.0, "tokens": 0, "records": 0, "groups": 0}
    in_model = [0.0]
    group: dict[str, Any] = {}  # the group between its preparation and the housekeeping after it
    take, housekeeping = service._take_group, service._housekeeping
    backend = engine.backend
    step = getattr(backend, "step", None)  # the pooled backend's packed forward (the one-cache path has none)
    if step is not None:
        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                in_model[0] += time.perf_counter() - start

        backend.step = timed_step  # type: ignore[union-attr,method-assign]

    def take_group(pending):  # a group's clock starts before its records are prepared (chunker, tokenizer)
        in_model[0] = 0.0
        group["start"] = time.perf_counter()
        works = take(pending)
        group["works"] = works
        return works

    def after_group():  # ... and stops after the housekeeping that follows it (checkpoints, metrics)
        housekeeping()
        works = group.pop("works", None)
        if works and all(w.record.offset >= timed_from for w in works):
            timed["seconds"] += time.perf_counter() - group["start"]
            timed["model_seconds"] += in_model[0]
            timed["tokens"] += sum(w.tokens for w in works)
            timed["records"] += len(works)
            timed["groups"] += 1

    service._take_group = take_group  # type: ignore[method-assign]
    service._housekeeping = after_group  # type: ignore[method-assign]
    service.run(idle_exit_s=0.2, install_signals=False)
    if not timed["seconds"]:
        raise RuntimeError("no group consisted of timed records only; raise --streams or the line count")
    out: dict[str, Any] = {
        **timed,
        "tokens_per_s": timed["tokens"] / timed["seconds"],
        "lines_per_s": timed["records"] / timed["seconds"],
    }
    if step is None:
        del out["model_seconds"]
    else:  # what the service adds around the packed forwards: sessions, chunker, scoring, annotations, publish
        out["outside_model_fraction"] = 1 - timed["model_seconds"] / timed["seconds"]
    return out


@torch.inference_mode()
def _raw_run(lm: LoadedModel, token_rounds: list[list[list[int]]], prefix: int, repeats: int) -> dict[str, Any]:
    """Plain transformers: each round (one line per stream) as one right-padded batch over a DynamicCache."""
    count = len(token_rounds[0])
    prefix_ids = _prefix_ids(lm, prefix, loghub_dir())
    with _plain_sdpa(lm), plain_linears(lm.model):
        dyn = _dynamic_prefix(lm, prefix_ids, count)
    seconds, tokens, padded_tokens = 0.0, 0, 0
    for chunks in token_rounds:
        padded, mask, pos = padded_batch(lm, chunks, prefix)
        padded_tokens += padded.numel()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with _plain_sdpa(lm), plain_linears(lm.model):
                lm.model(input_ids=padded, attention_mask=mask, position_ids=pos, past_key_values=dyn, use_cache=True)
            times.append(time.perf_counter() - start)
            _crop(dyn, prefix)
        seconds += statistics.median(times)
        tokens += sum(len(c) for c in chunks)
    del dyn
    return {"seconds": seconds, "tokens": tokens, "padded_tokens": padded_tokens, "tokens_per_s": tokens / seconds}


def bench_streams(
    lm: LoadedModel,
    counts: list[int],
    sinks: int = 4,
    window: int = 1020,
    chunk: int = 64,
    lines_per_stream: int = 4,
    per_stream_max: int = 64,
    raw_max: int = 64,
    decode_sizes: list[int] | None = None,
    repeats: int = 2,
    progress: Any = None,
    templates: str = "on",
) -> dict[str, Any]:
    """The figures of the module docstring, one row per stream count."""
    if templates not in ("on", "off", "both"):
        raise ValueError(f"templates: expected on, off or both, got {templates!r}")
    rows = []
    for count in counts:
        streams, history = _lines(lm, count, lines_per_stream, window)
        # One group per poll: the warm-up poll packs every stream's history chunk by chunk (count x chunk tokens
        # a forward), then each poll of one line per stream is one forward.
        batch_tokens = count * (window + 4 * chunk)
        values: dict[str, Any] = {
            "cache": {"sinks": sinks, "window": window, "chunk": chunk},
            "kafka": {"max_poll_records": count},  # a poll: the warm-ups, then one line per stream
            "checkpoint": {"every_records": 100_000, "every_seconds": 3600},
            "service": {"max_resident_streams": count, "batch_tokens": batch_tokens},
            "templates": {"enabled": templates != "off"},
        }
        pooled_off = None
        if templates == "both":
            runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
            for _ in range(repeats):
                for enabled in (True, False):
                    if progress:
                        progress(f"streams N={count}: service (pooled), templates {'on' if enabled else 'off'}")
                    runs[enabled].append(_service_run(lm, streams, history,
                                                      {**values, "templates": {"enabled": enabled}}))
                    gc.collect()
            pooled, pooled_off = (max(runs[e], key=lambda r: r["tokens_per_s"]) for e in (True, False))
        else:
            if progress:
                progress(f"streams N={count}: service (pooled)")
            pooled = _service_run(lm, streams, history, values)
            gc.collect()  # the pool of this run goes before the next one allocates
        per_stream = None
        if count <= per_stream_max:
            if progress:
                progress(f"streams N={count}: service (one cache per stream)")
            values["service"] = {**values["service"], "kv_pool": False}
            per_stream = _service_run(lm, streams, history, values)
            gc.collect()
        raw = None
        if count <= raw_max:
            if progress:
                progress(f"streams N={count}: raw padded forward")
            tokenize = lm.tokenizer
            rounds = [[tokenize(streams[s][history[s] + i], add_special_tokens=False)["input_ids"]
                       for s in range(count)] for i in range(lines_per_stream)]
            raw = _raw_run(lm, rounds, sinks + window, repeats)
            gc.collect()
        rows.append({
            "streams": count, "service_pool": pooled, "service_per_stream": per_stream, "raw_padded": raw,
            "service_pool_templates_off": pooled_off,
            "templates_on_vs_off": pooled["tokens_per_s"] / pooled_off["tokens_per_s"] if pooled_off else None,
            "pool_vs_raw": pooled["tokens_per_s"] / raw["tokens_per_s"] if raw else None,
            "pool_vs_per_stream": pooled["tokens_per_s"] / per_stream["tokens_per_s"] if per_stream else None,
        })
    result: dict[str, Any] = {
        "benchmark": "streams", "templates": templates, "sinks": sinks, "window": window, "chunk": chunk,
        "lines_per_stream": lines_per_stream,
        "threads": torch.get_num_threads(), "rows": rows,
        "bytes_per_resident_stream": bytes_per_slot(lm, sinks, window, chunk),
    }
    if decode_sizes:
        if progress:
            progress("streams: batched decode")
        result["decode"] = decode(lm, loghub_dir(), sizes=decode_sizes, sinks=sinks, window=window, max_chunk=chunk,
                                  repeats=repeats)
    return result


def compare_dtypes(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`bench streams --dtype float32,bfloat16`: the runs side by side and, per stream count, each dtype's
    tokens/s over the first dtype's (service pooled end to end, and the raw padded forward)."""
    names = list(runs)
    base = runs[names[0]]
    ratios: dict[str, list[dict[str, Any]]] = {}
    for name in names[1:]:
        rows = []
        for b, r in zip(base["rows"], runs[name]["rows"]):
            raw = (r["raw_padded"]["tokens_per_s"] / b["raw_padded"]["tokens_per_s"]
                   if r["raw_padded"] and b["raw_padded"] else None)
            rows.append({"streams": r["streams"],
                         "service_pool": r["service_pool"]["tokens_per_s"] / b["service_pool"]["tokens_per_s"],
                         "raw_padded": raw})
        ratios[f"{name}_over_{names[0]}"] = rows
    return {"benchmark": "streams", "dtypes": names, "runs": runs, "ratios": ratios}


def plot_streams_dtypes(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    counts = [r["streams"] for r in next(iter(runs.values()))["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [(f"service pooled, {d}", [r["service_pool"]["tokens_per_s"] for r in runs[d]["rows"]]) for d in runs]
    bars += [(f"raw transformers, {d}", [(r["raw_padded"] or {}).get("tokens_per_s", 0) for r in runs[d]["rows"]])
             for d in runs]
    _ingest_bars(ax, counts, bars, "ingest with a full window per stream, by dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ingest_bars(ax: Any, counts: list[int], bars: list[tuple[str, list[float]]], title: str) -> None:
    """Grouped bars of tokens/s per stream count, one bar per (label, values) series."""
    width = 0.8 / len(bars)
    for k, (label, values) in enumerate(bars):
        ax.bar([x + (k - (len(bars) - 1) / 2) * width for x in range(len(counts))], values, width, label=label)
    ax.set_xticks(list(range(len(counts))), [str(c) for c in counts])
    ax.set_xlabel("streams (one log line per record)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_streams(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(
        1, 2 if "decode" in result else 1, figsize=(12 if "decode" in result else 6, 4), squeeze=False
    )
    ax = axes[0][0]
    series = [("service_pool", "service, pooled batch"), ("service_per_stream", "service, one cache per stream"),
              ("raw_padded", "raw transformers, padded batch")]
    _ingest_bars(ax, [r["streams"] for r in rows],
                 [(label, [(r[name] or {}).get("tokens_per_s", 0) for r in rows]) for name, label in series],
                 "ingest with a full window per stream")
    if "decode" in result:
        ax = axes[0][1]
        d = result["decode"]["rows"]
        for name in ("pool_batched", "dynamic_batched", "pool_one_by_one", "sinkcache_one_by_one"):
            ax.plot([r["streams"] for r in d], [r["tokens_per_s"][name] for r in d], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streams B (one token each)")
        ax.set_ylabel("tokens/s")
        ax.set_title("decode step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
