"""gpt-oss learned sink logits (`sinks` / `s_aux`) through sinkstream's exact sink attention (issue 13).

Tiny random GptOss configs with every layer full attention. Before eviction the sink cache must equal
transformers' own eager GptOss attention; after eviction it must equal the independent one-token-at-a-time
reference (tests/model/reference.py) run on transformers' eager attention, which applies the sink logits itself.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers

from model.arch import architecture_of
from model.loader import wrap_model
from model.rotary import Rotation
from model.stepper import SinkModel
from tests.model.reference import reference_logits

VOCAB, S, W = 97, 4, 12
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "truncate": False, "original_max_position_embeddings": 128},
}


def _config(rope: str, layer_types=("full_attention", "full_attention")) -> transformers.GptOssConfig:
    return transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        layer_types=list(layer_types),
        sliding_window=128,
        rope_parameters=dict(ROPE[rope]),
    )


def _build(rope: str, sink_scale: float = 2.0):
    """(sinkstream LoadedModel, transformers eager copy) with sharpened weights and non-trivial sink logits."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(rope), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "router" not in name:
                p.mul_(3.0)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * sink_scale)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # transformers' own GptOss eager_attention_forward, sinks included
    eager.eval()
    return wrap_model(model), eager


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(1))


def _stream(lm, ids, chunk: int, sinks: int = S, window: int | None = W) -> torch.Tensor:
    runner = SinkModel(lm)
    return runner.step(runner.new_cache(sinks, window, max_chunk=chunk), ids)


@pytest.fixture(scope="module", params=list(ROPE))
def gpt_oss(request):
    return _build(request.param)


def test_rotation_matches_gpt_oss_half_width_cos_sin(gpt_oss) -> None:
    lm, _ = gpt_oss
    assert lm.arch.model_type == "gpt_oss" and lm.arch.exact_chunks
    assert Rotation(lm.model).dims == 16  # the full head_dim, from 8 cos values per position


def test_before_eviction_equals_transformers_eager(gpt_oss) -> None:
    lm, eager = gpt_oss
    ids = _ids(S + W)
    with torch.inference_mode():
        expected = eager(input_ids=ids[None]).logits[0].float()
        plain = lm.model(input_ids=ids[None]).logits[0].float()  # sinkstream attention without a plan
    torch.testing.assert_close(plain, expected, atol=2e-5, rtol=1e-5)
    for chunk in (1, 5, 16):
        torch.testing.assert_close(_stream(lm, ids, chunk), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_after_eviction_equals_independent_reference(gpt_oss, chunk) -> None:
    lm, eager = gpt_oss
    ids = _ids(70)
    ref = reference_logits(types.SimpleNamespace(model=eager, arch=lm.arch), ids, S, W)
    torch.testing.assert_close(_stream(lm, ids, chunk), ref, atol=5e-5, rtol=1e-5)


def test_the_sink_logits_matter() -> None:
    """Dropping the sink logits (-inf: no extra column) changes the output, so the tests above can fail."""
    lm, eager = _build("default")
    ids = _ids(40)
    with_sinks = _stream(lm, ids, 1)
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
    without = _stream(lm, ids, 1)
    assert (with_sinks - without).abs().max() > 1e-2


def test_alternating_sliding_layers_are_refused() -> None:
    config = _config("default", ("sliding_attention", "full_attention")).to_dict()
    with pytest.raises(
        ValueError, match=r"every layer full attention.*1 of 2 layers.*sliding_attention.*sliding_window=128"
    ):
        architecture_of("gpt_oss", config)
    assert architecture_of("gpt_oss", _config("default").to_dict()).positions == "rope"
