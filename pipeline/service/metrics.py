"""Prometheus metrics, the health endpoints and the status page of the service.

HTTP (`service.metrics_host`:`service.metrics_port`):
- `/metrics`: Prometheus text format (the names and their meaning are listed in `deploy/README.md`).
- `/healthz`: 200 while the poll loop turns (liveness).
- `/readyz`: 200 when the model is loaded, the state store answered, Kafka answers and every assigned
  partition was claimed and restored; 503 while Redis or Kafka is unreachable.
- `/` : a small HTML status page (partitions with lag and checkpoint age, resident streams, the most
  anomalous recent lines per stream), refreshed live from `/status.json`.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, Info, generate_latest

RECORDS = Counter("sinkstream_records_total", "Input records processed (annotated or answered with an error)")
TOKENS = Counter("sinkstream_tokens_total", "Tokens fed to the model")
ANNOTATIONS = Counter("sinkstream_annotations_total", "Annotations published", ["kind"])
ANOMALIES = Counter("sinkstream_anomalous_lines_total", "Lines flagged as anomalous")
RESIDENT = Gauge("sinkstream_resident_streams", "Stream sessions in memory")
STREAMS_SPILLED = Counter("sinkstream_streams_spilled_total", "Sessions moved out of memory to the state store")
STREAMS_RELOADED = Counter("sinkstream_streams_reloaded_total", "Sessions read back from the state store")
EVICTIONS = Counter("sinkstream_cache_evictions_total", "Tokens evicted from stream windows")
PARTITIONS = Gauge("sinkstream_assigned_partitions", "Input partitions owned by this process")
LAG = Gauge("sinkstream_partition_lag_records", "High watermark minus next offset to process (consumer's view)",
            ["partition"])
CHECKPOINT_AGE = Gauge("sinkstream_checkpoint_age_seconds", "Seconds since the partition's last checkpoint",
                       ["partition"])
CHECKPOINT_SECONDS = Histogram("sinkstream_checkpoint_seconds", "Time of one partition checkpoint (flush to commit)",
                               buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
CHECKPOINT_SIZE = Histogram("sinkstream_checkpoint_size_bytes", "Snapshot bytes written by one checkpoint",
                            buckets=(0, 1e5, 1e6, 1e7, 5e7, 1e8, 5e8, 1e9, 5e9))
CHECKPOINT_FAILURES = Counter("sinkstream_checkpoint_failures_total", "Checkpoints that did not go through",
                              ["reason"])
MODEL_STEP_SECONDS = Histogram("sinkstream_model_step_seconds", "Model time of one batched step (forward passes only)",
                               buckets=(0.005, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
GROUP_SECONDS = Histogram("sinkstream_group_seconds", "Time of one group of records, model step to publish",
                          buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
BATCH_TOKENS = Histogram("sinkstream_batch_tokens", "Tokens in one model step",
                         buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384))
BATCH_STREAMS = Histogram(
    "sinkstream_batch_streams", "Streams in one model step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
ERRORS = Counter("sinkstream_errors_total", "Errors by type", ["type"])
KAFKA_UP = Gauge("sinkstream_kafka_up", "1 while the broker answers polls, else 0")
REDIS_UP = Gauge("sinkstream_redis_up", "1 while the state store answers, else 0")
READY = Gauge("sinkstream_ready", "1 while /readyz answers 200")
BUILD = Info("sinkstream_build", "Version, model and cache of this process")

for _type in ("bad_input", "redis", "kafka", "snapshot_refused", "fenced", "model_step"):
    ERRORS.labels(_type)
for _reason in ("store", "sink", "fenced"):
    CHECKPOINT_FAILURES.labels(_reason)


def describe_build(lm: Any, settings: Any) -> None:
    """Fill `sinkstream_build_info` (version, model, fingerprint, device, dtype, sinks, window)."""
    try:
        version = metadata.version("sinkstream")
    except metadata.PackageNotFoundError:
        version = "unknown"
    BUILD.info({
        "version": version, "model": settings.model.name, "fingerprint": lm.fingerprint, "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""), "sinks": str(settings.cache.sinks),
        "window": str(settings.cache.window),
    })


class Health:
    """Liveness (the poll loop turns) and readiness (set by the service from what it knows)."""

    def __init__(self, stall_after_s: float = 300.0):
        self.stall_after_s = stall_after_s
        self.last_loop = time.monotonic()
        self.ready = False
        self.kafka_down_since: float | None = None

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < self.stall_after_s


class StatusBoard:
    """What the status page shows: per stream, the most anomalous of its recent lines, and the most recent
    alerts of all streams with their template and the stream's verdict at that time (bounded memory)."""

    def __init__(self, per_stream: int = 5, streams: int = 200, alerts: int = 50):
        self.per_stream, self.streams = per_stream, streams
        self._lines: dict[str, deque[dict[str, Any]]] = {}
        self._alerts: deque[dict[str, Any]] = deque(maxlen=alerts)
        self._lock = threading.Lock()
        self.partitions: dict[str, dict[str, Any]] = {}

    def observe(self, stream: str, annotation: dict[str, Any]) -> None:
        score = annotation["score"]
        alerts = [line for line in score["lines"] if line.get("alert")]
        if alerts:
            source = annotation["source"]
            with self._lock:
                for line in alerts:
                    t = line.get("template")
                    self._alerts.append({
                        "stream": stream, "line_no": line["line_no"], "text": line["text"],
                        "score": line.get("score"), "z": line["z"], "offset": source["offset"],
                        "partition": f"{source['topic']}:{source['partition']}",
                        "template": None if t is None else {"id": t["id"], "text": t["text"],
                                                             "seen_reference": t.get("seen_reference")},
                        "verdict": score.get("verdict"),
                    })
        scored = [line for line in score["lines"] if line["z"] is not None]
        if not scored:
            return
        with self._lock:
            recent = self._lines.setdefault(stream, deque(maxlen=50))
            for line in scored:
                recent.append({"line_no": line["line_no"], "text": line["text"], "z": line["z"],
                               "anomaly": line["anomaly"], "offset": annotation["source"]["offset"]})
            if len(self._lines) > self.streams:
                self._lines.pop(next(iter(self._lines)))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            streams = {
                key: sorted(lines, key=lambda line: -line["z"])[: self.per_stream] for key, lines in self._lines.items()
            }
            recent_alerts = list(reversed(self._alerts))  # newest first
        return {"partitions": self.partitions, "resident_streams": int(RESIDENT._value.get()), "streams": streams,
                "recent_alerts": recent_alerts}


