"""The sink study's measurements on models whose attention is known in closed form."""

from __future__ import annotations

import pytest
import torch
import transformers

from model.loader import wrap_model
from pipeline.training import study


def _llama(layers: int = 2) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_uniform_attention_gives_the_uniform_baseline() -> None:
    """With zero queries every score is 0, so query q attends 1/(q+1) to each visible key."""
    model = _llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    samples = torch.randint(0, 50, (3, 16))
    att = study.attention_share(model, samples, sink_id=None)
    expected = float(sum(1.0 / (q + 1) for q in range(8, 16)) / 8)
    assert att["uniform"][0] == pytest.approx(expected)
    for layer in att["share"]:
        assert layer == pytest.approx([expected] * 4, abs=1e-6)
    # per head, over all queries that see position 0: mean of 1/(q+1) for q = 0..15
    harmonic = float(sum(1.0 / (q + 1) for q in range(16)) / 16)
    assert att["head_first"] == [pytest.approx([harmonic] * 4, abs=1e-6)] * 2
    assert att["sink_rate"] == [0.0, 0.0, 0.0, 0.0]  # 0.21 < 0.3: no sink head


def test_a_sink_token_that_takes_all_attention_is_measured() -> None:
    """Make key 0 (the sink token's key) dominate every score: its share goes to ~1 and every head counts."""
    model = _llama(layers=1)
    sink = 7
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight.zero_()
        attn.q_proj.bias = None
        # queries constant along one direction, and only the sink token's embedding has a key along it
        model.model.embed_tokens.weight.mul_(0.0)
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.embed_tokens.weight[sink, 1] = 50.0
        attn.q_proj.weight[:, 0] = 1.0
        attn.k_proj.weight.zero_()
        attn.k_proj.weight[:, 1] = 1.0
    samples = torch.randint(10, 50, (2, 15))
    att = study.attention_share(model, samples, sink_id=sink)
    assert att["length"] == 16
    assert att["share"][0][0] > 0.99
    assert att["sink_rate"][0] == 100.0 and att["sink_rate"][1] == 0.0


def test_stream_perplexity_scores_the_same_targets_with_and_without_a_sink_token() -> None:
    lm = wrap_model(_llama())
    ids = torch.randint(10, 50, (100,)).tolist()
    plain = study.stream_perplexity(lm, ids, sinks=1, cache=16, chunk=8, sink_id=None)
    primed = study.stream_perplexity(lm, ids, sinks=1, cache=16, chunk=8, sink_id=7)
    dense = study.stream_perplexity(lm, ids, sinks=0, cache=None, chunk=8, sink_id=None)
    assert plain["targets"] == primed["targets"] == dense["targets"] == 99
    assert plain["config"] == "1+15" and dense["config"] == "dense"
    assert plain["perplexity"] != primed["perplexity"]
