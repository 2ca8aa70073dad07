"""`SinkModel.nll`: per-chunk reduction to NLLs gives what scoring the full logits gives, in bounded memory."""

from __future__ import annotations

import torch

from model.stepper import SinkModel
from tests.helpers.models import build_tiny


def test_nll_equals_full_logits_scoring_across_chunk_boundaries():
    lm = build_tiny("llama")
    runner = SinkModel(lm)
    ids = torch.randint(0, 90, (70,)).tolist()
    full_cache = runner.new_cache(4, 16, max_chunk=256)
    logits = runner.step(full_cache, ids)  # (70, vocab) in one piece
    expected = torch.full((70,), float("nan"))
    expected[1:] = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    cache = runner.new_cache(4, 16, max_chunk=8)  # nine forward passes, seven chunk boundaries inside
    nll, last = runner.nll(cache, ids)
    assert torch.isnan(nll[0])
    assert torch.allclose(nll[1:], expected[1:], atol=1e-5)
    assert torch.allclose(last, logits[-1], atol=1e-5)
    # Continuing with the previous logits scores the first token of the next call.
    more = torch.randint(0, 90, (5,)).tolist()
    nll2, _ = runner.nll(cache, more, prev_logits=last)
    want = -torch.log_softmax(last, -1)[more[0]]
    assert abs(float(nll2[0]) - float(want)) < 1e-6


def test_nll_of_nothing_returns_the_previous_logits_untouched():
    lm = build_tiny("llama")
    runner = SinkModel(lm)
    cache = runner.new_cache(4, 16)
    nll, last = runner.nll(cache, [])
    assert nll.numel() == 0 and last is None and cache.seen == 0
