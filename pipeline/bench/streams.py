"""Benchmarks of long and many streams: memory flatness over 1M tokens, and batched multi-stream decoding.

- `memory`: a fresh subprocess streams random tokens through one sink cache and reports its peak RSS and
  current RSS after each checkpoint (e.g. 10K, 100K, 1M tokens). A flat cache keeps the peak ratio
  last/first at about 1.0 (goal <= 1.02). The worker is this module: `python -m pipeline.bench.streams`.
  The peak is the kernel's high-water mark of this process (`VmHWM`), reset after the model is loaded
  (`/proc/self/clear_refs`), so it covers streaming only. `ru_maxrss` would not do: Linux carries it across
  `exec` from the parent, so the worker would report the bench process's own peak.
- `batch`: B independent streams at different lengths advanced one token each, by `model.batch.step_many` in
  one forward pass vs by `SinkModel.step` one stream after the other; tokens/s of both and the largest logit
  difference between them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.batch import step_many
from model.loader import LoadedModel
from model.stepper import SinkModel
from pipeline.bench.common import _Tokens, _vocab, filled_cache, interleaved, tiny_model

TINY = "tiny"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _status_mb(field: str) -> float | None:
    """A `/proc/self/status` memory field in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        return None
    return None


def _peak_mb() -> float:
    """Peak RSS of this process since the last `_reset_peak()` (VmHWM; ru_maxrss where /proc is missing)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stream_memory(lm: LoadedModel, checkpoints: Sequence[int], sinks: int, window: int, chunk: int,
                  report: Callable[[dict[str, Any]], None]) -> None:
    """Stream random tokens until the last checkpoint; call `report` with RSS figures at each checkpoint."""
    runner, tokens = SinkModel(lm), _Tokens(_vocab(lm), seed=3)
    cache = runner.new_cache(sinks, window, max_chunk=chunk)
    load_peak = _peak_mb()
    reset = _reset_peak()  # from here on the peak covers streaming only
    report({"tokens": 0, "peak_rss_mb": _peak_mb(), "rss_mb": _rss_mb(), "seconds": 0.0, "buffered": 0,
            "load_peak_rss_mb": load_peak, "peak_reset_after_load": reset})
    start = time.perf_counter()
    pending = sorted(checkpoints)
    while pending:
        runner.step(cache, tokens(min(chunk, pending[0] - cache.seen)))
        if cache.seen >= pending[0]:
            pending.pop(0)
            report({"tokens": cache.seen, "peak_rss_mb": _peak_mb(), "rss_mb": _rss_mb(),
                    "seconds": time.perf_counter() - start, "buffered": cache.buffered()})


def memory(
    model: str,
    checkpoints: Sequence[int] = (10_000, 100_000, 1_000_000),
    sinks: int = 4,
    window: int = 1020,
    chunk: int = 256,
    timeout_s: float = 1800.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Run the memory worker for `model` (a load_model name, or "tiny") in a subprocess; return its readings."""
    if not checkpoints or min(checkpoints) < 1:
        raise ValueError(f"expected positive checkpoints, got {list(checkpoints)}")
    cmd = [sys.executable, "-m", "pipeline.bench.streams", "--model", model, "--sinks", str(sinks),
           "--window", str(window), "--chunk", str(chunk), "--checkpoints", ",".join(map(str, checkpoints)),
           "--threads", str(threads)]
    readings: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as stderr, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
        watchdog = threading.Timer(timeout_s, proc.kill)  # a stuck worker must not hang the bench
        watchdog.start()
        try:
            for line in proc.stdout:
                readings.append(json.loads(line))
                if progress:
                    progress(readings[-1])
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
        stderr.seek(0)
        err = stderr.read()
    if proc.returncode != 0 or len(readings) != len(checkpoints) + 1:
        raise RuntimeError(f"memory worker {cmd} exited {proc.returncode} with {len(readings)} readings "
                           f"(expected {len(checkpoints) + 1}); stderr tail:\n{err[-2000:]}")
    first, last = readings[1], readings[-1]
    return {"model": model, "threads": threads, "sinks": sinks, "window": window, "chunk": chunk, "readings": readings,
            "peak_ratio_last_over_first": last["peak_rss_mb"] / first["peak_rss_mb"],
            "rss_ratio_last_over_first": last["rss_mb"] / first["rss_mb"], "goal_ratio_max": 1.02}


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
    runner, tokens = SinkModel(lm), _Tokens(_vocab(lm), seed=4)
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

        def reset() -> None:
            for c, s in zip(caches, states):
                c.restore(s)

        reset()
        batched_logits = step_many(lm, caches, ids)
        reset()
        one_logits = torch.stack([runner.step(c, [int(t)])[0] for c, t in zip(caches, ids)])
        diff = float((batched_logits - one_logits).abs().max())
        t = interleaved(lambda: step_many(lm, caches, ids), lambda: [runner.step(c, [int(x)]) for c, x in zip(caches, ids)],
                        steps, repeats, reset)
        rows.append({"streams": size, "lengths": [s.seen for s in states], "batched_tokens_per_s": size / t["a_s"],
                     "sequential_tokens_per_s": size / t["b_s"], "speedup": t["b_s"] / t["a_s"],
                     "cpu_speedup": t["b_cpu_s"] / t["a_cpu_s"], "max_abs_logit_diff": diff})
    return {"benchmark": "batch", "sinks": sinks, "window": window, "steps": steps, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Memory worker: stream into one cache, write one JSON line per checkpoint to stdout."""
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.streams", description=main.__doc__)
    p.add_argument("--model", default=TINY, help="load_model name/path, or 'tiny' for a random 2-layer Llama")
    p.add_argument("--checkpoints", required=True, help="comma-separated token counts, e.g. 10000,100000")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.model == TINY:
        lm = tiny_model()
    else:
        from model.loader import load_model

        lm = load_model(args.model, device="cpu", dtype="float32")
    checkpoints = [int(x) for x in args.checkpoints.split(",")]

    def emit(reading: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reading) + "\n")
        sys.stdout.flush()

    stream_memory(lm, checkpoints, args.sinks, args.window, args.chunk, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
