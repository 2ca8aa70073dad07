"""`memory`: memory flatness of one stream over up to 1M tokens.

- `memory`: a fresh subprocess streams random tokens through one sink cache and reports its peak RSS and
  current RSS after each checkpoint (e.g. 10K, 100K, 1M tokens). A flat cache keeps the peak ratio
  last/first at about 1.0 (goal <= 1.02). The worker is this module: `python -m pipeline.bench.memory`.
  The peak is the kernel's high-water mark of this process (`VmHWM`), reset after the model is loaded
  (`/proc/self/clear_refs`), so it covers streaming only. `ru_maxrss` would not do: Linux carries it across
  `exec` from the parent, so the worker would report the bench process's own peak.
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

from model.loader import LoadedModel
from model.stepper import SinkModel
from pipeline.bench.common import Tokens, tiny_model, vocab_size

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
    runner, tokens = SinkModel(lm), Tokens(vocab_size(lm), seed=3)
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
    cmd = [sys.executable, "-m", "pipeline.bench.memory", "--model", model, "--sinks", str(sinks),
           "--window", str(window), "--chunk", str(chunk), "--checkpoints", ",".join(map(str, checkpoints)),
           "--threads", str(threads)]
    readings: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryFile("w+") as stderr,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True) as proc,  # noqa: S603 - our own worker
    ):
        assert proc.stdout is not None  # stdout=PIPE
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


def main(argv: list[str] | None = None) -> int:
    """Memory worker: stream into one cache, write one JSON line per checkpoint to stdout."""
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.memory", description=main.__doc__)
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
