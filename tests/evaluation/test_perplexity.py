"""The perplexity harness on tiny inputs: exact arithmetic, segment coverage, run semantics, table shapes."""

from __future__ import annotations

import math

import pytest
import torch

from model.policies import score_ids
from pipeline.evaluation import perplexity as ev
from pipeline.evaluation.tables import markdown_table
from tests.helpers.models import VOCAB

S, W = 4, 28


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_perplexity_is_exp_of_mean_nll():
    nlls = [0.5, 1.0, 2.5, 4.0]
    assert ev.perplexity(nlls) == pytest.approx(math.exp(2.0), rel=1e-12)
    assert math.isnan(ev.perplexity([]))
    scored = ev.Scored("sink", "4+28", indices=[0, 1, 2, 3], nlls=nlls)
    assert scored.perplexity(1, 3) == pytest.approx(math.exp(1.75))
    assert scored.perplexity(only={0, 3}) == pytest.approx(math.exp(2.25))
    assert scored.summary()["perplexity"] == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize("total,size,stride", [(1000, 128, 1), (1000, 128, 7), (512, 512, 3), (5, 10, 1)])
def test_segments_cover_every_target_exactly_once(total, size, stride):
    indices = list(range(0, total, stride))
    nlls = [float(i % 13) / 3 for i in indices]
    segs = ev.segments(indices, nlls, size, total)
    assert segs[0]["start"] == 0 and segs[-1]["end"] == total
    assert all(a["end"] == b["start"] for a, b in zip(segs, segs[1:]))
    assert sum(s["targets"] for s in segs) == len(indices)
    for s in segs:
        inside = [n for i, n in zip(indices, nlls) if s["start"] <= i < s["end"]]
        assert s["targets"] == len(inside)
        if inside:
            assert s["perplexity"] == pytest.approx(math.exp(sum(inside) / len(inside)))
    with pytest.raises(ValueError, match="outside"):
        ev.segments([total], [1.0], size, total)


