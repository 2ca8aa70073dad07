"""Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`) of the service."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

RECORDS = Counter("sinkstream_records_total", "Input records processed")
TOKENS = Counter("sinkstream_tokens_total", "Tokens fed to the model")
ANNOTATIONS = Counter("sinkstream_annotations_total", "Annotations published", ["kind"])
ANOMALIES = Counter("sinkstream_anomalous_lines_total", "Lines flagged as anomalous")
RESIDENT = Gauge("sinkstream_resident_streams", "Stream sessions in memory")
PARTITIONS = Gauge("sinkstream_assigned_partitions", "Input partitions owned by this process")
STEP_SECONDS = Histogram("sinkstream_record_seconds", "Time to process one record (model step included)")
CHECKPOINT_SECONDS = Histogram("sinkstream_checkpoint_seconds", "Time of one partition checkpoint (flush to commit)")
CHECKPOINT_BYTES = Counter("sinkstream_checkpoint_bytes_total", "Snapshot bytes written to the state store")
FENCED = Counter("sinkstream_fenced_total", "Checkpoints refused because another owner claimed the partition")


class Health:
    """Liveness (the poll loop turns) and readiness (model loaded and consumer running)."""

    def __init__(self, stall_after_s: float = 300.0):
        self.stall_after_s = stall_after_s
        self.last_loop = time.monotonic()
        self.ready = False

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < self.stall_after_s


def serve(port: int, health: Health) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `port` from a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = health.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"poll loop stalled\n")
            elif self.path == "/readyz":
                self._send(200 if health.ready else 503, b"ready\n" if health.ready else b"starting\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # keep access logs out of the service log
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
