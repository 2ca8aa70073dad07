"""The sink cache on every architecture the paper names (plus Llama-3, Mistral, Qwen2, Gemma), tiny models."""

from __future__ import annotations

import pytest
import torch

from model.arch import architecture_of
from model.stepper import SinkModel
from tests.helpers.models import EXACT, FALLBACK, VOCAB
from tests.model.reference import reference_logits

S, W = 4, 12


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g)


def _stream(lm, ids, chunk: int, sinks: int = S, window: int | None = W) -> torch.Tensor:
    runner = SinkModel(lm)
    cache = runner.new_cache(sinks, window, max_chunk=chunk)
    return runner.step(cache, ids)


@pytest.mark.parametrize("arch", EXACT + FALLBACK)
def test_before_eviction_sink_equals_dense(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(S + W)
    with torch.inference_mode():
        kwargs = {} if lm.arch.positions == "alibi" else {"position_ids": torch.arange(ids.numel())[None]}
        dense = lm.model(input_ids=ids[None], **kwargs).logits[0].float()
    for chunk in (1, 5):
        if chunk > 1 and not lm.arch.exact_chunks:
            continue
        torch.testing.assert_close(_stream(lm, ids, chunk), dense, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", EXACT + FALLBACK)
def test_after_eviction_matches_independent_reference(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(60 if arch != "gpt2" else 50)
    ref = reference_logits(lm, ids, S, W)
    ours = _stream(lm, ids, chunk=1)
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=1e-5)
    # The comparison is meaningful: without sinks the logits after eviction are different.
    window_only = _stream(lm, ids, chunk=1, sinks=0, window=S + W)
    assert (window_only[S + W :] - ref[S + W :]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", EXACT)
@pytest.mark.parametrize("chunk", [3, 16, 40])
def test_chunked_feed_is_exact(tiny_lm, arch, chunk):
    lm = tiny_lm(arch)
    ids = _ids(120 if arch != "gpt2" else 50)
    one = _stream(lm, ids, chunk=1)
    torch.testing.assert_close(_stream(lm, ids, chunk=chunk), one, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_long_stream_rebases_frame_without_drift(tiny_lm, arch):
    """Thousands of tokens through a small window: many frame moves, still equal to the reference."""
    lm = tiny_lm(arch)
    ids = _ids(700, seed=3)
    ref = reference_logits(lm, ids, S, W)
    torch.testing.assert_close(_stream(lm, ids, chunk=7), ref, atol=1e-4, rtol=1e-5)


def test_window_and_dense_policies_chunk_exactly(tiny_lm):
    lm = tiny_lm("llama")
    ids = _ids(90)
    for sinks, window in ((0, W), (0, None)):
        torch.testing.assert_close(
            _stream(lm, ids, 13, sinks, window), _stream(lm, ids, 1, sinks, window), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("arch", FALLBACK)
def test_fallback_architectures_stream_chunks_with_evict_for_space(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(60)
    runner = SinkModel(lm)
    cache = runner.new_cache(S, W, max_chunk=8)
    logits = runner.step(cache, ids)
    assert logits.shape == (60, VOCAB) and torch.isfinite(logits).all()
    assert cache.buffered() <= S + W  # never holds more than sinks + window


def test_absolute_positions_must_fit_the_table(tiny_lm):
    lm = tiny_lm("gpt2")  # n_positions = 64
    with pytest.raises(ValueError, match=r"at most 64 .*got 4 \+ 100 = 104"):
        SinkModel(lm).new_cache(4, 100)


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("gemma2", "sliding-window"),
        ("mamba", "no attention KV cache"),
        ("t5", "encoder-decoder"),
        ("bert", "expected one of"),
    ],
)
def test_unsupported_architectures_are_refused_with_a_reason(model_type, reason):
    with pytest.raises(ValueError, match=reason):
        architecture_of(model_type, {})


def test_bad_chunk_and_cache_arguments(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="expected sinks >= 0 and window >= 1"):
        SinkModel(lm).new_cache(-1, 10)
    cache = SinkModel(lm).new_cache(4, 10, max_chunk=4)
    with pytest.raises(ValueError, match=r"chunk length must be in 1..4, got 5"):
        cache.begin(5, torch.device("cpu"))


def test_soft_capped_attention_is_refused():
    from model.attention import AttentionPlan, sink_attention

    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="expected softcap=None, got 50.0"):
        sink_attention(None, q, kv, kv, None, sink_plan=AttentionPlan(0, None, None, None), softcap=50.0)
