"""The pooled step and SinkCache on a CUDA device (issue 9 item 5), on a tiny random Llama.

Tests marked `cuda` run when `torch.cuda.is_available()` and are skipped with that reason otherwise
(`scripts/gpu-check.sh` runs this file on a GPU). The low-precision checks also run on CPU, so the test
logic itself is exercised on every machine; the snapshot dtype refusal needs no GPU at all.

Self-contained on purpose: it uses no conftest fixture, so on a bare GPU host it runs with
`pytest --noconftest tests/model/test_cuda.py` without the integration-test dependencies (fakeredis, kafka).

Tolerances, and why:
- fp32, batch composition (a stream inside a ragged batch vs the same stream stepped alone, same device):
  max |dNLL| and max |d last logits| <= 1e-5, the issue's bound.
- fp32, CUDA vs CPU, and CUDA attention modes against each other (different kernels, different reduction
  order): <= 1e-4.
- bf16 / fp16 vs fp32 on the same device: mean |dNLL| <= `LOW_PRECISION[dtype][0]` and max |dNLL| <=
  `LOW_PRECISION[dtype][1]` (nats), over a stream past eviction with frame moves. bf16 keeps 8 mantissa bits
  (relative rounding 2^-9 ~ 2e-3 per op), fp16 11; the bounds are about 4x what the CPU runs of these
  tests measured and well below what a wrong attention span costs on the same stream (numbers next to
  `LOW_PRECISION`), so a broken path fails while honest rounding passes.
"""

from __future__ import annotations

import pytest
import torch

from model.loader import LoadedModel, wrap_model
from model.pool import KVPool
from model.pool_step import PoolStepper
from model.snapshot import SnapshotError, dump_cache, load_cache
from model.stepper import SinkModel
from tests.helpers.models import VOCAB, build_tiny
from tests.helpers.pool import batch_vs_alone, ragged_results_by_mode

S, W, C = 4, 12, 8
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
# dtype -> (mean, max) |dNLL| bound against fp32 on the same device, in nats. Measured on CPU (this tiny Llama,
# 90 tokens, two chunkings): bf16 mean 0.0034 max 0.014, fp16 mean 0.0005 max 0.0020 (pool and SinkCache alike).
# A real attention error is far larger on the same stream: no sinks instead of 4 gives mean 0.27 / max 1.5,
# window 8 instead of 12 mean 0.19 / max 0.82.
LOW_PRECISION = {torch.bfloat16: (0.015, 0.06), torch.float16: (0.003, 0.012)}

_MODELS: dict[tuple[str, torch.dtype], LoadedModel] = {}


