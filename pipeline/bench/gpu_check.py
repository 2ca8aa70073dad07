"""The GPU check of issue 9 item 5: every CUDA claim of sinkstream measured in one run, under 8 minutes on one GPU.

Run it through `bash scripts/gpu-check.sh OUTDIR` (that script documents the setup and the device-machine
recipe); it calls `python -m pipeline.bench.gpu_check --out OUTDIR`. Six parts, each timed and guarded (a
part that raises is recorded as failed and the others still run); the exit code is 1 if any part failed:

- `cuda_tests`: `pytest tests/model/test_cuda.py` (pooled step and SinkCache in fp32/bf16/fp16, FlexAttention
  vs loop mode, batch-composition independence, snapshot dtype refusal). Needs a CUDA device.
- `oracle_fp32`: the attention_sinks peer oracle (`../shared/oracle`, S=4 W=128) in fp32 on the device, with
  the one-stream SinkCache path at chunk 1 (as `tests/model/test_real_model.py`) and the pooled step at
  chunk 64: mean |dNLL| < 1e-4 and max < 1e-3. Needs the real weights (`sinkstream model prepare`).
- `sink_vs_dense`: before any eviction sink attention is dense attention; a stream of S + W tokens through
  the pooled step against one dense sdpa forward, in fp32 (max |dNLL| <= 1e-3) and in the low-precision dtype,
  where the sink path must be no further from the fp32 dense result than the dense path in the same dtype
  (mean and max |dNLL| within 2x + a small floor). Real weights if present, else SmolLM2's architecture with
  random weights.
- `many_streams`: `model.pool_bench.decode` and `ingest` (need Loghub lines and SmolLM2's tokenizer) and a
  packed-forward throughput run: B streams (256) with a full window each, one Loghub-sized chunk per stream
  per forward through the pooled batched path, tokens/s (issue goal: >= 100,000 tokens/s on an H200-class
  GPU in bf16), for the default attention mode and FlexAttention.
- `checkpoint_cost`: `KVPool.slot_tensors` + `serialize_slot` of a full slot: ms and MB.
- `perplexity_4m`: one stream of 4M tokens (Canterbury prose, else Loghub, repeated) through the pooled
  step in the low-precision dtype: perplexity and peak CUDA memory (`torch.cuda.max_memory_allocated`) per
  100K-token block; flat = the last full pass over the text within 5% of the first, block peaks within 1%.
  Needs the real weights; a time budget (`--ppl-budget-s`) keeps the whole script inside 8 minutes.

`--quick` runs everything on a tiny random Llama (SmolLM2's tokenizer where present) with small sizes, in
seconds on a CPU: `--device cpu --quick` is what `tests/bench/test_gpu_check.py` runs. Speed figures from
random weights are valid (weights do not change the arithmetic); exactness is checked against a reference
computed from the same weights either way.

Outputs: OUTDIR/gpu_check.json (`GpuCheckSummary`) and OUTDIR/gpu_check.md, plus the CUDA tests' log and
JUnit XML. Only `model/` and torch/transformers are imported (no pipeline settings, Kafka or Redis), so it
runs on a bare GPU host with a handful of wheels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import structlog
import torch
from pydantic import BaseModel, Field

from model.pool_step import Mode
from model.tokens import encode_text
from pipeline.evaluation.tables import markdown_table

log = structlog.get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("cuda_tests", "oracle_fp32", "sink_vs_dense", "many_streams", "checkpoint_cost", "perplexity_4m")
GOAL_TOKENS_PER_S = 100_000
# SmolLM2-135M's architecture (the default model), for random weights when the real ones are absent.
SMOLLM2_CONFIG: dict[str, Any] = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_CONFIG: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


Status = Literal["ok", "skipped", "failed"]


class Skip(Exception):
    """A part cannot run here; the message says why (recorded as status `skipped`)."""


class PartResult(BaseModel):
    """One part of the check: status, why, how long, and its figures."""

    name: str
    status: Status
    reason: str
    seconds: float
    checks: dict[str, bool] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class GpuCheckSummary(BaseModel):
    """The whole run: environment, options, and one `PartResult` per part (all of `PARTS`, in order)."""

    started: str
    seconds: float
    passed: bool
    environment: dict[str, Any]
    options: dict[str, Any]
    parts: list[PartResult]


# ---- configuration -----------------------------------------------------------------------------------------


class Config:
    """Sizes and paths of a run; `--quick` shrinks every size so a CPU finishes in seconds."""

    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out)
        self.quick = args.quick
        self.device = torch.device(_device(args.device))
        self.dtype = getattr(torch, args.dtype) if args.dtype != "auto" else _low_dtype(self.device)
        home = Path(os.environ.get("SINKSTREAM_HOME") or Path.home() / ".cache" / "sinkstream").expanduser()
        self.model_dir = Path(args.model_dir) if args.model_dir else home / "models" / "smollm2-135m"
        self.real = (not self.quick) and (self.model_dir / "config.json").is_file() and any(
            self.model_dir.glob("*.safetensors"))
        tok = Path(args.tokenizer) if args.tokenizer else self.model_dir
        self.tokenizer_dir = tok if (tok / "tokenizer.json").is_file() else None
        default_loghub = ROOT.parent / "shared" / "data" / "loghub"
        self.loghub = Path(args.loghub or os.environ.get("SINKSTREAM_LOGHUB") or default_loghub)
        self.oracle = Path(args.oracle or ROOT.parent / "shared" / "oracle")
        self.canterbury = home / "data" / "canterbury"
        self.streams = args.streams or (8 if self.quick else 256)
        self.sinks = 4
        self.window = 60 if self.quick else 1020
        self.max_chunk = 16 if self.quick else 64
        self.decode_sizes = (1, 4) if self.quick else (1, 16, 64, 256)
        self.ingest_counts = (1, 4) if self.quick else (1, 16, 64, 256)
        self.repeats = 1 if self.quick else 3
        self.ppl_tokens = args.ppl_tokens
        self.ppl_block = args.ppl_block
        self.ppl_chunk = args.ppl_chunk
        self.ppl_budget_s = args.ppl_budget_s
        self.tests_timeout_s = args.tests_timeout_s

    def options(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v) for k, v in vars(self).items()}


def _device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: expected a CUDA device, but torch.cuda.is_available() is False")
    return requested


def _low_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _environment(cfg: Config) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": str(cfg.device), "dtype": str(cfg.dtype), "weights": "real" if cfg.real else "random",
        "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(),
    }
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


# ---- models and tokens -------------------------------------------------------------------------------------


def _tokenizer(cfg: Config):
    if cfg.tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer_dir)


def random_lm(cfg: Config, dtype: torch.dtype, seed: int = 0):
    """SmolLM2's architecture (tiny under --quick) with random weights, on the device in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.loader import wrap_model

    kwargs = dict(TINY_CONFIG, vocab_size=SMOLLM2_CONFIG["vocab_size"]) if cfg.quick else SMOLLM2_CONFIG
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(LlamaConfig(**kwargs))
    # The tiny model is sharpened as tests.helpers.models does, so that attention spans change its NLLs. SmolLM2's
    # 30 layers are left at their init: sharpening them does not make predictions less uniform (entropy 10.69 nats
    # at x1 and x3, measured) but amplifies bf16 rounding chaotically (mean |dNLL| vs fp32 0.005 at x1, 0.09 at x3),
    # which would make the bf16 comparison noise. Speed does not depend on the values.
    if cfg.quick:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(3.0)
    return wrap_model(model.to(device=cfg.device, dtype=dtype), _tokenizer(cfg))


