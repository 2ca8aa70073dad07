"""`sinkstream tail`: rows from annotations, duplicates dropped by id, --alerts-only, --key, colours."""

from __future__ import annotations

import io
import json

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.cli.tail import RED, Tail
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


def _annotation(ident: str, stream: str, lines: list[dict], verdict: dict | None = None) -> dict:
    return {"id": ident, "kind": "score", "stream": stream, "score": {"lines": lines, "verdict": verdict}}


def _line(no: int, text: str, alert: bool = False, score: float = 1.0) -> dict:
    return {"line_no": no, "text": text, "alert": alert, "score": score, "z": 0.5,
            "template": {"id": 3, "text": "x <*>", "seen_stream": 0, "seen_partition": 7, "seen_reference": 0}}


VERDICT = {"lines": 9, "alerts": 2, "max_score": 7.5, "max_score_line": 4, "not_in_reference": 3,
           "new_in_partition": 1, "key_score": 1.088, "profile_distance": None}


def test_rows_alerts_verdict_and_duplicates():
    out = io.StringIO()
    tail = Tail(out)
    a = _annotation("r1", "host-a", [_line(0, "ok line"), _line(1, "disk failure", alert=True, score=7.5)], VERDICT)
    assert tail.feed(a) == 2
    assert tail.feed(json.loads(json.dumps(a))) == 0 and tail.duplicates == 1  # redelivered: same id
    rows = out.getvalue().splitlines()
    assert rows[0] == "host-a #0 score   1.00 z  +0.5 t3x7 new  ok line"
    assert rows[1] == "ALERT host-a #1 score   7.50 z  +0.5 t3x7 new  disk failure"
    assert rows[2] == ("      verdict host-a: 2 alerts in 9 lines, max score 7.50 (line 4), 3 lines not in the "
                       "reference, 1 new to the partition, key score 1.09")
    assert len(rows) == 3 and RED not in out.getvalue()


def test_alerts_only_key_filter_and_colour():
    out = io.StringIO()
    tail = Tail(out, alerts_only=True, key="b", color=True)
    tail.feed(_annotation("1", "a", [_line(0, "alert on a", alert=True)]))
    tail.feed(_annotation("2", "b", [_line(0, "quiet"), _line(1, "alert on b", alert=True)]))
    tail.feed({"id": "3", "kind": "error", "stream": "b", "error": {"problems": [{"reason": "r", "message": "m"}]}})
    text = out.getvalue()
    assert "alert on a" not in text and "quiet" not in text and "alert on b" in text and "b ERROR r: m" in text
    assert text.startswith(RED) or "\033[1m\033[31mALERT b #1" in text


def test_duplicate_memory_is_bounded():
    tail = Tail(io.StringIO(), max_ids=2)
    for ident in ("1", "2", "3"):
        tail.feed(_annotation(ident, "a", [_line(0, ident)]))
    assert list(tail.seen) == ["2", "3"]
    assert tail.feed(_annotation("1", "a", [_line(0, "1")])) == 1  # forgotten, shown again


def test_tail_of_a_real_service_output_shows_every_line_once(text_lm):
    settings = load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16}, kafka={"output_topic": "out"})
    topic, sink = MemoryTopic("in", partitions=1), MemorySink()
    for i in range(4):
        topic.append(0, f"k{i % 2}".encode(), f"first {i}\nsecond {i}\n".encode())
    Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), sink, MemoryStore()).run(
        idle_exit_s=0.2, install_signals=False)
    values = [r.value for r in sink.sent]
    out = io.StringIO()
    tail = Tail(out, key="k1")
    tail.follow(values + values + [b"not json"])  # everything delivered twice, plus garbage
    rows = [r for r in out.getvalue().splitlines() if not r.startswith("(not an annotation")]
    assert len(rows) == 4 and tail.duplicates == len(values)
    assert [r.split("  ")[-1] for r in rows] == ["first 1", "second 1", "first 3", "second 3"]


def test_closed_sessions_show_their_final_verdict():
    out = io.StringIO()
    tail = Tail(out, alerts_only=True)
    quiet = {**VERDICT, "alerts": 0}
    tail.feed({"id": "c1", "kind": "closed", "stream": "blk_1", "closed": {"verdict": quiet, "idle": 5,
                                                                          "unit": "records"}})
    tail.feed({"id": "c2", "kind": "closed", "stream": "blk_2", "closed": {
        "verdict": {**VERDICT, "profile_distance": 0.25, "key_score": 1.338}, "idle": 5, "unit": "records"}})
    assert out.getvalue().splitlines() == ["blk_2 closed after 5 records idle: 2 alerts in 9 lines, max score 7.50, "
                                           "3 lines not in the reference, key score 1.34, profile distance 0.25"]
