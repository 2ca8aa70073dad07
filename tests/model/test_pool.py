"""The pooled KV cache and the batched ragged step: exactness, batch-composition independence, snapshots,
rollback and generation, on every architecture with exact chunking (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from model.pool import KVPool, bytes_per_slot, serialize_slot
from model.pool_step import PoolStepper
from model.snapshot import SnapshotError, dump_cache, load_cache, read_header
from model.stepper import SinkModel
from tests.helpers.models import EXACT, FALLBACK, VOCAB
from tests.helpers.pool import batch_vs_alone, ragged_results_by_mode
from tests.model.reference import reference_logits

S, W, C = 4, 12, 8


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ragged(ids: list[int], seed: int = 0, most: int = C) -> list[list[int]]:
    """Split ids into chunks of random lengths 1..most."""
    g = torch.Generator().manual_seed(seed)
    out, i = [], 0
    while i < len(ids):
        n = int(torch.randint(1, most + 1, (1,), generator=g))
        out.append(ids[i : i + n])
        i += n
    return out


def _feed_chunks(
    stepper: PoolStepper, slot: int, chunks: list[list[int]], prev=None
) -> tuple[torch.Tensor, torch.Tensor]:
    nll = []
    for chunk in chunks:
        (res,) = stepper.step([slot], [chunk], [prev])
        nll.append(res.nll)
        prev = res.last_logits
    return torch.cat(nll), prev


def _nll_from_logits(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), -1)
    return -lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _slot_copy(pool: KVPool, slot: int):
    return (
        [(k[slot].clone(), v[slot].clone()) for k, v in zip(pool.keys, pool.values)],
        pool.seen[slot],
        pool.base[slot],
    )


def _same_slot(pool: KVPool, slot: int, saved) -> bool:
    tensors, seen, base = saved
    return (pool.seen[slot], pool.base[slot]) == (seen, base) and all(
        torch.equal(k[slot], k0) and torch.equal(v[slot], v0)
        for (k, v), (k0, v0) in zip(zip(pool.keys, pool.values), tensors)
    )


@pytest.mark.parametrize("arch", EXACT)
def test_pool_matches_sink_cache_and_reference(tiny_lm, arch):
    """One slot fed ragged chunks == SinkModel one token at a time == the independent reference, within 1e-5
    (measured on every architecture here, 4 seeds each: at most 9.5e-7, a few float32 ulps of the NLL)."""
    lm = tiny_lm(arch)
    ids = _ids(90 if arch != "gpt2" else 60)
    pool = KVPool(lm, 2, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    slot = pool.allocate()
    ours, _ = _feed_chunks(stepper, slot, _ragged(ids))
    runner = SinkModel(lm)
    single, _ = runner.nll(runner.new_cache(S, W, max_chunk=1), ids)
    assert (ours[1:] - single[1:]).abs().max() <= 1e-5
    ref = _nll_from_logits(reference_logits(lm, torch.tensor(ids), S, W), ids)
    assert (ours[1:] - ref).abs().max() <= 1e-5
    assert pool.seen[slot] == len(ids)
    if lm.arch.positions == "rope":
        assert pool.base[slot] > 0  # frames moved along the way


@pytest.mark.parametrize("mode", ["auto", "loop", "batched"])
@pytest.mark.parametrize("arch", EXACT)
def test_batch_composition_independence(tiny_lm, arch, mode):
    """A stream stepped inside a ragged batch gives the same NLLs (<= 1e-5) as stepped alone: streams before the
    sinks fill, before and after eviction, with frame moves inside the batch, slots out of order and with gaps."""
    lm = tiny_lm(arch)
    worst, moved = batch_vs_alone(lm, S, W, C, mode, rounds=12)
    assert worst <= 1e-5, worst
    if lm.arch.positions == "rope":
        assert moved >= 3  # frame moves happened inside batched steps


def test_batched_path_gathers_scattered_slots(tiny_lm):
    """Slots far apart (span > 2x the batch) take the gather branch of the batched path; same results."""
    lm = tiny_lm("llama")
    pool = KVPool(lm, 12, S, W, max_chunk=C)
    slots = [pool.allocate() for _ in range(12)]
    loop, batched = PoolStepper(pool, mode="loop"), PoolStepper(pool, mode="batched")
    hist = _ids(30, seed=3)
    for s in slots:
        loop.feed(s, hist)
    chunks = [_ids(5, seed=4), _ids(3, seed=5)]
    a = batched.step([slots[0], slots[11]], chunks)
    assert batched.plan([slots[1], slots[10]], [5, 3])[0]._rows(pool.keys[0])[0] == "gather"
    b = loop.step([slots[1], slots[10]], chunks)
    for x, y in zip(a, b):
        assert (x.nll[1:] - y.nll[1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_slot_snapshot_round_trip_is_bit_exact(tiny_lm, arch):
    lm = tiny_lm(arch)
    pool = KVPool(lm, 3, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    slot = pool.allocate()
    ids = _ids(70 if arch != "gpt2" else 45)
    _feed_chunks(stepper, slot, _ragged(ids[:37], seed=2))
    blob = pool.snapshot(slot, extra={"offset": 37}, tensors={"last": torch.arange(3.0)})
    header = read_header(blob)
    assert (header["seen"], header["base"], header["sinks"], header["window"]) == (37, pool.base[slot], S, W)
    twin, extra, tensors = pool.restore(blob)
    assert twin != slot and extra == {"offset": 37} and torch.equal(tensors["last"], torch.arange(3.0))
    a, b = pool.slot_tensors(slot), pool.slot_tensors(twin)
    assert all(torch.equal(x, y) for la, lb in zip(a.layers, b.layers) for x, y in zip(la, lb))
    rest = _ragged(ids[37:], seed=3)
    straight, _ = _feed_chunks(stepper, slot, rest)
    resumed, _ = _feed_chunks(stepper, twin, rest)
    assert torch.equal(straight[1:], resumed[1:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sink_cache_snapshots_and_slots_are_interchangeable(tiny_lm, arch):
    """A SinkCache snapshot restores into a slot and a slot snapshot into a SinkCache, tensors bit for bit."""
    lm = tiny_lm(arch)
    runner = SinkModel(lm)
    ids = _ids(60 if arch != "gpt2" else 45, seed=9)
    cache = runner.new_cache(S, W, max_chunk=C)
    runner.step(cache, ids[:33])
    pool = KVPool(lm, 2, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    slot, _, _ = pool.restore(dump_cache(cache))
    trimmed = [layer.trimmed() for layer in cache.layers]
    state = pool.slot_tensors(slot)
    assert (state.seen, state.base) == (cache.seen, cache.base)
    assert all(torch.equal(x, y) for lt, ls in zip(trimmed, state.layers) for x, y in zip(lt, ls))
    back, _, _ = load_cache(lm, serialize_slot(lm, state))
    assert all(torch.equal(x, y) for lb, ls in zip(back.layers, state.layers) for x, y in zip((lb.keys, lb.values), ls))
    rest = ids[33:]
    ours, _ = _feed_chunks(stepper, slot, _ragged(rest, seed=4))
    theirs, _ = runner.nll(cache, rest)
    assert (ours[1:] - theirs[1:]).abs().max() < 1e-5


def test_restore_refuses_other_geometry(tiny_lm):
    lm = tiny_lm("llama")
    pool = KVPool(lm, 2, S, W, max_chunk=C)
    slot = pool.allocate()
    PoolStepper(pool).feed(slot, _ids(20))
    other = KVPool(lm, 1, S, W - 2, max_chunk=C)
    with pytest.raises(SnapshotError, match=r"sinks=4, window=12; this pool has sinks=4, window=10"):
        other.restore(pool.snapshot(slot))
    assert other.free_slots == 1  # nothing allocated by the failed restore
    blob = bytearray(pool.snapshot(slot))
    blob[-10] ^= 0xFF
    with pytest.raises(SnapshotError, match="corrupt"):
        pool.restore(bytes(blob))


def _live(pool: KVPool, slot: int):
    """What a slot's stream is: its counters and its snapshot-layout tensors (sinks + kept window)."""
    state = pool.slot_tensors(slot)
    return state.seen, state.base, state.layers


