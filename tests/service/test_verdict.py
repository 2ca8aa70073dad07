"""The combined score, the alert threshold at a target rate, and the stream's verdict (issue 18)."""

from __future__ import annotations

import json
import math
import random

import pytest
from pydantic import ValidationError

from connectors.protocols import Record
from pipeline.service.engine import Engine
from pipeline.service.session import StreamSession
from pipeline.service.threshold import THRESHOLD_BATCH, AlertThreshold
from pipeline.service.verdict import Verdict, combined_score, key_score, line_severity
from pipeline.settings import DEFAULT_SEVERITY, ScoreSettings, load_settings


def test_combined_score_is_the_documented_formula():
    sc = ScoreSettings(weight_surprise=1.0, weight_new_stream=1.0, weight_new_partition=2.0,
                       weight_new_reference=4.0, weight_rarity=0.25)
    assert combined_score(sc, None) == 0.0
    assert combined_score(sc, -2.0) == 0.0
    assert combined_score(sc, 1.5) == 1.5
    got = combined_score(sc, 2.0, new_stream=True, new_partition=True, new_reference=True, seen=0, lines=7)
    assert got == pytest.approx(2.0 + 1 + 2 + 4 + 0.25 * 3.0)  # -log2(1/8) = 3 bits
    got = combined_score(sc, 0.5, new_stream=False, new_partition=False, new_reference=False, seen=3, lines=15)
    assert got == pytest.approx(0.5 + 0.25 * 2.0)  # -log2(4/16) = 2 bits
    assert combined_score(sc, 0.5, severity="FATAL") == 0.5 + 8.0  # the default levels
    assert combined_score(sc, 0.5, severity="INFO") == combined_score(sc, 0.5, severity=None) == 0.5
    assert combined_score(sc.model_copy(update={"severity": {"oops": 3.0}}), None, severity="oops") == 3.0


@pytest.mark.parametrize(("line", "level"), [
    # BGL: the level after the header; "error" later in the message is text, not the level
    ("- 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO "
     "instruction cache parity error corrected", "INFO"),
    ("KERNDTLB 1118536327 2005.06.11 R30-M0-N9-C:J16-U01 2005-06-11-17.32.07.581048 R30-M0-N9-C:J16-U01 RAS "
     "KERNEL FATAL data TLB error interrupt", "FATAL"),
    ("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865049064139660", "INFO"),
    ("081109 213234 2706 WARN dfs.DataNode$DataXceiver: Got exception while serving blk_-1", "WARN"),
    ("[Sun Dec 04 04:51:18 2005] [error] mod_jk child workerEnv in error state 6", "[error]"),
    ("2015-07-29 17:41:44,747 - ERROR [QuorumPeer[myid=1]/0:0:0:0:0:0:0:0:2181:FastLeaderElection@542]", "ERROR"),
    ("2024-01-01T00:00:00Z api[12]: <CRITICAL> pool exhausted", "CRITICAL"),
    ("Of Man's first disobedience, and the fruit of that forbidden tree, whose mortal taste brought death", None),
    ("the seventeenth token is a level here: " + "x " * 13 + "FATAL", None),
])
def test_a_lines_severity_is_its_first_level_word(line, level):
    assert line_severity(line, DEFAULT_SEVERITY) == level
    assert line_severity(line, {}) is None  # the term is off


def test_severity_settings_are_checked():
    assert load_settings(None, score={"severity": {"E": 2, "W": 0.5}}).score.severity == {"E": 2.0, "W": 0.5}
    for bad in ({"TWO WORDS": 1.0}, {"": 1.0}, {"ERROR": -1.0}, {"ERROR": float("inf")}):
        with pytest.raises(ValidationError, match="severity"):
            load_settings(None, score={"severity": bad})


