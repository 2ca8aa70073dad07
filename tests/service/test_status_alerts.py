"""The status JSON lists recent alerts (newest first, bounded) with their template and the key's verdict."""

from __future__ import annotations

from pipeline.service.metrics import StatusBoard


def _annotation(offset: int, lines: list[dict], verdict: dict | None) -> dict:
    return {"source": {"topic": "logs", "partition": 2, "offset": offset},
            "score": {"lines": lines, "verdict": verdict}}


def _line(no: int, alert: bool) -> dict:
    return {"line_no": no, "text": f"line {no}", "z": 1.5, "anomaly": False, "alert": alert, "score": 3.0 + no,
            "template": {"id": 9, "text": "line <*>", "seen_stream": 0, "seen_partition": 4, "seen_reference": 0}}


def test_recent_alerts_newest_first_bounded_with_template_and_verdict():
    board = StatusBoard(alerts=2)
    verdict = {"lines": 3, "alerts": 1, "max_score": 5.0}
    board.observe("host-a", _annotation(7, [_line(0, False), _line(1, True)], verdict))
    board.observe("host-b", _annotation(8, [_line(2, True), _line(3, True)], None))
    recent = board.snapshot()["recent_alerts"]
    assert [(a["stream"], a["line_no"]) for a in recent] == [("host-b", 3), ("host-b", 2)]  # host-a's fell out
    assert recent[0] == {"stream": "host-b", "line_no": 3, "text": "line 3", "score": 6.0, "z": 1.5, "offset": 8,
                         "partition": "logs:2", "template": {"id": 9, "text": "line <*>", "seen_reference": 0},
                         "verdict": None}
    board = StatusBoard()
    board.observe("host-a", _annotation(7, [_line(1, True)], verdict))
    assert board.snapshot()["recent_alerts"][0]["verdict"] == verdict


def test_annotations_without_alert_fields_add_no_alerts():
    board = StatusBoard()
    board.observe("s", _annotation(0, [{"line_no": 0, "text": "x", "z": None, "anomaly": False}], None))
    assert board.snapshot()["recent_alerts"] == []
