"""`cache.sink_token`: resolving the setting and priming a new stream's cache with it (issue 13)."""

from __future__ import annotations

import pytest
import torch
import transformers

from model.loader import wrap_model
from model.snapshot import dump_cache, load_cache
from model.stepper import SinkModel
from pipeline.service.sink_token import SinkTokenError, prime_sink_token, resolve_sink_token
from pipeline.settings import CacheSettings
from pipeline.training.tokenizer import SINK_TOKEN, train_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog\n" * 20 + "2025-01-01 12:00:00 INFO worker 7 started\n" * 20


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer([TEXT], 300)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharpen attention so that which keys are visible matters
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.mul_(3.0)
    return wrap_model(model, tokenizer)


def test_setting_accepts_ids_text_and_off() -> None:
    assert CacheSettings().sink_token is None
    assert CacheSettings(sink_token=3).sink_token == 3
    assert CacheSettings(sink_token="7").sink_token == 7  # environment variables arrive as text
    assert CacheSettings(sink_token="<|sink|>").sink_token == "<|sink|>"
    with pytest.raises(ValueError, match="token id >= 0"):
        CacheSettings(sink_token=-1)


def test_resolve(tiny) -> None:
    vocab = len(tiny.tokenizer)
    sink = tiny.tokenizer.convert_tokens_to_ids(SINK_TOKEN)
    assert resolve_sink_token(tiny.tokenizer, None, vocab) is None
    assert resolve_sink_token(tiny.tokenizer, SINK_TOKEN, vocab) == sink
    assert resolve_sink_token(tiny.tokenizer, 5, vocab) == 5
    with pytest.raises(SinkTokenError, match="exactly one token"):
        resolve_sink_token(tiny.tokenizer, "the quick brown fox", vocab)
    with pytest.raises(SinkTokenError, match=f"0..{vocab - 1}"):
        resolve_sink_token(tiny.tokenizer, vocab, vocab)
    with pytest.raises(SinkTokenError):
        resolve_sink_token(tiny.tokenizer, True, vocab)


def test_primed_stream_keeps_the_sink_token_and_scores_as_if_it_were_the_first_token(tiny) -> None:
    runner = SinkModel(tiny)
    sink = resolve_sink_token(tiny.tokenizer, SINK_TOKEN, len(tiny.tokenizer))
    ids = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:120]
    primed = runner.new_cache(sinks=1, window=16, max_chunk=8)
    prime_sink_token(runner, primed, sink)
    assert primed.seen == 1
    sink_keys = [layer.keys[..., :1, :].clone() for layer in primed.layers]
    nll, _ = runner.nll(primed, ids)
    assert torch.isnan(nll[0]), "the stream's first text token stays unscored, as without a sink token"
    # the same stream fed in one piece with the sink token in front: identical NLLs for the text tokens
    whole = runner.new_cache(sinks=1, window=16, max_chunk=8)
    reference, _ = runner.nll(whole, [sink] + ids)
    torch.testing.assert_close(nll[1:], reference[2:], rtol=0, atol=1e-5)
    # after 120 tokens through a 1 + 16 cache the sink token is still the cache's first entry, unchanged
    assert primed.seen == 121
    for layer, keys in zip(primed.layers, sink_keys):
        torch.testing.assert_close(layer.keys[..., :1, :], keys, rtol=0, atol=0)
    # and it matters: without it (plain window of 17) the same text scores differently
    plain = runner.new_cache(sinks=0, window=17, max_chunk=8)
    other, _ = runner.nll(plain, ids)
    assert not torch.allclose(other[40:], nll[40:], atol=1e-3)


def test_sink_token_survives_a_snapshot(tiny) -> None:
    runner = SinkModel(tiny)
    ids = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:80]
    cache = runner.new_cache(sinks=1, window=16, max_chunk=8)
    prime_sink_token(runner, cache, 1)
    runner.nll(cache, ids[:50])
    restored, _, _ = load_cache(tiny, dump_cache(cache))
    a, _ = runner.nll(cache, ids[50:])
    b, _ = runner.nll(restored, ids[50:])
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_priming_needs_a_new_cache(tiny) -> None:
    runner = SinkModel(tiny)
    cache = runner.new_cache(sinks=1, window=16)
    runner.step(cache, [3, 4])
    with pytest.raises(ValueError, match="new cache"):
        prime_sink_token(runner, cache, 1)


# ---- the service path: StreamSession with `cache.sink_token` ---------------------------------------------------

LINES = [f"2025-01-01 12:00:{i:02d} INFO worker {i % 7} started the quick brown fox\n" for i in range(24)]