def test_threshold_restored_anywhere_behaves_as_one_that_never_stopped():
    rng = random.Random(3)
    scores = [rng.lognormvariate(0.0, 1.0) for _ in range(40 * THRESHOLD_BATCH + 5)]
    straight = AlertThreshold()
    expected = []
    for s in scores:
        expected.append((straight.exceeds(s), straight.threshold))
        straight.add(s, 0.01)
    for cut in (0, 1, THRESHOLD_BATCH - 1, THRESHOLD_BATCH, 5 * THRESHOLD_BATCH + 3, len(scores) - 1):
        first = AlertThreshold()
        got = []
        for s in scores[:cut]:
            got.append((first.exceeds(s), first.threshold))
            first.add(s, 0.01)
        resumed = AlertThreshold.from_json(json.loads(json.dumps(first.to_json())))
        for s in scores[cut:]:
            got.append((resumed.exceeds(s), resumed.threshold))
            resumed.add(s, 0.01)
        assert got == expected, cut
        assert resumed.to_json() == straight.to_json()
    # The threshold is the running 99th percentile of a log-normal: exp(2.326) = 10.2.
    assert straight.threshold == pytest.approx(math.exp(2.326), rel=0.25)


def test_threshold_refuses_a_bad_state():
    with pytest.raises(ValueError):
        AlertThreshold.from_json({"n": 1, "pending": [float("nan")], "digest": None, "threshold": None})
    with pytest.raises(ValueError):
        AlertThreshold.from_json({"n": 1, "pending": [], "digest": "%%%", "threshold": 1.0})


def test_verdict_aggregates_the_stream():
    import torch

    from pipeline.service.scoring import LineScore

    def line(no, z, nll, score, alert, anomaly=False):
        out = LineScore(no, "x", [1, 2], torch.tensor([nll, nll]), z=z, anomaly=anomaly)
        out.score, out.alert = score, alert
        return out

    v = Verdict()
    v.record(7)
    v.line(line(0, None, 1.0, 3.0, False), True, True, False)
    v.record(9)
    v.line(line(1, 2.5, 2.0, 7.5, True, anomaly=True), True, False, True)
    v.line(line(2, -1.0, 0.5, 7.5, False), False, False, True)
    v.settle(None)  # the record's end: its per-key terms
    assert v.model_dump() == {
        "records": 2, "lines": 3, "tokens": 6, "anomalous_lines": 1, "max_z": 2.5, "max_line_nll": 2.0,
        "first_offset": 7, "last_offset": 9, "alerts": 1, "max_score": 7.5, "max_score_line": 1,
        "last_alert_line": 1, "new_in_stream": 2, "new_in_partition": 1, "not_in_reference": 2,
        "profile_distance": None, "key_score": pytest.approx(1.0 + 0.1 * 7.5 / 8.5)}


def test_key_score_is_the_documented_formula():
    assert key_score(None, 0, None) == 0.0
    assert key_score(0.25, 0, None) == 0.25
    assert key_score(0.25, 3, 1.0) == pytest.approx(0.25 + 1.0 + 0.05)
    assert key_score(0.0, 0, -4.0) == 0.0  # a negative max score does not lower it


def _settings(**score):
    return load_settings(None, cache={"sinks": 4, "window": 48, "chunk": 16}, score=score)


NORMAL = [
    "INFO request {i} served in {ms} ms by worker {w}",
    "INFO cache hit for key user:{i} on shard {w}",
    "DEBUG heartbeat {i} from node-{w} ok",
    "INFO block blk_{i} replicated to 10.0.0.{w}:50010",
    "WARN slow disk on node-{w}: {ms} ms for read {i}",
]


def _normal_stream(n: int, seed: int = 11) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(0, n, 10):  # records of 10 lines
        lines = [rng.choice(NORMAL).format(i=i + j, ms=rng.randrange(1, 900), w=rng.randrange(1, 9)) + "\n"
                 for j in range(10)]
        out.append("".join(lines).encode())
    return out


