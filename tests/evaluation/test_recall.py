"""The recall harness on a tiny random Llama with the real SmolLM2 tokenizer: shapes, distances, scoring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.loader import wrap_model
from model.stepper import SinkModel
from pipeline.evaluation import recall as rc
from tests.dialogue.tiny import build_tiny_chat_model


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    from model.loader import resolve_model_dir

    return transformers.AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return wrap_model(build_tiny_chat_model(tokenizer, seed=1), tokenizer)


def test_lines_follow_the_longeval_format(tokenizer):
    lines = rc.build_lines(tokenizer, 5, seed=3)
    assert [line.key for line in lines] == [1, 2, 3, 4, 5]
    for line in lines:
        assert tokenizer.decode(line.ids) == f"line {line.key}: REGISTER_CONTENT is <{line.value}>\n"
        assert tokenizer.decode(line.value_ids) == str(line.value) and 10_000 <= line.value < 100_000
    assert rc.build_lines(tokenizer, 5, seed=3) == lines != rc.build_lines(tokenizer, 5, seed=4)


@pytest.mark.parametrize("prompt", ["chat", "cue"])
def test_distances_and_visibility_are_computed_right(tiny, tokenizer, prompt):
    lines = rc.build_lines(tokenizer, 9, seed=0)
    window = 64
    result = rc.run_policy(tiny, lines, "sink", 4, window, 16, [1, 2, 3, 5], warmup=5, every=2, prompt=prompt)
    assert [(q.query_line, q.d_lines) for q in result.questions] == [(f, d) for f in (5, 7, 9) for d in (1, 2, 3, 5)]
    for q in result.questions:
        target = lines[q.query_line - q.d_lines]
        assert q.target_line == target.key
        q_ids, _ = rc.question(
            tokenizer, target, prompt, None if prompt == "cue" else rc.ChatTurns.from_tokenizer(tokenizer)
        )
        after = sum(len(line.ids) for line in lines[q.query_line - q.d_lines + 1 : q.query_line])
        expected = len(target.value_ids) + len(target.end_ids) + after + len(q_ids) - 1
        assert q.d_tokens == expected
        assert q.value_visible == (expected <= window - 1)
        assert q.tag_visible == (expected + len(target.prefix_ids) <= window - 1)
    assert any(q.value_visible for q in result.questions) and not all(q.value_visible for q in result.questions)


def test_candidate_scores_equal_a_plain_forward_and_leave_the_cache_alone(tiny, tokenizer):
    model = SinkModel(tiny)
    lines = rc.build_lines(tokenizer, 6, seed=2)
    stream = [i for line in lines for i in line.ids]
    cache = model.new_cache(sinks=4, window=None, max_chunk=32)
    model.step(cache, stream)
    before = cache.state()
    q_ids, a_ids = rc.question(tokenizer, lines[2], "cue", None)
    other = lines[4].value_ids
    scores, rows = rc.score_candidates(model, cache, q_ids, [a_ids, other])
    assert cache.state().seen == before.seen
    assert all(x is y for pair in zip(cache.state().tensors, before.tensors) for x, y in zip(*pair))
    for cand, score in zip([a_ids, other], scores):
        fresh = model.new_cache(sinks=4, window=None, max_chunk=512)
        nll, _ = model.nll(fresh, stream + list(q_ids) + list(cand))
        assert score == pytest.approx(-float(nll[-len(cand) :].sum()), abs=1e-3)
    assert rows.shape == (len(a_ids), len(tokenizer))


def test_a_window_larger_than_the_stream_scores_like_dense(tiny, tokenizer):
    lines = rc.build_lines(tokenizer, 8, seed=0)
    args = dict(chunk=16, distances=[1, 3, 6], warmup=6, every=1, prompt="cue", distractors=3)
    wide = rc.run_policy(tiny, lines, "sink", 4, 1024, **args)
    dense = rc.run_policy(tiny, lines, "dense", 4, 1024, **args)
    assert len(wide.questions) == len(dense.questions) == 9
    for a, b in zip(wide.questions, dense.questions):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert (a.correct, a.chosen, a.d_tokens) == (b.correct, b.chosen, b.d_tokens)


def test_report_shape(tiny):
    report = rc.recall_experiment(tiny, "tiny", sinks=4, window=48, chunk=16, queries=2, every=3, distractors=2)
    doc = json.loads(report.model_dump_json())
    assert [p["name"] for p in doc["policies"]] == ["sink", "window", "dense"]
    assert doc["distances"] == rc.auto_distances(48, doc["tokens_per_line"]) and doc["warmup"] == max(doc["distances"])
    assert doc["lines"] == doc["warmup"] + 3 and doc["chance_choice"] == pytest.approx(1 / 3)
    for p in doc["policies"]:
        assert len(p["questions"]) == 2 * len(doc["distances"])
        assert set(p["by_region"]) == {"inside", "edge", "evicted"}
        assert sum(b["n"] for b in p["by_region"].values()) == len(p["questions"])
        for row in p["by_distance"]:
            assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["choice_accuracy"] <= 1.0 and row["mean_logprob"] < 0
        assert all(q["candidates"] == 3 for q in p["questions"])
    assert doc["policies"][1]["sinks"] == 0 and doc["policies"][1]["window"] == 52
    assert doc["policies"][2]["window"] is None
    # regions are by distance in tokens relative to W
    for q in doc["policies"][0]["questions"]:
        assert rc.region(q["d_tokens"], 48) == (
            "evicted" if q["d_tokens"] >= 48 else "edge" if q["d_tokens"] >= 36 else "inside"
        )


def test_cli_writes_json_md_png(tmp_path, tiny, tokenizer):
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "--log-format", "json", "eval", "recall", "--model", str(model_dir),
         "--window", "40", "--queries", "2", "--every", "2", "--distances", "1,4", "--policies", "sink,window",
         "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "eval_recall.json").read_text())
    assert [p["name"] for p in doc["policies"]] == ["sink", "window"] and doc["distances"] == [1, 4]
    assert (out / "eval_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = [[c.strip() for c in line.strip("|").split("|")] for line in (out / "eval_recall.md").read_text().splitlines()
          if line.startswith("|")]
    assert md[0][:2] == ["d (lines)", "d (tokens)"] and [row[0] for row in md[2:4]] == ["1", "4"]
    assert "wrote" in proc.stdout
