"""Timing benchmarks of the sink cache: decode latency vs cache size, overhead vs DynamicCache, chunked ingest.

Every function returns a JSON-able dict; `sinkstream bench` writes it with a plot. Timings are medians over
`repeats`, each repeat being the mean wall time of `steps` calls; token ids are random (content does not change
the work done). Baselines run on the same model object in the same process, interleaved with the sink runs.

- `latency` (Xiao et al. 2023, Fig. 10): per-token decode latency at cache sizes C for `sink` (4+(C-4)),
  `window` (0+C), `dense` (C keys, no eviction) and `recompute` (a fresh forward over the last C tokens).
- `overhead`: one `SinkModel.step` decode vs one model forward into a plain transformers `DynamicCache`
  holding the same number of keys.
- `ingest`: tokens/s of chunked feeding at a full S+W cache vs a raw forward of the same chunk against a
  `DynamicCache` of S+W-1 past tokens (the same attention span).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from model.loader import LoadedModel, wrap_model
from model.sink_cache import SinkCache
from model.stepper import SinkModel

LATENCY_POLICIES = ("sink", "window", "dense", "recompute")


def machine(lm: LoadedModel | None = None) -> dict[str, Any]:
    """CPU model, cores, torch threads and versions (plus the model's device/dtype/fingerprint when given)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Other work on the machine skews timings: the 1/5/15-minute load averages when this was taken.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if lm is not None:
        info.update(device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."), model_fingerprint=lm.fingerprint,
                    model_type=lm.arch.model_type, layers=lm.model.config.get_text_config().num_hidden_layers)
    return info


def tiny_model(vocab: int = 512, positions: int = 8192, seed: int = 0) -> LoadedModel:
    """A 2-layer random Llama (hidden 64) for runs that only need the cache mechanics, e.g. 1M-token memory."""
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions)
    torch.manual_seed(seed)
    return wrap_model(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def median_time(fn: Callable[[], Any], steps: int, repeats: int, reset: Callable[[], None] | None = None) -> dict[str, Any]:
    """Median over `repeats` of the mean seconds per call of `steps` calls of `fn` (`reset` runs untimed before each)."""
    if steps < 1 or repeats < 1:
        raise ValueError(f"expected steps >= 1 and repeats >= 1, got steps={steps}, repeats={repeats}")
    per_repeat, cpu = [], []
    for _ in range(repeats):
        if reset is not None:
            reset()
        cpu_start = time.process_time()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        per_repeat.append((time.perf_counter() - start) / steps)
        cpu.append((time.process_time() - cpu_start) / steps)
    # CPU seconds of this process (all its threads): less sensitive than wall time to other load on the machine.
    return {"median_s": statistics.median(per_repeat), "repeats_s": per_repeat, "median_cpu_s": statistics.median(cpu),
            "steps": steps}


def interleaved(a: Callable[[], Any], b: Callable[[], Any], steps: int, repeats: int,
                reset: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time `a` and `b` alternately, one repeat of `steps` calls each at a time, so drift and other load on the
    machine hit both alike. Returns medians over repeats of seconds per call: wall (`a_s`, `b_s`) and this
    process's CPU time (`a_cpu_s`, `b_cpu_s`), plus the per-repeat wall times."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(median_time(a, steps, 1, reset))
        tb.append(median_time(b, steps, 1, reset))
    med = lambda ts, key: statistics.median(t[key] for t in ts)  # noqa: E731
    return {"a_s": med(ta, "median_s"), "b_s": med(tb, "median_s"), "a_cpu_s": med(ta, "median_cpu_s"),
            "b_cpu_s": med(tb, "median_cpu_s"), "a_repeats_s": [t["median_s"] for t in ta], "b_repeats_s": [t["median_s"] for t in tb]}


class _Tokens:
    """Deterministic random token ids."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (n,), generator=self.gen)


def _vocab(lm: LoadedModel) -> int:
    return int(lm.model.config.get_text_config().vocab_size)


def filled_cache(runner: SinkModel, sinks: int, window: int | None, fill: int, tokens: _Tokens, chunk: int = 256) -> SinkCache:
    """A SinkCache that has already consumed `fill` random tokens."""
    cache = runner.new_cache(sinks, window, max_chunk=chunk)
    if fill:
        runner.step(cache, tokens(fill))
    return cache


class DynamicDecoder:
    """The baseline: a plain transformers `DynamicCache` holding `prefix`; `forward(ids)` runs a chunk after
    the prefix (causal, positions continuing it) and then forgets it again, so every call sees the same keys."""

    def __init__(self, lm: LoadedModel, prefix: torch.Tensor):
        self.lm, self.past = lm, int(prefix.numel())
        self.cache = DynamicCache(config=lm.model.config)
        with torch.inference_mode():
            lm.model(input_ids=prefix.view(1, -1).to(lm.device), past_key_values=self.cache, use_cache=True)
        self.saved = [(layer.keys, layer.values) for layer in self.cache.layers]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.numel()
        kwargs: dict[str, Any] = {"position_ids": torch.arange(self.past, self.past + n, device=self.lm.device)[None]}
        if n > 1:  # causal mask over past + chunk, as transformers' sdpa path would build it
            q = torch.arange(self.past, self.past + n, device=self.lm.device)[:, None]
            kwargs["attention_mask"] = (torch.arange(self.past + n, device=self.lm.device)[None, :] <= q)[None, None]
        out = self.lm.model(input_ids=ids[None].to(self.lm.device), past_key_values=self.cache, use_cache=True, **kwargs)
        for layer, (k, v) in zip(self.cache.layers, self.saved):  # updates never write in place: roll back
            layer.keys, layer.values = k, v
        return out.logits


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
    runner, tokens = SinkModel(lm), _Tokens(_vocab(lm))
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
                reset = (lambda c=cache, st=state: c.restore(st)) if policy == "dense" else None
                t = median_time(lambda c=cache: runner.step(c, one), steps, repeats, reset)
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


def overhead(
    lm: LoadedModel,
    keys: Sequence[int] = (256, 1024, 4096),
    sinks: int = 4,
    steps: int = 16,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decode-step time of the sink cache vs a plain DynamicCache over the same number of keys (goal <= 1.05x)."""
    runner, tokens = SinkModel(lm), _Tokens(_vocab(lm), seed=1)
    rows = []
    for n in keys:
        if progress:
            progress(f"overhead {n} keys")
        # After eviction a sink cache of S + (n - S) makes every step attend to exactly n keys.
        cache = filled_cache(runner, sinks, n - sinks, n + 64, tokens)
        dyn = DynamicDecoder(lm, tokens(n - 1))
        one = tokens(1)
        t = interleaved(lambda: runner.step(cache, one), lambda: dyn.forward(one), steps, repeats)
        rows.append({"keys": n, "sink_ms": 1000 * t["a_s"], "dynamic_ms": 1000 * t["b_s"], "ratio": t["a_s"] / t["b_s"],
                     "sink_cpu_ms": 1000 * t["a_cpu_s"], "dynamic_cpu_ms": 1000 * t["b_cpu_s"], "cpu_ratio": t["a_cpu_s"] / t["b_cpu_s"],
                     "sink_repeats_ms": [1000 * x for x in t["a_repeats_s"]], "dynamic_repeats_ms": [1000 * x for x in t["b_repeats_s"]]})
        del cache, dyn
    return {"benchmark": "overhead", "sinks": sinks, "steps": steps, "repeats": repeats, "rows": rows, "goal_ratio_max": 1.05}


def ingest(
    lm: LoadedModel,
    chunks: Sequence[int] = (1, 16, 64, 256, 512),
    sinks: int = 4,
    window: int = 1020,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s of chunked feeding into a full sink cache vs a raw forward at the same span (goal >= 0.9x)."""
    runner, tokens = SinkModel(lm), _Tokens(_vocab(lm), seed=2)
    span = sinks + window - 1  # past keys every chunk sees in a full cache
    dyn = DynamicDecoder(lm, tokens(span))
    rows = []
    for chunk in chunks:
        if progress:
            progress(f"ingest chunk {chunk}")
        forwards = max(2, min(32, 1024 // chunk))
        cache = filled_cache(runner, sinks, window, sinks + window + chunk, tokens, chunk=max(256, chunk))
        ids = tokens(chunk)
        t = interleaved(lambda: runner.step(cache, ids), lambda: dyn.forward(ids), forwards, repeats)
        rows.append({"chunk": chunk, "forwards": forwards, "sink_tokens_per_s": chunk / t["a_s"], "raw_tokens_per_s": chunk / t["b_s"],
                     "ratio": t["b_s"] / t["a_s"], "cpu_ratio": t["b_cpu_s"] / t["a_cpu_s"]})
        del cache
    return {"benchmark": "ingest", "sinks": sinks, "window": window, "span": span + 1, "repeats": repeats,
            "rows": rows, "goal_ratio_min": 0.9}