def test_alert_rate_holds_on_a_long_normal_stream(text_lm, one_thread):
    """After warm-up, alerts per 1,000 lines stay within 2x of score.alert_rate (tiny model, 2,000 lines)."""
    rate, warmup = 0.02, 300
    engine = Engine(text_lm, _settings(alert_rate=rate, alert_warmup_lines=warmup))
    session = StreamSession(engine, "normal")
    lines = []
    for offset, value in enumerate(_normal_stream(2000)):
        for a in session.process(Record("in", 0, offset, b"normal", value, {}, 0)):
            lines += a["score"]["lines"]
    after = [line for line in lines if line["line_no"] >= warmup]
    per_1000 = 1000 * sum(line["alert"] for line in after) / len(after)
    print(f'alerts per 1,000 lines after warm-up: {per_1000:.2f}')
    assert rate * 1000 / 2 <= per_1000 <= rate * 1000 * 2, per_1000
    assert not any(line["alert"] for line in lines[:warmup])
    verdict = session.judge.verdict
    assert verdict.lines == len(lines) and verdict.alerts == sum(line["alert"] for line in lines)
    assert verdict.max_score == max(line["score"] for line in lines)
    assert verdict.new_in_stream == len({line["template"]["id"] for line in lines}) == verdict.new_in_partition


def test_short_keys_alert_against_their_partitions_threshold_and_resume_exactly(text_lm, one_thread):
    """Keys of one record (10 lines) never reach their own alert warm-up; they alert against the partition's
    threshold (all its streams' scores) at the target rate, an odd line in a short key alerts, and the
    partition's threshold restored from its saved memory behaves as one that never stopped."""
    from pipeline.service.templates import TemplateMemory

    rate, warmup = 0.02, 300
    engine = Engine(text_lm, _settings(alert_rate=rate, alert_warmup_lines=warmup))
    values = _normal_stream(2400)
    odd = b"ERROR kernel panic: machine check exception on cpu 3, bank 4: 0xb200000000070f0f\n"
    values[200] = values[200][: values[200].index(b"\n") + 1] + odd + values[200].split(b"\n", 2)[2]

    def run(memory, offsets):
        out = []
        for offset in offsets:
            key = f"blk-{offset}".encode()
            session = StreamSession(engine, key.decode(), templates=memory)
            for a in session.process(Record("in", 0, offset, key, values[offset], {}, 0)):
                out += a["score"]["lines"]
            session.release()  # the key's session is over: its KV slot goes back to the pool
        return out

    memory = engine.new_template_memory()
    first = run(memory, range(120))
    saved = json.loads(json.dumps(memory.to_json()))
    rest = run(memory, range(120, len(values)))
    lines = first + rest
    assert all(line["line_no"] < warmup for line in lines)  # no stream reached its own threshold
    assert not any(line["alert"] for line in lines[:warmup])  # nor had the partition scored enough lines
    normal = [line for line in lines[warmup:] if not line["text"].startswith("ERROR")]
    per_1000 = 1000 * sum(line["alert"] for line in normal) / len(normal)
    print(f"short keys: alerts per 1,000 normal lines after the partition's warm-up: {per_1000:.2f}")
    assert rate * 1000 / 2 <= per_1000 <= rate * 1000 * 2, per_1000
    [panic] = [line for line in lines if line["text"].startswith("ERROR")]
    assert panic["alert"], panic
    resumed = run(TemplateMemory.from_state(engine.settings.templates, saved), range(120, len(values)))
    assert resumed == rest