def load_lm(cfg: Config, dtype: torch.dtype):
    """The real default model when its converted weights exist (and not --quick), else `random_lm`."""
    if cfg.real:
        from model.loader import load_model

        return load_model(str(cfg.model_dir), device=cfg.device.type, dtype=str(dtype).removeprefix("torch."))
    return random_lm(cfg, dtype)


def _random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _text_ids(lm, cfg: Config, n: int, seed: int = 0) -> tuple[list[int], str]:
    """The first n token ids of the Canterbury prose (else the Loghub samples) when a tokenizer exists, else
    random ids."""
    vocab = lm.model.get_output_embeddings().out_features
    files = sorted(cfg.canterbury.glob("*.txt")) or sorted(cfg.loghub.glob("*.log"))
    if lm.tokenizer is None or not files:
        return _random_ids(n, vocab, seed), "random ids"
    ids: list[int] = []
    for f in files:
        ids += encode_text(lm.tokenizer, f.read_text(errors="replace")[: 8 * n])
        if len(ids) >= n:
            return ids[:n], f"{f.name} ({f.parent.name})"
    return (ids * (n // max(1, len(ids)) + 1))[:n], f"{files[0].parent.name}, repeated"


@contextmanager
def plain_sdpa(lm):
    """Run the model with transformers' own sdpa attention (the dense reference), then switch back."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


def _checks_reason(checks: dict[str, bool], ok: str) -> tuple[Status, str]:
    bad = [name for name, passed in checks.items() if not passed]
    if bad:
        return "failed", "checks failed: " + ", ".join(bad)
    return "ok", ok


# ---- parts -------------------------------------------------------------------------------------------------


def part_cuda_tests(cfg: Config) -> dict[str, Any]:
    """pytest tests/model/test_cuda.py in a subprocess (no conftest: a bare GPU host lacks the stack's deps)."""
    if cfg.device.type != "cuda":
        raise Skip(f"device is {cfg.device.type}: tests/model/test_cuda.py needs a CUDA device (pytest skips its "
                   f"CUDA tests here with that reason)")
    xml = cfg.out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/model/test_cuda.py", "-q", "-rs", "--noconftest",
           "-p", "no:cacheprovider", f"--junitxml={xml}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,  # noqa: S603 - argv built here
                          timeout=cfg.tests_timeout_s, check=False)
    (cfg.out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in counts}
    checks = {"pytest_exit_0": proc.returncode == 0, "tests_ran": counts["tests"] > 0,
              "none_skipped_on_cuda": counts["skipped"] == 0}
    return {"checks": checks, "metrics": dict(counts, returncode=proc.returncode,
                                               seconds=round(time.perf_counter() - start, 1),
                                               tail=(proc.stdout + proc.stderr)[-1500:])}


def part_oracle(cfg: Config) -> dict[str, Any]:
    """The attention_sinks oracle (S=4, W=128) in fp32 on the device: SinkCache at chunk 1, pool at chunk 64."""
    if cfg.quick:
        raise Skip("--quick: the oracle comparison needs the real SmolLM2 weights (tests/model/test_real_model.py "
                   "runs it on CPU)")
    if not cfg.real:
        raise Skip(f"real weights absent: no converted model at {cfg.model_dir} (run `sinkstream model prepare`)")
    ids_file, ref_file = cfg.oracle / "gpl3_smollm2_ids.json", cfg.oracle / "gpl3_attention_sinks_s4_w128.json"
    if not (ids_file.is_file() and ref_file.is_file()):
        raise Skip(f"oracle files absent: expected {ids_file.name} and {ref_file.name} in {cfg.oracle} (--oracle)")
    from model.policies import score_ids
    from model.pool import KVPool
    from model.pool_step import PoolStepper

    ids = json.loads(ids_file.read_text())
    ref = torch.tensor(json.loads(ref_file.read_text())["nll"])
    lm = load_lm(cfg, torch.float32)
    sink = torch.tensor([nll for _, _, nll in score_ids(lm, ids, "sink", 4, 128, chunk=1)])
    pool = KVPool(lm, 1, 4, 128, max_chunk=64)
    stepper = PoolStepper(pool)
    pooled = stepper.feed(pool.allocate(), ids).nll[1:]
    d_sink, d_pool = (sink - ref).abs(), (pooled - ref).abs()
    metrics = {"tokens": len(ids),
               "sinkcache_chunk1_mean": float(d_sink.mean()), "sinkcache_chunk1_max": float(d_sink.max()),
               "pool_chunk64_mean": float(d_pool.mean()), "pool_chunk64_max": float(d_pool.max())}
    checks = {"sinkcache_mean_lt_1e-4": metrics["sinkcache_chunk1_mean"] < 1e-4,
              "sinkcache_max_lt_1e-3": metrics["sinkcache_chunk1_max"] < 1e-3,
              "pool_mean_lt_1e-4": metrics["pool_chunk64_mean"] < 1e-4,
              "pool_max_lt_1e-3": metrics["pool_chunk64_max"] < 1e-3}
    del lm, stepper, pool
    return {"checks": checks, "metrics": metrics}


def _nll_rows(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(T, vocab) logits predicting ids[1:] -> (T-1,) NLL, float32 on CPU."""
    target = torch.tensor(ids[1:], device=logits.device)
    return -torch.log_softmax(logits[:-1].float(), -1).gather(1, target[:, None])[:, 0].cpu()


@torch.inference_mode()
def _sink_and_dense(lm, ids: list[int], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled sink NLL, dense sdpa NLL) of one stream of len(ids) <= S + W tokens."""
    from model.pool import KVPool
    from model.pool_step import PoolStepper

    pool = KVPool(lm, 1, cfg.sinks, cfg.window, max_chunk=cfg.max_chunk)
    sink = PoolStepper(pool).feed(pool.allocate(), ids).nll[1:]
    with plain_sdpa(lm):
        logits = lm.model(input_ids=torch.tensor(ids, device=cfg.device)[None]).logits[0]  # (T, vocab)
    return sink, _nll_rows(logits, ids)


def part_sink_vs_dense(cfg: Config) -> dict[str, Any]:
    """Sink vs dense logits before eviction (S + W tokens): exact in fp32, as close as dense itself in low precision."""
    lm32 = load_lm(cfg, torch.float32)
    ids, source = _text_ids(lm32, cfg, cfg.sinks + cfg.window)
    sink32, dense32 = _sink_and_dense(lm32, ids, cfg)
    del lm32
    low = load_lm(cfg, cfg.dtype)
    sink_lo, dense_lo = _sink_and_dense(low, ids, cfg)
    del low
    d = lambda a, b: (a - b).abs()  # noqa: E731
    fp32 = d(sink32, dense32)
    sink_err, dense_err = d(sink_lo, dense32), d(dense_lo, dense32)
    metrics: dict[str, Any] = {
        "tokens": len(ids), "text": source, "weights": "real" if cfg.real else "random", "dtype": str(cfg.dtype),
        "fp32_sink_vs_dense_max": float(fp32.max()), "fp32_sink_vs_dense_mean": float(fp32.mean()),
        "low_sink_vs_dense_max": float(d(sink_lo, dense_lo).max()),
        "low_sink_vs_fp32_mean": float(sink_err.mean()), "low_sink_vs_fp32_max": float(sink_err.max()),
        "low_dense_vs_fp32_mean": float(dense_err.mean()), "low_dense_vs_fp32_max": float(dense_err.max()),
        "mean_nll_fp32": float(dense32.mean()),
    }
    checks = {
        "finite": bool(torch.isfinite(sink_lo).all() and torch.isfinite(dense_lo).all()),
        "fp32_exact_max_le_1e-3": metrics["fp32_sink_vs_dense_max"] <= 1e-3,
        "low_mean_within_2x_dense": metrics["low_sink_vs_fp32_mean"] <= 2 * metrics["low_dense_vs_fp32_mean"] + 1e-3,
        "low_max_within_2x_dense": metrics["low_sink_vs_fp32_max"] <= 2 * metrics["low_dense_vs_fp32_max"] + 1e-2,
    }
    return {"checks": checks, "metrics": metrics}


def _loghub_chunks(lm, cfg: Config, count: int, seed: int) -> tuple[list[list[int]], str]:
    """`count` chunks: Loghub lines (cut to max_chunk) when Loghub and a tokenizer exist, else random ids of
    Loghub's length spread (20-40 tokens)."""
    from model import pool_bench

    if lm.tokenizer is not None and cfg.loghub.is_dir() and any(cfg.loghub.glob("*.log")):
        return pool_bench.loghub_lines(lm, count, cfg.max_chunk, cfg.loghub), "loghub lines"
    vocab = lm.model.get_output_embeddings().out_features
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 41, (count,), generator=g).clamp(max=cfg.max_chunk).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], "random ids, 20-40 tokens"


@torch.inference_mode()
def packed_throughput(lm, cfg: Config, mode: Mode, rounds: int) -> dict[str, Any]:
    """B streams, each with a full window of history (one prefix, forked), then `rounds` packed forwards that
    feed every stream one chunk: tokens/s of the batched pooled path (median of the timed rounds)."""
    from model.pool import KVPool, bytes_per_slot
    from model.pool_step import PoolStepper

    B = cfg.streams
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(cfg.device)
    pool = KVPool(lm, B, cfg.sinks, cfg.window, max_chunk=cfg.max_chunk)
    stepper = PoolStepper(pool, mode=mode, slice_rows=4096)
    first = pool.allocate()
    vocab = lm.model.get_output_embeddings().out_features
    stepper.feed(first, _random_ids(cfg.sinks + cfg.window, vocab, seed=1))
    slots = [first] + [pool.fork(first) for _ in range(B - 1)]
    times, tokens, decode_times = [], [], []
    chunks, source = _loghub_chunks(lm, cfg, B, seed=0)
    for r in range(rounds + 2):  # two warm-up rounds (compilation, allocator)
        _sync(cfg.device)
        start = time.perf_counter()
        stepper.step(slots, chunks)
        _sync(cfg.device)
        if r >= 2:
            times.append(time.perf_counter() - start)
            tokens.append(sum(len(c) for c in chunks))
    for r in range(rounds + 1):  # decode: one token per stream
        _sync(cfg.device)
        start = time.perf_counter()
        stepper.step(slots, [[t] for t in _random_ids(B, vocab, seed=100 + r)])
        _sync(cfg.device)
        if r:
            decode_times.append(time.perf_counter() - start)
    per_round = statistics.median(times)
    out = {"mode": mode, "streams": B, "rounds": rounds, "chunk_tokens": source,
           "tokens_per_forward": statistics.median(tokens), "seconds_per_forward": per_round,
           "tokens_per_s": statistics.median(tokens) / per_round,
           "decode_tokens_per_s": B / statistics.median(decode_times),
           "bytes_per_slot": bytes_per_slot(lm, cfg.sinks, cfg.window, pool.max_chunk),
           "keys_per_stream": cfg.sinks + cfg.window}
    if cfg.device.type == "cuda":
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated(cfg.device) / 2**30, 2)
    del stepper, pool
    return out


