"""The property the service's bit-exact batching rests on, checked on the machine that runs the suite
(`pipeline/service/backend.py`, "Batch invariance"): on one torch thread, a row of a matrix product is
bit-identical whatever the row count of the call, for calls of at least `MIN_ROWS` rows; and the pooled
backend never runs a shorter matrix product than that (forwards padded by the pad slot, logits never sliced
shorter)."""

from __future__ import annotations

import random

import pytest
import torch

from model.loader import cpu_bf16_flags
from model.row_stable import BLOCK_ROWS, RowStableLinear, calibrate, probe_inputs
from pipeline.service.backend import MIN_ROWS, PoolBackend

# (in_features, out_features) of SmolLM2-135M's linear layers: q/o, k/v, gate/up, down, lm_head
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]


@pytest.mark.parametrize("shape", SMOLLM2_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rows_of_a_matrix_product_do_not_depend_on_the_call_from_min_rows_on(shape, one_thread):
    gen = torch.Generator().manual_seed(sum(shape))
    rng = random.Random(sum(shape))
    weight = torch.randn(shape[1], shape[0], generator=gen)
    x = torch.randn(700, shape[0], generator=gen)
    reference = torch.nn.functional.linear(x, weight)  # every row computed inside one 700-row call
    counts = [*range(MIN_ROWS, 70), 100, 128, 255, 256, 300, 512]
    differ = []
    for m in counts:
        start = rng.randrange(0, len(x) - m)
        if not torch.equal(torch.nn.functional.linear(x[start : start + m], weight), reference[start : start + m]):
            differ.append(m)
    assert not differ, (
        f"on this CPU, calls of {differ} rows give rows that differ from the same rows in a 700-row call: "
        f"MIN_ROWS={MIN_ROWS} does not make the pooled step batch-invariant here (raise it)"
    )


@pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has none of amx_bf16, avx512_bf16 (auto stays float32)")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_rows_do_not_depend_on_the_call_in_calibrated_calls(shape, threads, one_thread):
    """bf16 (model.row_stable): a plain oneDNN call of some row counts rounds some elements differently on an AMX
    CPU, so every bf16 linear calls the kernel only with row counts verified canonical (at most BLOCK_ROWS, the
    calibrated `big`, or one of the verified `sizes` above it; the head: `big` only; under `big`, split by output
    columns, one of the verified `col_sizes`); then any row count, any position, any other rows give the bits a
    row gets alone. Probed with inputs under which another reduction order shows (`probe_inputs`), on one and on
    two threads, with row counts that need one padded call, several calls (above the largest size), blocks and
    split calls."""
    torch.set_num_threads(threads)
    head = shape[1] > 4 * shape[0]
    linear = torch.nn.Linear(shape[0], shape[1], bias=False)
    x, weight = probe_inputs(4400, shape[0], shape[1], seed=7)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    stable = RowStableLinear(linear, plan=calibrate(shape[0], shape[1], bias=False, all_sizes=not head))
    assert stable.plan is not None and stable.plan.big is not None, (
        f"no row count from {2 * BLOCK_ROWS} to 4096 is canonical for {shape} on {threads} thread(s) here: every "
        "bf16 call runs in 32-row blocks (correct, but slower than it needs to be)")
    plan = stable.plan
    big = plan.big
    assert head or plan.sizes[0] == big, plan
    rng = random.Random(sum(shape) + threads)
    calls: list[int] = []
    split_calls: list[int] = []
    plain_call, part_call = stable._call, stable._call_part

    def counted(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return plain_call(rows)

    def counted_part(rows: torch.Tensor, part: int) -> torch.Tensor:
        split_calls.append(rows.shape[0])
        return part_call(rows, part)

    with torch.no_grad():
        alone = torch.cat([plain_call(x[i : i + 1]) for i in range(len(x))])  # every row in a call of its own
        stable._call = counted  # type: ignore[method-assign]
        stable._call_part = counted_part  # type: ignore[method-assign]
        counts = sorted({*range(1, 40), 63, 64, 65, 100, 191, 193, 250, 448, 500, 961, big - 1, big, big + 1,
                         big + BLOCK_ROWS + 1, 2 * big - 1, 2 * big + 7, 1024, 3199, 3615, 4096, 4097, 4399,
                         *(r - d for r in plan.col_sizes for d in (0, 1, 63))})
        differ = []
        for m in counts:
            if m > len(x):
                continue
            start = rng.randrange(0, len(x) - m + 1)
            if not torch.equal(stable(x[start : start + m]), alone[start : start + m]):
                differ.append(m)
    assert not differ, f"bf16 calls of {differ} rows through {stable} differ from the same rows computed alone"
    verified = {*range(1, BLOCK_ROWS + 1), big, *plan.sizes}
    assert set(calls) <= verified, f"unverified row counts reached the kernel: {sorted(set(calls) - verified)}"
    assert set(split_calls) <= set(plan.col_sizes), (
        f"unverified row counts reached the split kernel calls: {sorted(set(split_calls) - set(plan.col_sizes))}")
    if plan.col_sizes:  # a layer with a split uses it under `big` (576x1536 on one thread on this Xeon)
        assert split_calls, f"{stable}: no call under big={big} rows was split although col_sizes={plan.col_sizes}"
    if 3648 in plan.sizes:  # verified (on one thread every size above big is, on this Xeon): 3,615 rows, one call
        assert 3648 in calls, sorted(set(calls))


class _RowCounter(torch.nn.Module):
    """Wraps a linear layer and records the row count of every call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.rows = inner, []
        self.out_features = inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.inner(x)


def test_the_pool_backend_never_runs_fewer_rows_than_min_rows(text_lm):
    """Decode steps (1 token) and short chunks are padded to MIN_ROWS; long forwards are sliced for logits in
    slices of LOGIT_SLICE_ROWS, never leaving a tail under MIN_ROWS. Results of the real streams come back."""
    backend = PoolBackend(text_lm, sinks=4, window=64, chunk=32, resident=40)
    mlp = text_lm.model.model.layers[0].mlp
    original_head = backend.stepper.lm_head
    counter = _RowCounter(mlp.down_proj)
    head = _RowCounter(original_head)
    mlp.down_proj, backend.stepper.lm_head = counter, head
    try:
        a, b = backend.new(), backend.new()
        (one,) = backend.step([a], [[5]], [None])
        assert one.nll.shape == (1,)
        two = backend.step([a, b], [[7, 8], [9]], [one.last_logits, None])
        assert [r.nll.shape[0] for r in two] == [2, 1]
        slots = [backend.new() for _ in range(36)]  # 36 x 32 = 1152 tokens: one slice of 1024 would leave 128
        backend.step(slots, [[3 + k % 50] * 32 for k in range(36)], [None] * 36)
    finally:
        mlp.down_proj, backend.stepper.lm_head = counter.inner, original_head
    assert counter.rows[:2] == [MIN_ROWS, MIN_ROWS]
    assert counter.rows[2] == 36 * 32
    assert min(head.rows) >= MIN_ROWS
    assert sum(head.rows[2:]) == 36 * 32
    assert backend.pool.seen[backend.pad_slot] == 0  # the pad slot is reset after every step


@pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has none of amx_bf16, avx512_bf16 (auto stays float32)")
def test_a_row_stable_bf16_model_steps_unpadded_and_stays_batch_invariant(one_thread):
    """bf16 with row-stable linears needs no padding: a one-token step is one row (16 before), and a stream fed
    alone in such steps gets bit-identical NLLs and logits to the same stream packed with 39 others (over 32
    rows a forward, so the row blocks split it)."""
    from model.row_stable import make_rows_stable, rows_stable
    from tests.helpers.models import build_text_lm

    lm = build_text_lm(seed=3)
    lm.model.to(torch.bfloat16)
    lm.dtype = torch.bfloat16
    assert not rows_stable(lm.model)
    make_rows_stable(lm.model)
    assert rows_stable(lm.model)
    prefix = [11 + (7 * i) % 300 for i in range(24)]
    decode = [400 + i for i in range(6)]

    def run(others: int) -> tuple[list[torch.Tensor], list[int]]:
        backend = PoolBackend(lm, sinks=4, window=16, chunk=8, resident=others + 1)
        assert backend.min_rows == 1
        mlp = lm.model.model.layers[0].mlp
        counter = _RowCounter(mlp.down_proj)
        mlp.down_proj = counter
        try:
            slots = [backend.new() for _ in range(others + 1)]
            prev = [None] * len(slots)
            got = []
            for a in range(0, len(prefix), 8):  # chunks of 8, then one token a step
                out = backend.step(slots, [prefix[a : a + 8]] * len(slots), prev)
                prev = [r.last_logits for r in out]
                got += [out[0].nll, out[0].last_logits]
            for t in decode:
                out = backend.step(slots, [[t]] * len(slots), prev)
                prev = [r.last_logits for r in out]
                got += [out[0].nll, out[0].last_logits]
        finally:
            mlp.down_proj = counter.inner
        return got, counter.rows

    alone, rows_alone = run(0)
    packed, rows_packed = run(39)
    assert rows_alone == [8, 8, 8, 1, 1, 1, 1, 1, 1]  # nothing padded
    assert rows_packed[:3] == [320, 320, 320] and rows_packed[3:] == [40] * 6
    for a, b in zip(alone, packed, strict=True):  # bit-identical (the stream's first token has no NLL: NaN)
        assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