STATUS = StatusBoard()

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sinkstream status</title>
<style>body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}.anomaly{background:#ffe0e0}
code{font-size:12px}</style></head><body>
<h1>sinkstream</h1><p id="summary">loading…</p>
<h2>Partitions</h2><table id="partitions"><tr><th>partition</th><th>lag (records)</th><th>checkpoint age (s)</th>
<th>next offset</th><th>resident streams</th></tr></table>
<h2>Most anomalous recent lines</h2><div id="streams"></div>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
async function refresh(){
  const r = await fetch('status.json'); const s = await r.json();
  document.getElementById('summary').textContent =
    `ready: ${s.ready} · resident streams: ${s.resident_streams} · updated ${new Date().toLocaleTimeString()}`;
  let rows = '<tr><th>partition</th><th>lag (records)</th><th>checkpoint age (s)</th><th>next offset</th>'
    + '<th>resident streams</th></tr>';
  for (const [p, v] of Object.entries(s.partitions)) {
    rows += `<tr><td>${esc(p)}</td><td>${v.lag ?? ''}</td><td>${v.checkpoint_age_s.toFixed(1)}</td>`
      + `<td>${v.next_offset ?? ''}</td><td>${v.resident}</td></tr>`;
  }
  document.getElementById('partitions').innerHTML = rows;
  let out = '';
  for (const [k, lines] of Object.entries(s.streams)) {
    out += `<h3>${esc(k)}</h3><table><tr><th>line</th><th>z</th><th>text</th></tr>`;
    for (const l of lines) {
      out += `<tr class="${l.anomaly ? 'anomaly' : ''}"><td>${l.line_no}</td><td>${l.z.toFixed(2)}</td>`
        + `<td><code>${esc(l.text)}</code></td></tr>`;
    }
    out += '</table>';
  }
  document.getElementById('streams').innerHTML = out || '<p>no scored lines yet</p>';
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


def serve(host: str, port: int, health: Health) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz, /readyz, / and /status.json on `host:port` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"poll loop stalled\n")
            elif path == "/readyz":
                self._send(200 if health.ready else 503, b"ready\n" if health.ready else b"not ready\n")
            elif path == "/status.json":
                body = {**STATUS.snapshot(), "ready": health.ready}
                self._send(200, json.dumps(body).encode(), "application/json")
            elif path == "/":
                self._send(200, _PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._send(404, html.escape("not found: try /, /metrics, /healthz or /readyz\n").encode())

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # keep access logs out of the service log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