def part_many_streams(cfg: Config) -> dict[str, Any]:
    """pool_bench.decode / ingest and the packed-forward throughput of B streams in the low-precision dtype."""
    lm = load_lm(cfg, cfg.dtype)
    metrics: dict[str, Any] = {"weights": "real" if cfg.real else "random", "dtype": str(cfg.dtype)}
    checks: dict[str, bool] = {}
    notes = []
    rounds = 3 if cfg.quick else 5
    metrics["packed"] = packed_throughput(lm, cfg, "auto", rounds)
    packed_tps = metrics["packed"]["tokens_per_s"]
    checks["packed_ran"] = packed_tps > 0
    try:
        metrics["packed_flex"] = packed_throughput(lm, cfg, "flex", rounds)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check; FlexAttention is the opt-in CUDA path
        metrics["packed_flex"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        checks["flex_ran"] = False
    gpu = metrics["goal_gpu"] = torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else None
    best = max(packed_tps, metrics["packed_flex"].get("tokens_per_s", 0.0))
    metrics["best_tokens_per_s"] = best
    metrics["goal_tokens_per_s"] = GOAL_TOKENS_PER_S
    if gpu and any(name in gpu for name in ("H100", "H200", "B200", "GH200")) and not cfg.quick:
        checks[f"goal_{GOAL_TOKENS_PER_S}_tokens_per_s"] = best >= GOAL_TOKENS_PER_S
    else:
        notes.append(f"goal of {GOAL_TOKENS_PER_S} tokens/s applies to an H200-class GPU, "
                     f"not to {gpu or cfg.device.type}")
    if lm.tokenizer is None or not any(cfg.loghub.glob("*.log")):
        notes.append(f"pool_bench decode/ingest skipped: they need Loghub lines ({cfg.loghub}) and SmolLM2's "
                     f"tokenizer ({cfg.tokenizer_dir or cfg.model_dir})")
    else:
        from model import pool_bench

        seq = 4 if cfg.quick else 64
        metrics["decode"] = pool_bench.decode(lm, cfg.loghub, cfg.decode_sizes, cfg.sinks, cfg.window,
                                              cfg.max_chunk, repeats=cfg.repeats, sequential_max=seq)
        metrics["ingest"] = pool_bench.ingest(lm, cfg.loghub, cfg.ingest_counts, cfg.sinks, cfg.window,
                                              cfg.max_chunk, repeats=cfg.repeats, sequential_max=seq)
        checks["decode_ran"] = len(metrics["decode"]["rows"]) == len(cfg.decode_sizes)
        checks["ingest_ran"] = len(metrics["ingest"]["rows"]) == len(cfg.ingest_counts)
    metrics["notes"] = notes
    return {"checks": checks, "metrics": metrics}


def part_checkpoint_cost(cfg: Config) -> dict[str, Any]:
    """slot_tensors (model thread) and serialize_slot (writer thread) of one full slot: ms and MB."""
    from model.pool import KVPool, serialize_slot
    from model.pool_step import PoolStepper

    lm = load_lm(cfg, cfg.dtype)
    pool = KVPool(lm, 2, cfg.sinks, cfg.window, max_chunk=cfg.max_chunk)
    slot = pool.allocate()
    vocab = lm.model.get_output_embeddings().out_features
    PoolStepper(pool).feed(slot, _random_ids(cfg.sinks + cfg.window + cfg.max_chunk, vocab, seed=2))
    take, ser = [], []
    blob = b""
    for _ in range(2 if cfg.quick else 5):
        _sync(cfg.device)
        start = time.perf_counter()
        state = pool.slot_tensors(slot)
        _sync(cfg.device)
        take.append(time.perf_counter() - start)
        start = time.perf_counter()
        blob = serialize_slot(lm, state, extra={"offset": 1}, tensors={"last": torch.zeros(vocab)})
        ser.append(time.perf_counter() - start)
    tensor_bytes = sum(k.nbytes + v.nbytes for k, v in state.layers)
    twin, _, _ = pool.restore(blob)
    again = pool.slot_tensors(twin)
    metrics = {"dtype": str(cfg.dtype), "keys_per_layer": state.layers[0][0].shape[2],
               "slot_tensors_ms": 1e3 * statistics.median(take), "serialize_ms": 1e3 * statistics.median(ser),
               "snapshot_mb": len(blob) / 2**20, "tensor_mb": tensor_bytes / 2**20}
    checks = {"full_slot": state.layers[0][0].shape[2] == cfg.sinks + cfg.window - 1,
              "blob_holds_the_tensors": len(blob) >= tensor_bytes,
              "restores_bit_exact": all(torch.equal(x, y) for a, b in zip(state.layers, again.layers)
                                        for x, y in zip(a, b))}
    return {"checks": checks, "metrics": metrics}


def _ppl_text(cfg: Config, tokenizer) -> tuple[list[int], str]:
    """Token ids of the Canterbury prose (else the Loghub samples), one pass of the text."""
    files = sorted(cfg.canterbury.glob("*.txt")) or sorted(cfg.loghub.glob("*.log"))
    if not files:
        raise Skip(f"no text: expected Canterbury texts in {cfg.canterbury} or Loghub samples in {cfg.loghub}")
    text = "\n".join(f.read_text(errors="replace") for f in files)
    return encode_text(tokenizer, text), f"{files[0].parent.name} ({len(files)} files)"


@torch.inference_mode()
def streaming_perplexity(lm, ids: list[int], total: int, block: int, chunk: int, sinks: int, window: int,
                         budget_s: float) -> dict[str, Any]:
    """Feed `total` tokens (ids repeated) through one pool slot in chunks; perplexity and peak memory per block.

    Stops early when `budget_s` runs out (`complete` false). Pure measurement: checks are the caller's.
    """
    from model.pool import KVPool
    from model.pool_step import PoolStepper

    dev = lm.device
    pool = KVPool(lm, 1, sinks, window, max_chunk=chunk)
    stepper = PoolStepper(pool, slice_rows=chunk)
    slot = pool.allocate()
    period = len(ids)
    blocks: list[dict[str, Any]] = []
    nll_sum, count, fed, prev = 0.0, 0, 0, None
    pass_sum = [0.0] * (total // period + 1)
    pass_n = [0] * len(pass_sum)
    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    while fed < total:
        n = min(chunk, total - fed, block - fed % block)  # chunks never straddle a block
        piece = [ids[(fed + i) % period] for i in range(n)]
        (res,) = stepper.step([slot], [piece], [prev])
        prev = res.last_logits
        nll = res.nll if fed else res.nll[1:]  # the very first token has no prediction
        nll_sum += float(nll.double().sum())
        count += nll.numel()
        p = fed // period
        if (fed + n - 1) // period == p:
            pass_sum[p] += float(nll.double().sum())
            pass_n[p] += nll.numel()
        else:  # the chunk crosses a pass boundary: split it
            cut = period - fed % period
            head = res.nll[:cut] if fed else res.nll[1:cut]
            pass_sum[p] += float(head.double().sum())
            pass_n[p] += head.numel()
            pass_sum[p + 1] += float(res.nll[cut:].double().sum())
            pass_n[p + 1] += res.nll.numel() - cut
        fed += n
        if fed % block == 0 or fed == total:
            peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
            blocks.append({"end": fed, "tokens": count, "perplexity": math.exp(nll_sum / count),
                           "peak_cuda_bytes": peak, "seconds": round(time.perf_counter() - start, 2)})
            nll_sum, count = 0.0, 0
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            if time.perf_counter() - start > budget_s and fed < total:
                break
    elapsed = time.perf_counter() - start
    full = [k for k in range(len(pass_n)) if (k + 1) * period <= fed]
    passes = [{"pass": k, "perplexity": math.exp(pass_sum[k] / pass_n[k])} for k in full]
    return {"tokens_fed": fed, "complete": fed >= total, "seconds": elapsed, "tokens_per_s": fed / elapsed,
            "period_tokens": period, "blocks": blocks, "passes": passes, "final_base": pool.base[slot]}


def flatness(run: dict[str, Any]) -> tuple[dict[str, bool], dict[str, Any]]:
    """Checks of a streaming run: last full pass within 5% of the first; block peaks within 1% (CUDA)."""
    checks, metrics = {}, {}
    blocks = [b for b in run["blocks"] if b["tokens"] > 0]
    ppl = [b["perplexity"] for b in blocks]
    checks["finite"] = all(math.isfinite(p) for p in ppl)
    metrics["block_ppl_min_max"] = [min(ppl), max(ppl)] if ppl else None
    if len(run["passes"]) >= 2:
        first, last = run["passes"][0]["perplexity"], run["passes"][-1]["perplexity"]
        metrics["last_over_first_pass"] = last / first
        checks["flat_last_pass_within_5pct"] = abs(last / first - 1) <= 0.05
    else:
        checks["two_full_passes"] = False
    peaks = [b["peak_cuda_bytes"] for b in blocks[1:] if b["peak_cuda_bytes"] is not None]
    if peaks:
        metrics["peak_cuda_mb_min_max"] = [min(peaks) / 2**20, max(peaks) / 2**20]
        checks["memory_constant_within_1pct"] = (max(peaks) - min(peaks)) <= 0.01 * max(peaks)
    checks["complete"] = run["complete"]
    return checks, metrics


def part_perplexity(cfg: Config) -> dict[str, Any]:
    """4M tokens of one stream through the pooled step of the real default model (see `streaming_perplexity`)."""
    if cfg.quick:
        raise Skip("--quick: the 4M-token run needs the real weights and a GPU's time")
    if not cfg.real:
        raise Skip(f"real weights absent: no converted model at {cfg.model_dir} (run `sinkstream model prepare`)")
    lm = load_lm(cfg, cfg.dtype)
    ids, source = _ppl_text(cfg, lm.tokenizer)
    run = streaming_perplexity(lm, ids, cfg.ppl_tokens, cfg.ppl_block, cfg.ppl_chunk, cfg.sinks, cfg.window,
                               cfg.ppl_budget_s)
    checks, extra = flatness(run)
    run.update(extra, text=source, dtype=str(cfg.dtype), chunk=cfg.ppl_chunk, block=cfg.ppl_block)
    if not run["complete"]:
        run["note"] = (f"budget of {cfg.ppl_budget_s} s ran out after {run['tokens_fed']} tokens "
                       f"({run['tokens_per_s']:.0f} tokens/s); raise --ppl-budget-s or --ppl-chunk")
    return {"checks": checks, "metrics": run}


PART_FUNCS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "cuda_tests": part_cuda_tests, "oracle_fp32": part_oracle, "sink_vs_dense": part_sink_vs_dense,
    "many_streams": part_many_streams, "checkpoint_cost": part_checkpoint_cost, "perplexity_4m": part_perplexity,
}


def run_part(name: str, fn: Callable[[Config], dict[str, Any]], cfg: Config) -> PartResult:
    """Run one part, timed; a Skip becomes `skipped`, any other exception `failed` with its message."""
    log.info("gpu_check.part", part=name)
    start = time.perf_counter()
    try:
        out = fn(cfg)
        status, reason = _checks_reason(out["checks"], f"all {len(out['checks'])} checks passed")
        result = PartResult(name=name, status=status, reason=reason, seconds=0.0, checks=out["checks"],
                            metrics=out["metrics"])
    except Skip as exc:
        result = PartResult(name=name, status="skipped", reason=str(exc), seconds=0.0)
    except Exception as exc:  # noqa: BLE001 - a part's failure is recorded; the other parts still run
        tb = traceback.format_exc()
        result = PartResult(name=name, status="failed", reason=f"{type(exc).__name__}: {exc}"[:1000], seconds=0.0,
                            metrics={"traceback": tb[-3000:]})
    finally:
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    result.seconds = round(time.perf_counter() - start, 2)
    log.info("gpu_check.part_done", part=name, status=result.status, seconds=result.seconds, reason=result.reason)
    return result


# ---- report ------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return str(x)


def markdown(summary: GpuCheckSummary) -> str:
    env = summary.environment
    lines = [f"# sinkstream GPU check ({summary.started})", "",
             f"Device {env.get('gpu') or env['device']}, {env['dtype']}, weights {env['weights']}, "
             f"torch {env['torch']}, "
             f"transformers {env['transformers']}; {summary.seconds:.0f} s; "
             f"**{'PASSED' if summary.passed else 'FAILED'}**.", "",
             markdown_table(["part", "status", "seconds", "reason"],
                            [[p.name, p.status, f"{p.seconds:.1f}", p.reason.replace("|", "/")]
                             for p in summary.parts])]
    by = {p.name: p for p in summary.parts}
    m = by["many_streams"].metrics
    if m.get("packed"):
        packed_rows: list[list[Any]] = []
        for key in ("packed", "packed_flex"):
            r = m.get(key) or {}
            if "tokens_per_s" in r:
                packed_rows.append([r["mode"], r["streams"], _fmt(r["tokens_per_forward"]), _fmt(r["tokens_per_s"]),
                                    _fmt(r["decode_tokens_per_s"]), r.get("peak_cuda_gb", "-")])
            elif r:
                packed_rows.append([key, f"error: {r.get('error', '')[:200]}".replace("|", "/"), "", "", "", ""])
        lines += ["", "## Many streams (packed pooled forward)", "",
                  markdown_table(["mode", "streams", "tokens/forward", "tokens/s", "decode tokens/s", "peak GB"],
                                 packed_rows)]
        for row in (m.get("decode") or {}).get("rows", []):
            lines.append(f"- decode B={row['streams']}: pool {_fmt(row['tokens_per_s']['pool_batched'])} tokens/s, "
                         f"{row['pool_vs_dynamic']:.2f}x DynamicCache batched, "
                         f"{row['pool_vs_one_by_one']:.2f}x one by one")
        for row in (m.get("ingest") or {}).get("rows", []):
            lines.append(f"- ingest N={row['streams']}: pool {_fmt(row['tokens_per_s']['pool_ragged'])} tokens/s, "
                         f"{row['pool_vs_raw_padded']:.2f}x raw padded forward")
        lines += [f"- {n}" for n in m.get("notes", [])]
    for name, title in (("sink_vs_dense", "Sink vs dense before eviction"), ("checkpoint_cost", "Checkpoint cost"),
                        ("oracle_fp32", "attention_sinks oracle, fp32")):
        met = by[name].metrics
        if met:
            lines += ["", f"## {title}", ""] + [f"- {k}: {_fmt(v)}" for k, v in met.items() if k != "traceback"]
    ppl = by["perplexity_4m"].metrics
    if ppl.get("blocks"):
        lines += ["", "## Streaming perplexity", "", f"{ppl['tokens_fed']:,} tokens of {ppl['text']}, "
                  f"{_fmt(ppl['tokens_per_s'])} tokens/s; "
                  f"last/first pass {ppl.get('last_over_first_pass', float('nan')):.4f}", ""]
        blocks = [[f"{b['end']:,}", f"{b['perplexity']:.3f}",
                   f"{b['peak_cuda_bytes'] / 2**20:.1f}" if b["peak_cuda_bytes"] is not None else "-"]
                  for b in ppl["blocks"]]
        lines.append(markdown_table(["block end", "perplexity", "peak CUDA MB"], blocks))
    failed = [p for p in summary.parts if p.status == "failed" and "traceback" in p.metrics]
    for p in failed:
        lines += ["", f"## {p.name}: traceback", "", "```", p.metrics["traceback"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (gpu_check.json, gpu_check.md, CUDA test log)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA when present")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16"],
                    help="low-precision dtype of the bf16 parts (auto: bf16 where supported, else fp16)")
    ap.add_argument("--quick", action="store_true", help="tiny random model and small sizes (seconds on a CPU)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--model-dir", help="converted default model (default $SINKSTREAM_HOME/models/smollm2-135m)")
    ap.add_argument("--tokenizer", help="folder with SmolLM2's tokenizer.json (default: the model folder)")
    ap.add_argument("--loghub", help="Loghub samples (default $SINKSTREAM_LOGHUB or ../shared/data/loghub)")
    ap.add_argument("--oracle", help="attention_sinks oracle files (default ../shared/oracle)")
    ap.add_argument("--streams", type=int, default=0, help="streams of the packed throughput run (default 256)")
    ap.add_argument("--ppl-tokens", type=int, default=4_000_000, help="tokens of the streaming perplexity run")
    ap.add_argument("--ppl-block", type=int, default=100_000, help="tokens per perplexity/memory block")
    ap.add_argument("--ppl-chunk", type=int, default=1024, help="tokens per forward in the perplexity run")
    ap.add_argument("--ppl-budget-s", type=float, default=180.0, help="stop the perplexity run after this many seconds")
    ap.add_argument("--tests-timeout-s", type=float, default=240.0, help="limit of the CUDA tests' pytest run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: expected names from {', '.join(PARTS)}, got {', '.join(unknown)}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    parts = []
    for name in PARTS:
        if name in wanted:
            parts.append(run_part(name, PART_FUNCS[name], cfg))
        else:
            parts.append(PartResult(name=name, status="skipped", reason="not in --parts", seconds=0.0))
    summary = GpuCheckSummary(started=started, seconds=round(time.perf_counter() - start, 1),
                              passed=all(p.status != "failed" for p in parts), environment=_environment(cfg),
                              options=cfg.options(), parts=parts)
    (cfg.out / "gpu_check.json").write_text(summary.model_dump_json(indent=2))
    (cfg.out / "gpu_check.md").write_text(markdown(summary))
    log.info("gpu_check.done", passed=summary.passed, seconds=summary.seconds, out=str(cfg.out))
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
