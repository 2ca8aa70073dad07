"""How far bf16 can go past float32 on this CPU (issue 20's 3x goal): a measurement, not a feature.

    PYTHONPATH=. SINKSTREAM_LOGHUB=../shared/data/loghub .venv/bin/python scripts/bf16_ceiling_study.py \
        [--parts forwards,service,fusion] [--rounds 2]

Three variants of SmolLM2-135M, alternating by round in one process, one thread:
`float32`; `bfloat16` as the service runs it (`model.row_stable`: calibrated, batch-invariant linear calls,
what exact resume needs); `bfloat16_onecall`, the same prepacked oneDNN weights called once per layer with all
the rows of the forward (no row blocks, no padding: a row's bits then depend on the other rows of its call, so
no exact resume).

1. forwards: one packed forward (`PoolStepper`, loop attention, as on a CPU) of B streams x 56 tokens over a
   252-token window, B = 8 ... 64 (448 ... 3,584 rows), best tokens/s of the rounds. The service's end-to-end
   figure cannot beat its best forward: this is the ceiling of `bench streams`' ratio.
2. service: the real `Service` loop over the in-memory connectors, 64 streams, one Loghub line per stream a
   poll, window 252 (the workload of `sinkstream bench streams --streams 64 --window 252 --quick`), best of
   the rounds: what exactness costs end to end.
3. fusion: the element-wise parts of a decoder layer at 3,584 rows in bf16 (transformers' RMSNorm, rotary,
   SiLU x up), eager against `torch.compile` (needs a C++ compiler), i.e. what fusing them could save.

Prints a few lines and one JSON document at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from model.loader import LoadedModel, load_model
from model.pool import KVPool
from model.pool_bench import _prefix_ids
from model.pool_step import PoolStepper
from model.row_stable import RowStableLinear, rows_stable
from pipeline.bench.streams import _lines, _service_run
from pipeline.evaluation.datasets import loghub_dir

VARIANTS = ("float32", "bfloat16", "bfloat16_onecall")
WINDOW, CHUNK, TOKENS = 252, 64, 56
STREAMS = (8, 16, 24, 32, 48, 64)


@contextmanager
def one_call(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every `RowStableLinear` makes one kernel call whatever its row count (not batch-invariant)."""
    layers = [m for m in model.modules() if isinstance(m, RowStableLinear)]
    saved = [m.block for m in layers]
    for m in layers:
        m.block = 1 << 30
    try:
        yield
    finally:
        for m, block in zip(layers, saved):
            m.block = block


def _run(models: dict[str, LoadedModel], variant: str, fn: Any) -> Any:
    lm = models["float32" if variant == "float32" else "bfloat16"]
    if variant == "bfloat16_onecall":
        with one_call(lm.model):
            return fn(lm)
    return fn(lm)


def forwards(models: dict[str, LoadedModel], rounds: int) -> dict[str, dict[int, float]]:
    """Best tokens/s of one packed forward of B streams x TOKENS, per variant and B."""
    ids = _prefix_ids(models["float32"], 8000, Path(loghub_dir()))
    best: dict[str, dict[int, float]] = {v: {} for v in VARIANTS}

    def one_round(lm: LoadedModel) -> dict[int, float]:
        pool = KVPool(lm, capacity=max(STREAMS), sinks=4, window=WINDOW, max_chunk=CHUNK)
        stepper = PoolStepper(pool, mode="loop", slice_rows=1024, min_rows=1 if rows_stable(lm.model) else 16)
        slots = [pool.allocate() for _ in range(max(STREAMS))]
        at = 0

        def chunks(count: int, n: int) -> list[list[int]]:
            nonlocal at
            out = [ids[(at + 97 * i) % 7000 : (at + 97 * i) % 7000 + n] for i in range(count)]
            at += n
            return out

        out = {}
        with torch.inference_mode():
            for _ in range(5):  # a history of 320 tokens per stream: every timed query sees a full window
                stepper.step(slots, chunks(len(slots), CHUNK))
            for count in STREAMS:
                start = time.perf_counter()
                stepper.step(slots[:count], chunks(count, TOKENS))
                out[count] = count * TOKENS / (time.perf_counter() - start)
        return out

    for r in range(rounds):
        for variant in VARIANTS:
            got = _run(models, variant, one_round)
            gc.collect()
            for count, tps in got.items():
                best[variant][count] = max(best[variant].get(count, 0.0), tps)
            print(f"forwards round {r}: {variant} " + " ".join(f"{c * TOKENS}:{t:.0f}" for c, t in got.items()),
                  flush=True)
    return best