def test_markdown_table_shape_and_cells():
    table = markdown_table(["a", "b", "c"], [["x", 1.234, float("nan")], ["y", None, 7]])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == 4 for line in lines)
    assert len({len(line) for line in lines}) == 1  # columns padded to one width
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["x", "1.23", "—"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["y", "—", "7"]
    assert set(lines[1]) == {"|", "-"}
    # cells are not re-parsed as numbers: a fixed number of decimals stays
    assert "0.500" in markdown_table(["p"], [[0.5]], digits=3)
    with pytest.raises(ValueError, match="expected 3 cells"):
        markdown_table(["a", "b", "c"], [["x", 1.0]])


def test_runs_score_what_they_claim(tiny_lm):
    lm = tiny_lm("llama")
    ids = _ids(150)
    direct = {i: n for i, _, n in score_ids(lm, ids, "sink", S, W, chunk=16)}
    sink = ev.score_run(lm, ids, ev.SINK, S, W, chunk=64, progress=False)
    assert sink.indices == list(range(149)) and sink.config == f"{S}+{W}"
    assert max(abs(direct[i] - n) for i, n in zip(sink.indices, sink.nlls)) < 1e-4
    # Window attention holds the same number of keys as the sink cache: 0+(S+W).
    window = ev.score_run(lm, ids, ev.WINDOW, S, W, chunk=64, progress=False)
    same = [n for _, _, n in score_ids(lm, ids, "window", 0, S + W, chunk=64)]
    assert window.config == f"0+{S + W}" and window.nlls == pytest.approx(same, abs=1e-5)
    # Newline sinks: S newline tokens streamed first, then the text's own targets.
    nl = ev.score_run(lm, ids, ev.NEWLINE, S, W, chunk=64, newline=3, progress=False)
    ref = [n for i, _, n in score_ids(lm, [3] * S + ids, "sink", S, W, chunk=64) if i >= S]
    assert nl.indices == list(range(149)) and nl.nlls == pytest.approx(ref, abs=1e-5)
    # Re-computation scores every stride-th target, over S+W tokens.
    rc = ev.score_run(lm, ids, ev.RECOMPUTE, S, W, stride=5, progress=False)
    assert rc.indices == list(range(0, 149, 5))
    assert rc.perplexity() == pytest.approx(math.exp(sum(rc.nlls) / len(rc.nlls)))


def test_dense_stops_at_the_model_positions(tiny_lm):
    lm = tiny_lm("llama")  # 512 positions
    dense = ev.score_run(lm, _ids(600), ev.DENSE, S, W, chunk=128, progress=False)
    assert dense.indices == list(range(lm.arch.max_positions - 1))


def test_length_experiment_tables_and_comparisons(tiny_lm):
    lm = tiny_lm("llama")
    ids = _ids(600, seed=1)
    r = ev.length_experiment(lm, ids, S, W, chunk=64, stride=7, segment=100, newline=3, progress=False)
    assert [x["name"] for x in r["runs"]] == list(ev.RUNS)
    lines = r["table"].splitlines()
    assert len(lines) == 5  # header, rule, first 512 tokens (dense fits), all 600 tokens (dense does not), matched
    assert all(line.count("|") == len(ev.RUNS) + 2 for line in lines)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[2][0] == "first 512 tokens" and cells[3][:2] == ["all 600 tokens", "—"]
    for segs in r["segments"].values():
        assert segs[-1]["end"] == 599 and len(segs) == 6
    assert sum(s["targets"] for s in r["segments"]["recompute"]) == len(range(0, 599, 7))
    assert sum(s["targets"] for s in r["segments"]["dense"]) == 511
    # sink vs recompute is compared on recompute's own targets.
    sink = {i: n for i, _, n in score_ids(lm, ids, "sink", S, W, chunk=64)}
    matched = [sink[i] for i in range(0, 599, 7)]
    c = r["comparisons"]
    assert c["sink_on_recompute_targets"] == pytest.approx(math.exp(sum(matched) / len(matched)), rel=1e-4)
    assert c["sink_over_recompute"] == pytest.approx(c["sink_on_recompute_targets"] / c["recompute"])
    matched_row = [cell.strip() for cell in lines[4].split("|")[1:-1]]
    assert matched_row[0] == "all 600 tokens, every 7th target" and matched_row[1] == "—"
    assert matched_row[3] == f"{c['sink_on_recompute_targets']:.2f}" and matched_row[5] == f"{c['recompute']:.2f}"
    assert r["nll"]["sink"]["indices"] == list(range(599))
    run = {x["name"]: x for x in r["runs"]}
    assert c["window_over_sink"] == pytest.approx(run["window"]["perplexity"] / run["sink"]["perplexity"])


def test_ordinal():
    assert [ev.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 86, 103, 112)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "86th", "103rd", "112th"]


def test_auto_stride_and_bad_runs(tiny_lm):
    assert ev.auto_stride(32767, 1024, 200_000) == 168
    assert ev.auto_stride(10, 10, 10**6) == 1
    with pytest.raises(ValueError, match="runs must be among"):
        ev.length_experiment(tiny_lm("llama"), _ids(50), S, W, runs=["sinks"], progress=False)


def test_ablation_tables(tiny_lm):
    lm = tiny_lm("llama")
    ids = _ids(200, seed=2)
    r = ev.sinks_ablation(lm, ids, cache=32, counts=(0, 1, 4), chunk=64, segment=64, label="tiny", progress=False)
    assert [x["config"] for x in r["runs"]] == ["0+32", "1+31", "4+28"]
    header, rule, row = [[c.strip() for c in line.strip("|").split("|")] for line in r["table"].splitlines()]
    assert header == ["Cache config", "0+32", "1+31", "4+28"] and row[0] == "tiny" and len(row) == 4
    assert row[1:] == [f"{x['perplexity']:.2f}" for x in r["runs"]]
    zero = [n for _, _, n in score_ids(lm, ids, "window", 0, 32, chunk=64)]
    assert r["runs"][0]["perplexity"] == pytest.approx(ev.perplexity(zero), rel=1e-5)
    c = ev.cache_ablation(lm, ids, sizes=(16, 32, 64), sinks=4, chunk=64, label="tiny", progress=False)
    assert [x["config"] for x in c["runs"]] == ["4+12", "4+28", "4+60"]
    assert len(c["table"].splitlines()) == 4  # header, rule, perplexity row, ms/token row
    with pytest.raises(ValueError, match="larger than sinks"):
        ev.cache_ablation(lm, ids, sizes=(4,), sinks=4, progress=False)
