"""Conversation over one endless sink cache: appends, never re-encodes, resumes bit-exactly, rolls back."""

from __future__ import annotations

import pytest
import torch

from model.snapshot import SnapshotError, dump_cache
from model.stepper import SinkModel
from pipeline.dialogue import Conversation, GenerationSettings, pick_token

TURNS = ["Hello, who are you?", "Tell me about rivers.", "And mountains?", "Thanks, goodbye."]


def cache_tensors(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_same_cache(a, b):
    assert (a.seen, a.base) == (b.seen, b.base)
    for (ka, va), (kb, vb) in zip(cache_tensors(a), cache_tensors(b)):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_turns_append_to_one_cache(tiny_chat_lm):
    model = SinkModel(tiny_chat_lm)
    conv = Conversation(model, model.new_cache(sinks=4, window=48), GenerationSettings(max_reply_tokens=6))
    seen = 0
    for i, user in enumerate(TURNS * 3):
        reply = conv.turn(user)
        # only this turn's template text and the last reply's pending tokens are fed, never the history
        expected_prompt = len(conv.chat.user_ids(user, first=i == 0)) + (0 if i == 0 else 3)
        assert reply.prompt_tokens == expected_prompt
        assert len(reply.token_ids) == 6 and reply.stopped == "max_tokens"
        seen += reply.prompt_tokens + len(reply.token_ids) - 1  # the last reply token is pending
        assert conv.cache.seen == seen
        assert conv.state.pending_ids == [reply.token_ids[-1], *conv.chat.closing_ids(stopped_on_end=False)]
    stats = conv.stats()
    assert stats.tokens_seen == seen and stats.turns == len(TURNS) * 3
    assert stats.capacity == 52 and stats.buffered <= 52 + conv.cache.max_chunk
    assert stats.evicted == seen - 4 - 47  # everything but the sinks and the W-1 most recent tokens is gone


def test_reply_ends_on_end_of_turn_and_stays_in_cache(terse_chat_lm):
    model = SinkModel(terse_chat_lm)
    conv = Conversation(model, model.new_cache(), GenerationSettings(max_reply_tokens=10))
    end = conv.chat.end_of_turn_id
    first = conv.turn("Hi")
    assert first.token_ids == [end] and first.stopped == "end_of_turn" and first.text == ""
    assert conv.state.pending_ids == [end, *conv.chat.closing_ids(stopped_on_end=True)]
    seen = conv.cache.seen
    second = conv.turn("Hi again")
    # the end-of-turn token and the template's closing newline went in before the new user turn
    assert second.prompt_tokens == 2 + len(conv.chat.user_ids("Hi again", first=False))
    assert conv.cache.seen == seen + second.prompt_tokens


@pytest.mark.parametrize("settings", [
    GenerationSettings(max_reply_tokens=7),
    GenerationSettings(max_reply_tokens=7, temperature=0.9, top_p=0.95, seed=11),
], ids=["greedy", "sampled"])
def test_resume_from_snapshot_is_bit_exact(tiny_chat_lm, settings):
    """Turns A, B, C straight vs A, save, resume, B, C: the same reply tokens and the same cache tensors."""
    model = SinkModel(tiny_chat_lm)
    straight = Conversation(model, model.new_cache(sinks=4, window=40, max_chunk=16), settings)
    replies_straight = [straight.turn(t).token_ids for t in TURNS]

    first = Conversation(model, model.new_cache(sinks=4, window=40, max_chunk=16), settings)
    replies = [first.turn(TURNS[0]).token_ids]
    blob = first.snapshot()
    del first
    resumed = Conversation.restore(model, blob)
    assert resumed.settings == settings and resumed.state.turns == 1
    replies += [resumed.turn(t).token_ids for t in TURNS[1:]]

    assert replies == replies_straight
    assert straight.stats().evicted > 0  # the window rolled during the test
    assert_same_cache(resumed.cache, straight.cache)
    assert resumed.state == straight.state
    assert torch.equal(resumed.last_logits, straight.last_logits)


def test_sampling_is_deterministic_given_the_seed(tiny_chat_lm):
    model = SinkModel(tiny_chat_lm)

    def replies(seed, temperature=1.0, top_p=1.0):
        s = GenerationSettings(max_reply_tokens=8, temperature=temperature, top_p=top_p, seed=seed)
        conv = Conversation(model, model.new_cache(sinks=4, window=64), s)
        return [conv.turn(t).token_ids for t in TURNS[:2]]

    assert replies(1) == replies(1)
    assert replies(1) != replies(2)
    # a nucleus that holds only the top token is greedy
    assert replies(1, top_p=1e-9) == replies(None, temperature=0.0)


def test_pick_token_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = GenerationSettings(temperature=1.0, top_p=0.7, seed=0)
    g = s.generator(0)
    drawn = {pick_token(logits, s, g) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside the nucleus


def test_interrupted_turn_is_undone(tiny_chat_lm):
    model = SinkModel(tiny_chat_lm)
    settings = GenerationSettings(max_reply_tokens=6)
    conv = Conversation(model, model.new_cache(sinks=4, window=64), settings)
    conv.turn(TURNS[0])
    seen, state = conv.cache.seen, conv.state

    def interrupt(_piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.turn(TURNS[1], on_text=interrupt)
    assert conv.cache.seen == seen and conv.state == state
    again = conv.turn(TURNS[1]).token_ids

    ref = Conversation(model, model.new_cache(sinks=4, window=64), settings)
    ref.turn(TURNS[0])
    assert again == ref.turn(TURNS[1]).token_ids
    assert_same_cache(conv.cache, ref.cache)


def test_conversation_on_a_stream_cache_is_deterministic(tiny_chat_lm, chat_tokenizer):
    """The service hands a stream session's cache: the reply depends only on that cache and the settings."""
    model = SinkModel(tiny_chat_lm)
    text = chat_tokenizer("some log lines\n" * 30, add_special_tokens=False)["input_ids"]

    def reply():
        cache = model.new_cache(sinks=4, window=64, max_chunk=32)
        model.step(cache, text)
        return Conversation(model, cache, GenerationSettings(max_reply_tokens=5)).turn("What happened?")

    a, b = reply(), reply()
    assert a.token_ids == b.token_ids and a.text == b.text and a.prompt_tokens == b.prompt_tokens


def test_restore_refuses_a_plain_cache_snapshot(tiny_chat_lm):
    model = SinkModel(tiny_chat_lm)
    cache = model.new_cache(sinks=4, window=16)
    model.step(cache, [5, 6, 7])
    with pytest.raises(SnapshotError, match="conversation snapshot"):
        Conversation.restore(model, dump_cache(cache))