def tiny(device: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The tiny random Llama of `tests.helpers.models` (same weights every call) on `device` in `dtype`."""
    key = (device, dtype)
    if key not in _MODELS:
        model = build_tiny("llama").model.to(device=device, dtype=dtype)
        _MODELS[key] = wrap_model(model)
    return _MODELS[key]


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ragged(ids: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out, i = [], 0
    while i < len(ids):
        n = int(torch.randint(1, C + 1, (1,), generator=g))
        out.append(ids[i : i + n])
        i += n
    return out


def _pool_nll(lm: LoadedModel, chunks: list[list[int]], mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor, int]:
    """NLLs (float32 CPU) and the last logits of one slot fed `chunks`; also the slot's final frame offset."""
    pool = KVPool(lm, 2, S, W, max_chunk=C)
    stepper = PoolStepper(pool, mode=mode)
    slot = pool.allocate()
    nll, prev = [], None
    for chunk in chunks:
        (res,) = stepper.step([slot], [chunk], [prev])
        nll.append(res.nll)
        prev = res.last_logits
    return torch.cat(nll), prev.float().cpu(), pool.base[slot]


@cuda
@pytest.mark.parametrize("mode", ["auto", "batched", "loop"])
def test_batch_composition_independence_on_cuda(mode):
    """fp32 on CUDA: a stream stepped inside a ragged batch equals the same stream stepped alone (<= 1e-5);
    streams before the sinks fill, before and after eviction, frame moves inside the batch, slots with gaps."""
    worst, moved = batch_vs_alone(tiny("cuda"), S, W, C, mode, rounds=10)
    assert worst <= 1e-5, worst
    assert moved >= 3  # frame moves happened inside batched steps


@cuda
def test_cuda_agrees_with_cpu_in_fp32():
    """The pooled step and the one-stream SinkCache on CUDA both equal the CPU pool (<= 1e-4), past eviction."""
    ids = _ids(90)
    chunks = _ragged(ids)
    cpu_nll, cpu_last, cpu_base = _pool_nll(tiny("cpu"), chunks)
    gpu_nll, gpu_last, gpu_base = _pool_nll(tiny("cuda"), chunks)
    assert cpu_base == gpu_base > 0  # the same frame moves happened on both devices
    assert (gpu_nll[1:] - cpu_nll[1:]).abs().max() <= 1e-4
    assert (gpu_last - cpu_last).abs().max() <= 1e-4
    runner = SinkModel(tiny("cuda"))
    sink_nll, _ = runner.nll(runner.new_cache(S, W, max_chunk=C), ids)
    assert (sink_nll.float().cpu()[1:] - cpu_nll[1:]).abs().max() <= 1e-4


@cuda
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_modes_agree_on_cuda():
    """loop (SDPA per stream), batched (padded SDPA) and flex (compiled FlexAttention, block mask and sink
    score_mod) give the same NLLs on the same ragged batches on CUDA, fp32 (<= 1e-4), frame moves included."""
    results = ragged_results_by_mode(tiny("cuda"), S, W, C)
    for mode in ("batched", "flex"):
        assert torch.isfinite(results[mode]).all(), mode
        assert (results[mode] - results["loop"]).abs().max() <= 1e-4, mode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_pool_and_sink_cache_are_close_to_fp32(device, dtype):
    """bf16 / fp16: the pooled step and the one-stream SinkCache run, stay finite and stay within the stated
    tolerance of fp32 on the same device, over a stream past eviction with frame moves."""
    ids = _ids(90)
    chunks = _ragged(ids, seed=3)
    ref, _, ref_base = _pool_nll(tiny(device), chunks)
    low, last, base = _pool_nll(tiny(device, dtype), chunks)
    assert base == ref_base > 0
    assert torch.isfinite(low[1:]).all() and torch.isfinite(last).all()
    mean_bound, max_bound = LOW_PRECISION[dtype]
    diff = (low[1:] - ref[1:]).abs()
    assert diff.mean() <= mean_bound and diff.max() <= max_bound, (float(diff.mean()), float(diff.max()))
    runner = SinkModel(tiny(device, dtype))
    sink_nll, _ = runner.nll(runner.new_cache(S, W, max_chunk=C), ids)
    sdiff = (sink_nll.float().cpu()[1:] - ref[1:]).abs()
    assert torch.isfinite(sink_nll[1:]).all()
    assert sdiff.mean() <= mean_bound and sdiff.max() <= max_bound, (float(sdiff.mean()), float(sdiff.max()))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flex_runs_in_low_precision_on_cuda(dtype):
    """The compiled FlexAttention path in bf16 / fp16: finite and within the stated tolerance of fp32 loop mode."""
    chunks = _ragged(_ids(90), seed=5)
    ref, _, _ = _pool_nll(tiny("cuda"), chunks, mode="loop")
    low, last, _ = _pool_nll(tiny("cuda", dtype), chunks, mode="flex")
    assert torch.isfinite(low[1:]).all() and torch.isfinite(last).all()
    mean_bound, max_bound = LOW_PRECISION[dtype]
    diff = (low[1:] - ref[1:]).abs()
    assert diff.mean() <= mean_bound and diff.max() <= max_bound, (float(diff.mean()), float(diff.max()))


@cuda
def test_pool_on_cuda_snapshot_round_trip_is_bit_exact():
    """A slot snapshot taken on CUDA in bf16 restores bit-exactly and the stream continues identically."""
    lm = tiny("cuda", torch.bfloat16)
    pool = KVPool(lm, 3, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    slot = pool.allocate()
    ids = _ids(70)
    for chunk in _ragged(ids[:37], seed=2):
        stepper.step([slot], [chunk])
    twin, _, _ = pool.restore(pool.snapshot(slot))
    a, b = pool.slot_tensors(slot), pool.slot_tensors(twin)
    assert all(torch.equal(x, y) for la, lb in zip(a.layers, b.layers) for x, y in zip(la, lb))
    for chunk in _ragged(ids[37:], seed=3):
        (x,) = stepper.step([slot], [chunk])
        (y,) = stepper.step([twin], [chunk])
        assert torch.equal(x.nll[1:], y.nll[1:]) and torch.equal(x.last_logits, y.last_logits)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_snapshot_is_refused_by_an_fp32_model(device):
    """A bf16 snapshot (SinkCache or pool slot) offered to an fp32 model of the same weights raises
    SnapshotError naming both dtypes; nothing is allocated by the failed restore."""
    low, full = tiny(device, torch.bfloat16), tiny(device)
    runner = SinkModel(low)
    cache = runner.new_cache(S, W, max_chunk=C)
    runner.step(cache, _ids(20))
    blob = dump_cache(cache)
    with pytest.raises(SnapshotError, match=r"dtype mismatch.*'torch\.float32'.*'torch\.bfloat16'"):
        load_cache(full, blob)
    pool = KVPool(low, 1, S, W, max_chunk=C)
    slot = pool.allocate()
    PoolStepper(pool).feed(slot, _ids(20))
    fp32_pool = KVPool(full, 1, S, W, max_chunk=C)
    with pytest.raises(SnapshotError, match=r"dtype mismatch.*'torch\.float32'.*'torch\.bfloat16'"):
        fp32_pool.restore(pool.snapshot(slot))
    assert fp32_pool.free_slots == 1
