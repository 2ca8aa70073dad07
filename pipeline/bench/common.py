"""What every benchmark family shares: the machine description, a tiny model, interleaved median timing,
random token ids, a filled sink cache and a `DynamicCache` decoder for the baselines.

Every benchmark (`latency`, `overhead`, `ingest`, `memory`, `batch`, `service` modules of this package) returns
a JSON-able dict; `sinkstream bench` writes it with a plot. Timings are medians over `repeats`, each repeat being
the mean wall time of `steps` calls measured by `torch.utils.benchmark.Timer`; token ids are random (content does
not change the work done). Baselines run on the same model object in the same process, interleaved with the sink
runs (`interleaved`: torch's `Compare` would time one after the other, and load on a shared machine drifts).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import torch
import transformers
from torch.utils import benchmark
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from model.loader import LoadedModel, wrap_model
from model.sink_cache import SinkCache
from model.stepper import SinkModel


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
        info.update(device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
                    dtype_reason=getattr(lm, "dtype_reason", "requested"), model_fingerprint=lm.fingerprint,
                    model_type=lm.arch.model_type, layers=lm.model.config.get_text_config().num_hidden_layers)
    return info


def tiny_model(vocab: int = 512, positions: int = 8192, seed: int = 0) -> LoadedModel:
    """A 2-layer random Llama (hidden 64) for runs that only need the cache mechanics, e.g. 1M-token memory."""
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions)
    torch.manual_seed(seed)
    return wrap_model(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def median_time(
    fn: Callable[[], Any], steps: int, repeats: int, reset: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Median over `repeats` of the mean seconds per call of `steps` calls of `fn` (`reset` runs untimed before each).

    Each repeat is one `torch.utils.benchmark.Timer.timeit(steps)`: `reset` (the Timer's untimed setup), a few
    untimed warm-up calls, `reset` again, then the `steps` timed calls. The Timer synchronizes an accelerator
    (CUDA) before it reads the clock, so asynchronous kernels are counted, and runs at the caller's torch thread
    count (its own default would be 1). The repeats are merged into one `Measurement` for the median and IQR.
    CPU seconds per call (this process, all its threads: less sensitive than wall time to other load on the
    machine) are counted around every call, the warm-up calls included.
    """
    if steps < 1 or repeats < 1:
        raise ValueError(f"expected steps >= 1 and repeats >= 1, got steps={steps}, repeats={repeats}")
    cpu_s, calls = [0.0], [0]

    def call() -> None:
        start = time.process_time()
        fn()
        cpu_s[0] += time.process_time() - start
        calls[0] += 1

    timer = benchmark.Timer(stmt="call()", setup="reset()", num_threads=torch.get_num_threads(),
                            globals={"call": call, "reset": reset or (lambda: None)})
    measurements, cpu = [], []
    for _ in range(repeats):
        cpu_s[0], calls[0] = 0.0, 0
        measurements.append(timer.timeit(steps))
        cpu.append(cpu_s[0] / calls[0])
    merged = benchmark.Measurement.merge(measurements)[0]
    return {"median_s": merged.median, "iqr_s": merged.iqr, "repeats_s": [m.mean for m in measurements],
            "median_cpu_s": statistics.median(cpu), "steps": steps}


def interleaved(a: Callable[[], Any], b: Callable[[], Any], steps: int, repeats: int,
                reset: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time `a` and `b` alternately, one repeat of `steps` calls each at a time, so drift and other load on the
    machine hit both alike (the ratios `overhead`, `ingest` and `batch` report rely on this: timing all of `a`
    and then all of `b` would put a change of load into the ratio). Each repeat is one `median_time` repeat.
    Returns medians over repeats of seconds per call: wall (`a_s`, `b_s`) and this process's CPU time
    (`a_cpu_s`, `b_cpu_s`), plus the per-repeat wall times."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(median_time(a, steps, 1, reset))
        tb.append(median_time(b, steps, 1, reset))
    med = lambda ts, key: statistics.median(t[key] for t in ts)  # noqa: E731
    return {"a_s": med(ta, "median_s"), "b_s": med(tb, "median_s"), "a_cpu_s": med(ta, "median_cpu_s"),
            "b_cpu_s": med(tb, "median_cpu_s"), "a_repeats_s": [t["median_s"] for t in ta],
            "b_repeats_s": [t["median_s"] for t in tb]}


class Tokens:
    """Deterministic random token ids."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (n,), generator=self.gen)


def vocab_size(lm: LoadedModel) -> int:
    return int(lm.model.config.get_text_config().vocab_size)


def filled_cache(
    runner: SinkModel, sinks: int, window: int | None, fill: int, tokens: Tokens, chunk: int = 256
) -> SinkCache:
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
        # A DynamicCache built from a plain decoder config holds DynamicLayers only.
        self.layers = cast(list[DynamicLayer], self.cache.layers)
        self.saved = [(layer.keys, layer.values) for layer in self.layers]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.numel()
        kwargs: dict[str, Any] = {"position_ids": torch.arange(self.past, self.past + n, device=self.lm.device)[None]}
        if n > 1:  # causal mask over past + chunk, as transformers' sdpa path would build it
            q = torch.arange(self.past, self.past + n, device=self.lm.device)[:, None]
            kwargs["attention_mask"] = (torch.arange(self.past + n, device=self.lm.device)[None, :] <= q)[None, None]
        out = self.lm.model(input_ids=ids[None].to(self.lm.device), past_key_values=self.cache, use_cache=True,
                            **kwargs)
        for layer, (k, v) in zip(self.layers, self.saved):  # updates never write in place: roll back
            layer.keys, layer.values = k, v
        return out.logits
