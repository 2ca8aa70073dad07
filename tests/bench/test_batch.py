"""`model.batch.step_many`: one batched forward must equal stepping every stream alone (tiny models)."""

from __future__ import annotations

import pytest
import torch

from model.batch import step_many
from model.stepper import SinkModel
from tests.helpers.models import EXACT, VOCAB

# (sinks, window, tokens already streamed): fresh, before eviction, right at it, long after, no sinks, dense.
STREAMS = [(4, 12, 0), (4, 12, 7), (4, 12, 15), (2, 20, 61), (0, 16, 45), (4, 12, 38), (0, None, 9)]


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _twin_streams(lm, configs):
    """Two identical sets of caches (fed the same history), one for step_many and one for SinkModel.step."""
    runner = SinkModel(lm)
    batched, alone = [], []
    for k, (s, w, n) in enumerate(configs):
        a, b = runner.new_cache(s, w, max_chunk=8), runner.new_cache(s, w, max_chunk=8)
        if n:
            ids = _ids(n, seed=k)
            runner.step(a, ids)
            runner.step(b, ids)
        batched.append(a)
        alone.append(b)
    return runner, batched, alone


@pytest.mark.parametrize("arch", EXACT)
def test_step_many_equals_one_stream_at_a_time(tiny_lm, arch):
    lm = tiny_lm(arch)
    limit = lm.arch.max_positions
    configs = [(s, w, n) for s, w, n in STREAMS if w is not None or n + 40 < limit]
    if arch == "gpt2":  # 64 absolute positions: keep sinks + window inside the table
        configs = [(s, w, n) for s, w, n in configs if w is None or s + w <= 32]
    runner, batched, alone = _twin_streams(lm, configs)
    for step in range(30):  # crosses evictions and RoPE frame moves of every stream
        tokens = _ids(len(configs), seed=100 + step)
        got = step_many(lm, batched, tokens)
        want = torch.stack([runner.step(c, [int(t)])[0] for c, t in zip(alone, tokens)])
        assert got.shape == (len(configs), VOCAB)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for a, b in zip(batched, alone):
        assert (a.seen, a.base, a.buffered()) == (b.seen, b.base, b.buffered())
        torch.testing.assert_close(a.layers[-1].keys, b.layers[-1].keys, atol=1e-5, rtol=0)


def test_sink_correction_is_needed(tiny_lm, monkeypatch):
    """Without the per-stream sink re-rotation the batch would differ: the comparison above has teeth."""
    from model.batch import BatchCache

    lm = tiny_lm("llama")
    runner, batched, alone = _twin_streams(lm, [(4, 12, 40), (4, 12, 55)])
    monkeypatch.setattr(BatchCache, "sink_corrected", lambda self, b, keys: keys)
    got = step_many(lm, batched, [1, 2])
    want = torch.stack([runner.step(c, [t])[0] for c, t in zip(alone, [1, 2])])
    assert (got - want).abs().max() > 1e-3


def test_single_stream_and_logits_of_next_steps(tiny_lm):
    lm = tiny_lm("qwen2")
    runner, batched, alone = _twin_streams(lm, [(4, 12, 20)])
    got = step_many(lm, batched, torch.tensor([5]))
    torch.testing.assert_close(got, runner.step(alone[0], [5]), atol=1e-4, rtol=0)


def test_refusals_say_what_was_expected(tiny_lm):
    lm = tiny_lm("llama")
    runner = SinkModel(lm)
    a, b = runner.new_cache(4, 12), runner.new_cache(4, 12)
    with pytest.raises(ValueError, match="one token per cache"):
        step_many(lm, [a, b], [1])
    with pytest.raises(ValueError, match="at least one cache"):
        step_many(lm, [], [])
    with pytest.raises(ValueError, match="distinct caches"):
        step_many(lm, [a, a], [1, 2])
    falcon = tiny_lm("falcon")
    with pytest.raises(ValueError, match="exact chunked feeds"):
        step_many(falcon, [SinkModel(falcon).new_cache(4, 12)], [1])


def test_failed_forward_leaves_every_cache_as_it_was(tiny_lm):
    lm = tiny_lm("llama")
    runner, batched, _ = _twin_streams(lm, [(4, 12, 30), (4, 12, 3)])
    before = [(c.seen, c.base, c.layers[0].keys) for c in batched]
    with pytest.raises(IndexError):
        step_many(lm, batched, [1, VOCAB + 1000])  # token id outside the embedding table
    assert [(c.seen, c.base, c.layers[0].keys) for c in batched] == before
    assert all(c.plan is None for c in batched)