def _session_settings(sink_token, kv_pool=True):
    from pipeline.settings import load_settings

    return load_settings(None, cache={"sinks": 1, "window": 16, "chunk": 8, "sink_token": sink_token},
                         score={"warmup_lines": 2}, service={"kv_pool": kv_pool})


def _records(key: bytes = b"s1", start: int = 0, lines=LINES, headers=None):
    from connectors.protocols import Record

    return [Record("in", 0, start + i, key, line.encode(), dict(headers or {}), 0) for i, line in enumerate(lines)]


def _scores(annotations):
    return [
        (a["id"], [(ln["tokens"], ln["mean_nll"]) for ln in a["score"]["lines"]])
        for a in annotations
        if a["kind"] == "score"
    ]


def test_session_primes_every_new_stream_and_never_scores_the_sink_token(tiny) -> None:
    from pipeline.service.engine import Engine
    from pipeline.service.session import StreamSession

    sink = tiny.tokenizer.convert_tokens_to_ids(SINK_TOKEN)
    engine = Engine(tiny, _session_settings(SINK_TOKEN, kv_pool=False))  # inspects SinkCache tensors
    assert engine.sink_token == sink
    session = StreamSession(engine, "s1")
    assert session.cache.seen == 1 and session.tokens_seen == 0
    annotations = [a for r in _records() for a in session.process(r)]
    text_tokens = sum(len(engine.tokenize(line)) for line in LINES)
    assert session.tokens_seen == text_tokens and session.cache.seen == text_tokens + 1
    assert annotations[-1]["tokens_seen"] == text_tokens
    # the same lines and token counts are annotated as without a sink token; the scores differ (other context)
    plain = StreamSession(Engine(tiny, _session_settings(None, kv_pool=False)), "s1")
    plain_annotations = [a for r in _records() for a in plain.process(r)]
    with_sink, without = _scores(annotations), _scores(plain_annotations)
    assert [(i, [t for t, _ in lines]) for i, lines in with_sink] == [
        (i, [t for t, _ in lines]) for i, lines in without
    ]
    assert with_sink != without
    # the sink token is not among the first line's tokens, and the first text token has no prediction (the sink
    # token's logits are discarded): the line's mean NLL is over its tokens 2..n, each seeing the sink token
    first_ids = engine.tokenize(LINES[0])
    first = annotations[0]["score"]["lines"][0]
    assert first["tokens"] == len(first_ids)
    reference, _ = engine.runner.nll(engine.new_cache(), first_ids)
    assert torch.isnan(reference[0])
    assert first["mean_nll"] == pytest.approx(float(reference[1:].double().mean()), abs=1e-5)
    # and it is still the stream's first cache entry after many evictions: the key a fresh primed cache holds
    fresh = engine.new_cache()
    for layer, ref in zip(session.cache.layers, fresh.layers):
        torch.testing.assert_close(layer.keys[..., :1, :], ref.keys[..., :1, :], rtol=0, atol=0)


def test_sink_token_session_snapshot_resume_is_exact(tiny) -> None:
    from pipeline.service.engine import Engine
    from pipeline.service.session import StreamSession

    engine = Engine(tiny, _session_settings(SINK_TOKEN))
    whole = StreamSession(engine, "s1")
    expected = [a for r in _records() for a in whole.process(r)]
    first = StreamSession(engine, "s1")
    got = [a for r in _records()[:10] for a in first.process(r)]
    resumed = StreamSession.restore(engine, first.snapshot())
    assert resumed.primed == 1 and resumed.tokens_seen == first.tokens_seen
    got += [a for r in _records() for a in resumed.process(r)]  # records before next_offset are replays: skipped
    assert got == expected


def test_reset_primes_the_new_cache_again(tiny) -> None:
    from pipeline.service.engine import Engine
    from pipeline.service.session import RESET_HEADER, StreamSession

    engine = Engine(tiny, _session_settings(SINK_TOKEN, kv_pool=False))  # inspects SinkCache tensors
    session = StreamSession(engine, "s1")
    for r in _records(lines=LINES[:8]):
        session.process(r)
    reset = _records(start=8, lines=LINES[8:9], headers={RESET_HEADER: b"1"})[0]
    after = session.process(reset)
    n = len(engine.tokenize(LINES[8]))
    assert session.cache.seen == 1 + n and session.tokens_seen == n and after[0]["tokens_seen"] == n
    # identical to a brand-new primed stream fed the same line
    fresh = StreamSession(engine, "s1")
    assert _scores(fresh.process(_records(start=8, lines=LINES[8:9])[0])) == _scores(after)
