"""The metrics port in process: prometheus_client's `/metrics` WSGI app with the health endpoints, `/status.json`
and the static status page beside it (`pipeline.service.metrics.app` / `serve`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from pipeline.devstack.processes import free_port
from pipeline.service import metrics


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(metrics, "STATUS", metrics.StatusBoard())
    health = metrics.Health(stall_after_s=60)
    port = free_port()
    srv = metrics.serve("127.0.0.1", port, health)
    try:
        yield f"http://127.0.0.1:{port}", health
    finally:
        srv.shutdown()
        srv.server_close()


def test_metrics_health_status_and_page(server):
    base, health = server
    metrics.RECORDS.inc(3)
    metrics.RESIDENT.set(7)
    code, ctype, body = _get(f"{base}/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=")
    assert b"sinkstream_records_total " in body and b"sinkstream_resident_streams 7.0" in body
    assert _get(f"{base}/healthz")[:1] == (200,)
    assert _get(f"{base}/readyz")[0] == 503
    health.ready = True
    assert _get(f"{base}/readyz")[::2] == (200, b"ready\n")
    metrics.STATUS.partitions["in:0"] = {"lag": 2, "checkpoint_age_s": 1.5, "next_offset": 9, "resident": 1}
    metrics.STATUS.observe("s", {"source": {"offset": 4}, "score": {"lines": [
        {"line_no": 0, "text": "<b>x</b>", "z": 5.0, "anomaly": True}]}})
    code, ctype, body = _get(f"{base}/status.json")
    assert code == 200 and ctype == "application/json"
    status = json.loads(body)
    assert status["ready"] is True and status["resident_streams"] == 7
    assert status["partitions"]["in:0"]["next_offset"] == 9
    assert status["streams"]["s"] == [{"line_no": 0, "text": "<b>x</b>", "z": 5.0, "anomaly": True, "offset": 4}]
    code, ctype, page = _get(f"{base}/")
    assert code == 200 and ctype == "text/html; charset=utf-8"
    assert page == metrics.PAGE.read_bytes() and b"fetch('status.json')" in page and b"const SECTIONS" in page
    assert _get(f"{base}/nope")[0] == 404


def test_a_stalled_loop_fails_liveness(server):
    base, health = server
    health.last_loop -= 120
    assert _get(f"{base}/healthz")[::2] == (503, b"poll loop stalled\n")