def _same_live(a, b) -> bool:
    return a[:2] == b[:2] and all(torch.equal(x, y) for la, lb in zip(a[2], b[2]) for x, y in zip(la, lb))


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_failed_step_leaves_every_stream_where_it_was(tiny_lm, mode):
    """A forward that raises mid-way (after layer 0 wrote keys; a frame moved before it; in "loop" mode also
    inside a stream's attention call, while its slot's sink keys are zeroed for the call) keeps no undo log and
    needs none: every stream is at the same token, a stream whose frame did not move holds the very same live
    state, and retrying the same chunks gives results and states bit-identical to twins that never failed."""
    lm = tiny_lm("llama")
    pool = KVPool(lm, 7, S, W, max_chunk=C)
    stepper = PoolStepper(pool, mode=mode)
    slots = [pool.allocate() for _ in range(3)]
    for s, n in zip(slots, (3, 20, 27)):
        stepper.feed(s, _ids(n, seed=s))
    twins = [pool.fork(s) for s in slots]
    chunks = [_ids(2, seed=1), _ids(5, seed=2), _ids(8, seed=3)]
    plan, _ = stepper.plan(slots, [len(c) for c in chunks])
    moved = {slot for slot, *_ in plan.shifts}
    assert moved and moved != set(slots)  # the step moves a frame, and not every frame
    before = {s: _live(pool, s) for s in slots}
    layer1 = lm.model.base_model.layers[1]

    def boom(module, args):
        raise RuntimeError("injected failure in layer 1")

    handle = layer1.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            stepper.step(slots, chunks)
    finally:
        handle.remove()
    with pytest.raises(IndexError):  # out-of-vocabulary id fails inside the model, before any layer
        stepper.step(slots, [chunks[0], chunks[1], [1, VOCAB + 5]])

    if mode == "loop":  # inside the second stream's SDPA call of layer 0, its sink keys zeroed for the call
        assert any(st.attention.sink_cos is not None for st in plan.streams)
        sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

        def fails_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("injected: out of memory in a stream's attention")
            return sdpa(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = fails_second
        try:
            with pytest.raises(torch.OutOfMemoryError, match="a stream's attention"):
                stepper.step(slots, chunks)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa

    def no_logits(module, args):
        raise torch.OutOfMemoryError("injected: out of memory in the logits slice")

    handle = stepper.lm_head.register_forward_pre_hook(no_logits)  # the forward succeeded, its logits fail
    try:
        with pytest.raises(torch.OutOfMemoryError):
            stepper.step(slots, chunks)
    finally:
        handle.remove()
    for s in slots:
        assert pool.seen[s] == before[s][0]
        if s not in moved:
            assert _same_live(_live(pool, s), before[s])
    again = stepper.step(slots, chunks)
    twin = stepper.step(twins, chunks)
    for a, b, s, t in zip(again, twin, slots, twins):
        assert torch.equal(a.nll[1:], b.nll[1:]) and torch.equal(a.last_logits, b.last_logits)
        assert _same_live(_live(pool, s), _live(pool, t))


def test_a_frame_move_that_fails_leaves_its_slot_untouched(tiny_lm, monkeypatch):
    """An error while a frame move computes its re-rotated keys (out of memory on a GPU) writes nothing."""
    from model.rotary import Rotation

    lm = tiny_lm("llama")
    pool = KVPool(lm, 2, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    slot = pool.allocate()
    stepper.feed(slot, _ids(27))
    assert stepper.plan([slot], [C])[0].shifts
    before = _slot_copy(pool, slot)
    real, calls = Rotation.apply, []

    def apply(x, cos, sin):
        calls.append(1)
        if len(calls) == 2:  # the second layer's keys
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(x, cos, sin)

    monkeypatch.setattr(Rotation, "apply", staticmethod(apply))
    with pytest.raises(torch.OutOfMemoryError):
        stepper.step([slot], [_ids(C, seed=9)])
    assert _same_slot(pool, slot, before)


def test_generation_leaves_the_slot_bit_identical(tiny_lm):
    lm = tiny_lm("llama")
    pool = KVPool(lm, 3, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    slot = pool.allocate()
    ids = _ids(50)
    last = stepper.feed(slot, ids[:30]).last_logits
    saved = _slot_copy(pool, slot)
    free = pool.free_slots
    generated = stepper.generate(slot, prompt=[1, 2, 3], max_new_tokens=20)
    assert len(generated) == 20 and all(0 <= g < VOCAB for g in generated)
    assert _same_slot(pool, slot, saved) and pool.free_slots == free
    runner = SinkModel(lm)
    cache = runner.new_cache(S, W, max_chunk=C)
    runner.step(cache, ids[:30])
    assert generated == runner.generate(cache, [1, 2, 3], 20)
    assert stepper.generate(slot, [], 5, last_logits=last)[0] == int(last.argmax())
    stop_at = generated[2]
    assert stepper.generate(slot, [1, 2, 3], 20, stop=lambda t: t == stop_at)[-1] == stop_at


@pytest.mark.parametrize("arch", FALLBACK)
def test_falcon_and_mpt_keep_the_one_stream_path(tiny_lm, arch):
    with pytest.raises(ValueError, match="computes attention in its own code; use the one-stream SinkCache path"):
        KVPool(tiny_lm(arch), 2, S, W)


def test_slots_capacity_and_sizing(tiny_lm):
    lm = tiny_lm("llama")
    pool = KVPool(lm, 3, S, W, max_chunk=C)
    per_slot = sum(t.nbytes for t in pool.keys + pool.values) // pool.capacity
    assert bytes_per_slot(lm, S, W, C) == per_slot == 2 * 2 * 2 * (S + W + C - 1) * 16 * 4
    assert bytes_per_slot(lm, S, W, C, torch.bfloat16) == per_slot // 2
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert (a, b, c) == (0, 1, 2)
    with pytest.raises(RuntimeError, match="all 3 slots are in use"):
        pool.allocate()
    pool.free(b)
    assert pool.allocate() == 1
    with pytest.raises(ValueError, match="expected an allocated slot"):
        pool.free(7)
    with pytest.raises(ValueError, match="bounded window"):
        KVPool(lm, 1, S, None)


def test_step_arguments_are_checked(tiny_lm):
    lm = tiny_lm("llama")
    pool = KVPool(lm, 3, S, W, max_chunk=C)
    stepper = PoolStepper(pool)
    a, b = pool.allocate(), pool.allocate()
    with pytest.raises(ValueError, match="distinct slots"):
        stepper.step([a, a], [[1], [2]])
    with pytest.raises(ValueError, match=r"chunk length must be in 1..8, got 9"):
        stepper.step([a], [list(range(9))])
    with pytest.raises(ValueError, match="expected an allocated slot"):
        stepper.step([2], [[1]])
    with pytest.raises(ValueError, match="one id list per slot"):
        stepper.step([a, b], [[1]])


def test_sliced_logits_equal_full_logits(tiny_lm):
    """NLLs come from lm_head slices; any slice size gives the same numbers as the full logits."""
    lm = tiny_lm("qwen2")
    ids = [_ids(n, seed=n) for n in (7, 3, 8)]
    results = {}
    for rows in (2, 256):
        pool = KVPool(lm, 3, S, W, max_chunk=C)
        stepper = PoolStepper(pool, slice_rows=rows)
        slots = [pool.allocate() for _ in ids]
        for s in slots:
            stepper.feed(s, _ids(25, seed=s))
        results[rows] = stepper.step(slots, ids, full_logits=rows == 256)
    for small, full, chunk in zip(results[2], results[256], ids):
        torch.testing.assert_close(small.nll, full.nll, atol=1e-6, rtol=0, equal_nan=True)
        torch.testing.assert_close(full.nll[1:], _nll_from_logits(full.logits, chunk), atol=1e-6, rtol=0)
        assert torch.equal(full.logits[-1], full.last_logits)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_attention_modes_agree(tiny_lm, arch):
    """The per-stream SDPA loop, the padded batched SDPA path and the FlexAttention path (the CUDA kernels'
    semantics, run eagerly here) give the same NLLs on the same ragged batches, frame moves included."""
    results = ragged_results_by_mode(tiny_lm(arch), S, W, C)
    for mode in ("batched", "flex"):
        assert (results[mode] - results["loop"]).abs().max() <= 1e-5, mode


def test_window_policy_pool_equals_sink_model(tiny_lm):
    """sinks=0 (plain window attention) runs through the pool too, equal to SinkModel's window policy."""
    lm = tiny_lm("llama")
    ids = _ids(70, seed=8)
    pool = KVPool(lm, 1, 0, W, max_chunk=C)
    ours, _ = _feed_chunks(PoolStepper(pool), pool.allocate(), _ragged(ids, seed=5))
    runner = SinkModel(lm)
    theirs, _ = runner.nll(runner.new_cache(0, W, max_chunk=1), ids)
    assert (ours[1:] - theirs[1:]).abs().max() <= 1e-5  # measured: at most 9.5e-7 (4 seeds)
    with pytest.raises(ValueError, match="model's dtype"):
        KVPool(lm, 1, S, W, dtype=torch.bfloat16)