def service(models: dict[str, LoadedModel], rounds: int, count: int = 64) -> dict[str, list[float]]:
    """Service tokens/s by round, per variant (the workload of `bench streams --window 252`)."""
    streams, history = _lines(models["float32"], count, 4, WINDOW)
    values = {"cache": {"sinks": 4, "window": WINDOW, "chunk": CHUNK}, "kafka": {"max_poll_records": count},
              "checkpoint": {"every_records": 100_000, "every_seconds": 3600},
              "service": {"max_resident_streams": count, "batch_tokens": count * (WINDOW + 4 * CHUNK)}}
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in VARIANTS:
            res = _run(models, variant, lambda lm: _service_run(lm, streams, history, values))
            gc.collect()
            out[variant].append(res["tokens_per_s"])
            print(f"service round {r}: {variant} {res['tokens_per_s']:.0f} tokens/s ({res['tokens']} tokens)",
                  flush=True)
    return out


def fusion(repeats: int = 30) -> dict[str, Any]:
    """ms per call at 3,584 rows, bf16: transformers' element-wise pieces eager and under torch.compile."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    rows, hidden, heads, kv_heads, dim, inter = 3584, 576, 9, 3, 64, 1536
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, rows, hidden, generator=g).to(dt)
    q, k = torch.randn(1, heads, rows, dim, generator=g).to(dt), torch.randn(1, kv_heads, rows, dim, generator=g).to(dt)
    cos, sin = torch.randn(1, rows, dim, generator=g).to(dt), torch.randn(1, rows, dim, generator=g).to(dt)
    gate, up = torch.randn(1, rows, inter, generator=g).to(dt), torch.randn(1, rows, inter, generator=g).to(dt)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dt)

    def act(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(a) * b

    def ms(fn: Any) -> float:
        for _ in range(5):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e3 * (time.perf_counter() - start) / repeats

    out: dict[str, Any] = {}
    with torch.inference_mode():
        out["eager_ms"] = {"rmsnorm": ms(lambda: norm(x)), "rotary": ms(lambda: apply_rotary_pos_emb(q, k, cos, sin)),
                           "silu_mul": ms(lambda: act(gate, up))}
        try:
            start = time.perf_counter()
            cn, cr, ca = (torch.compile(f, dynamic=True) for f in (norm, apply_rotary_pos_emb, act))
            cn(x), cr(q, k, cos, sin), ca(gate, up)
            out["compile_s"] = time.perf_counter() - start
            out["compiled_ms"] = {"rmsnorm": ms(lambda: cn(x)), "rotary": ms(lambda: cr(q, k, cos, sin)),
                                  "silu_mul": ms(lambda: ca(gate, up))}
            out["rmsnorm_bits_equal"] = torch.equal(norm(x), cn(x))
        except Exception as exc:  # noqa: BLE001 - a missing compiler is a result here, not a failure
            out["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
            return out
    e, c = out["eager_ms"], out["compiled_ms"]
    # Per decoder layer: two RMSNorms, one rotary (q and k), one SiLU x up.
    out["saved_ms_per_layer"] = (2 * (e["rmsnorm"] - c["rmsnorm"]) + e["rotary"] - c["rotary"]
                                 + e["silu_mul"] - c["silu_mul"])
    print(f"fusion: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="forwards,service,fusion", help="comma list of forwards, service, fusion")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the alternating variants (default 2)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"forwards", "service", "fusion"}:
        parser.error(f"--parts: expected a comma list of forwards, service, fusion, got {args.parts!r}")
    torch.set_num_threads(1)
    result: dict[str, Any] = {"threads": 1, "window": WINDOW, "tokens_per_stream": TOKENS}
    if parts & {"forwards", "service"}:
        models = {"float32": load_model("smollm2-135m", dtype="float32"),
                  "bfloat16": load_model("smollm2-135m", dtype="bfloat16")}
        if "forwards" in parts:
            best = forwards(models, args.rounds)
            result["forwards_tokens_per_s"] = {v: {str(c * TOKENS): t for c, t in best[v].items()} for v in VARIANTS}
            result["forwards_bf16_vs_fp32"] = {str(c * TOKENS): best["bfloat16"][c] / best["float32"][c]
                                               for c in STREAMS}
            result["forwards_onecall_vs_fp32"] = {str(c * TOKENS): best["bfloat16_onecall"][c] / best["float32"][c]
                                                for c in STREAMS}
        if "service" in parts:
            rounds = service(models, args.rounds)
            result["service_tokens_per_s"] = rounds
            top = {v: max(rounds[v]) for v in VARIANTS}
            result["service_bf16_vs_fp32"] = top["bfloat16"] / top["float32"]
            result["service_onecall_vs_fp32"] = top["bfloat16_onecall"] / top["float32"]
    if "fusion" in parts:
        result["fusion"] = fusion()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