def test_annotations_carry_templates_score_alert_and_verdict(text_lm, tmp_path):
    reference = tmp_path / "normal.txt"
    reference.write_text("INFO request 1 served in 3 ms by worker 2\nDEBUG heartbeat 4 from node-5 ok\n")
    settings = load_settings(None, cache={"sinks": 4, "window": 48, "chunk": 16},
                             templates={"reference": str(reference)})
    session = StreamSession(Engine(text_lm, settings), "s")
    value = b"INFO request 9 served in 7 ms by worker 1\nERROR disk on fire\nERROR disk on fire\n"
    [a] = session.process(Record("in", 0, 0, b"s", value, {}, 0))
    lines = a["score"]["lines"]
    assert [x["template"]["seen_reference"] for x in lines] == [1, 0, 0]
    assert [x["template"]["seen_stream"] for x in lines] == [0, 0, 1]
    assert lines[1]["template"]["id"] == lines[2]["template"]["id"] == 3  # after the reference's two
    sc = settings.score
    assert [x["severity"] for x in lines] == ["INFO", "ERROR", "ERROR"]
    assert lines[1]["score"] == pytest.approx(  # z is still None (needs 2 lines); rarity -log2(1 / 4)
        sc.weight_new_stream + sc.weight_new_partition + sc.weight_new_reference + sc.weight_rarity * 2.0
        + sc.severity["ERROR"])
    verdict = a["score"]["verdict"]
    assert {k: verdict[k] for k in ("records", "lines", "tokens", "first_offset", "last_offset")} == {
        "records": 1, "lines": 3, "tokens": a["score"]["tokens"], "first_offset": 0, "last_offset": 0}
    assert {k: verdict[k] for k in ("alerts", "max_score", "max_score_line", "last_alert_line", "new_in_stream",
                                    "new_in_partition", "not_in_reference")} == {
        "alerts": 0, "max_score": a["score"]["max_score"], "max_score_line": 1, "last_alert_line": None,
        "new_in_stream": 2, "new_in_partition": 2, "not_in_reference": 2}
    assert verdict["profile_distance"] is None  # no templates.reference_session
    assert verdict["key_score"] == pytest.approx(1.0 + 0.1 * verdict["max_score"] / (1 + verdict["max_score"]))


def test_the_verdict_carries_the_distance_to_the_nearest_normal_session(text_lm, tmp_path):
    """With `templates.reference_session`, each key's verdict says how far its mix of templates so far is from
    the nearest normal session of the reference, line after line; a key that follows a normal session's shape
    ends at 0, one with a normal template too often does not, and the key score ranks them so."""
    reference = tmp_path / "normal.txt"
    reference.write_text("".join(f"INFO open blk_{b}\nINFO write blk_{b} part {p} done ok\n" if p == 0 else
                                 f"INFO write blk_{b} part {p} done ok\n" for b in range(3) for p in range(2))
                         + "".join(f"INFO close blk_{b}\n" for b in range(3)))
    settings = load_settings(None, cache={"sinks": 4, "window": 48, "chunk": 16},
                             templates={"reference": str(reference), "reference_session": "blk_[0-9]+"})
    engine = Engine(text_lm, settings)
    got = {}
    for key, lines in (("good", ["INFO open blk_7", "INFO write blk_7 part 0 done ok",
                                 "INFO write blk_7 part 1 done ok", "INFO close blk_7"]),
                       ("odd", ["INFO open blk_8", "INFO write blk_8 part 0 done ok",
                                "INFO write blk_8 part 1 done ok", "INFO write blk_8 part 2 done ok",
                                "INFO close blk_8"])):
        session = StreamSession(engine, key)
        got[key] = [session.process(Record("in", 0, i, key.encode(), (line + "\n").encode(), {}, 0))[0]
                    ["score"]["verdict"] for i, line in enumerate(lines)]
    good, odd = got["good"], got["odd"]
    # open, write: 1 of 4 lines, 2 of 4 (the template counts so far against open 1, write 2, close 1)
    assert [v["profile_distance"] for v in good] == pytest.approx([3 / 4, 2 / 4, 1 / 4, 0.0])
    assert odd[-1]["profile_distance"] == pytest.approx(1 / 5)  # write 3 times against 2
    assert good[-1]["not_in_reference"] == odd[-1]["not_in_reference"] == 0
    assert good[-1]["key_score"] < odd[-1]["key_score"]
    assert odd[-1]["key_score"] == pytest.approx(
        0.2 + 0.1 * odd[-1]["max_score"] / (1 + odd[-1]["max_score"]))
